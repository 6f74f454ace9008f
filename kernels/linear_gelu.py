"""Linear + bias + GELU in Triton: one matmul with the bias and GELU fused into its epilogue.

    out = gelu(x @ W^T + b)      W stored (out_features, in_features), as nn.Linear stores it

Launcher contract (the "cuda" backend registers launchers with exactly these signatures):

    forward(x2d, weight, bias, approximate, save_preact) -> (out, preact or None)
        x2d (M, K) with any strides, weight (N, K) with any strides, bias (N,) or None;
        preact = x @ W^T + b in the dtype of x, written only when save_preact is True.
    backward(dout, x2d, weight, preact, approximate, has_bias) -> (dx, dweight, dbias or None)
    unsupported(dtype, in_features, out_features, approximate, requires_grad) -> None or reason

Gradient maths, with pre = x @ W^T + b and dpre = dout * gelu'(pre):

    gelu(u)  = u * Phi(u)                     Phi(u) = (1 + erf(u / sqrt 2)) / 2
    gelu'(u) = Phi(u) + u * exp(-u^2 / 2) / sqrt(2 pi)
    tanh:  gelu(u) = u * sigmoid(2 z),  z = sqrt(2/pi) * (u + 0.044715 u^3)   (as 1 + tanh z = 2 sigmoid(2 z))
           gelu'(u) = s + 2 u s (1 - s) z',   s = sigmoid(2 z),  z' = sqrt(2/pi) * (1 + 3 * 0.044715 u^2)
    dx = dpre @ W,   dW = dpre^T @ x,   db = sum over rows of dpre

dpre comes from one fused elementwise kernel; the two backward matmuls are cuBLAS.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import backends, reference
from ._util import as_rows, cdiv, device_guard, launch_tuned, new_output, next_pow2
from .backends import Impl
from .checks import check_same, check_tensor, same_floats

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_PI = math.sqrt(2.0 / math.pi)
APPROXIMATIONS = ("none", "tanh")


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


@triton.jit
def _gelu(u, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        return u * tl.sigmoid(2.0 * z)
    return 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))


@triton.jit
def _gelu_grad(u, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        s = tl.sigmoid(2.0 * z)
        dz = 0.7978845608028654 * (1.0 + 0.134145 * u * u)
        return s + 2.0 * u * s * (1.0 - s) * dz
    cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    return cdf + u * 0.3989422804014327 * tl.exp(-0.5 * u * u)


# Keyed on TUNE_M (M rounded up to a power of two), not M: with unpadded batches every call
# has another token count, and a key on M would rerun the whole autotune sweep each time.
@triton.autotune(configs=_configs(), key=["TUNE_M", "N", "K", "HAS_BIAS", "SAVE_PRE", "APPROX_TANH"])
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
    tl.store(OUT + offs, _gelu(acc, APPROX_TANH).to(OUT.dtype.element_ty), mask=out_mask)


@triton.jit
def _gelu_bwd(
    DOUT,  # (numel,) gradient of the output, contiguous
    PRE,  # (numel,) saved pre-activation
    DPRE,  # (numel,) dout * gelu'(pre)
    numel,
    APPROX_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(PRE + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DPRE + offs, (g * _gelu_grad(u, APPROX_TANH)).to(DPRE.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def forward(x2d, weight, bias, approximate, save_preact):
    M, K = x2d.shape
    N = weight.shape[0]
    out = new_output((M, N), x2d.dtype, x2d.device)
    pre = new_output((M, N), x2d.dtype, x2d.device) if save_preact else None
    if M == 0 or N == 0:
        return out, pre
    if K == 0:
        # An empty sum: pre = bias (or 0). No kernel needed for a degenerate matmul.
        base = bias.expand(M, N) if bias is not None else torch.zeros((M, N), dtype=x2d.dtype, device=x2d.device)
        out.copy_(torch.nn.functional.gelu(base, approximate=approximate))
        if pre is not None:
            pre.copy_(base)
        return out, pre
    interp = backends.interpreting()
    # fp32 inputs: exact ("ieee") products as torch computes them, unless torch itself is
    # allowed tf32. 16-bit inputs keep Triton's default; the interpreter ignores the choice.
    exact = x2d.dtype == torch.float32 and not (not interp and torch.backends.cuda.matmul.allow_tf32)
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    tune_m = next_pow2(M)
    has_bias, approx_tanh = bias is not None, approximate == "tanh"
    # Everything Triton's autotuner keys on (its key arguments and the tensors' dtypes).
    key = (x2d.dtype, tune_m, N, K, has_bias, pre is not None, approx_tanh)
    launch_tuned(
        _linear_gelu_fwd, _linear_gelu_fwd.fn, key, grid,
        x2d,
        weight,
        bias if bias is not None else weight,  # any pointer: HAS_BIAS=False never reads it
        out,
        pre if pre is not None else out,
        M,
        N,
        K,
        x2d.stride(0),
        x2d.stride(1),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        tune_m,
        HAS_BIAS=has_bias,
        SAVE_PRE=pre is not None,
        APPROX_TANH=approx_tanh,
        UPCAST=interp,
        PRECISION="ieee" if exact else "tf32",
    )
    return out, pre


def gelu_backward(dout: torch.Tensor, preact: torch.Tensor, approximate: str) -> torch.Tensor:
    """dout * gelu'(preact), elementwise, in the dtype of preact."""
    dout = dout.contiguous()
    dpre = new_output(preact.shape, preact.dtype, preact.device)
    numel = preact.numel()
    if numel:
        block = 4096
        _gelu_bwd[(cdiv(numel, block),)](
            dout, preact, dpre, numel, APPROX_TANH=approximate == "tanh", BLOCK=block, num_warps=8
        )
    return dpre


