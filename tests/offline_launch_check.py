"""Our launchers through Triton's real JIT path, compiled for sm_90, on a machine without a GPU.

The parity tests run the kernels in Triton's interpreter, which skips what a GPU run goes
through before a kernel starts: Triton's argument binder and specialization, our autotuners'
early pruning and pre_hooks, the autotuner itself, kernels/precompile.py, and the compile of
every launch for the real target. Here each launcher runs on CPU tensors with
bench/compile_time.OfflineDriver as Triton's active driver: everything up to the launch is
real (the compiles too), the launch and the autotuner's timings do nothing. Results are
garbage; what counts is that every call gets through, and that the autotuner compiles nothing
that precompile.py did not already compile (it would mean the two disagree on a key).

    python tests/offline_launch_check.py [--configs 2] [--only NAME,...]

Prints one JSON line per case: the autotuned kernels it reached, the configs precompiled and
the compiles the autotuner still asked for. Exit status 1 on an error or an extra compile.
Run it without TRITON_INTERPRET (tests/test_precompile.py does, in a subprocess).
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
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fuseformer.bench.compile_time import install  # noqa: E402
from fuseformer.kernels import _util, precompile as P  # noqa: E402

A = importlib.import_module("fuseformer.kernels.attention")
HK = importlib.import_module("fuseformer.kernels.attention_hopper")
LG = importlib.import_module("fuseformer.kernels.linear_gelu")
ALN = importlib.import_module("fuseformer.kernels.add_layer_norm")
CPU = torch.device("cpu")


class Counts:
    """Compiles asked of Triton (JITFunction._do_compile: a compile or an on-disk cache hit),
    split by who asked: precompile, the autotuner, or a plain launch."""

    def __init__(self):
        self.where = "launch"
        self.reset()

    def reset(self):
        self.by = {"precompile": 0, "autotuner": 0, "launch": 0}
        self.tuned: set = set()
        self.precompiled = 0

    def install(self):
        do_compile, autotuner_run, precompile = JITFunction._do_compile, Autotuner.run, P.precompile
        counts = self

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
        Autotuner.run = tuning
        _util.precompile = precompiling


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


def case_attention(kernel, dq="pass", descriptors="device"):
    B, H, L, D = 2, 2, 96, 64
    q, k, v = (_randn(B, H, L, D) for _ in range(3))
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[1, ..., 70:] = False
    mask4 = mask.expand(B, H, L, L)
    with A.variant(kernel=kernel, dq=dq, descriptors=descriptors):
        out, lse = A._forward(q, k, v, mask4, False, 0.125, 0.0, None)
        A._backward(_randn(B, H, L, D), q, k, v, out, lse, mask4, False, 0.125, 0.0, None)


CASES = {
    "linear_gelu_portable": lambda: case_linear_gelu("portable"),
    "linear_gelu_tma": lambda: case_linear_gelu("tma"),
    "add_layer_norm": case_add_layer_norm,
    "attention_portable": lambda: case_attention("portable"),
    "attention_portable_atomic_dq": lambda: case_attention("portable", dq="atomic"),
    "attention_hopper": lambda: case_attention("hopper"),
    "attention_hopper_host": lambda: case_attention("hopper", descriptors="host"),
    "attention_hopper_atomic_dq": lambda: case_attention("hopper", dq="atomic"),
}


def _pretend_sm90():
    """What our launchers ask of a CUDA device, answered as an H100 would for CPU tensors:
    132 SMs, TMA capable, the Hopper kernels admitted."""
    _util._sm_counts[CPU] = 132
    LG._tma_capable[CPU] = True
    reason = HK.unsupported_reason
    HK.unsupported_reason = lambda q, *rest: reason(q, *rest) if q.is_cuda else None


def _trim(configs: int):
    for tuned in (A.attn_fwd_tuned, A.attn_bwd_dkdv_tuned, A.attn_bwd_dkdv_tuned_atomic, A.attn_bwd_dq_tuned,
                  HK.attn_fwd_hopper_tuned, LG._linear_gelu_fwd, LG._linear_gelu_tma,
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
    install()
    _pretend_sm90()
    if args.configs:
        _trim(args.configs)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    failed = False
    counts = Counts()
    counts.install()
    for name in names:
        counts.reset()
        try:
            CASES[name]()
            error = None
        except Exception:  # noqa: BLE001 - reported, and the exit status says so
            error = traceback.format_exc(limit=8)
        row = {"case": name, "tuned": sorted(counts.tuned), "precompiled": counts.precompiled, **counts.by,
               "threads": P.THREADS, "triton": triton.__version__, "error": error}
        failed |= error is not None or counts.by["autotuner"] > 0
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
