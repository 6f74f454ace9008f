"""Small helpers shared by the fused ops' launchers."""
from __future__ import annotations

import contextlib
import math
import os

import torch

from .launch import launch
from .precompile import precompile


# Read once at import; tests switch it with `poison_outputs`, never through the environment
# per call (a getenv per output buffer was measurable host time on every launch).
_POISON = os.environ.get("FUSEFORMER_POISON", "").strip().lower() not in ("", "0", "false", "no", "off")


def poison_enabled() -> bool:
    """FUSEFORMER_POISON=1 (or `poison_outputs()`, which the tests use) makes launchers fill
    outputs with NaN first, so an element a kernel forgets to write fails the parity check
    instead of passing as whatever torch.empty happened to hold."""
    return _POISON


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Poison every output buffer inside the block (tests; never in production)."""
    global _POISON
    before, _POISON = _POISON, bool(enabled)
    try:
        yield
    finally:
        _POISON = before


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised normally, NaN-filled when poisoning is on."""
    # The size as a keyword: torch.empty's argument parser takes it in ~1.0 µs here, against
    # 1.5 µs for a positional tuple and 2.1 for a positional torch.Size (torch 2.13, CPU).
    out = torch.empty(size=shape, dtype=dtype, device=device)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """new_output with t's shape, dtype, device and strides."""
    out = torch.empty_like(t)
    if _POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


# (autotuner, key) -> the winning config's launch arguments (meta-parameters, num_warps, ...).
_tuned_configs: dict[tuple, dict] = {}


def launch_tuned(tuned, plain, key: tuple, grid, *args, **kwargs) -> None:
    """Launch an autotuned kernel: the first call of `key` runs Triton's autotuner (which
    times the configs), every later one launches the plain kernel with the winner directly.

    Triton's Autotuner.run rebuilds its key and re-enters JITFunction.run on each call; the
    lookup here is one dict access. `key` must determine the autotuner's own key (the
    kernel's tuning arguments and the dtypes of its tensors) so both pick the same config.
    Before the autotuner's first call of a key its configs are compiled in parallel
    (kernels/precompile.py), so it only has to time them.
    """
    config = _tuned_configs.get((tuned, key))
    if config is None:
        precompile(tuned, grid, args, kwargs)  # every config at once, on threads (precompile.py)
        tuned[grid](*args, **kwargs)
        best = getattr(tuned, "best_config", None)  # None when the launch was stubbed out
        if best is not None:
            _tuned_configs[(tuned, key)] = best.all_kwargs()
        return
    launch(plain, grid, *args, **kwargs, **config)


def tuned_config(tuned, key: tuple):
    """The launch arguments launch_tuned keeps for (tuned, key), or None before its first call."""
    return _tuned_configs.get((tuned, key))


def linear_grads(dy2d, x2d, weight, need_x, need_w, need_b, acc=None):
    """F.linear's gradients as autograd computes them: dx = dy W, dW = dy^T x, db = sum dy,
    each where wanted (dx where need_x, else acc). acc: a gradient of x from elsewhere, added
    to dx in the GEMM (beta = 1): the residual add autograd would make after it, without its
    own kernel. The GEMMs of Linear+GELU's backward and of the fused blocks' linear layers
    (bench/offline.py's empty_linears replaces it on a CPU, where a GEMM would dominate a
    host-time measurement)."""
    if need_x:
        dx = dy2d @ weight if acc is None else torch.addmm(acc, dy2d, weight)
    else:
        dx = acc
    dw = dy2d.t() @ x2d if need_w else None
    db = dy2d.sum(0) if need_b else None
    return dx, dw, db


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1). triton.next_power_of_2 does the same
    through Triton's constexpr machinery, several microseconds per call on the hot path."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_count(t: torch.Tensor) -> int:
    """How many rows of its last dim t holds (1 for a 1-D t). Spelled out as a product:
    numel // N and reshape(-1, N) are ambiguous when a tensor is empty."""
    return math.prod(t.shape[:-1])


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t viewed as (rows, last dim), the layout the row-wise kernels address; None stays None."""
    if t is None or t.dim() == 2:
        return t
    return t.reshape(row_count(t), t.shape[-1])


_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, asked once per device (the query costs
    microseconds; grids sized to the SMs need it on every launch)."""
    count = _sm_counts.get(device)
    if count is None:
        count = _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def draw_seed(device) -> torch.Tensor:
    """A Philox seed as a 1-element int64 tensor on the device.

    A tensor rather than a Python int: drawing it needs no host sync and torch.compile
    traces it without a graph break; it comes from torch's generator, so
    torch.manual_seed makes dropout reproducible.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


_NO_GUARD = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one while launching: Triton launches on the current device,
    which is not t's when a process drives several GPUs. When it already is (the usual
    case), no device switch: entering torch.cuda.device costs microseconds per launch."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NO_GUARD


def _scratch(size: int, alignment: int, stream):
    # torch's caching allocator on the current device (the launch's: see device_guard).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_tma_allocator() -> None:
    """Tensor descriptors made inside a kernel (tl.make_tensor_descriptor) keep their tensor
    maps in a global scratch buffer (128 bytes per descriptor per program), which Triton asks
    of the allocator given to triton.set_allocator when it launches. That setting is a
    ContextVar, so a thread that never set it (the autograd engine's backward threads, say)
    has none: checked before every such launch (one ContextVar read, cheaper than any
    per-thread bookkeeping, which thread ids reused by new threads would fool), and the
    user's own allocator is never replaced."""
    try:  # where Triton keeps it (3.6 .. 3.9)
        from triton.runtime import _allocation

        missing = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton's layout: set ours rather than fail
        missing = True
    if missing:
        import triton

        triton.set_allocator(_scratch)


def settle_cache_keys(modules) -> int:
    """Give every Triton function of `modules` the cache key it has whatever was compiled
    first; returns how many functions that took.

    Why: a compiled kernel is found in Triton's on-disk cache under a hash that includes its
    JITFunction.cache_key, which folds in the constexpr globals its helpers read. Triton 3.6
    (the GPU machines') merges a helper's globals before it has computed them, so a kernel
    whose helpers were not hashed yet gets a key without their globals, and one compiled
    after another kernel that shares them gets a key with them: one kernel, two keys, by
    the order a process first compiles things. The Linear+GELU kernels (helpers _gelu,
    _gelu_grad, _approx...) got different keys in a process that ran BERT's training step
    first than in one that ran inference first, so kernels compiled ahead
    (bench/triton_cache.py) or by one process were missed by another. Triton 3.9 computes
    the helper first (its keys do not depend on order). Here every key is recomputed until
    none changes, which is the key of each function with all its helpers' globals: what 3.9
    gives, and the same in every process. Cost: two or three hashing passes at import."""
    from triton.runtime.jit import JITFunction

    functions, seen = [], set()
    for module in modules:
        for value in vars(module).values():
            while value is not None and not isinstance(value, JITFunction) and hasattr(value, "fn"):
                value = value.fn  # under an autotuner or heuristics
            if isinstance(value, JITFunction) and id(value) not in seen:
                seen.add(id(value))
                functions.append(value)
    keys = None
    while True:
        for fn in functions:
            fn.hash = None
        current = [fn.cache_key for fn in functions]
        if current == keys:
            return len(functions)
        keys = current
