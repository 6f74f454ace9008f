"""The Triton kernels of cross_entropy (launchers and autograd: kernels/cross_entropy.py).

Over rows x_i of V class scores (the last dim of the logits) with labels y_i, in fp32:

    lse_i  = log sum_j exp(x_ij)
    loss_i = lse_i - x_i[y_i]                          0 where y_i == ignore_index
    dx_ij  = g_i * (exp(x_ij - lse_i) - [j == y_i])    0 where y_i == ignore_index

g_i is the gradient reaching loss_i: grad_out / (rows counted) for the mean, grad_out for the
sum, grad_out[i] for reduction "none".

- `_ce_fwd`: one program per row, walking its V scores in chunks of BLOCK with a running max
  and a running sum rescaled to it (the one-pass form of the softmax's two reductions): one
  read of the logits. It writes loss_i and keeps lse_i for the backward (4 bytes a row).

What the kernels keep between them lives in one fp32 buffer AUX, addressed by offsets rather
than passed as views of it (a view costs the host ~0.7 µs a call; the launcher makes none):
    AUX[0 : M]        lse_i
    AUX[M : M + 2]    the count of rows not ignored, and the labels' check flag
    AUX[M + 2 : ...]  loss_i, where the loss is reduced (LOSS is AUX, loss_at M + 2; for
                      reduction "none" LOSS is the returned loss itself, loss_at 0)
- `_ce_reduce`: one program over the M rows' losses and labels, in a fixed order
  (deterministic): the sum (or the mean over the counted rows), the count the backward
  divides by, and whether every label names a class or is ignored. One launch where torch
  ops took ~8 (compares, combine, count, sum, divide) of host time each. For a small
  problem (ROWS_V: a classification head's few rows of few classes) it computes the rows'
  losses and lse itself, tiles of whole rows, and _ce_fwd is not launched: one launch a
  forward, not two (each costs the host a launch; one program reads a few KB in
  microseconds).
- `_ce_bwd`: one program per (row, chunk of BLOCK scores): reads the chunk and lse_i, writes
  the chunk's gradient in the logits' dtype. An ignored row's programs write zeros without
  reading anything (a masked-LM batch ignores ~85% of its rows).

A labelled row therefore costs two reads of its logits and one write of its gradient, where
F.cross_entropy on fp32-upcast logits (the models' path before: half-precision
log-probabilities cost ~1e-2 of accuracy in the loss) wrote and read fp32 copies, its
log-probabilities and their gradient: ~10x the bytes.

Labels outside [0, V) (other than ignore_index) are masked out of the loads, so memory stays
safe; `_ce_reduce` flags any outside [0, C) (C = V, or the real classes of padded logits): a
device-side assert where the kernel is compiled, and a flag the launcher raises on (CPU).
"""
import math

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = 2^(x LOG2E): ex2 is the hardware's
LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _ce_fwd(
    X,  # (M, V) logits, any strides
    Y,  # (M,) labels, int64 or int32
    LOSS,  # fp32 out at loss_at + row: loss_i (0 for an ignored row)
    AUX,  # fp32 out at row: logsumexp of the row (0 for an ignored row)
    V,  # scores per row (the last dim of the logits)
    stride_xm,
    stride_xv,
    stride_y,
    ignore_index,
    loss_at,
    BLOCK: tl.constexpr,  # scores per step of the row walk
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(Y + row * stride_y).to(tl.int64)
    LOSS += loss_at
    if label == ignore_index:
        tl.store(LOSS + row, 0.0)
        tl.store(AUX + row, 0.0)
    else:
        x_row = X + row * stride_xm
        cols = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            c = start + cols
            # int64: c * stride_xv passes 2^31 for a transposed view of large logits.
            x = tl.load(x_row + c.to(tl.int64) * stride_xv, mask=c < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            # While every score so far is -inf, so is m_new: shift by 0 instead, so that the
            # exponentials are 0, not exp(-inf - -inf) = nan.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2((m - shift) * LOG2E) + tl.sum(tl.exp2((x - shift) * LOG2E), 0)
            m = m_new
        lse = m + tl.log2(s) * LN2
        picked = tl.load(x_row + label * stride_xv, mask=(label >= 0) & (label < V), other=0.0).to(tl.float32)
        tl.store(LOSS + row, lse - picked)
        tl.store(AUX + row, lse)


# debug=True compiles its tl.device_assert (Triton drops them otherwise); nothing else in this
# kernel is one.
@triton.jit(debug=True)
def _ce_reduce(
    LOSS,  # fp32 at loss_at: each row's loss (read when REDUCE, written with ROWS_V)
    Y,  # (M,) labels
    OUT,  # () fp32 out: the sum, or the mean over the counted rows (MEAN); unwritten for "none"
    AUX,  # fp32 out at M, M + 1: the count of rows whose label is not ignore_index, and 1.0
    #       when every label is in [0, C) or ignored, else 0.0; with ROWS_V at row: lse_i
    X,  # (M, V) logits, any strides: read only with ROWS_V
    M,
    C,  # classes a label may name: V, or fewer where the logits' extra columns are padding
    stride_y,
    ignore_index,
    loss_at,
    V,
    stride_xm,
    stride_xv,
    BLOCK: tl.constexpr,  # rows per step
    REDUCE: tl.constexpr,  # write OUT (reductions "mean" and "sum")
    MEAN: tl.constexpr,
    CHECK: tl.constexpr,  # a device-side assert on the labels too (compiled kernels; the
    #                       interpreter's would raise an AssertionError before the host's check)
    ROWS_V: tl.constexpr,  # 0: _ce_fwd made the rows' losses; else next_pow2(V): a small
    #                        problem, whose rows this program computes itself (one launch)
):
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    bad = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, M, BLOCK):
        r = start + offs
        inside = r < M
        y = tl.load(Y + r.to(tl.int64) * stride_y, mask=inside, other=ignore_index).to(tl.int64)
        counted = inside & (y != ignore_index)
        bad += (counted & ((y < 0) | (y >= C))).to(tl.int32)
        count += counted.to(tl.int32)
        if ROWS_V > 0:
            # _ce_fwd's maths on a (BLOCK, ROWS_V) tile of whole rows: max, then the sum of
            # exponentials shifted by it (0 where every score is -inf, so no nan), lse, and
            # the label's score; an ignored row's loss and lse are 0.
            cols = tl.arange(0, ROWS_V)
            x_rows = X + r.to(tl.int64)[:, None] * stride_xm
            x = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xv, mask=counted[:, None] & (cols < V)[None, :],
                        other=float("-inf")).to(tl.float32)
            m = tl.max(x, 1)
            shift = tl.where(m == float("-inf"), 0.0, m)
            # (An uncounted row's sum is 0: log2 of 1 instead, no -inf to mask out.)
            lse = shift + tl.log2(tl.where(counted, tl.sum(tl.exp2((x - shift[:, None]) * LOG2E), 1), 1.0)) * LN2
            picked = tl.load(X + r.to(tl.int64) * stride_xm + y * stride_xv, mask=counted & (y >= 0) & (y < V),
                             other=0.0).to(tl.float32)
            loss = tl.where(counted, lse - picked, 0.0)
            tl.store(LOSS + loss_at + r, loss, mask=inside)
            tl.store(AUX + r, tl.where(counted, lse, 0.0), mask=inside)
            if REDUCE:
                total += loss
        elif REDUCE:
            total += tl.load(LOSS + loss_at + r, mask=counted, other=0.0)
    n = tl.sum(count, 0).to(tl.float32)
    tl.store(AUX + M, n)
    ok = tl.sum(bad, 0) == 0
    tl.store(AUX + M + 1, ok.to(tl.float32))
    if CHECK:
        # What F.cross_entropy does on a GPU: the stream fails with "device-side assert
        # triggered", no host sync spent on the check. One fewer launch than a
        # torch._assert_async on the flag.
        tl.device_assert(ok, "cross_entropy: labels must lie in [0, classes) or be ignore_index")
    if REDUCE:
        s = tl.sum(total, 0)
        if MEAN:
            s = s / n  # 0 / 0 = nan when every row is ignored, as torch
        tl.store(OUT, s)


