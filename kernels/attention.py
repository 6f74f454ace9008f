"""Flash attention: launchers, torch custom ops with autograd, and the public functions.

kernel (attention_kernels.py) -> launcher (`_forward`, `_backward`, registered as the
"triton" Impl) -> custom op `fuseformer::attention_fwd/bwd` (fake + autograd, so
torch.compile traces it whole) -> `scaled_dot_product_attention`, torch's signature.

The custom ops take a `backend` string and dispatch through backends.get_impl, so the CUDA
C++ backend plugs in behind the same ops with the same launcher signature:
    forward(q, k, v, mask, is_causal, scale, dropout_p, seed) -> (out, lse)
    backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed) -> (dq, dk, dv)
q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) with unit last stride; mask None or a (B, Hq, Lq, Lk)
expanded view (bool or q.dtype); seed None or an int64[1] tensor; out (B, Hq, Lq, D) in
q.dtype, allocated (B, Lq, Hq, D) so merging heads afterwards is free (the fake op promises
these strides); lse fp32 (B, Hq, Lq) in natural log, +inf on a row with every key masked.
Dropout keeps element (b, h, i, j) iff Philox(seed, ((b*Hq + h)*Lq + i)*Lk + j) >= p, the
kept values scaled by 1/(1-p); `dropout_keep_mask` rebuilds that mask for the reference.
"""
import math
import os
import warnings
import weakref
from typing import List, Optional, Tuple

import torch
import triton

from . import reference
from .attention_kernels import (
    LOG2E,
    MASK_DENSE,
    MASK_KEY_PADDING,
    MASK_NONE,
    attn_bwd_dkdv,
    attn_bwd_dq,
    attn_bwd_preprocess,
    attn_fwd,
    attn_fwd_tuned,
    attn_bwd_dkdv_tuned,
    attn_bwd_dq_tuned,
    default_config,
    dropout_keep_kernel,
)
from ._util import device_guard
from .backends import BackendUnsupportedError, Impl, get_backend, get_impl, interpreting, register_impl, resolve
from .checks import check_prob, check_same, check_tensor

Tensor = torch.Tensor
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- launchers


def _empty(*shape, dtype, device):
    t = torch.empty(*shape, dtype=dtype, device=device)
    # Tests set FUSEFORMER_POISON=1 so that any element a kernel forgets to write is NaN.
    if os.environ.get("FUSEFORMER_POISON", "0") not in ("", "0"):
        t.fill_(float("nan"))
    return t


def _empty_like(t):
    out = torch.empty_like(t)
    if os.environ.get("FUSEFORMER_POISON", "0") not in ("", "0"):
        out.fill_(float("nan"))
    return out


def mask_kind(mask: Optional[Tensor]) -> str:
    """"none", "key_padding" (one key row per batch: heads and query rows broadcast) or "dense"."""
    if mask is None:
        return "none"
    broadcast = [mask.size(i) == 1 or mask.stride(i) == 0 for i in (1, 2)]
    return "key_padding" if all(broadcast) else "dense"


def _mask_args(mask, dummy):
    if mask is None:
        return dummy, (0, 0, 0, 0), MASK_NONE, False
    kind = MASK_KEY_PADDING if mask_kind(mask) == "key_padding" else MASK_DENSE
    # Size-1 dims are read at index 0 whatever their stride, so give them stride 0.
    strides = tuple(0 if mask.size(i) == 1 else mask.stride(i) for i in range(4))
    is_float = mask.dtype != torch.bool
    return (mask if is_float else mask.view(torch.uint8)), strides, kind, is_float


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(q):
    return dict(
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        EXACT_FP32=q.dtype == torch.float32,
        HEAD_D=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),
    )


def _bucket(lq, lk):
    return triton.next_power_of_2(max(lq, lk, 1))


