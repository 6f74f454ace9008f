"""The `overhead` group: host microseconds per eager call of each public op, next to the
PyTorch call it replaces, and the host time of one eager BERT-base forward.

What is measured is the time until the call returns, on tiny tensors, so that it is the
Python and dispatch cost a drop-in layer pays per call, not kernel time:
- on a CUDA device the kernels really launch (Triton's own launch path included); the GPU
  work of a tiny case is a few microseconds and runs asynchronously behind the host;
- on the CPU every Triton launch is replaced by a no-op (Triton's interpreter would
  otherwise dominate), so CI measures our dispatch - checks, plan lookup, autograd, output
  allocation - and shows its regressions without a GPU (cross_entropy's reducing kernel by
  a stand-in that writes the label flag the host reads back on a CPU: bench/offline.py);
- on the CPU, a second table runs the same calls in a child process through Triton's real
  launch path with bench/offline.py's stand-in driver (kernels compiled for sm_90, the
  launcher call itself a no-op): our dispatch plus Triton's JITFunction.run, or the fast
  launch (kernels/launch.py) in its place. Everything but the C launcher and the driver call
  is the host work a GPU run does (not in --quick runs: its first run compiles a dozen
  kernels, about a minute on two cores).
The torch baselines run for real everywhere (on the CPU that includes their tiny kernels).

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
    """Every Triton kernel launch (`kernel[grid](...)`, autotuned or not) becomes a no-op, or
    for the few kernels whose output the host reads back, a stand-in (bench/offline.py's
    STAND_INS, which the stand-in driver runs as well)."""
    from triton.runtime.jit import KernelInterface

    from .offline import STAND_INS

    def no_launch(self, grid):
        return STAND_INS.get(getattr(self, "__name__", None), _no_op)

    with mock.patch.object(KernelInterface, "__getitem__", no_launch):
        yield


def _no_op(*args, **kwargs):
    return None


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
        logits=randn(8, 4 * C), labels=torch.tensor([0, 5, -100, 127, 64, 3, -100, 9], device=device),
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
        OverheadCase(
            f"cross_entropy_{suffix}",
            run(lambda: K.cross_entropy(t["logits"], t["labels"], backend=backend)),
            run(lambda: F.cross_entropy(t["logits"].float(), t["labels"])),
            "F.cross_entropy(logits.float(), labels)",
        ),
    ]


def _host_us(fns: list, device: torch.device, calls: int, repeats: int) -> list[float]:
    """Host µs per call of each function: the fastest of `repeats` rounds of `calls`
    back-to-back calls. The functions take turns round by round, so a busy machine slows
    them alike, and the fastest round is the one least disturbed by other processes. An entry
    may be (fn, fast): fn timed with the fast launch set to `fast`, set outside the timed loop."""
    fns = [f if isinstance(f, tuple) else (f, None) for f in fns]
    for fn, fast in fns:
        with use_fast_launch(fast) if fast is not None else contextlib.nullcontext():
            for _ in range(max(3, calls // 10)):  # warm-up: autotuning, compiles, plan caches
                fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, (fn, fast) in enumerate(fns):
            with use_fast_launch(fast) if fast is not None else contextlib.nullcontext():
                sync()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best[i] = min(best[i], (time.perf_counter() - start) / calls * 1e6)
    sync()
    return best


def measure_ops(device: torch.device, dtype: torch.dtype, backend: str = "triton", calls: int = 200,
                repeats: int = 7, stub: bool | None = None, only: str = "", rows: list | None = None) -> list[dict]:
    """Every row (or those whose name contains `only`); `stub` (default: on a CPU) replaces
    each Triton launch with a no-op. Without it the fast launch is timed beside Triton's path.
    Each row is appended to `rows` (a new list by default) as it is measured: a caller cut off
    midway keeps the rows before."""
    rows = [] if rows is None else rows
    stub = device.type != "cuda" if stub is None else stub
    for grad in (False, True):
        for case in op_cases(device, dtype, backend, grad):
            if only not in case.name:
                continue
            # The torch calls launch no Triton kernel: the stub changes nothing for them.
            if stub:
                with stubbed_launches():
                    ours_us, torch_us = _host_us([case.ours, case.torch], device, calls, repeats)
            else:
                # Triton's launch path and the fast launch (kernels/launch.py: Triton's
                # JITFunction.run skipped after the first launch of each specialization) in
                # the same rounds as the torch call.
                ours_us, fast_us, torch_us = _host_us([(case.ours, False), (case.ours, True), case.torch], device,
                                                      calls, repeats)
            row = dict(case=case.name, ours_us=ours_us, torch_us=torch_us, torch_call=case.torch_name,
                       ratio=ours_us / torch_us, launch="stubbed" if stub else "real" if device.type == "cuda"
                       else "offline")
            if not stub:
                row["ours_fast_launch_us"] = fast_us
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
    if device.type != "cuda":
        with stubbed_launches():
            raw_us, ours_us, tiny_us = _host_us([raw, ours, tiny], device, calls, repeats)
        return dict(triton_launch_us=raw_us, ours_us=ours_us, torch_add_us=tiny_us)
    # ours on Triton's launch path (the same launch as `raw`, our dispatch around it) and on the
    # fast launch, in the same rounds.
    raw_us, ours_us, fast_us, tiny_us = _host_us([raw, (ours, False), (ours, True), tiny], device, calls, repeats)
    return dict(triton_launch_us=raw_us, ours_us=ours_us, ours_fast_launch_us=fast_us, torch_add_us=tiny_us)


@contextlib.contextmanager
def _timed_ops(totals: dict):
    """Accumulate the host time spent inside each public fused op (the models call them as
    attributes of fuseformer.kernels, so patching the package reaches every layer), and inside
    each block's attempt to run as one fused node (models/layers.py's _fused_block_call: its
    checks and plan, and the node when it runs; a block whose attempt gives up runs its public
    ops after it, timed as such)."""
    from fuseformer.models import layers

    patches = []
    for owner, name in ((K, "scaled_dot_product_attention"), (K, "varlen_attention"), (K, "add_layer_norm"),
                        (K, "linear_gelu"), (layers, "_fused_block_call")):
        fn = getattr(owner, name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
                totals["calls"] = totals.get("calls", 0) + 1

        patches.append(mock.patch.object(owner, name, timed))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def measure_bert_forward(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """One eager BERT-base forward (B1 L16, 4 padded tokens).

    On a CUDA device: the host time until the forward returns (it returns before the GPU
    ends), fused (backend auto) against the same model on the torch backend, and fused again
    on Triton's own launch path (`fused`) and on the fast launch (`fused_fast_launch`, the default),
    and with the post-LN blocks op by op instead of one fused node each (`fused_per_op`).
    On the CPU: the host time spent inside the fused ops per forward, launches stubbed (the
    rest of the forward computes on garbage there, so its time would mean nothing). It
    includes the CPU allocator's cost for BERT-sized outputs (large buffers come from mmap
    there), which CUDA's caching allocator does not pay: compare it run to run, not to a GPU."""
    model, forward = _bert_b1_l16(device, dtype)
    with torch.inference_mode():
        if device.type != "cuda":
            from .offline import empty_linears

            model.set_backend("triton")
            # Linear layers as allocations: a block runs its own inside the fused node.
            with stubbed_launches(), empty_linears():
                forward()
                best = min(_fused_ops_us(forward) for _ in range(repeats))
            return {"backend": "triton (launches stubbed)", "fused_ops_us": best[0], "fused_calls": best[1]}
        from fuseformer.models import fused_block

        result = {"backend": "auto"}
        # fused_per_op: the post-LN blocks op by op instead of as one fused node each.
        for label, backend, fast, block in (("fused", "auto", False, True), ("torch", "torch", False, True),
                                            ("fused_fast_launch", "auto", True, True),
                                            ("fused_per_op", "auto", True, False)):
            model.set_backend(backend)
            with use_fast_launch(fast), fused_block.use(block):
                result[f"{label}_us"] = _forward_host_us(forward, repeats)
        return result


