"""Launchers of the Triton attention kernels, registered as the "triton" Impl of attention and
varlen_attention (attention.py: the autograd Function, the custom ops and the public function
over them; kernels in attention_kernels.py, attention_bwd_kernels.py, attention_hopper*.py).

    forward(q, k, v, mask, is_causal, scale, dropout_p, seed) -> (out, lse)
    backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, grads=None) -> (dq, dk, dv)

attention.py's docstring has the tensors' contract. Here: which kernels a call takes (the
variants and the rules the GPU runs set), their launch arguments, and the launch plans that
make a repeated call cheap; dropout_keep_mask rebuilds the kernels' dropout mask.
"""
import os
from typing import List, Optional

import torch

from .attention_bwd_kernels import (
    attn_bwd_dkdv,
    attn_bwd_dkdv_tuned,
    attn_bwd_dkdv_tuned_atomic,
    attn_bwd_dkdv_tuned_one_pass,
    attn_bwd_dq,
    attn_bwd_dq_tuned,
    attn_bwd_preprocess,
)
from .attention_kernels import (
    LOG2E,
    MASK_DENSE,
    MASK_KEY_PADDING,
    MASK_NONE,
    ONE_PASS_BLOCKS,
    attn_fwd,
    attn_fwd_tuned,
    default_config,
    dropout_keep_kernel,
)
from . import attention_hopper as _hopper
from . import attention_hopper_bwd as _hopper_bwd
from ._util import cdiv, device_guard, launch_tuned, new_output, new_output_like, next_pow2
from .launch import launch, plan_table
from . import backends
from .backends import Impl, interpreting, register_impl

