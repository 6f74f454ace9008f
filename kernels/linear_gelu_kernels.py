"""The Triton kernels of linear_gelu (launchers and autograd: kernels/linear_gelu.py).

    pre = x @ W^T + b,   out = gelu(pre)          W stored (out_features, in_features)

Gradient maths, with dpre = dout * gelu'(pre) (called dZ in the issue):

    gelu(u)  = u * Phi(u)                     Phi(u) = (1 + erf(u / sqrt 2)) / 2
    gelu'(u) = Phi(u) + u * exp(-u^2 / 2) / sqrt(2 pi)
    tanh:  gelu(u) = u * sigmoid(2 z),  z = sqrt(2/pi) * (u + 0.044715 u^3)   (as 1 + tanh z = 2 sigmoid(2 z))
           gelu'(u) = s + 2 u s (1 - s) z',   s = sigmoid(2 z),  z' = sqrt(2/pi) * (1 + 3 * 0.044715 u^2)
    dx = dpre @ W,   dW = dpre^T @ x,   db = sum over rows of dpre

Kernels:
- `_linear_gelu_fwd`: the portable matmul (pointer loads, any strides, sm_80 and sm_90),
  one program per output tile, grouped tile order. Measured on the H200.
- `_linear_gelu_tma`: a persistent matmul for sm_90: tensor descriptors (TMA loads into
  shared memory, wgmma), a grid of one program per SM walking the tiles in grouped order
  (GROUP_M rows of tiles share their W tiles in L2), bias + GELU applied to the fp32
  accumulator in registers and stored through a descriptor. With DGELU it is the backward's
  recompute path instead: the same GEMM rebuilds pre and the epilogue writes
  dpre = dout * gelu'(pre) plus per-tile column sums of dpre (db's partials).
- `_gelu_bwd`: dpre elementwise (the measured backward), `_gelu_bwd_db`: dpre and db's
  partial column sums in one pass over dout and pre (no second read of dpre for db).
"""
import math

import triton
import triton.language as tl

from . import backends
from .precompile import autotune