def measure_bert_train_step(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict:
    """A CUDA device's host time until one eager BERT-base training step returns (B1 L16, 4
    padded tokens, dropout 0.1, the loss the sum of the last hidden state; its kernels are a
    few µs each, so this is the host's time): fused (backend auto), the same with the
    backward on the calling thread instead of autograd's device thread, and the torch backend.
    The CPU measures the part of it in our own code instead (_bert_train_nodes_us)."""
    model, forward = _bert_b1_l16(device, dtype)
    model.train()
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        forward().last_hidden_state.float().sum().backward()

    result = {}
    for label, backend, engine_thread in (("fused", "auto", True), ("fused_calling_thread", "auto", False),
                                          ("torch", "torch", True)):
        model.set_backend(backend)
        with torch.autograd.set_multithreading_enabled(engine_thread):
            result[f"{label}_us"] = _forward_host_us(step, repeats)
    return result


def _bert_b1_l16(device: torch.device, dtype: torch.dtype):
    """(BERT-base, its eager forward on B1 L16 with 4 padded tokens) for the overhead group."""
    from fuseformer.models import BertConfig, BertModel

    model = BertModel(BertConfig(), add_pooling_layer=True).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1000, 20000, (1, 16), device=device)
    mask = torch.ones(1, 16, dtype=torch.long, device=device)
    mask[:, 12:] = 0
    return model, lambda: model(input_ids=ids, attention_mask=mask)