@triton.jit
def _ce_bwd(
    X,  # (M, V) logits, any strides
    Y,  # (M,) labels
    AUX,  # fp32, from the forward: lse_i at row; at M (the grid's rows) the count of rows,
    #       the mean's divisor (MEAN)
    G,  # the loss's gradient: () (stride_g 0) or per row (M,), fp32
    DX,  # (M, V) out, contiguous, the logits' dtype
    V,
    stride_xm,
    stride_xv,
    stride_y,
    stride_g,
    ignore_index,
    BLOCK: tl.constexpr,  # scores per program
    MEAN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < V
    label = tl.load(Y + row * stride_y).to(tl.int64)
    dx = DX + row * V + c
    if label == ignore_index:
        tl.store(dx, tl.zeros((BLOCK,), tl.float32).to(DX.dtype.element_ty), mask=mask)
    else:
        lse = tl.load(AUX + row)
        g = tl.load(G + row * stride_g).to(tl.float32)
        if MEAN:
            g = g / tl.load(AUX + tl.num_programs(0))
        x = tl.load(X + row * stride_xm + c.to(tl.int64) * stride_xv, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp2((x - lse) * LOG2E)
        tl.store(dx, (g * (p - tl.where(c == label, 1.0, 0.0))).to(DX.dtype.element_ty), mask=mask)
