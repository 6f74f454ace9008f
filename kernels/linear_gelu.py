"""Linear + bias + GELU in Triton: one matmul with the bias and GELU fused into its epilogue.

    out = gelu(x @ W^T + b)      W stored (out_features, in_features), as nn.Linear stores it

Launcher contract (the "cuda" backend registers launchers with exactly these signatures):

    forward(x2d, weight, bias, approximate, save_preact) -> (out, preact or None)
        x2d (M, K) with any strides, weight (N, K) with any strides, bias (N,) or None;
        preact = x @ W^T + b in the dtype of x, written only when save_preact is True.
        The triton launcher also takes a contiguous x of any rank (see _rows) and then returns
        out/preact in x's leading shape.
    backward(dout, x2d, weight, preact, approximate, has_bias) -> (dx, dweight, dbias or None)
    unsupported(dtype, in_features, out_features, approximate, requires_grad) -> None or reason

The kernels and the gradient maths: kernels/linear_gelu_kernels.py.

Variants (VARIANT; each read at import from an environment variable, changed with
set_variant / the `variant` context manager). The defaults are the paths the GPU runs measured
fastest (H100, bf16, 16384 x 768 -> 3072, bench/results/h100/):
    forward  "auto" (FUSEFORMER_LINEAR_GELU_FWD)  "tma" for inference (no pre-activation to
                        store), "portable" when autograd needs pre: the TMA forward took 0.195
                        against 0.219 ms (erf) and 0.167 against 0.189 (tanh), but forward +
                        backward with it 0.672 against 0.624.
             "portable" `_linear_gelu_fwd`, one program per tile.
             "tma"      `_linear_gelu_tma`, persistent + TMA + wgmma, on sm_90+ (and in the
                        interpreter) for fp16/bf16 when x and W have unit column strides and
                        16-byte aligned rows; anything else takes "portable".
    dgelu    "elementwise" (FUSEFORMER_LINEAR_GELU_DGELU)  dpre by `_gelu_bwd`, db by torch.
             "fused_db"    `_gelu_bwd_db`: dpre and db's partials in one pass, summed by
                           kernels/reduce.py (one read of dpre fewer: 2 bytes per element).
    preact   "store" (FUSEFORMER_LINEAR_GELU_PREACT)  the forward saves pre = x W^T + b for the
                        backward: N * itemsize bytes per token kept from forward to backward
                        (BERT-base FFN, N = 3072, bf16: 6144 B per token, 96 MiB at 16384
                        tokens; 1024 -> 4096: 8192 B per token), plus its write and read.
             "recompute" nothing saved but x (which dW needs anyway); the backward runs the
                        forward GEMM again (2 * N * K FLOPs per token, +50% of the backward's
                        4 * N * K) with the dgelu epilogue: `_linear_gelu_tma` with DGELU when
                        the TMA path applies, else the portable GEMM into a temporary pre.
                        Triton backend only (the cuda backend's launchers need pre).
    gelu     "fast" (FUSEFORMER_LINEAR_GELU_MATH; the default since the H200 run of
                     2026-11-27, bench/results/h200/2026-11-27-5e53e2b/: faster in 4 of 4
                     cases, eager geomean 1.08x, CUDA-graph 1.12x, erf forward 0.1652
                     against 0.1929 ms at 16384 x 768 -> 3072) for fp16/bf16 (float32 stays
                     exact): both GELUs as u sigmoid(2 z(u)) on two special-function ops
                     (ex2.approx, rcp.approx), z the tanh formula's or, for erf, a polynomial
                     fitted to atanh(erf(u / sqrt 2)), in every GELU and GELU' of the kernels
                     (forward epilogues, dgelu passes): erf GELU in 14.5 SASS instructions per element
                     (an erfc polynomial until 2026-11-28: 21.5; libdevice: 36.5), tanh in
                     11.5. erf GELU within 3.2e-6 of float64, GELU' within 1.6e-5;
                     linear_gelu_kernels.py has the maths and the accuracy.
             "exact" libdevice's erf, sigmoid by an IEEE division.
    tanh     "cublaslt" (FUSEFORMER_LINEAR_GELU_TANH) tanh GELU without a pre-activation to
                        store (inference), fp16/bf16 with a bias on a GPU: cuBLASLt's GELU
                        epilogue (torch._addmm_activation, the tanh approximation on CUDA), one
                        GEMM as ours, which the H200 run timed faster than our best kernel
                        (16384 x 768 -> 3072: 0.1358 against 0.1588 ms for the TMA kernel with
                        the fast maths, bench/results/h200/2026-11-27-5e53e2b/). The cuda
                        backend's Linear+GELU takes that epilogue for tanh too. The erf GELU
                        (BERT's) has no such epilogue: our kernel is its only one-pass path.
             "triton"   our kernels for tanh as for erf (the bench times it as
                        fuseformer-triton-fused-tanh).
In every variant the two backward GEMMs are cuBLAS (torch.mm): dx = dpre W, dW = dpre^T x.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _util, backends, reference
from ._util import (as_rows, cdiv, device_guard, ensure_tma_allocator, launch_tuned, new_output, next_pow2, row_count,
                    sm_count)
from .launch import launch, plan_table
from .backends import Impl
from .checks import check_same, check_tensor, same_floats
from .linear_gelu_kernels import _gelu_bwd, _gelu_bwd_db, _linear_gelu_fwd, _linear_gelu_tma  # noqa: F401
from .reduce import sum_rows

APPROXIMATIONS = ("none", "tanh")

# ----------------------------------------------------------------------------- variants

VARIANTS = {"forward": ("auto", "portable", "tma"), "dgelu": ("elementwise", "fused_db"),
            "preact": ("store", "recompute"), "gelu": ("fast", "exact"), "tanh": ("cublaslt", "triton")}
# Read once from the environment; the launchers read this dict per call.
VARIANT = backends.Variants("linear_gelu", VARIANTS, {"forward": "FUSEFORMER_LINEAR_GELU_FWD",
                                                      "dgelu": "FUSEFORMER_LINEAR_GELU_DGELU",
                                                      "preact": "FUSEFORMER_LINEAR_GELU_PREACT",
                                                      "gelu": "FUSEFORMER_LINEAR_GELU_MATH",
                                                      "tanh": "FUSEFORMER_LINEAR_GELU_TANH"})
# Choose linear_gelu's kernels: forward=, dgelu=, preact= (see the module docstring); returns
# the previous settings. `variant(...)` does the same inside a block.
set_variant = VARIANT.set
variant = VARIANT.using


# ----------------------------------------------------------------------------- launchers


def _fast_gelu(dtype: torch.dtype) -> bool:
    """The fast GELU maths (linear_gelu_kernels.py) for 16-bit outputs under gelu="fast" (the
    default); float32 keeps libdevice's erf and an IEEE division."""
    return VARIANT["gelu"] == "fast" and dtype != torch.float32

