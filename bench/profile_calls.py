"""Where the time of one fused call goes, on a GPU: the question the H100 run of 2026-11-26 left
open (bench/results/h100/README.md). There add+LN forward+backward at 16384x768 bf16 took
0.853 ms on the triton backend and 0.211 ms on the cuda backend, through the same autograd
Function, where the bytes it must move take ~0.06 ms.

For each backend this prints, at that shape:
- the time per forward+backward (torch.autograd.grad, as the benchmark does), per forward, and
  per direct call of the backward launcher on the main thread (no autograd engine): CUDA-event
  medians over many calls, and host µs per call (calls queued back to back, one sync at the end);
  the same launcher's host µs from another Python thread (the engine runs backwards on one:
  torch.compile's add+LN forward+backward was as slow as ours there, 0.90 ms, where eager ATen
  took 0.21);
- the GPU time of the kernels alone, from torch.profiler's device events;
- torch.profiler's table of the forward+backward (top rows by CPU time), which shows host gaps,
  synchronisations and the autograd engine's thread.

    python -m fuseformer.bench.profile_calls [--M 16384] [--N 768] [--backends triton,cuda]
"""
from __future__ import annotations

import argparse
import time

import torch


def _events_ms(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _host_us(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    return host


def _thread_host_us(fn, iters: int) -> float:
    """Host µs per call of fn called back to back in a fresh thread (on the caller's device)."""
    import threading

    device = torch.cuda.current_device()
    result = []

    def body():
        torch.cuda.set_device(device)
        result.append(_host_us(fn, iters))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return result[0]


def _inputs(M, N, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, r = randn(M, N).requires_grad_(True), randn(M, N).requires_grad_(True)
    w = (1 + 0.1 * randn(N)).requires_grad_(True)
    b = randn(N, scale=0.1).requires_grad_(True)
    return x, r, w, b, randn(M, N)


def profile_add_layer_norm(M: int, N: int, backends: list[str], iters: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from fuseformer import kernels as K
    from fuseformer.kernels import backends as B
    from fuseformer.kernels.add_layer_norm import _run_forward

    device = torch.device("cuda")
    x, r, w, b, dy = _inputs(M, N, torch.bfloat16, device)
    leaves = (x, r, w, b)
    for backend in backends:
        reason = B.unavailable_reason(backend)
        if reason is not None:
            print(f"[{backend}] unavailable: {reason}")
            continue

        def fwd(backend=backend):
            return K.add_layer_norm(x, r, w, b, 1e-5, backend=backend)

        def fwd_bwd(backend=backend):
            return torch.autograd.grad(fwd(backend), leaves, dy)

        with torch.no_grad():
            _, stream, mean, rstd = _run_forward(backend, x, r, w, b, 1e-5, 0.0, None, True, True)
        impl = B.get_impl("add_layer_norm", backend)

        def bwd_direct(impl=impl, stream=stream, mean=mean, rstd=rstd):
            return impl.backward(dy, None, stream, w, b, mean, rstd, 0.0, None, True)

        rows = [("fwd+bwd (autograd.grad)", fwd_bwd), ("fwd (grad-enabled)", fwd), ("bwd launcher, main thread", bwd_direct)]
        for what, fn in rows:
            print(f"[{backend}] {what}: {_events_ms(fn, iters):.4f} ms (events, median); "
                  f"host {_host_us(fn, iters):.1f} us/call")
        # The same backward launcher from another Python thread (not the autograd engine's):
        # if only this is slow too, the cost is in launching from a second thread at all.
        print(f"[{backend}] bwd launcher, another thread: host {_thread_host_us(bwd_direct, iters):.1f} us/call")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fwd_bwd()
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 10
        print(f"[{backend}] kernels' device time per fwd+bwd (profiler): {device_us:.1f} us")
        print(events.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuseformer.bench.profile_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=int, default=16384)
    p.add_argument("--N", type=int, default=768)
    p.add_argument("--backends", default="triton,cuda")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    profile_add_layer_norm(args.M, args.N, [s.strip() for s in args.backends.split(",") if s.strip()], args.iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
