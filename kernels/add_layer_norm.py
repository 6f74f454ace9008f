"""Fused residual add + dropout + LayerNorm in Triton, forward and backward.

    stream = residual + dropout(x)              (residual optional)
    y      = (stream - mean) * rstd * weight + bias   over the last dim, statistics in fp32

Launcher contract (the "cuda" backend registers launchers with exactly these signatures),
all tensors 2-D contiguous (M, N), mean/rstd float32 (M,):

    forward(x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True)
        -> (y, stream or None, mean or None, rstd or None)
        residual/weight/bias may be None; seed is an int64 tensor of 1 element (None when
        dropout_p == 0); stream (dtype of x) is written only when save_stream is True, and
        mean/rstd only when save_stats is True (a launcher may return them regardless).
    backward(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual)
        -> (dx, dresidual or None, dweight or None, dbias or None)
        `stream` is the saved LayerNorm input (x itself when there is neither a residual
        nor dropout); dstream is the gradient flowing into the prenorm output, or None.
    unsupported(dtype, hidden, dropout_p, requires_grad) -> None or a reason string.

Gradient maths (xhat = (s - mean) * rstd, g = dy * weight, means over the row of N):

    ds        = rstd * (g - mean(g * xhat) * xhat - mean(g)) + dstream
    dresidual = ds
    dx        = ds * keep / (1 - p)          keep regenerated from the seed
    dweight   = sum over rows of dy * xhat,  dbias = sum over rows of dy

dweight/dbias are reduced in two steps: each backward program accumulates fp32 partial sums
over its rows, then one torch sum over the (programs, N) partials.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import backends, reference
from ._util import as_rows, cdiv, device_guard, draw_seed, new_output, next_pow2, sm_count
from .backends import Impl
from .checks import check_prob, check_same, check_tensor, same_floats

# Widest row kept in registers in one piece; wider rows are processed in chunks of this
# size with extra passes over memory. 16384 fp32 values over 16 warps is 32 per thread.
MAX_FUSED_BLOCK = 16384


@triton.jit
def _keep(seed, row, cols, dropout_p):
    # Per-row Philox key (seed + row) and counter = column: int32 counters stay valid for
    # any M * N, and forward, backward and dropout_mask() all draw the very same bits.
    return tl.rand(seed + row, cols) >= dropout_p


@triton.jit
def _mul_rounded(a, b):
    # g = dy * w feeds both mean(g) and the elementwise g - mean(g). On a GPU, LLVM contracts
    # a plain product into the subtraction (an fma with the unrounded product), so the two
    # disagree by half an ulp of g; times rstd (1/sqrt(eps) ~ 316 for a constant row, e.g.
    # hidden 1) that left dx ~3e-5 where the exact answer is 0. An fma with a +0.0 addend
    # rounds the product once and is not folded back into a multiply.
    return tl.fma(a, b, 0.0)


@triton.jit
def _load_stream_chunk(X, RES, seed, row, row_off, cols, mask, dropout_p, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr):
    s = tl.load(X + row_off + cols, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        s = tl.where(_keep(seed, row, cols, dropout_p), s / (1.0 - dropout_p), 0.0)
    if HAS_RES:
        s += tl.load(RES + row_off + cols, mask=mask, other=0.0).to(tl.float32)
    # Round to the stream's dtype, as the reference does: the statistics must describe the
    # stream the backward reads back, or xhat there disagrees with the forward's mean/rstd.
    return s.to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _add_ln_fwd(
    X,  # (M, N) branch input, dropped out
    RES,  # (M, N) residual, unused without HAS_RES
    W,  # (N,) weight, unused without HAS_W
    B,  # (N,) bias, unused without HAS_B
    Y,  # (M, N) output
    STREAM,  # (M, N) residual + dropout(x), written only with SAVE_STREAM
    MEAN,  # (M,) float32
    RSTD,  # (M,) float32
    SEED,  # int64[1] Philox seed, read only with DROPOUT
    N,  # row length
    eps,
    dropout_p,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DROPOUT: tl.constexpr,
    SAVE_STREAM: tl.constexpr,
    SAVE_STATS: tl.constexpr,  # write MEAN/RSTD (the backward needs them; inference does not)
    BLOCK: tl.constexpr,  # next_pow2(N) when the row fits, else the chunk size
    SINGLE: tl.constexpr,  # the whole row fits in one BLOCK
):
    row = tl.program_id(0)
    row_off = tl.cast(row, tl.int64) * N
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        mask = cols < N
        s = _load_stream_chunk(X, RES, seed, row, row_off, cols, mask, dropout_p, HAS_RES, DROPOUT)
        if SAVE_STREAM:
            tl.store(STREAM + row_off + cols, s.to(STREAM.dtype.element_ty), mask=mask)
        mean = tl.sum(s, axis=0) / N
        d = tl.where(mask, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        y = d * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row_off + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Three passes (mean, variance, normalise) rather than E[x^2] - mean^2, whose
        # cancellation in fp32 loses the variance of rows with a large mean.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, c < N, dropout_p, HAS_RES, DROPOUT)
            if SAVE_STREAM:
                tl.store(STREAM + row_off + c, s.to(STREAM.dtype.element_ty), mask=c < N)
            acc += s
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, c < N, dropout_p, HAS_RES, DROPOUT)
            d = tl.where(c < N, s - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, c < N, dropout_p, HAS_RES, DROPOUT)
            y = (s - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=c < N, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=c < N, other=0.0).to(tl.float32)
            tl.store(Y + row_off + c, y.to(Y.dtype.element_ty), mask=c < N)
    if SAVE_STATS:
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)


@triton.jit
def _add_ln_bwd(
    DY,  # (M, N) gradient of y
    DSTREAM,  # (M, N) gradient of the prenorm stream output, read only with HAS_DSTREAM
    STREAM,  # (M, N) LayerNorm input saved by the forward
    W,  # (N,) weight
    MEAN,  # (M,) float32
    RSTD,  # (M,) float32
    SEED,  # int64[1], read only with DROPOUT
    DX,  # (M, N) gradient of x
    DRES,  # (M, N) gradient of the residual, written only with HAS_RES
    DW_PART,  # (programs, N) float32 partial sums of dy * xhat
    DB_PART,  # (programs, N) float32 partial sums of dy
    M,
    N,
    dropout_p,
    HAS_DSTREAM: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK)
    part_off = pid.to(tl.int64) * N
    if SINGLE:
        mask = cols < N
        w = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, M, programs):
            row_off = tl.cast(row, tl.int64) * N
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            s = tl.load(STREAM + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (s - mean) * rstd, 0.0)
            g = _mul_rounded(dy, w)
            c1 = tl.sum(g * xhat, axis=0) / N
            c2 = tl.sum(g, axis=0) / N
            ds = (g - (xhat * c1 + c2)) * rstd
            if HAS_DSTREAM:
                ds += tl.load(DSTREAM + row_off + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RES:
                tl.store(DRES + row_off + cols, ds.to(DRES.dtype.element_ty), mask=mask)
            if DROPOUT:
                ds = tl.where(_keep(seed, row, cols, dropout_p), ds / (1.0 - dropout_p), 0.0)
            tl.store(DX + row_off + cols, ds.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
        if HAS_W:
            tl.store(DW_PART + part_off + cols, dw_acc, mask=mask)
        if HAS_B:
            tl.store(DB_PART + part_off + cols, db_acc, mask=mask)
    else:
        # Wide rows: one pass for the two row means, a second for the gradients. The
        # partial-sum rows start at zero (host side) and each belongs to one program only.
        for row in range(pid, M, programs):
            row_off = tl.cast(row, tl.int64) * N
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            acc1 = tl.zeros([BLOCK], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                c = start + cols
                m = c < N
                s = tl.load(STREAM + row_off + c, mask=m, other=0.0).to(tl.float32)
                g = tl.load(DY + row_off + c, mask=m, other=0.0).to(tl.float32)
                if HAS_W:
                    g = _mul_rounded(g, tl.load(W + c, mask=m, other=0.0).to(tl.float32))
                acc1 += g * tl.where(m, (s - mean) * rstd, 0.0)
                acc2 += g
            c1 = tl.sum(acc1, axis=0) / N
            c2 = tl.sum(acc2, axis=0) / N
            for start in range(0, N, BLOCK):
                c = start + cols
                m = c < N
                s = tl.load(STREAM + row_off + c, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row_off + c, mask=m, other=0.0).to(tl.float32)
                xhat = tl.where(m, (s - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = _mul_rounded(dy, tl.load(W + c, mask=m, other=0.0).to(tl.float32))
                ds = (g - (xhat * c1 + c2)) * rstd
                if HAS_DSTREAM:
                    ds += tl.load(DSTREAM + row_off + c, mask=m, other=0.0).to(tl.float32)
                if HAS_RES:
                    tl.store(DRES + row_off + c, ds.to(DRES.dtype.element_ty), mask=m)
                if DROPOUT:
                    ds = tl.where(_keep(seed, row, c, dropout_p), ds / (1.0 - dropout_p), 0.0)
                tl.store(DX + row_off + c, ds.to(DX.dtype.element_ty), mask=m)
                if HAS_W:
                    p = tl.load(DW_PART + part_off + c, mask=m, other=0.0)
                    tl.store(DW_PART + part_off + c, p + dy * xhat, mask=m)
                if HAS_B:
                    p = tl.load(DB_PART + part_off + c, mask=m, other=0.0)
                    tl.store(DB_PART + part_off + c, p + dy, mask=m)


@triton.jit
def _keep_mask_kernel(SEED, OUT, N, dropout_p, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(SEED), row, cols, dropout_p)
    tl.store(OUT + row.to(tl.int64) * N + cols, keep.to(tl.int8), mask=cols < N)


# ----------------------------------------------------------------------------- launchers


def _block(N: int) -> tuple[int, bool]:
    block = next_pow2(N)
    if block <= MAX_FUSED_BLOCK:
        return block, True
    return MAX_FUSED_BLOCK, False


def _num_warps(block: int) -> int:
    # A rule, not an autotuner (as Triton's tutorial 05): one warp per 256 elements of the
    # row, 8 fp32 values per thread (two 16-byte vectors), 1..16 warps. That stays inside 4..64
    # elements per thread, where nothing spills (one warp over 16384 spilled ~26 KB).
    return min(16, max(1, block // 256))


def _backward_programs(M: int, device: torch.device) -> int:
    if backends.interpreting() or device.type != "cuda":
        # Under the interpreter a program is as costly as a loop iteration: a few suffice.
        return max(1, min(M, 4))
    # A few programs per SM, each summing many rows, keeps the partial buffers small.
    return max(1, min(M, 4 * sm_count(device)))


# An absent tensor is passed as some other valid tensor: its constexpr flag keeps the kernel
# from ever reading it, and Triton needs a pointer in that slot.


def forward(x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True):
    M, N = x.shape
    y = new_output((M, N), x.dtype, x.device)
    stream = new_output((M, N), x.dtype, x.device) if save_stream else None
    # Two allocations fewer per inference call: only the backward reads the statistics.
    mean = new_output((M,), torch.float32, x.device) if save_stats else None
    rstd = new_output((M,), torch.float32, x.device) if save_stats else None
    if M == 0 or N == 0:
        return y, stream, None if mean is None else mean.zero_(), None if rstd is None else rstd.zero_()
    block, single = _block(N)
    dropout = dropout_p > 0.0
    _add_ln_fwd[(M,)](
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        y,
        stream if stream is not None else y,
        mean if save_stats else y,
        rstd if save_stats else y,
        seed if dropout else y,
        N,
        float(eps),
        float(dropout_p),
        HAS_RES=residual is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        DROPOUT=dropout,
        SAVE_STREAM=stream is not None,
        SAVE_STATS=save_stats,
        BLOCK=block,
        SINGLE=single,
        num_warps=_num_warps(block),
    )
    return y, stream, mean, rstd


def backward(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual):
    M, N = dy.shape
    dx = new_output((M, N), stream.dtype, dy.device)
    dres = new_output((M, N), stream.dtype, dy.device) if has_residual else None
    if M == 0 or N == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        return dx, dres, dw, db
    block, single = _block(N)
    programs = _backward_programs(M, dy.device)
    alloc = new_output if single else (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    dw_part = alloc((programs, N), torch.float32, dy.device) if weight is not None else None
    db_part = alloc((programs, N), torch.float32, dy.device) if bias is not None else None
    dropout = dropout_p > 0.0
    _add_ln_bwd[(programs,)](
        dy,
        dstream if dstream is not None else dy,
        stream,
        weight if weight is not None else dy,
        mean,
        rstd,
        seed if dropout else mean,
        dx,
        dres if dres is not None else dx,
        dw_part if dw_part is not None else mean,
        db_part if db_part is not None else mean,
        M,
        N,
        float(dropout_p),
        HAS_DSTREAM=dstream is not None,
        HAS_RES=has_residual,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        DROPOUT=dropout,
        BLOCK=block,
        SINGLE=single,
        num_warps=_num_warps(block),
    )
    dw = None if weight is None else dw_part.sum(0).to(weight.dtype)
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dres, dw, db


def unsupported(dtype=None, hidden=None, dropout_p=0.0, requires_grad=False, **_):
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the kernels take float16, bfloat16, float32)"
    return None


backends.register_impl("add_layer_norm", "triton", Impl(forward, backward, unsupported))


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep-mask (True = keep) the kernels draw for `seed` over an input of `shape`.

    Built by the same Triton code the kernels use, so tests can hand it to the reference.
    """
    N = shape[-1] if len(shape) else 1
    M = 1
    for d in shape[:-1]:
        M *= d
    out = torch.empty((M, N), dtype=torch.int8, device=seed.device)
    if M and N:
        block = min(next_pow2(N), 4096)
        _keep_mask_kernel[(M, cdiv(N, block))](seed, out, N, float(dropout_p), BLOCK=block)
    return out.bool().reshape(shape)


