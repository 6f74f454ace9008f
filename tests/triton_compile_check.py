"""Compile every fuseformer Triton kernel ahead of time for sm_90 and sm_80, without a GPU.

The unit tests on a CPU runner execute the kernels through Triton's interpreter, which never
lowers them: a kernel that fails in the MLIR/LLVM pipeline or in ptxas, or that asks for more
shared memory than a block may have, would first be seen on a GPU. This script runs the real
NVIDIA pipeline (TTIR -> TTGIR -> LLIR -> PTX -> cubin) for a representative set of
constexpr combinations and every GPU autotune config, and reports registers, spills and
shared memory per compiled kernel.

    python tests/triton_compile_check.py [--json PATH] [--workers N] [--only SUBSTRING] [--list]

TRITON_INTERPRET must be unset (or 0) in this process: the kernels' modules build their
autotune config lists at import time, and the interpreter gets a different list.
tests/test_triton_compile.py runs this in a subprocess and judges the JSON it writes:
    {"skip": reason}                  the toolchain cannot compile even a trivial kernel here
    {"results": [...], "wall_s": s}   one entry per compile job (see _compile_job)
Exit status: 0 when every job compiled and fits its target's shared memory, 1 otherwise,
3 on a skip.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
import traceback

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), what
# Triton's launcher checks `metadata.shared` against before refusing to launch.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
SKIP_EXIT = 3
# FUSEFORMER_TRITON_AOT_FULL=1 compiles every case for sm_80 too (a few minutes of CPU); the
# default set keeps the CI test near a minute on two cores.
FULL = os.environ.get("FUSEFORMER_TRITON_AOT_FULL", "0") not in ("", "0")

# The job list is built once per process; workers are forked from the parent and rebuild
# nothing, they look their job up by index.
_JOBS: list = []


# ----------------------------------------------------------------------------- arguments


class Ptr:
    """A tensor argument: its Triton element type. Torch allocations are 16-byte aligned, so
    the JIT marks every pointer divisible by 16, and so do we: alignment decides whether loads
    vectorise and whether the pipeliner may stage them through shared memory (cp.async)."""

    def __init__(self, ty: str):
        self.ty = ty

    def __repr__(self):
        return f"*{self.ty}"


class Desc:
    """A host TensorDescriptor argument over a 4-D (B, H, L, D) tensor: its element type, and
    the constexpr that sets its box's row count (the launcher fits the box [1, 1, rows,
    BLOCK_D] to the config), so each config compiles with its own box."""

    def __init__(self, ty: str, rows: str):
        self.ty, self.rows = ty, rows

    def signature(self, constexprs: dict) -> str:
        return f"tensordesc<{self.ty}[1,1,{constexprs[self.rows]},{constexprs['BLOCK_D']}]>"

    def __repr__(self):
        return f"desc<{self.ty}>"


DIV16 = [["tt.divisibility", 16]]


def specialize(fn, values: dict, constexprs: dict):
    """(signature, constexprs, attrs) for ASTSource, as the 3.9 JIT derives them from real
    arguments: an int equal to 1 becomes a constexpr, an int divisible by 16 (or a pointer)
    gets tt.divisibility=16. Every parameter must be given exactly once, so a kernel whose
    parameters changed fails loudly here instead of being compiled with a wrong signature."""
    names = list(fn.arg_names)
    const_params = {p.name for p in fn.params if p.is_constexpr}
    given = set(values) | set(constexprs)
    problems = []
    if set(names) - given:
        problems.append(f"no value for {sorted(set(names) - given)}")
    if given - set(names):
        problems.append(f"unknown parameters {sorted(given - set(names))}")
    if set(values) & const_params:
        problems.append(f"constexpr parameters given as runtime values {sorted(set(values) & const_params)}")
    if (set(constexprs) & set(names)) - const_params:
        problems.append(f"runtime parameters given as constexprs {sorted((set(constexprs) & set(names)) - const_params)}")
    if problems:
        raise SpecMismatch(f"{fn.__name__}: the argument spec in tests/triton_compile_check.py is out of date with "
                           f"the kernel: {'; '.join(problems)}")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        v = values[name]
        if isinstance(v, Ptr):
            signature[name] = "*" + v.ty
            attrs[(i,)] = DIV16
        elif isinstance(v, Desc):
            signature[name] = v.signature(constexprs)
        elif isinstance(v, bool):
            signature[name] = "u1"
        elif isinstance(v, int):
            if v == 1:
                signature[name] = "constexpr"
                consts[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = DIV16
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: unsupported value {v!r}")
    return signature, consts, attrs


class SpecMismatch(Exception):
    pass


# ----------------------------------------------------------------------------- kernels


def _unwrap(obj):
    """(JITFunction, autotune configs or None, heuristics {name: fn})."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    configs, heuristics = None, {}
    while not isinstance(obj, JITFunction):
        if isinstance(obj, Autotuner):
            configs = list(obj.configs)
        elif isinstance(obj, Heuristics):
            heuristics.update(obj.values)
        obj = obj.fn
    return obj, configs, heuristics