def _run(kind, tuned, plain, grid, q, *args, **kwargs):
    """Launch the autotuned kernel, or with FUSEFORMER_AUTOTUNE=0 / the interpreter, the plain
    kernel with a default config that fits shared memory."""
    if interpreting() or os.environ.get("FUSEFORMER_AUTOTUNE", "1") == "0":
        m, n, w, s = default_config(kind, kwargs["BLOCK_D"], q.element_size())
        plain[grid](q, *args, **kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    else:
        tuned[grid](q, *args, **kwargs)


def _bs(t, varlen):
    # With VARLEN the grid's batch index is the sequence index; the rows are offset by
    # cu_seqlens instead, so the batch stride must be 0.
    return 0 if varlen else t.stride(0)


def _launch_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, nbatch, lq, lk, cu_q=None, cu_k=None):
    """All tensors 4-D (B, H, L, D) views (lse 3-D); with cu_q the batch dim has size 1."""
    varlen = cu_q is not None
    H, group = q.shape[1], q.shape[1] // k.shape[1]
    m, ms, kind, is_float = _mask_args(mask, q)
    dropout = dropout_p > 0.0
    # A flat 1-D grid (the kernels split it back with _flat_pid): CUDA caps grid axes 1 and
    # 2 at 65535, too few for B * H programs of a big batch or of many packed sequences.
    grid = lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * nbatch * H,)  # noqa: E731
    _run(
        "fwd", attn_fwd_tuned, attn_fwd, grid,
        q, k, v, out, lse, m, seed if dropout else q, cu_q if varlen else lse, cu_k if varlen else lse,
        _bs(q, varlen), q.stride(1), q.stride(2),
        _bs(k, varlen), k.stride(1), k.stride(2),
        _bs(v, varlen), v.stride(1), v.stride(2),
        _bs(out, varlen), out.stride(1), out.stride(2),
        _bs(lse, varlen), lse.stride(1),
        *ms,
        H, group, lq, lk, _bucket(lq, lk), scale * LOG2E, float(dropout_p),
        CAUSAL=bool(is_causal), MASK_KIND=kind, MASK_FLOAT=is_float, DROPOUT=dropout, VARLEN=varlen,
        **_flags(q),
    )


def _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, mask, is_causal, scale, dropout_p, seed, nbatch, lq, lk,
                cu_q=None, cu_k=None):
    varlen = cu_q is not None
    H, Hk = q.shape[1], k.shape[1]
    flags = _flags(q)
    delta = _empty_like(lse)
    cu_q_arg, cu_k_arg = (cu_q, cu_k) if varlen else (lse, lse)
    attn_bwd_preprocess[(triton.cdiv(lq, 64) * nbatch * H,)](
        out, dout, delta, cu_q_arg, cu_k_arg,
        _bs(out, varlen), out.stride(1), out.stride(2),
        _bs(dout, varlen), dout.stride(1), dout.stride(2),
        _bs(lse, varlen), lse.stride(1),
        H, lq,
        HEAD_D=flags["HEAD_D"], BLOCK_D=flags["BLOCK_D"], VARLEN=varlen, BLOCK_M=64,
    )
    m, ms, kind, is_float = _mask_args(mask, q)
    dropout = dropout_p > 0.0
    seed_arg = seed if dropout else q
    common = dict(CAUSAL=bool(is_causal), MASK_KIND=kind, MASK_FLOAT=is_float, DROPOUT=dropout, VARLEN=varlen, **flags)
    tail = (H, H // Hk, lq, lk, _bucket(lq, lk), scale * LOG2E, scale, float(dropout_p))
    qkv_strides = (
        _bs(q, varlen), q.stride(1), q.stride(2),
        _bs(k, varlen), k.stride(1), k.stride(2),
        _bs(v, varlen), v.stride(1), v.stride(2),
        _bs(dout, varlen), dout.stride(1), dout.stride(2),
    )
    _run(
        "bwd", attn_bwd_dkdv_tuned, attn_bwd_dkdv, lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]) * nbatch * Hk,),
        q, k, v, dout, dk, dv, lse, delta, m, seed_arg, cu_q_arg, cu_k_arg,
        *qkv_strides,
        _bs(dk, varlen), dk.stride(1), dk.stride(2),
        _bs(dv, varlen), dv.stride(1), dv.stride(2),
        _bs(lse, varlen), lse.stride(1),
        *ms, *tail, **common,
    )
    _run(
        "bwd", attn_bwd_dq_tuned, attn_bwd_dq, lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]) * nbatch * H,),
        q, k, v, dout, dq, lse, delta, m, seed_arg, cu_q_arg, cu_k_arg,
        *qkv_strides,
        _bs(dq, varlen), dq.stride(1), dq.stride(2),
        _bs(lse, varlen), lse.stride(1),
        *ms, *tail, **common,
    )


