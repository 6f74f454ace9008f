"""Deterministic column sums of fp32 partial buffers: the second step of a two-step reduction.

A backward kernel that needs a sum over all rows (LayerNorm's dweight/dbias, Linear's dbias)
lets each program accumulate its own rows into its own row of a (P, N) fp32 buffer (or up to
three such sums interleaved, (P, G, N)); `sum_rows` then adds the P rows of every column in a
fixed order. No atomics, so the result is the same bit for bit from run to run, and one launch
replaces torch's `.sum(0)` plus the cast to the parameter's dtype (two kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cdiv, new_output
from .launch import launch, plan_table

_BLOCK_N = 64  # columns per program: N = 768 gives 12 programs, 3072 gives 48
_BLOCK_P = 32  # partial rows summed per step


@triton.jit
def _sum_rows(
    PART,  # (P, G, N) float32 partial sums, contiguous: G sums interleaved per program, 1 <= G <= 3
    OUT,  # (N,) column sums of group 0, in OUT's dtype
    OUT2,  # (N,) column sums of group 1, in OUT2's dtype; written only with G >= 2
    OUT3,  # (N,) column sums of group 2, in OUT3's dtype; written only with G == 3
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G: tl.constexpr,
    STAGES: tl.constexpr,  # row blocks in flight: 1, or more to prefetch the next ones (cp.async)
):
    group = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    stride_p = N * G
    base = PART + group * N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    # Fixed order: row block after row block, then one tree sum over BLOCK_P fixed by the
    # compiled kernel, so the same inputs give the same bits.
    # With ~1 program per 64 columns (12 at N = 768) each walks all P rows: a chain of
    # dependent DRAM round trips unless STAGES > 1 has the next blocks' loads already issued.
    for start in tl.range(0, P, BLOCK_P, num_stages=STAGES):
        rows = start + tl.arange(0, BLOCK_P)
        m = (rows < P)[:, None] & cmask[None, :]
        acc += tl.load(base + rows[:, None].to(tl.int64) * stride_p + cols[None, :], mask=m, other=0.0)
    total = tl.sum(acc, axis=0)
    if G == 1:
        tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cmask)
    elif G == 2:
        if group == 1:
            tl.store(OUT2 + cols, total.to(OUT2.dtype.element_ty), mask=cmask)
        else:
            tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cmask)
    else:
        if group == 2:
            tl.store(OUT3 + cols, total.to(OUT3.dtype.element_ty), mask=cmask)
        elif group == 1:
            tl.store(OUT2 + cols, total.to(OUT2.dtype.element_ty), mask=cmask)
        else:
            tl.store(OUT + cols, total.to(OUT.dtype.element_ty), mask=cmask)


# Launch plans (kernels/launch.py's Bound) per (device, shape, dtypes, stages).
_plans = plan_table()


def sum_rows(part: torch.Tensor, dtype: torch.dtype, dtype2: torch.dtype | None = None,
             dtype3: torch.dtype | None = None, stages: int = 1):
    """part (P, N) fp32 contiguous -> (N,) column sums in `dtype`.

    With dtype2 (and dtype3), part is (P, 2, N) (or (P, 3, N)): two (three) partial buffers
    interleaved per program (add+LN's dweight and dbias, and a fused block's bias gradient of
    the layer before): -> a tuple of (N,) sums, each in its dtype, from one launch, where a
    launch per sum costs its host time again for the same memory traffic.
    `stages` > 1 software-pipelines the walk over the rows (same order, same bits)."""
    dtypes = (dtype,) if dtype2 is None else (dtype, dtype2) if dtype3 is None else (dtype, dtype2, dtype3)
    G = len(dtypes)
    P, N = part.shape[0], part.shape[-1]
    outs = [new_output((N,), d, part.device) for d in dtypes]
    if N != 0 and P == 0:
        for out in outs:
            out.zero_()
    elif N != 0:
        # OUT2 and OUT3 of groups not there: any output (the kernel writes them only for G >= 2, 3).
        pointers = (part, outs[0], outs[G > 1], outs[G - 1])
        key = (part.device, P, N, dtypes, stages) if _plans.active() else None
        _plans.launch(key, ((_sum_rows, pointers),), lambda: launch(
            _sum_rows, (cdiv(N, _BLOCK_N), G), *pointers, P, N, BLOCK_P=_BLOCK_P, BLOCK_N=_BLOCK_N,
            G=G, STAGES=stages, num_warps=4))
    return tuple(outs) if G > 1 else outs[0]