def _options(config):
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) not in (None, 1):
        opts["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None) is not None:
        opts["maxnreg"] = config.maxnreg
    return opts


def _config_label(config):
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw}{',' if kw else ''}w{config.num_warps}s{config.num_stages}"


def _add(jobs, kernel_name, kernel, arch, case, values, constexprs, configs="all", options=None, label=None):
    """Queue one job per selected autotune config ("all", "first", "most_warps" or a list of
    indices), or
    one job with `options` for a kernel that is launched without autotuning."""
    fn, tune, heuristics = _unwrap(kernel)
    if tune is None:
        idx = [None]
        chosen = [(None, {}, dict(options or {}))]
    else:
        idx = {"all": list(range(len(tune))), "first": [0],
               # the most warps: the config a wide row runs (fewer warps spill)
               "most_warps": [max(range(len(tune)), key=lambda i: tune[i].num_warps)]}.get(configs, configs) \
            if isinstance(configs, str) else list(configs)
        chosen = [(tune[i], dict(tune[i].kwargs), _options(tune[i])) for i in idx]
    for index, (config, kw, opts) in zip(idx, chosen):
        cx = {**constexprs, **kw}
        for name, heur in heuristics.items():
            cx[name] = heur({**values, **cx})
        jobs.append(dict(
            kernel=kernel_name, fn=fn, arch=arch, case=case, values=values, constexprs=cx, options=opts,
            config=("tuned " + _config_label(config)) if config is not None else
            label or ",".join(f"{k[4:] if k.startswith('num_') else k}={v}" for k, v in opts.items()) or "defaults",
            autotuned=config is not None, config_index=index, n_configs=len(tune) if tune is not None else None,
        ))


# Representative shapes: BERT-base-like attention (B=4, H=12, L=512), packed varlen with
# 1000 tokens, a BERT FFN for linear_gelu. Strides are those the launchers pass.
B, H, L, TOTAL = 4, 12, 512, 1000


