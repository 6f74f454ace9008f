"""The Hopper attention kernels' jobs for triton_compile_check.py (kept apart so that file
stays readable): kernels/attention_hopper.py (forward) and attention_hopper_bwd.py (dK/dV,
dQ), compiled for sm_90 only, the one target they run on."""
from __future__ import annotations

import importlib

ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def add_jobs(jobs: list, _add, _attn_args, _pick, Desc) -> None:
    """Every autotune config at head dim 128, then the flag cases with default_config's tiles.
    The helpers are triton_compile_check's, passed in: that file runs as a script, and importing
    it back from here would load a second copy of it."""
    ah = importlib.import_module("fuseformer.kernels.attention_hopper")
    ahb = importlib.import_module("fuseformer.kernels.attention_hopper_bwd")
    hopper = [("attn_fwd_hopper", ah, ah.attn_fwd_hopper, ah.attn_fwd_hopper_tuned),
              ("attn_bwd_dkdv_hopper", ahb, ahb.attn_bwd_dkdv_hopper, ahb.attn_bwd_dkdv_hopper_tuned),
              # the dK/dV pass's own config list at head dims above 64 (its launcher's choice)
              ("attn_bwd_dkdv_wide_hopper", ahb, ahb.attn_bwd_dkdv_hopper, ahb.attn_bwd_dkdv_hopper_tuned_wide),
              # with ATOMIC_DQ: dQ summed by the dK/dV pass (attention.VARIANTS["dq"])
              ("attn_bwd_dkdv_atomic_hopper", ahb, ahb.attn_bwd_dkdv_hopper, ahb.attn_bwd_dkdv_hopper_tuned_atomic),
              ("attn_bwd_dq_hopper", ahb, ahb.attn_bwd_dq_hopper, ahb.attn_bwd_dq_hopper_tuned)]

    def hopper_case(case, configs=None, dt="fp16", D=64, causal=False, few=False, host=False, only=None, **kw):
        v, cx = _attn_args(dt, D, **kw)
        cx["CAUSAL"] = causal
        cx["HOST_DESC"] = host
        o_pointer = v.get("O")
        if host:  # 4-D host descriptors, boxed by BLOCK_M (query side) or BLOCK_N (key side)
            v.update({n: Desc(dt, "BLOCK_M") for n in ah._QUERY_ROWS})
            v.update({n: Desc(dt, "BLOCK_N") for n in ah._KEY_ROWS})
        for name, mod, plain, tuned in hopper:
            if mod is ahb and cx["BLOCK_D"] > ahb.MAX_BLOCK_D:
                continue  # the portable backward runs those head dims
            if only and name not in only:
                continue
            atomic = "atomic" in name
            if atomic and cx["BLOCK_D"] > ahb.MAX_ATOMIC_BLOCK_D:
                continue  # those head dims make dQ by the pass in either mode
            if name.startswith("attn_bwd_dkdv"):
                # Tuned: the config list the launcher takes at this head dim (dkdv_tuned).
                # Plain (default config): the one kernel, once per dQ mode.
                chosen = tuned is ahb.dkdv_tuned(cx["BLOCK_D"], atomic) if configs else "wide" not in name
                if not chosen:
                    continue
            names = set(plain.arg_names)
            # The dQ pass reads O by pointer (for delta) whatever the descriptors' place.
            vv, cc = _pick({**v, "O": o_pointer} if name == "attn_bwd_dq_hopper" else v, names), \
                _pick({**cx, "ATOMIC_DQ": atomic}, names)
            if configs:
                _add(jobs, name, tuned, 90, case, vv, cc, configs=configs)
                continue
            which = (few,) if mod is ah else ("dkdv" if name.startswith("attn_bwd_dkdv") else "dq",)
            m, n, w, s = mod.default_config(cx["BLOCK_D"], ITEMSIZE[dt], *which)
            _add(jobs, name, plain, 90, case, vv, {**cc, "BLOCK_M": m, "BLOCK_N": n},
                 options=dict(num_warps=w, num_stages=s), label=f"default BLOCK_M={m},BLOCK_N={n},w{w}s{s}")

    hopper_case("fp16 d128", configs="all", D=128)
    hopper_case("bf16 d64", configs="all", dt="bf16", D=64)
    # Every head-dim-128 dK/dV config in the flag cases where 64 x 64 two-stage tiles spilled.
    wide = {"attn_bwd_dkdv_wide_hopper"}
    hopper_case("bf16 d128 keypad-bool causal", configs="all", dt="bf16", D=128, mask="key_padding", causal=True,
                only=wide)
    hopper_case("bf16 d128 varlen gqa4 causal", configs="all", dt="bf16", D=128, varlen=True, group=4, causal=True,
                only=wide)
    hopper_case("bf16 d128 host descriptors", configs="all", dt="bf16", D=128, host=True)
    # Atomic dQ: every config where the dK/dV pass holds the most (varlen, GQA, causal).
    hopper_case("bf16 d64 varlen gqa4 causal", configs="all", dt="bf16", D=64, varlen=True, group=4, causal=True,
                only={"attn_bwd_dkdv_atomic_hopper"})
    hopper_case("fp16 d64 host descriptors keypad-bool causal gqa2", mask="key_padding", causal=True, group=2,
                host=True)
    hopper_case("bf16 d80 host descriptors keypad-float few programs", dt="bf16", D=80, mask="key_padding",
                mask_float=True, few=True, host=True)
    hopper_case("bf16 d64 keypad-bool causal", dt="bf16", mask="key_padding", causal=True)
    hopper_case("fp16 d80 keypad-float", D=80, mask="key_padding", mask_float=True)
    # Its dK/dV default config (32 x 128, 8 warps, 2 stages) is one of the tuned ones above:
    # the same compile twice would come from Triton's cache, without a ptxas report.
    hopper_case("bf16 d128 varlen gqa4 causal", dt="bf16", D=128, varlen=True, group=4, causal=True,
                only={"attn_fwd_hopper", "attn_bwd_dq_hopper"})
    hopper_case("fp16 d256", D=256)
    hopper_case("bf16 d256 few programs", dt="bf16", D=256, few=True)  # 64-row tiles, autotune off
