"""A post-LN transformer block (BERT, ALBERT) as one autograd node over the fused launchers.

    y1 = LN1(x + drop(proj(attention(qkv(x)))))        y = LN2(y1 + drop(fc2(gelu(fc1(y1)))))

Why: eager training on the fused ops lost to Hugging Face (H200, 2026-11-27: BERT-base bf16
MLM step 27.87 ms against HF sdpa 21.12 and our torch backend 17.4), and the host time per op
accounts for it. Each fused op is a Python autograd Function: forward and backward through
autograd cost ~230-240 µs more host time than the PyTorch calls they replace on that machine's
host (the overhead group: add+LN fwd+bwd 503 against 261 µs, attention 563 against 331,
Linear+GELU 419 against 259), ~0.87 ms a layer over four ops, ~10.5 ms over 12 layers: the
whole gap to our torch backend. The launcher took 47.3 ms on Triton's own launch path against
27.9 on the fast launch, so that step is host-bound. Here the block's four fused ops and its
four linear layers run under one Function: one autograd node a layer instead of twelve (four
of them Python), one set of decisions (backends, seeds), and the backward calls the same
launchers and the same matmuls autograd would, in the order it would. Inference takes the
same path without the node. Unmeasured on a GPU yet: the models suite times the block against
the per-op path (fuseformer-fused-per-op).

TransformerBlock (models/layers.py) decides per call whether its call can run here (its
`_fused_call`: a post-LN block of our own module types, no hooks on them, every op resolving
to a fused backend, no torch.compile, no autocast) and otherwise takes the per-op path, which
computes the same. FUSEFORMER_FUSED_BLOCK=0 (read at import) or set_enabled(False) turns it off.

The launchers are the public ops' own (their launcher contracts, kernels/backends.py), so every
kernel, variant and launch plan is the one the per-op path would use.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..kernels import backends
from ..kernels._util import device_guard, draw_seed

_aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
_lg = importlib.import_module("fuseformer.kernels.linear_gelu")
_attn = importlib.import_module("fuseformer.kernels.attention")

_ENABLED = os.environ.get("FUSEFORMER_FUSED_BLOCK", "").strip().lower() not in ("0", "false", "no", "off", "n")


def enabled() -> bool:
    return _ENABLED


def set_enabled(on: bool) -> bool:
    """Turn the one-node block on or off for the process; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(on)
    return previous


@contextlib.contextmanager
def use(on: bool = True):
    previous = set_enabled(on)
    try:
        yield
    finally:
        set_enabled(previous)


def plan(x, attn_mask, heads, attn_p, p1, p2, intermediate, approximate, backend, grad):
    """(attention, add+LN, Linear+GELU) backend names for this call, or None where one of
    them resolves to torch (the per-op path then runs it, with its fallback warning)."""
    B, T, C = x.shape
    if attn_mask is not None and not _attn._broadcasts(attn_mask.shape, (B, heads, T, T)):
        return None  # the per-op path refuses it by name
    mask4 = None if attn_mask is None else attn_mask.expand(B, heads, T, T)
    device, dtype = x.device, x.dtype
    na = backends.resolve("attention", device, backend, dtype=dtype, head_dim=C // heads,
                          mask_kind=_attn.mask_kind(mask4), dropout_p=attn_p, requires_grad=grad, is_causal=False,
                          gqa=False, lq_multiple_of_8=T % 8 == 0)
    n1 = backends.resolve("add_layer_norm", device, backend, dtype=dtype, hidden=C, dropout_p=p1, requires_grad=grad)
    n2 = n1 if p2 == p1 else backends.resolve("add_layer_norm", device, backend, dtype=dtype, hidden=C,
                                              dropout_p=p2, requires_grad=grad)
    nl = backends.resolve("linear_gelu", device, backend, dtype=dtype, in_features=C, out_features=intermediate,
                          approximate=approximate, requires_grad=grad)
    if "torch" in (na, n1, n2, nl):
        return None
    return mask4, (na, n1, nl, n2)


def run(x, mask4, params, cfg, names, grad):
    """The block on x (B, T, C): through PostLNBlock (one autograd node) when `grad`, else
    directly. params: (qkv W, b, proj W, b, LN1 w, b, fc1 W, b, fc2 W, b, LN2 w, b), biases may
    be None; cfg: (heads, LN1 eps, LN2 eps, attention dropout, LN1 dropout, LN2 dropout,
    approximate); names: plan()'s."""
    if grad:
        return PostLNBlock.apply(x, mask4, cfg, names, *params)
    return _forward(x, mask4, params, cfg, names, keep=False)[0]