def _attn_args(dt, D, mask="none", mask_float=False, dropout=False, varlen=False, group=1):
    """Runtime arguments shared by the attention kernels, keyed by parameter name."""
    hk = H // group
    q_str = (0 if varlen else L * H * D, D, H * D)  # (B, L, H, D) memory viewed as (B, H, L, D)
    k_str = (0 if varlen else L * hk * D, D, hk * D)
    l_str = (0, TOTAL) if varlen else (H * L, L)
    if mask == "none":
        m_ptr, m_str = Ptr(dt), (0, 0, 0, 0)
    elif mask == "key_padding":  # (B, 1, 1, Lk) expanded: heads and query rows broadcast
        m_ptr, m_str = Ptr(dt if mask_float else "u8"), (L, 0, 0, 1)
    else:  # dense (B, 1, Lq, Lk)
        m_ptr, m_str = Ptr(dt if mask_float else "u8"), (L * L, 0, L, 1)
    v = {}
    for prefix, s in (("q", q_str), ("k", k_str), ("v", k_str), ("o", q_str), ("do", q_str), ("dq", q_str),
                      ("dk", k_str), ("dv", k_str)):
        v[f"stride_{prefix}b"], v[f"stride_{prefix}h"], v[f"stride_{prefix}" + ("n" if prefix in ("k", "v", "dk", "dv") else "m")] = s
    v["stride_lb"], v["stride_lh"] = l_str
    v["stride_mb"], v["stride_mh"], v["stride_mm"], v["stride_mn"] = m_str
    lq = lk = 384 if varlen else L
    # the fp32 dQ accumulator of ATOMIC_DQ: q's (B, H, L, D) shape, contiguous
    v["stride_ab"], v["stride_ah"] = l_str[0] * D, l_str[1] * D
    v.update(
        Q=Ptr(dt), K=Ptr(dt), V=Ptr(dt), O=Ptr(dt), DO=Ptr(dt), DQ=Ptr(dt), DK=Ptr(dt), DV=Ptr(dt),
        LSE=Ptr("fp32"), DELTA=Ptr("fp32"), MASK=m_ptr, DQ_ACC=Ptr("fp32"),
        SEED=Ptr("i64") if dropout else Ptr(dt),
        CU_Q=Ptr("i32") if varlen else Ptr("fp32"), CU_K=Ptr("i32") if varlen else Ptr("fp32"),
        # attention_launchers._bucket: length bucket * 1024 + batch*heads bucket
        H=H, GROUP=group, LQ=lq, LK=lk, TUNE_BUCKET=triton_next_pow2(max(lq, lk)) * 1024 + min(512, B * H),
        qk_scale=0.125 * 1.4426950408889634, sm_scale=0.125, dropout_p=0.1 if dropout else 0.0,
    )
    cx = dict(
        HEAD_D=D, BLOCK_D=max(16, triton_next_pow2(D)), CAUSAL=False,
        MASK_KIND={"none": 0, "key_padding": 1, "dense": 2}[mask], MASK_FLOAT=mask_float, DROPOUT=dropout,
        VARLEN=varlen, UPCAST=False, EXACT_FP32=dt == "fp32", ATOMIC_DQ=False, ONE_PASS=False,
    )
    return v, cx


def triton_next_pow2(n):
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _pick(values, fn_names):
    return {k: v for k, v in values.items() if k in fn_names}


