"""Triton kernels of flash attention: the forward, the dropout mask, the pieces every attention
kernel shares (scores, masks, dropout bits, varlen bounds) and the portable kernels' tile
configs and autotuners. The portable backward's kernels are in attention_bwd_kernels.py, the
Hopper ones in attention_hopper.py and attention_hopper_bwd.py.

The maths, once (per query row i, key column j, in the natural-log domain):

    s_ij = scale * q_i . k_j + bias_ij          bias: float mask, or -inf where masked/causal
    p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j (p_ij * keep_ij / (1 - p_drop)) v_j

    dv_j  = sum_i p~_ij do_i                    p~ = dropped, rescaled p
    dp_ij = (do_i . v_j) * keep_ij / (1 - p_drop)
    ds_ij = p_ij * (dp_ij - delta_i),  delta_i = do_i . o_i  (= sum_j p_ij dp_ij)
    dq_i  = scale * sum_j ds_ij k_j,   dk_j = scale * sum_i ds_ij q_i

The kernels work in base 2: log2(e) is folded into the scale once so the inner loop uses
exp2. The log-sum-exp is stored in natural log; a row with every key masked stores +inf so
that exp2(s - lse) is 0 in the backward (its output and gradients are zeros, as torch's).

The same kernels serve padded batches (B, H, L, D) and packed varlen batches: with VARLEN,
program `b` reads its sequence's start and length from cu_seqlens and every tensor is
addressed as (1, H, total, D).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .backends import interpreting
from .philox import keep_bits
from .precompile import autotune

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Mask kinds: what the kernels read per tile.
MASK_NONE, MASK_KEY_PADDING, MASK_DENSE = 0, 1, 2


@triton.jit
def _dot(a, b, acc, EXACT_FP32: tl.constexpr):
    # fp32 inputs would default to TF32 on tensor cores: 10 mantissa bits, far outside the
    # parity bound against torch's fp32 matmul. fp16/bf16 use the tensor cores as they are.
    if EXACT_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _keep(seed, bh, rows, col0, LQ, LK, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys col0 .. col0 + BLOCK_N - 1 of query rows `rows` of head bh: each (batch*head, row)
    # has its own run of cdiv(LK, 4) Philox counters, four keys a counter (kernels/philox.py).
    # Forward, backward and the mask helper regenerate the same bits from the seed, so no mask
    # is ever stored. col0: a multiple of BLOCK_N (every caller's key tiles start there).
    base = (bh.to(tl.int64) * LQ + rows[:, None]) * ((LK + 3) // 4)
    return keep_bits(seed, base, col0, dropout_p, BLOCK_M, BLOCK_N)


@triton.jit
def _flat_pid(L, BLOCK: tl.constexpr):
    """(block start, batch*head) of this program on a flat 1-D grid of cdiv(L, BLOCK) * B*H
    programs, blocks fastest: the order a 2-D grid (blocks, B*H) runs in. B*H is not put on
    grid axis 1 because CUDA caps grid dims 1 and 2 at 65535: the launch failed once B*H
    passed that (e.g. varlen over 5462+ packed sequences x 12 heads, or B=4096 x H=16); the
    interpreter has no such limit. Axis 0 takes up to 2**31 - 1 programs."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(L, BLOCK)
    return (pid % blocks) * BLOCK, pid // blocks


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, LQ, LK, VARLEN: tl.constexpr):
    if VARLEN:
        # int64 starts: start * stride can pass 2**31 in a large packed batch.
        q0 = tl.load(CU_Q + b).to(tl.int64)
        q_len = (tl.load(CU_Q + b + 1) - q0).to(tl.int32)
        k0 = tl.load(CU_K + b).to(tl.int64)
        k_len = (tl.load(CU_K + b + 1) - k0).to(tl.int32)
    else:
        # Tensors, not Python ints: a length of 1 arrives as a constexpr, and older Triton
        # versions cannot return constexprs from a @jit function.
        zero = tl.program_id(0) * 0
        q0 = zero.to(tl.int64)
        q_len = zero + LQ
        k0 = zero.to(tl.int64)
        k_len = zero + LK
    return q0, q_len, k0, k_len