_tma_capable: dict = {}


def _rows(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(M, K, row stride, column stride) of x read as rows of its last dim: a 2-D x with any
    strides, or a contiguous x of any rank (rows at row * K). The forward launcher takes such
    an x as it comes: no reshape view in, none out (each costs ~3 µs of host time)."""
    if x.dim() == 2:
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    K = x.shape[-1]
    return row_count(x), K, K, 1


def _tma_ok(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can `_linear_gelu_tma` read x and W? TMA needs sm_90 or newer, a unit column stride,
    and a 16-byte aligned base and row stride (what a tensor map can describe). x as _rows
    reads it: 2-D with any strides, or contiguous of any rank."""
    dev = x2d.device
    capable = _tma_capable.get(dev)
    if capable is None:
        capable = _tma_capable[dev] = backends.interpreting() or (
            dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9)
    if not capable:
        return False
    if x2d.dtype == torch.float32 and not backends.interpreting():
        # fp32 products as exact as torch's ("ieee") cannot use wgmma: the portable kernel.
        # (The interpreter runs the TMA kernel in fp32 too: its bf16 dot is wrong there.)
        return False
    size = x2d.element_size()
    _, _, sxm, sxk = _rows(x2d)
    return (sxk == 1 and (sxm * size) % 16 == 0 and x2d.data_ptr() % 16 == 0 and weight.stride(1) == 1
            and (weight.stride(0) * size) % 16 == 0 and weight.data_ptr() % 16 == 0)


def _exact(dtype: torch.dtype) -> bool:
    # fp32 inputs: exact ("ieee") products as torch computes them, unless torch itself is
    # allowed tf32. 16-bit inputs keep Triton's default; the interpreter ignores the choice.
    return dtype == torch.float32 and not (not backends.interpreting() and torch.backends.cuda.matmul.allow_tf32)


# Launch plans of the TMA kernel (kernels/launch.py's Bound, as attention's and add+LN's forwards
# keep them): per signature of what its trailing arguments and grid derive from, the kernel,
# grid and those arguments as the fast launch last made them. Not under the interpreter.
_tma_plans = plan_table()


def _launch_tma(x2d, weight, bias, out, pre, dout, db_part, approximate):
    """`_linear_gelu_tma` on a persistent grid: forward (dout None) or the dgelu recompute.
    x2d: 2-D, or contiguous of any rank (_rows); out, pre, dout contiguous."""
    M, K, sxm, _ = _rows(x2d)
    N = weight.shape[0]
    ensure_tma_allocator()
    has_bias, dgelu = bias is not None, dout is not None
    key = candidates = None
    if _tma_plans.active():
        key = (x2d.dtype, x2d.device, M, N, K, sxm, weight.stride(0), has_bias, pre is not None, dgelu,
               db_part is not None, approximate, _exact(x2d.dtype), _fast_gelu(x2d.dtype))
        # The kernel with its leading tensors, as the launch passes them.
        candidates = ((_linear_gelu_tma.fn, (x2d, weight, bias if has_bias else weight, out,
                                             pre if pre is not None else out, dout if dgelu else out,
                                             db_part if db_part is not None else out)),)
    _tma_plans.launch(key, candidates,
                      lambda: _launch_tma_tuned(x2d, weight, bias, out, pre, dout, db_part, approximate, M, N, K, sxm))


def _launch_tma_tuned(x2d, weight, bias, out, pre, dout, db_part, approximate, M, N, K, sxm):
    interp = backends.interpreting()
    # One program per SM (the kernel loops over its tiles); a few in the interpreter, so that
    # the tile loop runs more than once there too.
    cap = 3 if interp else sm_count(x2d.device)
    grid = lambda meta: (min(cap, cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])),)  # noqa: E731
    tune_m = next_pow2(M)
    has_bias, approx_tanh, dgelu = bias is not None, approximate == "tanh", dout is not None
    tma_store = (N * out.element_size()) % 16 == 0
    exact = _exact(x2d.dtype)
    fast = _fast_gelu(x2d.dtype)
    key = (x2d.dtype, tune_m, N, K, has_bias, pre is not None, approx_tanh, fast, dgelu, tma_store, exact)
    launch_tuned(
        _linear_gelu_tma, _linear_gelu_tma.fn, key, grid,
        x2d,
        weight,
        bias if has_bias else weight,  # any pointer where the flag keeps the kernel from reading
        out,
        pre if pre is not None else out,
        dout if dgelu else out,
        db_part if db_part is not None else out,  # (the autotuner zeroes this slot: out is written after)
        M,
        N,
        K,
        sxm,
        weight.stride(0),
        tune_m,
        HAS_BIAS=has_bias,
        SAVE_PRE=pre is not None,
        APPROX_TANH=approx_tanh,
        FAST_GELU=fast,
        DGELU=dgelu,
        TMA_STORE=tma_store,
        UPCAST=interp,
        PRECISION="ieee" if exact else "tf32",
    )