def _out_like(q):
    B, H, L, D = q.shape
    return _empty(B, L, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def _forward(q, k, v, mask, is_causal, scale, dropout_p, seed):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, Lq, _ = q.shape
    out = _out_like(q)
    lse = _empty(B, H, Lq, dtype=torch.float32, device=q.device)
    _launch_fwd(q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, B, Lq, k.shape[2])
    return out, lse


def _backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed):
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    _launch_bwd(dout, q, k, v, out, lse, dq, dk, dv, mask, is_causal, scale, dropout_p, seed,
                q.shape[0], q.shape[2], k.shape[2])
    return dq, dk, dv


def _as4d(t):
    """(total, H, D) -> (1, H, total, D), a view."""
    return t.transpose(0, 1).unsqueeze(0)


def _varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    total, H, _ = q.shape
    out = _empty(q.shape, dtype=q.dtype, device=q.device)
    lse = _empty(H, total, dtype=torch.float32, device=q.device)
    _launch_fwd(_as4d(q), _as4d(k), _as4d(v), _as4d(out), lse.unsqueeze(0), None, is_causal, scale, dropout_p,
                seed, cu_q.numel() - 1, max_q, max_k, cu_q, cu_k)
    return out, lse


def _varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed):
    dout, q, k, v = _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v)
    dq, dk, dv = _empty_like(q), _empty_like(k), _empty_like(v)
    _launch_bwd(_as4d(dout), _as4d(q), _as4d(k), _as4d(v), _as4d(out), lse.unsqueeze(0),
                _as4d(dq), _as4d(dk), _as4d(dv), None, is_causal, scale, dropout_p, seed,
                cu_q.numel() - 1, max_q, max_k, cu_q, cu_k)
    return dq, dk, dv


def _unsupported(dtype=None, head_dim=None, mask_kind="none", dropout_p=0.0, requires_grad=False,
                 is_causal=False, gqa=False, **_):
    if dtype not in _KERNEL_DTYPES:
        return f"dtype {dtype} is not supported by the triton kernels (float16, bfloat16, float32)"
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


register_impl("attention", "triton", Impl(_forward, _backward, _unsupported))
register_impl("varlen_attention", "triton", Impl(_varlen_forward, _varlen_backward, _unsupported))


def dropout_keep_mask(seed: Tensor, B: int, H: int, Lq: int, Lk: int, p: float, device=None) -> Tensor:
    """The bool keep-mask (B, H, Lq, Lk) the kernels draw for `seed` (H = query heads; for
    varlen, B = sequences and Lq/Lk = the max lengths). Tests and the benchmark pass it to
    the reference as `dropout_mask`."""
    device = seed.device if device is None else torch.device(device)
    out = torch.empty(B * H, Lq, Lk, dtype=torch.uint8, device=device)
    if out.numel():
        grid = (B * H, triton.cdiv(Lq, 64), triton.cdiv(Lk, 64))  # B*H on axis 0: no 65535 cap
        with device_guard(out):
            dropout_keep_kernel[grid](out, seed.to(device), Lq, Lk, float(p), BLOCK_M=64, BLOCK_N=64)
    return out.view(B, H, Lq, Lk).bool()


