"""The Triton kernels of add_layer_norm (launchers and autograd: kernels/add_layer_norm.py).

    stream = residual + dropout(x)              (residual optional)
    y      = (stream - mean) * rstd * weight + bias   over the last dim, statistics in fp32

Gradient maths (xhat = (s - mean) * rstd, g = dy * weight, means over the row of N):

    ds        = rstd * (g - mean(g * xhat) * xhat - mean(g)) + dstream
    dresidual = ds
    dx        = ds * keep / (1 - p)          keep regenerated from the seed
    dweight   = sum over rows of dy * xhat,  dbias = sum over rows of dy
    (DX_SUM)    sum over rows of dx: a fused block's bias gradient of the linear layer whose
                output x is (models/fused_block.py), summed from partials like dbias, not by
                a pass of its own over dx

dweight/dbias (and the dx sum) are reduced in two steps: each backward program accumulates
fp32 partial sums over its rows into its own rows of one (programs, G, N) buffer (G = 2 with
both weight and bias, 3 with the dx sum: one allocation, and one launch of kernels/reduce.py),
which then sums them in a fixed order (deterministic: no atomics).

Forward kernels:
- `_add_ln_fwd`: one program per row (any N; rows wider than the fused block in chunks).
  Measured on the H200 (16384 x 768 bf16: 0.0253 ms, 72% of copy bandwidth).
- `_add_ln_fwd_rows`: a (ROWS, BLOCK) tile of several rows per program, weight and bias
  loaded once per program, and a grid that is either one program per tile or persistent
  (a few programs per SM looping over tiles). Rows that fit one block only.
"""
import triton
import triton.language as tl

from .philox import keep_bits