# ----------------------------------------------------------------------------- shared by both paths


def _run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True):
    """The launcher of `backend` on (rows, N) views; outputs back in x's shape."""
    shape = x.shape
    # The kernels address rows as row * N: one contiguous copy of a strided view costs one
    # pass over memory, cheaper than strided (uncoalesced) loads in every pass that follows.
    x2 = as_rows(x).contiguous()
    r2 = None if residual is None else as_rows(residual).contiguous()
    with device_guard(x):
        y, stream, mean, rstd = backends.get_impl("add_layer_norm", backend).forward(
            x2, r2, weight, bias, eps, dropout_p, seed, save_stream, save_stats
        )
    return y.view(shape), None if stream is None else stream.view(shape), mean, rstd


def _run_backward(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual):
    shape = stream.shape
    ds2 = None if dstream is None else as_rows(dstream).contiguous()
    with device_guard(dy):
        dx, dres, dw, db = backends.get_impl("add_layer_norm", backend).backward(
            as_rows(dy).contiguous(), ds2, as_rows(stream).contiguous(), weight, bias, mean, rstd, dropout_p, seed,
            has_residual,
        )
    return dx.view(shape), None if dres is None else dres.view(shape), dw, db


# ----------------------------------------------------------------------------- eager path


class AddLayerNormFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly, no dispatcher in between."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, prenorm, backend):
        seed = draw_seed(x.device) if dropout_p > 0.0 else None
        # Without a residual or dropout the LayerNorm input is x itself: nothing to write.
        save_stream = prenorm or residual is not None or dropout_p > 0.0
        y, stream, mean, rstd = _run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, save_stream)
        ctx.save_for_backward(stream if save_stream else x, weight, bias, mean, rstd, seed)
        ctx.dropout_p, ctx.has_residual, ctx.prenorm, ctx.backend = dropout_p, residual is not None, prenorm, backend
        return (y, stream) if prenorm else y

    @staticmethod
    def backward(ctx, dy, dstream=None):
        stream, weight, bias, mean, rstd, seed = ctx.saved_tensors
        dx, dres, dw, db = _run_backward(
            ctx.backend, dy, dstream if ctx.prenorm else None, stream, weight, bias, mean, rstd, ctx.dropout_p, seed,
            ctx.has_residual,
        )
        return dx, dres, dw, db, None, None, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.