# The smallest BLOCK_M of the TMA configs: db partial buffers of the recompute path get
# cdiv(M, this) rows, enough for any config (rows a bigger tile leaves unwritten stay 0).
_TMA_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _linear_gelu_tma.configs)


def _tanh_epilogue(x2d, weight, bias, approximate, save_preact) -> bool:
    """Does this forward take cuBLASLt's tanh GELU epilogue (VARIANT["tanh"])? CUDA only: on
    the CPU torch._addmm_activation computes the erf GELU."""
    return (approximate == "tanh" and not save_preact and bias is not None and x2d.is_cuda
            and VARIANT["tanh"] == "cublaslt" and x2d.dtype in (torch.float16, torch.bfloat16)
            and x2d.numel() > 0 and weight.shape[0] > 0)


def forward(x2d, weight, bias, approximate, save_preact):
    M, K, sxm, sxk = _rows(x2d)
    N = weight.shape[0]
    shape = (*x2d.shape[:-1], N)  # out and pre come out in x's leading shape, contiguous
    if _tanh_epilogue(x2d, weight, bias, approximate, save_preact):
        return torch._addmm_activation(bias, x2d.reshape(M, K), weight.t(), use_gelu=True).view(size=shape), None
    out = new_output(shape, x2d.dtype, x2d.device)
    pre = new_output(shape, x2d.dtype, x2d.device) if save_preact else None
    if M == 0 or N == 0:
        return out, pre
    if K == 0:
        # An empty sum: pre = bias (or 0). No kernel needed for a degenerate matmul.
        base = bias.expand(M, N) if bias is not None else torch.zeros((M, N), dtype=x2d.dtype, device=x2d.device)
        out.view(M, N).copy_(torch.nn.functional.gelu(base, approximate=approximate))
        if pre is not None:
            pre.view(M, N).copy_(base)
        return out, pre
    choice = VARIANT["forward"]
    if (choice == "tma" or (choice == "auto" and pre is None)) and _tma_ok(x2d, weight):
        _launch_tma(x2d, weight, bias, out, pre, None, None, approximate)
        return out, pre
    exact = _exact(x2d.dtype)
    fast = _fast_gelu(x2d.dtype)
    pointers = (x2d, weight, bias if bias is not None else weight, out, pre if pre is not None else out)
    key = None
    if _fwd_plans.active():
        key = (x2d.dtype, x2d.device, M, N, K, sxm, sxk, weight.stride(), bias is None, pre is None, approximate,
               exact, fast)
    _fwd_plans.launch(key, ((_linear_gelu_fwd.fn.fn, pointers),),
                      lambda: _launch_portable(pointers, M, N, K, sxm, sxk, weight.stride(), bias is not None,
                                               pre is not None, approximate, exact, fast))
    return out, pre