def build_jobs():
    import importlib

    import types

    # import_module: the package re-exports functions under the same names as these modules.
    # The portable attention kernels, forward (and configs) and backward, as one namespace.
    ak = types.SimpleNamespace(**{**vars(importlib.import_module("fuseformer.kernels.attention_kernels")),
                                  **vars(importlib.import_module("fuseformer.kernels.attention_bwd_kernels"))})

    jobs = []

    # --- attention: forward and both backward kernels, launched two ways: autotuned (every
    # GPU config) or plain with default_config() (the interpreter, FUSEFORMER_AUTOTUNE=0). The
    # module exposes `<name>_tuned` beside the plain `<name>`, or (older) `<name>` autotuned.
    from triton.runtime.autotuner import Autotuner

    attn = []
    for name, kind in (("attn_fwd", "fwd"), ("attn_bwd_dkdv", "bwd"), ("attn_bwd_dq", "bwd")):
        obj = getattr(ak, name)
        tuned = getattr(ak, name + "_tuned", obj if isinstance(obj, Autotuner) else None)
        attn.append((name, kind, _unwrap(obj)[0], tuned))
    # The dK/dV pass with ATOMIC_DQ (attention.VARIANTS["dq"]): it also sums dQ, up to head dim 64.
    attn.append(("attn_bwd_dkdv_atomic", "bwd", _unwrap(ak.attn_bwd_dkdv)[0], ak.attn_bwd_dkdv_tuned_atomic))
    # The one-kernel backward (VARIANTS["dq"] "fused"): the dK/dV pass over every key, one tuner
    # per key block; its untuned launch's `kind` is that block (default_config).
    for n, tuned in ak.attn_bwd_dkdv_tuned_one_pass.items():
        attn.append((f"attn_bwd_dkdv_one_pass{n}", n, _unwrap(ak.attn_bwd_dkdv)[0], tuned))
    atomic_max_block_d = importlib.import_module("fuseformer.kernels.attention_launchers")._ATOMIC_MAX_BLOCK_D["portable"]
    itemsize = {"fp16": 2, "bf16": 2, "fp32": 4}

    def attn_case(arch, case, tuned_configs=None, dt="fp16", D=64, causal=False, only=None, **kw):
        v, cx = _attn_args(dt, D, **kw)
        cx["CAUSAL"] = causal
        for name, kind, plain, tuned in attn:
            if only and name not in only:
                continue
            atomic = name == "attn_bwd_dkdv_atomic"
            one_pass = name.startswith("attn_bwd_dkdv_one_pass")
            if (atomic or one_pass) and cx["BLOCK_D"] > atomic_max_block_d:
                continue  # those head dims make dQ by the pass in either mode
            names = set(plain.arg_names)
            vv, cc = _pick(v, names), _pick({**cx, "ATOMIC_DQ": atomic, "ONE_PASS": one_pass}, names)
            if tuned_configs is not None and tuned is not None:
                _add(jobs, name, tuned, arch, case, vv, cc, configs=tuned_configs)
            elif hasattr(ak, "default_config"):
                m, n, w, s = ak.default_config(kind, cx["BLOCK_D"], itemsize[dt])
                _add(jobs, name, plain, arch, case, vv, {**cc, "BLOCK_M": m, "BLOCK_N": n},
                     options=dict(num_warps=w, num_stages=s), label=f"default BLOCK_M={m},BLOCK_N={n},w{w}s{s}")
            else:
                _add(jobs, name, tuned, arch, case, vv, cc, configs="first")

    # sm_90: every autotune config at head dim 128 (the largest tiles of the common head dims,
    # so the most shared memory) and the flag cases through the plain launch. sm_80: the plain
    # launch only, unless FULL -- an over-limit autotune config is skipped by the autotuner,
    # while default_config() promises to fit at every head dim (256 is the maximum), so a plain
    # launch over the limit is the launch failure this check exists for.
    cases = [
        # (case, kwargs, compiled for sm_80 too)
        ("bf16 d64 keypad-bool causal dropout", dict(dt="bf16", mask="key_padding", causal=True, dropout=True), True),
        ("fp16 d80 dense-float", dict(D=80, mask="dense", mask_float=True), FULL),
        ("bf16 d128 varlen gqa4 causal dropout", dict(dt="bf16", D=128, varlen=True, group=4, causal=True, dropout=True),
         FULL),
        ("fp16 d256", dict(D=256), True),
    ]
    # On sm_90 the tuned sweep at head dim 128 already compiles default_config's tiles.
    cases += [("fp16 d128", dict(D=128), True)] if FULL else []
    if FULL:
        cases += [
            ("fp16 d64 keypad-float", dict(mask="key_padding", mask_float=True), True),
            ("bf16 d128 dense-bool causal", dict(dt="bf16", D=128, mask="dense", causal=True), True),
            ("fp32 d64 exact", dict(dt="fp32"), True),
            ("fp32 d256 exact", dict(dt="fp32", D=256), True),
        ]
    for arch in ARCHS:
        if arch == 90 or FULL:
            attn_case(arch, "fp16 d128", tuned_configs="all", D=128)
        for case, kw, on80 in cases:
            if arch == 90 or on80:
                # sm_80 compiles the backward kernels of the flag case only in FULL (time).
                attn_case(arch, case, **kw, only=None if arch == 90 or FULL or "d64" not in case else {"attn_fwd"})
        if arch == 80 and not FULL:
            attn_case(arch, "fp16 d128", D=128)
        # Atomic dQ: every config where the dK/dV pass holds the most, on both targets, and
        # on sm_90 the benchmark's plain case (spill-free but for 64 x 128 tiles, which spill
        # without atomic dQ too).
        attn_case(arch, "bf16 d64 varlen gqa4 causal dropout", tuned_configs="all", dt="bf16", varlen=True, group=4,
                  causal=True, dropout=True, only={"attn_bwd_dkdv_atomic"})
        if arch == 90:
            attn_case(arch, "bf16 d64", tuned_configs="all", dt="bf16", only={"attn_bwd_dkdv_atomic"})
        # The one-kernel backward: every config of both tuners, plain and as BERT trains (key
        # padding, dropout).
        one_pass = {f"attn_bwd_dkdv_one_pass{n}" for n in ak.attn_bwd_dkdv_tuned_one_pass}
        attn_case(arch, "bf16 d64", tuned_configs="all", dt="bf16", only=one_pass)
        attn_case(arch, "bf16 d64 keypad-bool dropout", tuned_configs="all", dt="bf16", mask="key_padding",
                  dropout=True, only=one_pass)
    # --- the Hopper kernels: sm_90 only (triton_compile_hopper.py).
    import triton_compile_hopper

    triton_compile_hopper.add_jobs(jobs, _add, _attn_args, _pick, Desc)

    pre_names = set(ak.attn_bwd_preprocess.arg_names)
    for arch in ARCHS:
        for D, varlen in ((64, False), (80, True), (256, False)):
            v, _ = _attn_args("fp16", D, varlen=varlen)
            _add(jobs, "attn_bwd_preprocess", ak.attn_bwd_preprocess, arch, f"fp16 d{D}" + (" varlen" if varlen else ""),
                 _pick(v, pre_names), dict(HEAD_D=D, BLOCK_D=max(16, triton_next_pow2(D)), VARLEN=varlen, BLOCK_M=64))
        _add(jobs, "dropout_keep_kernel", ak.dropout_keep_kernel, arch, "u8 mask",
             dict(OUT=Ptr("u8"), SEED=Ptr("i64"), LQ=L, LK=L, dropout_p=0.1), dict(BLOCK_M=64, BLOCK_N=64))

    # --- add + LayerNorm, the reductions, Linear + GELU: tests/triton_compile_ops.py.
    import triton_compile_ops

    triton_compile_ops.add_jobs(jobs, sys.modules[__name__])
    return jobs


