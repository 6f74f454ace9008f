"""The `fuseformer` command.

    fuseformer                       (or --help) lists the subcommands
    fuseformer bench [--suite ops|models|all] [--filter NAMES] [--quick] [--dtype D]
                     [--device D] [--out DIR] [--check] [--thresholds FILE] [--list] [--resume]
    fuseformer bench compare OLD.json NEW.json [--tolerance 0.05]

Nothing from fuseformer.kernels is imported at module level: without a CUDA device the
Triton kernels can only run in Triton's interpreter, and TRITON_INTERPRET must be set
before the first @triton.jit function is decorated, which is when kernels/ is imported.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from pathlib import Path

SUITES = ("ops", "models", "all")
DTYPE_CHOICES = ("auto", "fp32", "fp16", "bf16")
THRESHOLDS = Path(__file__).with_name("thresholds.json")
OVERHEAD_GROUP = "overhead"  # host µs per eager op call (bench/overhead.py), not a timed case
GPU_COMMAND = 'pip install -e ".[dev]" && fuseformer bench'


TOP_HELP = """usage: fuseformer <command> [options]

commands:
  bench                            check every kernel and model against float64 PyTorch, then time
                                   them side by side against PyTorch, torch SDPA, torch.compile and
                                   Hugging Face transformers (the main job; also python -m fuseformer.bench)
  bench --list                     the cases this machine would run
  bench compare OLD.json NEW.json  what got slower or stopped passing between two runs
  bench variants RESULTS.json      each opt-in kernel variant against the default it would replace
  bench targets RESULTS.json       the performance targets (bench/thresholds.json) met or not by a GPU run

`fuseformer bench --help` lists the benchmark's options."""


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


def _bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseformer bench",
        description="Parity against float64 PyTorch, then speed against PyTorch, torch SDPA, torch.compile, "
        "cuBLASLt and Hugging Face transformers, side by side. Subcommands: `compare OLD.json NEW.json`, `variants RESULTS.json`, "
        "`targets RESULTS.json`.",
    )
    p.add_argument("--suite", choices=SUITES, default="all", help="which cases to run (default: all)")
    p.add_argument("--filter", default=None,
                   help="comma-separated case names, group names, globs or substrings (see --list)")
    p.add_argument("--quick", action="store_true",
                   help="the quick subset of cases (all matches when --filter is given) and shorter timings")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="auto: bf16 for ops on a GPU (fp16 for model inference, as the targets say), fp32 on the CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="results folder (default: bench/results/<device>, e.g. h100 or cpu)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on any parity failure or error of ours or a case none of ours ran, and on a GPU on "
                   "any figure under bench/thresholds.json (docs/design.md's targets) or a gated case that did not run")
    p.add_argument("--thresholds", default=str(THRESHOLDS), help="threshold rules for --check")
    p.add_argument("--list", action="store_true", help="list the cases this device would run, and exit")
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="on a GPU, skip the second timing of each implementation of an ops case or a training "
                   "step, replayed in a CUDA graph (its device time without the host's launch cost, the `graph ms` "
                   "column)")
    p.add_argument("--resume", action="store_true",
                   help="continue a cut-off run: keep the cases already in --out's results.json (same commit, "
                   "device, versions, dtype and --quick) and run the rest")
    return p


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a fraction >= 0 (0.05 = 5%), got {text!r}")
    return value


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuseformer bench compare",
                                description="Print the regressions of NEW against OLD; exit 1 if there is any.")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--tolerance", type=_fraction, default=0.05,
                   help="allowed slowdown of our times beyond the baselines' own drift between the runs, as a "
                   "fraction (default 0.05)")
    return p


def _variants_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuseformer bench variants",
                                description="Each opt-in kernel variant (fuseformer-triton-tma, fuseformer-cuda-wmma, "
                                "...) against the default it would replace, from a results file.")
    p.add_argument("results")
    return p


def _targets_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fuseformer bench targets",
                                description="The performance targets (bench/thresholds.json) against a GPU run's "
                                "results file: each rule against each case it covers, met or not.")
    p.add_argument("results")
    p.add_argument("--thresholds", default=str(THRESHOLDS), help="threshold rules (default: the targets' file)")
    return p


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible to torch here")
    if device.type == "cuda":
        # Make it current: do_bench's CUDA events and synchronize, the peak-memory counters
        # and Triton's launches all act on the current device, not on the tensors' one, so
        # with --device cuda:1 they would time and measure device 0.
        torch.cuda.set_device(device)
    return device


def _prepare_out(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"--out {path}: cannot write results there ({err.strerror or err})") from None
    return path


def _select(cases, filter_text: str | None, quick: bool):
    if not filter_text:
        return [c for c in cases if c.quick] if quick else list(cases)
    tokens = [t.strip() for t in filter_text.split(",") if t.strip()]
    chosen, unknown = [], []
    for token in tokens:
        if any(ch in token for ch in "*?["):
            hits = [c for c in cases if fnmatch.fnmatchcase(c.name, token)]
        else:
            hits = [c for c in cases if token == c.group or token in c.name]
        if not hits:
            unknown.append(token)
        chosen += [c for c in hits if c not in chosen]
    if unknown:
        names = "\n  ".join(c.name for c in cases)
        groups = ", ".join(sorted({c.group for c in cases}))
        raise UsageError(f"--filter: nothing matches {', '.join(map(repr, unknown))}. Valid case names here:\n  "
                         f"{names}\nand groups: {groups}")
    return chosen