# Launch plans of the portable forward (training's, which stores the pre-activation, and
# wherever the TMA kernel cannot run), keyed on what its arguments and grid derive from, as the
# TMA kernel's; the kernel they bind is the JITFunction beneath the autotuner and heuristics.
_fwd_plans = plan_table()


def _launch_portable(pointers, M, N, K, sxm, sxk, w_strides, has_bias, save_pre, approximate, exact, fast):
    """`_linear_gelu_fwd` (autotuned) on pointers (x, W, bias or W, out, pre or out)."""
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    tune_m = next_pow2(M)
    approx_tanh = approximate == "tanh"
    # Everything Triton's autotuner keys on (its key arguments and the tensors' dtypes).
    key = (pointers[0].dtype, tune_m, N, K, has_bias, save_pre, approx_tanh, fast)
    launch_tuned(
        _linear_gelu_fwd, _linear_gelu_fwd.fn, key, grid,
        *pointers,  # an absent bias or pre is another tensor: the flags keep the kernel from it
        M,
        N,
        K,
        sxm,
        sxk,
        *w_strides,
        N,  # out's row stride: contiguous
        tune_m,
        HAS_BIAS=has_bias,
        SAVE_PRE=save_pre,
        APPROX_TANH=approx_tanh,
        FAST_GELU=fast,
        UPCAST=backends.interpreting(),
        PRECISION="ieee" if exact else "tf32",
    )


def gelu_backward(dout: torch.Tensor, preact: torch.Tensor, approximate: str) -> torch.Tensor:
    """dout * gelu'(preact), elementwise, in the dtype of preact."""
    dout = dout.contiguous()
    dpre = new_output(preact.shape, preact.dtype, preact.device)
    numel = preact.numel()
    if numel:
        block = 4096
        fast = _fast_gelu(preact.dtype)
        key = (preact.dtype, preact.device, numel, approximate, fast) if _dgelu_plans.active() else None
        _dgelu_plans.launch(key, ((_gelu_bwd, (dout, preact, dpre)),), lambda: launch(
            _gelu_bwd, (cdiv(numel, block),), dout, preact, dpre, numel, APPROX_TANH=approximate == "tanh",
            FAST_GELU=fast, BLOCK=block, num_warps=8))
    return dpre


_dgelu_plans = plan_table()  # gelu_backward's launch plans


