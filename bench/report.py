"""Turning a results document into the terminal table, the markdown file and the plots."""
from __future__ import annotations

import math
from pathlib import Path

from .core import OURS


def _ratio(case: dict) -> tuple[float | None, bool | None]:
    """Worst error/bound over our checked implementations, and whether all of them passed."""
    worst, ok = None, None
    for entry in case["impls"].values():
        if entry.get("kind") != OURS or "parity" not in entry:
            continue
        for check in entry["parity"]["checks"]:
            r = check["error"] / check["bound"] if check["bound"] else float("inf")
            worst = r if worst is None else max(worst, r)
        ok = entry["parity"]["ok"] if ok is None else ok and entry["parity"]["ok"]
    return worst, ok


def _fmt(value, spec=".3g", missing="-") -> str:
    return missing if value is None else format(value, spec)


def _best_baseline(case: dict, key: str = "median_ms") -> tuple[str | None, float | None]:
    """(name, time) of the fastest timed baseline by `key` (the eager median, or graph_ms)."""
    best = None
    for name, entry in case["impls"].items():
        if entry.get("kind") != OURS and entry.get("status") == "timed" and entry.get(key) is not None:
            if best is None or entry[key] < best[1]:
                best = (name, entry[key])
    return best or (None, None)


def _untimed(case: dict) -> str:
    names = [n for n, e in case["impls"].items() if e.get("kind") == OURS and e.get("status") == "not-timed"]
    return f"{', '.join(names)}: parity only" if names else "-"


def summary_rows(doc: dict) -> list[dict]:
    rows = []
    for case in doc["cases"]:
        ratio, ok = _ratio(case)
        ours_name = case.get("best_ours")
        ours = case["impls"].get(ours_name, {}) if ours_name else {}
        base_name, base_ms = _best_baseline(case)
        speedup = case.get("speedups", {}).get("fuseformer-best", {}).get(base_name) if base_name else None
        graph = _graph_speedup(case)
        if ours.get("tflops") is not None:
            throughput = f"{ours['tflops']:.3g} TFLOP/s"
        elif ours.get("gbps") is not None:
            throughput = f"{ours['gbps']:.4g} GB/s"
        else:
            throughput = "-"
        refused = sorted(n for n, e in case["impls"].items() if e.get("status") == "refused")
        if case["status"] == "skipped":
            parity = "not available"
        elif ok is None:
            parity = case["status"] if case["status"] != "ok" else "-"
        else:
            parity = ("ok" if ok else "FAIL") + (f" ({ratio:.2f} of bound)" if ratio is not None else "")
        rows.append({
            "case": case["name"],
            "dtype": case["dtype"],
            "status": case["status"],
            "parity": parity,
            "ours": f"{ours_name} {ours['median_ms']:.4g} ms" if ours.get("median_ms") is not None else _untimed(case),
            "baseline": f"{base_name} {base_ms:.4g} ms" if base_name else "-",
            "speedup": _fmt(speedup, ".2f") + ("x" if speedup else ""),
            "graph speedup": graph,
            "throughput": throughput,
            "roofline": _fmt(None if ours.get("roofline_fraction") is None else 100 * ours["roofline_fraction"], ".0f")
            + ("%" if ours.get("roofline_fraction") is not None else ""),
            "refused": ", ".join(refused) or "-",
            "reason": case.get("reason") or "",
        })
    return rows


def _graph_speedup(case: dict) -> str:
    """Our best fused against the best baseline by CUDA-graph (device) time, both named:
    "1.21x (fuseformer-triton 0.071 vs sdpa-cudnn 0.086 ms)"; "-" where nothing was graphed."""
    base, base_ms = _best_baseline(case, "graph_ms")
    ours = case.get("best_ours_graph")
    speedup = case.get("graph_speedups", {}).get("fuseformer-best", {}).get(base) if base else None
    if ours is None or speedup is None:
        return "-"
    return f"{speedup:.2f}x ({ours} {case['impls'][ours]['graph_ms']:.4g} vs {base} {base_ms:.4g} ms)"


def _graphed(doc: dict) -> bool:
    return any("graph_ms" in e or "graph_error" in e for c in doc["cases"] for e in c["impls"].values())


COLUMNS = ["case", "dtype", "parity", "ours", "baseline", "speedup", "graph speedup", "throughput", "roofline",
           "refused"]


def columns(doc: dict) -> list[str]:
    """The summary's columns: no "roofline" where the run measured no ceiling (the CPU), no
    "graph speedup" where nothing was timed in a CUDA graph (the CPU, --no-graph)."""
    roof = (doc.get("roofline") or {}).get("is_ceiling", True)
    graphed = _graphed(doc)
    return [c for c in COLUMNS if (c != "roofline" or roof) and (c != "graph speedup" or graphed)]


def print_table(doc: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"fuseformer bench - {doc['env']['device_name']}", show_lines=False)
    cols = columns(doc)
    for col in cols:
        table.add_column(col, overflow="fold")
    for row in summary_rows(doc):
        style = {"parity-fail": "red", "error": "red", "refused": "red", "skipped": "yellow"}.get(row["status"])
        cells = [escape(row[c]) for c in cols]
        if row["parity"].startswith("FAIL"):
            cells[2] = f"[red]{row['parity']}[/red]"
        table.add_row(*cells, style=style)
    console.print(table)
    for row in summary_rows(doc):
        if row["reason"]:
            console.print(f"[yellow]{escape(row['case'])}[/yellow]: {escape(row['reason'])}", highlight=False)
    for case in doc["cases"]:
        for name, entry in case["impls"].items():
            if entry.get("backend_warning"):
                console.print(f"[yellow]{escape(case['name'])} / {escape(name)}[/yellow]: "
                              f"{escape(entry['backend_warning'])}", highlight=False)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def write_markdown(doc: dict, path: Path, rules: list[dict] = ()) -> None:
    env = doc["env"]
    roof = doc.get("roofline") or {}
    lines = [
        f"# fuseformer bench: {env['device_name']}",
        "",
        f"- commit `{env['git_commit'] or 'none'}`" + (" (dirty)" if env.get("git_dirty") else ""),
        f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env.get('driver')}, "
        f"transformers {env.get('transformers')}",
        (f"- measured roofline: copy {roof.get('copy_gbps', 0):.4g} GB/s, matmul {roof.get('matmul_tflops', 0):.4g} "
         f"TFLOP/s ({roof.get('matmul_dtype')})" if roof.get("is_ceiling", True) else
         f"- CPU reference rates, not ceilings (cached data beats them; no roofline fractions): copy "
         f"{roof.get('copy_gbps', 0):.4g} GB/s, matmul {roof.get('matmul_tflops', 0):.4g} TFLOP/s "
         f"({roof.get('matmul_dtype')})"),
        f"- run: {' '.join(doc.get('argv') or []) or '(defaults)'}, {env['timestamp']}",
        "",
    ]
    lines += [f"> {note}" for note in doc.get("notes", [])]
    cols = columns(doc)
    lines += ["", "## Summary", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for row in summary_rows(doc):
        lines.append("| " + " | ".join(_md_escape(row[c]) for c in cols) + " |")
    with_roof = "roofline" in cols
    graphed = _graphed(doc)
    header = ["case", "implementation", "status", "median ms", "p20-p80 ms"] + ["graph ms"] * graphed
    header += ["TFLOP/s", "GB/s"] + ["roofline"] * with_roof + ["parity error / bound"]
    lines += ["", "## Every implementation", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for case in doc["cases"]:
        for name, e in case["impls"].items():
            parity = "-"
            if "parity" in e:
                worst = max(e["parity"]["checks"], key=lambda c: c["error"] / c["bound"] if c["bound"] else 0)
                parity = ("ok " if e["parity"]["ok"] else "FAIL ") + f"{worst['error']:.3g} / {worst['bound']:.3g}"
            spread = f"{e['p20_ms']:.4g}-{e['p80_ms']:.4g}" if "p20_ms" in e else "-"
            frac = e.get("roofline_fraction")
            status = e.get("status", "-") + (f": {e['reason']}" if e.get("reason") else "")
            if e.get("backend_warning"):
                status += f" ({e['backend_warning']})"
            cells = [case["name"], name, status, _fmt(e.get("median_ms"), ".4g"), spread]
            if graphed:
                cells.append(_fmt(e.get("graph_ms"), ".4g") if "graph_error" not in e else f"not graphed: {e['graph_error']}")
            cells += [_fmt(e.get("tflops")), _fmt(e.get("gbps"), ".4g")]
            cells += ["-" if frac is None else f"{100 * frac:.0f}%"] * with_roof + [parity]
            lines.append("| " + " | ".join(_md_escape(v) for v in cells) + " |")
    lines += target_lines(doc, rules)
    lines += variant_lines(doc)
    lines += overhead_lines(doc)
    path.write_text("\n".join(lines) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_parity(doc: dict, path: Path) -> bool:
    """error / bound of every checked implementation: below 1 passes the parity rule."""
    bars = []
    for case in doc["cases"]:
        for name, e in case["impls"].items():
            if "parity" in e:
                ratio = max((c["error"] / c["bound"] if c["bound"] else 0.0) for c in e["parity"]["checks"])
                bars.append((f"{case['name']} / {name}", max(ratio, 1e-6), e["parity"]["ok"]))
    if not bars:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["tab:green" if b[2] else "tab:red" for b in bars])
    ax.axvline(1.0, color="black", linestyle="--", label="parity bound")
    ax.set_xscale("log")
    ax.set_xlabel("max |impl - ref64| / (2 max |torch - ref64| + floor)")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    ax.set_title("Parity against the float64 reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedup(doc: dict, path: Path) -> bool:
    """Speedup of our best fused implementation against each baseline, along sequence length."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for case in doc["cases"]:
        x = case.get("x")
        if case["status"] != "ok" or not x or x not in case["params"]:
            continue
        for baseline, value in case.get("speedups", {}).get("fuseformer-best", {}).items():
            if baseline.startswith("sdpa-") and baseline != "sdpa-best":
                continue  # one SDPA line (the best backend) keeps the plot readable
            series.setdefault((f"{case['group']} ({x})", baseline), []).append((case["params"][x], value))
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for (group, baseline), points in sorted(series.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{group} vs {baseline}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length L (or hidden size N)")
    ax.set_ylabel("speedup (baseline time / fuseformer time)")
    ax.set_title(f"fuseformer speedup - {doc['env']['device_name']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline(doc: dict, path: Path) -> bool:
    """Each timed implementation's throughput as a fraction of the measured roofline
    (min of the copy bandwidth and matmul rate ceilings for its FLOPs and bytes)."""
    bars = []
    for case in doc["cases"]:
        for name, e in case["impls"].items():
            if e.get("roofline_fraction") is not None:
                bars.append((f"{case['name']} / {name}", e["roofline_fraction"], e.get("kind") == OURS))
    if not bars:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [100 * b[1] for b in bars], color=["tab:blue" if b[2] else "tab:gray" for b in bars])
    roof = doc.get("roofline") or {}
    ax.set_xlabel(f"% of roofline (copy {roof.get('copy_gbps', 0):.0f} GB/s, matmul {roof.get('matmul_tflops', 0):.3g} "
                  f"TFLOP/s {roof.get('matmul_dtype', '')}; blue = fuseformer)")
    ax.invert_yaxis()
    ax.set_title(f"Throughput against the measured roofline - {doc['env']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(doc: dict, out_dir: Path, rules: list[dict] | None = None) -> list[Path]:
    """results.md (with the targets' table when `rules` are given) and the plots."""
    written = []
    md = out_dir / "results.md"
    write_markdown(doc, md, rules or [])
    written.append(md)
    for name, plot in (("parity.png", plot_parity), ("speedup_vs_seqlen.png", plot_speedup), ("roofline.png", plot_roofline)):
        if plot(doc, out_dir / name):
            written.append(out_dir / name)
    return written


def overhead_lines(doc: dict) -> list[str]:
    """The `overhead` group as markdown: host µs per eager call next to the torch call."""
    group = doc.get("overhead")
    if not group:
        return []
    if "skipped" in group:
        return ["", "## Host overhead per eager call", "", f"Not measured: {group['skipped']}."]
    lines = ["", "## Host overhead per eager call", "",
             f"Launches: {group['launch']}; {group['dtype']}; target: at most {group['target_ratio']}x the "
             "torch call each op replaces.", "",
             ]
    if group.get("cut"):
        lines += [f"Cut short: {group['cut']}.", ""]
    lines += _overhead_table(group["rows"])
    bert = group.get("bert_base_forward") or {}
    if "fused_ops_us" in bert:
        lines += ["", f"BERT-base eager forward (B1 L16): {bert['fused_calls']} fused-op calls, "
                      f"{bert['fused_ops_us']:.0f} µs of host time inside them ({bert['backend']})."]
    elif bert:
        lines += ["", f"BERT-base eager forward (B1 L16), host µs until it returns: fused (auto) "
                      f"{bert['fused_us']:.0f}, torch backend {bert['torch_us']:.0f}"
                      + (f", fused with the fast launch {bert['fused_fast_launch_us']:.0f}"
                         if "fused_fast_launch_us" in bert else "")
                      + (f", the same with the post-LN blocks op by op {bert['fused_per_op_us']:.0f}"
                         if "fused_per_op_us" in bert else "") + "."]
    train = group.get("bert_base_train_step")
    if train:
        lines += ["", f"BERT-base eager training step (B1 L16), host µs until it returns: fused (auto) "
                      f"{train['fused_us']:.0f}, its backward on the calling thread "
                      f"{train['fused_calling_thread_us']:.0f}, torch backend {train['torch_us']:.0f}."]
    floor = group.get("launch_floor")
    if floor:
        lines += ["", f"add_layer_norm: ours {floor['ours_us']:.1f} µs"
                      + (f" ({floor['ours_fast_launch_us']:.1f} µs with the fast launch)"
                         if "ours_fast_launch_us" in floor else "")
                      + f"; Triton's own launch of the same kernel {floor['triton_launch_us']:.1f} µs; "
                      f"torch.add {floor['torch_add_us']:.1f} µs."]
    offline = group.get("offline")
    if offline:
        lines += ["", f"The same calls through Triton's launch code on this CPU ({offline.get('launch', 'offline')}; "
                      f"{offline.get('dtype', '')}):", ""]
        lines += _overhead_table(offline["rows"]) if "rows" in offline else [f"Not measured: {offline['skipped']}."]
        bert = offline.get("bert_base_forward")
        if bert:
            lines += ["", f"BERT-base eager forward (B1 L16, fp16, linear layers stubbed), host µs inside its "
                          f"{bert['fused_calls']} fused calls: Triton's launch {bert['triton_launch_us']:.0f}, "
                          f"fast launch {bert['fast_launch_us']:.0f}"
                          + (f"; the post-LN blocks op by op ({bert['per_op_calls']} calls), fast launch "
                             f"{bert['fast_launch_per_op_us']:.0f}" if "fast_launch_per_op_us" in bert else "")
                          + (f". The whole forward on the fast launch (the two comparable): one fused node per "
                             f"block {bert['forward_us']:.0f}, op by op {bert['forward_per_op_us']:.0f}"
                             if "forward_per_op_us" in bert else "")
                          + "."]
        train = offline.get("bert_base_train_step")
        if train:
            lines += ["", f"BERT-base eager training step (B1 L16, fp16, dropout 0.1, linear layers and their "
                          f"gradients stubbed), host µs inside its {train['nodes']} fused block nodes, forward + "
                          f"backward: Triton's launch {train['triton_launch_forward_us']:.0f} + "
                          f"{train['triton_launch_backward_us']:.0f}, fast launch {train['fast_launch_forward_us']:.0f}"
                          f" + {train['fast_launch_backward_us']:.0f}."]
    return lines


def _overhead_table(rows: list[dict]) -> list[str]:
    """One overhead table: with a fast-launch column where the rows have one."""
    fast = any("ours_fast_launch_us" in r for r in rows)
    if fast:  # the fast launch path, timed beside the default one
        lines = ["| call | ours µs, Triton's launch | ours µs, fast launch (default) | torch µs | torch call | "
                 "Triton's / torch | fast / torch |",
                 "| --- | --- | --- | --- | --- | --- | --- |"]
    else:
        lines = ["| call | ours µs | torch µs | torch call | ours / torch |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if fast:
            f_us = r.get("ours_fast_launch_us", float("nan"))
            lines.append(f"| {r['case']} | {r['ours_us']:.1f} | {f_us:.1f} | {r['torch_us']:.1f} | {r['torch_call']} | "
                         f"{r['ratio']:.2f}x | {f_us / r['torch_us']:.2f}x |")
        else:
            lines.append(f"| {r['case']} | {r['ours_us']:.1f} | {r['torch_us']:.1f} | {r['torch_call']} | "
                         f"{r['ratio']:.2f}x |")
    return lines


def print_overhead(doc: dict, console) -> None:
    from rich.markup import escape

    for line in overhead_lines(doc):
        console.print(escape(line), highlight=False)


def _default_of(name: str, ours: set[str]) -> str | None:
    """The implementation a variant is an alternative to: the longest other name of ours it
    extends with '-suffix' (fuseformer-triton-tma -> fuseformer-triton, fuseformer-cuda-cute
    -> fuseformer-cuda)."""
    parents = [p for p in ours if p != name and name.startswith(p + "-")]
    return max(parents, key=len) if parents else None


def _usable(entry: dict) -> bool:
    return entry.get("status") == "timed" and entry.get("parity", {"ok": True}).get("ok") is True


def variant_rows(doc: dict) -> list[dict]:
    """Each opt-in variant against the default it would replace, over the cases where both
    were timed with parity passed: speedup = default time / variant time (> 1: the variant is
    faster). The evidence for flipping a default, which only a GPU run gives."""
    stats: dict[tuple[str, str], dict] = {}
    for case in doc["cases"]:
        impls = case["impls"]
        ours = {n for n, e in impls.items() if e.get("kind") == OURS}
        for name in sorted(ours):
            default = _default_of(name, ours)
            if default is None:
                continue
            s = stats.setdefault((name, default), {"ratios": [], "graph": [], "parity_fail": 0, "untimed": 0})
            entry, base = impls[name], impls[default]
            if entry.get("parity", {}).get("ok") is False:
                s["parity_fail"] += 1
            elif _usable(entry) and _usable(base) and entry["median_ms"] > 0:
                s["ratios"].append((base["median_ms"] / entry["median_ms"], case["name"]))
                if entry.get("graph_ms") and base.get("graph_ms"):
                    s["graph"].append(base["graph_ms"] / entry["graph_ms"])
            else:
                s["untimed"] += 1
    rows = []
    for (name, default), s in sorted(stats.items()):
        ratios = [r for r, _ in s["ratios"]]
        row = {"variant": name, "default": default, "cases": len(ratios), "parity_fail": s["parity_fail"],
               "untimed": s["untimed"], "wins": sum(r > 1.0 for r in ratios)}
        if ratios:
            row["geomean"] = _geomean(ratios)
            row["worst"], row["worst_case"] = min(s["ratios"])
            row["best"], row["best_case"] = max(s["ratios"])
        if s["graph"]:  # the same cases' CUDA-graph (device) times, where both were graphed
            row["graph_geomean"], row["graph_cases"] = _geomean(s["graph"]), len(s["graph"])
        rows.append(row)
    return rows


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def variant_lines(doc: dict) -> list[str]:
    rows = variant_rows(doc)
    if not any(r["cases"] or r["parity_fail"] for r in rows):
        return []  # nothing timed and nothing failed (a CPU run): no evidence either way
    graphed = any("graph_geomean" in r for r in rows)
    lines = ["", "## Variants against the default they would replace", "",
             "Speedup = the default's median time / the variant's, over the cases where both were timed "
             "and passed parity (> 1: the variant is faster)."
             + (" The graph geomean is the same ratio of their CUDA-graph (device) times, over the cases "
                "where both were graphed." if graphed else ""), "",
             "| variant | default | cases | faster in | geomean | worst (case) | best (case) | parity FAIL | not timed |"
             + " graph geomean (cases) |" * graphed,
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * graphed]
    for r in rows:
        worst = f"{r['worst']:.2f}x ({r['worst_case']})" if r["cases"] else "-"
        best = f"{r['best']:.2f}x ({r['best_case']})" if r["cases"] else "-"
        geo = f"{r['geomean']:.2f}x" if r["cases"] else "-"
        line = (f"| {r['variant']} | {r['default']} | {r['cases']} | {r['wins']} | {geo} | {_md_escape(worst)} | "
                f"{_md_escape(best)} | {r['parity_fail']} | {r['untimed']} |")
        if graphed:
            line += f" {r['graph_geomean']:.2f}x ({r['graph_cases']}) |" if "graph_geomean" in r else " - |"
        lines.append(line)
    return lines


def target_lines(doc: dict, rules: list[dict]) -> list[str]:
    """The performance targets (bench/thresholds.json, docs/design.md) against a GPU run: each
    rule against each case of the run it covers, met or not. Nothing for a CPU run, whose
    timings are no evidence of GPU speed."""
    from .runner import target_rows

    if doc.get("env", {}).get("device") != "cuda":
        return []
    rows = target_rows(doc, rules)
    if not rows:
        return []
    met = sum(r["status"] == "met" for r in rows)
    lines = ["", "## Targets", "",
             f"Each rule of bench/thresholds.json against each case of this run it covers: {met} of {len(rows)} met "
             "(a case the run did not reach counts as not met).", "",
             "| case | figure | value | target | status |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        rule = r["rule"]
        figure = r["label"].split(": ", 1)[1] + (f" ({rule['ours']})" if "ours" in rule else "")
        bound = f">= {rule['min']:g}" if "min" in rule else f"<= {rule['max']:g}"
        value = "-" if r["value"] is None else f"{r['value']:.3g}"
        status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(f"| {r['case']} | {_md_escape(figure)} | {value} | {bound} | {_md_escape(status)} |")
    return lines


def print_targets(doc: dict, rules: list[dict], console) -> None:
    from rich.markup import escape

    for line in target_lines(doc, rules):
        console.print(escape(line), highlight=False)


def print_variants(doc: dict, console) -> None:
    from rich.markup import escape

    for line in variant_lines(doc):
        console.print(escape(line), highlight=False)
