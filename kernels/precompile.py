"""Compile an autotuned kernel's configs all at once, on threads, before Triton times them.

Why: the first call of an autotuned kernel for a new key (a new head dim, dtype, mask kind or
sequence bucket) runs Triton's autotuner, which compiles its configs one after another inside
its timing loop. On the H100 machine of 2026-11-26 that was 7-13 s per kernel, and nearly all
of a 230 s benchmark run (bench/prewarm.py); a user pays it on the first forward, backward and
every new shape class. Compiling is CPU work (MLIR passes, LLVM, ptxas in a subprocess), and
Triton's compile pipeline runs on any thread: Triton's own AsyncCompileMode hands each compile
of a JITFunction to an executor and keeps the result in the kernel's in-memory cache.

What this does: on the first call of a key, `launch_tuned` (kernels/_util.py) first asks for
every config the autotuner would time (the same early pruning, the same configs' pre_hooks,
which fit host tensor descriptors' boxes and so change the specialization), with the same
arguments, as warm-up runs (compile, no launch) inside an AsyncCompileMode on a shared thread
pool. The autotuner then finds each config compiled, under the same key, and only times them.

Measured on this project's 2-core CPU, compiling for sm_90 through a stand-in driver (no GPU:
`python -m fuseformer.bench.compile_time`), first calls over 4 configs, serial -> on 2
threads: the portable Linear+GELU GEMM 9.0 -> 5.9 s (triton 3.9), 7.1 -> 4.7 s (3.6); the
portable attention forward 7.7 -> 5.4 s (3.9), 4.4 -> 3.2 s (3.6); 1.3-1.7x over repeated
runs, the autotuner compiling nothing more. Over all 10 configs of the attention forward
(`bash bench/gpu_session.sh compile`, triton 3.9): 16.8 -> 8.1 s. Part of a compile holds the GIL (Triton's Python
front end and pass set-up), so more threads gain less than in proportion; the GPU machines
have 16 cores, where this is unmeasured.

FUSEFORMER_COMPILE_THREADS (read at import; default: the CPUs this process may use, at most
16) sizes the pool; 0 or 1 leaves compiling to the autotuner, one config at a time. Triton
releases without AsyncCompileMode, or a call already inside one, do the same.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .backends import interpreting

try:  # Triton's executor hook for compiles (triton >= 3.4); private, so guarded
    from triton.runtime._async_compile import AsyncCompileMode, active_mode
except ImportError:  # pragma: no cover - older Triton: the autotuner compiles serially
    AsyncCompileMode = active_mode = None


def _threads_from_env() -> int:
    value = os.environ.get("FUSEFORMER_COMPILE_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"FUSEFORMER_COMPILE_THREADS must be an integer, got {value!r}") from None
        if threads < 0:
            raise ValueError(f"FUSEFORMER_COMPILE_THREADS must be >= 0, got {threads}")
        return threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(16, cpus)


THREADS = _threads_from_env()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def set_threads(threads: int) -> int:
    """Size the compile pool (0 or 1: no parallel compiles); returns the previous size."""
    global THREADS, _pool
    if int(threads) < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    with _pool_lock:
        before, THREADS = THREADS, int(threads)
        if _pool is not None and before != THREADS:
            _pool.shutdown(wait=False)
            _pool = None
    return before


_pool_pid = None


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        # A forked child (a DataLoader worker, say) inherits the pool object but not its
        # threads: it gets a pool of its own.
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="fuseformer-compile")
            _pool_pid = os.getpid()
        return _pool


def configs(tuned, args, kwargs) -> list:
    """The configs Triton's autotuner times for this call, after its early pruning (what
    Autotuner.run does, with the keyword arguments it passes: grid and warmup included)."""
    tuned.nargs = dict(zip(tuned.arg_names, args))
    try:
        return tuned.prune_configs(kwargs)
    finally:
        tuned.nargs = None


def precompile(tuned, grid, args, kwargs) -> int:
    """Compile, on the thread pool, every config `tuned` (a triton.autotune'd kernel) would
    time for `tuned[grid](*args, **kwargs)`; returns how many compiles were asked for (0 when
    parallel compiling is off). A config whose compile fails is left to the autotuner, which
    compiles it again and handles the error its own way."""
    if (AsyncCompileMode is None or THREADS <= 1 or len(tuned.configs) <= 1 or interpreting()
            or active_mode.get() is not None):
        return 0
    run_kwargs = dict(kwargs, grid=grid, warmup=False)
    chosen = configs(tuned, args, run_kwargs)
    if len(chosen) <= 1:
        return 0
    nargs = dict(zip(tuned.arg_names, args))
    with AsyncCompileMode(_executor(), ignore_errors=True):
        for config in chosen:
            current = dict(run_kwargs, **config.all_kwargs())
            if config.pre_hook:
                config.pre_hook({**nargs, **current})
            # The warm-up run binds and specializes the arguments here (after the pre_hook set
            # this config's descriptor boxes), then hands the compile to the pool.
            tuned.fn.run(*args, **dict(current, warmup=True))
    return len(chosen)


# ----------------------------------------------------------------------------- timing

# Triton's autotuner times each config with do_bench, by default 25 ms of warm-up and 100 ms of
# repetitions (an L2 flush before each run): ~0.13 s a config whatever the kernel's length. With
# the configs compiled ahead (above) that is most of a first call: ~1 s for a key of 8 configs,
# and ~65 s for the 496 configs the GPU ops suite tunes (counted by bench/triton_cache.py's
# harvest, 2026-11-27), out of a lent GPU's 15 minutes. 5 ms and 25 ms take a quarter of that
# and still give each config from ~10 runs (a 2.5 ms kernel) to hundreds: enough for a median
# to rank configs that differ by more than a few percent, which is what tuning is for.
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25


def tuning_bench(kernel_call, quantiles):
    """The autotuners' timing of one config: the active driver's benchmarker (do_bench on
    CUDA) with TUNE_WARMUP_MS and TUNE_REP_MS."""
    from triton.runtime import driver

    return driver.active.get_benchmarker()(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def autotune(configs, key, **kwargs):
    """triton.autotune timed by tuning_bench: every autotuned kernel of ours is made with it."""
    import triton

    return triton.autotune(configs=configs, key=key, do_bench=tuning_bench, **kwargs)