def _overhead_wanted(args) -> tuple[bool, str | None]:
    """Whether the `overhead` group runs (it belongs to the ops suite; `--filter overhead`
    asks for it alone), and the --filter left for the cases."""
    if args.suite not in ("ops", "all"):
        return False, args.filter
    if not args.filter:
        return True, None
    tokens = [t.strip() for t in args.filter.split(",") if t.strip()]
    rest = [t for t in tokens if t != OVERHEAD_GROUP]
    return len(rest) < len(tokens), ",".join(rest) or None


def print_list(cases, with_overhead: bool = False) -> None:
    """One row per case under a header; a case's name starts with its group's."""
    rows = [("case", "suite", "group", "quick")] + [(c.name, c.suite, c.group, "yes" if c.quick else "-") for c in cases]
    if with_overhead:
        rows.append((OVERHEAD_GROUP, "ops", OVERHEAD_GROUP, "yes"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        # Plain print, not rich: a pipe (`--list | grep`) must get every row whole, unwrapped.
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])


def _collect(suite: str, device_type: str):
    cases = []
    if suite in ("ops", "all"):
        from . import ops

        cases += ops.cases(device_type)
    if suite in ("models", "all"):
        from . import model_cases

        cases += model_cases.cases(device_type)
    return cases


GRAPH_NOTE = ("Each implementation of an ops case or a model training step is timed twice: eagerly (median "
              "ms: what a drop-in call costs, including the host time the GPU waits for) and replayed in a CUDA graph (graph ms: the kernels' "
              "device time with the host out of the way; no L2 flush, inputs rotated over copies as in the eager "
              "timing). The summary's graph speedup compares the graph times.")


def _notes(device, args) -> list[str]:
    if device.type == "cuda":
        return [GRAPH_NOTE] if args.graph else []
    notes = [
        "On the CPU the ops suite checks parity only, running the fused Triton kernels in Triton's "
        "interpreter at small shapes (fp32). Kernel speed needs a CUDA GPU; on a machine with one, run: "
        + GPU_COMMAND,
    ]
    if args.suite in ("models", "all"):
        from . import model_cases

        notes.append(model_cases.CPU_NOTE)
    if args.check:
        notes.append("--check on the CPU gates parity (and errors) only; the speed thresholds apply on a GPU.")
    return notes


def _resume_source(config, selected, console) -> dict | None:
    """The results document --resume continues, or None (with the reason printed) when
    every selected case has to run."""
    import json

    from rich.markup import escape

    from . import envinfo, runner

    path = config.results_path
    try:
        previous = json.loads(path.read_text())
    except FileNotFoundError:
        console.print(f"[cyan]note:[/cyan] --resume: no {escape(str(path))} yet; running every case", highlight=False)
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"--resume: cannot read {path} ({err})") from None
    kept, why_not = runner.resumable(previous, config, selected, envinfo.environment(config.device))
    if why_not:
        console.print(f"[yellow]note: --resume: not continuing {escape(str(path))}: {escape(why_not)}; "
                      "running every case[/yellow]", highlight=False)
        return None
    dirty = " (the tree is dirty: changes made since that run are not detected)" if previous["env"].get("git_dirty") else ""
    console.print(f"[cyan]note:[/cyan] --resume: keeping {len(kept)} of {len(selected)} cases from "
                  f"{escape(str(path))}{dirty}", highlight=False)
    return previous


def _console():
    from rich.console import Console

    # Piped output (CI logs) would otherwise be cut to 80 columns and fold every cell.
    return Console(width=None if sys.stdout.isatty() else 200)


