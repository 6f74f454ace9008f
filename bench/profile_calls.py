"""Where the time of one fused call goes, on a GPU: the question the H100 run of 2026-11-26 left
open (bench/results/h100/README.md). There add+LN forward+backward at 16384x768 bf16 took
0.853 ms on the triton backend and 0.211 ms on the cuda backend, through the same autograd
Function, where the bytes it must move take ~0.06 ms.

First, with nothing of ours in the way: host µs of launching a one-element Triton kernel, and of a
torch add, on the main thread, from another Python thread and from inside an autograd backward
(the engine's device thread).

Then, for each backend, at that shape:
- the time per forward+backward (torch.autograd.grad, as the benchmark does), per forward, and
  per direct call of the backward launcher on the main thread (no autograd engine): CUDA-event
  medians over many calls, and host µs per call (calls queued back to back, one sync at the end);
  the same launcher's host µs from another Python thread (the engine runs backwards on one:
  torch.compile's add+LN forward+backward was as slow as ours there, 0.90 ms, where eager ATen
  took 0.21), and the forward+backward with the engine's multithreading off (the backward on
  the calling thread: torch.autograd.set_multithreading_enabled(False));
- the GPU time of the kernels alone, from torch.profiler's device events;
- torch.profiler's table of the forward+backward (top rows by CPU time), which shows host gaps,
  synchronisations and the autograd engine's thread;
- on the triton backend, the timing rows on Triton's own launch path and on the fast launch.

Then Linear+GELU forward+backward per backend (--linear-gelu MxKxN): events against host time,
and the profiler's CPU-side table.

Then the Hopper attention's TMA descriptors made on the host against the device (--attention
BxHxLxD): event and host times per call, and where a host-descriptor call spends its host time.

Last, a BERT-base fp16 inference forward (--bert BxL, default 32x128, backend auto): its kernels
by device time per forward, to say which of them the CUDA-graph target (2x HF + torch.compile)
must shrink; and the same for a bf16 masked-LM training step (--bert-train BxL, default 32x128:
the training target, 1.3x HF sdpa, stood at 0.76x on the H200 with host and kernels untold);
GPT-2 small's fp16 LM forward (--gpt2 BxL, default 8x512, the models suite's case); its causal
attention by kernel against SDPA's (--causal-attention BxHxLxD, default 8x12x512x64); and its
greedy generate per token against transformers' (--generate BxPROMPTxNEW, default 1x128x64).
Each eager model section also prints a cProfile of the host time.

    python -m fuseformer.bench.profile_calls [--M 16384] [--N 768] [--backends triton,cuda] [--bert 32x128]
                                             [--bert-train 32x128] [--linear-gelu 16384x768x3072]
                                             [--attention 16x16x1024x64] [--gpt2 8x512]
                                             [--causal-attention 8x12x512x64] [--generate 1x128x64]
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


def _print_rows(prefix: str, rows, iters: int) -> None:
    """One line per (what, fn): its CUDA-event median and its host µs per call."""
    for what, fn in rows:
        print(f"{prefix} {what}: {_events_ms(fn, iters):.4f} ms (events, median); "
              f"host {_host_us(fn, iters):.1f} us/call")


def _profiled(fn, calls: int = 10):
    """torch.profiler's key averages (CPU and CUDA) over `calls` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def _available(backends: list[str], label: str):
    """The backends that can run here, in order; one line for each that cannot."""
    from fuseformer.kernels import backends as B

    for backend in backends:
        reason = B.unavailable_reason(backend)
        if reason is None:
            yield backend
        else:
            print(f"[{label}{backend}] unavailable: {reason}")


def _on_calling_thread(fn):
    """fn with autograd's backward run on the calling thread instead of the engine's CUDA device
    thread: if the device thread is where the time goes, a row timed through this shows it gone."""
    def run():
        with torch.autograd.set_multithreading_enabled(False):
            return fn()

    return run