def varlen_dropout_keep_masks(seed, cu_seqlens_q, cu_seqlens_k, H, max_seqlen_q, max_seqlen_k, p) -> List[Tensor]:
    """Per-sequence (H, Lq_i, Lk_i) keep-masks in the form reference.varlen_attention takes."""
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    full = dropout_keep_mask(seed, len(bq) - 1, H, max_seqlen_q, max_seqlen_k, p, cu_seqlens_q.device)
    return [full[i, :, : bq[i + 1] - bq[i], : bk[i + 1] - bk[i]] for i in range(len(bq) - 1)]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fuseformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor]:
    # Triton launches on the current CUDA device and its stream, not the tensors' device: on
    # cuda:1 while cuda:0 is current, the kernels would run on the wrong GPU with foreign
    # pointers (illegal address). add_layer_norm and linear_gelu guard the same way.
    with device_guard(q):
        return get_impl("attention", backend).forward(q, k, v, mask, is_causal, scale, dropout_p, seed)


@attention_fwd.register_fake
def _(q, k, v, mask, is_causal, scale, dropout_p, seed, backend):
    B, H, L, D = q.shape
    return q.new_empty(B, L, H, D).transpose(1, 2), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fuseformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Optional[Tensor],
    is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    with device_guard(q):
        return get_impl("attention", backend).backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_fwd(ctx, inputs, output):
    q, k, v, mask, is_causal, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, seed)
    ctx.args = (is_causal, scale, dropout_p, backend)


def _attention_grad(ctx, dout, _dlse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    is_causal, scale, dropout_p, backend = ctx.args
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_attention_grad, setup_context=_setup_fwd)


@torch.library.custom_op("fuseformer::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, is_causal: bool, scale: float, dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor]:
    with device_guard(q):
        return get_impl("varlen_attention", backend).forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, seed
        )


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p, seed, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[1], q.shape[0], dtype=torch.float32
    )


@torch.library.custom_op("fuseformer::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, is_causal: bool, scale: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    with device_guard(q):
        return get_impl("varlen_attention", backend).backward(
            dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
            dropout_p, seed,
        )


@varlen_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, seed)
    ctx.args = (max_q, max_k, is_causal, scale, dropout_p, backend)


def _varlen_grad(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, is_causal, scale, dropout_p, backend = ctx.args
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale,
                                      dropout_p, seed, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_varlen_grad, setup_context=_setup_varlen)


# ----------------------------------------------------------------------------- public API


_warned = set()


def _torch_only(op: str, reason: str, backend: Optional[str]) -> None:
    """A case only the reference handles: an error if a fused backend was named, else a warning."""
    name = get_backend() if backend is None else backend.lower()
    if name in ("triton", "cuda"):
        raise BackendUnsupportedError(f"backend {name!r} cannot run {op}: {reason}")
    if name == "auto" and (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fuseformer: {op} falls back to the torch backend ({reason})", stacklevel=3)


def _draw_seed(p, device):
    # A tensor, not a Python int: torch.compile traces torch.randint without a graph break.
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64) if p > 0.0 else None