def _fused_ops_us(forward) -> tuple[float, int]:
    """(host µs inside the fused ops, their calls) of one forward."""
    totals: dict = {}
    with _timed_ops(totals):
        forward()
    return sum(v for k, v in totals.items() if k != "calls") * 1e6, totals["calls"]


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


@contextlib.contextmanager
def attention_default_configs():
    """Attention's default configs instead of tuning each tiny case, as the group runs: once
    tuned, a call takes the very same host path (the plain kernel launched with a cached
    config), and tuning three kernels for every case here cost about a minute of compiles on
    an H200."""
    import importlib

    launchers = importlib.import_module("fuseformer.kernels.attention_launchers")
    autotune = launchers.AUTOTUNE
    launchers.set_autotune(False)
    try:
        yield
    finally:
        launchers.set_autotune(autotune)


def run_group(device: torch.device, quick: bool = False) -> dict:
    """The `overhead` group of `fuseformer bench`: every row, the BERT-base forward and the
    launch floor, as one JSON-ready dict."""
    from fuseformer.kernels import backends

    if device.type != "cuda" and not backends.interpreting():
        # The kernels were compiled for a GPU in this process: no Triton launch takes CPU tensors.
        return {"skipped": "CPU tensors need Triton's interpreter, and the kernels here are compiled for CUDA"}
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    calls, repeats = (50, 3) if quick else (200, 7)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only add noise to the baselines
    group = {
        "dtype": str(dtype).replace("torch.", ""),
        "launch": "stubbed (no kernel runs)" if device.type != "cuda" else "real",
        "target_ratio": TARGET_RATIO,
        "rows": [],
        "bert_base_forward": None,
        "bert_base_train_step": None,
        "launch_floor": None,
    }
    # A time box ends the group with SIGINT (bench/gpu_session.sh): what was measured by then
    # is returned, and written, with the part that was cut named. The H200 run of 2026-11-28
    # lost the whole group to its 45 s box.
    part = "rows"
    try:
        with attention_default_configs():
            measure_ops(device, dtype, calls=calls, repeats=repeats, rows=group["rows"])
            part = "bert_base_forward"
            group[part] = measure_bert_forward(device, dtype, repeats=3 if quick else 5)
            if device.type == "cuda":
                part = "bert_base_train_step"
                group[part] = measure_bert_train_step(device, dtype, repeats=3 if quick else 5)
            part = "launch_floor"
            group[part] = measure_launch_floor(device, dtype, calls=calls, repeats=repeats)
        if device.type != "cuda":
            part = "offline"
            group[part] = _offline_rows(quick)
    except KeyboardInterrupt:
        group["cut"] = f"interrupted while measuring {part}, {len(group['rows'])} rows measured"
    finally:
        torch.set_num_threads(threads)
    return group


def measure_offline(calls: int = 200, repeats: int = 7, only: str = "") -> dict:
    """measure_ops on the CPU through Triton's real launch path (see the module docstring), and
    (unless `only` picks rows) the host time inside the fused ops of one eager BERT-base
    forward on both launch paths; in this process: call it in one without Triton's
    interpreter (`--offline-child`)."""
    import importlib

    from fuseformer.kernels import backends

    from .offline import admit_triton, install, pretend_sm90

    if backends.interpreting():
        raise RuntimeError("measure_offline needs a process without TRITON_INTERPRET")
    install()
    pretend_sm90()
    admit_triton()
    lg = importlib.import_module("fuseformer.kernels.linear_gelu")
    for tuned in (lg._linear_gelu_fwd, lg._linear_gelu_tma):
        tuned.configs = tuned.configs[:1]  # one compile each; a tuned call launches the same way
    torch.set_num_threads(1)
    with attention_default_configs():  # as run_group
        rows = measure_ops(torch.device("cpu"), torch.float32, calls=calls, repeats=repeats, stub=False, only=only)
        if only:
            return {"rows": rows, "bert_base_forward": None}
        return {"rows": rows, "bert_base_forward": _bert_fused_ops_us(max(3, repeats)),
                "bert_base_train_step": _bert_train_nodes_us(max(3, repeats))}