Tensor = torch.Tensor
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# FUSEFORMER_AUTOTUNE=0 launches every kernel with default_config() instead of timing the
# configs (GPU CI, where tuning every case would spend the run compiling). Read at import;
# `set_autotune` changes it.
AUTOTUNE = os.environ.get("FUSEFORMER_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_autotune(enabled: bool) -> None:
    global AUTOTUNE
    AUTOTUNE = bool(enabled)


# Variants (VARIANT: each read at import from its environment variable, changed with
# set_variant(kernel=, dq=, descriptors=) or the `variant` context; all run the same maths and
# pass the same parity tests). The first of each is the default.
# kernel (FUSEFORMER_ATTENTION_KERNEL): the triton backend's kernels on a Hopper GPU:
#     "auto": the Hopper forward (with its default descriptors, host ones) where the GPU runs
#     measured it faster than the portable one, eagerly, and the portable one elsewhere.
#     H200, 2026-11-27 (bench/results/h200/2026-11-27-5e53e2b/, bf16, eager ms, Hopper with
#     host descriptors against portable): keys >= 4096 (d64 0.615 against 0.690, causal 0.358
#     against 0.408, d128 0.495 against 0.589, L16384 2.353 against 2.625); head dim 128 from
#     1024 keys without causal (0.156 against 0.186) and from 2048 with it (GQA 32/8: 0.312
#     against 0.387). Head dim 64 from 1024 keys, causal or not, by the evening's run
#     (bench/results/h200/2026-11-27-a3eeca9/, where the fast launch's plans took host descriptors):
#     0.179 against 0.191 at 1024 keys, 0.320 against 0.346 at 2048, causal 0.122 against
#     0.132 and 0.198 against 0.221 (the morning's run, through Triton's own launch path for
#     host descriptors, had the causal ones the other way round, 0.333 against 0.220 at 2048).
#     Not: 512 keys (0.122 against 0.113; 0.104 against 0.109 in a CUDA graph: host time
#     decides), the BERT key-padding case (0.121 against 0.091). Every measured case had as
#     many queries as keys, so the rules read the shorter of the two (a decoding step's one
#     query over a long cache stays portable). The H100 run of 2026-11-26
#     had set the first rule (keys >= 4096; head dim 128 without causal from 1024 keys) with
#     device descriptors. The backward: the Hopper one (host descriptors) for head dim 64 without
#     causal from 2048 keys, the portable one elsewhere. Forward+backward at d64 L2048 on the
#     H200, eager ms, the Hopper backward against the portable one after the same forward:
#     1.347 against 1.536 (the run of a3eeca9, 2026-11-27 evening; 1.354 against 1.573 in the
#     morning's); causal 1.057 against 0.951 (eagerly slower; in a CUDA graph 0.807 against
#     0.949). Not measured: head dim 128, causal beyond 2048 keys.
#     "portable": attention_kernels.py, every GPU.
#     "hopper": attention_hopper*.py (TMA, wgmma), forward and backward; used only on
#     capability (9, 0), for the cases _hopper_reason accepts.
# dq (FUSEFORMER_ATTENTION_DQ): how the backward makes dQ:
#     "pass": a second kernel over the key tiles per query block.
#     "atomic" (FlashAttention-3's way): inside the dK/dV pass, each key block adds its dS K
#     into an fp32 dQ accumulator in global memory (fp32 reductions in L2, in no fixed order,
#     so the low bits of dQ can differ run to run), then one cast to dQ's dtype. It saves the
#     dQ pass's recomputation of S and dP: five tile MMAs per (query, key) tile pair instead of
#     seven, for 4 bytes per dQ element zeroed, reduced and read back. Both kernel sets have
#     it, up to a head dim where the extra fp32 tile still fits the registers
#     (_ATOMIC_MAX_BLOCK_D); wider heads make dQ by the pass in either mode. Opt-in until a GPU
#     run measures it (`fuseformer bench` times fuseformer-triton-atomic-dq and
#     -hopper-atomic-dq).
#     "fused": where every key fits one key block of the portable dK/dV pass (at most
#     ONE_PASS_BLOCKS[-1] = 128 keys: BERT's L128, short sequences) and up to the same head dim
#     as "atomic", that pass is the whole backward: each program holds all the keys, so dS K of
#     a query tile is its whole dQ, stored once (no atomics, deterministic), and delta =
#     rowsum(dO * O) comes from the O and dO tiles it loads. One launch instead of two (the dQ
#     pass, then dK/dV); the dQ pass's recomputation of S and dP and its second read of Q, K,
#     V, dO and lse are gone, for 384 programs where the two passes had 768 + 384 at BERT's
#     B32 H12 L128 (the dQ pass one per query block, dK/dV one per (batch, head) and key
#     block). Elsewhere (longer keys, wider heads, the Hopper kernels) as "pass". Written
#     without a GPU: opt-in until a GPU run measures it (fuseformer-triton-fused-dq).
#     In "pass" the dQ pass (portable or Hopper) runs first and makes delta as it goes (its
#     programs load their rows' dO anyway; delta is stored for the dK/dV pass): no preprocess
#     kernel. "atomic" (no dQ pass) keeps the preprocess.
# descriptors (FUSEFORMER_HOPPER_DESCRIPTORS): where the Hopper kernels make their TMA
#     descriptors, "auto" (on the host, as "host"; packed varlen sequences on the device),
#     "device" or "host" (attention_hopper.DESCRIPTOR_PLACES says why).
VARIANTS = {"kernel": ("auto", "portable", "hopper"), "dq": ("pass", "atomic", "fused"),
            "descriptors": _hopper.DESCRIPTOR_PLACES}
# Read once from the environment; the launchers read this dict per call.
VARIANT = backends.Variants("attention", VARIANTS, {"kernel": "FUSEFORMER_ATTENTION_KERNEL",
                                                    "dq": "FUSEFORMER_ATTENTION_DQ",
                                                    "descriptors": "FUSEFORMER_HOPPER_DESCRIPTORS"})
# Choose the kernels: kernel=, dq=, descriptors=; returns the previous settings. `variant(...)`
# does the same inside a block.
set_variant = VARIANT.set
variant = VARIANT.using
_ATOMIC_MAX_BLOCK_D = {"portable": 64, "hopper": _hopper_bwd.MAX_ATOMIC_BLOCK_D}


def atomic_dq(kernels: str, block_d: int) -> bool:
    """Does the dK/dV pass of `kernels` ("portable" or "hopper") make dQ at this BLOCK_D?"""
    return VARIANT["dq"] == "atomic" and block_d <= _ATOMIC_MAX_BLOCK_D[kernels]


def one_pass_keys(lk: int, block_d: int) -> int:
    """The key block of the portable backward's one-kernel form (VARIANT dq "fused") for lk
    keys, the smallest of ONE_PASS_BLOCKS that holds them all; 0 where it does not apply (not
    "fused", lk out of range, or heads wider than the atomic dQ's)."""
    if VARIANT["dq"] != "fused" or lk < 1 or block_d > _ATOMIC_MAX_BLOCK_D["portable"]:
        return 0
    return next((n for n in ONE_PASS_BLOCKS if lk <= n), 0)


def _dq_accumulator(q, atomic: bool, placeholder, varlen: bool):
    """(accumulator, the kernel's DQ_ACC argument, its (batch, head) strides as _strides gives
    them): for atomic dQ the zeroed fp32 accumulator in q's (B, H, L, D) shape, contiguous (row
    stride HEAD_D); otherwise None and `placeholder`, an fp32 tensor the kernel never reads."""
    if not atomic:
        return None, placeholder, (0, 0)
    acc = torch.zeros(size=q.shape, dtype=torch.float32, device=q.device)
    return acc, acc, _strides(acc, varlen)[:2]


def _check_kernel_scale(scale: float) -> None:
    """The launchers' side of attention._positive_scale's contract."""
    if not scale > 0.0:
        raise ValueError(f"the attention kernels take scale > 0, got {scale} (see attention._positive_scale)")


def _hopper_forward_measured_faster(head_dim: int, lk: int, is_causal: bool) -> bool:
    """Where kernel="auto" takes the Hopper forward (see VARIANTS); lk: the shorter of the
    query and key lengths."""
    if lk >= 4096:
        return True
    if head_dim == 128:
        return lk >= (2048 if is_causal else 1024)
    return head_dim == 64 and lk >= 1024


def _hopper_backward_measured_faster(head_dim: int, lk: int, is_causal: bool) -> bool:
    """Where kernel="auto" takes the Hopper backward (see VARIANTS); lk as for the forward."""
    return head_dim == 64 and not is_causal and lk >= 2048


def _hopper_chosen(measured_faster, head_dim: int, lq: int, lk: int, is_causal: bool) -> bool:
    """Does this pass take the Hopper kernels: always under kernel="hopper", under "auto" where
    `measured_faster` (one of the two rules above) says so. The rules read the shorter of the
    query and key lengths: every measured case had as many of each, and a decoding step (one
    query over a long cache) is not one of them."""
    kernel = VARIANT["kernel"]
    return kernel == "hopper" or (kernel == "auto" and measured_faster(head_dim, min(lq, lk), is_causal))


def _host_descriptors(varlen: bool) -> bool:
    """Do the Hopper kernels take host descriptors (attention_hopper.DESCRIPTOR_PLACES)? Never
    for packed varlen sequences."""
    return not varlen and VARIANT["descriptors"] != "device"




# ----------------------------------------------------------------------------- launchers


def _mask_strides(mask) -> tuple:
    # Size-1 dims are read at index 0 whatever their stride, so give them stride 0.
    size, stride = mask.shape, mask.stride()
    return tuple(0 if size[i] == 1 else stride[i] for i in range(4))


def mask_kind(mask: Optional[Tensor]) -> str:
    """"none", "key_padding" (one key row per batch: heads and query rows broadcast) or "dense"."""
    if mask is None:
        return "none"
    strides = _mask_strides(mask)
    return "key_padding" if strides[1] == 0 and strides[2] == 0 else "dense"


def _mask_tensor(mask, dummy):
    """The mask as the kernels take it (a bool one read as uint8), or `dummy` without one."""
    if mask is None:
        return dummy
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _mask_args(mask, dummy):
    if mask is None:
        return dummy, (0, 0, 0, 0), MASK_NONE, False
    strides = _mask_strides(mask)
    kind = MASK_KEY_PADDING if strides[1] == 0 and strides[2] == 0 else MASK_DENSE
    return _mask_tensor(mask, dummy), strides, kind, mask.dtype != torch.bool


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


_flag_cache: dict = {}


def _flags(q):
    """The head-dim and dtype constexprs of a launch, computed once per (dtype, head dim)."""
    key = (q.dtype, q.shape[-1])
    flags = _flag_cache.get(key)
    if flags is None:
        flags = _flag_cache[key] = dict(
            UPCAST=interpreting() and q.dtype == torch.bfloat16,
            EXACT_FP32=q.dtype == torch.float32,
            HEAD_D=q.shape[-1],
            BLOCK_D=max(16, next_pow2(q.shape[-1])),
        )
    return flags


def _bucket(lq, lk, bh):
    """The TUNE_BUCKET autotune key: the power-of-two length bucket times 1024 plus the
    power-of-two batch*heads bucket (capped at 512). The second part tells a B32 H12 batch
    from a B1 H1 one of the same length: the first wants 128-row tiles, the second wants the
    smaller tiles that give a 132-SM GPU enough programs. Powers of two keep the number of
    keys (and tuning runs) small when varlen batches change their sequence count."""
    return next_pow2(max(lq, lk, 1)) * 1024 + min(next_pow2(bh), 512)


def _run(kind, tuned, plain, grid, bucket, q, *args, **kwargs):
    """Launch the autotuned kernel (tuned once per key, then the winner launched directly),
    or with autotuning off / the interpreter, the plain kernel with a default config that
    fits shared memory. `bucket` is the TUNE_BUCKET argument among `args`."""
    if interpreting() or not AUTOTUNE:
        m, n, w, s = default_config(kind, kwargs["BLOCK_D"], q.element_size())
        launch(plain, grid, q, *args, **kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    else:
        # Everything the autotuner keys on: its key arguments and the tensors' dtypes (the
        # mask's and the dummies' follow from MASK_FLOAT, DROPOUT and VARLEN).
        key = (q.dtype, kwargs["HEAD_D"], bucket, kwargs["CAUSAL"], kwargs["MASK_KIND"], kwargs["MASK_FLOAT"],
               kwargs["DROPOUT"], kwargs["VARLEN"])
        launch_tuned(tuned, plain, key, grid, q, *args, **kwargs)


def _strides(t, varlen):
    """(batch, head, row) strides of a (B, H, L, D) view. With VARLEN the grid's batch index
    is the sequence index and rows are offset by cu_seqlens instead: batch stride 0."""
    s = t.stride()
    return (0 if varlen else s[0]), s[1], s[2]


def _launch_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, nbatch, lq, lk, cu_q=None, cu_k=None):
    """All tensors 4-D (B, H, L, D) views (lse 3-D); with cu_q the batch dim has size 1."""
    _check_kernel_scale(scale)
    hopper = _hopper_chosen(_hopper_forward_measured_faster, q.shape[-1], lq, lk, is_causal)
    if hopper and _hopper_reason(q, k, v, out, mask, dropout_p) is None:
        return _launch_fwd_hopper(q, k, v, out, lse, mask, is_causal, scale, nbatch, lq, lk, cu_q, cu_k)
    varlen = cu_q is not None
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    m, ms, kind, is_float = _mask_args(mask, q)
    dropout = dropout_p > 0.0
    bucket = _bucket(lq, lk, nbatch * H)
    lse_s = lse.stride()
    # A flat 1-D grid (the kernels split it back with _flat_pid): CUDA caps grid axes 1 and
    # 2 at 65535, too few for B * H programs of a big batch or of many packed sequences.
    grid = lambda meta: (cdiv(lq, meta["BLOCK_M"]) * nbatch * H,)  # noqa: E731
    _run(
        "fwd", attn_fwd_tuned, attn_fwd, grid, bucket,
        q, k, v, out, lse, m, seed if dropout else q, cu_q if varlen else lse, cu_k if varlen else lse,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        0 if varlen else lse_s[0], lse_s[1],
        *ms,
        H, group, lq, lk, bucket, scale * LOG2E, float(dropout_p),
        CAUSAL=bool(is_causal), MASK_KIND=kind, MASK_FLOAT=is_float, DROPOUT=dropout, VARLEN=varlen,
        **_flags(q),
    )


def _hopper_reason(q, k, v, out, mask, dropout_p, *more) -> Optional[str]:
    """Why the Hopper kernels cannot run this call (the portable ones do), or None. `out` and
    `more`: the other tensors they address through descriptors (dout, dq, dk, dv)."""
    return _hopper.unsupported_reason(q, k, v, out, mask_kind(mask), dropout_p, *more)


def hopper_reason(q, k, v, mask=None, dropout_p=0.0) -> Optional[str]:
    """_hopper_reason for (B, H, L, D) inputs as a caller passes them (the benchmark refuses
    the Hopper kernel with this reason instead of timing the portable one under its name)."""
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return _hopper_reason(_unit_last(q), _unit_last(k), _unit_last(v), _out_like(q), mask, dropout_p)


def _launch_fwd_hopper(q, k, v, out, lse, mask, is_causal, scale, nbatch, lq, lk, cu_q, cu_k):
    varlen = cu_q is not None
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    m, ms, kind, is_float = _mask_args(mask, q)
    flags = _flags(q)
    bucket = _bucket(lq, lk, nbatch * H)
    lse_s = lse.stride()
    descs = None
    if _host_descriptors(varlen):
        descs = _hopper.host_descriptors((q, k, v, out), flags["BLOCK_D"])
    args = (
        *(descs or (q, k, v, out)), lse, m, cu_q if varlen else lse, cu_k if varlen else lse,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        0 if varlen else lse_s[0], lse_s[1], ms[0], ms[3],
        H, group, lq, lk, bucket, scale * LOG2E,
    )
    kwargs = dict(HEAD_D=flags["HEAD_D"], BLOCK_D=flags["BLOCK_D"], CAUSAL=bool(is_causal), MASK_KIND=kind,
                  MASK_FLOAT=is_float, VARLEN=varlen, UPCAST=flags["UPCAST"], HOST_DESC=descs is not None)
    key = (q.dtype, flags["HEAD_D"], bucket, bool(is_causal), kind, is_float, varlen, descs is not None)
    _hopper.launch(lambda meta: (cdiv(lq, meta["BLOCK_M"]) * nbatch * H,), args, kwargs, key,
                   AUTOTUNE and not interpreting())


def _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, mask, is_causal, scale, dropout_p, seed, nbatch, lq, lk,
                cu_q=None, cu_k=None, plan=None):
    """`plan`: the call's key in _bwd_plans (_backward's), or None. Each launch is planned
    under (plan, its site)."""
    _check_kernel_scale(scale)
    varlen = cu_q is not None
    H, Hk = q.shape[1], k.shape[1]
    flags = _flags(q)
    cu_q_arg, cu_k_arg = (cu_q, cu_k) if varlen else (lse, lse)
    lse_s = (0 if varlen else lse.stride(0)), lse.stride(1)
    hopper = (_hopper_chosen(_hopper_backward_measured_faster, q.shape[-1], lq, lk, is_causal)
              and flags["BLOCK_D"] <= _hopper_bwd.MAX_BLOCK_D
              and _hopper_reason(q, k, v, dout, mask, dropout_p, dq, dk, dv) is None)
    one_pass = 0 if hopper else one_pass_keys(lk, flags["BLOCK_D"])
    atomic = atomic_dq("hopper", flags["BLOCK_D"]) if hopper else (
        not one_pass and atomic_dq("portable", flags["BLOCK_D"]))
    # delta = rowsum(dO * O), by whoever reads dO first: the dQ pass (portable or Hopper), which
    # runs before its dK/dV pass and stores it for it; the preprocess kernel before an atomic
    # dK/dV pass (no dQ pass); the one-kernel backward inline (lse stands in, never read).
    delta = lse if one_pass else new_output_like(lse)
    if atomic:
        # Each site's full launch is a function: with a plan, its ~40 arguments are never built.
        _bwd_plans.launch(plan and (plan, "preprocess"),
                          ((attn_bwd_preprocess, (out, dout, delta, cu_q_arg, cu_k_arg)),), lambda: launch(
                              attn_bwd_preprocess, (cdiv(lq, 64) * nbatch * H,),
                              out, dout, delta, cu_q_arg, cu_k_arg,
                              *_strides(out, varlen), *_strides(dout, varlen), *lse_s,
                              H, lq,
                              HEAD_D=flags["HEAD_D"], BLOCK_D=flags["BLOCK_D"], VARLEN=varlen, BLOCK_M=64,
                          ))
    if hopper:
        _launch_bwd_hopper(dout, q, k, v, out, lse, delta, dq, dk, dv, mask, is_causal, scale, nbatch, lq, lk,
                           cu_q_arg, cu_k_arg, lse_s, flags, varlen, atomic, plan)
        return
    seed_arg = seed if dropout_p > 0.0 else q
    dq_acc, acc_arg, acc_s = _dq_accumulator(q, atomic, lse, varlen)
    m = _mask_tensor(mask, q)

    derived = []

    def shared():  # what both passes' full launches derive from the call, derived once
        if not derived:
            _, ms, kind, is_float = _mask_args(mask, q)
            bucket = _bucket(lq, lk, nbatch * H)
            common = dict(CAUSAL=bool(is_causal), MASK_KIND=kind, MASK_FLOAT=is_float, DROPOUT=dropout_p > 0.0,
                          VARLEN=varlen, **flags)
            tail = (*ms, H, H // Hk, lq, lk, bucket, scale * LOG2E, scale, float(dropout_p))
            qkv_strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
            derived.append((bucket, common, tail, qkv_strides))
        return derived[0]

    def dkdv():
        bucket, common, tail, qkv_strides = shared()
        tuned = (attn_bwd_dkdv_tuned_one_pass[one_pass] if one_pass else attn_bwd_dkdv_tuned_atomic if atomic
                 else attn_bwd_dkdv_tuned)
        # One pass: every config of its tuner (and its untuned one) holds one_pass >= lk keys,
        # so the grid has one key block per (batch, kv head).
        _run(
            one_pass or "bwd", tuned, attn_bwd_dkdv,
            lambda meta: (cdiv(lk, meta["BLOCK_N"]) * nbatch * Hk,), bucket,
            q, k, v, dout, dk, dv, lse, delta, m, seed_arg, cu_q_arg, cu_k_arg, acc_arg, out, dq,
            *qkv_strides, *_strides(dk, varlen), *_strides(dv, varlen), *lse_s, *acc_s,
            *_strides(out, varlen), *_strides(dq, varlen),
            *tail, **common, ATOMIC_DQ=atomic, ONE_PASS=bool(one_pass),
        )

    def dq_pass():
        bucket, common, tail, qkv_strides = shared()
        _run(
            "bwd", attn_bwd_dq_tuned, attn_bwd_dq, lambda meta: (cdiv(lq, meta["BLOCK_M"]) * nbatch * H,), bucket,
            q, k, v, dout, dq, lse, delta, out, m, seed_arg, cu_q_arg, cu_k_arg,
            *qkv_strides, *_strides(dq, varlen), *_strides(out, varlen), *lse_s,
            *tail, **common,
        )

    if not (one_pass or atomic):  # the dQ pass first: it makes delta for the dK/dV pass
        _bwd_plans.launch(plan and (plan, "dq"),
                          ((attn_bwd_dq, (q, k, v, dout, dq, lse, delta, out, m, seed_arg, cu_q_arg, cu_k_arg)),),
                          dq_pass)
    _bwd_plans.launch(plan and (plan, "dkdv"),
                      ((attn_bwd_dkdv, (q, k, v, dout, dk, dv, lse, delta, m, seed_arg, cu_q_arg, cu_k_arg, acc_arg,
                                        out, dq)),),
                      dkdv)
    if atomic:
        dq.copy_(dq_acc)


def _launch_bwd_hopper(dout, q, k, v, out, lse, delta, dq, dk, dv, mask, is_causal, scale, nbatch, lq, lk,
                       cu_q_arg, cu_k_arg, lse_s, flags, varlen, atomic, plan):
    """The Hopper backward: its dQ pass, which makes `delta` for the dK/dV pass after it; or
    with `atomic` the dK/dV pass alone, which makes dQ by atomics (_launch_bwd has run the
    preprocess into `delta`). Each a site of _bwd_plans as the portable passes are. With host
    descriptors a plan makes new ones over each call's tensors (launch.DescriptorBound);
    without a plan they are made here, once for both passes."""
    H, Hk = q.shape[1], k.shape[1]
    dq_acc, acc_arg, acc_s = _dq_accumulator(q, atomic, lse, varlen)
    m = _mask_tensor(mask, q)
    autotune = AUTOTUNE and not interpreting()
    derived = []

    def shared():  # what both passes' full launches derive from the call (host descriptors among it), once
        if not derived:
            _, ms, kind, is_float = _mask_args(mask, q)
            bucket = _bucket(lq, lk, nbatch * H)
            descs = None
            if _host_descriptors(varlen):
                descs = _hopper.host_descriptors((q, k, v, dout, dk, dv) if atomic else (q, k, v, dout, dk, dv, dq),
                                                 flags["BLOCK_D"])
            # The tensors as the kernels take them: host descriptors, or the tensors themselves.
            tensors = descs[:6] if descs else (q, k, v, dout, dk, dv)
            dq_ = descs[6] if descs and not atomic else dq
            strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(dout, varlen))
            tail = (ms[0], ms[3], H, H // Hk, lq, lk, bucket, scale * LOG2E, scale)
            kwargs = dict(HEAD_D=flags["HEAD_D"], BLOCK_D=flags["BLOCK_D"], CAUSAL=bool(is_causal), MASK_KIND=kind,
                          MASK_FLOAT=is_float, VARLEN=varlen, UPCAST=flags["UPCAST"], HOST_DESC=descs is not None,
                          ATOMIC_DQ=atomic)
            key = (q.dtype, flags["HEAD_D"], bucket, bool(is_causal), kind, is_float, varlen, descs is not None,
                   atomic)
            derived.append((tensors, dq_, strides, tail, kwargs, key))
        return derived[0]

    def dkdv():
        tensors, _, strides, tail, kwargs, key = shared()
        _hopper_bwd.launch("dkdv", lambda meta: (cdiv(lk, meta["BLOCK_N"]) * nbatch * Hk,),
                           (*tensors, lse, delta, m, cu_q_arg, cu_k_arg, acc_arg, *strides, *_strides(dk, varlen),
                            *_strides(dv, varlen), *lse_s, *acc_s, *tail), kwargs, key, autotune)

    def dq_pass():
        tensors, dq_, strides, tail, kwargs, key = shared()
        _hopper_bwd.launch("dq", lambda meta: (cdiv(lq, meta["BLOCK_M"]) * nbatch * H,),
                           (*tensors[:4], dq_, lse, delta, m, cu_q_arg, cu_k_arg, out, *strides,
                            *_strides(dq, varlen), *_strides(out, varlen), *lse_s, *tail), kwargs, key, autotune)

    if not atomic:  # the dQ pass first: it makes delta for the dK/dV pass
        _bwd_plans.launch(plan and (plan, "hopper_dq"),
                          ((_hopper_bwd.attn_bwd_dq_hopper, (q, k, v, dout, dq, lse, delta, m, cu_q_arg, cu_k_arg,
                                                             out)),), dq_pass)
    _bwd_plans.launch(plan and (plan, "hopper_dkdv"),
                      ((_hopper_bwd.attn_bwd_dkdv_hopper, (q, k, v, dout, dk, dv, lse, delta, m, cu_q_arg, cu_k_arg,
                                                           acc_arg)),), dkdv)
    if atomic:
        dq.copy_(dq_acc)


def _out_like(q):
    B, H, L, D = q.shape
    return new_output((B, L, H, D), q.dtype, q.device).transpose(1, 2)


# Forward launch plans (kernels/launch.py's Bound): per signature of everything the launch's
# ~35 trailing arguments derive from (shapes, strides, dtypes, the mask's layout, flags, the
# kernel switches), the kernel, grid and those arguments as the fast launch last made them;
# a repeated call then only allocates its outputs and re-launches with its tensors. On this
# project's CPU through Triton's launch code (stand-in driver, B2 H2 L16 D16, key-padding
# mask, fast launch on): this launcher 31-33 -> 16-17 µs a call, the public call 59-64 ->
# 33-35 µs (torch's SDPA: 16). Not under the interpreter (no fast launch there).
_fwd_plans = plan_table()
# The backward's launches, one plan per site ((key, "preprocess" / "dkdv" / "dq")), keyed as
# the forward's plans on everything their arguments derive from (_plan_key).
_bwd_plans = plan_table()


def _plan_key(q, k, v, mask, is_causal, scale, dropout_p, packed):
    """What a launch's trailing arguments and grid derive from, shared by the forward's and the
    backward's plans: the inputs' layouts, the mask's, the flags, the kernel switches; `packed`
    (cu_seqlens_q's and _k's lengths, the max lengths) for varlen, whose grids and bounds
    follow them, else None."""
    return (q.dtype, q.device, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
            None if mask is None else (mask.dtype, mask.shape, mask.stride()), is_causal, scale, dropout_p,
            VARIANT["kernel"], VARIANT["dq"], VARIANT["descriptors"], AUTOTUNE, packed)


def _bwd_plan(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, packed):
    """_launch_bwd's `plan` (None with plans off): _plan_key, and the layouts of dout, out and
    lse, from which dq/dk/dv and the backward's buffers take theirs."""
    if not _bwd_plans.active():
        return None
    return _plan_key(q, k, v, mask, is_causal, scale, dropout_p, packed), dout.stride(), out.stride(), lse.stride()


def _planned_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, nbatch, lq, lk, cu_q, cu_k, packed):
    """_launch_fwd through _fwd_plans (q, k, v, out: the (B, H, L, D) views it takes)."""
    key = candidates = None
    if _fwd_plans.active():
        key = _plan_key(q, k, v, mask, is_causal, scale, dropout_p, packed)
        # The kernels the launch may take, each with its leading tensors as _launch_fwd and
        # _launch_fwd_hopper pass them.
        m = _mask_tensor(mask, q)
        cu = (lse, lse) if cu_q is None else (cu_q, cu_k)
        candidates = ((attn_fwd, (q, k, v, out, lse, m, seed if dropout_p > 0.0 else q, *cu)),
                      (_hopper.attn_fwd_hopper, (q, k, v, out, lse, m, *cu)))
    _fwd_plans.launch(key, candidates, lambda: _launch_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed,
                                                           nbatch, lq, lk, cu_q, cu_k))