def _inputs(M, N, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, r = randn(M, N).requires_grad_(True), randn(M, N).requires_grad_(True)
    w = (1 + 0.1 * randn(N)).requires_grad_(True)
    b = randn(N, scale=0.1).requires_grad_(True)
    return x, r, w, b, randn(M, N)


def profile_add_layer_norm(M: int, N: int, backends: list[str], iters: int) -> None:
    from fuseformer import kernels as K
    from fuseformer.kernels import backends as B
    from fuseformer.kernels.add_layer_norm import _run_forward
    from fuseformer.kernels.launch import use_fast_launch

    device = torch.device("cuda")
    x, r, w, b, dy = _inputs(M, N, torch.bfloat16, device)
    leaves = (x, r, w, b)
    for backend in _available(backends, ""):

        def fwd(backend=backend):
            return K.add_layer_norm(x, r, w, b, 1e-5, backend=backend)

        def fwd_bwd(backend=backend):
            return torch.autograd.grad(fwd(backend), leaves, dy)

        with torch.no_grad():
            _, stream, mean, rstd = _run_forward(backend, x, r, w, b, 1e-5, 0.0, None, True, True)
        impl = B.get_impl("add_layer_norm", backend)

        def bwd_direct(impl=impl, stream=stream, mean=mean, rstd=rstd):
            return impl.backward(dy, None, stream, w, b, mean, rstd, 0.0, None, True)

        rows = [("fwd+bwd (autograd.grad)", fwd_bwd),
                ("fwd+bwd, backward on the calling thread", _on_calling_thread(fwd_bwd)),
                ("fwd (grad-enabled)", fwd), ("bwd launcher, main thread", bwd_direct)]
        # The triton rows on Triton's launch path and on the fast launch (kernels/launch.py, the
        # default), which skips Triton's JITFunction.run: if the slow part is there, the second
        # rows show it gone.
        fast_modes = (False, True) if backend == "triton" else (False,)
        for fast in fast_modes:
            label = " [fast launch]" if fast else ""
            with use_fast_launch(fast):
                _print_rows(f"[{backend}]{label}", rows, iters)
                # The same backward launcher from another Python thread (not the autograd
                # engine's): if only this is slow too, the cost is in launching from a second
                # thread at all.
                print(f"[{backend}]{label} bwd launcher, another thread: host "
                      f"{_thread_host_us(bwd_direct, iters):.1f} us/call")
        events = _profiled(fwd_bwd)
        device_us = sum(e.self_device_time_total for e in _device_events(events)) / 10
        print(f"[{backend}] kernels' device time per fwd+bwd (profiler): {device_us:.1f} us")
        print(events.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
        if backend == "triton":
            # The H200 (2026-11-27) timed this fwd+bwd at 558 us of host time with the backward
            # on the engine's device thread and 329 on the calling thread, where a bare Python
            # Function differs by 53: by function, each way (cProfile follows every thread on
            # Python 3.12+, whose profiler runs on sys.monitoring; on older ones the engine
            # thread's functions are missing from the first table).
            for where, fn in (("engine thread", fwd_bwd), ("calling thread", _on_calling_thread(fwd_bwd))):
                _print_cprofile(f"[{backend}] [fast launch] fwd+bwd, backward on the {where}, over 50 calls", fn, 50,
                                torch.cuda.synchronize, rows=16)


def _print_cprofile(title: str, fn, calls: int, sync, rows: int = 22, sort: str = "tottime") -> None:
    """cProfile of `calls` calls of fn (synchronised after): the top `rows` Python functions by
    `sort` (pstats' keys: "tottime", own time; "cumulative", with their callees')."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    sync()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(sort).print_stats(rows)
    print(f"{title} (cProfile, by {sort}):")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip()))


def _device_events(events) -> list:
    """The profiler's device-side events (kernels, copies, memsets) with device time. The CPU
    ops that launched them (aten::addmm, our autograd Functions) carry the same self device
    time in torch 2.11's profiler: summing every event counted each kernel twice (the H200 run
    of 2026-11-27 printed 152 us for add+LN's forward+backward, whose CUDA graph took 78)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type != DeviceType.CPU and e.self_device_time_total > 0]


def profile_linear_gelu(M: int, K_in: int, N: int, backends: list[str], iters: int) -> None:
    """Linear+GELU (erf) forward+backward, bf16: the H200 run of 2026-11-27 timed ours on the
    triton backend at 0.7307 ms eagerly and 0.5917 in a CUDA graph at 16384 x 768 -> 3072,
    where csrc/'s CUTLASS path took 0.598 and 0.596: host time the GPU waited for, in the
    triton backward (dgelu kernel, two torch.mm, the bias gradient) or around it. Per backend:
    forward+backward by events and host µs per call, with the backward on the autograd
    engine's device thread and on the calling thread, then torch.profiler's CPU-side table."""
    from fuseformer import kernels as K

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K_in, generator=g, device="cuda").to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(N, K_in, generator=g, device="cuda") * K_in ** -0.5).to(torch.bfloat16).requires_grad_(True)
    b = (torch.randn(N, generator=g, device="cuda") * 0.1).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(M, N, generator=g, device="cuda").to(torch.bfloat16)
    for backend in _available(backends, "linear_gelu "):

        def fwd_bwd(backend=backend):
            return torch.autograd.grad(K.linear_gelu(x, w, b, "none", backend=backend), (x, w, b), dy)

        _print_rows(f"[linear_gelu {backend} {M}x{K_in}->{N}]", (
            ("fwd+bwd (autograd.grad)", fwd_bwd),
            ("fwd+bwd, backward on the calling thread", _on_calling_thread(fwd_bwd))), iters)
        print(_profiled(fwd_bwd).table(sort_by="cpu_time_total", row_limit=16, max_name_column_width=60))