def _bert_train_nodes_us(repeats: int) -> dict:
    """Host µs inside the fused block nodes (models/fused_block.py's PostLNBlock, one a layer)
    of one eager BERT-base training step (B1 L16, 4 padded tokens, fp16, dropout 0.1, backend
    triton; the loss the sum of the last hidden state): their forward and their backward,
    on Triton's launch path and on the fast launch, the fastest of `repeats` steps each,
    taking turns. The linear layers and the GEMMs of the blocks' backward return empty
    outputs (bench/offline.py's empty_linears). What a GPU's eager step waits on beyond the
    kernels: the H200's BERT-base B32 L128 step took 30.2 ms eagerly and 7.6 ms in a CUDA
    graph (bench/results/h200/2026-11-27-a3eeca9/), and the blocks' nodes hold the Python of all but the
    embeddings, the head and autograd's own."""
    from fuseformer.models import fused_block

    from .offline import empty_linears

    model, forward = _bert_b1_l16(torch.device("cpu"), torch.float16)
    model.set_backend("triton")
    model.train()
    params = list(model.parameters())
    spent = {"forward": 0.0, "backward": 0.0, "nodes": 0}
    node = fused_block.PostLNBlock

    def timed(fn, part):
        def run(ctx, *args):
            start = time.perf_counter()
            try:
                return fn(ctx, *args)
            finally:
                spent[part] += time.perf_counter() - start
                spent["nodes"] += part == "forward"
        return staticmethod(run)

    def step():
        for p in params:
            p.grad = None
        forward().last_hidden_state.float().sum().backward()

    ways = (False, True)  # the fast launch off, on
    best = {way: (float("inf"), float("inf")) for way in ways}
    with empty_linears(), mock.patch.object(node, "forward", timed(node.forward, "forward")), \
            mock.patch.object(node, "backward", timed(node.backward, "backward")):
        for way in ways * 2:  # compiles, then each path's kept kernels and plans
            with use_fast_launch(way):
                step()
        for _ in range(repeats):
            for way in ways:
                with use_fast_launch(way):
                    spent.update(forward=0.0, backward=0.0, nodes=0)
                    step()
                    if spent["forward"] + spent["backward"] < sum(best[way]):
                        best[way] = (spent["forward"], spent["backward"])
    return {"nodes": spent["nodes"], "triton_launch_forward_us": best[False][0] * 1e6,
            "triton_launch_backward_us": best[False][1] * 1e6, "fast_launch_forward_us": best[True][0] * 1e6,
            "fast_launch_backward_us": best[True][1] * 1e6}


def _bert_fused_ops_us(repeats: int) -> dict:
    """Host µs of one eager BERT-base forward (B1 L16, 4 padded tokens, fp16 as the GPU runs
    it, so the same kernels are chosen: the TMA Linear+GELU among them; backend triton): inside
    its fused calls, on Triton's launch path and on the fast launch; and the whole forward on
    the fast launch with each block as one fused node and op by op. Inside the fused calls is
    not comparable across the two: a block's call holds its linear layers and its checks,
    where op by op the nn.Linear calls and module calls fall outside; the whole forward is.
    The fastest of `repeats` forwards each, taking turns. The linear layers return empty
    outputs instead of computing: on a GPU each is a launch of a few µs of host time, here a
    real GEMM of a millisecond that would leave the fused calls after it with cold caches."""
    from fuseformer.models import fused_block

    from .offline import empty_linears

    model, forward = _bert_b1_l16(torch.device("cpu"), torch.float16)
    model.set_backend("triton")
    ways = ((False, True), (True, True), (True, False))  # (fast launch, one node per block)
    inside = {way: (float("inf"), 0) for way in ways}
    whole = {way: float("inf") for way in ways}
    with torch.inference_mode(), empty_linears():
        for way in ways * 2:  # compiles, then each path's kept kernels
            with use_fast_launch(way[0]), fused_block.use(way[1]):
                forward()
        for _ in range(repeats):
            for way in ways:
                with use_fast_launch(way[0]), fused_block.use(way[1]):
                    inside[way] = min(inside[way], _fused_ops_us(forward))
                    start = time.perf_counter()
                    forward()
                    whole[way] = min(whole[way], (time.perf_counter() - start) * 1e6)
    return {"fused_calls": inside[(True, True)][1], "triton_launch_us": inside[(False, True)][0],
            "fast_launch_us": inside[(True, True)][0], "per_op_calls": inside[(True, False)][1],
            "fast_launch_per_op_us": inside[(True, False)][0], "forward_us": whole[(True, True)],
            "forward_per_op_us": whole[(True, False)]}


def _offline_rows(quick: bool) -> dict:
    """measure_offline in a child process (this one has Triton's interpreter on)."""
    import json
    import os
    import subprocess
    import sys

    if quick:
        return {"skipped": "not in --quick runs (its first run compiles a dozen kernels)"}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fuseformer.bench.overhead", "--offline-child"], env=env,
                          capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"skipped": "the offline run failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"launch": "stand-in driver, kernels compiled for sm_90, the launcher call itself a no-op",
            "dtype": "float32", **json.loads(lines[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.offline_child:
        import json

        print(json.dumps(measure_offline(*((2, 1) if args.quick else ()), only=args.only)))
        return 0
    from .report import overhead_lines

    group = run_group(torch.device(args.device), quick=args.quick)
    print("\n".join(overhead_lines({"overhead": group})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
