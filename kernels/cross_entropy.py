"""Cross-entropy over the class scores in the last dim, fused in Triton, forward and backward.

    loss = cross_entropy(logits, labels, ignore_index=-100, reduction="mean", *, classes=None)
    logits (..., V) fp16/bf16/fp32, any strides; labels (...) int64 or int32

The same as F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1)) (classes in the
last dim, as language-model heads produce them, not in dim 1), in float32 whatever the logits'
dtype (float64 stays float64 on the torch backend). "mean" averages over the rows whose label
is not ignore_index (nan when there is none, as torch), "sum" adds them, "none" returns the
loss of each row in labels' shape (0 where ignored). `classes` (default V) is how many of the
V columns are classes a label may name: the models pass their padded vocabulary's logits
whole (the extra columns score -inf) with classes = the real vocabulary size. A label outside
[0, classes) other than ignore_index raises a ValueError on a CPU; on a GPU it fails the
stream with a device-side assert, as F.cross_entropy does (no host sync spent checking).

Why a kernel: the models' masked-LM and causal-LM losses ran F.cross_entropy on fp32 copies of
the logits (on bf16 logits directly, the log-probabilities lose ~1e-2 of the loss: HF's bf16
BERT step's loss was 0.029 off float64 on the H200, ours 0.0002). At BERT's B32 L128 (4096 x
30522 logits, 250 MB in bf16) that moved ~5 GB a training step by our count, through the
upcast, log_softmax, its backward and the downcast of the gradient; these kernels read the
logits twice and write their gradient once (kernels/cross_entropy_kernels.py has the maths),
at fp32 accuracy. On the H200 (bench/results/h200/, forward+backward, device time): BERT's MLM
case 0.119 ms against torch.compile's 0.351, GPT-2's LM case (4096 x 50257) 0.435 against 0.703.

Launcher contract (logits2d (M, V) with any strides, labels1d (M,)):
    forward(logits2d, labels1d, ignore_index, reduction, classes) -> (loss, aux)
        loss: () fp32 for "mean"/"sum", each row's (M,) fp32 for "none", a tensor of its own;
        aux: fp32, what the backward reads: each row's logsumexp at [0, M), then the count of
        rows not ignored at M, and at M + 1 a flag, 1.0 when every label is in [0, classes)
        or ignore_index (the caller raises on it on a CPU; a compiled kernel asserts on the
        device itself); its layout is the kernels' (kernels/cross_entropy_kernels.py).
    backward(g, aux, logits2d, labels1d, ignore_index, reduction) -> dlogits (M, V),
        contiguous, the logits' dtype; g: the loss's gradient, () or (M,) ("none").
"""
from __future__ import annotations

import ctypes

import torch

from . import backends, reference
from ._util import cdiv, device_guard, new_output, next_pow2
from .backends import Impl
from .checks import check_tensor
from .cross_entropy_kernels import _ce_bwd, _ce_fwd, _ce_reduce
from .launch import launch, plan_table

REDUCTIONS = ("mean", "sum", "none")
LABEL_DTYPES = (torch.int64, torch.int32)
# Scores a forward program holds per step of its row walk (16 fp32 per thread over 8 warps),
# per backward program (one chunk each: V = 30522 gives 15 programs a row), and rows per step
# of the one reducing program.
FWD_BLOCK, BWD_BLOCK, REDUCE_BLOCK = 4096, 2048, 1024
# A small problem, at most SMALL_SCORES scores in whole rows padded to a power of two (a
# sequence-classification head's batch of a few classes, say), is one launch: the reducing
# program computes the rows too, in tiles of SMALL_TILE scores (at most two steps: one
# program's loads are latency-bound). Each launch saved is a launch's host time.
SMALL_SCORES, SMALL_TILE = 8192, 4096
_INTERPRET = backends.interpreting()  # read at import, as Triton reads it
_read_f32 = ctypes.c_float.from_address  # a float32 at a host address (the CPU label flag)


# ----------------------------------------------------------------------------- launchers
# Each launch site keeps a launch plan per shape (kernels/launch.py): a repeated call only
# allocates its outputs and re-launches with its tensors.
_fwd_plans, _reduce_plans, _bwd_plans = plan_table(), plan_table(), plan_table()


