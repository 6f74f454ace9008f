"""Timers and the roofline measured once per run.

GPU: triton.testing.do_bench (warm-up, CUDA events, L2 flushed between calls by do_bench
itself), median with the 20th/80th percentiles; and time_graph, the same calls replayed in a
CUDA graph (device time without the host's launch cost). CPU: torch.utils.benchmark's Timer,
which warms up and picks the number of runs per measurement itself.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    peak_mem_mb: float | None = None
    min_ms: float | None = None


def _percentile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# do_bench budgets (ms of warm-up, ms of timed calls). Short: a sub-millisecond kernel still
# gets hundreds of timed calls in 40 ms; MIN_RUNS below keeps slow ones from getting two.
# MIN_RUNS decides the models suite's eager figures (a 30 ms training step gets no more). On
# the H200 of 2026-11-28 (bench/results/h200/), 3-6 runs of a host-bound step put one
# implementation up to 65% apart between two runs (HF sdpa's BERT step 20.8 -> 34.4 ms), and
# one step's p20-p80 spanned 20.6-32.8 ms. 15 runs cost ~0.3 s more per implementation of a
# model case, ~25 s for the quick suite's 7 cases.
BUDGET_MS = {True: (5, 20), False: (10, 40)}
MIN_RUNS = {True: 15, False: 30}


def time_gpu(fn: Callable[[], Any], quick: bool) -> Timing:
    import triton.testing

    fn()  # first call outside any budget: lazy init, autotuning, compilation
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one_ms = start.elapsed_time(end)
    warmup, rep = BUDGET_MS[quick]
    rep = max(rep, MIN_RUNS[quick] * one_ms)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    # Peak memory of one call on its own: what a user's model would need for this op.
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    # do_bench repeats the call for about `rep` ms and does not return its count: this is
    # about that count (rep over the median time of one call), not the budget in ms.
    runs = max(1, int(rep / max(median, 1e-6)))
    return Timing(median, p20, p80, runs=runs, peak_mem_mb=peak)


# CUDA-graph timing (time_graph): each replay runs about GRAPH_MS of calls, REPLAYS times.
GRAPH_MS = {True: 2.0, False: 5.0}
GRAPH_REPLAYS = {True: 10, False: 30}
GRAPH_MAX_CALLS = 200


def time_graph(fn: Callable[[], Any], one_ms: float, quick: bool) -> Timing:
    """Device time per call with the host out of the way: `n` calls captured back to back in
    one CUDA graph, the graph replayed, each replay timed by CUDA events and divided by n.
    time_gpu's eager time also holds whatever host time the GPU waits for: a call whose
    Python, dispatch and launches take longer than its kernels is timed at its host speed.
    This is the time of the kernels alone (and the gaps between them), as a model captured in
    a graph (models.graphs, torch.compile's reduce-overhead) gets them: the two side by side
    say how much of an eager time is the host's. No L2 flush between calls: the inputs rotate
    over the case's copies as in the eager timing, which covers twice the L2 wherever one copy
    would fit in it. `one_ms` (the eager time of one call) sizes n to about GRAPH_MS.

    A call that synchronises with the host cannot be captured; that is found first, eagerly,
    with the sync debug mode raising (a failed capture could leave the CUDA context unusable
    for the rest of the run), and raised as a RuntimeError that says so."""
    n = max(1, min(GRAPH_MAX_CALLS, math.ceil(GRAPH_MS[quick] / max(one_ms, 1e-3))))
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as err:
        raise RuntimeError(f"not capturable: the call synchronises with the host ({str(err).splitlines()[0]})") from err
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    # Warm-up on a side stream before the capture (PyTorch's rule for graph capture: lazy
    # initialisations, cuBLAS workspaces, first-call allocations happen outside it).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(GRAPH_REPLAYS[quick]):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / n)
    del graph
    torch.cuda.empty_cache()  # the graph's private memory pool
    samples.sort()
    return Timing(statistics.median(samples), _percentile(samples, 0.2), _percentile(samples, 0.8),
                  runs=n * len(samples), min_ms=samples[0])


def time_cpu(fn: Callable[[], Any], quick: bool) -> Timing:
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    fn()  # warm-up outside the measurement (first-call allocations, lazy inits)
    measurement = timer.blocked_autorange(min_run_time=0.25 if quick else 0.6)
    times = sorted(t * 1e3 for t in measurement.times)
    return Timing(
        statistics.median(times), _percentile(times, 0.2), _percentile(times, 0.8),
        runs=measurement.number_per_run * len(times), min_ms=times[0],
    )


def time_fn(fn: Callable[[], Any], device: torch.device, quick: bool) -> Timing:
    return time_gpu(fn, quick) if device.type == "cuda" else time_cpu(fn, quick)


@dataclasses.dataclass
class Roofline:
    copy_gbps: float  # measured device copy bandwidth (read + write bytes per second)
    matmul_tflops: float  # measured dense matmul rate in the run's matmul dtype
    matmul_dtype: str
    l2_bytes: int
    # On a GPU these are ceilings. On a CPU they are not: a small case runs from cache faster
    # than the measured copy, and a fused op can outrun one 1024^3 matmul's rate. Those are
    # reference rates only, and nothing is reported as a fraction of them.
    is_ceiling: bool = True

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def measure_roofline(device: torch.device, quick: bool) -> Roofline:
    """The ceilings every case is a fraction of, measured here rather than taken from a
    datasheet: the copy a memory-bound kernel cannot beat, the matmul a compute-bound one
    cannot beat."""
    if device.type == "cuda":
        n = 256 * 2**20 // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        t = time_gpu(lambda: dst.copy_(src), quick).median_ms
        copy = 2 * n * 4 / (t * 1e-3) / 1e9
        size, dtype = 8192, torch.bfloat16
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = time_gpu(lambda: a @ b, quick).median_ms
        del src, dst, a, b
        torch.cuda.empty_cache()
    else:
        n = 8 * 2**20
        src = torch.randn(n)
        dst = torch.empty_like(src)
        # A shared CPU is noisy: the ceiling is the best rate seen, not the typical one.
        t = time_cpu(lambda: dst.copy_(src), True).min_ms
        copy = 2 * n * 4 / (t * 1e-3) / 1e9
        size, dtype = 1024, torch.float32
        a, b = torch.randn(size, size), torch.randn(size, size)
        t = time_cpu(lambda: a @ b, True).min_ms
    tflops = 2 * size**3 / (t * 1e-3) / 1e12
    return Roofline(copy, tflops, str(dtype).replace("torch.", ""), l2_bytes(device), is_ceiling=device.type == "cuda")