def _forward(q, k, v, mask, is_causal, scale, dropout_p, seed):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, _ = q.shape
    out = _out_like(q)
    lse = new_output((B, H, Lq), torch.float32, q.device)
    _planned_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, B, Lq, k.shape[2], None, None, None)
    return out, lse


def _backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, grads=None):
    """grads: (dq, dk, dv) to write into (q, k, v's shapes, unit last stride, any other strides:
    a fused block hands views of one (B, T, 3, H, D) buffer, the layout of its qkv GEMM, so
    the gradients need no stacking); None: new tensors."""
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    if grads is None:
        # A k/v broadcast over the batch (stride 0) gets a dense gradient, one per batch entry
        # (empty_like makes overlapping tensors contiguous); autograd of the expand sums them.
        dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)
    else:
        dq, dk, dv = grads
        for name, g, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if g.shape != like.shape or g.stride(-1) != 1 or g.dtype != like.dtype or g.device != like.device:
                raise ValueError(f"grads: {name} must have {name[1]}'s shape {tuple(like.shape)}, dtype and device, "
                                 f"unit last stride, got {tuple(g.shape)} {g.dtype} strides {g.stride()}")
    plan = _bwd_plan(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, None)
    if plan is not None and grads is not None:
        plan += (dq.stride(), dk.stride(), dv.stride())  # a plan keeps the strides it was bound with
    _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, mask, is_causal, scale, dropout_p, seed,
                q.shape[0], q.shape[2], k.shape[2], plan=plan)
    return dq, dk, dv