def forward(logits, labels, ignore_index, reduction, classes):
    M, V = logits.shape
    device = logits.device
    none = reduction == "none"
    # The loss has a tensor of its own (a caller may change it in place, `loss /= steps`);
    # everything else is one allocation the kernels address by offsets (a torch.empty costs
    # ~1.5 µs of host time here, a view of it ~0.7).
    loss = new_output((M,) if none else (), torch.float32, device)
    aux = new_output((M + 2 if none else 2 * M + 2,), torch.float32, device)
    rows, loss_at = (loss, 0) if none else (aux, M + 2)
    # What the trailing arguments and constexprs derive from, and the dtypes (a plan refuses
    # other dtypes or alignments itself; keyed, each pair of dtypes keeps a plan of its own).
    # Built only where plans are kept (not under the interpreter): ~1 µs of host time.
    key = None
    if _fwd_plans.active():
        key = (device, logits.dtype, labels.dtype, M, V, classes, logits.stride(), labels.stride(0), ignore_index,
               reduction)
    rows_v = _small(M, V)
    if V == 0:  # no class: every label must be ignored (the reduction checks), each loss is 0
        rows.zero_()
        aux.zero_()
    elif M and not rows_v:
        fwd = (logits, labels, rows, aux)
        _fwd_plans.launch(key, ((_ce_fwd, fwd),), lambda: _launch_fwd(fwd, M, V, ignore_index, loss_at))
    red = (rows, labels, loss, aux, logits)
    _reduce_plans.launch(key, ((_ce_reduce, red),), lambda: launch(
        _ce_reduce, (1,), *red, M, classes, labels.stride(0), ignore_index, loss_at, V, *logits.stride(),
        BLOCK=SMALL_TILE // rows_v if rows_v else REDUCE_BLOCK, REDUCE=not none, MEAN=reduction == "mean",
        CHECK=not _INTERPRET, ROWS_V=rows_v, num_warps=4, sanitize_overflow=False))
    return loss, aux


def _small(M, V):
    """next_pow2(V) where the M rows are a small problem for the reducing program alone (see
    SMALL_SCORES), else 0."""
    padded = next_pow2(V) if V else 0
    return padded if padded <= SMALL_TILE and 0 < M * padded <= SMALL_SCORES else 0


def _launch_fwd(pointers, M, V, ignore_index, loss_at):
    logits, labels = pointers[:2]
    block = min(FWD_BLOCK, next_pow2(V))
    launch(_ce_fwd, (M,), *pointers, V, *logits.stride(), labels.stride(0), ignore_index, loss_at,
           BLOCK=block, num_warps=8 if block >= 2048 else 4)


def backward(g, aux, logits, labels, ignore_index, reduction):
    M, V = logits.shape
    dx = new_output((M, V), logits.dtype, logits.device)
    if M == 0 or V == 0:
        return dx
    stride_g = 0 if g.dim() == 0 else g.stride(0)
    key = None
    if _bwd_plans.active():
        key = (dx.device, logits.dtype, labels.dtype, M, V, logits.stride(), labels.stride(0), stride_g, ignore_index,
               reduction)
    pointers = (logits, labels, aux, g, dx)
    _bwd_plans.launch(key, ((_ce_bwd, pointers),), lambda: _launch_bwd(pointers, stride_g, ignore_index, reduction))
    return dx


def _launch_bwd(pointers, stride_g, ignore_index, reduction):
    logits, labels = pointers[:2]
    M, V = logits.shape
    block = min(BWD_BLOCK, next_pow2(V))
    launch(_ce_bwd, (M, cdiv(V, block)), *pointers, V, *logits.stride(), labels.stride(0), stride_g,
           ignore_index, BLOCK=block, MEAN=reduction == "mean", num_warps=4 if block >= 1024 else 2)


def unsupported(dtype=None, **_):
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the kernels take float16, bfloat16, float32)"
    return None


backends.register_impl("cross_entropy", "triton", Impl(forward, backward, unsupported))


# ----------------------------------------------------------------------------- shared by both paths


def _rows(logits, labels):
    """(logits as (M, V) rows, labels as (M,)): views where the strides allow, else copies."""
    if labels.dim() == 1:
        return logits, labels
    return logits.reshape(labels.numel(), logits.shape[-1]), labels.reshape(-1)


def _bad_labels(labels, V, ignore_index):
    return ((labels < 0) | (labels >= V)) & (labels != ignore_index)


def _labels_ok(labels, V, ignore_index):
    """Raise (CPU) or assert on the device (GPU: reading a flag back would stall the host until
    the GPU catches up, every call) that every label was in [0, V) or ignore_index."""
    if labels.device.type != "cpu":
        torch._assert_async(~_bad_labels(labels, V, ignore_index).any(), _what(V, ignore_index))
    else:
        bad = _bad_labels(labels, V, ignore_index)
        if bad.any():
            raise ValueError(f"{_what(V, ignore_index)}, got {labels[bad][0].item()}")


def _what(V, ignore_index):
    return f"labels must lie in [0, {V}) (the classes of logits) or be ignore_index={ignore_index}"


def _run_forward(backend, logits, labels, ignore_index, reduction, classes):
    """(loss, aux) after the label check ("none": the loss of each row, (M,))."""
    x2, y1 = _rows(logits, labels)
    with device_guard(logits):
        loss, aux = backends.get_impl("cross_entropy", backend).forward(x2, y1, ignore_index, reduction, classes)
    # On a GPU the reducing kernel asserts on the labels itself. On a CPU its flag is read
    # from aux's memory (a fresh contiguous fp32 tensor of at least M + 2 elements): ~0.2 µs,
    # where aux.numpy()[M + 1] costs ~0.75 and indexing the tensor ~1. Only a flag saying some
    # label is out of range costs the look at the labels that names it.
    if not logits.is_cuda and not _read_f32(aux.data_ptr() + 4 * (y1.shape[0] + 1)).value:
        _labels_ok(labels, classes, ignore_index)
    return loss, aux