def run_bench(args, cases=None) -> int:
    from rich.markup import escape

    from .triton_cache import log_compiles_from_env

    console = _console()
    device = _device(args.device)
    log_compiles_from_env()  # FUSEFORMER_TRITON_COMPILE_LOG, set by bench/gpu_session.sh
    if device.type == "cpu" and "fuseformer.kernels" not in sys.modules:
        # Too late once the kernels are defined (compiled, in a process that has CUDA): then
        # setting it would only make fuseformer believe CPU tensors can run them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif (os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")
          and "fuseformer.kernels" not in sys.modules):
        # Interpreted kernels on a GPU would be timed as if they were compiled ones.
        os.environ.pop("TRITON_INTERPRET")
        console.print("[yellow]note: TRITON_INTERPRET was set; unset for this CUDA run[/yellow]")
    import torch

    from . import envinfo, report, runner

    if cases is None:
        cases = _collect(args.suite, device.type)
    elif args.suite != "all":
        cases = [c for c in cases if c.suite == args.suite]
    with_overhead, case_filter = _overhead_wanted(args)
    selected = _select(cases, case_filter, args.quick) if (case_filter or not with_overhead or not args.filter) else []
    if args.list:
        print_list(selected, with_overhead)
        return 0
    out = _prepare_out(Path(args.out) if args.out else Path("bench") / "results" / envinfo.device_slug(device))
    # Read before the run (a bad file fails now, not after it): --check gates on them, and on a
    # GPU results.md reports them whether or not --check.
    rules = runner.load_thresholds(Path(args.thresholds)) if (args.check or device.type == "cuda") else []
    config = runner.RunConfig(
        device=device,
        dtype=None if args.dtype == "auto" else runner.DTYPES[args.dtype],
        quick=args.quick,
        results_path=out / "results.json",
        argv=["fuseformer", "bench", *args.raw_argv],
        notes=_notes(device, args),
        graph=args.graph,
    )
    previous = _resume_source(config, selected, console) if args.resume else None
    for note in config.notes:
        console.print(f"[cyan]note:[/cyan] {escape(note)}", highlight=False)
    if device.type == "cpu":
        # A run of the interpreter and of small CPU models is faster without oversubscription.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("measuring the roofline", total=len(selected))

        def on_start(case, i, n):
            progress.update(task, description=f"{case.name}")

        def on_done(result, i, n):
            mark = {"ok": "[green]ok[/green]", "skipped": "[yellow]skipped[/yellow]"}.get(result["status"],
                                                                                       f"[red]{result['status']}[/red]")
            took = "kept from results.json" if result.get("resumed") else f"{result['seconds']:.1f} s"
            progress.console.print(f"  {result['name']}: {mark} ({took})", highlight=False)
            progress.advance(task)

        doc = runner.run(selected, config, on_start, on_done, resume_from=previous)
        if with_overhead:
            from . import overhead

            progress.update(task, description="overhead: host time per eager call")
            doc["overhead"] = overhead.run_group(device, quick=args.quick)
            runner.ResultsFile(config.results_path, doc).write()
    written = report.write_all(doc, out, rules)
    if doc["cases"]:
        report.print_table(doc, console)
        report.print_targets(doc, rules, console)
        report.print_variants(doc, console)
    if with_overhead:
        report.print_overhead(doc, console)
    console.print(f"results: {config.results_path}, " + ", ".join(str(p) for p in written), highlight=False)
    console.print(f"{len(selected)} cases in {time.perf_counter() - start:.0f} s on {doc['env']['device_name']}",
                  highlight=False)
    if device.type == "cpu":
        console.print(escape(f"Kernel speed needs a CUDA GPU: on a machine with one, run `{GPU_COMMAND}`."),
                      highlight=False)
    if not args.check:
        return 0
    failures = runner.gate(doc, rules, gate_speed=device.type == "cuda")
    for line in failures:
        console.print(f"[red]check failed:[/red] {escape(line)}", highlight=False)
    if failures:
        return 1
    console.print("[green]check passed[/green]" + (" (parity only: CPU)" if device.type == "cpu" else ""))
    return 0


def main(argv: list[str] | None = None, cases=None) -> int:
    """`fuseformer ARGV...`: ARGV starts with the subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        # A bare `fuseformer` used to start the full benchmark; now it only explains itself,
        # with status 2 so that a script still calling it that way notices.
        print(TOP_HELP)
        return 0 if argv else 2
    command, argv = argv[0], argv[1:]
    if command == "compare":  # `fuseformer compare` reads as `fuseformer bench compare`
        command, argv = "bench", ["compare", *argv]
    if command != "bench":
        hint = f" (did you mean `fuseformer bench {command}`?)" if command.startswith("-") else ""
        print(f"fuseformer: error: unknown command {command!r}{hint}\n\n{TOP_HELP}", file=sys.stderr)
        return 2
    return bench_main(argv, cases)


def bench_main(argv: list[str], cases=None) -> int:
    """`fuseformer bench ARGV...` (and `python -m fuseformer.bench ARGV...`)."""
    try:
        if argv and argv[0] == "compare":
            from . import compare

            args = _compare_parser().parse_args(argv[1:])
            return compare.main(args.old, args.new, args.tolerance, _console())
        if argv and argv[0] == "variants":
            from . import compare, report

            args = _variants_parser().parse_args(argv[1:])
            report.print_variants(compare.load(Path(args.results)), _console())
            return 0
        if argv and argv[0] == "targets":
            from . import compare, report, runner

            args = _targets_parser().parse_args(argv[1:])
            report.print_targets(compare.load(Path(args.results)), runner.load_thresholds(Path(args.thresholds)),
                                 _console())
            return 0
        args = _bench_parser().parse_args(argv)
        args.raw_argv = argv
        return run_bench(args, cases)
    except UsageError as err:
        print(f"fuseformer bench: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        # A bad FUSEFORMER_BACKEND is refused when the kernels are imported: one line, status 2.
        if str(err).startswith("FUSEFORMER_BACKEND"):
            print(f"fuseformer bench: error: {err}", file=sys.stderr)
            return 2
        raise
    except SystemExit as exc:
        # argparse's own usage errors and compare's unreadable files end here; keep their status.
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return exc.code or 0


if __name__ == "__main__":
    sys.exit(main())
