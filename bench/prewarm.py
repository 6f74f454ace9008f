"""Fill the compile caches before a timed GPU run, in parallel processes.

Why: on the H100 (bench/results/h100/, 2026-11-26) the ops suite's 21 cases took 230 s, and
less than 10 s of it was timing. The rest was first calls: our Triton kernels autotuning over
their configs, each config compiled in turn (7-13 s per kernel), and torch.compile. A lent GPU
has 15 minutes in all, and the run was cut off before the GQA, varlen, and some add+LN and
Linear+GELU cases.

Compiles are CPU work, and the GPU machines have 16 cores. Triton keeps every compiled kernel
in its on-disk cache (~/.triton/cache), keyed by the kernel, its specialization and its
options, and Inductor keeps its compiled graphs on disk too. So this runs the same cases as the
timed run will, with the same arguments, split over several processes at once, and throws
their results away. The timed run, sequential and alone on the GPU, then finds every kernel
compiled, and a first call costs the autotuner's timing loops only.

The prewarm processes run the real `fuseformer bench` on their share of the cases. That is
the same code path, so the cache keys match exactly (same shapes, dtypes and alignment).
They write into a scratch folder: their timings are taken with the GPU shared and mean
nothing. They run with FUSEFORMER_CUDA_NO_BUILD=1: the cuda backend (csrc/) autotunes
nothing, and a process that reached it while its JIT build is under way elsewhere would wait
minutes for the build's lock. So it is skipped there, unless it was built ahead of time.

    python -m fuseformer.bench.prewarm --suite ops --filter NAMES [--quick] [--procs 6]
        [--seconds 120] [--logs DIR]

It exits 0 when every process ended by itself, 1 otherwise. Processes still running at
--seconds get SIGINT (a cut-off benchmark keeps what it compiled); 10 s later they are
killed.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# A case with a backward costs about this many forward-only cases' compiles: torch.compile
# traces and compiles a forward and a backward graph of a training step, our kernels add their
# backward kernels and autotuning. Dealt round-robin by count, the H200 run of 2026-11-28 put
# all three training cases of the models suite in one of its two processes, which was cut at
# 245 s while the other had ended.
BACKWARD_WEIGHT = 3


def _weight(case) -> int:
    # An ops case with a backward names its grad_inputs (bench/core.py); a models one trains.
    return BACKWARD_WEIGHT if getattr(case, "grad_inputs", ()) or getattr(case, "task", "") == "train" else 1


def plan(suite: str, filter_text: str | None, quick: bool, procs: int, device_type: str) -> list[list[str]]:
    """The case names of `fuseformer bench --suite SUITE --filter ... [--quick]` on this device,
    dealt into at most `procs` groups: in the filter's order (the timed run's priority order,
    so each group starts with a share of the headline cases), each to the group with the least
    work so far, a case with a backward counting BACKWARD_WEIGHT."""
    from .cli import _collect, _select

    cases = _select(_collect(suite, device_type), filter_text, quick)
    if not cases:
        return []
    groups: list[list[str]] = [[] for _ in range(max(1, min(procs, len(cases))))]
    work = [0] * len(groups)
    for case in cases:
        least = work.index(min(work))  # the first of the least loaded: round-robin among equals
        groups[least].append(case.name)
        work[least] += _weight(case)
    return groups


def command(suite: str, names: list[str], quick: bool, out: Path) -> list[str]:
    return [sys.executable, "-m", "fuseformer.bench", "--suite", suite, "--filter", ",".join(names),
            *(["--quick"] if quick else []), "--out", str(out)]


def run(groups: list[list[str]], suite: str, quick: bool, seconds: float, logs: Path) -> int:
    logs.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fuseformer_prewarm_"))
    env = {**os.environ, "FUSEFORMER_CUDA_NO_BUILD": "1"}
    procs = []
    start = time.monotonic()
    cut = []
    try:
        for i, names in enumerate(groups):
            log = open(logs / f"prewarm_{suite}_{i}.txt", "w")
            procs.append((subprocess.Popen(command(suite, names, quick, scratch / str(i)), stdout=log,
                                           stderr=subprocess.STDOUT, env=env), log, names))
        deadline = start + seconds
        for proc, log, names in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                cut.append(proc)
    finally:
        # At the time limit, and when this process is interrupted itself (a caller's own time
        # box): SIGINT, so a benchmark ends its case and exits; killed 10 s later.
        for proc, log, names in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                if proc not in cut:
                    cut.append(proc)
        for proc in cut:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    failed = 0
    for i, (proc, log, names) in enumerate(procs):
        log.close()
        status = "cut at the time limit" if proc in cut else f"exit {proc.returncode}"
        failed += proc in cut or proc.returncode not in (0, 1)  # 1: a parity failure, reported by the timed run
        print(f"prewarm {suite} [{i}] {len(names)} cases, {status}: {', '.join(names)}")
    print(f"prewarm {suite}: {len(groups)} processes, {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuseformer.bench.prewarm", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("ops", "models"), required=True)
    p.add_argument("--filter", default=None, help="as `fuseformer bench --filter` (the timed run's)")
    p.add_argument("--quick", action="store_true", help="as `fuseformer bench --quick` (the timed run's)")
    p.add_argument("--procs", type=int, default=max(1, min(6, (os.cpu_count() or 2) // 2)),
                   help="processes at once (default: half the cores, at most 6)")
    p.add_argument("--seconds", type=float, default=120.0, help="time limit for them all")
    p.add_argument("--logs", default=".", help="folder for one log per process")
    p.add_argument("--device-type", default=None, help="whose case list to split (default: cuda when present)")
    args = p.parse_args(argv)
    device_type = args.device_type
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    groups = plan(args.suite, args.filter, args.quick, args.procs, device_type)
    if not groups:
        print(f"prewarm {args.suite}: no cases")
        return 0
    return run(groups, args.suite, args.quick, args.seconds, Path(args.logs))


if __name__ == "__main__":
    sys.exit(main())