def _dgelu_fused_db(dout, preact, approximate, has_bias):
    """(dpre, db or None) by `_gelu_bwd_db`: one pass over dout and pre."""
    M, N = preact.shape
    dpre = new_output((M, N), preact.dtype, preact.device)
    if M == 0 or N == 0:
        return dpre, torch.zeros(N, dtype=preact.dtype, device=preact.device) if has_bias else None
    block_m, block_n = 32, 128  # 4096 elements a step; 128 columns = 256-byte rows in 16 bits
    tiles_n = cdiv(N, block_n)
    if backends.interpreting() or not preact.is_cuda:
        programs_m = min(cdiv(M, block_m), 2)  # 2: the row-block loop still runs twice
    else:
        # Four row blocks a program: nearly the elementwise kernel's parallelism (16384 x 3072:
        # 3072 programs), db's partials 1/128 of dpre. The H100 run timed the earlier grid,
        # ~4 programs per SM in all walking ~23 row blocks each, at 0.93x the elementwise
        # kernel plus torch's column sum: each program's loop waited on its loads in turn.
        programs_m = cdiv(M, 4 * block_m)
    db_part = new_output((programs_m, N), torch.float32, preact.device) if has_bias else None
    launch(
        _gelu_bwd_db, (programs_m, tiles_n), dout, preact, dpre, db_part if has_bias else dpre, M, N,
        APPROX_TANH=approximate == "tanh", FAST_GELU=_fast_gelu(preact.dtype), HAS_BIAS=has_bias, BLOCK_M=block_m,
        BLOCK_N=block_n, num_warps=8,
    )
    return dpre, sum_rows(db_part, preact.dtype) if has_bias else None


def _dgelu(dout, x2d, weight, preact, approximate, has_bias, bias):
    """dpre = dout * gelu'(pre) and db, by the variant in force; pre None: recompute it."""
    if preact is None:
        M, N = dout.shape
        if VARIANT["forward"] == "tma" and M and N and x2d.shape[1] and _tma_ok(x2d, weight):
            # The GEMM again, its epilogue writing dpre and db's per-tile partials.
            dpre = new_output((M, N), dout.dtype, dout.device)
            db_part = torch.zeros(cdiv(M, _TMA_MIN_BLOCK_M), N, dtype=torch.float32, device=dout.device) \
                if has_bias else None
            _launch_tma(x2d, weight, bias, dpre, None, dout, db_part, approximate)
            return dpre, sum_rows(db_part, dout.dtype) if has_bias else None
        # Elsewhere (and for empty shapes): the forward launcher rebuilds pre into a
        # temporary, then as when stored.
        preact = forward(x2d, weight, bias, approximate, True)[1]
    if VARIANT["dgelu"] == "fused_db":
        return _dgelu_fused_db(dout, preact, approximate, has_bias)
    dpre = gelu_backward(dout, preact, approximate)
    # db: one reduction kernel (torch accumulates half types in fp32 and rounds once), not an
    # fp32 sum and a cast (two launches a layer).
    return dpre, dpre.sum(0) if has_bias else None


def backward(dout, x2d, weight, preact, approximate, has_bias, bias=None, acc=None):
    """preact None (the "recompute" variant, triton only) needs bias (when there is one).
    acc: an (M, K) gradient to add to dx, in the GEMM's epilogue (beta = 1) rather than by an
    add after it (a fused block's residual gradient)."""
    dpre, db = _dgelu(dout.contiguous(), x2d, weight, preact, approximate, has_bias, bias)  # (M, N)
    dx, dw, _ = _util.linear_grads(dpre, x2d, weight, True, True, False, acc)  # (M, K), (N, K)
    return dx, dw, db


def unsupported(dtype=None, in_features=None, out_features=None, approximate="none", requires_grad=False, **_):
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the kernel takes float16, bfloat16, float32)"
    return None


backends.register_impl("linear_gelu", "triton", Impl(forward, backward, unsupported, backward_extras=frozenset({"acc"})))


# ----------------------------------------------------------------------------- shared by both paths


def _run_forward(backend, x, weight, bias, approximate, save_preact):
    # reshape keeps views where it can; the kernel reads any 2-D strides, so a transposed
    # view of x or W is never copied. The triton launcher also takes a contiguous x of any
    # rank as it is (see _rows): no view in or out.
    impl = backends.get_impl("linear_gelu", backend)
    if backend == "triton" and x.dim() != 2 and x.is_contiguous():
        with device_guard(x):
            return impl.forward(x, weight, bias, approximate, save_preact)
    x2d = x if x.dim() == 2 else as_rows(x)
    with device_guard(x):
        out, pre = impl.forward(x2d, weight, bias, approximate, save_preact)
    if x.dim() != 2:
        shape = (*x.shape[:-1], weight.shape[0])
        out, pre = out.view(size=shape), None if pre is None else pre.view(size=shape)
    return out, pre


