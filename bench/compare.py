"""`fuseformer bench compare OLD.json NEW.json`: what got slower or stopped passing."""
from __future__ import annotations

import json
from pathlib import Path


def _load(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: no such results file: {path}") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"error: {path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict) or "cases" not in doc:
        raise SystemExit(f"error: {path} is not a fuseformer bench results file (no 'cases')")
    return doc


def compare(old: dict, new: dict, tolerance: float) -> tuple[list[str], list[str]]:
    """(regressions, improvements) as printable lines.

    A regression: an implementation of ours whose median time grew by more than `tolerance`
    (a fraction), a parity check that passed before and fails now, or a case that ran
    before and errors now. Baselines are not judged: their times say how noisy the machine
    was, and are shown for that.
    """
    regressions, improvements = [], []
    old_cases = {c["name"]: c for c in old["cases"]}
    for case in new["cases"]:
        before = old_cases.get(case["name"])
        if before is None:
            continue
        if before["status"] == "ok" and case["status"] in ("parity-fail", "error"):
            regressions.append(f"{case['name']}: was ok, now {case['status']} ({case['reason']})")
        for name, entry in case["impls"].items():
            prev = before["impls"].get(name)
            if prev is None:
                continue
            if prev.get("parity", {}).get("ok") and entry.get("parity", {}).get("ok") is False:
                regressions.append(f"{case['name']} / {name}: parity passed before, fails now")
            if entry.get("kind") != "ours" or "median_ms" not in entry or "median_ms" not in prev:
                continue
            ratio = entry["median_ms"] / prev["median_ms"]
            line = f"{case['name']} / {name}: {prev['median_ms']:.4g} ms -> {entry['median_ms']:.4g} ms ({ratio:.2f}x time)"
            if ratio > 1 + tolerance:
                regressions.append(line)
            elif ratio < 1 / (1 + tolerance):
                improvements.append(line)
    return regressions, improvements


def main(old_path: str, new_path: str, tolerance: float, console) -> int:
    from rich.markup import escape
    old, new = _load(Path(old_path)), _load(Path(new_path))
    if old.get("env", {}).get("device_name") != new.get("env", {}).get("device_name"):
        console.print(f"[yellow]note: different devices ({old.get('env', {}).get('device_name')} vs "
                      f"{new.get('env', {}).get('device_name')}); times are not comparable[/yellow]")
    regressions, improvements = compare(old, new, tolerance)
    shared = len({c["name"] for c in old["cases"]} & {c["name"] for c in new["cases"]})
    console.print(f"compared {shared} cases, tolerance {tolerance:.0%}")
    for line in improvements:
        console.print(f"[green]faster[/green]  {escape(line)}", highlight=False)
    for line in regressions:
        console.print(f"[red]REGRESSION[/red]  {escape(line)}", highlight=False)
    if regressions:
        console.print(f"[red]{len(regressions)} regression(s)[/red]")
        return 1
    console.print("no regressions")
    return 0