@triton.jit
def _keep(seed, row, col0, dropout_p, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # Columns col0 .. col0 + BLOCK - 1 under a per-row Philox key (seed + row), four columns
    # a counter (kernels/philox.py): forward, backward and dropout_mask() all draw the very
    # same bits. ROWS == 0: one row (row a scalar), [BLOCK]; else row is [ROWS, 1] and the
    # bits [ROWS, BLOCK]. col0: a multiple of BLOCK (every caller's chunks start there).
    if ROWS == 0:
        keep = tl.reshape(keep_bits(seed + row, 0, col0, dropout_p, 1, BLOCK), [BLOCK])
    else:
        keep = keep_bits(seed + row, 0, col0, dropout_p, ROWS, BLOCK)
    return keep


@triton.jit
def _mul_rounded(a, b):
    # g = dy * w feeds both mean(g) and the elementwise g - mean(g). On a GPU, LLVM contracts
    # a plain product into the subtraction (an fma with the unrounded product), so the two
    # disagree by half an ulp of g; times rstd (1/sqrt(eps) ~ 316 for a constant row, e.g.
    # hidden 1) that left dx ~3e-5 where the exact answer is 0. An fma with a +0.0 addend
    # rounds the product once and is not folded back into a multiply.
    return tl.fma(a, b, 0.0)


@triton.jit
def _load_stream_chunk(X, RES, seed, row, row_off, cols, col0, mask, dropout_p, HAS_RES: tl.constexpr,
                       DROPOUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # cols: col0 + arange(BLOCK), as [BLOCK] (ROWS == 0, row a scalar) or [1, BLOCK].
    s = tl.load(X + row_off + cols, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        s = tl.where(_keep(seed, row, col0, dropout_p, ROWS, BLOCK), s / (1.0 - dropout_p), 0.0)
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
        s = _load_stream_chunk(X, RES, seed, row, row_off, cols, 0, mask, dropout_p, HAS_RES, DROPOUT, 0, BLOCK)
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
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, start, c < N, dropout_p, HAS_RES, DROPOUT, 0, BLOCK)
            if SAVE_STREAM:
                tl.store(STREAM + row_off + c, s.to(STREAM.dtype.element_ty), mask=c < N)
            acc += s
        mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, start, c < N, dropout_p, HAS_RES, DROPOUT, 0, BLOCK)
            d = tl.where(c < N, s - mean, 0.0)
            acc += d * d
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            c = start + cols
            s = _load_stream_chunk(X, RES, seed, row, row_off, c, start, c < N, dropout_p, HAS_RES, DROPOUT, 0, BLOCK)
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
def _add_ln_fwd_rows(
    X,  # (M, N) branch input, dropped out
    RES,  # (M, N) residual, unused without HAS_RES
    W,  # (N,) weight, unused without HAS_W
    B,  # (N,) bias, unused without HAS_B
    Y,  # (M, N) output
    STREAM,  # (M, N) residual + dropout(x), written only with SAVE_STREAM
    MEAN,  # (M,) float32, written only with SAVE_STATS
    RSTD,  # (M,) float32, written only with SAVE_STATS
    SEED,  # int64[1] Philox seed, read only with DROPOUT
    M,  # rows
    N,  # row length, N <= BLOCK
    eps,
    dropout_p,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DROPOUT: tl.constexpr,
    SAVE_STREAM: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per tile: short rows (BERT's 768) share a program
    BLOCK: tl.constexpr,  # next_pow2(N): the whole row
    ALIGN: tl.constexpr,  # a power of two (<= 16) dividing N: every row starts on a multiple of it
    STAGES: tl.constexpr,  # tiles in flight per program: 1, or 2+ to prefetch the next tile's loads
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK)
    # (N // ALIGN) * ALIGN == N, written so that the compiler sees a multiple of ALIGN: the
    # mask is then constant over runs of ALIGN columns and masked loads stay vectorised.
    cmask = cols < (N // ALIGN) * ALIGN
    # Loaded once per program, not once per row: with a persistent grid every program
    # normalises many tiles with the same weight and bias.
    w = tl.full([BLOCK], 1.0, tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    tiles = tl.cdiv(M, ROWS)
    # One iteration per program with the plain grid (programs == tiles); many with the
    # persistent grid (programs ~ a few per SM), where STAGES > 1 has the software pipeliner
    # copy the next tile's inputs into shared memory (cp.async) while this one is reduced and
    # stored, as Triton's fused-softmax tutorial does: otherwise each iteration waits out a
    # full DRAM latency before its reductions can start, with few programs to hide it.
    for tile in tl.range(pid, tiles, programs, num_stages=STAGES):
        rows = tile * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        # True by construction (ALIGN divides N): it lets the compiler prove that each row's
        # run of 16 bytes starts aligned and issue 16-byte vector loads and stores, which the
        # JIT's own specialisation only proves when N is a multiple of 16.
        row_off = tl.multiple_of(rows.to(tl.int64) * N, ALIGN)
        mask = rmask[:, None] & cmask[None, :]
        s = _load_stream_chunk(X, RES, seed, rows[:, None], row_off[:, None], cols[None, :], 0, mask, dropout_p, HAS_RES,
                               DROPOUT, ROWS, BLOCK)
        offs = row_off[:, None] + cols[None, :]
        if SAVE_STREAM:
            tl.store(STREAM + offs, s.to(STREAM.dtype.element_ty), mask=mask)
        mean = tl.sum(s, axis=1) / N
        d = tl.where(mask, s - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
        y = d * rstd[:, None]
        if HAS_W:
            y = y * w[None, :]
        if HAS_B:
            y = y + b[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        if SAVE_STATS:
            tl.store(MEAN + rows, mean, mask=rmask)
            tl.store(RSTD + rows, rstd, mask=rmask)


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
    PART,  # (programs, HAS_W + HAS_B + DX_SUM, N) float32 partial sums: of dy * xhat (with HAS_W),
    # of dy (with HAS_B), then of dx (with DX_SUM)
    M,
    N,
    dropout_p,
    HAS_DSTREAM: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    DX_SUM: tl.constexpr,  # also sum dx over the rows: the bias gradient of the layer that made x
    DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
    SINGLE: tl.constexpr,
    STAGES: tl.constexpr,  # rows in flight per program (SINGLE): 1, or 2+ to prefetch the next row
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    cols = tl.arange(0, BLOCK)
    dw_part = PART + pid.to(tl.int64) * ((HAS_W + HAS_B + DX_SUM) * N)
    db_part = dw_part + HAS_W * N
    dx_part = dw_part + (HAS_W + HAS_B) * N
    if SINGLE:
        mask = cols < N
        w = tl.full([BLOCK], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK], dtype=tl.float32)
        dx_acc = tl.zeros([BLOCK], dtype=tl.float32)
        # A few programs per SM each walk ~M / (4 SMs) rows; with STAGES > 1 the next row's
        # stream, dy and statistics are copied in (cp.async) while this row is reduced.
        for row in tl.range(pid, M, programs, num_stages=STAGES):
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
                ds = tl.where(_keep(seed, row, 0, dropout_p, 0, BLOCK), ds / (1.0 - dropout_p), 0.0)
            tl.store(DX + row_off + cols, ds.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
            if DX_SUM:
                dx_acc += ds
        if HAS_W:
            tl.store(dw_part + cols, dw_acc, mask=mask)
        if HAS_B:
            tl.store(db_part + cols, db_acc, mask=mask)
        if DX_SUM:
            tl.store(dx_part + cols, dx_acc, mask=mask)
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
                    ds = tl.where(_keep(seed, row, start, dropout_p, 0, BLOCK), ds / (1.0 - dropout_p), 0.0)
                tl.store(DX + row_off + c, ds.to(DX.dtype.element_ty), mask=m)
                if HAS_W:
                    p = tl.load(dw_part + c, mask=m, other=0.0)
                    tl.store(dw_part + c, p + dy * xhat, mask=m)
                if HAS_B:
                    p = tl.load(db_part + c, mask=m, other=0.0)
                    tl.store(db_part + c, p + dy, mask=m)
                if DX_SUM:
                    p = tl.load(dx_part + c, mask=m, other=0.0)
                    tl.store(dx_part + c, p + ds, mask=m)


@triton.jit
def _keep_mask_kernel(SEED, OUT, N, dropout_p, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(tl.load(SEED), row, tl.program_id(1) * BLOCK, dropout_p, 0, BLOCK)
    tl.store(OUT + row.to(tl.int64) * N + cols, keep.to(tl.int8), mask=cols < N)


