"""`fuseformer bench compare OLD.json NEW.json`: what got slower or stopped passing."""
from __future__ import annotations

import json
from pathlib import Path


def load(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: no such results file: {path}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or "cases" not in doc:
        raise SystemExit(f"error: {path} is not a fuseformer bench results file (no 'cases')")
    return doc


# The times compared: the eager median, and on a GPU the device time of the CUDA-graph replay
# (bench/timing.py's time_graph), each against the baselines' drift in that same time. A kernel
# that got slower can hide behind a host-bound eager time; its graph time shows it.
TIMES = (("median_ms", ""), ("graph_ms", " (graph)"))


def _timed_pairs(old: dict, new: dict, key: str = "median_ms"):
    """(case name, implementation name, old entry, new entry) for every implementation with
    the time `key` in both runs."""
    old_cases = {c["name"]: c for c in old["cases"]}
    for case in new["cases"]:
        before = old_cases.get(case["name"])
        if before is None:
            continue
        for name, entry in case["impls"].items():
            prev = before["impls"].get(name)
            if prev is not None and entry.get(key) is not None and (prev.get(key) or 0) > 0:
                yield case["name"], name, prev, entry


def baseline_drift(old: dict, new: dict, key: str = "median_ms") -> tuple[float, float] | None:
    """(lowest, highest) new/old ratio of the time `key` over every baseline timed in both
    runs: how far the machine alone moved times that none of our changes can touch. None
    without any."""
    ratios = [e[key] / p[key] for _, _, p, e in _timed_pairs(old, new, key) if e.get("kind") != "ours"]
    return (min(ratios), max(ratios)) if ratios else None


def compare(old: dict, new: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(regressions, improvements) as printable lines.

    A regression: an implementation of ours whose median time grew by more than the
    baselines' own drift (the largest slowdown of any baseline between the two runs, or none)
    and then by `tolerance` (a fraction) on top; a parity check that passed before and fails
    now; or a case that ran before and errors now. Two runs of one commit on a shared machine
    differ by far more than a fixed tolerance, and the baselines show by how much.
    """
    regressions, improvements = [], []
    old_cases = {c["name"]: c for c in old["cases"]}
    for case in new["cases"]:
        before = old_cases.get(case["name"])
        if before is None:
            continue
        if before["status"] == "ok" and case["status"] in ("parity-fail", "error", "refused"):
            regressions.append(f"{case['name']}: was ok, now {case['status']} ({case['reason']})")
        for name, entry in case["impls"].items():
            prev = before["impls"].get(name)
            if prev and prev.get("parity", {}).get("ok") and entry.get("parity", {}).get("ok") is False:
                regressions.append(f"{case['name']} / {name}: parity passed before, fails now")
    for key, label in TIMES:
        lo, hi = baseline_drift(old, new, key) or (1.0, 1.0)
        slower, faster = max(1.0, hi) * (1 + tolerance), min(1.0, lo) / (1 + tolerance)
        for case_name, name, prev, entry in _timed_pairs(old, new, key):
            if entry.get("kind") != "ours":
                continue
            ratio = entry[key] / prev[key]
            line = f"{case_name} / {name}{label}: {prev[key]:.4g} ms -> {entry[key]:.4g} ms ({ratio:.2f}x time)"
            if ratio > slower:
                regressions.append(line + f", beyond the baselines' {hi:.2f}x and the tolerance")
            elif ratio < faster:
                improvements.append(line)
    return regressions, improvements


def _picks(doc: dict) -> dict:
    """(kernel, key) -> (winning config, the case and implementation that tuned it), over every
    implementation's `tuned` record (bench/op_trace.py tuned_since)."""
    picks = {}
    for case in doc["cases"]:
        for name, entry in case.get("impls", {}).items():
            for t in entry.get("tuned", ()):
                picks.setdefault((t["kernel"], t["key"]), (t["config"], f"{case['name']} / {name}"))
    return picks


def changed_picks(old: dict, new: dict) -> list[str]:
    """The autotuned keys both runs tuned whose winning config differs, as printable lines:
    a kernel that got slower with its code unchanged may only have been handed another config
    (the H200 run of 2026-11-28 could not tell, bench/op_trace.py's tuned_since says why)."""
    before, after = _picks(old), _picks(new)
    lines = []
    for (kernel, key), (config, where) in after.items():
        prev = before.get((kernel, key))
        if prev is not None and prev[0] != config:
            diff = ", ".join(f"{k} {prev[0].get(k)} -> {config.get(k)}" for k in sorted(config.keys() | prev[0].keys())
                             if prev[0].get(k) != config.get(k))
            lines.append(f"{kernel} {key} ({where}): {diff}")
    return lines


def main(old_path: str, new_path: str, tolerance: float, console) -> int:
    from rich.markup import escape
    old, new = load(Path(old_path)), load(Path(new_path))
    if old.get("env", {}).get("device_name") != new.get("env", {}).get("device_name"):
        console.print(f"[yellow]note: different devices ({old.get('env', {}).get('device_name')} vs "
                      f"{new.get('env', {}).get('device_name')}); times are not comparable[/yellow]")
    regressions, improvements = compare(old, new, tolerance)
    shared = len({c["name"] for c in old["cases"]} & {c["name"] for c in new["cases"]})
    console.print(f"compared {shared} cases, tolerance {tolerance:.0%}")
    for key, label in TIMES:
        if key != "median_ms" and next(_timed_pairs(old, new, key), None) is None:
            continue  # no graph time in both runs (a CPU run, --no-graph, an older run)
        drift = baseline_drift(old, new, key)
        if drift is None:
            console.print(f"baseline drift{label}: no baseline was timed in both runs, so ours are held to the "
                          "tolerance alone")
        else:
            console.print(f"baseline drift{label}: baselines took {drift[0]:.2f}x to {drift[1]:.2f}x their old time; "
                          f"ours count as slower only beyond {max(1.0, drift[1]) * (1 + tolerance):.2f}x")
    for line in improvements:
        console.print(f"[green]faster[/green]  {escape(line)}", highlight=False)
    for line in changed_picks(old, new):
        console.print(f"[yellow]autotune pick changed[/yellow]  {escape(line)}", highlight=False)
    for line in regressions:
        console.print(f"[red]REGRESSION[/red]  {escape(line)}", highlight=False)
    if regressions:
        console.print(f"[red]{len(regressions)} regression(s)[/red]")
        return 1
    console.print("no regressions")
    return 0
