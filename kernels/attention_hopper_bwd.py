"""Hopper (sm_90) backward kernels of flash attention: the FA2 structure with TMA tiles.

Used with the Hopper forward (attention_hopper.py, same switch and the same cases: fp16/bf16,
no dropout, no dense mask, 16-byte aligned tensors) up to head dim 128 (MAX_BLOCK_D). Two
passes, nothing recomputed beyond what FlashAttention does; delta = rowsum(dO * O) is made by
the dQ pass, which runs first and stores it for the dK/dV pass (with atomic dQ, by the
portable preprocess kernel):
- dK/dV: one program per key block of one key/value head; it walks every query tile of every
  query head of its GQA group, recomputing P^T (key-major, see _dkdv_tiles) from the saved
  log-sum-exp, and sums dK and dV in registers (no atomics).
- dQ: one program per query block; it walks the key tiles. Or, with attention.VARIANT["dq"]
  "atomic" (head dims up to MAX_ATOMIC_BLOCK_D), no such pass: the dK/dV pass adds each
  tile's dS K into an fp32 dQ accumulator, FlashAttention-3's way.
Q, dO, K, V come through tensor descriptors (TMA on sm_90, zero-filled past a sequence's end
and past HEAD_D); dQ, dK, dV leave through them (the store drops rows past the end). They are
made in each program or, with HOST_DESC, passed in from the host as 4-D (B, H, L, D)
descriptors whose bounds do the same (attention_hopper.DESCRIPTOR_PLACES says which and why). So the
dK/dV pass needs no key bounds at all: keys past the end only produce dK/dV rows that are
never stored, and query rows past the end have lse = +inf, hence P = 0. Only causal diagonal
tiles (and, in the dQ pass, the ragged last key tile) take the per-element select in the dQ
pass; the dK/dV pass applies its causal select to every tile (see _dkdv_tiles). A
key-padding mask is read per tile, as the portable kernels do.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._util import ensure_tma_allocator, launch_tuned, tuned_config
from .launch import launch as launch_plain
from .attention_hopper import _seq_desc, _store_tile, _tile, boxes_for, set_boxes
from .attention_bwd_kernels import _add_dq, _row_delta, _walk_turn
from .attention_kernels import _key_range, _program_bounds, _prune, _scores
from .backends import interpreting
from .precompile import autotune


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, q_desc, do_desc, b, h, lse_base, delta_base, dq_base, cols, col_ok, lo, hi, q_len, mask_row,
    stride_mn, qk_scale, sm_scale, turn,
    HOST_DESC: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    UPCAST: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    HEAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The query tiles [lo, hi) of one query head against this program's key block, in the
    key-major orientation (FlashAttention-2's and the Triton tutorial's): S^T = K Q^T, so P^T
    and dS^T come out of their MMAs as (BLOCK_N, BLOCK_M) accumulators and feed dV += P^T dO
    and dK += dS^T Q as the A operand straight from registers. Computed query-major (S = Q K^T),
    each tile's P and dS had to be transposed first: on sm_90 Triton did that through shared
    memory (a store, a barrier and a load of each, every tile). Only dQ (ATOMIC_DQ) wants dS
    query-major, and takes one such transpose."""
    if ATOMIC_DQ:
        span, shift = _walk_turn(lo, hi, turn, BLOCK_M)
    for i in range(lo, hi, BLOCK_M):
        start_m = i
        if ATOMIC_DQ:
            start_m = lo + (i - lo + shift) % span
        q = _tile(q_desc, b, h, start_m, HOST_DESC, BLOCK_M, BLOCK_D)
        do = _tile(do_desc, b, h, start_m, HOST_DESC, BLOCK_M, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        # +inf for rows past the end makes their P exactly 0.
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M): keys down, queries across
        to_scale = qk_scale
        if MASK_KIND == 1:
            # _scores' key-padding rule, transposed: a key's mask value applies to its row.
            mrow = tl.load(mask_row + cols * stride_mn, mask=col_ok, other=0)
            if MASK_FLOAT:
                st = st * qk_scale + mrow.to(tl.float32)[:, None] * 1.4426950408889634
                to_scale = 1.0
            else:
                st = tl.where((mrow != 0)[:, None], st, float("-inf"))
            allowed = col_ok[:, None] & (rows[None, :] >= 0)
            if CAUSAL:
                allowed = allowed & (cols[:, None] <= rows[None, :])
            st = tl.where(allowed, st, float("-inf"))
        pt = tl.exp2(st * to_scale - lse2[None, :])
        if CAUSAL and MASK_KIND == 0:
            # The causal select is the only one: keys past the end only feed dK/dV rows that are
            # never stored, and rows past the end have P = 0 already (lse = +inf). It runs on
            # every tile (one select per score, next to four MMAs per score): a separate loop
            # for the diagonal tiles spilled registers with varlen + GQA + causal.
            pt = tl.where(cols[:, None] <= rows[None, :], pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk)
        if ATOMIC_DQ:
            d = tl.arange(0, BLOCK_D)
            _add_dq(dq_base, tl.dot(tl.trans(dst.to(k.dtype)), k) * sm_scale, rows, row_ok, d, d < HEAD_D, HEAD_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_hopper(
    Q, K, V, DO, DK, DV,  # with HOST_DESC: 4-D host TensorDescriptors (attention_hopper.host_descriptors)
    LSE, DELTA, MASK, CU_Q, CU_K,
    DQ_ACC,  # ATOMIC_DQ: fp32 (B, H, LQ, HEAD_D), contiguous, zeroed; unused otherwise
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_ab, stride_ah,
    stride_mb, stride_mn,
    H, GROUP, LQ, LK, TUNE_BUCKET,
    qk_scale, sm_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    HOST_DESC: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_n, b, hk, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H // GROUP, LQ, LK, LK, VARLEN, BLOCK_N)
    if start_n >= k_len:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    if HOST_DESC:
        k_desc, v_desc = K, V
    else:
        k_desc = _seq_desc(K, b64, hk64, k0, stride_kb, stride_kh, stride_kn, k_len, HEAD_D, BLOCK_N, BLOCK_D)
        v_desc = _seq_desc(V, b64, hk64, k0, stride_vb, stride_vh, stride_vn, k_len, HEAD_D, BLOCK_N, BLOCK_D)
    k = _tile(k_desc, b, hk, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
    v = _tile(v_desc, b, hk, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
    out_ty = k.dtype
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    mask_row = MASK + b64 * stride_mb

    q_hi = q_len
    if MASK_KIND == 1:
        # A block of padded keys has dK = dV = 0: skip every query row.
        mrow = tl.load(mask_row + cols * stride_mn, mask=col_ok, other=0)
        if MASK_FLOAT:
            live = col_ok & (mrow != float("-inf"))
        else:
            live = mrow != 0
        q_hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, q_len, 0)
    lo = 0
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # rows above this key block never see it
    q_rows = tl.maximum(q_len, 1)  # a zero-length query sequence: a descriptor no tile reads

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        if HOST_DESC:
            q_desc, do_desc = Q, DO
        else:
            q_desc = _seq_desc(Q, b64, h64, q0, stride_qb, stride_qh, stride_qm, q_rows, HEAD_D, BLOCK_M, BLOCK_D)
            do_desc = _seq_desc(DO, b64, h64, q0, stride_dob, stride_doh, stride_dom, q_rows, HEAD_D, BLOCK_M,
                                BLOCK_D)
        lse_base = LSE + b64 * stride_lb + h64 * stride_lh + q0
        delta_base = DELTA + b64 * stride_lb + h64 * stride_lh + q0
        dq_base = DQ_ACC + b64 * stride_ab + h64 * stride_ah + q0 * HEAD_D
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_desc, do_desc, b, h, lse_base, delta_base, dq_base, cols, col_ok, lo,
                             q_hi, q_len, mask_row, stride_mn, qk_scale, sm_scale, start_n // BLOCK_N, HOST_DESC,
                             CAUSAL, MASK_KIND, MASK_FLOAT, UPCAST, ATOMIC_DQ, HEAD_D, BLOCK_M, BLOCK_N, BLOCK_D)
    if HOST_DESC:
        dk_desc, dv_desc = DK, DV
    else:
        dk_desc = _seq_desc(DK, b64, hk64, k0, stride_dkb, stride_dkh, stride_dkn, k_len, HEAD_D, BLOCK_N, BLOCK_D)
        dv_desc = _seq_desc(DV, b64, hk64, k0, stride_dvb, stride_dvh, stride_dvn, k_len, HEAD_D, BLOCK_N, BLOCK_D)
    _store_tile(dk_desc, b, hk, start_n, (dk * sm_scale).to(out_ty), HOST_DESC)
    _store_tile(dv_desc, b, hk, start_n, dv.to(out_ty), HOST_DESC)


@triton.jit
def _dq_tiles(
    dq, q, do, lse2, delta, k_desc, v_desc, b, hk, rows, row_ok, lo, hi, k_len, mask_row, stride_mn, qk_scale,
    HOST_DESC: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    BOUNDARY: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        k = _tile(k_desc, b, hk, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
        v = _tile(v_desc, b, hk, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        cols = start_n + tl.arange(0, BLOCK_N)
        if BOUNDARY:
            s, to_scale = _scores(q, k, rows, cols, row_ok, cols < k_len, mask_row, 0, stride_mn, qk_scale,
                                  CAUSAL, MASK_KIND, MASK_FLOAT, False, True, BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, tl.trans(k))
            to_scale = qk_scale
        p = tl.exp2(s * to_scale - lse2[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_hopper(
    Q, K, V, DO, DQ,  # with HOST_DESC: 4-D host TensorDescriptors
    LSE,
    DELTA,  # written here: rowsum(dO * O) of this program's rows, for the dK/dV pass after it
    MASK, CU_Q, CU_K,
    O,  # the forward's output (a tensor: read once, by pointer, for delta)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mn,
    H, GROUP, LQ, LK, TUNE_BUCKET,
    qk_scale, sm_scale,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    HOST_DESC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, b, h, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H, LQ, LK, LQ, VARLEN, BLOCK_M)
    if CAUSAL:
        start_m = (tl.cdiv(LQ, BLOCK_M) - 1) * BLOCK_M - start_m  # longest first
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk = h // GROUP
    if HOST_DESC:
        q_desc, do_desc, k_desc, v_desc, dq_desc = Q, DO, K, V, DQ
    else:
        hk64 = hk.to(tl.int64)
        kv_rows = tl.maximum(k_len, 1)
        q_desc = _seq_desc(Q, b64, h64, q0, stride_qb, stride_qh, stride_qm, q_len, HEAD_D, BLOCK_M, BLOCK_D)
        do_desc = _seq_desc(DO, b64, h64, q0, stride_dob, stride_doh, stride_dom, q_len, HEAD_D, BLOCK_M, BLOCK_D)
        k_desc = _seq_desc(K, b64, hk64, k0, stride_kb, stride_kh, stride_kn, kv_rows, HEAD_D, BLOCK_N, BLOCK_D)
        v_desc = _seq_desc(V, b64, hk64, k0, stride_vb, stride_vh, stride_vn, kv_rows, HEAD_D, BLOCK_N, BLOCK_D)
        dq_desc = _seq_desc(DQ, b64, h64, q0, stride_dqb, stride_dqh, stride_dqm, q_len, HEAD_D, BLOCK_M, BLOCK_D)
    q = _tile(q_desc, b, h, start_m, HOST_DESC, BLOCK_M, BLOCK_D)
    do = _tile(do_desc, b, h, start_m, HOST_DESC, BLOCK_M, BLOCK_D)
    out_ty = q.dtype
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    lse_off = b64 * stride_lb + h64 * stride_lh + q0 + rows
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # The preprocess's delta, made here (this pass runs first): this program is the only one
    # of the pass on these rows and holds their dO already, so one launch and one read of dO
    # fewer than a preprocess (the portable dQ pass does the same).
    d = tl.arange(0, BLOCK_D)
    qd_mask = row_ok[:, None] & (d < HEAD_D)[None, :]
    delta = _row_delta(O + b64 * stride_ob + h64 * stride_oh, (q0 + rows).to(tl.int64), stride_om, d, qd_mask, do)
    tl.store(DELTA + lse_off, delta, mask=row_ok)
    mask_row = MASK + b64 * stride_mb

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if MASK_KIND == 1:
        lo, hi = _key_range(mask_row, stride_mn, k_len, MASK_FLOAT, BLOCK_N)
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_desc, v_desc, b, hk, rows, row_ok, lo, hi, k_len, mask_row,
                       stride_mn, qk_scale, HOST_DESC, CAUSAL, 1, MASK_FLOAT, True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        hi = k_len
        full_end = k_len
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M)
            full_end = tl.minimum(full_end, start_m + 1)
        # Key tiles below `mid` are whole and on or below the diagonal: no select.
        mid = (full_end // BLOCK_N) * BLOCK_N
        dq = _dq_tiles(dq, q, do, lse2, delta, k_desc, v_desc, b, hk, rows, row_ok, 0, mid, k_len, mask_row,
                       stride_mn, qk_scale, HOST_DESC, CAUSAL, 0, False, False, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        dq = _dq_tiles(dq, q, do, lse2, delta, k_desc, v_desc, b, hk, rows, row_ok, mid, hi, k_len, mask_row,
                       stride_mn, qk_scale, HOST_DESC, CAUSAL, 0, False, True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    _store_tile(dq_desc, b, h, start_m, (dq * sm_scale).to(out_ty), HOST_DESC)


# Head dims above this take the portable backward: the dK/dV pass holds two (BLOCK_N, BLOCK_D)
# fp32 accumulators beside K and V, which at BLOCK_D 256 leaves only 32-row tiles, too small
# for wgmma (64 rows per warpgroup), and those still spilled (tests/triton_compile_check.py).
MAX_BLOCK_D = 128

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The dQ pass: query-major, BLOCK_M query rows are
# the MMAs' M side.
_BWD_HOPPER_GPU = [(64, 64, 8, 2), (128, 64, 8, 2), (64, 64, 8, 1), (128, 32, 8, 2), (64, 32, 4, 2)]
# The dK/dV pass is key-major (_dkdv_tiles): its BLOCK_N keys are the MMAs' M side, 64 rows a
# warpgroup, so BLOCK_N = 64 x warpgroups keeps P^T and dS^T in each warpgroup's registers from
# one MMA to the next; BLOCK_M is the query step. 128-row query steps (and BLOCK_N 32, which
# leaves wgmma for mma.sync) are not in these lists: compiled for sm_90a they spilled or lost
# wgmma. Every config here compiled spill-free in every flag case of
# tests/triton_compile_hopper.py under triton 3.6 and 3.9 (head dim 64, atomic dQ included).
_BWD_DKDV_HOPPER_GPU = [(64, 128, 8, 2), (32, 128, 8, 2), (64, 128, 8, 1), (64, 64, 4, 2), (32, 64, 4, 2),
                        (64, 64, 8, 2)]
# Head dim 128 (BLOCK_D > 64): dK and dV take twice the registers, and 64-row query steps over
# 128 keys spilled (12-144 B with causal key padding or varlen + GQA + causal).
_BWD_DKDV_HOPPER_GPU_WIDE = [(32, 128, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2)]
# Atomic dQ (attention.VARIANTS["dq"]) only up to this BLOCK_D: beside dK and dV the pass then holds a
# (BLOCK_M, BLOCK_D) fp32 dQ tile, and at BLOCK_D 128 every config of the list above, and 64 x 32
# and 64 x 64 tiles over 4 or 8 warps, reached the register cap and spilled 16-324 B with
# varlen + GQA + causal (triton 3.9; query-major then). Wider heads make dQ by the pass whatever
# the mode.
MAX_ATOMIC_BLOCK_D = 64
_KEY = ["HEAD_D", "TUNE_BUCKET", "CAUSAL", "MASK_KIND", "VARLEN"]


def _configs(shapes):
    # set_boxes: host descriptors (HOST_DESC) get each config's tile boxes before it runs.
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1, pre_hook=set_boxes)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=set_boxes)
            for m, n, w, s in shapes]


def _tuned(kernel, shapes=_BWD_HOPPER_GPU, atomic=False):
    # atomic: DQ_ACC zeroed around tuning, as attention_kernels._tuned says why.
    return autotune(_configs(shapes), _KEY, reset_to_zero=["DQ_ACC"] if atomic else None,
                    prune_configs_by={"early_config_prune": _prune})(kernel)


attn_bwd_dkdv_hopper = _attn_bwd_dkdv_hopper
attn_bwd_dq_hopper = _attn_bwd_dq_hopper
attn_bwd_dkdv_hopper_tuned = _tuned(_attn_bwd_dkdv_hopper, _BWD_DKDV_HOPPER_GPU)
attn_bwd_dkdv_hopper_tuned_wide = _tuned(_attn_bwd_dkdv_hopper, _BWD_DKDV_HOPPER_GPU_WIDE)
attn_bwd_dkdv_hopper_tuned_atomic = _tuned(_attn_bwd_dkdv_hopper, _BWD_DKDV_HOPPER_GPU, atomic=True)
attn_bwd_dq_hopper_tuned = _tuned(_attn_bwd_dq_hopper)


def dkdv_tuned(block_d: int, atomic: bool = False):
    """The autotuned dK/dV kernel for a BLOCK_D (above 64 it tunes over _BWD_DKDV_HOPPER_GPU_WIDE)
    and dQ mode (atomic: BLOCK_D <= MAX_ATOMIC_BLOCK_D only)."""
    if atomic:
        return attn_bwd_dkdv_hopper_tuned_atomic
    return attn_bwd_dkdv_hopper_tuned_wide if block_d > 64 else attn_bwd_dkdv_hopper_tuned


def default_config(block_d: int, itemsize: int, which: str):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning for the pass `which`
    ("dkdv" or "dq"), each from its own list above: fits sm_90 shared memory and spills
    nothing."""
    if interpreting():
        return 64, 64, 4, 1
    if which == "dkdv":
        return (32, 128, 8, 2) if block_d > 64 else (64, 128, 8, 2)
    return (128, 32, 8, 2) if block_d > 64 else (64, 64, 8, 2)


_DKDV_DESCS = ("Q", "K", "V", "DO", "DK", "DV")  # the passes' leading parameters
_DQ_DESCS = ("Q", "K", "V", "DO", "DQ")


def launch(which: str, grid, args, kwargs, key, autotune: bool) -> None:
    """One pass, `which` "dkdv" or "dq" (the launcher runs the dQ pass first, which makes
    delta; with atomic dQ, the preprocess): autotuned once per key, or with the default config
    (the interpreter, FUSEFORMER_AUTOTUNE=0). One pass a call, so that each is a launch site of
    its own for the launcher's plans. With host descriptors (kwargs["HOST_DESC"]) the two passes
    share them: each launch fits their boxes to its own config first (the launcher encodes the
    TMA maps at launch, so the refit between the passes leaves the first alone). With
    kwargs["ATOMIC_DQ"] the dK/dV pass also sums dQ into its DQ_ACC argument and there is no dQ
    pass."""
    q = args[0]
    host = kwargs["HOST_DESC"]
    base = q.base if host else q
    if base.is_cuda and not host:
        ensure_tma_allocator()
    if which == "dkdv":
        tuned, plain, names = dkdv_tuned(kwargs["BLOCK_D"], kwargs["ATOMIC_DQ"]), attn_bwd_dkdv_hopper, _DKDV_DESCS
    else:
        tuned, plain, names = attn_bwd_dq_hopper_tuned, attn_bwd_dq_hopper, _DQ_DESCS
        # The dQ kernel has no ATOMIC_DQ parameter.
        kwargs = {name: value for name, value in kwargs.items() if name != "ATOMIC_DQ"}
    if autotune:
        config = tuned_config(tuned, key) if host else None
        if config is not None:  # launched directly, no pre_hook: fit the boxes here
            boxes_for(names, args, kwargs, config)
        launch_tuned(tuned, plain, key, grid, *args, **kwargs)
        return
    m, n, w, s = default_config(kwargs["BLOCK_D"], base.element_size(), which)
    cfg = dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    if host:
        boxes_for(names, args, kwargs, cfg)
    launch_plain(plain, grid, *args, **kwargs, **cfg)