# ----------------------------------------------------------------------------- compiling

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


KERNEL_MODULES = ("fuseformer.kernels.add_layer_norm_kernels", "fuseformer.kernels.attention_kernels",
                  "fuseformer.kernels.attention_bwd_kernels", "fuseformer.kernels.attention_hopper",
                  "fuseformer.kernels.attention_hopper_bwd",
                  "fuseformer.kernels.linear_gelu_kernels", "fuseformer.kernels.reduce",
                  "fuseformer.kernels.cross_entropy_kernels")
# PTX instructions counted per compile, so tests can require them: Hopper tensor-core MMAs,
# TMA copies (global <-> shared through a tensor map), 16-byte vector global loads/stores,
# and register reallocation between warp-specialized partitions.
PTX_FEATURES = {
    "wgmma": re.compile(r"\bwgmma\.mma_async"),
    "tma": re.compile(r"\bcp\.async\.bulk\.tensor"),
    "ld_v4": re.compile(r"\bld\.global(?:\.[a-z0-9_]+)*\.v4\.(?:b32|f32|u32)"),
    "st_v4": re.compile(r"\bst\.global(?:\.[a-z0-9_]+)*\.v4\.(?:b32|f32|u32)"),
    "setmaxnreg": re.compile(r"\bsetmaxnreg"),
    # A tensor descriptor made in the kernel: written to global scratch, then fenced for the
    # TMA unit (fence.proxy.tensormap) before its first use, in every program.
    "tensormap_fence": re.compile(r"\bfence\.proxy\.tensormap"),
    # fp32 adds to global memory in 16-byte vectors (red on triton 3.9, atom on 3.6; sm_90).
    "add_v4_f32": re.compile(r"\b(?:red|atom)\.global(?:\.[a-z0-9_]+)*\.add\.v4\.f32"),
    # The fast GELU maths' two special-function instructions (inline PTX).
    "rcp_approx_ftz": re.compile(r"\brcp\.approx\.ftz\.f32"),
    "ex2_approx_ftz": re.compile(r"\bex2\.approx\.ftz\.f32"),
    # A software-pipelined loop's prefetch: 16-byte asynchronous copies global -> shared (sm_80+).
    "cp_async_16": re.compile(r"\bcp\.async\.cg\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(?:0x10|16)\b"),
    # A device-side assert (tl.device_assert, compiled in debug mode): a call of CUDA's __assertfail.
    "assertfail": re.compile(r"\bcall(?:\.uni)?\s*(?:\(\s*\)\s*,\s*)?__assertfail"),
}