@triton.jit
def _program_bounds(CU_Q, CU_K, HEADS, LQ, LK, L, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """(block start, batch, head, q0, q_len, k0, k_len) of this program on a _flat_pid grid
    over L (LQ for query blocks, LK for key blocks) in blocks of BLOCK, HEADS heads a batch
    entry (query heads, or key/value heads on a key-block grid), and its sequence's bounds."""
    start, bh = _flat_pid(L, BLOCK)
    b = bh // HEADS
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, LQ, LK, VARLEN)
    return start, b, bh % HEADS, q0, q_len, k0, k_len

@triton.jit
def _key_range(mask_row, stride_mn, k_len, MASK_FLOAT: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) covering every attended key of a key-padding row, lo a multiple of BLOCK_N.

    Padded key blocks are then never loaded nor multiplied: a padded BERT batch does only
    the work of its real tokens. Reading the (Lk,) row costs a few bytes per key block.
    """
    first = tl.program_id(0) * 0 + k_len
    last = tl.program_id(0) * 0 - 1
    for start in range(0, k_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = cols < k_len
        m = tl.load(mask_row + cols * stride_mn, mask=ok, other=0)
        if MASK_FLOAT:
            live = ok & (m != float("-inf"))
        else:
            live = m != 0
        first = tl.minimum(first, tl.min(tl.where(live, cols, k_len), 0))
        last = tl.maximum(last, tl.max(tl.where(live, cols, -1), 0))
    return (first // BLOCK_N) * BLOCK_N, last + 1


@triton.jit
def _scores(
    q,
    k,
    rows,
    cols,
    row_ok,
    col_ok,
    mask_base,
    stride_mm,
    stride_mn,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    BOUNDARY: tl.constexpr,  # the tile may hold keys past the end or above the diagonal
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(s, to_scale): the base-2 scores of one (BLOCK_M, BLOCK_N) tile are s * to_scale, -inf
    where a key is not attended. s is left unscaled (to_scale = qk_scale) unless a float mask
    is added to the scaled scores (to_scale = 1): the callers scale inside exp2's argument,
    where scaling and shifting each score is one FMA (a select between a multiply and a
    subtract keeps them apart), and the forward scales its row max after taking it. Both need
    qk_scale > 0 (attention._positive_scale)."""
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), EXACT_FP32)
    to_scale = qk_scale
    if MASK_FLOAT:
        s = s * qk_scale
        to_scale = 1.0
    if MASK_KIND == 1:
        # Key padding: one (Lk,) row per batch, shared by every head and query row.
        mrow = tl.load(mask_base + cols * stride_mn, mask=col_ok, other=0)
        if MASK_FLOAT:
            s = s + mrow.to(tl.float32)[None, :] * 1.4426950408889634
        else:
            s = tl.where((mrow != 0)[None, :], s, float("-inf"))
    if MASK_KIND == 2:
        # int64: rows * stride_mm is int32 on a GPU and wraps once Lq * Lk >= 2**31 (a dense
        # (1, 1, L, L) mask at L >= 46341); the interpreter computes it in int64.
        mtile = tl.load(
            mask_base + rows[:, None].to(tl.int64) * stride_mm + cols[None, :].to(tl.int64) * stride_mn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0,
        )
        if MASK_FLOAT:
            s = s + mtile.to(tl.float32) * 1.4426950408889634
        else:
            s = tl.where(mtile != 0, s, float("-inf"))
    if BOUNDARY:
        # Interior tiles skip this select: it is per element, and the softmax's elementwise
        # work, not the dots, bounds attention at small head dims.
        allowed = col_ok[None, :] & (rows[:, None] >= 0)
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None])
        s = tl.where(allowed, s, float("-inf"))
    return s, to_scale


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
    seed, bh, rows, row_ok, d, d_ok, k_len, LQ, LK, qk_scale, dropout_p, lo, hi,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr,
    EXACT_FP32: tl.constexpr,
    BOUNDARY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The online-softmax loop over key blocks [lo, hi) of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < k_len
        if BOUNDARY:
            kv_mask = col_ok[:, None] & d_ok[None, :]
        else:
            kv_mask = (cols >= 0)[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # The row max of the unscaled scores, scaled after: each score is then scaled and
        # shifted in one FMA (the softmax's per-score work bounds attention at head dim 64).
        s, to_scale = _scores(q, k, rows, cols, row_ok, col_ok, mask_base, stride_mm, stride_mn, qk_scale,
                              CAUSAL, MASK_KIND, MASK_FLOAT, EXACT_FP32, BOUNDARY, BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, 1) * to_scale)
        # While a row has seen only masked keys its max is -inf; subtracting 0 instead keeps
        # exp2 at exactly 0 rather than NaN (-inf - -inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * to_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            # The softmax normaliser counts every key; dropout only thins what reaches V.
            p = tl.where(_keep(seed, bh, rows, start_n, LQ, LK, dropout_p, BLOCK_M, BLOCK_N), p, 0.0)
        acc = _dot(p.to(v.dtype), v, acc, EXACT_FP32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,  # q (B, H, Lq, D); k, v (B, H // GROUP, Lk, D); o like q; lse (B, H, Lq) fp32
    MASK,  # uint8 (bool) or float, addressed through its (broadcast) strides; unused if MASK_KIND == 0
    SEED,  # int64[1] Philox seed; unused without DROPOUT
    CU_Q, CU_K,  # int32 cu_seqlens; only with VARLEN
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mh, stride_mm, stride_mn,
    H,  # query heads
    GROUP,  # query heads per key/value head (GQA)
    LQ, LK,  # lengths (max lengths with VARLEN); also the dropout counter's row/col extents
    TUNE_BUCKET,  # power-of-two length bucket: the autotune key, so varlen does not retune per batch
    qk_scale,  # scale * log2(e)
    dropout_p,
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_D padded to a power of two
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_FLOAT: tl.constexpr,
    DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter only: bf16 tl.dot is wrong there, so compute in fp32
    EXACT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, b, h, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H, LQ, LK, LQ, VARLEN, BLOCK_M)
    if start_m >= q_len:
        return

    rows = start_m + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_D
    row_ok = rows < q_len
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = (h // GROUP).to(tl.int64)
    qrow = (q0 + rows).to(tl.int64)

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + qrow[:, None] * stride_qm + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k0 * stride_kn
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k0 * stride_vn
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = 0
    hi = k_len
    if MASK_KIND == 1:
        lo, hi = _key_range(MASK + b64 * stride_mb, stride_mn, k_len, MASK_FLOAT, BLOCK_N)
    if CAUSAL:
        # Blocks wholly above the diagonal (every key j > every row i) are never visited.
        hi = tl.minimum(hi, start_m + BLOCK_M)
    # Key blocks below `mid` are whole and (causal) wholly on or below the diagonal: no
    # bounds or causal select. The rest, at most a few blocks, take the checked path.
    if CAUSAL:
        mid = tl.minimum(hi, start_m)
    else:
        mid = hi
    mid = tl.maximum((mid // BLOCK_N) * BLOCK_N, lo)
    bh = b * H + h  # the dropout stream's (batch, head) index (_keep)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
        seed, bh, rows, row_ok, d, d_ok, k_len, LQ, LK, qk_scale, dropout_p, lo, mid,
        CAUSAL, MASK_KIND, MASK_FLOAT, DROPOUT, UPCAST, EXACT_FP32, False, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, mask_base, stride_mm, stride_mn,
        seed, bh, rows, row_ok, d, d_ok, k_len, LQ, LK, qk_scale, dropout_p, mid, hi,
        CAUSAL, MASK_KIND, MASK_FLOAT, DROPOUT, UPCAST, EXACT_FP32, True, BLOCK_M, BLOCK_N)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(dead, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(O + b64 * stride_ob + h64 * stride_oh + qrow[:, None] * stride_om + d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + qrow, lse, mask=row_ok)


@triton.jit
def _dropout_keep_kernel(
    OUT,  # uint8 (B*H, LQ, LK), contiguous; grid (B*H, cdiv(LQ, BLOCK_M), cdiv(LK, BLOCK_N))
    SEED,
    LQ, LK, dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # B*H on grid axis 0: axes 1 and 2 are capped at 65535 on CUDA.
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(tl.load(SEED), bh, rows, tl.program_id(2) * BLOCK_N, LQ, LK, dropout_p, BLOCK_M, BLOCK_N)
    offsets = (bh.to(tl.int64) * LQ + rows[:, None]) * LK + cols[None, :]
    tl.store(OUT + offsets, keep.to(tl.uint8), mask=(rows < LQ)[:, None] & (cols < LK)[None, :])


def _configs(gpu_list):
    # The interpreter cannot autotune over several configs, and big blocks keep its
    # programs x iterations cost down.
    if interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in gpu_list]


# Configs that fail for lack of shared memory (head dim 256 with big tiles) are skipped by
# the autotuner; the rest are timed once per key.
_FWD_GPU = [
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4),
    (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (128, 32, 4, 3),
]
_BWD_GPU = [
    (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3), (64, 32, 4, 3),
]
_FWD_GPU += [(64, 32, 4, 2), (32, 32, 4, 2)]  # the only ones that fit fp32 at head dim 256
_BWD_GPU += [(32, 32, 4, 2)]
_KEY = ["HEAD_D", "TUNE_BUCKET", "CAUSAL", "MASK_KIND", "DROPOUT", "VARLEN"]


def _prune(configs, named_args, **kwargs):
    """Drop configs whose tiles cannot fit before compiling them: ptxas spends minutes on a
    128 x 256 fp32 tile that then spills or fails anyway."""
    args = {**named_args, **kwargs}
    q = args["Q"]
    # The Hopper kernels may get a host TensorDescriptor (attention_hopper.py): its tensor is .base
    row_bytes = args["BLOCK_D"] * getattr(q, "base", q).element_size()

    def fits(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        smem = (m + 2 * n * max(c.num_stages - 1, 1)) * row_bytes
        acc_bytes_per_thread = max(m, 2 * n) * args["BLOCK_D"] * 4 // (c.num_warps * 32)
        return smem <= 160 * 1024 and acc_bytes_per_thread <= 512

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _tuned(gpu_list, kernel, atomic=False):
    # The atomic dK/dV kernel adds into DQ_ACC: every timed run of a config would add to what
    # the last left, so its autotuner zeroes it before each and once more after tuning. (Its
    # own tuner object: the plain pass gets a placeholder there, which must not be zeroed.)
    return autotune(_configs(gpu_list), _KEY, reset_to_zero=["DQ_ACC"] if atomic else None,
                    prune_configs_by={"early_config_prune": _prune})(kernel)


# The one-kernel backward (ONE_PASS; attention.VARIANTS["dq"] "fused") needs every key in one
# block: a tuner per key block, each config of it that wide (a config with fewer keys would
# leave dQ to a second block). Keyed by BLOCK_N; the first config is the untuned launch's.
# Short query tiles: the block's dK and dV (2 x keys x 64 fp32) stay in registers beside the
# tile's S, dP and dQ; these compile without spills for sm_90 and sm_80 at head dim 64, with
# and without dropout, where 64 x 64 tiles spilled 60-284 bytes and 64 x 128 ones 472-2516
# (tests/triton_compile_check.py, triton 3.9; under triton 3.6 all but one of the sm_80
# dropout compiles, 32 x 128 with 3 stages: 24 bytes).
_ONE_PASS_GPU = {
    64: [(32, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)],
    128: [(32, 128, 8, 2), (32, 128, 8, 3), (16, 128, 8, 2)],
}
ONE_PASS_BLOCKS = tuple(_ONE_PASS_GPU)  # the key counts the one-kernel backward takes, ascending

attn_fwd_tuned = _tuned(_FWD_GPU, _attn_fwd)
attn_fwd = _attn_fwd


def default_config(kind: str, block_d: int, itemsize: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) used without autotuning: under the
    interpreter, and on a GPU with FUSEFORMER_AUTOTUNE=0 (CI, where compiling every config
    of every case would dominate). Sized to fit H100 shared memory at every head dim. kind
    "fwd", "bwd", or a key block of ONE_PASS_BLOCKS (the one-kernel backward's)."""
    if isinstance(kind, int):  # the one-kernel backward over `kind` keys (_ONE_PASS_GPU)
        return (64, kind, 4, 1) if interpreting() else _ONE_PASS_GPU[kind][0]
    if interpreting():
        return 64, 64, 4, 1
    wide = block_d * itemsize  # bytes of one row of q/k/v
    if kind == "fwd":
        return (128, 64, 8, 3) if wide <= 256 else (64, 32, 4, 2)
    return (64, 64, 4, 2) if wide <= 256 else (32, 32, 4, 1)
dropout_keep_kernel = _dropout_keep_kernel
