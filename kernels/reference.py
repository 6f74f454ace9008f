"""Readable PyTorch for every fused op: the oracle of the tests and the `torch` backend.

Each function has the public API's exact signature and semantics. Nothing here is tuned:
the tests evaluate it on inputs upcast to float64 and compare the fused kernels against it
by the parity rule (kernels/parity.py).

Dropout is the one place where a fused kernel and this reference cannot draw the same
random numbers, so every function with `dropout_p` also takes an explicit keep-mask
(`dropout_mask`, True = keep); the tests rebuild the kernel's mask and pass it here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dropout(x: torch.Tensor, p: float, mask: torch.Tensor | None) -> torch.Tensor:
    if p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0  # everything dropped; x / (1 - p) would be 0/0 = NaN
    if mask is None:
        return F.dropout(x, p, training=True)
    return x * mask.to(x.dtype) / (1.0 - p)


def scaled_dot_product_attention(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    dropout_mask=None,
):
    """softmax(q k^T * scale + bias) v over shapes (..., L, E).

    bias: -inf where a bool mask is False, the mask itself when it is float, -inf above the
    diagonal when causal (aligned top-left, as torch aligns it). A row with every key masked
    gives zeros, as torch's own SDPA does.
    """
    L, S = query.shape[-2], key.shape[-2]
    # Head dim 0: every score is 0 whatever the scale (torch gives the mean of the values).
    scale = (1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)

    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L, S)
    allowed = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        allowed = allowed.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))

    # A fully masked row would be softmax of all -inf = NaN; torch returns zeros there.
    row_dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(row_dead, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(row_dead, 0.0)
    probs = _dropout(probs, dropout_p, dropout_mask)
    return probs @ value


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    *,
    dropout_mask=None,
):
    """Attention over packed sequences: q (total_q, H, D), k/v (total_k, Hk, D).

    Sequence i owns rows cu_seqlens[i]:cu_seqlens[i+1]. Causal is aligned top-left, as in
    scaled_dot_product_attention. `dropout_mask`, if given, is a list of per-sequence
    (H, Lq_i, Lk_i) keep-masks.
    """
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[i], bounds_q[i + 1], bounds_k[i], bounds_k[i + 1]
        o = scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),  # (H, Lq_i, D)
            k[k0:k1].transpose(0, 1),
            v[k0:k1].transpose(0, 1),
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=True,
            dropout_mask=None if dropout_mask is None else dropout_mask[i],
        )
        out[q0:q1] = o.transpose(0, 1)
    return out


def add_layer_norm(
    x,
    residual,
    weight,
    bias,
    eps=1e-5,
    dropout_p=0.0,
    prenorm=False,
    *,
    dropout_mask=None,
):
    """y = layer_norm(residual + dropout(x)) over the last dim, statistics in fp32 or wider.

    With prenorm=True returns (y, residual + dropout(x)): the pre-LN block's new residual
    stream. residual, weight and bias may each be None.
    """
    stream = _dropout(x, dropout_p, dropout_mask)
    if residual is not None:
        stream = stream + residual
    acc = torch.promote_types(stream.dtype, torch.float32)
    h = stream.to(acc)
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).square().mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(stream.dtype)
    return (y, stream) if prenorm else y


def linear_gelu(x, weight, bias=None, approximate="none"):
    """gelu(x @ weight^T + bias); approximate="none" is erf (BERT), "tanh" is GPT-2's gelu_new."""
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean"):
    """Cross-entropy over the class scores in the last dim of `logits`, in float32 at least
    (float64 stays float64). "mean" averages over the rows whose label is not ignore_index;
    "none" gives each row's loss in labels' shape, 0 where ignored."""
    wide = logits if logits.dtype == torch.float64 else logits.float()
    rows = wide.reshape(labels.numel(), wide.shape[-1])  # (M, V); -1 cannot stand for M when V is 0
    loss = F.cross_entropy(rows, labels.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss
