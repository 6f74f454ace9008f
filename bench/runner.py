"""The one runner every case goes through: prepare (parity first), time what passed,
derive throughput, roofline fractions and speedups, and write the results file after every
case, so a killed run still leaves valid JSON behind."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from . import envinfo, timing
from .core import OURS, Case, CaseUnavailable

SCHEMA_VERSION = 2  # 2: case status "refused", roofline.is_ceiling
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass
class RunConfig:
    device: torch.device
    dtype: torch.dtype | None = None  # None: each case's own default for this device
    quick: bool = False
    results_path: Path | None = None
    argv: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # On a GPU, also time each implementation of an ops case replayed in a CUDA graph
    # (timing.time_graph): its device time beside the eager one. --no-graph turns it off.
    graph: bool = True

    def dtype_for(self, case: Case) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        if self.device.type == "cuda":
            return case.dtype or torch.bfloat16
        # CPU: fp16/bf16 matmuls are slow and the interpreter's bf16 dot is wrong; fp32 is
        # what people run on a CPU.
        return torch.float32


class ResultsFile:
    """The run's JSON document, rewritten atomically after each case."""

    def __init__(self, path: Path | None, doc: dict):
        self.path = path
        self.doc = doc

    def write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        os.replace(tmp, self.path)


def _parity_dict(checks) -> dict:
    return {
        "ok": all(p.ok for _, p in checks),
        "checks": [
            {"what": what, "ok": p.ok, "error": p.error, "bound": p.bound, "torch_error": p.torch_error}
            for what, p in checks
        ],
    }


def _best(times: dict[str, float], names) -> tuple[str, float] | None:
    present = [(times[n], n) for n in names if n in times]
    if not present:
        return None
    t, n = min(present)
    return n, t


def _host_load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # no load average on this platform
        return None


def run_case(case: Case, config: RunConfig, roofline: timing.Roofline) -> dict:
    dtype = config.dtype_for(case)
    result = {
        "name": case.name,
        "suite": case.suite,
        "group": case.group,
        "params": case.params,
        "x": case.x,
        "dtype": dtype_name(dtype),
        "flops": case.flops,
        "bytes": None if case.elements is None else case.elements * torch.empty((), dtype=dtype).element_size(),
        "note": case.note,
        "status": "ok",
        "reason": None,
        "impls": {},
        "speedups": {},
        "seconds": None,
        # The host's 1-minute load average as the case began: eager timings are host-bound, and a
        # busy host (a leftover process, a build) slows them without touching the device times.
        "host_load": _host_load(),
    }
    start = time.perf_counter()
    try:
        prepared = case.prepare(config.device, dtype, roofline.l2_bytes)
    except CaseUnavailable as err:
        result.update(status="skipped", reason=f"not available: {err}", seconds=time.perf_counter() - start)
        return result
    except Exception as err:  # noqa: BLE001 - reported in the results, never swallowed
        result["status"] = "error"
        result["reason"] = f"{type(err).__name__}: {err}".splitlines()[0]
        result["traceback"] = traceback.format_exc(limit=6)
        result["seconds"] = time.perf_counter() - start
        return result
    result["prepare_seconds"] = time.perf_counter() - start
    kinds = prepared.kinds
    impls = result["impls"]
    for name, reason in prepared.refused.items():
        impls[name] = {"kind": kinds.get(name), "status": "refused", "reason": reason}
    for name, reason in prepared.errors.items():
        impls[name] = {"kind": kinds.get(name), "status": "error", "reason": reason}
    for name, checks in prepared.parity.items():
        impls.setdefault(name, {"kind": kinds.get(name)})["parity"] = _parity_dict(checks)
    for name, extra in prepared.details.items():
        impls.setdefault(name, {"kind": kinds.get(name)}).update(extra)
    for name, reason in prepared.not_timed.items():
        entry = impls.setdefault(name, {"kind": kinds.get(name)})
        ok = entry.get("parity", {}).get("ok", True)
        entry.update(status="not-timed" if ok else "parity-fail", reason=reason if ok else "parity failed")

    times, graph_times = {}, {}
    for name, fn in prepared.fns.items():
        entry = impls.setdefault(name, {"kind": kinds.get(name)})
        if not entry.get("parity", {}).get("ok", True):
            # A wrong answer is never timed as a success.
            entry.update(status="parity-fail", reason="parity failed: not timed")
            continue
        timing_started = time.perf_counter()
        try:
            t = timing.time_fn(fn, config.device, config.quick)
        except Exception as err:  # noqa: BLE001
            entry.update(status="error", reason=f"{type(err).__name__}: {err}".splitlines()[0])
            continue
        entry.update(status="timed", median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                     peak_mem_mb=t.peak_mem_mb, timing_seconds=time.perf_counter() - timing_started)
        seconds = t.median_ms * 1e-3
        roof_seconds = 0.0
        if case.flops:
            entry["tflops"] = case.flops / seconds / 1e12
            roof_seconds = max(roof_seconds, case.flops / (roofline.matmul_tflops * 1e12))
        if result["bytes"]:
            entry["gbps"] = result["bytes"] / seconds / 1e9
            if roofline.is_ceiling:
                entry["copy_fraction"] = entry["gbps"] / roofline.copy_gbps
            roof_seconds = max(roof_seconds, result["bytes"] / (roofline.copy_gbps * 1e9))
        entry["roofline_fraction"] = roof_seconds / seconds if roof_seconds and roofline.is_ceiling else None
        times[name] = t.median_ms
        if config.device.type == "cuda" and config.graph and case.graph_timed:
            if entry.get("replays_own_graph"):
                entry["graph_error"] = "its call is a CUDA graph replay already (its eager time is the replay's)"
            else:
                graph_ms = _time_graphed(entry, fn, t.median_ms, config.quick)
                if graph_ms is not None:
                    graph_times[name] = graph_ms
    del prepared

    ours = [n for n, e in impls.items() if e.get("kind") == OURS]
    baselines = [n for n, e in impls.items() if e.get("kind") != OURS]
    failed = [n for n in ours if not impls[n].get("parity", {}).get("ok", True)]
    if failed:
        result["status"] = "parity-fail"
        result["reason"] = "parity failed: " + ", ".join(failed)
    elif any(impls[n].get("status") == "error" for n in ours):
        result["status"] = "error"
        result["reason"] = "; ".join(f"{n}: {impls[n]['reason']}" for n in ours if impls[n].get("status") == "error")
    elif all(impls[n].get("status") == "refused" for n in ours):
        # Only baselines ran: the case measured nothing of ours, whatever their numbers say.
        result["status"] = "refused"
        result["reason"] = "no implementation of ours ran: " + (
            "; ".join(f"{n}: {impls[n]['reason']}" for n in ours) or "none is declared")
    best_ours, best_sdpa, result["speedups"] = _ranked(times, ours, baselines)
    if best_ours:
        result["best_ours"] = best_ours
    if best_sdpa:
        result["best_sdpa"] = best_sdpa
    if graph_times:  # the same comparison on the device times: our best fused by its own graph time
        best_graph, _, result["graph_speedups"] = _ranked(graph_times, ours, baselines)
        if best_graph:
            result["best_ours_graph"] = best_graph
    result["seconds"] = time.perf_counter() - start
    return result


def _ranked(times: dict[str, float], ours: list[str], baselines: list[str]) -> tuple:
    """(our best, the best SDPA backend, speedups) of one set of times, which gains their
    pseudo-entries: "fuseformer-best", the fastest fused implementation of ours (where none
    ran, the CPU, the torch backend: the results name which it was), and "sdpa-best".
    speedups: {ours or fuseformer-best: {baseline or sdpa-best: baseline time / our time}}."""
    fused = [n for n in ours if not n.endswith("-torch")]
    best_ours = _best(times, fused) or _best(times, ours)
    if best_ours:
        times["fuseformer-best"] = best_ours[1]
    best_sdpa = _best(times, [n for n in baselines if n.startswith("sdpa-")])
    if best_sdpa:
        times["sdpa-best"] = best_sdpa[1]
    speedups = {}
    for mine in [n for n in ours if n in times] + (["fuseformer-best"] if best_ours else []):
        vs = {b: times[b] / times[mine] for b in baselines + ["sdpa-best"] if b in times}
        if vs:
            speedups[mine] = vs
    return best_ours and best_ours[0], best_sdpa and best_sdpa[0], speedups


def _time_graphed(entry: dict, fn, eager_ms: float, quick: bool) -> float | None:
    """timing.time_graph into `entry` (graph_ms, its spread), returning graph_ms; a call that
    cannot be captured gets graph_error instead (None), and the run goes on."""
    try:
        g = timing.time_graph(fn, eager_ms, quick)
    except Exception as err:  # noqa: BLE001 - reported in the entry, never swallowed
        entry["graph_error"] = f"{type(err).__name__}: {err}".splitlines()[0]
        try:  # leave no error of the failed capture pending for the next call
            torch.cuda.synchronize()
        except RuntimeError:
            pass
        return None
    entry.update(graph_ms=g.median_ms, graph_p20_ms=g.p20_ms, graph_p80_ms=g.p80_ms)
    return g.median_ms


def new_document(config: RunConfig, roofline: timing.Roofline | None) -> dict:
    return {
        "schema": SCHEMA_VERSION,
        "tool": "fuseformer bench",
        "argv": config.argv,
        "env": envinfo.environment(config.device),
        "config": {
            "device": str(config.device),
            "dtype": None if config.dtype is None else dtype_name(config.dtype),
            "quick": config.quick,
        },
        "roofline": roofline.as_dict() if roofline else None,
        "notes": list(config.notes),
        "complete": False,
        "cases": [],
    }


# What must match for a case's result to be reused by --resume: the code, where it ran, and how.
RESUME_ENV_KEYS = ("git_commit", "git_dirty", "device_name", "torch", "triton", "transformers")


def resumable(previous: dict, config: RunConfig, cases: list[Case], env: dict) -> tuple[dict[str, dict], str | None]:
    """The results of `previous` (a results document of a cut-off run) that this run can keep:
    {case name: result} for each case already there in the dtype this run would use, or
    ({}, why nothing is kept)."""
    if previous.get("schema") != SCHEMA_VERSION:
        return {}, f"schema {previous.get('schema')} is not {SCHEMA_VERSION}"
    old_env = previous.get("env") or {}
    for key in RESUME_ENV_KEYS:
        if old_env.get(key) != env.get(key):
            return {}, f"its {key} is {old_env.get(key)!r}, this run's is {env.get(key)!r}"
    if bool((previous.get("config") or {}).get("quick")) != config.quick:
        return {}, "it was run with" + ("" if previous["config"].get("quick") else "out") + " --quick"
    done = {c["name"]: c for c in previous.get("cases", [])}
    keep = {}
    for case in cases:
        old = done.get(case.name)
        if old is not None and old.get("dtype") == dtype_name(config.dtype_for(case)):
            keep[case.name] = old
    return keep, None


