"""The `overhead` group: host microseconds per eager call of each public op, next to the
PyTorch call it replaces, and the host time of one eager BERT-base forward.

What is measured is the time until the call returns, on tiny tensors, so that it is the
Python and dispatch cost a drop-in layer pays per call, not kernel time:
- on a CUDA device the kernels really launch (Triton's own launch path included); the GPU
  work of a tiny case is a few microseconds and runs asynchronously behind the host;
- on the CPU every Triton launch is replaced by a no-op (Triton's interpreter would
  otherwise dominate), so CI measures our dispatch - checks, plan lookup, autograd, output
  allocation - and shows its regressions without a GPU.
The torch baselines run for real on both (on the CPU that includes their tiny kernels).

    python -m fuseformer.bench.overhead [--device cpu|cuda] [--quick]
    fuseformer bench --filter overhead          (the same group, written into results.json/md)
"""
from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch
import torch.nn.functional as F

from fuseformer import kernels as K
from fuseformer.kernels.launch import use_fast_launch

# The targets: an op's host time at most this many times the torch call it replaces.
TARGET_RATIO = 3.0


@dataclass
class OverheadCase:
    name: str
    ours: Callable[[], object]
    torch: Callable[[], object]
    torch_name: str


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton kernel launch (`kernel[grid](...)`, autotuned or not) becomes a no-op."""
    from triton.runtime.jit import KernelInterface

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    with mock.patch.object(KernelInterface, "__getitem__", no_launch):
        yield


def _inputs(device, dtype, grad):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    B, H, L, D, C = 2, 2, 16, 16, 32
    pad = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    pad[1, ..., L // 2:] = False
    return dict(
        q=randn(B, H, L, D), k=randn(B, H, L, D), v=randn(B, H, L, D), pad=pad,
        x=randn(8, C), r=randn(8, C), w=randn(C), b=randn(C),
        fc_w=randn(4 * C, C, scale=0.2), fc_b=randn(4 * C),
    )


def op_cases(device: torch.device, dtype: torch.dtype, backend: str, grad: bool) -> list[OverheadCase]:
    t = _inputs(device, dtype, grad)

    def run(fn):
        if not grad:
            return fn
        # forward + backward: the sum's backward is part of both sides.
        return lambda: fn().float().sum().backward()

    suffix = "fwd+bwd" if grad else "fwd"
    return [
        OverheadCase(
            f"attention_pad_{suffix}",
            run(lambda: K.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["pad"], backend=backend)),
            run(lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=t["pad"])),
            "F.scaled_dot_product_attention",
        ),
        OverheadCase(
            f"attention_causal_{suffix}",
            run(lambda: K.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True, backend=backend)),
            run(lambda: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True)),
            "F.scaled_dot_product_attention",
        ),
        OverheadCase(
            f"add_layer_norm_{suffix}",
            run(lambda: K.add_layer_norm(t["x"], t["r"], t["w"], t["b"], backend=backend)),
            run(lambda: F.layer_norm(t["x"] + t["r"], (t["x"].shape[-1],), t["w"], t["b"])),
            "F.layer_norm(x + r)",
        ),
        OverheadCase(
            f"linear_gelu_{suffix}",
            run(lambda: K.linear_gelu(t["x"], t["fc_w"], t["fc_b"], backend=backend)),
            run(lambda: F.gelu(F.linear(t["x"], t["fc_w"], t["fc_b"]))),
            "F.gelu(F.linear(...))",
        ),
    ]


def _host_us(fns: list[Callable[[], object]], device: torch.device, calls: int, repeats: int) -> list[float]:
    """Host µs per call of each function: the fastest of `repeats` rounds of `calls`
    back-to-back calls. The functions take turns round by round, so a busy machine slows
    them alike, and the fastest round is the one least disturbed by other processes."""
    for fn in fns:
        for _ in range(max(3, calls // 10)):  # warm-up: autotuning, compiles, plan caches
            fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    sync()
    return best


def measure_ops(device: torch.device, dtype: torch.dtype, backend: str = "triton", calls: int = 200,
                repeats: int = 7) -> list[dict]:
    rows = []
    stub = device.type != "cuda"
    for grad in (False, True):
        for case in op_cases(device, dtype, backend, grad):
            # The torch calls launch no Triton kernel: the stub changes nothing for them.
            with stubbed_launches() if stub else contextlib.nullcontext():
                ours_us, torch_us = _host_us([case.ours, case.torch], device, calls, repeats)
            row = dict(case=case.name, ours_us=ours_us, torch_us=torch_us, torch_call=case.torch_name,
                       ratio=ours_us / torch_us, launch="stubbed" if stub else "real")
            if not stub:
                # The opt-in fast launch path (kernels/launch.py): the same call, Triton's
                # JITFunction.run skipped after the first launch of each specialization.
                with use_fast_launch(True):
                    row["ours_fast_launch_us"] = _host_us([case.ours], device, calls, repeats)[0]
            rows.append(row)
    return rows


def measure_launch_floor(device: torch.device, dtype: torch.dtype, calls: int = 200, repeats: int = 7) -> dict:
    """The floor under our eager add_layer_norm on this machine: Triton's own launch of the
    same kernel with the same arguments (JITFunction.run: binding, specialisation key, cache
    lookup), and one tiny torch kernel. What our call costs beyond Triton's launch is ours."""
    import importlib

    aln = importlib.import_module("fuseformer.kernels.add_layer_norm")  # the module, not the function

    t = _inputs(device, dtype, grad=False)
    x, r, w, b = t["x"], t["r"], t["w"], t["b"]
    M, N = x.shape
    y, mean, rstd = torch.empty_like(x), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)
    block, single = aln._block(N)

    def raw():
        aln._add_ln_fwd[(M,)](x, r, w, b, y, y, mean, rstd, mean, N, 1e-5, 0.0, HAS_RES=True, HAS_W=True,
                              HAS_B=True, DROPOUT=False, SAVE_STREAM=False, SAVE_STATS=False, BLOCK=block,
                              SINGLE=single,
                              num_warps=aln._num_warps(block))

    ours = lambda: aln.add_layer_norm(x, r, w, b, backend="triton")  # noqa: E731
    tiny = lambda: torch.add(x, r)  # noqa: E731
    with stubbed_launches() if device.type != "cuda" else contextlib.nullcontext():
        raw_us, ours_us, tiny_us = _host_us([raw, ours, tiny], device, calls, repeats)
    floor = dict(triton_launch_us=raw_us, ours_us=ours_us, torch_add_us=tiny_us)
    if device.type == "cuda":
        with use_fast_launch(True):
            floor["ours_fast_launch_us"] = _host_us([ours], device, calls, repeats)[0]
    return floor