def profile_bare_launch(iters: int) -> None:
    """Host µs of one launch of a one-element Triton kernel: on the main thread, from another
    Python thread, and from inside an autograd backward (the engine's device thread), beside a
    torch add on each. Separates what launching Triton from a second thread costs from anything
    of ours."""
    import triton
    import triton.language as tl

    @triton.jit
    def _bump(X):
        tl.store(X, tl.load(X) + 1)

    x = torch.zeros(1, device="cuda")

    def triton_launch():
        _bump[(1,)](x)

    def torch_add():
        x.add_(1)

    for what, fn in (("triton launch", triton_launch), ("torch add_", torch_add)):
        print(f"[bare] {what}: main thread {_host_us(fn, iters):.1f} us/call, another thread "
              f"{_thread_host_us(fn, iters):.1f} us/call")
    _profile_launcher_pointers(iters)

    class InBackward(torch.autograd.Function):
        """Calls `fn` `iters` times inside its backward and times them there."""

        @staticmethod
        def forward(ctx, t, fn):
            ctx.fn = fn
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            ctx.fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iters):
                ctx.fn()
            ctx.us = (time.perf_counter() - start) / iters * 1e6
            timings.append(ctx.us)
            return g, None

    for what, fn in (("triton launch", triton_launch), ("torch add_", torch_add)):
        timings = []
        leaf = torch.zeros(1, device="cuda", requires_grad=True)
        InBackward.apply(leaf, fn).sum().backward()
        torch.cuda.synchronize()
        print(f"[bare] {what} inside an autograd backward (the engine's thread): {timings[0]:.1f} us/call")

    # What any Python-backward op pays per step before launching anything: an autograd.Function
    # whose backward returns its gradient, against the same step with a C++ backward (a torch
    # multiply), each through autograd.grad with the backward on the engine's device thread and
    # on the calling thread. On the H200 every Python-backward add+LN (ours, torch.compile's,
    # Liger's) took 0.37-0.96 ms eagerly where its kernels take ~0.08: if this row is large,
    # that cost is the engine's, paid by every such op.
    class PassThrough(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g

    leaf = torch.zeros(1024, device="cuda", requires_grad=True)
    seed = torch.ones(1024, device="cuda")

    def python_step():
        return torch.autograd.grad(PassThrough.apply(leaf), (leaf,), seed)

    def cpp_step():
        return torch.autograd.grad(leaf * 1.0, (leaf,), seed)

    for what, fn in (("autograd.Function with a Python backward", python_step), ("torch multiply", cpp_step)):
        print(f"[bare] fwd+bwd of a {what}: host {_host_us(fn, iters):.1f} us/call on the engine's thread, "
              f"{_host_us(_on_calling_thread(fn), iters):.1f} on the calling thread")


def _profile_launcher_pointers(iters: int) -> None:
    """What a tensor argument costs Triton's launcher over its address (kernels/launch.py's
    docstring: given a tensor, the launcher asks the driver about its pointer,
    cuPointerGetAttribute, per tensor per launch; the fast launch passes addresses): a kernel
    of 8 pointers launched through Triton's path, through our fast launch, and by its
    compiled launcher directly with the 8 tensors and with their 8 addresses."""
    import triton
    import triton.language as tl

    from fuseformer.kernels.launch import launch

    @triton.jit
    def _bump8(A, B, C, D, E, F, G, H):
        tl.store(A, tl.load(A) + 1)
        tl.store(B, tl.load(B) + 1)
        tl.store(C, tl.load(C) + 1)
        tl.store(D, tl.load(D) + 1)
        tl.store(E, tl.load(E) + 1)
        tl.store(F, tl.load(F) + 1)
        tl.store(G, tl.load(G) + 1)
        tl.store(H, tl.load(H) + 1)

    ts = [torch.zeros(1, device="cuda") for _ in range(8)]
    ptrs = [t.data_ptr() for t in ts]
    compiled = _bump8[(1,)](*ts)
    stream = torch.cuda.current_stream().cuda_stream

    def direct(args):
        return lambda: compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                                    *args)

    rows = (("Triton's path", lambda: _bump8[(1,)](*ts)), ("fast launch", lambda: launch(_bump8, (1,), *ts)),
            ("its launcher, 8 tensors", direct(ts)), ("its launcher, 8 addresses", direct(ptrs)))
    print("[bare] a kernel of 8 pointers: " + ", ".join(f"{what} {_host_us(fn, iters):.1f}" for what, fn in rows)
          + " us/call")