def _forward(x, mask4, params, cfg, names, keep):
    """(y, what the backward reads): the per-op path's calls in its order, seeds drawn in the
    same order from torch's generator (so dropout draws the same masks as that path)."""
    wqkv, bqkv, wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 = params
    heads, eps1, eps2, pa, p1, p2, approximate = cfg
    na, n1, nl, n2 = names
    B, T, C = x.shape
    qkv = _linear(x, wqkv, bqkv)
    q, k, v = qkv.view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    seed_a = _attn._draw_seed(pa, x.device)
    with device_guard(x):
        att, lse = backends.get_impl("attention", na).forward(q, k, v, mask4, False, 1.0 / math.sqrt(C // heads), pa,
                                                              seed_a)
    a_in = att.transpose(1, 2).reshape(B, T, C)
    a = _linear(a_in, wo, bo)
    seed1 = draw_seed(x.device) if p1 > 0.0 else None
    # keep: the stream (x + dropout(a)) and the statistics the backward reads, as the per-op
    # path's autograd Function keeps them; inference writes neither.
    y1, s1, m1, r1 = _aln._run_forward(n1, a, x, g1, b1, eps1, p1, seed1, keep, keep)
    save_pre = keep and _lg._save_preact(nl)
    h, pre = _lg._run_forward(nl, y1, w1, c1, approximate, save_pre)
    f = _linear(h, w2, c2)
    seed2 = draw_seed(x.device) if p2 > 0.0 else None
    y, s2, m2, r2 = _aln._run_forward(n2, f, y1, g2, b2, eps2, p2, seed2, keep, keep)
    saved = (x, q, k, v, att, lse, mask4, seed_a, a_in, s1, m1, r1, seed1, y1, pre, h, s2, m2, r2, seed2)
    return y, saved


# The block's linear layers and their gradients go through these two (bench/offline.py's
# empty_linears replaces them on a CPU, where a GEMM would dominate a host-time measurement).
def _linear(x, weight, bias):
    return F.linear(x, weight, bias)


def _linear_grads(dy2d, x2d, weight, need_x, need_w, need_b):
    """F.linear's gradients as autograd computes them: dx = dy W, dW = dy^T x, db = sum dy."""
    dx = dy2d @ weight if need_x else None
    dw = dy2d.t() @ x2d if need_w else None
    db = dy2d.sum(0) if need_b else None
    return dx, dw, db


class PostLNBlock(torch.autograd.Function):
    """The block's autograd node; its backward is the per-op path's backward, op by op."""

    @staticmethod
    def forward(ctx, x, mask4, cfg, names, *params):
        y, saved = _forward(x, mask4, params, cfg, names, keep=True)
        wqkv, _, wo, _, g1, b1, w1, c1, w2, _, g2, b2 = params
        ctx.save_for_backward(*saved, wqkv, wo, g1, b1, w1, c1, w2, g2, b2)
        ctx.cfg, ctx.names = cfg, names
        ctx.has_bias = (params[1] is not None, params[3] is not None, params[9] is not None)  # qkv, proj, fc2
        return y

    @staticmethod
    @once_differentiable  # the launchers' gradients have no graph: a double backward raises
    def backward(ctx, dy):
        (x, q, k, v, att, lse, mask4, seed_a, a_in, s1, m1, r1, seed1, y1, pre, h, s2, m2, r2, seed2,
         wqkv, wo, g1, b1, w1, c1, w2, g2, b2) = ctx.saved_tensors
        heads, eps1, eps2, pa, p1, p2, approximate = ctx.cfg
        na, n1, nl, n2 = ctx.names
        need = ctx.needs_input_grad[4:]  # per parameter, in run()'s order
        bias_qkv, bias_o, bias_2 = ctx.has_bias
        B, T, C = x.shape
        # LN2 over y1 + dropout(f): d f, and d y1 through the residual (the same tensor without
        # dropout, as AddLayerNormFunction hands it to both).
        shared2 = _aln._shared_grad(True, p2)
        df, dres2, dg2, db2 = _aln._run_backward(n2, dy, None, s2, g2, b2, m2, r2, p2, seed2, not shared2)
        dy1 = df if shared2 else dres2
        # fc2: f = h W2^T + c2
        df2 = df.reshape(-1, C)
        dh, dw2, dc2 = _linear_grads(df2, h.reshape(-1, h.shape[-1]), w2, True, need[8], bias_2 and need[9])
        # fc1 + GELU: the launcher's backward (pre stored, or recomputed from the bias)
        dy1_ffn, dw1, dc1 = _lg._run_backward(nl, dh.view(h.shape), y1, w1, pre, approximate, c1 is not None,
                                              None if pre is not None else c1)
        dy1 = dy1 + dy1_ffn
        # LN1 over x + dropout(a)
        shared1 = _aln._shared_grad(True, p1)
        da, dres1, dg1, db1 = _aln._run_backward(n1, dy1, None, s1, g1, b1, m1, r1, p1, seed1, not shared1)
        dx = da if shared1 else dres1
        # proj: a = a_in Wo^T + bo
        da2 = da.reshape(-1, C)
        da_in, dwo, dbo = _linear_grads(da2, a_in.reshape(-1, C), wo, True, need[2], bias_o and need[3])
        datt = da_in.view(B, T, heads, C // heads).transpose(1, 2)
        with device_guard(x):
            dq, dk, dv = backends.get_impl("attention", na).backward(datt, q, k, v, att, lse, mask4, False,
                                                                     1.0 / math.sqrt(C // heads), pa, seed_a)
        # qkv: the three gradients in the (B, T, 3, heads, head dim) layout of its output
        dqkv = torch.stack((dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)), dim=2).view(-1, 3 * C)
        dx_qkv, dwqkv, dbqkv = _linear_grads(dqkv, x.reshape(-1, C), wqkv, ctx.needs_input_grad[0], need[0],
                                             bias_qkv and need[1])
        if dx_qkv is not None:
            dx = dx + dx_qkv.view(B, T, C)
        return (dx, None, None, None, dwqkv, dbqkv, dwo, dbo, dg1, db1, dw1, dc1, dw2, dc2, dg2, db2)
