"""Deterministic column sums of fp32 partial buffers: the second step of a two-step reduction.

A backward kernel that needs a sum over all rows (LayerNorm's dweight/dbias, Linear's dbias)
lets each program accumulate its own rows into its own row of a (P, N) fp32 buffer; `sum_rows`
then adds the P rows of every column in a fixed order. No atomics, so the result is the same
bit for bit from run to run, and one launch replaces torch's `.sum(0)` plus the cast to the
parameter's dtype (two kernels).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import cdiv, new_output
from .launch import launch

_BLOCK_N = 64  # columns per program: N = 768 gives 12 programs, 3072 gives 48
_BLOCK_P = 32  # partial rows summed per step


@triton.jit
def _sum_rows(
    PART,  # (P, N) float32 partial sums, contiguous
    OUT,  # (N,) sum over the P rows, in OUT's dtype
    P,
    N,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    # Fixed order: row block after row block, then one tree sum over BLOCK_P fixed by the
    # compiled kernel, so the same inputs give the same bits.
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        m = (rows < P)[:, None] & cmask[None, :]
        acc += tl.load(PART + rows[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cmask)


def sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part (P, N) fp32 contiguous -> (N,) column sums in `dtype`."""
    P, N = part.shape
    out = new_output((N,), dtype, part.device)
    if N == 0:
        return out
    if P == 0:
        return out.zero_()
    launch(_sum_rows, (cdiv(N, _BLOCK_N),), part, out, P, N, BLOCK_P=_BLOCK_P, BLOCK_N=_BLOCK_N, num_warps=4)
    return out