def run(cases: list[Case], config: RunConfig, on_start: Callable | None = None, on_done: Callable | None = None,
        resume_from: dict | None = None) -> dict:
    """Run `cases` in order. With `resume_from` (a cut-off run's document), the cases whose
    results `resumable` keeps are not run again, and its roofline is kept with them so that
    every fraction in the file is of one measurement."""
    kept = {}
    if resume_from is not None:
        kept, _ = resumable(resume_from, config, cases, envinfo.environment(config.device))
    if kept and resume_from.get("roofline"):
        roofline = timing.Roofline(**resume_from["roofline"])
    else:
        roofline = timing.measure_roofline(config.device, config.quick)
    results = ResultsFile(config.results_path, new_document(config, roofline))
    if kept:
        results.doc["resumed"] = {"from": resume_from["env"].get("timestamp"), "cases_kept": len(kept)}
    results.write()
    for i, case in enumerate(cases):
        if on_start:
            on_start(case, i, len(cases))
        if case.name in kept:
            result = dict(kept[case.name], resumed=True)
        else:
            result = run_case(case, config, roofline)
        results.doc["cases"].append(result)
        results.write()
        if config.device.type == "cuda" and case.name not in kept:
            # Compiled closures of one code object share dynamo's cache (and its recompile
            # limit); starting each case afresh keeps every torch.compile a real compile.
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        if on_done:
            on_done(result, i, len(cases))
    results.doc["complete"] = True
    results.write()
    return results.doc


# --- gating (--check) -------------------------------------------------------------------


def load_thresholds(path: Path) -> list[dict]:
    doc = json.loads(Path(path).read_text())
    return doc["rules"]


def _metric(case: dict, rule: dict) -> float | None:
    ours = rule.get("ours", "fuseformer-best")
    metric = rule.get("metric", "speedup")
    if metric == "speedup":
        return case.get("speedups", {}).get(ours, {}).get(rule["vs"])
    name = case.get("best_ours") if ours == "fuseformer-best" else ours
    entry = case.get("impls", {}).get(name or "", {})
    return entry.get(metric)


FAILED = ("parity-fail", "error", "refused")  # case statuses that fail --check wherever they occur


def target_rows(doc: dict, rules: list[dict]) -> list[dict]:
    """Each threshold rule against each case it covers, in rule order: the figure's label, its
    value (None when not measured), and a status: "met", "short" (beyond the bound), "not
    measured" (the case ran, this figure is absent) or, for a case that did not run to
    completion, the case's own status (skipped, refused, ...), with its reason."""
    rows = []
    for rule in rules:
        for case in doc["cases"]:
            if not fnmatch.fnmatchcase(case["name"], rule["case"]):
                continue
            if rule.get("dtype") and rule["dtype"] != case["dtype"]:
                continue
            label = f"{case['name']}: {rule.get('metric', 'speedup')}"
            if rule.get("metric", "speedup") == "speedup":
                label += f" vs {rule['vs']}"
            row = dict(case=case["name"], rule=rule, label=label, value=None, reason="")
            if case["status"] != "ok":
                row.update(status=case["status"], reason=case["reason"])
            else:
                value = row["value"] = _metric(case, rule)
                if value is None:
                    row["status"] = "not measured"
                elif ("min" in rule and value < rule["min"]) or ("max" in rule and value > rule["max"]):
                    row["status"] = "short"
                else:
                    row["status"] = "met"
            rows.append(row)
    return rows


def gate(doc: dict, rules: list[dict], gate_speed: bool) -> list[str]:
    """Every reason `--check` fails: parity failures and errors of our implementations,
    cases where none of ours ran, and (where speed is gated) each threshold rule a case
    falls short of or did not run to be measured (skipped: its threshold must not vanish)."""
    failures = []
    for case in doc["cases"]:
        if case["status"] in FAILED:
            failures.append(f"{case['name']}: {case['status']}: {case['reason']}")
    if not gate_speed:
        return failures
    unmeasured = set()
    for row in target_rows(doc, rules):
        rule, label, value = row["rule"], row["label"], row["value"]
        if row["status"] == "met":
            continue
        if row["status"] == "short":
            side = f"< {rule['min']}" if "min" in rule and value < rule["min"] else f"> {rule['max']}"
            failures.append(f"{label} = {value:.3g} {side} ({rule.get('target', '')})")
        elif row["status"] == "not measured":
            failures.append(f"{label}: not measured ({rule.get('target', '')})")
        elif row["status"] not in FAILED and row["case"] not in unmeasured:
            unmeasured.add(row["case"])
            failures.append(f"{row['case']}: gated by bench/thresholds.json but {row['status']}: {row['reason']}")
    return failures