def _as4d(t):
    """(total, H, D) -> (1, H, total, D), a view."""
    return t.transpose(0, 1).unsqueeze(0)


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total, H, _ = q.shape
    out = new_output(q.shape, q.dtype, q.device)
    lse = new_output((H, total), torch.float32, q.device)
    _planned_fwd(_as4d(q), _as4d(k), _as4d(v), _as4d(out), lse.unsqueeze(0), None, is_causal, scale, dropout_p, seed,
                 cu_q.numel() - 1, max_q, max_k, cu_q, cu_k, (cu_q.numel(), cu_k.numel(), max_q, max_k))
    return out, lse


def _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed):
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)
    plan = _bwd_plan(dout, q, k, v, out, lse, None, is_causal, scale, dropout_p,
                     (cu_q.numel(), cu_k.numel(), max_q, max_k))
    _launch_bwd(_as4d(dout), _as4d(q), _as4d(k), _as4d(v), _as4d(out), lse.unsqueeze(0),
                _as4d(dq), _as4d(dk), _as4d(dv), None, is_causal, scale, dropout_p, seed,
                cu_q.numel() - 1, max_q, max_k, cu_q, cu_k, plan=plan)
    return dq, dk, dv


def _unsupported(dtype=None, head_dim=None, mask_kind="none", dropout_p=0.0, requires_grad=False,
                 is_causal=False, gqa=False, **_):
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the triton kernels (float16, bfloat16, float32)"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


