"""A transformer block as one autograd node over the fused launchers.

    post-LN (BERT, ALBERT):  y1 = LN1(x + drop(Attn(x)))      y = LN2(y1 + drop(FFN(y1)))
    pre-LN (GPT-2):          h, s1 = LN1(residual + drop(x))  h2, s2 = LN2(s1 + drop(Attn(h)))
                             returns (FFN(h2), s2), the residual add fused with the next LN
    Attn(x) = proj(attention(qkv(x))), FFN(x) = fc2(gelu(fc1(x)))

Why: eager training on the fused ops lost to Hugging Face (H200, 2026-11-27: BERT-base bf16
MLM step 27.87 ms against HF sdpa 21.12 and our torch backend 17.4), and the host time per op
accounts for it. Each fused op is a Python autograd Function: forward and backward through
autograd cost 160-242 µs more host time than the PyTorch calls they replace on that machine's
host (the overhead group: add+LN fwd+bwd 503 against 261 µs, attention 563 against 331,
Linear+GELU 419 against 259), ~0.87 ms a layer over four ops, ~10.5 ms over 12 layers: the
whole gap to our torch backend. The step took 47.3 ms on Triton's own launch path against
27.9 on the fast launch, so it is host-bound. GPT-2 (B8 L512) alike: 37.72 ms fused,
26.04 on our torch backend, 30.17 HF sdpa. Here the block's four fused ops and its
four linear layers run under one Function: one autograd node a layer instead of about a dozen
(four of them Python), one set of decisions (backends, seeds), and the backward calls the same
launchers and the same matmuls autograd would, in the order it would, less three ops a block
that autograd's graph forces: the two residual gradients (post-LN: y1's from LN2 and from the
FFN, x's from LN1 and from the qkv GEMM) are added by the dX GEMM itself (beta = 1, on
launchers that take `acc`), and the attention backward writes dq, dk, dv straight into the
(B, T, 3, heads, head dim) layout the qkv GEMM's gradient reads (on launchers that take
`grads`) instead of a stack. And each LN backward sums its dx over the rows from its
partials, beside dweight and dbias (`dx_sum`): the bias gradient of the linear layer before
it (fc2 and proj post-LN, proj pre-LN), where autograd runs a column sum over that gradient.
Per BERT training step (host ops counted offline): 24 adds, 12 stacks and 24 column sums
fewer, 36 allocations fewer; on the device, at B32 L128 bf16, ~90 MB a layer not moved and
~13 MB more read by the two GEMMs: ~20 µs a layer at 4 TB/s, estimated from the bytes, not
timed. Inference takes the same path without the node. The H200 timed the block (before these
three) against the per-op path (the models suite's fuseformer-fused-per-op): docs/models.md.

TransformerBlock (models/layers.py, `_fused_block_call`) decides per call whether its call can
run here (our own module types, no hooks on them, every op resolving to a fused backend, no
torch.compile, no autocast, a KV cache only in a pre-LN block's inference, not packed) and
otherwise takes the per-op path, which computes the same. FUSEFORMER_FUSED_BLOCK=0 (read at
import) or set_enabled(False) turns it off.

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

from ..kernels import _util, backends
from ..kernels._util import device_guard, draw_seed, new_output

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


def plan(x, mask, is_causal, heads, attn_p, p1, p2, intermediate, approximate, backend, grad, keys=None):
    """(mask as (B, heads, T, keys), (attention, LN1, Linear+GELU, LN2) backend names) for
    this call, or None where the per-op path must run it: a mask it refuses (by name), or an op
    that resolves to torch (with its fallback warning there). keys: T, or past + T with a KV
    cache."""
    B, T, C = x.shape
    S = T if keys is None else keys
    # Decided once per key (backends.memo, forgotten with resolve's own decisions). The mask
    # enters by what its broadcast and kind derive from (its leading sizes, which of their
    # strides are 0, whether its last size fits S), never by its values nor by S itself: a
    # decoding step's S grows every step, and the answer does not depend on it.
    if mask is None:
        layout = None
    else:
        shape, stride = mask.shape, mask.stride()
        layout = (mask.dtype, shape[:-1], tuple(st == 0 for st in stride[:-1]), shape[-1] in (S, 1))
    key = ("fused_block", x.shape, x.dtype, x.device, layout, is_causal, heads, attn_p, p1, p2, intermediate,
           approximate, backend, grad)
    names = backends.memo(key, lambda: _names(x, mask, is_causal, heads, attn_p, p1, p2, intermediate, approximate,
                                              backend, grad, S))
    if names is None:
        return None
    return (None if mask is None else mask.expand(B, heads, T, S)), names


def _names(x, mask, is_causal, heads, attn_p, p1, p2, intermediate, approximate, backend, grad, S):
    """plan()'s backend names, or None."""
    B, T, C = x.shape
    if mask is not None and not _attn._broadcasts(mask.shape, (B, heads, T, S)):
        return None
    mask4 = None if mask is None else mask.expand(B, heads, T, S)
    device, dtype = x.device, x.dtype
    na = backends.resolve("attention", device, backend, dtype=dtype, head_dim=C // heads,
                          mask_kind=_attn.mask_kind(mask4), dropout_p=attn_p, requires_grad=grad, is_causal=is_causal,
                          gqa=False, lq_multiple_of_8=T % 8 == 0)
    n1 = backends.resolve("add_layer_norm", device, backend, dtype=dtype, hidden=C, dropout_p=p1, requires_grad=grad)
    n2 = n1 if p2 == p1 else backends.resolve("add_layer_norm", device, backend, dtype=dtype, hidden=C,
                                              dropout_p=p2, requires_grad=grad)
    nl = backends.resolve("linear_gelu", device, backend, dtype=dtype, in_features=C, out_features=intermediate,
                          approximate=approximate, requires_grad=grad)
    if "torch" in (na, n1, n2, nl):
        return None
    return na, n1, nl, n2