def backward(dout, x2d, weight, preact, approximate, has_bias):
    dpre = gelu_backward(dout, preact, approximate)  # (M, N)
    dx = dpre @ weight  # (M, K)
    dw = dpre.t() @ x2d  # (N, K)
    db = dpre.sum(0, dtype=torch.float32).to(dpre.dtype) if has_bias else None
    return dx, dw, db


def unsupported(dtype=None, in_features=None, out_features=None, approximate="none", requires_grad=False, **_):
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the kernel takes float16, bfloat16, float32)"
    return None


backends.register_impl("linear_gelu", "triton", Impl(forward, backward, unsupported))


# ----------------------------------------------------------------------------- shared by both paths


def _run_forward(backend, x, weight, bias, approximate, save_preact):
    # reshape keeps views where it can; the kernel reads any 2-D strides, so a transposed
    # view of x or W is never copied.
    x2d = x if x.dim() == 2 else as_rows(x)
    with device_guard(x):
        out, pre = backends.get_impl("linear_gelu", backend).forward(x2d, weight, bias, approximate, save_preact)
    if x.dim() != 2:
        shape = (*x.shape[:-1], weight.shape[0])
        out, pre = out.view(shape), None if pre is None else pre.view(shape)
    return out, pre


def _run_backward(backend, dout, x, weight, preact, approximate, has_bias):
    with device_guard(dout):
        dx, dw, db = backends.get_impl("linear_gelu", backend).backward(
            as_rows(dout), as_rows(x), weight, as_rows(preact), approximate, has_bias
        )
    return dx.view(x.shape), dw, db


# ----------------------------------------------------------------------------- eager path


class LinearGeluFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly, no dispatcher in between."""

    @staticmethod
    def forward(ctx, x, weight, bias, approximate, backend):
        out, pre = _run_forward(backend, x, weight, bias, approximate, True)
        ctx.save_for_backward(x, weight, pre)
        ctx.approximate, ctx.has_bias, ctx.backend = approximate, bias is not None, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, pre = ctx.saved_tensors
        dx, dw, db = _run_backward(ctx.backend, dout, x, weight, pre, ctx.approximate, ctx.has_bias)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.


@torch.library.custom_op("fuseformer::linear_gelu", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    approximate: str,
    save_preact: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, pre = _run_forward(backend, x, weight, bias, approximate, save_preact)
    return out, pre if pre is not None else x.new_empty(0)


@_linear_gelu_op.register_fake
def _(x, weight, bias, approximate, save_preact, backend):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape) if save_preact else x.new_empty(0)


@torch.library.custom_op("fuseformer::linear_gelu_backward", mutates_args=())
def _linear_gelu_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    preact: torch.Tensor,
    approximate: str,
    has_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _run_backward(backend, dout, x, weight, preact, approximate, has_bias)
    return dx, dw, db if db is not None else dout.new_empty(0)


@_linear_gelu_bwd_op.register_fake
def _(dout, x, weight, preact, approximate, has_bias, backend):
    return torch.empty_like(x), torch.empty_like(weight), dout.new_empty(weight.shape[0] if has_bias else 0)


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, save_preact, backend = inputs
    if not save_preact:
        raise RuntimeError("linear_gelu: gradients need the pre-activation saved (save_preact=True)")
    ctx.save_for_backward(x, weight, output[1])
    ctx.approximate, ctx.has_bias, ctx.backend = approximate, bias is not None, backend


def _backward(ctx, dout, dpre_unused):
    x, weight, preact = ctx.saved_tensors
    dx, dw, db = _linear_gelu_bwd_op(dout, x, weight, preact, ctx.approximate, ctx.has_bias, ctx.backend)
    return dx, dw, db if ctx.has_bias else None, None, None, None


_linear_gelu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op


def _check(x, weight, bias, approximate):
    if not (same_floats(x, weight, bias) and x.dim() >= 1 and weight.dim() == 2):
        check_tensor("x", x, min_dim=1)
        check_tensor("weight", weight, dim=2)
        check_same("weight", weight, "x", x)
        if bias is not None:
            check_tensor("bias", bias, dim=1)
            check_same("bias", bias, "x", x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {x.shape[-1]}) to match the last dim of x, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) (out_features), got {tuple(bias.shape)}")
    if approximate != "none" and approximate != "tanh":
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def linear_gelu(x, weight, bias=None, approximate="none", *, backend=None):
    """gelu(x @ weight^T + bias) == F.gelu(F.linear(x, weight, bias), approximate=approximate)."""
    _check(x, weight, bias, approximate)
    requires_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    name = backends.resolve(
        "linear_gelu", x.device, backend, dtype=x.dtype, in_features=weight.shape[1],
        out_features=weight.shape[0], approximate=approximate, requires_grad=requires_grad,
    )
    if name == "torch":
        return reference.linear_gelu(x, weight, bias, approximate)
    if torch.compiler.is_compiling():
        return _linear_gelu_op(x, weight, bias, approximate, requires_grad, name)[0]
    if requires_grad:
        return LinearGeluFunction.apply(x, weight, bias, approximate, name)
    return _run_forward(name, x, weight, bias, approximate, False)[0]