def _shaped(loss, labels):
    """Reduction "none": each row's loss in labels' shape, viewed outside the autograd
    Function and the custom op (a view made inside either could not be changed in place)."""
    return loss.view(size=labels.shape) if loss.dim() != labels.dim() else loss


def _run_backward(backend, g, aux, logits, labels, ignore_index, reduction):
    x2, y1 = _rows(logits, labels)
    g = g.float().reshape(-1) if reduction == "none" else g.float()
    with device_guard(logits):
        dx = backends.get_impl("cross_entropy", backend).backward(g, aux, x2, y1, ignore_index, reduction)
    return dx.view(size=logits.shape)


# ----------------------------------------------------------------------------- eager path


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, reduction, classes, backend):
        loss, aux = _run_forward(backend, logits, labels, ignore_index, reduction, classes)
        ctx.save_for_backward(logits, labels, aux)
        ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, labels, aux = ctx.saved_tensors
        dx = _run_backward(ctx.backend, grad, aux, logits, labels, ctx.ignore_index, ctx.reduction)
        return dx, None, None, None, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile sees this custom op (the launchers behind it), its fake and its autograd.


@torch.library.custom_op("fuseformer::cross_entropy", mutates_args=())
def _ce_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str, classes: int,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the launcher's aux: each row's logsumexp, the count, the labels' check)."""
    return _run_forward(backend, logits, labels, ignore_index, reduction, classes)


@_ce_op.register_fake
def _(logits, labels, ignore_index, reduction, classes, backend):
    M = labels.numel()
    none = reduction == "none"
    loss = logits.new_empty(M if none else (), dtype=torch.float32)
    return loss, logits.new_empty(M + 2 if none else 2 * M + 2, dtype=torch.float32)


@torch.library.custom_op("fuseformer::cross_entropy_backward", mutates_args=())
def _ce_bwd_op(g: torch.Tensor, aux: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
               reduction: str, backend: str) -> torch.Tensor:
    return _run_backward(backend, g, aux, logits, labels, ignore_index, reduction)


@_ce_bwd_op.register_fake
def _(g, aux, logits, labels, ignore_index, reduction, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index, reduction, classes, backend = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend


def _backward(ctx, grad, *_):
    # aux is bookkeeping: nothing differentiates through it.
    logits, labels, aux = ctx.saved_tensors
    dx = _ce_bwd_op(grad, aux, logits, labels, ctx.ignore_index, ctx.reduction, ctx.backend)
    return dx, None, None, None, None, None


_ce_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public op


def _check(logits, labels, ignore_index, reduction, classes):
    check_tensor("logits", logits, min_dim=1)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in LABEL_DTYPES:
        got = getattr(labels, "dtype", type(labels).__name__)
        raise TypeError(f"labels must be an int64 or int32 torch.Tensor, got {got}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}; they must share a device")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the shape of logits without its last (class) dim, "
                         f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    V = logits.shape[-1]
    if classes is None:
        return V
    if isinstance(classes, bool) or not isinstance(classes, int) or not 0 <= classes <= V:
        raise ValueError(f"classes must be an int in [0, {V}] (the last dim of logits), got {classes!r}")
    return classes


def cross_entropy(logits, labels, ignore_index=-100, reduction="mean", *, classes=None, backend=None):
    """Cross-entropy of `labels` under the class scores in the last dim of `logits` (the
    module docstring); the loss in float32 (float64 for float64 logits)."""
    classes = _check(logits, labels, ignore_index, reduction, classes)
    name = backends.resolve("cross_entropy", logits.device, backend, dtype=logits.dtype)
    compiling = torch.compiler.is_compiling()
    if name == "torch":
        # Not while tracing (no data-dependent check in a graph); on a GPU only where F.cross_entropy,
        # which asserts up to the width itself, would take labels past `classes`.
        if not compiling and (labels.device.type == "cpu" or classes < logits.shape[-1]):
            _labels_ok(labels, classes, ignore_index)
        return reference.cross_entropy(logits, labels, ignore_index, reduction)
    if compiling:
        loss = _ce_op(logits, labels, ignore_index, reduction, classes, name)[0]
    elif torch.is_grad_enabled() and logits.requires_grad:
        loss = CrossEntropyFunction.apply(logits, labels, ignore_index, reduction, classes, name)
    else:
        loss = _run_forward(name, logits, labels, ignore_index, reduction, classes)[0]
    return _shaped(loss, labels) if reduction == "none" else loss