@contextlib.contextmanager
def _timed_ops(totals: dict):
    """Accumulate the host time spent inside each public fused op (the models call them as
    attributes of fuseformer.kernels, so patching the package reaches every layer)."""
    patches = []
    for name in ("scaled_dot_product_attention", "varlen_attention", "add_layer_norm", "linear_gelu"):
        fn = getattr(K, name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
                totals["calls"] = totals.get("calls", 0) + 1

        patches.append(mock.patch.object(K, name, timed))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def measure_bert_forward(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """One eager BERT-base forward (B1 L16, 4 padded tokens).

    On a CUDA device: the host time until the forward returns (it returns before the GPU
    ends), fused (backend auto) against the same model on the torch backend, and fused again
    with the opt-in fast launch.
    On the CPU: the host time spent inside the fused ops per forward, launches stubbed (the
    rest of the forward computes on garbage there, so its time would mean nothing). It
    includes the CPU allocator's cost for BERT-sized outputs (large buffers come from mmap
    there), which CUDA's caching allocator does not pay: compare it run to run, not to a GPU."""
    from fuseformer.models import BertConfig, BertModel

    model = BertModel(BertConfig(), add_pooling_layer=True).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1000, 20000, (1, 16), device=device)
    mask = torch.ones(1, 16, dtype=torch.long, device=device)
    mask[:, 12:] = 0

    def forward():
        model(input_ids=ids, attention_mask=mask)

    with torch.inference_mode():
        if device.type != "cuda":
            model.set_backend("triton")
            samples = []
            with stubbed_launches():
                forward()
                for _ in range(repeats):
                    totals: dict = {}
                    with _timed_ops(totals):
                        forward()
                    samples.append((sum(v for k, v in totals.items() if k != "calls") * 1e6, totals["calls"]))
            best = min(samples)
            return {"backend": "triton (launches stubbed)", "fused_ops_us": best[0], "fused_calls": best[1]}
        result = {"backend": "auto"}
        for label, backend, fast in (("fused", "auto", False), ("torch", "torch", False),
                                     ("fused_fast_launch", "auto", True)):
            model.set_backend(backend)
            with use_fast_launch(fast):
                result[f"{label}_us"] = _forward_host_us(forward, repeats)
        return result


def _forward_host_us(forward, repeats: int) -> float:
    """The fastest of `repeats` host times of one forward, until it returns (the GPU idle
    before each), after 3 warm-up forwards."""
    for _ in range(3):
        forward()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return min(samples)


def run_group(device: torch.device, quick: bool = False) -> dict:
    """The `overhead` group of `fuseformer bench`: every row, the BERT-base forward and the
    launch floor, as one JSON-ready dict."""
    from fuseformer.kernels import backends

    if device.type != "cuda" and not backends.interpreting():
        # The kernels were compiled for a GPU in this process: no Triton launch takes CPU tensors.
        return {"skipped": "CPU tensors need Triton's interpreter, and the kernels here are compiled for CUDA"}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    calls, repeats = (50, 3) if quick else (200, 7)
    import importlib

    attention = importlib.import_module("fuseformer.kernels.attention")
    threads, autotune = torch.get_num_threads(), attention.AUTOTUNE
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add noise to the baselines
    # Attention's default configs instead of tuning each tiny case: once tuned, a call takes
    # the very same host path (the plain kernel launched with a cached config), and tuning
    # three kernels for every case here cost about a minute of compiles on an H200.
    attention.set_autotune(False)
    try:
        rows = measure_ops(device, dtype, calls=calls, repeats=repeats)
        bert = measure_bert_forward(device, dtype, repeats=3 if quick else 5)
        floor = measure_launch_floor(device, dtype, calls=calls, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
        attention.set_autotune(autotune)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "launch": "stubbed (no kernel runs)" if device.type != "cuda" else "real",
        "target_ratio": TARGET_RATIO,
        "rows": rows,
        "bert_base_forward": bert,
        "launch_floor": floor,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    args = parser.parse_args(argv)
    from .report import overhead_lines

    group = run_group(torch.device(args.device), quick=args.quick)
    print("\n".join(overhead_lines({"overhead": group})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