def _run_backward(backend, dout, x, weight, preact, approximate, has_bias, bias=None, acc=None):
    """acc (x's shape): added to dx, in the GEMM where the backend's launcher can."""
    impl = backends.get_impl("linear_gelu", backend)
    args = (as_rows(dout), as_rows(x), weight, as_rows(preact), approximate, has_bias)
    # bias only for the recompute path: the cuda backend's launcher takes the six above.
    kwargs = {} if preact is not None else {"bias": bias}
    fold = acc is not None and "acc" in impl.backward_extras
    if fold:
        kwargs["acc"] = as_rows(acc)
    with device_guard(dout):
        dx, dw, db = impl.backward(*args, **kwargs)
    dx = dx.view(size=x.shape)
    return (dx if fold or acc is None else dx + acc), dw, db


def _save_preact(backend: str) -> bool:
    # Recompute is the triton launcher's alone; every other backend keeps pre.
    return VARIANT["preact"] == "store" or backend != "triton"


# ----------------------------------------------------------------------------- eager path


class LinearGeluFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly, no dispatcher in between."""

    @staticmethod
    def forward(ctx, x, weight, bias, approximate, backend):
        save = _save_preact(backend)
        out, pre = _run_forward(backend, x, weight, bias, approximate, save)
        # Recompute keeps bias instead of pre (N values, not M x N).
        ctx.save_for_backward(x, weight, pre, None if save else bias)
        ctx.approximate, ctx.has_bias, ctx.backend = approximate, bias is not None, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, pre, bias = ctx.saved_tensors
        dx, dw, db = _run_backward(ctx.backend, dout, x, weight, pre, ctx.approximate, ctx.has_bias, bias)
        return dx, dw, db, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.
# Fixed outputs, all real: `linear_gelu` returns the activation alone (inference, and the
# training variant that recomputes pre), `linear_gelu_train` the activation and pre.


@torch.library.custom_op("fuseformer::linear_gelu", mutates_args=())
def _linear_gelu_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, backend: str,
) -> torch.Tensor:
    return _run_forward(backend, x, weight, bias, approximate, False)[0]


@torch.library.custom_op("fuseformer::linear_gelu_train", mutates_args=())
def _linear_gelu_train_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], approximate: str, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(backend, x, weight, bias, approximate, True)


def _out(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_linear_gelu_op.register_fake(lambda x, weight, bias, approximate, backend: _out(x, weight))
_linear_gelu_train_op.register_fake(lambda x, weight, bias, approximate, backend: (_out(x, weight), _out(x, weight)))


@torch.library.custom_op("fuseformer::linear_gelu_backward", mutates_args=())
def _linear_gelu_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    preact: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    approximate: str,
    has_bias: bool,
    backend: str,
) -> list[torch.Tensor]:
    """[dx, dweight] and dbias when there is a bias. preact None: recompute it (from bias)."""
    dx, dw, db = _run_backward(backend, dout, x, weight, preact, approximate, has_bias, bias)
    return [dx, dw] if db is None else [dx, dw, db]


@_linear_gelu_bwd_op.register_fake
def _(dout, x, weight, preact, bias, approximate, has_bias, backend):
    grads = [x.new_empty(x.shape), weight.new_empty(weight.shape)]
    return grads + [dout.new_empty(weight.shape[0])] if has_bias else grads


def _setup_context(ctx, inputs, output):
    x, weight, bias, approximate, backend = inputs
    stored = isinstance(output, (tuple, list))
    if not stored and _save_preact(backend):
        raise RuntimeError(f"linear_gelu: the {backend} backward needs the pre-activation (fuseformer::linear_gelu_train)")
    ctx.save_for_backward(x, weight, output[1] if stored else None, None if stored else bias)
    ctx.approximate, ctx.has_bias, ctx.backend = approximate, bias is not None, backend


def _backward(ctx, dout, *_dpre):
    x, weight, preact, bias = ctx.saved_tensors
    grads = _linear_gelu_bwd_op(dout, x, weight, preact, bias, ctx.approximate, ctx.has_bias, ctx.backend)
    return grads[0], grads[1], grads[2] if ctx.has_bias else None, None, None


for _op in (_linear_gelu_op, _linear_gelu_train_op):
    _op.register_autograd(_backward, setup_context=_setup_context)


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
        if requires_grad and _save_preact(name):
            return _linear_gelu_train_op(x, weight, bias, approximate, name)[0]
        return _linear_gelu_op(x, weight, bias, approximate, name)
    if requires_grad:
        return LinearGeluFunction.apply(x, weight, bias, approximate, name)
    return _run_forward(name, x, weight, bias, approximate, False)[0]
