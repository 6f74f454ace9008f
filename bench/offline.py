"""Triton's real JIT path on a machine without a GPU: a stand-in driver for sm_90.

Our kernels run on a CPU through Triton's interpreter, which skips everything a GPU run does
before a kernel starts: Triton's argument binder and specialization, the autotuners' pruning
and pre_hooks, the autotuner, the compile for the real target, and the launch path's host
time. With OfflineDriver as Triton's active driver (and the interpreter off), all of that
runs for real on CPU tensors, compiling for an H100/H200 (sm_90); only the launcher call and
the autotuner's timings do nothing. `pretend_sm90` answers our launchers' own device queries
(SM count, TMA, the Hopper kernels' admission) as an H100 would, and `admit_triton` lets the
public ops choose the triton backend for CPU tensors.

Used by bench/compile_time.py (first-call compile time), the overhead group (host time per
call through Triton's launch path and the fast launch, on a CPU) and
tests/offline_launch_check.py. Results computed this way are garbage; what is real is every
step up to the launch.
"""
from __future__ import annotations

import contextlib
import ctypes

import torch

SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp_size) of an H100 / H200
# A launcher's arguments before the kernel's own: grid x, y, z, stream, function, packed
# metadata, launch metadata, enter and exit hooks (kernels/launch.py's docstring).
LAUNCHER_LEADING = 9


class _OfflineUtils:
    """The device queries a compiled kernel's first launch makes: an H100's limits."""

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1755000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 32, 0, 1024  # module, function, registers, spills, max threads per block