def run(x, residual, mask4, params, cfg, names, grad, past_kv=None, use_cache=False):
    """The block on x (B, T, C): through PostLNBlock / PreLNBlock (one autograd node) when
    `grad`, else directly. residual: None for a post-LN block; for a pre-LN one the stream (or
    None in the first block). params: (qkv W, b, proj W, b, LN1 w, b, fc1 W, b, fc2 W, b, LN2 w,
    b), biases may be None; cfg: (prenorm, heads, is_causal, LN1 eps, LN2 eps, attention
    dropout, LN1 dropout, LN2 dropout, approximate); names: plan()'s. past_kv / use_cache
    (pre-LN inference only): the keys and values of earlier tokens, (B, heads, past, head
    dim) each, put before this call's; use_cache also returns them with this call's, as
    (y, stream, (k, v))."""
    if cfg[0]:
        if grad:
            return PreLNBlock.apply(x, residual, mask4, cfg, names, *params)
        out, _, kv = _pre_ln_forward(x, residual, mask4, params, cfg, names, keep=False, past_kv=past_kv)
        return (*out, kv) if use_cache else out
    if grad:
        return PostLNBlock.apply(x, mask4, cfg, names, *params)
    return _post_ln_forward(x, mask4, params, cfg, names, keep=False)[0]


# ----------------------------------------------------------------------------- the two halves
# Each forward returns what its backward reads; the per-op path's calls in its order, seeds
# drawn in the same order from torch's generator (so dropout draws the same masks).


