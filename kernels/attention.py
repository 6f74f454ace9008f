"""Flash attention: the eager and compiled call paths and the public function.

    kernels (attention_kernels.py, attention_hopper*.py) -> launchers (attention_launchers.py:
    `_forward`, `_backward`, registered as the "triton" Impl) -> AttentionFunction (eager
    autograd) or the custom ops `fuseformer::attention_fwd/bwd` (what torch.compile traces)
    -> scaled_dot_product_attention (varlen_attention.py: the varlen one).

Both paths call the same launchers through backends.get_impl, so the CUDA C++ backend plugs
in behind them with the same launcher signature:
    forward(q, k, v, mask, is_causal, scale, dropout_p, seed) -> (out, lse)
    backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed) -> (dq, dk, dv)
q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) with unit last stride (k/v may have batch stride 0);
mask None or a (B, Hq, Lq, Lk) expanded view (bool or q.dtype); seed None or an int64[1]
tensor; out (B, Hq, Lq, D) in q.dtype, allocated (B, Lq, Hq, D) so merging heads afterwards
is free (the fake op promises these strides); lse fp32 (B, Hq, Lq) in natural log, +inf on a
row with every key masked.
Dropout keeps element (b, h, i, j) iff word j % 4 of Philox4x32(seed, counter
((b*Hq + h)*Lq + i) * cdiv(Lk, 4) + j // 4), as a uniform in [0, 1), is >= p (kernels/philox.py),
the kept values scaled by 1/(1-p); `dropout_keep_mask` rebuilds that mask for the reference.
"""
import math
from typing import Optional, Tuple

import torch

from . import reference
# The launchers' public names (the variants, the mask helper the models use, the dropout
# mask for the reference) stay importable from here.
from .attention_launchers import (
    MAX_HEAD_DIM,
    VARIANT,
    VARIANTS,
    dropout_keep_mask,
    hopper_reason,
    mask_kind,
    set_autotune,
    set_variant,
    variant,
    varlen_dropout_keep_masks,
)
from ._util import device_guard
from .backends import BackendUnsupportedError, get_backend, get_impl, resolve, warn_fallback
from .checks import check_causal_and_scale, check_prob, check_same, check_tensor, same_floats

Tensor = torch.Tensor

__all__ = ["scaled_dot_product_attention", "AttentionFunction", "attention_fwd", "attention_bwd", "MAX_HEAD_DIM",
           "VARIANT", "VARIANTS", "dropout_keep_mask", "hopper_reason", "mask_kind", "set_autotune", "set_variant",
           "variant", "varlen_dropout_keep_masks"]


def _positive_scale(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """(q, scale) with scale > 0 and the same scores q k^T * scale: the forward kernels take the
    softmax's row max on unscaled scores and scale it after (one FMA a score instead of a
    multiply and a subtract), which needs scale > 0. A negative scale negates q instead; scale
    0 scores every key 0, as 0 * q does with scale 1. Done where autograd sees it, so the
    gradient of q follows."""
    if scale > 0.0:
        return q, scale
    return q * (-1.0 if scale < 0.0 else 0.0), (-scale if scale < 0.0 else 1.0)


# ----------------------------------------------------------------------------- eager path


def _draw_seed(p, device):
    # A tensor, not a Python int: no host sync, and torch.compile traces torch.randint.
    return torch.randint(0, 2**62, (1,), device=device, dtype=torch.int64) if p > 0.0 else None


class AttentionFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly, no dispatcher in between."""

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, dropout_p, backend):
        seed = _draw_seed(dropout_p, q.device)
        with device_guard(q):
            out, lse = get_impl("attention", backend).forward(q, k, v, mask, is_causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask, seed)
        ctx.args = (is_causal, scale, dropout_p, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        is_causal, scale, dropout_p, backend = ctx.args
        with device_guard(q):
            dq, dk, dv = get_impl("attention", backend).backward(dout, q, k, v, out, lse, mask, is_causal, scale,
                                                                 dropout_p, seed)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.


@torch.library.custom_op("fuseformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: float,
    dropout_p: float, seed: Optional[Tensor], backend: str,
) -> Tuple[Tensor, Tensor]:
    # Triton launches on the current CUDA device and its stream, not the tensors' device: on
    # cuda:1 while cuda:0 is current, the kernels would run on the wrong GPU with foreign
    # pointers (illegal address). Every launch path guards the same way.
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


# ----------------------------------------------------------------------------- public API


def _torch_only(op: str, reason: str, backend: Optional[str]) -> None:
    """A case only the reference handles: an error if a fused backend was named, else a warning."""
    name = get_backend() if backend is None else backend.lower()
    if name in ("triton", "cuda"):
        raise BackendUnsupportedError(f"backend {name!r} cannot run {op}: {reason}")
    if name == "auto":
        warn_fallback(op, reason, stacklevel=4)


def _broadcasts(shape, target) -> bool:
    """torch's broadcasting rule, without building a tensor (torch.broadcast_shapes costs
    ~20 µs): every dim, aligned from the right, equals the target's or is 1."""
    if len(shape) > len(target):
        return False
    return all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target)))