def _check_attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    check_tensor("query", query, min_dim=2)
    check_tensor("key", key, min_dim=2)
    check_tensor("value", value, min_dim=2)
    check_same("key", key, "query", query)
    check_same("value", value, "query", query)
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(
                f"{name} must have as many dimensions as query ({query.dim()}), got shape {tuple(t.shape)}"
            )
        if t.shape[:-3] != query.shape[:-3]:
            raise ValueError(f"{name} batch dims {tuple(t.shape[:-3])} differ from query's {tuple(query.shape[:-3])}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key head dim {key.shape[-1]} differs from query head dim {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value length {value.shape[-2]} differs from key length {key.shape[-2]}")
    if query.dim() >= 3:
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv:
            raise ValueError(f"key has {hk} heads but value has {hv}; they must match")
        if hq != hk:
            if not enable_gqa:
                raise ValueError(
                    f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for grouped-query attention"
                )
            if hk == 0 or hq % hk:
                raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    check_prob("dropout_p", dropout_p)
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=None)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or have query's dtype {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        target = tuple(query.shape[:-2]) + (query.shape[-2], key.shape[-2])
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, target) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend=None):
    """torch.nn.functional.scaled_dot_product_attention, fused. Shapes (..., L, E); a bool
    mask is True where a key is attended, a float mask is added; a fully masked row gives
    zeros. `backend` overrides the backend in force for this call."""
    _check_attention_args(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return reference.scaled_dot_product_attention(*args)
    Lq, E = query.shape[-2:]
    Lk, Ev = key.shape[-2], value.shape[-1]
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    B = math.prod(query.shape[:-3])
    q4 = query.reshape(B, hq, Lq, E)
    k4, v4 = key.reshape(B, hk, Lk, E), value.reshape(B, hk, Lk, Ev)
    mask4 = None
    if attn_mask is not None:
        # An expanded view: broadcast dims get stride 0 and are never materialised.
        mask4 = attn_mask.expand(*query.shape[:-2], Lq, Lk).reshape(B, hq, Lq, Lk)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    case = dict(dtype=query.dtype, head_dim=max(E, Ev), mask_kind=mask_kind(mask4), dropout_p=float(dropout_p),
                requires_grad=grad, is_causal=bool(is_causal), gqa=hq != hk)
    name = resolve("attention", query.device, backend, **case)
    if name != "torch":
        if Ev != E:
            _torch_only("attention", f"value head dim {Ev} differs from query head dim {E}", backend)
            name = "torch"
        elif attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            _torch_only("attention", "a float attn_mask that requires grad", backend)
            name = "torch"
    if name == "torch":
        return reference.scaled_dot_product_attention(*args)
    scale = 1.0 / math.sqrt(E) if scale is None else float(scale)
    seed = _draw_seed(dropout_p, query.device)
    out, _ = attention_fwd(q4, k4, v4, mask4, bool(is_causal), scale, float(dropout_p), seed, name)
    return out.reshape(*query.shape[:-1], Ev)


def _check_cu_seqlens(name, cu, total, max_seqlen, device):
    check_tensor(name, cu, dim=1, dtypes=(torch.int32, torch.int64))
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0), got none")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # the checks below read the tensor back to the host
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        # The read-back below is a device-to-host copy, which is illegal while a CUDA graph
        # is being captured (it would abort the capture); the checks ran on eager calls.
        return
    # Reading the offsets back costs a device-to-host sync; a packed model passes the same
    # cu_seqlens to every layer, so remember what was checked for this tensor as it is now.
    key = (cu._version, total, max_seqlen)
    seen = _checked_offsets.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == key:
        return
    bounds = cu.tolist()
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"{name} must start at 0 and never decrease, got {bounds}")
    if bounds[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {bounds[-1]}")
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"a sequence in {name} has {longest} tokens, more than max_seqlen {max_seqlen}")
    ident = id(cu)
    _checked_offsets[ident] = (weakref.ref(cu, lambda _: _checked_offsets.pop(ident, None)), key)


# id(tensor) -> (weak reference, what was checked). Keyed by identity: a tensor's __eq__ is
# elementwise, so tensors cannot be dictionary keys themselves.
_checked_offsets: dict[int, tuple] = {}


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     is_causal=False, scale=None, *, backend=None):
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, Hk, D), sequence i
    owning rows cu_seqlens[i]:cu_seqlens[i + 1]. No padding tokens are ever computed."""
    check_tensor("q", q, dim=3)
    check_tensor("k", k, dim=3)
    check_tensor("v", v, dim=3)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    if k.shape[1:] != v.shape[1:] or k.shape[0] != v.shape[0]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head dim {k.shape[2]} differs from q head dim {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} offsets but cu_seqlens_k has {cu_seqlens_k.numel()}")
    check_prob("dropout_p", dropout_p)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale)
    if q.numel() == 0 or k.numel() == 0:
        return reference.varlen_attention(*args)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    case = dict(dtype=q.dtype, head_dim=q.shape[2], mask_kind="none", dropout_p=float(dropout_p),
                requires_grad=grad, is_causal=bool(is_causal), gqa=q.shape[1] != k.shape[1])
    name = resolve("varlen_attention", q.device, backend, **case)
    if name == "torch":
        return reference.varlen_attention(*args)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    seed = _draw_seed(dropout_p, q.device)
    out, _ = varlen_attention_fwd(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                                  int(max_seqlen_q), int(max_seqlen_k), bool(is_causal), scale, float(dropout_p),
                                  seed, name)
    return out
