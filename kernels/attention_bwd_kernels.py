"""Triton kernels of the portable flash-attention backward (sm_80 and sm_90): dQ, then dK/dV,
or dK/dV alone (attention.VARIANTS["dq"]), and a preprocess for delta where no dQ pass makes it.
attention_kernels.py has the maths (the gradients under "The maths, once"), the helpers these
kernels share with the forward and the tile configs their autotuners below take.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_kernels import (_BWD_GPU, _ONE_PASS_GPU, _dot, _keep, _key_range, _program_bounds, _scores,
                                _tuned)

@triton.jit
def _walk_turn(lo, hi, turn, BLOCK_M: tl.constexpr):
    """(span, shift) for a walk over the query tiles [lo, hi) that starts `turn` tiles along
    and wraps round: tile i (lo <= i < hi, step BLOCK_M) is lo + (i - lo + shift) % span.
    With atomic dQ every key block adds into the same dQ rows; without causal they would all
    start at the first query tile at once and queue on the same addresses in L2."""
    span = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M) * BLOCK_M
    return span, (turn * BLOCK_M) % tl.maximum(span, 1)


@triton.jit
def _add_dq(dq_base, dq, rows, row_ok, d, d_ok, HEAD_D: tl.constexpr):
    """Add a (BLOCK_M, BLOCK_D) fp32 share of dQ to the accumulator rows at dq_base (row
    stride HEAD_D): fp32 reductions in L2, 16-byte vectors on sm_90. Rows past the end (their
    dS is 0 anyway) and columns past HEAD_D are not written."""
    tl.atomic_add(dq_base + rows[:, None] * HEAD_D + d[None, :], dq, mask=row_ok[:, None] & d_ok[None, :],
                  sem="relaxed")


@triton.jit
def _row_delta(O_head, qrow, stride_om, d, mask, do):
    """delta = rowsum(dO * O) in fp32 for rows qrow of one (batch, head), whose O starts at
    O_head: the preprocess's sum, and that of each kernel that makes delta itself."""
    o = tl.load(O_head + qrow[:, None] * stride_om + d[None, :], mask=mask, other=0.0)
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,  # delta laid out like lse
    CU_Q, CU_K,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    H, LQ,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m, b, h, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H, LQ, LQ, LQ, VARLEN, BLOCK_M)
    if start_m >= q_len:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ok = (rows < q_len)[:, None] & (d < HEAD_D)[None, :]
    qrow = (q0 + rows).to(tl.int64)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + qrow[:, None] * stride_dom + d[None, :], mask=ok, other=0.0)
    delta = _row_delta(O + b64 * stride_ob + h64 * stride_oh, qrow, stride_om, d, ok, do)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + qrow, delta, mask=rows < q_len)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK, SEED, CU_Q, CU_K,
    DQ_ACC,  # ATOMIC_DQ: fp32 (B, H, LQ, HEAD_D), contiguous, zeroed; unused otherwise
    O,  # ONE_PASS: the forward's output, for delta (DELTA unused then); unused otherwise
    DQ,  # ONE_PASS: dQ, written whole; unused otherwise
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lb, stride_lh,
    stride_ab, stride_ah,
    stride_ob, stride_oh, stride_om,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, LQ, LK, TUNE_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    ONE_PASS: tl.constexpr,  # LK <= BLOCK_N: this program's key block is all the keys
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns a block of keys of one key/value head and walks every query row of
    # every query head in its GQA group: dK and dV are summed in registers, no atomics.
    # With ATOMIC_DQ it also adds its share of dQ into DQ_ACC (attention.VARIANTS["dq"]).
    # With ONE_PASS its block holds every key, so dS K of a query tile is that tile's whole
    # dQ: it stores dQ itself and takes delta = rowsum(dO * O) from the tiles it loads, and
    # the backward is this one kernel (no preprocess, no dQ pass recomputing S and dP).
    start_n, b, hk, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H // GROUP, LQ, LK, LK, VARLEN, BLOCK_N)
    if not ONE_PASS:
        # (ONE_PASS: dQ is this program's to write even for a sequence without keys: zeros.)
        if start_n >= k_len:
            return

    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < k_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    kcol = (k0 + cols).to(tl.int64)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + kcol[:, None] * stride_kn + d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + kcol[:, None] * stride_vn + d[None, :],
                mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    inv_keep = 1.0 / (1.0 - dropout_p)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        # Rows above this key block never see it.
        lo = (start_n // BLOCK_M) * BLOCK_M
    q_hi = q_len
    if MASK_KIND == 1 and not ONE_PASS:
        # A block of padded keys has dK = dV = 0: skip every query row (with ONE_PASS their
        # dQ, zeros, is still to be written).
        mrow = tl.load(MASK + b64 * stride_mb + cols * stride_mn, mask=col_ok, other=0)
        if MASK_FLOAT:
            live = col_ok & (mrow != float("-inf"))
        else:
            live = mrow != 0
        q_hi = tl.where(tl.max(live.to(tl.int32), 0) > 0, q_len, 0)
    if ATOMIC_DQ:
        span, shift = _walk_turn(lo, q_hi, start_n // BLOCK_N, BLOCK_M)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        mask_base = MASK + b64 * stride_mb + h64 * stride_mh
        for i in range(lo, q_hi, BLOCK_M):
            start_m = i
            if ATOMIC_DQ:
                start_m = lo + (i - lo + shift) % span
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            qrow = (q0 + rows).to(tl.int64)
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + qrow[:, None] * stride_qm + d[None, :],
                        mask=qd_mask, other=0.0)
            do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + qrow[:, None] * stride_dom + d[None, :],
                         mask=qd_mask, other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse_off = b64 * stride_lb + h64 * stride_lh + qrow
            # +inf for rows past the end makes their p exactly 0.
            lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
            if ONE_PASS:  # no other program reads these rows
                delta = _row_delta(O + b64 * stride_ob + h64 * stride_oh, qrow, stride_om, d, qd_mask, do)
            else:
                delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
            s, to_scale = _scores(q, k, rows, cols, row_ok, col_ok, mask_base, stride_mm, stride_mn, qk_scale,
                                  CAUSAL, MASK_KIND, MASK_FLOAT, EXACT_FP32, True, BLOCK_M, BLOCK_N)
            p = tl.exp2(s * to_scale - lse2[:, None])
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32)
            if DROPOUT:
                keep = _keep(seed, b * H + h, rows, start_n, LQ, LK, dropout_p, BLOCK_M, BLOCK_N)
                p_dropped = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                p_dropped = p
            dv = _dot(tl.trans(p_dropped.to(do.dtype)), do, dv, EXACT_FP32)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk, EXACT_FP32)
            if ATOMIC_DQ or ONE_PASS:
                # This key block's share of the tile's dQ: with ONE_PASS all of it, stored.
                dq = _dot(ds.to(k.dtype), k, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), EXACT_FP32) * sm_scale
                if ATOMIC_DQ:
                    _add_dq(DQ_ACC + b64 * stride_ab + h64 * stride_ah + q0 * HEAD_D, dq, rows, row_ok, d, d_ok,
                            HEAD_D)
                else:
                    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + qrow[:, None] * stride_dqm + d[None, :],
                             dq.to(DQ.dtype.element_ty), mask=qd_mask)

    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + kcol[:, None] * stride_dkn + d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + kcol[:, None] * stride_dvn + d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE,
    DELTA,  # written here: rowsum(dO * O) of this program's rows, for the dK/dV pass after it
    O,
    MASK, SEED, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H, GROUP, LQ, LK, TUNE_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, b, h, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H, LQ, LK, LQ, VARLEN, BLOCK_M)
    if start_m >= q_len:
        return

    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    qrow = (q0 + rows).to(tl.int64)
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + qrow[:, None] * stride_qm + d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + qrow[:, None] * stride_dom + d[None, :],
                 mask=qd_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse_off = b64 * stride_lb + h64 * stride_lh + qrow
    lse2 = tl.load(LSE + lse_off, mask=row_ok, other=float("inf")) * 1.4426950408889634
    # The preprocess's delta, made here: this program is the only one of the pass on these
    # rows and loads their dO already (one launch and one read of dO fewer than a preprocess).
    delta = _row_delta(O + b64 * stride_ob + h64 * stride_oh, qrow, stride_om, d, qd_mask, do)
    tl.store(DELTA + lse_off, delta, mask=row_ok)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    inv_keep = 1.0 / (1.0 - dropout_p)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = k_len
    if MASK_KIND == 1:
        lo, hi = _key_range(MASK + b64 * stride_mb, stride_mn, k_len, MASK_FLOAT, BLOCK_N)
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s, to_scale = _scores(q, k, rows, cols, row_ok, col_ok, mask_base, stride_mm, stride_mn, qk_scale,
                              CAUSAL, MASK_KIND, MASK_FLOAT, EXACT_FP32, True, BLOCK_M, BLOCK_N)
        p = tl.exp2(s * to_scale - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32)
        if DROPOUT:
            keep = _keep(seed, b * H + h, rows, start_n, LQ, LK, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, EXACT_FP32)

    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + qrow[:, None] * stride_dqm + d[None, :],
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


attn_bwd_dkdv_tuned = _tuned(_BWD_GPU, _attn_bwd_dkdv)
attn_bwd_dkdv_tuned_atomic = _tuned(_BWD_GPU, _attn_bwd_dkdv, atomic=True)
attn_bwd_dkdv_tuned_one_pass = {n: _tuned(configs, _attn_bwd_dkdv) for n, configs in _ONE_PASS_GPU.items()}
attn_bwd_dq_tuned = _tuned(_BWD_GPU, _attn_bwd_dq)
attn_bwd_dkdv = _attn_bwd_dkdv
attn_bwd_dq = _attn_bwd_dq
attn_bwd_preprocess = _attn_bwd_preprocess
