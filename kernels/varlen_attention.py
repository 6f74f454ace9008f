"""Attention over packed variable-length sequences (no padding tokens at all): the eager and
compiled paths and the public `varlen_attention`, over attention_launchers.py's varlen launchers.

    q (total_q, H, D), k/v (total_k, Hk, D); sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1].
"""
import math
import weakref
from typing import Optional, Tuple

import torch

from . import reference
from ._util import device_guard
from . import attention  # its _draw_seed: one seed source for both ops (tests record it there)
from .backends import get_impl, resolve
from .checks import check_causal_and_scale, check_prob, check_same, check_tensor, same_floats

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- eager path


class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, backend):
        seed = attention._draw_seed(dropout_p, q.device)
        with device_guard(q):
            out, lse = get_impl("varlen_attention", backend).forward(q, k, v, cu_q, cu_k, max_q, max_k, is_causal,
                                                                     scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, seed)
        ctx.args = (max_q, max_k, is_causal, scale, dropout_p, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
        max_q, max_k, is_causal, scale, dropout_p, backend = ctx.args
        with device_guard(q):
            dq, dk, dv = get_impl("varlen_attention", backend).backward(
                dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, scale, dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.


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


def _check_cu_seqlens(name, cu, total, max_seqlen, device):
    check_tensor(name, cu, dim=1, dtypes=(torch.int32, torch.int64))
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0), got none")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen for {name} must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return  # the checks below read the tensor back to the host
    if cu.is_cuda and torch.cuda.is_current_stream_capturing():
        # The read-back below is a device-to-host copy, which is illegal while a CUDA graph
        # is being captured (it would abort the capture); the checks ran on eager calls.
        return
    # Reading the offsets back costs a device-to-host sync; a packed model passes the same
    # cu_seqlens to every layer, so remember what was checked for this tensor as it is now.
    # An inference tensor has no version counter: it is checked once per tensor (an in-place
    # change of it after its first use goes unseen; such tensors are rarely edited in place).
    key = (None if cu.is_inference() else cu._version, total, max_seqlen)
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
    if not (same_floats(q, k, v) and q.dim() == k.dim() == v.dim() == 3):
        check_tensor("q", q, dim=3)
        check_tensor("k", k, dim=3)
        check_tensor("v", v, dim=3)
        check_same("k", k, "q", q)
        check_same("v", v, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head dim {k.shape[2]} differs from q head dim {q.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} offsets but cu_seqlens_k has {cu_seqlens_k.numel()}")
    dropout_p = check_prob("dropout_p", dropout_p)
    check_causal_and_scale(is_causal, scale)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale)
    if q.numel() == 0 or k.numel() == 0:
        return reference.varlen_attention(*args)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    name = resolve("varlen_attention", q.device, backend, dtype=q.dtype, head_dim=q.shape[2], mask_kind="none",
                   dropout_p=dropout_p, requires_grad=grad, is_causal=is_causal, gqa=q.shape[1] != k.shape[1])
    if name == "torch":
        return reference.varlen_attention(*args)
    q, scale = attention._positive_scale(q, 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale))
    cu_q = cu_seqlens_q if cu_seqlens_q.dtype == torch.int32 else cu_seqlens_q.to(torch.int32)
    cu_k = cu_seqlens_k if cu_seqlens_k.dtype == torch.int32 else cu_seqlens_k.to(torch.int32)
    if torch.compiler.is_compiling():
        out, _ = varlen_attention_fwd(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, is_causal, scale, dropout_p,
                                      attention._draw_seed(dropout_p, q.device), name)
        return out
    if grad:
        return VarlenAttentionFunction.apply(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, is_causal, scale,
                                             dropout_p, name)
    seed = attention._draw_seed(dropout_p, q.device)
    with device_guard(q):
        out, _ = get_impl("varlen_attention", name).forward(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                            is_causal, scale, dropout_p, seed)
    return out