def profile_attention_descriptors(B: int, H: int, L: int, D: int, iters: int) -> None:
    """The question the H200 run of 2026-11-27 left open (bench/results/h200/2026-11-27-5e53e2b/README.md): the
    Hopper attention with host TMA descriptors ran faster than with device ones in CUDA graphs,
    yet eagerly its calls took up to 0.56 ms more than their graph replays (device
    descriptors: under 0.01 ms). This CPU, through the same Python path with a stand-in
    driver, measured ~50 µs a forward then (Triton's JITFunction.run), ~18 since (the fast
    launch and its plans). For each place ("device", "host"), causal and not, bf16
    (B, H, L, D): forward and forward+backward by CUDA events (median) and host µs per call;
    then, for the host-descriptor causal forward, the Python functions by cumulative time
    (cProfile) and torch.profiler's CPU-side table (driver calls such as
    cuTensorMapEncodeTiled or cuLaunchKernelEx, and any synchronisation)."""
    from fuseformer import kernels as K
    from fuseformer.kernels import attention as A

    if torch.cuda.get_device_capability() != (9, 0):
        print("[attention descriptors] skipped: the Hopper kernels run on capability (9, 0)")
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=g, device="cuda").to(torch.bfloat16)
    for place in ("device", "host"):
        for causal in (False, True):
            def fwd(causal=causal):
                return K.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")

            def fwd_bwd(causal=causal):
                return torch.autograd.grad(fwd(causal), (q, k, v), dout)

            with A.variant(kernel="hopper", descriptors=place):
                _print_rows(f"[attention B{B} H{H} L{L} d{D} {place} descriptors, causal={causal}]",
                            (("fwd", fwd), ("fwd+bwd", fwd_bwd)), iters)
    with A.variant(kernel="hopper", descriptors="host"):
        def causal_fwd():
            return K.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")

        causal_fwd()
        torch.cuda.synchronize()
        _print_cprofile(f"[attention host descriptors, causal fwd] Python functions over {iters} calls", causal_fwd,
                        iters, torch.cuda.synchronize, rows=18, sort="cumulative")
        print(_profiled(causal_fwd).table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


def profile_causal_attention(B: int, H: int, L: int, D: int) -> None:
    """GPT-2's attention (fp16, causal, its all-ones attention_mask as a key-padding row): the
    H200 run of a3eeca9 saw it take 30.6 µs a layer at B8 H12 L512 d64 inside the GPT-2 forward,
    ~105 TFLOP/s over the causal half, where the ops suite's causal cases reach 282-392 from
    1024 keys. Device time (CUDA-graph replay) of ours, portable and Hopper kernels, with and
    without the key row, against torch's SDPA backends with is_causal; then the configs the
    portable forward's autotuner chose."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fuseformer import kernels as K
    from fuseformer.bench.timing import time_graph
    from fuseformer.kernels import attention as A
    from fuseformer.kernels.attention_kernels import attn_fwd_tuned

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=g, device="cuda", dtype=torch.float16) for _ in range(3))
    row = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    flops = 4 * B * H * L * L * D / 2
    label = f"[causal attention B{B} H{H} L{L} d{D} fp16]"
    runs = []
    for kernel in ("portable", "hopper"):
        for mask in (None, row):
            runs.append((f"ours {kernel}, {'key row' if mask is not None else 'no mask'}",
                         lambda kernel=kernel, mask=mask: _within_variant(
                             A, kernel, lambda: K.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True,
                                                                               backend="triton"))))
    for name, sdpa in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def call(sdpa=sdpa):
            with sdpa_kernel(sdpa):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        runs.append((f"sdpa {name}", call))
    for name, fn in runs:
        try:
            ms = time_graph(fn, _events_ms(fn, 5), quick=True).median_ms
            print(f"{label} {name}: {1e3 * ms:.1f} us, {flops / ms / 1e9:.0f} TFLOP/s (graph)")
        except Exception as err:  # a refused backend: say so and go on
            print(f"{label} {name}: not timed ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    for key, config in getattr(attn_fwd_tuned, "cache", {}).items():
        print(f"{label} portable forward autotuned: key {key} -> {config}")


def _within_variant(A, kernel: str, fn):
    with A.variant(kernel=kernel):
        return fn()


def profile_bert(B: int, L: int, iters: int, device: str = "cuda", config=None, backend: str = "auto",
                 train: bool = False, family: str = "bert") -> None:
    """Where the GPU time of one BERT-base fp16 inference forward goes (the CUDA-graph target
    of the eager-speed issue: 1.89 ms at B32 L128 on the H100, where HF + torch.compile took
    2.77): the kernels by device time per forward, ours (Triton/csrc) and torch's (cuBLAS
    GEMMs, copies) alike. Eager forwards: the kernels are the ones a CUDA graph replays.
    train=True: a bf16 masked-LM training step (15% of tokens labelled, forward, loss and
    backward) instead, "per forward" then meaning per step. family="gpt2": GPT-2 small's LM
    forward (the models suite's gpt2_infer case: 5.22 ms in CUDA graphs on the H200 against HF
    + torch.compile's 2.81, kernels untold) or its LM training step."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    from fuseformer.models import BertConfig, BertForMaskedLM, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dtype = (torch.bfloat16 if train else torch.float16) if device == "cuda" else torch.float32
    if family == "gpt2":
        model = GPT2LMHeadModel(config or GPT2Config()).to(device=device, dtype=dtype).train(train)
    elif train:
        model = BertForMaskedLM(config or BertConfig()).to(device=device, dtype=dtype).train()
    else:
        model = BertModel(config or BertConfig(), add_pooling_layer=True).to(device=device, dtype=dtype).eval()
    model.set_backend(backend)
    ids = torch.randint(1, model.config.vocab_size, (B, L), device=device)
    mask = torch.ones(B, L, dtype=torch.long, device=device)
    labels = ids if family == "gpt2" else torch.where(torch.rand(B, L, device=device) < 0.15, ids,
                                                      torch.full_like(ids, -100))
    params = [p for p in model.parameters() if p.requires_grad]
    label = f"[{family}{' train' if train else ''} B{B} L{L} {dtype}]"

    def step():
        if not train:
            return model(input_ids=ids, attention_mask=mask)
        for p in params:
            p.grad = None
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with contextlib.nullcontext() if train else torch.inference_mode():
        for _ in range(3):  # compiles, autotuning, allocator
            step()
        sync()
        if device == "cuda":
            # The H200 run of 2026-11-27 timed this forward eagerly at 9.30 ms (fused) and 5.77
            # (torch backend) where the kernels take ~2 ms and the overhead group's B1 L16
            # forward returned after 4.1 ms (3.2) of host time: the time until the call
            # returns against the time per forward by events, per backend, says whether the
            # host, the GPU or a wait between them (a synchronisation) is the bound.
            from fuseformer.bench.overhead import _forward_host_us

            for name in dict.fromkeys((backend, "torch")):
                model.set_backend(name)
                print(f"{label} backend {name}: {_events_ms(step, iters):.3f} ms per forward "
                      f"(events, median); host {_forward_host_us(step, 5):.0f} us until it returns (fastest "
                      f"of 5); {_host_us(step, iters):.0f} us per forward queued back to back")
                if train:
                    # The H200 (2026-11-27) timed add+LN's fwd+bwd at 558 us of host time with
                    # the backward on autograd's engine thread and 329 on the calling thread: the
                    # whole step both ways (our blocks' backward nodes are Python, torch's C++).
                    calling = _on_calling_thread(step)
                    print(f"{label} backend {name}, backward on the calling thread: {_events_ms(calling, iters):.3f} "
                          f"ms per step (events, median); {_host_us(calling, iters):.0f} us per step queued back "
                          "to back")
            model.set_backend(backend)
            # Where that host time goes, by Python function (the CPU machine's offline driver
            # stubs the launches and GEMMs: only this shows the GPU machine's own costs).
            _print_cprofile(f"{label} backend {backend}, host by function over 3 forwards", step, 3, sync)
        with profile(activities=activities) as prof:
            for _ in range(iters):
                step()
            sync()
    events = prof.key_averages()
    kernels = _device_events(events)
    total = sum(e.self_device_time_total for e in kernels) / iters
    print(f"{label} device time per forward: {total:.1f} us over {len(kernels)} kernels")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:25 if train else 20]:
        per = e.self_device_time_total / iters
        print(f"  {per:8.1f} us {100 * per / total:5.1f}%  x{e.count // iters:<3d} {e.key[:110]}")
    if not kernels:
        print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