def coverage(jobs):
    """Entry kernels (@triton.jit functions of the kernel modules that no other @triton.jit
    function there calls) with no job, and autotune configs not compiled for some target."""
    import importlib
    import inspect

    from triton.runtime.jit import JITFunction, KernelInterface

    missing = []
    compiled_fns = {id(j["fn"]) for j in jobs}
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        found = [_unwrap(o)[0] for o in vars(mod).values() if isinstance(o, (JITFunction, KernelInterface))]
        fns = {id(f): f for f in found if f.fn.__module__ == mod_name}
        sources = {i: inspect.getsource(f.fn) for i, f in fns.items()}
        for i, f in fns.items():
            called = any(re.search(rf"\b{f.fn.__name__}\s*\(", src) for j, src in sources.items() if j != i)
            if not called and i not in compiled_fns:
                missing.append(f"{mod_name.rsplit('.', 1)[1]}.{f.fn.__name__}")
    # Every config for sm_90; for sm_80 too in FULL (the default set compiles sm_80's plain
    # launches only, see build_jobs).
    seen = {(j["kernel"], a): (j["n_configs"], set()) for j in jobs if j["n_configs"] is not None
            for a in (ARCHS if FULL else (90,))}
    for j in jobs:
        if (j["kernel"], j["arch"]) in seen:
            seen[(j["kernel"], j["arch"])][1].add(j["config_index"])
    configs = [f"{k} sm_{a}: {sorted(set(range(n)) - got)}" for (k, a), (n, got) in sorted(seen.items())
               if set(range(n)) - got]
    return {"entry_kernels_not_compiled": sorted(missing), "configs_not_compiled": configs}


def _compile_job(index):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    job = _JOBS[index]
    out = {k: job[k] for k in ("kernel", "arch", "case", "config", "autotuned")}
    out["constexprs"] = {k: v for k, v in job["constexprs"].items()}
    out.update(ok=False, error=None, n_regs=None, spill_bytes=None, shared=None, ptx=None)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        signature, consts, attrs = specialize(job["fn"], job["values"], job["constexprs"])
        out["constexprs"] = consts
        src = ASTSource(fn=job["fn"], signature=signature, constexprs=consts, attrs=attrs)
        # ptxas's -v report goes through print() when TRITON_DUMP_PTXAS_LOG is on.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        out["shared"] = int(compiled.metadata.shared)
        ptx = compiled.asm.get("ptx", "")
        out["ptx"] = {name: len(rx.findall(ptx)) for name, rx in PTX_FEATURES.items()}
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - every failure is a result to report
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        out["error"] = f"{type(e).__name__}: " + "\n".join(lines[:40])
        if not lines:
            out["error"] += "\n" + traceback.format_exc(limit=3)
    text = log.getvalue()
    regs = _REGS.findall(text)
    spills = _SPILLS.findall(text)
    if regs:
        out["n_regs"] = int(regs[-1])
    if spills:
        out["spill_bytes"] = int(spills[-1][0]) + int(spills[-1][1])
    if not out["ok"] and "ptxas" in text and "error" in text.lower():
        out["error"] += "\n" + text[-2000:]
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def judge_shared_memory(results):
    """Mark each result smem_over (more than the target's per-block limit) and
    smem_launch_failure: a plain launch over the limit fails on the GPU; an autotuned config
    over it is skipped by the autotuner (OutOfResources), which fails only when no config of
    the same kernel, target and case fits."""
    fits = {}
    for r in results:
        r["smem_limit"] = SMEM_LIMIT[r["arch"]]
        r["smem_over"] = bool(r["ok"] and r["shared"] > r["smem_limit"])
        if r["autotuned"] and r["ok"]:
            key = (r["kernel"], r["arch"], r["case"])
            fits[key] = fits.get(key, False) or not r["smem_over"]
    for r in results:
        key = (r["kernel"], r["arch"], r["case"])
        r["smem_launch_failure"] = r["smem_over"] and (not r["autotuned"] or not fits.get(key, False))


def _probe():
    """None when this triton can compile a trivial kernel for every target, else why not.

    It tells an API or toolchain mismatch (skip) apart from a broken fuseformer kernel (fail).
    """
    try:
        import triton
        import triton.language as tl
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:  # noqa: BLE001
        return f"triton's compiler API is not importable here ({type(e).__name__}: {e})"
    if "nvidia" not in backends:
        return f"triton has no NVIDIA backend (backends: {sorted(backends)})"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001
        return f"no usable ptxas ({type(e).__name__}: {e})"
    if not ptxas or not os.path.exists(ptxas):
        return f"ptxas not found ({ptxas})"

    @triton.jit
    def _probe_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 2, mask=offs < n)

    for arch in ARCHS:
        try:
            src = ASTSource(fn=_probe_kernel, signature={"X": "*fp16", "Y": "*fp16", "n": "i32", "BLOCK": "constexpr"},
                            constexprs={"BLOCK": 128}, attrs={(0,): DIV16, (1,): DIV16})
            with contextlib.redirect_stdout(io.StringIO()):
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
            compiled.metadata.shared  # noqa: B018 - the metadata field the checks rely on
        except Exception as e:  # noqa: BLE001
            first = (str(e).splitlines() or [""])[0]
            return (f"triton {triton.__version__} cannot AOT-compile a trivial kernel for sm_{arch} with "
                    f"ASTSource(fn, signature, constexprs, attrs) + GPUTarget (API or toolchain mismatch): "
                    f"{type(e).__name__}: {first}")
    return None