register_impl("attention", "triton", Impl(_forward, _backward, _unsupported, backward_extras=frozenset({"grads"})))
register_impl("varlen_attention", "triton", Impl(_varlen_forward, _varlen_backward, _unsupported))


def dropout_keep_mask(seed: Tensor, B: int, H: int, Lq: int, Lk: int, p: float, device=None) -> Tensor:
    """The bool keep-mask (B, H, Lq, Lk) the kernels draw for `seed` (H = query heads; for
    varlen, B = sequences and Lq/Lk = the max lengths). Tests and the benchmark pass it to
    the reference as `dropout_mask`."""
    device = seed.device if device is None else torch.device(device)
    out = torch.empty(B * H, Lq, Lk, dtype=torch.uint8, device=device)
    if out.numel():
        grid = (B * H, cdiv(Lq, 64), cdiv(Lk, 64))  # B*H on axis 0: no 65535 cap
        with device_guard(out):
            dropout_keep_kernel[grid](out, seed.to(device), Lq, Lk, float(p), BLOCK_M=64, BLOCK_N=64)
    return out.view(B, H, Lq, Lk).bool()


def varlen_dropout_keep_masks(seed, cu_seqlens_q, cu_seqlens_k, H, max_seqlen_q, max_seqlen_k, p) -> List[Tensor]:
    """Per-sequence (H, Lq_i, Lk_i) keep-masks in the form reference.varlen_attention takes."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    full = dropout_keep_mask(seed, len(bq) - 1, H, max_seqlen_q, max_seqlen_k, p, cu_seqlens_q.device)
    return [full[i, :, : bq[i + 1] - bq[i], : bk[i + 1] - bk[i]] for i in range(len(bq) - 1)]