def profile_generate(B: int, prompt: int, new: int, iters: int, device: str = "cuda", config=None,
                     backend: str = "auto") -> None:
    """GPT-2 small's greedy generate (fp16, random weights, no padding, `new` tokens after a
    `prompt`-token prompt, no early stop): wall ms per generated token for ours (one node per
    block, op by op, and on a StaticKVCache whose step is replayed from a CUDA graph) and
    transformers' sdpa model on the same weights, and how many of the
    generated tokens agree with transformers' (fp16 greedy decoding may part ways at a near
    tie; a sanity figure, not the parity rule). Each decoding step is host time: what the one
    node per block (its KV-cache path) and the launch paths are worth there."""
    import transformers

    from fuseformer.models import GPT2LMHeadModel, fused_block

    torch.manual_seed(0)
    dtype = torch.float16 if device == "cuda" else torch.float32
    config = config or transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.set_attn_implementation("sdpa")
    ours = GPT2LMHeadModel.from_hf(hf, backend=backend).to(device=device, dtype=dtype).eval()
    hf = hf.to(device=device, dtype=dtype)
    ids = torch.randint(0, config.vocab_size, (B, prompt), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    runs = {
        "ours, one node per block": lambda: ours.generate(ids, new, attention_mask=mask, eos_token_id=[]),
        "ours, op by op": lambda: ours.generate(ids, new, attention_mask=mask, eos_token_id=[]),
        # On a GPU the first call captures the step (its warm-up run below), later ones replay
        # it; on the CPU the static cache's step runs eagerly.
        "ours, static cache, a CUDA graph per step": lambda: ours.generate(
            ids, new, attention_mask=mask, eos_token_id=[], static_cache=True, cuda_graph=device == "cuda"),
        "transformers sdpa": lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                                 do_sample=False, pad_token_id=0),
    }
    label = f"[gpt2 generate B{B} prompt {prompt} +{new} {dtype}]"
    outputs = {}
    with torch.inference_mode():
        for name, run in runs.items():
            with fused_block.use(name != "ours, op by op"):
                run()  # compiles, autotuning, allocator
                sync()
                best = float("inf")
                for _ in range(iters):
                    start = time.perf_counter()
                    outputs[name] = run()
                    sync()
                    best = min(best, time.perf_counter() - start)
            print(f"{label} {name}: {1e3 * best / new:.3f} ms per token (fastest of {iters})")
    theirs = outputs["transformers sdpa"][:, prompt:]
    for name in ("ours, one node per block", "ours, op by op", "ours, static cache, a CUDA graph per step"):
        same = (outputs[name][:, prompt:] == theirs).float().mean().item()
        print(f"{label} {name}: {100 * same:.1f}% of the generated tokens as transformers'")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuseformer.bench.profile_calls", description=__doc__.split("\n\n")[0])
    p.add_argument("--M", type=int, default=16384)
    p.add_argument("--N", type=int, default=768)
    p.add_argument("--backends", default="triton,cuda")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--bert", default="32x128", help="BxL of the BERT-base forward to profile ('' skips it)")
    p.add_argument("--bert-train", default="32x128",
                   help="BxL of the BERT-base bf16 masked-LM training step to profile ('' skips it)")
    p.add_argument("--gpt2", default="8x512", help="BxL of the GPT-2 fp16 LM forward to profile ('' skips it)")
    p.add_argument("--causal-attention", default="8x12x512x64",
                   help="BxHxLxD of GPT-2's causal attention to time by kernel ('' skips it)")
    p.add_argument("--generate", default="1x128x64",
                   help="BxPROMPTxNEW of GPT-2 small's greedy generate to time per token ('' skips it)")
    p.add_argument("--linear-gelu", default="16384x768x3072",
                   help="MxKxN of the Linear+GELU forward+backward to profile ('' skips it)")
    p.add_argument("--attention", default="16x16x1024x64",
                   help="BxHxLxD of the attention descriptor-place comparison ('' skips it; the default is the "
                        "ops suite's attn_fwd_causal_d64_L1024 shape, the widest gap on the H200)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    backends = [s.strip() for s in args.backends.split(",") if s.strip()]

    def dims(text):  # "16384x768x3072" -> (16384, 768, 3072)
        return tuple(int(v) for v in text.lower().split("x"))

    profile_bare_launch(args.iters)
    profile_add_layer_norm(args.M, args.N, backends, args.iters)
    if args.linear_gelu:
        profile_linear_gelu(*dims(args.linear_gelu), backends, args.iters)
    if args.attention:
        profile_attention_descriptors(*dims(args.attention), iters=args.iters)
    if args.bert:
        profile_bert(*dims(args.bert), iters=10)
    if args.bert_train:
        profile_bert(*dims(args.bert_train), iters=5, train=True)
    if args.gpt2:
        profile_bert(*dims(args.gpt2), iters=10, family="gpt2")
    if args.causal_attention:
        profile_causal_attention(*dims(args.causal_attention))
    if args.generate:
        profile_generate(*dims(args.generate), iters=3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