def main(argv=None):
    global _JOBS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", help="compile only jobs whose 'kernel case config' contains this")
    ap.add_argument("--list", action="store_true", help="list the jobs and exit")
    args = ap.parse_args(argv)

    def finish(payload, status):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=1)
        return status

    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y"):  # as Triton reads it
        print("TRITON_INTERPRET is set: the kernels would get the interpreter's configs", file=sys.stderr)
        return finish({"skip": "TRITON_INTERPRET is set in the compile subprocess"}, SKIP_EXIT)
    # A private cache: every run really compiles (and prints ptxas's report), and thousands
    # of throwaway kernels do not land in the user's ~/.triton/cache.
    cache = tempfile.TemporaryDirectory(prefix="ff-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    # Triton 3.9 warns on every process that the fp-fusion default will change; keep it on,
    # as the kernels are launched today.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    t0 = time.perf_counter()
    reason = _probe()
    if reason:
        print(f"SKIP: {reason}")
        return finish({"skip": reason}, SKIP_EXIT)
    try:
        _JOBS = build_jobs()
    except Exception as e:  # noqa: BLE001
        err = f"could not build the job list: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        print(err)
        return finish({"error": err}, 1)
    cov = coverage(_JOBS)
    if args.only:
        _JOBS = [j for j in _JOBS if args.only in f"{j['kernel']} sm_{j['arch']} {j['case']} {j['config']}"]
    if args.list:
        for j in _JOBS:
            print(f"{j['kernel']:20s} sm_{j['arch']} {j['case']:34s} {j['config']}")
        print(len(_JOBS), "jobs")
        return 0

    # Slowest first (attention backward, big tiles) so the pool does not end on a long tail.
    weight = {"attn_bwd_dkdv": 4, "attn_bwd_dq": 3, "attn_fwd": 3, "attn_fwd_hopper": 3, "attn_bwd_dkdv_hopper": 4,
              "attn_bwd_dq_hopper": 3, "linear_gelu_fwd": 2, "linear_gelu_tma": 3}
    order = sorted(range(len(_JOBS)), key=lambda i: -weight.get(_JOBS[i]["kernel"], 1))
    if args.workers > 1:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(args.workers) as pool:
            results = pool.map(_compile_job, order, chunksize=1)
    else:
        results = [_compile_job(i) for i in order]
    results.sort(key=lambda r: (r["kernel"], -r["arch"], r["case"], r["config"]))
    wall = time.perf_counter() - t0

    judge_shared_memory(results)
    bad = 0
    for r in results:
        over = r["smem_launch_failure"]
        bad += (not r["ok"]) or over
        status = "FAIL" if not r["ok"] else ("SMEM!" if over else ("skip" if r["smem_over"] else "ok"))
        print(f"{status:5s} {r['kernel']:18s} sm_{r['arch']} {r['case']:32s} {r['config']:34s} "
              f"regs={r['n_regs']} spill={r['spill_bytes']}B smem={r['shared']}B {r['seconds']}s")
        if r["error"]:
            print("      " + r["error"].replace("\n", "\n      "))
    uncovered = cov["entry_kernels_not_compiled"] + cov["configs_not_compiled"]
    if uncovered and not args.only:
        print(f"NOT COVERED: {uncovered}")
        bad += len(uncovered)
    print(f"{len(results)} compiles, {bad} failing, {wall:.1f}s wall, {args.workers} workers")
    cache.cleanup()
    return finish({"results": results, "coverage": cov, "wall_s": wall, "workers": args.workers}, 1 if bad else 0)


if __name__ == "__main__":
    sys.exit(main())