def _as_launched(arg, pointer: bool):
    """A launcher argument as the launch saw it. A pointer parameter's argument as
    ("pointer", address, (dtype, shape, strides) of the tensor or None): the kernel gets the
    address, whether it came as a tensor (Triton's path) or as that tensor's data pointer
    (the fast launch: kernels/launch.py; no tensor to describe then). A real launcher encodes a
    host TMA descriptor into a CUtensorMap during the launch, so what counts is its box then: a
    copy, since a launcher may re-fit a descriptor's box for a later launch (attention's two
    backward passes share theirs)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fuseformer.kernels.launch import new_descriptor

    if pointer and arg is not None:
        if arg.__class__ is int:
            return "pointer", arg, None
        return "pointer", arg.data_ptr(), (arg.dtype, tuple(arg.shape), arg.stride())
    if arg.__class__ is not TensorDescriptor:
        return arg
    return new_descriptor(arg.base, arg.shape, arg.strides, arg.block_shape, arg.padding)


def _pointer_params(src) -> tuple:
    """Per kernel parameter (in the launcher's argument order), whether it is a pointer."""
    signature = getattr(src, "signature", None) or {}
    return tuple(str(kind).startswith("*") for kind in signature.values())


def _ce_flag(rows, labels, loss, aux, logits, M, *rest, **kwargs):
    """_ce_reduce's flag at aux[M + 1]: every label names a class (the overhead cases'). Written
    through its address (aux: fp32 host memory), ~0.3 µs where `aux[M + 1] = 1.0` costs ~2: a
    GPU kernel's write costs the host nothing."""
    address = aux if aux.__class__ is int else aux.data_ptr()  # the fast launch passes the address
    ctypes.c_float.from_address(address + 4 * (M + 1)).value = 1.0


# Kernels whose output the host reads back on a CPU, by name: a stand-in that writes what the
# kernel writes for the overhead group's (valid) inputs, given the kernel's arguments. Without
# it cross_entropy's label flag stays unwritten and sends every call into the search for the
# bad label (~10 µs of torch ops), which a real call makes only when there is one. Its own
# host time counts as the op's.
STAND_INS = {"_ce_reduce": _ce_flag}


class OfflineDriver:
    """Triton's active driver on a machine without a GPU: device 0 of capability 9.0, stream 0;
    a kernel 'launch' only appends (kernel name, the launcher's arguments) to `launches`
    (when `record` is on), and a benchmark calls its function once and reports 1 ms. The
    kernels in STAND_INS run their stand-in instead.
    Install with `install()`; Triton must not be in interpreter mode."""

    utils = _OfflineUtils()

    def __init__(self):
        self.record = False
        self.launches: list = []

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*SM90)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        stand_in = STAND_INS.get(metadata.name)
        pointers = (False,) * LAUNCHER_LEADING + _pointer_params(src)

        def launch(*args):
            if self.record:
                self.launches.append((metadata.name, tuple(
                    _as_launched(a, i < len(pointers) and pointers[i]) for i, a in enumerate(args))))
            if stand_in is not None:
                stand_in(*args[LAUNCHER_LEADING:])
        return launch

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **_):
            fn()
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        import torch

        return torch.empty(1)

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def empty_linears():
    """nn.Linear's forward as an allocation of its output (and its backward as one of the
    input's gradient), and likewise the linear layers of a block that runs as one fused node
    (models/fused_block.py) and the GEMMs of Linear+GELU's backward (both through
    kernels/_util.py's linear_grads), for measuring or compiling our fused ops inside a model on
    a CPU: there a GEMM is a real computation of milliseconds (minutes in fp16 at the
    benchmark's shapes), where on a GPU it is a cuBLAS launch of a few µs of host time."""
    from unittest import mock

    from torch import nn

    class Empty(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, out_features):
            ctx.shape = x.shape
            return x.new_empty(*x.shape[:-1], out_features)

        @staticmethod
        def backward(ctx, grad):
            return grad.new_empty(ctx.shape), None

    from fuseformer.kernels import _util
    from fuseformer.models import fused_block

    def empty_grads(dy2d, x2d, weight, need_x, need_w, need_b, acc=None):
        return (dy2d.new_empty(dy2d.shape[0], weight.shape[1]) if need_x else acc,
                weight.new_empty(size=weight.shape) if need_w else None,
                dy2d.new_empty(weight.shape[0]) if need_b else None)

    with mock.patch.object(nn.Linear, "forward", lambda self, x: Empty.apply(x, self.out_features)), \
            mock.patch.object(fused_block, "_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0])), \
            mock.patch.object(_util, "linear_grads", empty_grads):
        yield


def install() -> OfflineDriver:
    import triton

    driver = OfflineDriver()
    triton.runtime.driver.set_active(driver)
    return driver


def pretend_sm90() -> None:
    """What our launchers ask of a CUDA device, answered as an H100 would for CPU tensors:
    132 SMs, TMA capable, the Hopper kernels admitted."""
    import importlib

    from fuseformer.kernels import _util

    cpu = torch.device("cpu")
    _util._sm_counts[cpu] = 132
    importlib.import_module("fuseformer.kernels.linear_gelu")._tma_capable[cpu] = True
    hopper = importlib.import_module("fuseformer.kernels.attention_hopper")
    if not getattr(hopper.unsupported_reason, "_offline", False):
        reason = hopper.unsupported_reason

        def unsupported_reason(q, *rest):
            return reason(q, *rest) if q.is_cuda else None

        unsupported_reason._offline = True
        hopper.unsupported_reason = unsupported_reason


def admit_triton() -> None:
    """Let backend="triton" run CPU tensors without the interpreter (the stand-in driver's
    launches), so the public ops take their real path."""
    import fuseformer.kernels as K
    from fuseformer.kernels import backends

    reason = backends.unavailable_reason
    backends.unavailable_reason = lambda backend: None if backend == "triton" else reason(backend)
    K.unavailable_reason = backends.unavailable_reason  # the package's name for it (tests ask there)
    backends._device_reason = lambda backend, device: None
    backends.clear_plans()


class Counts:
    """Compiles asked of Triton (JITFunction._do_compile: a compile or an on-disk cache hit),
    split by who asked: precompile, the autotuner, or a plain launch; the autotuned kernels
    reached, the configs precompiled, launches through Triton's path and by launch plans."""

    def __init__(self):
        self.where = "launch"
        self.reset()

    def reset(self):
        self.by = {"precompile": 0, "autotuner": 0, "launch": 0}
        self.tuned: set = set()
        self.precompiled = 0
        self.jit_runs = 0  # launches through JITFunction.run (Triton's path), warm-ups aside
        self.plan_launches = 0  # launches by a launcher's plan (kernels/launch.py's Bound)

    def install(self):
        """Wrap Triton's and our entry points (for this process, for good) to count."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        from fuseformer.kernels import _util
        from fuseformer.kernels import launch as launch_module
        from fuseformer.kernels import precompile as P

        do_compile, autotuner_run, precompile = JITFunction._do_compile, Autotuner.run, P.precompile
        jit_run = JITFunction.run
        bound_launch = launch_module.Bound._launch  # every plan's launch, DescriptorBound's too
        counts = self

        def bound(self, *args):
            done = bound_launch(self, *args)
            counts.plan_launches += done
            return done

        def running(self, *args, **kwargs):
            counts.jit_runs += not kwargs.get("warmup", False)
            return jit_run(self, *args, **kwargs)

        def counting(self, *args, **kwargs):
            counts.by[counts.where] += 1
            return do_compile(self, *args, **kwargs)

        def tuning(self, *args, **kwargs):
            counts.tuned.add(self.base_fn.__name__)
            before, counts.where = counts.where, "autotuner"
            try:
                return autotuner_run(self, *args, **kwargs)
            finally:
                counts.where = before

        def precompiling(*args, **kwargs):
            before, counts.where = counts.where, "precompile"
            try:
                n = precompile(*args, **kwargs)
            finally:
                counts.where = before
            counts.precompiled += n
            return n

        JITFunction._do_compile = counting
        JITFunction.run = running
        launch_module.Bound._launch = bound
        Autotuner.run = tuning
        _util.precompile = precompiling