# Ops return tensors only, so an absent output is a 0-element tensor.


@torch.library.custom_op("fuseformer::add_layer_norm", mutates_args=())
def _add_ln_op(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    save_stream: bool,
    prenorm: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, stream, mean, rstd = _run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, save_stream)
    return y, stream if stream is not None else x.new_empty(0), mean, rstd


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, save_stream, prenorm, backend):
    M = as_rows(x).shape[0]
    stream = torch.empty_like(x) if save_stream else x.new_empty(0)
    return torch.empty_like(x), stream, x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("fuseformer::add_layer_norm_backward", mutates_args=())
def _add_ln_bwd_op(
    dy: torch.Tensor,
    dstream: Optional[torch.Tensor],
    stream: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    has_residual: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dres, dw, db = _run_backward(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed,
                                     has_residual)
    # Distinct empty tensors: outputs of a custom op may not alias one another.
    empty = dy.new_empty
    return dx, dres if dres is not None else empty(0), dw if dw is not None else empty(0), db if db is not None else empty(0)


@_add_ln_bwd_op.register_fake
def _(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual, backend):
    return (
        torch.empty_like(stream),
        torch.empty_like(stream) if has_residual else dy.new_empty(0),
        torch.empty_like(weight) if weight is not None else dy.new_empty(0),
        torch.empty_like(bias) if bias is not None else dy.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, save_stream, prenorm, backend = inputs
    _, stream, mean, rstd = output
    if not save_stream and (residual is not None or dropout_p > 0.0):
        raise RuntimeError("add_layer_norm: gradients need the stream saved (call it with save_stream=True)")
    ctx.save_for_backward(stream if save_stream else x, weight, bias, mean, rstd, seed)
    ctx.dropout_p, ctx.has_residual, ctx.prenorm, ctx.backend = dropout_p, residual is not None, prenorm, backend


def _backward(ctx, dy, dstream, dmean, drstd):
    stream, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dx, dres, dw, db = _add_ln_bwd_op(
        dy, dstream if ctx.prenorm else None, stream, weight, bias, mean, rstd, ctx.dropout_p, seed, ctx.has_residual,
        ctx.backend,
    )
    return (dx, dres if ctx.has_residual else None, dw if weight is not None else None,
            db if bias is not None else None, None, None, None, None, None, None)


_add_ln_op.register_autograd(_backward, setup_context=_setup_context)


def _compiled(x, residual, weight, bias, eps, dropout_p, prenorm, requires_grad, backend):
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    save_stream = prenorm or (requires_grad and (residual is not None or dropout_p > 0.0))
    y, stream, _, _ = _add_ln_op(x, residual, weight, bias, eps, dropout_p, seed, save_stream, prenorm, backend)
    return (y, stream) if prenorm else y


# ----------------------------------------------------------------------------- public op


def _check(x, residual, weight, bias, eps, dropout_p):
    if not (same_floats(x, residual, weight, bias) and x.dim() >= 1):
        check_tensor("x", x, min_dim=1)
        for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
            if t is not None:
                check_tensor(name, t)
                check_same(name, t, "x", x)
    N = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (the last dim of x), got {tuple(t.shape)}")
    if eps.__class__ is not float and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return check_prob("dropout_p", dropout_p)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, prenorm=False, *, backend=None):
    """y = layer_norm(residual + dropout(x)) over the last dim (docs/design.md).

    residual, weight and bias may each be None. With prenorm=True returns
    (y, residual + dropout(x)), the pre-LN block's new residual stream.
    """
    dropout_p = _check(x, residual, weight, bias, eps, dropout_p)
    requires_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    name = backends.resolve(
        "add_layer_norm", x.device, backend, dtype=x.dtype, hidden=x.shape[-1], dropout_p=dropout_p,
        requires_grad=requires_grad,
    )
    if name == "torch":
        return reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p, prenorm)
    eps = float(eps)
    if torch.compiler.is_compiling():
        return _compiled(x, residual, weight, bias, eps, dropout_p, prenorm, requires_grad, name)
    if requires_grad:
        return AddLayerNormFunction.apply(x, residual, weight, bias, eps, dropout_p, prenorm, name)
    # Inference: no autograd node, no statistics kept beyond the launch.
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    y, stream, _, _ = _run_forward(name, x, residual, weight, bias, eps, dropout_p, seed, prenorm, False)
    return (y, stream) if prenorm else y