def _attention_forward(x, mask4, params, cfg, na, keep, past_kv=None):
    """proj(attention(qkv(x))) -> (a, saved, (k, v)); nothing saved without `keep` (inference
    frees qkv and the attention output here, as the per-op path does); k, v after past_kv's."""
    wqkv, bqkv, wo, bo = params[:4]
    heads, is_causal, pa = cfg[1], cfg[2], cfg[5]
    B, T, C = x.shape
    qkv = _linear(x, wqkv, bqkv)
    q, k, v = qkv.view(B, T, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if past_kv is not None:
        k = torch.cat([past_kv[0], k], dim=2)  # (B, heads, past + T, head dim), as the per-op path
        v = torch.cat([past_kv[1], v], dim=2)
    seed = _attn._draw_seed(pa, x.device)
    with device_guard(x):
        att, lse = backends.get_impl("attention", na).forward(q, k, v, mask4, is_causal, 1.0 / math.sqrt(C // heads),
                                                              pa, seed)
    a_in = att.transpose(1, 2).reshape(B, T, C)
    return _linear(a_in, wo, bo), ((q, k, v, att, lse, seed, a_in) if keep else ()), (k, v)


def _attention_backward(da, x, saved, mask4, wqkv, wo, cfg, na, need, acc=None):
    """(dx, dWqkv, dbqkv, dWo, dbo); need: which of (x, Wqkv, bqkv, Wo, bo) want one. acc
    (x's shape, or None): a gradient of x from elsewhere, added to dx in its GEMM."""
    q, k, v, att, lse, seed, a_in = saved
    heads, is_causal, pa = cfg[1], cfg[2], cfg[5]
    B, T, C = x.shape
    da2 = da.reshape(-1, C)
    da_in, dwo, dbo = _util.linear_grads(da2, a_in.reshape(-1, C), wo, True, need[3], need[4])
    datt = da_in.view(B, T, heads, C // heads).transpose(1, 2)
    impl = backends.get_impl("attention", na)
    args = (datt, q, k, v, att, lse, mask4, is_causal, 1.0 / math.sqrt(C // heads), pa, seed)
    # The three gradients in the (B, T, 3, heads, head dim) layout of qkv's output: written
    # there by a launcher that can (no stack: one copy of 3 (B, T, C) tensors less a block).
    if "grads" in impl.backward_extras:
        dqkv = new_output((B, T, 3, heads, C // heads), x.dtype, x.device)
        with device_guard(x):
            # (B, heads, T, D) views, as the forward takes q, k, v: a permute and an unbind,
            # ~2 µs less than an unbind and three transposes.
            impl.backward(*args, grads=dqkv.permute(2, 0, 3, 1, 4).unbind(0))
        dqkv = dqkv.view(-1, 3 * C)
    else:
        with device_guard(x):
            dq, dk, dv = impl.backward(*args)
        dqkv = torch.stack((dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)), dim=2).view(-1, 3 * C)
    dx, dwqkv, dbqkv = _util.linear_grads(dqkv, x.reshape(-1, C), wqkv, need[0], need[1], need[2],
                                     None if acc is None else acc.reshape(-1, C))
    return (None if dx is None else dx.view(B, T, C)), dwqkv, dbqkv, dwo, dbo


def _ffn_forward(h, params, cfg, nl, keep):
    """fc2(gelu(fc1(h))) -> (f, saved): pre stored where the per-op path stores it."""
    w1, c1, w2, c2 = params[6:10]
    g, pre = _lg._run_forward(nl, h, w1, c1, cfg[8], keep and _lg._save_preact(nl))
    return _linear(g, w2, c2), ((pre, g) if keep else ())


def _ffn_backward(df, h, saved, w1, c1, w2, cfg, nl, need, acc=None):
    """(dh, dW1, dc1, dW2, dc2); need: which of (W2, c2) want one (the launcher's backward
    gives fc1's always). acc (h's shape, or None): a gradient of h from elsewhere, added to
    dh (in fc1's dX GEMM where the launcher can)."""
    pre, g = saved
    dg, dw2, dc2 = _util.linear_grads(df.reshape(-1, df.shape[-1]), g.reshape(-1, g.shape[-1]), w2, True, need[0],
                                      need[1])
    # pre stored, or recomputed from the bias (as LinearGeluFunction keeps one or the other)
    dh, dw1, dc1 = _lg._run_backward(nl, dg.view(size=g.shape), h, w1, pre, cfg[8], c1 is not None,
                                     None if pre is not None else c1, acc)
    return dh, dw1, dc1, dw2, dc2


# The blocks' linear layers go through _linear, their gradients through kernels/_util.py's
# linear_grads (bench/offline.py's empty_linears replaces both on a CPU, where a GEMM would
# dominate a host-time measurement).
def _linear(x, weight, bias):
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- post-LN


def _post_ln_forward(x, mask4, params, cfg, names, keep):
    g1, b1, g2, b2 = params[4], params[5], params[10], params[11]
    eps1, eps2, p1, p2 = cfg[3], cfg[4], cfg[6], cfg[7]
    na, n1, nl, n2 = names
    a, sa, _ = _attention_forward(x, mask4, params, cfg, na, keep)
    seed1 = draw_seed(x.device) if p1 > 0.0 else None
    # keep: the stream (x + dropout(a)) and the statistics the backward reads, as the per-op
    # path's autograd Function keeps them; inference writes neither.
    y1, s1, m1, r1 = _aln._run_forward(n1, a, x, g1, b1, eps1, p1, seed1, keep, keep)
    f, sf = _ffn_forward(y1, params, cfg, nl, keep)
    seed2 = draw_seed(x.device) if p2 > 0.0 else None
    y, s2, m2, r2 = _aln._run_forward(n2, f, y1, g2, b2, eps2, p2, seed2, keep, keep)
    return y, (x, mask4, *sa, s1, m1, r1, seed1, y1, *sf, s2, m2, r2, seed2)


def _ln_backward(name, dy, ds, stream, w, b, mean, rstd, p, seed, has_residual, bias_before, needed):
    """An LN's backward (d x, d residual, dw, db, d bias_before): its dx is the gradient of
    the output of the linear layer before it, whose bias gradient is dx summed over the rows,
    summed by the LN backward from its partials (kernels/add_layer_norm.py's dx_sum) where
    that bias wants a gradient (`needed`), else None."""
    dtype = bias_before.dtype if needed and bias_before is not None else None
    out = _aln._run_backward_both(name, dy, ds, stream, w, b, mean, rstd, p, seed, has_residual, dtype)
    return out if dtype is not None else (*out, None)


class PostLNBlock(torch.autograd.Function):
    """A post-LN block's autograd node; its backward is the per-op path's, op by op, but
    for the residual adds done in the dX GEMMs, dq/dk/dv written in place and the bias
    gradients of fc2 and proj summed by the LN backwards (module docstring)."""

    @staticmethod
    def forward(ctx, x, mask4, cfg, names, *params):
        y, saved = _post_ln_forward(x, mask4, params, cfg, names, keep=True)
        ctx.save_for_backward(*saved, *params)
        ctx.cfg, ctx.names = cfg, names
        return y

    @staticmethod
    @once_differentiable  # the launchers' gradients have no graph: a double backward raises
    def backward(ctx, dy):
        t = ctx.saved_tensors
        x, mask4, sa, (s1, m1, r1, seed1, y1), sf, (s2, m2, r2, seed2) = t[0], t[1], t[2:9], t[9:14], t[14:16], t[16:20]
        wqkv, _, wo, bo, g1, b1, w1, c1, w2, c2, g2, b2 = t[20:]
        cfg, (na, n1, nl, n2) = ctx.cfg, ctx.names
        need = ctx.needs_input_grad[4:]  # per parameter, in run()'s order
        p1, p2 = cfg[6], cfg[7]
        # Each LN's dx is the gradient of the linear layer before it (fc2, proj): the LN
        # backward gives that layer's bias gradient too.
        df, dy1, dg2, db2, dc2 = _ln_backward(n2, dy, None, s2, g2, b2, m2, r2, p2, seed2, True, c2, need[9])
        # y1 feeds LN2's residual and the FFN: dy1 + dh, the add in fc1's dX GEMM.
        dy1, dw1, dc1, dw2, _ = _ffn_backward(df, y1, sf, w1, c1, w2, cfg, nl, (need[8], False), acc=dy1)
        da, dx, dg1, db1, dbo = _ln_backward(n1, dy1, None, s1, g1, b1, m1, r1, p1, seed1, True, bo, need[3])
        # x feeds LN1's residual and the qkv GEMM: the two gradients summed in that GEMM.
        dx, dwqkv, dbqkv, dwo, _ = _attention_backward(da, x, sa, mask4, wqkv, wo, cfg, na,
                                                       (ctx.needs_input_grad[0], *need[:3], False), acc=dx)
        return (dx, None, None, None, dwqkv, dbqkv, dwo, dbo, dg1, db1, dw1, dc1, dw2, dc2, dg2, db2)


# ----------------------------------------------------------------------------- pre-LN


def _pre_ln_forward(x, residual, mask4, params, cfg, names, keep, past_kv=None):
    g1, b1, g2, b2 = params[4], params[5], params[10], params[11]
    eps1, eps2, p1, p2 = cfg[3], cfg[4], cfg[6], cfg[7]
    na, n1, nl, n2 = names
    seed1 = draw_seed(x.device) if p1 > 0.0 else None
    # prenorm: the stream is an output; the statistics only when the backward needs them.
    h, s1, m1, r1 = _aln._run_forward(n1, x, residual, g1, b1, eps1, p1, seed1, True, keep)
    a, sa, kv = _attention_forward(h, mask4, params, cfg, na, keep, past_kv)
    seed2 = draw_seed(x.device) if p2 > 0.0 else None
    h2, s2, m2, r2 = _aln._run_forward(n2, a, s1, g2, b2, eps2, p2, seed2, True, keep)
    y, sf = _ffn_forward(h2, params, cfg, nl, keep)
    return (y, s2), (h, s1, m1, r1, seed1, *sa, h2, s2, m2, r2, seed2, mask4, *sf), kv


class PreLNBlock(torch.autograd.Function):
    """A pre-LN block's autograd node (outputs: the FFN's output and the residual stream)."""

    @staticmethod
    def forward(ctx, x, residual, mask4, cfg, names, *params):
        out, saved, _ = _pre_ln_forward(x, residual, mask4, params, cfg, names, keep=True)
        ctx.save_for_backward(*saved, *params)
        ctx.cfg, ctx.names, ctx.has_residual = cfg, names, residual is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, ds2):
        t = ctx.saved_tensors
        (h, s1, m1, r1, seed1), sa, (h2, s2, m2, r2, seed2, mask4), sf = t[0:5], t[5:12], t[12:18], t[18:20]
        wqkv, _, wo, bo, g1, b1, w1, c1, w2, _, g2, b2 = t[20:]
        cfg, (na, n1, nl, n2) = ctx.cfg, ctx.names
        need = ctx.needs_input_grad[5:]
        p1, p2 = cfg[6], cfg[7]
        dh2, dw1, dc1, dw2, dc2 = _ffn_backward(dy, h2, sf, w1, c1, w2, cfg, nl, need[8:10])
        # LN2's dx is the gradient of proj's output: proj's bias gradient from the LN backward.
        da, ds1, dg2, db2, dbo = _ln_backward(n2, dh2, ds2, s2, g2, b2, m2, r2, p2, seed2, True, bo, need[3])
        dh, dwqkv, dbqkv, dwo, _ = _attention_backward(da, h, sa, mask4, wqkv, wo, cfg, na, (True, *need[:3], False))
        dx, dres, dg1, db1 = _aln._run_backward_both(n1, dh, ds1, s1, g1, b1, m1, r1, p1, seed1, ctx.has_residual)
        return (dx, dres, None, None, None, dwqkv, dbqkv, dwo, dbo, dg1, db1, dw1, dc1, dw2, dc2, dg2, db2)
