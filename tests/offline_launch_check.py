"""Our launchers through Triton's real JIT path, compiled for sm_90, on a machine without a GPU.

The parity tests run the kernels in Triton's interpreter, which skips what a GPU run goes
through before a kernel starts: Triton's argument binder and specialization, our autotuners'
early pruning and pre_hooks, the autotuner itself, kernels/precompile.py, and the compile of
every launch for the real target. Here each launcher runs on CPU tensors with
bench/offline.py's stand-in driver as Triton's active driver: everything up to the launch is
real (the compiles too), the launch and the autotuner's timings do nothing. Results are
garbage; what counts:
- every call gets through;
- the autotuner compiles nothing that precompile.py did not already compile (it would mean the
  two disagree on a key);
- the fast launch (kernels/launch.py) and the launch plans built on it (forwards and backwards)
  hand each kernel's launcher exactly what Triton's own path hands it. Each case runs four
  times: once to compile and tune, then three times with the fast launch on: the first of
  those through Triton's path (which keeps each compiled kernel), the second through the fast
  path where it applies (a launcher with plans binds one there), the third through the plans.
  The driver records every launcher call; the last three runs' calls must match (tensors
  compared by dtype, shape, strides and alignment, since each run allocates its outputs anew;
  where the fast launch hands the launcher a tensor's address, the tensor it took at that
  place, which must be the one at that address).

    python tests/offline_launch_check.py [--configs 2] [--only NAME,...]

Prints one JSON line per case: the autotuned kernels it reached, the configs precompiled, the
compiles by who asked, the launches of the last run (and its kernels' names) and how many took
the fast path. Exit status 1 on an error, an extra compile or a launch mismatch. Run it
without TRITON_INTERPRET (tests/test_precompile.py does, in a subprocess).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

import torch

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402

from fuseformer.bench.offline import Counts, install, pretend_sm90  # noqa: E402
from fuseformer.kernels import precompile as P  # noqa: E402
from fuseformer.kernels import launch as launch_module  # noqa: E402
from fuseformer.kernels.launch import use_fast_launch  # noqa: E402

A = importlib.import_module("fuseformer.kernels.attention")
AL = importlib.import_module("fuseformer.kernels.attention_launchers")
HK = importlib.import_module("fuseformer.kernels.attention_hopper")
LG = importlib.import_module("fuseformer.kernels.linear_gelu")
ALN = importlib.import_module("fuseformer.kernels.add_layer_norm")
CE = importlib.import_module("fuseformer.kernels.cross_entropy")


def _randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype)


def case_linear_gelu(forward):
    x, w, b = _randn(64, 64), _randn(128, 64), _randn(128)
    with LG.variant(forward=forward):
        out, pre = LG.forward(x, w, b, "none", forward == "portable")
        if pre is not None:
            LG.backward(_randn(64, 128), x, w, pre, "none", True)


def case_add_layer_norm():
    x, r, w, b = _randn(32, 768), _randn(32, 768), _randn(768), _randn(768)
    y, stream, mean, rstd = ALN.forward(x, r, w, b, 1e-5, 0.0, None, True)
    ALN.backward(_randn(32, 768), None, stream, w, b, mean, rstd, 0.0, None, True)


def case_cross_entropy():
    """A vocabulary wider than one forward step (5000 > FWD_BLOCK), one ignored row, the
    loss's gradient as a 0-d tensor (mean) and per row (none); then a small problem (8 rows of
    100 classes: the reducing program makes the rows, one forward launch)."""
    x = _randn(6, 5000)
    y = torch.tensor([3, -100, 4999, 0, 17, 2500])
    loss, aux = CE.forward(x, y, -100, "mean", 5000)
    CE.backward(torch.tensor(0.5), aux, x, y, -100, "mean")
    rows, aux = CE.forward(x, y, -100, "none", 5000)
    CE.backward(torch.rand(6), aux, x, y, -100, "none")
    xs, ys = _randn(8, 100), torch.tensor([3, -100, 99, 0, 17, 50, 1, 2])
    assert CE._small(8, 100)
    loss, aux = CE.forward(xs, ys, -100, "mean", 100)
    CE.backward(torch.tensor(0.5), aux, xs, ys, -100, "mean")


def case_attention(kernel, dq="pass", descriptors="device", autotune=True, causal=False, dropout_p=0.0):
    """Key-padding mask, GQA (4 query heads on 2 key/value heads), forward and backward."""
    B, H, Hk, L, D = 2, 4, 2, 96, 64
    q, k, v = _randn(B, H, L, D), _randn(B, Hk, L, D), _randn(B, Hk, L, D)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., 70:] = False
    mask4 = mask.expand(B, H, L, L)
    seed = torch.tensor([1234], dtype=torch.int64) if dropout_p else None
    before = AL.AUTOTUNE
    A.set_autotune(autotune)
    try:
        with A.variant(kernel=kernel, dq=dq, descriptors=descriptors):
            out, lse = AL._forward(q, k, v, mask4, causal, 0.125, dropout_p, seed)
            AL._backward(_randn(B, H, L, D), q, k, v, out, lse, mask4, causal, 0.125, dropout_p, seed)
    finally:
        A.set_autotune(before)


def case_attention_grads_into(kernel, dq="pass"):
    """q, k, v as views of one (B, L, 3, H, D) qkv buffer, as a fused block makes them; the
    backward into new tensors, then into views of one dqkv buffer of that layout (a fused
    block's `grads`), then into new ones again: a plan bound for one layout of dq/dk/dv must
    never launch with the other's strides."""
    B, H, L, D = 2, 4, 96, 64
    qkv = _randn(B, L, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., 70:] = False
    mask4 = mask.expand(B, H, L, L)
    dout = _randn(B, H, L, D)
    with A.variant(kernel=kernel, dq=dq, descriptors="host" if kernel == "hopper" else "auto"):
        out, lse = AL._forward(q, k, v, mask4, False, 0.125, 0.0, None)
        AL._backward(dout, q, k, v, out, lse, mask4, False, 0.125, 0.0, None)
        dqkv = _randn(B, L, 3, H, D)
        AL._backward(dout, q, k, v, out, lse, mask4, False, 0.125, 0.0, None,
                    grads=tuple(dqkv[:, :, i].transpose(1, 2) for i in range(3)))
        AL._backward(dout, q, k, v, out, lse, mask4, False, 0.125, 0.0, None)


def case_varlen(kernel):
    """Three packed sequences of 40, 17 and 64 tokens, causal, forward and backward."""
    lengths = (40, 17, 64)
    total, H, D = sum(lengths), 2, 64
    cu = torch.tensor([0, 40, 57, 121], dtype=torch.int32)
    q, k, v = (_randn(total, H, D) for _ in range(3))
    with A.variant(kernel=kernel):
        out, lse = AL._varlen_forward(q, k, v, cu, cu, max(lengths), max(lengths), True, 0.125, 0.0, None)
        AL._varlen_backward(_randn(total, H, D), q, k, v, out, lse, cu, cu, max(lengths), max(lengths), True,
                           0.125, 0.0, None)


CASES = {
    "linear_gelu_portable": lambda: case_linear_gelu("portable"),
    "linear_gelu_tma": lambda: case_linear_gelu("tma"),
    "add_layer_norm": case_add_layer_norm,
    "cross_entropy": case_cross_entropy,
    "attention_portable": lambda: case_attention("portable"),
    "attention_portable_atomic_dq": lambda: case_attention("portable", dq="atomic"),
    # 96 keys: the one-kernel backward over a 128-key block; its dQ into a strided view too.
    "attention_portable_fused_dq": lambda: case_attention("portable", dq="fused"),
    "attention_portable_fused_dq_grads_into": lambda: case_attention_grads_into("portable", dq="fused"),
    "attention_hopper": lambda: case_attention("hopper"),
    "attention_hopper_host": lambda: case_attention("hopper", descriptors="host"),
    # The default place: every descriptor on the host (as "host"), varlen's on the device.
    "attention_hopper_auto_descriptors": lambda: case_attention("hopper", descriptors="auto"),
    "attention_hopper_atomic_dq": lambda: case_attention("hopper", dq="atomic"),
    # FUSEFORMER_AUTOTUNE=0 (GPU CI): the default configs, no autotuner.
    "attention_portable_default_config": lambda: case_attention("portable", autotune=False, causal=True),
    "attention_hopper_default_config": lambda: case_attention("hopper", autotune=False, causal=True),
    "attention_portable_dropout": lambda: case_attention("portable", causal=True, dropout_p=0.1),
    "attention_portable_grads_into": lambda: case_attention_grads_into("portable"),
    "attention_hopper_grads_into": lambda: case_attention_grads_into("hopper"),
    "varlen_portable": lambda: case_varlen("portable"),
    "varlen_hopper": lambda: case_varlen("hopper"),
}


# The fast launch hands the launcher each tensor's address (kernels/launch.py), so the driver
# sees an int where Triton's path hands it the tensor. To compare the two as tensors, the
# positional arguments of the latest fast launch (or a plan's leading tensors) are kept here as
# it is made, and every launcher call is recorded with them (_Recorder).
_ORIGIN = [()]


def _capture_origins():
    spec, bound_launch = launch_module._spec, launch_module.Bound._launch

    def capturing_spec(args, pointers):
        _ORIGIN[0] = args
        return spec(args, pointers)

    def capturing_launch(self, leading, described):
        _ORIGIN[0] = leading
        return bound_launch(self, leading, described)

    launch_module._spec = capturing_spec
    launch_module.Bound._launch = capturing_launch


class _Recorder(list):
    """The stand-in driver's record of launcher calls, each with _ORIGIN as it was then."""

    def append(self, item):
        super().append((*item, _ORIGIN[0]))


def _pointer(arg, origin, i):
    """A ("pointer", address, tensor description or None) record as a tensor: described by
    the driver (Triton's path handed the tensor), or by the tensor the fast launch took at
    position i, which must be the one at that address."""
    _, address, described = arg
    if described is None:
        t = origin[i] if i < len(origin) else None
        if not isinstance(t, torch.Tensor) or t.data_ptr() != address:
            return "pointer", address, "not the address of the tensor passed at its place"
        described = (t.dtype, tuple(t.shape), t.stride())
    return ("tensor", *described, address % 16 == 0)


def _comparable(arg):
    """A launcher argument as two runs of the same call both give it: tensors (new outputs
    each run) by dtype, shape, strides and 16-byte alignment, host descriptors by their
    tensor and boxes, anything else as it is."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", arg.dtype, tuple(arg.shape), arg.stride(), arg.data_ptr() % 16 == 0)
    if hasattr(arg, "block_shape") and hasattr(arg, "base"):
        return ("descriptor", _comparable(arg.base), tuple(arg.shape), tuple(arg.strides), tuple(arg.block_shape))
    return arg


def _calls(launches):
    """(kernel, grid, stream, function, packed metadata, arguments...) of each launcher call:
    positions 6-8 (launch metadata and hooks) are what the fast path leaves out on purpose."""
    return [(name, *args[:5], id(args[5]),
             *(_pointer(a, origin, i) if a.__class__ is tuple and a[:1] == ("pointer",) else _comparable(a)
               for i, a in enumerate(args[9:])))
            for name, args, origin in launches]


def _trim(configs: int):
    for tuned in (AL.attn_fwd_tuned, AL.attn_bwd_dkdv_tuned, AL.attn_bwd_dkdv_tuned_atomic, AL.attn_bwd_dq_tuned,
                  *AL.attn_bwd_dkdv_tuned_one_pass.values(), HK.attn_fwd_hopper_tuned, LG._linear_gelu_fwd, LG._linear_gelu_tma,
                  *_hopper_bwd_tuned()):
        tuned.configs = tuned.configs[:configs]


def _hopper_bwd_tuned():
    HKB = importlib.import_module("fuseformer.kernels.attention_hopper_bwd")
    return [HKB.dkdv_tuned(d, atomic) for d in (64,) for atomic in (False, True)] + [HKB.attn_bwd_dq_hopper_tuned]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=2, help="autotune over each kernel's first N configs (0: all)")
    parser.add_argument("--only", default="", help="comma-separated case names")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("run without TRITON_INTERPRET")
    driver = install()
    driver.launches = _Recorder()
    _capture_origins()
    pretend_sm90()
    if args.configs:
        _trim(args.configs)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    failed = False
    counts = Counts()
    counts.install()
    for name in names:
        counts.reset()
        error, same, launches, fast, launched = None, False, 0, 0, []
        launch_module.clear()  # no kernel kept or plan bound by an earlier case
        try:
            with use_fast_launch(False):
                CASES[name]()  # compiles and tunes
            with use_fast_launch(True):
                driver.record = True
                CASES[name]()  # Triton's path, each compiled kernel kept for the fast path
                triton_path = _calls(driver.launches)
                driver.launches.clear()
                jit_runs = counts.jit_runs
                CASES[name]()  # the fast path wherever it applies
                fast_path = _calls(driver.launches)
                launches, fast = len(fast_path), len(fast_path) - (counts.jit_runs - jit_runs)
                driver.launches.clear()
                CASES[name]()  # the launch plans bound by the run before
                planned = _calls(driver.launches)
                launched = sorted({call[0] for call in planned})
                same = triton_path == fast_path == planned
                if not same:
                    other = fast_path if fast_path != triton_path else planned
                    diff = next(((a, b) for a, b in zip(triton_path, other) if a != b), "a different count")
                    error = f"the fast launch or a plan passed other arguments than Triton's path: {diff}"
        except Exception:  # noqa: BLE001 - reported, and the exit status says so
            error = traceback.format_exc(limit=8)
        finally:
            driver.record = False
            driver.launches.clear()
        row = {"case": name, "tuned": sorted(counts.tuned), "precompiled": counts.precompiled, **counts.by,
               "launches": launches, "kernels": launched, "fast_launches": fast, "plan_launches": counts.plan_launches,
               "same_launch_args": same, "threads": P.THREADS,
               "triton": triton.__version__, "error": error}
        failed |= error is not None or counts.by["autotuner"] > 0
        print(json.dumps(row, default=str), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