def _check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> float:
    """Everything torch's SDPA refuses, refused with a message naming the argument; returns
    dropout_p as a float. The common case passes in a few attribute reads."""
    if not (same_floats(query, key, value) and 2 <= query.dim() == key.dim() == value.dim()):
        check_tensor("query", query, min_dim=2)
        for name, t in (("key", key), ("value", value)):
            check_tensor(name, t, min_dim=2)
            check_same(name, t, "query", query)
            if t.dim() != query.dim():
                raise ValueError(
                    f"{name} must have as many dimensions as query ({query.dim()}), got shape {tuple(t.shape)}"
                )
    qs, ks, vs = query.shape, key.shape, value.shape
    if ks[:-3] != qs[:-3] or vs[:-3] != qs[:-3]:
        for name, s in (("key", ks), ("value", vs)):
            if s[:-3] != ks[:-3] or not _broadcasts(s[:-3], qs[:-3]):
                raise ValueError(f"{name} batch dims {tuple(s[:-3])} do not broadcast to query's {tuple(qs[:-3])}")
    if ks[-1] != qs[-1]:
        raise ValueError(f"key head dim {ks[-1]} differs from query head dim {qs[-1]}")
    if vs[-2] != ks[-2]:
        raise ValueError(f"value length {vs[-2]} differs from key length {ks[-2]}")
    if len(qs) >= 3:
        hq, hk, hv = qs[-3], ks[-3], vs[-3]
        if hk != hv:
            raise ValueError(f"key has {hk} heads but value has {hv}; they must match")
        if hq != hk:
            if not enable_gqa:
                raise ValueError(
                    f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for grouped-query attention"
                )
            if hk == 0 or hq % hk:
                raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key/value heads ({hk})")
    dropout_p = check_prob("dropout_p", dropout_p, allow_one=True)
    check_causal_and_scale(is_causal, scale)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, dtypes=None)
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise TypeError(f"attn_mask must be bool or have query's dtype {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        target = (*qs[:-2], qs[-2], ks[-2])
        if not _broadcasts(attn_mask.shape, target):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {target}")
    return dropout_p


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, backend=None):
    """torch.nn.functional.scaled_dot_product_attention, fused. Shapes (..., L, E); a bool
    mask is True where a key is attended, a float mask is added; a fully masked row gives
    zeros. `backend` overrides the backend in force for this call.

    Differences from torch's: key and value must share their batch dims (each may broadcast
    to query's); a float mask that requires grad, and value head dims unlike query's, run on
    the torch backend (an error when a fused backend is named); dropout draws its own random
    numbers (Philox, reproducible under torch.manual_seed, not torch's stream).
    """
    dropout_p = _check_attention_args(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if dropout_p == 1.0 or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Nothing for a kernel to do: no keys, no queries, or every weight dropped.
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)
    qs = query.shape
    Lq, E = qs[-2], qs[-1]
    Lk, Ev = key.shape[-2], value.shape[-1]
    if len(qs) == 4 and key.shape[0] == qs[0]:
        q4, k4, v4 = query, key, value  # the common case: no reshapes
    else:
        hq = qs[-3] if len(qs) >= 3 else 1
        hk = key.shape[-3] if len(qs) >= 3 else 1
        B = math.prod(qs[:-3])
        if key.shape[:-3] != qs[:-3]:
            # A batch-broadcast k/v: an expanded view (batch stride 0), never copied for 4-D.
            key = key.expand(*qs[:-3], *key.shape[-3:])
            value = value.expand(*qs[:-3], *value.shape[-3:])
        q4 = query.reshape(B, hq, Lq, E)
        k4, v4 = key.reshape(B, hk, Lk, E), value.reshape(B, hk, Lk, Ev)
    mask4 = None
    if attn_mask is not None:
        # An expanded view: broadcast dims get stride 0 and are never materialised.
        mask4 = attn_mask.expand(*qs[:-2], Lq, Lk)
        if len(qs) != 4:
            mask4 = mask4.reshape(q4.shape[0], q4.shape[1], Lq, Lk)
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    name = resolve("attention", query.device, backend, dtype=query.dtype, head_dim=E if Ev < E else Ev,
                   mask_kind=mask_kind(mask4), dropout_p=dropout_p, requires_grad=grad, is_causal=is_causal,
                   gqa=q4.shape[1] != k4.shape[1], lq_multiple_of_8=Lq % 8 == 0)
    if name != "torch":
        if Ev != E:
            _torch_only("attention", f"value head dim {Ev} differs from query head dim {E}", backend)
            name = "torch"
        elif attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            _torch_only("attention", "a float attn_mask that requires grad", backend)
            name = "torch"
    if name == "torch":
        return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)
    q4, scale = _positive_scale(q4, 1.0 / math.sqrt(E) if scale is None else float(scale))
    if torch.compiler.is_compiling():
        out, _ = attention_fwd(q4, k4, v4, mask4, is_causal, scale, dropout_p, _draw_seed(dropout_p, query.device),
                               name)
    elif grad:
        out = AttentionFunction.apply(q4, k4, v4, mask4, is_causal, scale, dropout_p, name)
    else:
        seed = _draw_seed(dropout_p, query.device)
        with device_guard(q4):
            out, _ = get_impl("attention", name).forward(q4, k4, v4, mask4, is_causal, scale, dropout_p, seed)
    return out if len(qs) == 4 else out.reshape(*qs[:-1], Ev)