def _configs():
    if backends.interpreting():
        # The interpreter rejects several configs, and its cost grows with the number of
        # programs and loop iterations: one config of big blocks.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    # H100: 128x256 / 128x128 tiles feed the tensor cores; the smaller ones cover skinny
    # problems (small M or N) where big tiles would leave SMs idle.
    shapes = [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (128, 128, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, s, w in shapes
    ]


# ----------------------------------------------------------------------------- GELU maths
# Two ways to evaluate GELU in the kernels' fp32 registers, picked by the FAST_GELU constexpr:
#
# exact (FAST_GELU False): erf from libdevice; the tanh form's sigmoid by tl.sigmoid.
# fast (FAST_GELU True, 16-bit outputs only): both GELUs in one form,
#       Phi(u) = sigmoid(2 z(u)),  gelu(u) = u s,  gelu'(u) = s + 2 u s (1 - s) z'(u),  s = sigmoid(2 z),
#   z(u) = u P(u^2), an odd polynomial. For tanh, P is the formula's own, sqrt(2/pi) (1 + 0.044715 w),
#   as (1 + tanh z) / 2 = sigmoid(2 z). For erf, P is a degree-4 polynomial in w = u^2, fitted
#   (minimax of |u| |Phi error|, scipy, 2026-11-28) so that z(u) ~ atanh(erf(u / sqrt 2)); z' is
#   that polynomial's own derivative, so gelu' needs no exp of its own. sigmoid(2 z) is then
#   PTX's ex2.approx.ftz and rcp.approx.ftz (one MUFU op each, a few ulp); the interpreter, which
#   runs no PTX, computes the same formulas with tl.exp2 and a division.
#   Accuracy of the fast erf GELU against float64, u in [-14, 14]: gelu within 3.2e-6
#   absolute, gelu' within 1.6e-5 (tests/test_linear_gelu.py, test_fast_gelu_maths): ~150x
#   below half an fp16 ulp at 1 (4.9e-4), and ~150x closer to erf GELU than the tanh formula
#   is (4.7e-4). The price is the far negative tail, where |gelu| < 1.3e-4 (u < -4): the
#   relative error grows there (2% at u = -4, most of the value by u = -5), still under 3.2e-6
#   absolute. gelu="exact" keeps fp32's accuracy there; so does every float32 call.
# Why it matters: the epilogue of the TMA GEMM is not overlapped with its MMAs, so every
#   instruction per element shows. At 16384 x 768 x 3072 the H100's tanh forward took 0.167 ms
#   and its erf one (libdevice) 0.195; the H200's (a3eeca9, a degree-9 erfc polynomial then)
#   0.131 and 0.164. SASS for sm_90 (nvdisasm) of an elementwise bf16 kernel, loads and stores
#   included, per element: gelu erf 14.5 (was 21.5 with the erfc polynomial, 36.5 libdevice),
#   tanh 11.5 (was 13.5); gelu' erf 24 (was 27.5, with a third MUFU op), tanh 18 (was 24).

_PTX = tl.constexpr(not backends.interpreting())
_LOG2E = 1.4426950408889634
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# P(w) of z(u) = u P(u^2), lowest power first.
_TANH_P = (_SQRT_2_OVER_PI, _SQRT_2_OVER_PI * 0.044715)
_ERF_P = (0.7978281453743756, 0.03646875266574104, -1.2483601351717986e-04, -3.0586269090783566e-05,
          1.1193979563716294e-06)
# The kernels evaluate -2 log2(e) z (the exponent of sigmoid(2 z) = 1 / (1 + 2^(-2 z log2 e)))
# and 2 z' directly: the constant factors are folded into the coefficients, one multiply
# fewer per element each.
_ARG = tl.constexpr(-2.0 * _LOG2E)
_NEG_LN2 = tl.constexpr(-math.log(2.0))  # 2 z = arg * -ln 2
_TA0, _TA1 = (tl.constexpr(c * _ARG) for c in _TANH_P)
_EA0, _EA1, _EA2, _EA3, _EA4 = (tl.constexpr(c * _ARG) for c in _ERF_P)
# 2 z'(u) = 2 d(u P(u^2))/du = sum 2 (2k + 1) p_k w^k.
_TD0, _TD1 = (tl.constexpr(2 * (2 * k + 1) * c) for k, c in enumerate(_TANH_P))
_ED0, _ED1, _ED2, _ED3, _ED4 = (tl.constexpr(2 * (2 * k + 1) * c) for k, c in enumerate(_ERF_P))


@triton.jit
def _approx(x, OP: tl.constexpr):
    """PTX's OP.approx.ftz.f32, OP "rcp" or "ex2": one MUFU instruction (the interpreter: the
    exact operation)."""
    if _PTX:
        return tl.inline_asm_elementwise(OP + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    elif OP == "rcp":
        return 1.0 / x
    else:
        return tl.exp2(x)


# Tensors first in every product and sum below: the interpreter keeps a module-level constexpr
# on the left as a constexpr wrapping the tensor, which exp2 and the division refuse.
@triton.jit
def _sigmoid_2z(u, APPROX_TANH: tl.constexpr, FAST: tl.constexpr):
    """Phi(u) = sigmoid(2 z(u)), z: tanh's formula or the erf fit (above)."""
    w = u * u
    if APPROX_TANH:
        arg = u * (w * _TA1 + _TA0)
    else:
        arg = u * ((((w * _EA4 + _EA3) * w + _EA2) * w + _EA1) * w + _EA0)
    if FAST:
        return _approx(_approx(arg, "ex2") + 1.0, "rcp")
    # tl.sigmoid, not 1 / (1 + 2^arg): an fp32 division in Triton is IEEE's div.rn, a
    # subroutine call whose calling convention spilled 21 KB in a portable sm_80 GEMM tile.
    return tl.sigmoid(arg * _NEG_LN2)


@triton.jit
def _two_dz(u, APPROX_TANH: tl.constexpr):
    """2 z'(u)."""
    w = u * u
    if APPROX_TANH:
        return w * _TD1 + _TD0
    return (((w * _ED4 + _ED3) * w + _ED2) * w + _ED1) * w + _ED0


@triton.jit
def _gelu(u, APPROX_TANH: tl.constexpr, FAST: tl.constexpr):
    if APPROX_TANH or FAST:
        return u * _sigmoid_2z(u, APPROX_TANH, FAST)
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u, APPROX_TANH: tl.constexpr, FAST: tl.constexpr):
    if APPROX_TANH or FAST:
        # s + 2 u s (1 - s) z', with s (1 - s) as one fma.
        s = _sigmoid_2z(u, APPROX_TANH, FAST)
        return (s - s * s) * (u * _two_dz(u, APPROX_TANH)) + s
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


# Keyed on TUNE_M (M rounded up to a power of two), not M: with unpadded batches every call
# has another token count, and a key on M would rerun the whole autotune sweep each time.
@autotune(_configs(), ["TUNE_M", "N", "K", "HAS_BIAS", "SAVE_PRE", "APPROX_TANH", "FAST_GELU"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _linear_gelu_fwd(
    X,  # (M, K) input
    W,  # (N, K) weight, read as W^T through its strides (no transposed copy)
    B,  # (N,) bias, read only with HAS_BIAS
    OUT,  # (M, N) gelu(pre)
    PRE,  # (M, N) pre-activation, written only with SAVE_PRE
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,  # row stride of OUT and PRE (both contiguous (M, N))
    TUNE_M,  # next_pow2(M): the autotune key only, unused by the kernel
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    FAST_GELU: tl.constexpr,  # the fast GELU maths (above)
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,  # "ieee" for fp32 products as exact as torch's; else "tf32" (the default)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # rows of tiles walked together so their W tiles stay in L2
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones, so the main loop needs no M/N masks;
    # their results are dropped by the masked store.
    rm_safe = rm % M
    rn_safe = rn % N
    # int64 on both axes: a transposed view of x has stride_xk = M, and rk * M (or the step
    # BLOCK_K * M below) is int32 on a GPU, wrapping past M ~ 2**31 / BLOCK_K (33M rows).
    # Computed once, outside the K loop; the interpreter never shows it (it works in int64).
    x_ptrs = X + rm_safe[:, None].to(tl.int64) * stride_xm + rk[None, :].to(tl.int64) * stride_xk
    w_ptrs = W + rk[:, None].to(tl.int64) * stride_wk + rn_safe[None, :].to(tl.int64) * stride_wn
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K  # tl.cast: a stride of 1 arrives as a constexpr
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rk[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=rk[:, None] < k_left, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step

    if HAS_BIAS:
        acc += tl.load(B + rn_safe).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if SAVE_PRE:
        pre = acc.to(PRE.dtype.element_ty)
        tl.store(PRE + offs, pre, mask=out_mask)
        # The backward sees the rounded pre-activation; apply GELU to the same value.
        acc = pre.to(tl.float32)
    tl.store(OUT + offs, _gelu(acc, APPROX_TANH, FAST_GELU).to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _gelu_bwd(
    DOUT,  # (numel,) gradient of the output, contiguous
    PRE,  # (numel,) saved pre-activation
    DPRE,  # (numel,) dout * gelu'(pre)
    numel,
    APPROX_TANH: tl.constexpr,
    FAST_GELU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DPRE + offs, (g * _gelu_grad(u, APPROX_TANH, FAST_GELU)).to(DPRE.dtype.element_ty), mask=mask)




def _tma_configs():
    if backends.interpreting():
        # SPLIT_N=4 (the GPU's widest tiles' epilogue); tests patch in 1 and 2.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "SPLIT_N": 4}, num_warps=4,
                              num_stages=1)]
    # sm_90: 128-row tiles for wgmma (a warpgroup covers 64 rows), 64-wide K steps of
    # 128-byte rows (the TMA swizzle width), 3-4 stages of shared memory in flight. SPLIT_N=4
    # where the whole-tile epilogue spilled (~1.3 KB) and halves still spilled under Triton 3.6
    # (40-96 B); tests/test_triton_compile.py fails on any spill.
    shapes = [
        # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SPLIT_N
        (128, 256, 64, 3, 8, 4),
        (128, 128, 64, 4, 8, 1),
        (128, 128, 64, 4, 4, 4),
        (128, 64, 64, 4, 4, 1),
        (64, 128, 64, 4, 4, 1),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_N": split}, num_warps=w,
                      num_stages=s)
        for bm, bn, bk, s, w, split in shapes
    ]


@triton.jit
def _tile_coords(tile, per_group, tiles_m, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M rows of tiles are walked column by column, so the programs
    # running at once share W tiles (and x tiles) in L2 instead of streaming all of W per row.
    group = tile // per_group
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_rows
    pid_n = (tile % per_group) // group_rows
    return pid_m, pid_n


# reset_to_zero: configs differ in BLOCK_M, so in how many rows of DB_PART they write (the
# buffer has rows for the smallest); the autotuner zeroes it before each trial and before the
# final launch, so rows a trial of a smaller tile wrote cannot linger into db.
@autotune(_tma_configs(), ["TUNE_M", "N", "K", "HAS_BIAS", "SAVE_PRE", "APPROX_TANH", "FAST_GELU", "DGELU"],
          reset_to_zero=["DB_PART"])
@triton.jit
def _linear_gelu_tma(
    X,  # (M, K) input, unit column stride, row stride a multiple of 16 bytes
    W,  # (N, K) weight, unit column stride, row stride a multiple of 16 bytes
    B,  # (N,) bias, read only with HAS_BIAS
    OUT,  # (M, N) contiguous: gelu(pre), or dpre with DGELU
    PRE,  # (M, N) contiguous pre-activation, written only with SAVE_PRE
    DOUT,  # (M, N) contiguous gradient of the output, read only with DGELU
    DB_PART,  # (cdiv(M, BLOCK_M), N) float32 column sums of dpre per tile row, written with DGELU and HAS_BIAS
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    TUNE_M,  # next_pow2(M): the autotune key only
    HAS_BIAS: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    APPROX_TANH: tl.constexpr,
    FAST_GELU: tl.constexpr,  # the fast GELU maths (above)
    DGELU: tl.constexpr,  # backward recompute: write dout * gelu'(pre) instead of gelu(pre)
    TMA_STORE: tl.constexpr,  # OUT/PRE rows are 16-byte multiples: store through descriptors
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_N: tl.constexpr,  # 1, 2 or 4: the epilogue works on that many column slices
):
    # Descriptors built on the device (a TMA tensor map each, in the global scratch that
    # triton.set_allocator provides): out-of-bounds rows and the K tail read as zeros, so the
    # main loop has no masks at all.
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    out_desc = OUT  # placeholders the epilogue never touches without TMA_STORE / SAVE_PRE
    pre_desc = PRE
    if TMA_STORE:
        out_desc = tl.make_tensor_descriptor(OUT, shape=[M, N], strides=[N, 1],
                                             block_shape=[BLOCK_M, BLOCK_N // SPLIT_N])
        if SAVE_PRE:
            pre_desc = tl.make_tensor_descriptor(PRE, shape=[M, N], strides=[N, 1],
                                                 block_shape=[BLOCK_M, BLOCK_N // SPLIT_N])
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * tiles_n
    programs = tl.num_programs(0)
    # The epilogue recomputes its tile's coordinates from a counter of its own, so that the
    # software pipeliner, which overlaps one tile's epilogue with the next tile's loads after
    # flattening the two loops, does not carry the prologue's values across.
    tile_c = tl.program_id(0) - programs
    for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, programs, flatten=True):
        pid_m, pid_n = _tile_coords(tile, per_group, tiles_m, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = x_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b.T, acc, input_precision=PRECISION)

        tile_c += programs
        pid_m, pid_n = _tile_coords(tile_c, per_group, tiles_m, GROUP_M)
        off_n = pid_n * BLOCK_N
        if SPLIT_N == 1:
            _epilogue(acc, pid_m, off_n, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                      HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, BLOCK_N)
        else:
            # The epilogue in column slices (halves, or quarters): the GELU temporaries of a
            # slice are live at once instead of a whole tile's (128 x 256 tiles spilled
            # ~1.3 KB without this), and each slice goes out through a descriptor its width.
            h0, h1 = _halves(acc, BLOCK_M, BLOCK_N)
            if SPLIT_N == 2:
                _epilogue(h0, pid_m, off_n, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, BLOCK_N // 2)
                _epilogue(h1, pid_m, off_n + BLOCK_N // 2, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, BLOCK_N // 2)
            else:
                q: tl.constexpr = BLOCK_N // 4
                q0, q1 = _halves(h0, BLOCK_M, BLOCK_N // 2)
                q2, q3 = _halves(h1, BLOCK_M, BLOCK_N // 2)
                _epilogue(q0, pid_m, off_n, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, q)
                _epilogue(q1, pid_m, off_n + q, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, q)
                _epilogue(q2, pid_m, off_n + 2 * q, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, q)
                _epilogue(q3, pid_m, off_n + 3 * q, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N,
                          HAS_BIAS, SAVE_PRE, APPROX_TANH, FAST_GELU, DGELU, TMA_STORE, BLOCK_M, q)


@triton.jit
def _halves(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    # (ROWS, COLS) -> its left and right (ROWS, COLS // 2) halves, in registers.
    return tl.split(tl.permute(tl.reshape(t, (ROWS, 2, COLS // 2)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, pid_m, off_n, B, OUT, PRE, DOUT, DB_PART, out_desc, pre_desc, M, N, HAS_BIAS: tl.constexpr,
              SAVE_PRE: tl.constexpr, APPROX_TANH: tl.constexpr, FAST_GELU: tl.constexpr, DGELU: tl.constexpr,
              TMA_STORE: tl.constexpr,
              BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """bias + GELU (or dout * gelu') on the fp32 accumulator of columns off_n + [0, WIDTH)."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, WIDTH)
    nmask = rn < N
    mask = (rm[:, None] < M) & nmask[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    # The rounded pre-activation: what the store path saves and the backward reads, so
    # the forward's GELU and the recompute path's gelu' see the same value as it does.
    pre = acc.to(OUT.dtype.element_ty)
    u = pre.to(tl.float32)
    if DGELU:
        g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        res = (g * _gelu_grad(u, APPROX_TANH, FAST_GELU)).to(OUT.dtype.element_ty)
        if HAS_BIAS:
            part = tl.sum(tl.where(mask, res.to(tl.float32), 0.0), axis=0)
            tl.store(DB_PART + pid_m.to(tl.int64) * N + rn, part, mask=nmask)
    else:
        if not SAVE_PRE:
            u = acc  # nothing saved: GELU of the unrounded sum, one rounding fewer
        res = _gelu(u, APPROX_TANH, FAST_GELU).to(OUT.dtype.element_ty)
    if TMA_STORE:
        out_desc.store([pid_m * BLOCK_M, off_n], res)
        if SAVE_PRE:
            pre_desc.store([pid_m * BLOCK_M, off_n], pre)
    else:
        tl.store(OUT + offs, res, mask=mask)
        if SAVE_PRE:
            tl.store(PRE + offs, pre, mask=mask)


@triton.jit
def _gelu_bwd_db(
    DOUT,  # (M, N) gradient of the output, contiguous
    PRE,  # (M, N) saved pre-activation, contiguous
    DPRE,  # (M, N) dout * gelu'(pre)
    DB_PART,  # (programs along M, N) float32 column sums of dpre, written only with HAS_BIAS
    M,
    N,
    APPROX_TANH: tl.constexpr,
    FAST_GELU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Grid (programs along M, column blocks): each program walks every programs-th row block
    # of one column block, so its column sums cover a fixed set of rows (deterministic).
    pid_m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, M, tl.num_programs(0) * BLOCK_M):
        rm = start + tl.arange(0, BLOCK_M)
        mask = (rm < M)[:, None] & nmask[None, :]
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        u = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        d = (g * _gelu_grad(u, APPROX_TANH, FAST_GELU)).to(DPRE.dtype.element_ty)
        tl.store(DPRE + offs, d, mask=mask)
        if HAS_BIAS:
            # db sums the rounded dpre, as torch's dpre.sum(0) would: the same values feed
            # both matmuls and the bias gradient.
            acc += tl.sum(tl.where(mask, d.to(tl.float32), 0.0), axis=0)
    if HAS_BIAS:
        tl.store(DB_PART + pid_m.to(tl.int64) * N + rn, acc, mask=nmask)
