"""First-call time of an autotuned kernel: Triton's autotuner compiling its configs one after
another (FUSEFORMER_COMPILE_THREADS=1) against kernels/precompile.py compiling them at once on
threads, each in a fresh process with an empty Triton cache.

    python -m fuseformer.bench.compile_time [--op linear_gelu|attention|hopper] [--configs N]
        [--threads T]

On a CUDA device the first call is real: compiles, then the autotuner's timing loops. Without
one it compiles for sm_90 (H100, H200) through bench/offline.py's stand-in Triton driver: the
real compile pipeline (Triton's front end, MLIR, LLVM, ptxas), with a launcher that launches
nothing and a benchmarker that times nothing, so the figure is compile time alone. That is
how kernels/precompile.py's figures were taken.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from .offline import Counts, install, pretend_sm90

def first_call(op: str, n_configs: int | None) -> dict:
    """Run `op`'s first call in this process (Triton cache and pool as the environment says);
    return its wall time, the autotuner's config count and how many compiles each side asked."""
    import importlib

    import torch

    from fuseformer.kernels import attention_launchers as A
    from fuseformer.kernels import precompile as P

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        install()
        pretend_sm90()  # the Hopper kernels admitted for CPU tensors (--op hopper)
    lg = importlib.import_module("fuseformer.kernels.linear_gelu")  # the package attr is the function
    if op == "linear_gelu":
        tuned = lg._linear_gelu_fwd
        x = torch.randn(256, 128, dtype=torch.bfloat16, device=device)
        w, b = torch.randn(512, 128, dtype=torch.bfloat16, device=device), torch.randn(512, dtype=torch.bfloat16,
                                                                                      device=device)

        def call():
            with lg.variant(forward="portable"):
                lg.forward(x, w, b, "none", False)
    else:
        from fuseformer.kernels import attention_hopper as HK

        hopper = op == "hopper"
        tuned = HK.attn_fwd_hopper_tuned if hopper else A.attn_fwd_tuned
        q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.bfloat16, device=device) for _ in range(3))

        def call():
            with A.variant(kernel="hopper" if hopper else "portable", descriptors="host" if hopper else "device"):
                A._forward(q, k, v, None, False, 0.125, 0.0, None)
    if n_configs:
        tuned.configs = tuned.configs[:n_configs]
    counts = Counts()
    counts.install()
    start = time.perf_counter()
    call()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"op": op, "device": device, "configs": len(tuned.configs), "threads": P.THREADS, "seconds": seconds,
            "precompiled": counts.precompiled, "compiles": sum(counts.by.values()),
            "compiles_by_autotuner": counts.by["autotuner"]}


def measure(op: str, n_configs: int | None, threads: int) -> dict:
    """first_call in a fresh process with an empty Triton cache, pool of `threads`."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as cache:
        env.update(TRITON_CACHE_DIR=cache, FUSEFORMER_COMPILE_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-m", "fuseformer.bench.compile_time", "--child", "--op", op,
                               "--configs", str(n_configs or 0)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compile_time child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuseformer.bench.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=("linear_gelu", "attention", "hopper"), default="linear_gelu")
    parser.add_argument("--configs", type=int, default=0, help="time only the autotuner's first N configs (0: all)")
    parser.add_argument("--threads", type=int, default=0, help="the pool's size (0: FUSEFORMER_COMPILE_THREADS' default)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(first_call(args.op, args.configs or None)))
        return 0
    from fuseformer.kernels.precompile import _threads_from_env

    threads = args.threads or _threads_from_env()
    serial = measure(args.op, args.configs, 1)
    parallel = measure(args.op, args.configs, threads)
    for label, r in (("serial (the autotuner compiles)", serial), (f"precompiled on {threads} threads", parallel)):
        print(f"{r['op']} on {r['device']}, {r['configs']} configs, {label}: {r['seconds']:.1f} s "
              f"({r['compiles']} compiles, {r['compiles_by_autotuner']} by the autotuner)")
    print(f"first call {serial['seconds'] / parallel['seconds']:.2f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
