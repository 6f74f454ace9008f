"""The shared runner, --check and compare, driven in-process with fake cases whose answers
and speeds are known, plus the model suite on tiny configs."""
import copy
import json
import pathlib
import time
import types

import pytest
import torch

from fuseformer.bench import cli, compare, model_cases, report, runner, timing
from fuseformer.bench.core import BASELINE, OURS, Impl, OpCase

CPU = torch.device("cpu")


def _double(i):
    return i["x"] * 2


def fake_case(name, ours_fn, baseline_fn=_double, timed=True):
    def make(device, dtype, gen):
        return {"x": torch.randn(37, 11, device=device, dtype=dtype, generator=gen)}

    return OpCase(
        name=name, suite="ops", group="fake", params={"L": 37}, flops=37 * 11, elements=2 * 37 * 11, x="L",
        timed_on_cpu=timed, make_inputs=make, reference=_double,
        impls=[Impl("fuseformer-fake", ours_fn, kind=OURS), Impl("baseline-fast", baseline_fn, kind=BASELINE)],
    )


def _wrong(i):
    # Far outside the parity bound in every dtype a run may pick: on a CUDA machine the
    # default dtype is bf16, whose floor (1.6e-2) an error of 1e-2 would pass.
    return i["x"] * 2 + 0.5


def _slow(i):
    time.sleep(0.003)
    return i["x"] * 2


@pytest.fixture(scope="module")
def roofline():
    return timing.measure_roofline(CPU, quick=True)


def test_parity_failure_is_red_and_never_timed(roofline):
    result = runner.run_case(fake_case("fake_wrong", _wrong), runner.RunConfig(CPU, quick=True), roofline)
    assert result["status"] == "parity-fail"
    entry = result["impls"]["fuseformer-fake"]
    assert entry["parity"]["ok"] is False and entry["status"] == "parity-fail"
    assert "median_ms" not in entry  # a wrong answer has no time
    assert result["speedups"] == {}
    assert result["impls"]["baseline-fast"]["status"] == "timed"


class _FakeTuner:
    """An autotuned kernel as kernels/_util.py's launch_tuned sees one: its JITFunction's name,
    and the timings Triton's Autotuner keeps of its last tuning."""

    fn = types.SimpleNamespace(__name__="_fake_kernel")

    configs_timings = {"BLOCK: 64, num_warps: 4": [0.5, 0.4, 0.6], "BLOCK: 128, num_warps: 8": [0.3, 0.2, 0.4]}


def test_a_case_records_what_the_autotuners_picked_in_its_first_call(roofline, monkeypatch):
    """Each implementation's first call stores the configs it tuned, with every config's time
    where its autotuner tuned one key in that call, and nothing for keys tuned before it."""
    from fuseformer.kernels import _util

    monkeypatch.setattr(_util, "_tuned_configs", dict(_util._tuned_configs))
    tuner, other = _FakeTuner(), _FakeTuner()
    _util._tuned_configs[(other, ("before",))] = {"BLOCK": 32}

    def tunes_one_key(i):
        _util._tuned_configs[(tuner, (37, "bf16"))] = {"BLOCK": 128, "num_warps": 8, "pre_hook": None}
        return i["x"] * 2

    def tunes_two_keys(i):
        for key in (("a",), ("b",)):
            _util._tuned_configs[(other, key)] = {"BLOCK": 64}
        return i["x"] * 2

    case = fake_case("fake_tuned", tunes_one_key)
    case.impls.append(Impl("fuseformer-fake-two", tunes_two_keys, kind=OURS))
    impls = runner.run_case(case, runner.RunConfig(device=CPU, quick=True), roofline)["impls"]
    assert impls["fuseformer-fake"]["tuned"] == [{
        "kernel": "_fake_kernel", "key": "(37, 'bf16')", "config": {"BLOCK": 128, "num_warps": 8, "pre_hook": None},
        "timings_ms": _FakeTuner.configs_timings}]
    two = impls["fuseformer-fake-two"]["tuned"]
    assert [t["key"] for t in two] == ["('a',)", "('b',)"]  # not ('before',): tuned before this call
    assert all("timings_ms" not in t for t in two)  # two keys: the last timings belong to one only
    assert "tuned" not in impls["baseline-fast"]


def test_check_exits_nonzero_on_injected_parity_failure(tmp_path, capsys):
    cases = [fake_case("fake_wrong", _wrong)]
    args = ["--quick", "--filter", "fake_wrong", "--out", str(tmp_path)]
    assert cli.bench_main(args + ["--check"], cases=cases) == 1
    assert "check failed" in capsys.readouterr().out
    # Without --check the run still succeeds, and the results say the case failed.
    assert cli.bench_main(args, cases=cases) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["cases"][0]["status"] == "parity-fail"


def test_check_passes_a_correct_case(tmp_path):
    cases = [fake_case("fake_right", _double)]
    assert cli.bench_main(["--quick", "--check", "--filter", "fake_right", "--out", str(tmp_path)], cases=cases) == 0


def test_speed_under_threshold_fails_the_gate(tmp_path, roofline):
    result = runner.run_case(fake_case("fake_slow", _slow), runner.RunConfig(CPU, quick=True), roofline)
    assert result["status"] == "ok"
    assert result["host_load"] is None or result["host_load"] >= 0  # the host's load as the case began
    speedup = result["speedups"]["fuseformer-best"]["baseline-fast"]
    assert speedup < 0.5  # 3 ms of sleep against a few microseconds
    doc = {"cases": [result]}
    rules = [{"case": "fake_*", "vs": "baseline-fast", "min": 1.0, "target": "test"}]
    failures = runner.gate(doc, rules, gate_speed=True)
    assert len(failures) == 1 and "fake_slow" in failures[0] and "< 1.0" in failures[0]
    # A rule that the measurement meets, and the CPU default of gating parity only.
    assert runner.gate(doc, [dict(rules[0], min=0.0)], gate_speed=True) == []
    assert runner.gate(doc, rules, gate_speed=False) == []
    # A rule whose metric was never measured fails rather than passing silently.
    missing = runner.gate(doc, [{"case": "fake_slow", "vs": "sdpa-best", "min": 1.0}], gate_speed=True)
    assert missing and "not measured" in missing[0]
    # The thresholds file shipped with the package loads and every rule names a case glob.
    shipped = runner.load_thresholds(cli.THRESHOLDS)
    assert shipped and all("case" in r and ("min" in r or "max" in r) for r in shipped)


def test_results_are_valid_json_after_every_case(tmp_path):
    path = tmp_path / "results.json"
    seen = []

    def on_done(result, i, n):
        seen.append(len(json.loads(path.read_text())["cases"]))

    cases = [fake_case("fake_a", _double), fake_case("fake_b", _double, timed=False)]
    doc = runner.run(cases, runner.RunConfig(CPU, quick=True, results_path=path), on_done=on_done)
    assert seen == [1, 2] and doc["complete"]
    assert doc["cases"][1]["impls"]["fuseformer-fake"]["status"] == "not-timed"


def test_timed_run_draws_speedup_plot_and_no_roofline_on_the_cpu(tmp_path):
    """The CPU's measured copy and matmul rates are no ceilings (cached data beats them):
    throughput is reported, a fraction of them is not."""
    cases = [fake_case(f"fake_L{i}", _double) for i in (1, 2)]
    for c, L in zip(cases, (64, 128)):
        c.params = {"L": L}
    doc = runner.run(cases, runner.RunConfig(CPU, quick=True, results_path=tmp_path / "results.json"))
    entry = doc["cases"][0]["impls"]["fuseformer-fake"]
    assert entry["status"] == "timed" and entry["p20_ms"] <= entry["median_ms"] <= entry["p80_ms"]
    assert entry["gbps"] > 0 and entry["tflops"] > 0
    assert entry["roofline_fraction"] is None and "copy_fraction" not in entry
    assert doc["roofline"]["is_ceiling"] is False
    written = {p.name for p in report.write_all(doc, tmp_path)}
    assert {"results.md", "parity.png", "speedup_vs_seqlen.png"} <= written and "roofline.png" not in written
    assert (tmp_path / "speedup_vs_seqlen.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "results.md").read_text()
    assert "not ceilings" in md and "| roofline |" not in md


def test_roofline_fraction_and_plot_against_a_ceiling(tmp_path):
    ceiling = timing.Roofline(copy_gbps=1e5, matmul_tflops=1e3, matmul_dtype="float32", l2_bytes=0, is_ceiling=True)
    result = runner.run_case(fake_case("fake_roof", _double), runner.RunConfig(CPU, quick=True), ceiling)
    entry = result["impls"]["fuseformer-fake"]
    assert 0 < entry["roofline_fraction"] < 1 and 0 < entry["copy_fraction"] < 1
    doc = {"env": {"device_name": "x", "git_commit": None, "torch": "", "triton": "", "cuda": None, "timestamp": ""},
           "roofline": ceiling.as_dict(), "cases": [result]}
    assert report.plot_roofline(doc, tmp_path / "roofline.png")
    assert (tmp_path / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    report.write_markdown(doc, tmp_path / "results.md")
    assert "| roofline |" in (tmp_path / "results.md").read_text()


def test_compare_names_an_autotune_pick_that_changed():
    """`bench compare` says where both runs tuned a key and took different configs; a key
    tuned in one run only, or to the same config, is not named."""
    def doc(picks):
        impls = {name: {"kind": OURS, "tuned": [{"kernel": "_k", "key": key, "config": cfg} for key, cfg in tuned]}
                 for name, tuned in picks.items()}
        return {"cases": [{"name": "c", "status": "ok", "impls": impls}]}

    old = doc({"fuseformer-triton": [("(4096,)", {"BLOCK_N": 128, "num_warps": 8}), ("(16384,)", {"BLOCK_N": 256}),
                                     ("(1,)", {"BLOCK_N": 64})]})
    new = doc({"fuseformer-triton": [("(4096,)", {"BLOCK_N": 256, "num_warps": 8}), ("(16384,)", {"BLOCK_N": 256}),
                                     ("(2,)", {"BLOCK_N": 64})]})
    assert compare.changed_picks(old, new) == ["_k (4096,) (c / fuseformer-triton): BLOCK_N 128 -> 256"]
    assert compare.changed_picks(old, old) == []


def test_compare_finds_an_injected_regression(tmp_path, capsys, roofline):
    result = runner.run_case(fake_case("fake_c", _double), runner.RunConfig(CPU, quick=True), roofline)
    old = {"env": {"device_name": "x"}, "cases": [result]}
    new = copy.deepcopy(old)
    new["cases"][0]["impls"]["fuseformer-fake"]["median_ms"] *= 1.5
    regressions, _ = compare.compare(old, new, tolerance=0.05)
    assert len(regressions) == 1 and "fake_c / fuseformer-fake" in regressions[0]
    # A slower baseline is noise, not a regression of ours.
    noisy = copy.deepcopy(old)
    noisy["cases"][0]["impls"]["baseline-fast"]["median_ms"] *= 3
    assert compare.compare(old, noisy, 0.05)[0] == []
    broken = copy.deepcopy(old)
    broken["cases"][0]["impls"]["fuseformer-fake"]["parity"]["ok"] = False
    assert any("parity" in r for r in compare.compare(old, broken, 0.05)[0])

    paths = {}
    for label, doc in (("old", old), ("new", new)):
        paths[label] = tmp_path / f"{label}.json"
        paths[label].write_text(json.dumps(doc))
    assert cli.main(["compare", str(paths["old"]), str(paths["new"])]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert cli.main(["bench", "compare", str(paths["old"]), str(paths["old"])]) == 0
    assert cli.main(["compare", str(paths["old"]), str(tmp_path / "missing.json")]) == 2


def _timed_doc(times: dict[str, float]) -> dict:
    impls = {name: {"kind": "ours" if name.startswith("fuseformer") else "baseline", "status": "timed",
                    "median_ms": ms} for name, ms in times.items()}
    return {"env": {"device_name": "cpu"}, "cases": [{"name": "m", "status": "ok", "reason": None, "impls": impls}]}


def test_compare_holds_ours_to_the_baselines_drift(tmp_path, capsys):
    """Two CPU runs of one commit: everything, baselines too, took up to 2.3x longer. Ours
    moving as much is the machine, not a regression; ours moving past it plus the tolerance is."""
    old = _timed_doc({"fuseformer-torch": 10.0, "hf-eager": 10.0, "hf-sdpa": 8.0})
    noisy = _timed_doc({"fuseformer-torch": 22.0, "hf-eager": 23.0, "hf-sdpa": 12.0})
    assert compare.baseline_drift(old, noisy) == pytest.approx((1.5, 2.3))
    assert compare.compare(old, noisy, 0.05) == ([], [])
    worse = _timed_doc({"fuseformer-torch": 25.0, "hf-eager": 23.0, "hf-sdpa": 12.0})
    [regression] = compare.compare(old, worse, 0.05)[0]
    assert "m / fuseformer-torch" in regression and "2.50x" in regression
    assert compare.compare(old, worse, 0.10)[0] == []  # 2.5 <= 2.3 * 1.1
    # Baselines that got faster do not lower the bar below "no slower than before".
    quieter = _timed_doc({"fuseformer-torch": 10.2, "hf-eager": 7.0, "hf-sdpa": 6.0})
    assert compare.compare(old, quieter, 0.05)[0] == []

    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path, doc in zip(paths, (old, noisy)):
        path.write_text(json.dumps(doc))
    assert cli.main(["bench", "compare", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "baseline drift: baselines took 1.50x to 2.30x" in out and "beyond 2.42x" in out
    assert cli.main(["bench", "compare", *map(str, paths), "--tolerance", "-1"]) == 2
    assert "--tolerance: must be a fraction >= 0" in capsys.readouterr().err


def test_compare_holds_graph_times_to_their_own_drift(tmp_path, capsys):
    """GPU runs carry each implementation's CUDA-graph time beside its eager one: a kernel that
    got slower on the device while its eager time, host-bound, did not move is a regression of
    its own, judged against the baselines' drift in graph time; runs without graph times
    compare as before."""
    def doc(ours_graph, base_graph):
        d = _timed_doc({"fuseformer-triton": 0.20, "sdpa-cudnn": 0.10})
        impls = d["cases"][0]["impls"]
        impls["fuseformer-triton"]["graph_ms"], impls["sdpa-cudnn"]["graph_ms"] = ours_graph, base_graph
        return d

    old = doc(0.050, 0.090)
    assert compare.compare(old, doc(0.052, 0.092), 0.05) == ([], [])
    [regression], _ = compare.compare(old, doc(0.070, 0.091), 0.05)
    assert regression.startswith("m / fuseformer-triton (graph): 0.05 ms -> 0.07 ms (1.40x time)")
    # The baselines' graph times moved as much: the machine, not ours.
    assert compare.compare(old, doc(0.070, 0.130), 0.05)[0] == []
    _, [faster] = compare.compare(old, doc(0.030, 0.090), 0.05)
    assert "(graph)" in faster
    plain = _timed_doc({"fuseformer-triton": 0.20, "sdpa-cudnn": 0.10})
    assert compare.compare(plain, old, 0.05) == ([], [])  # graph times in one run only

    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path, d in zip(paths, (old, doc(0.070, 0.091))):
        path.write_text(json.dumps(d))
    assert cli.main(["bench", "compare", *map(str, paths)]) == 1
    out = capsys.readouterr().out
    assert "baseline drift (graph): baselines took 1.01x to 1.01x" in out and "REGRESSION" in out


def _counted(calls: list, name: str):
    def fn(i):
        calls.append(name)
        return i["x"] * 2

    return fn


def test_resume_runs_only_what_a_cut_off_run_left(tmp_path, capsys):
    calls = []
    cases = [fake_case(n, _counted(calls, n), timed=False) for n in ("fake_r1", "fake_r2", "fake_r3")]
    args = ["--quick", "--filter", "fake_r*", "--out", str(tmp_path)]
    assert cli.bench_main(args, cases=cases) == 0
    path = tmp_path / "results.json"
    full = json.loads(path.read_text())
    # Cut off after the first case: what a killed run leaves behind.
    cut = dict(full, complete=False, cases=full["cases"][:1])
    path.write_text(json.dumps(cut))
    calls.clear()
    assert cli.bench_main(args + ["--resume"], cases=cases) == 0
    assert "keeping 1 of 3 cases" in capsys.readouterr().out
    assert set(calls) == {"fake_r2", "fake_r3"}  # (on a GPU each is called many times: timed)
    doc = json.loads(path.read_text())
    assert doc["complete"] and [c["name"] for c in doc["cases"]] == ["fake_r1", "fake_r2", "fake_r3"]
    assert doc["cases"][0] == dict(full["cases"][0], resumed=True) and doc["resumed"]["cases_kept"] == 1
    assert doc["roofline"] == full["roofline"]

    # Another commit (or device, versions, dtype, --quick) measured something else: run everything.
    cut["env"] = dict(cut["env"], git_commit="0" * 40)
    path.write_text(json.dumps(cut))
    calls.clear()
    assert cli.bench_main(args + ["--resume"], cases=cases) == 0
    assert "not continuing" in capsys.readouterr().out and set(calls) == {"fake_r1", "fake_r2", "fake_r3"}
    calls.clear()
    assert cli.bench_main(args + ["--resume", "--dtype", "fp16"], cases=cases) == 0
    assert set(calls) == {"fake_r1", "fake_r2", "fake_r3"}  # the file holds results in another dtype
    path.write_text("{not json")
    assert cli.bench_main(args + ["--resume"], cases=cases) == 2
    assert "--resume: cannot read" in capsys.readouterr().err


def test_filter_selection():
    cases = [fake_case("attn_a", _double), fake_case("attn_b", _double), fake_case("ln_c", _double)]
    assert [c.name for c in cli._select(cases, "attn", False)] == ["attn_a", "attn_b"]
    assert [c.name for c in cli._select(cases, "ln_*,attn_b", False)] == ["ln_c", "attn_b"]
    assert [c.name for c in cli._select(cases, "fake", False)] == ["attn_a", "attn_b", "ln_c"]  # a group name
    with pytest.raises(cli.UsageError, match="nothing matches 'zzz'"):
        cli._select(cases, "attn,zzz", False)


TINY = dict(hidden=32, layers=2, heads=2, inter=64, vocab=97, embed=16)


@pytest.mark.parametrize("family,task,pad", [("bert", "infer", 0.3), ("gpt2", "train", 0.0), ("albert", "train", 0.0)])
def test_model_cases_run_on_cpu(family, task, pad, roofline):
    case = model_cases._case(family, task, 2, 16, "cpu", pad=pad)
    case.size = TINY
    case.flops = model_cases._flops(family, task, TINY, 2, 16)
    result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
    if result["status"] == "skipped":
        pytest.skip(result["reason"])  # models/ not written yet: reported, not an error
    assert result["status"] == "ok", result
    for name in ("hf-eager", "hf-sdpa", "fuseformer-torch"):
        entry = result["impls"][name]
        assert entry["status"] == "timed" and entry["parity"]["ok"], (name, entry)
        # On the CPU nothing of ours is fused: whatever ops went through fuseformer.kernels ran torch.
        assert all(set(counts) == {"torch"} for counts in entry["backends"].values()), entry["backends"]
        assert [c["what"].split()[0] for c in entry["parity"]["checks"]] == (["loss", "grad"] if task == "train" else ["out"])
    assert set(result["speedups"]["fuseformer-torch"]) == {"hf-eager", "hf-sdpa"}


def test_training_parity_checks_every_gradient_not_only_the_loss(roofline, monkeypatch):
    """A backward that gets one parameter's gradient wrong leaves the loss exact: the
    training case must still fail parity, naming that parameter."""
    from fuseformer import models

    make = models.BertForMaskedLM.from_hf.__func__
    broken = {}

    def from_hf_with_a_wrong_gradient(cls, hf_model, **kwargs):
        model = make(cls, hf_model, **kwargs)
        name, param = max(model.named_parameters(), key=lambda item: item[1].numel())
        param.register_hook(lambda g: g * 2)
        broken["name"] = name
        return model

    monkeypatch.setattr(models.BertForMaskedLM, "from_hf", classmethod(from_hf_with_a_wrong_gradient))
    case = model_cases._case("bert", "train", 2, 16, "cpu")
    case.size = TINY
    result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
    assert broken and result["status"] == "parity-fail", result["reason"]
    loss, grads = result["impls"]["fuseformer-torch"]["parity"]["checks"]
    assert loss["what"] == "loss" and loss["ok"]
    assert grads["what"].startswith("grad ") and "1 fail" in grads["what"] and not grads["ok"]
    assert result["impls"]["hf-sdpa"]["parity"]["ok"]  # the baselines' gradients still pass


def test_op_trace_records_the_backend_each_op_ran(monkeypatch, device):
    from fuseformer import kernels as K
    from fuseformer.bench import op_trace

    if device == "cpu":
        # Off CUDA `auto` is torch by definition and nothing is probed; pretend to be on CUDA
        # so the probe runs (Triton's interpreter takes the CPU tensors here).
        monkeypatch.setattr(op_trace, "_device", lambda args, kwargs: torch.device("cuda"))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    original = K.add_layer_norm
    x, w, b = torch.randn(4, 8, device=device), torch.randn(8, device=device), torch.randn(8, device=device)
    monkeypatch.setattr(op_trace, "_auto_order", lambda op: ("triton",))
    with op_trace.record_backends() as ran:
        K.add_layer_norm(x, None, w, b, backend="auto")
        K.add_layer_norm(x, None, w, b, backend="torch")
        K.add_layer_norm(x, None, w, b, backend="auto")
    assert ran == {"add_layer_norm": {"triton": 2, "torch": 1}}
    assert K.add_layer_norm is original
    if K.unavailable_reason("cuda") is not None:
        # A backend that refuses the call is passed over, as `auto` passes it over.
        monkeypatch.setattr(op_trace, "_auto_order", lambda op: ("cuda", "triton"))
        with op_trace.record_backends() as ran:
            K.add_layer_norm(x, None, w, b, backend="auto")
        assert ran == {"add_layer_norm": {"triton": 1}}
    # No fused backend takes it: `auto` ran torch, and a fused implementation says so.
    monkeypatch.setattr(op_trace, "_auto_order", lambda op: ())
    with op_trace.record_backends() as ran:
        K.add_layer_norm(x, None, w, b, backend="auto")
    assert ran == {"add_layer_norm": {"torch": 1}}
    assert "add_layer_norm" in op_trace.summary(ran, fused=True)
    assert op_trace.summary(ran, fused=False) is None
    assert "PyTorch only" in op_trace.summary({}, fused=True)
    assert op_trace.summary({"attention": {"triton": 3}}, fused=True) is None


def test_op_trace_counts_the_ops_of_a_fused_block(device):
    """A block run as one fused node (models/fused_block.py) calls no public op: the trace
    counts its plan's backends, for every call the gate makes, a KV-cache step included (the
    models suite's parity call runs under the trace)."""
    from fuseformer.bench import op_trace
    from fuseformer.models import GPT2Config, GPT2Model, fused_block

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16)).to(device).eval()
    model.set_backend("triton")
    ids = torch.randint(0, 50, (1, 5), device=device)
    with torch.no_grad(), fused_block.use(True), op_trace.record_backends() as ran:
        past = model(input_ids=ids[:, :4], use_cache=True).past_key_values
        model(input_ids=ids[:, 4:], past_key_values=past, use_cache=True)
    assert ran == {"attention": {"triton": 4}, "add_layer_norm": {"triton": 8 + 2}, "linear_gelu": {"triton": 4}}


def test_missing_model_of_ours_is_an_error(roofline, monkeypatch):
    monkeypatch.setitem(model_cases.FAMILIES, ("bert", "infer"), ("BertModelThatDoesNotExist", "BertModel"))
    case = model_cases._case("bert", "infer", 2, 16, "cpu")
    result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
    assert result["status"] == "error" and "BertModelThatDoesNotExist" in result["reason"]
    [failure] = runner.gate({"cases": [result]}, [], gate_speed=False)
    assert "BertModelThatDoesNotExist" in failure


def test_import_error_of_our_models_is_an_error_not_a_skip(roofline, monkeypatch):
    import sys

    import fuseformer

    # `from fuseformer import models` now raises ImportError, as a broken models/ would.
    monkeypatch.setitem(sys.modules, "fuseformer.models", None)
    monkeypatch.delattr(fuseformer, "models", raising=False)
    case = model_cases._case("bert", "infer", 2, 16, "cpu")
    result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
    assert result["status"] == "error" and "fuseformer.models" in result["reason"], result["reason"]
    assert runner.gate({"cases": [result]}, [], gate_speed=False)


def test_missing_transformers_skips_with_the_reason(roofline, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    case = model_cases._case("bert", "infer", 2, 16, "cpu")
    result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
    assert result["status"] == "skipped" and "transformers is not installed" in result["reason"]
    assert report.summary_rows({"cases": [result]})[0]["parity"] == "not available"
    # Not gated (the CPU, or no rule names it): a skip is reported, not a failure ...
    assert runner.gate({"cases": [result]}, [], gate_speed=False) == []
    # ... but a case a threshold gates fails --check when it did not run, with the reason.
    rule = {"case": case.name, "vs": "hf-sdpa", "min": 1.0, "target": "test"}
    [failure] = runner.gate({"cases": [result]}, [rule, dict(rule, vs="hf-eager")], gate_speed=True)
    assert case.name in failure and "transformers is not installed" in failure


def test_case_where_all_of_ours_refused_is_not_ok(roofline):
    from fuseformer.bench.core import Refused

    def refuse(i):
        raise Refused("no kernel for this shape")

    result = runner.run_case(fake_case("fake_refused", refuse), runner.RunConfig(CPU, quick=True), roofline)
    assert result["impls"]["baseline-fast"]["status"] == "timed"
    assert result["status"] == "refused" and "fuseformer-fake: no kernel for this shape" in result["reason"]
    [failure] = runner.gate({"cases": [result]}, [], gate_speed=False)
    assert "fake_refused" in failure


def test_gpu_case_declarations_prepare_on_cpu(roofline):
    """The GPU cases' baselines (eager, each SDPA backend, cuBLASLt epilogue) and the
    per-batch float64 reference, at tiny shapes on the CPU: every implementation either
    passes parity or is refused with a reason; none errors. (torch.compile is left out:
    compiling for the CPU takes longer than this whole file.)"""
    from fuseformer.bench import ops

    cases = [
        ops.attention_case("g_attn_pad", B=2, H=2, L=33, D=16, pad=0.3, device_type="cuda"),
        ops.attention_case("g_attn_gqa_bwd", B=2, H=4, Hk=2, L=17, D=16, causal=True, grad=True, device_type="cuda"),
        ops.varlen_case("g_varlen", lengths=[5, 17, 9], H=2, D=16, device_type="cuda"),
        ops.add_ln_case("g_ln_bwd", M=9, N=40, grad=True, device_type="cuda"),
        ops.linear_gelu_case("g_lg", M=9, K_in=16, N=24, device_type="cuda"),  # erf: cuBLASLt not compared
    ]
    # Only Triton's interpreter runs a fused kernel on CPU tensors; on a CUDA machine (no
    # interpreter, see conftest.py) ours refuse them, so such a case measured nothing of ours.
    fused_runs_on_cpu = not torch.cuda.is_available()
    for case in cases:
        case.impls = [i for i in case.impls if i.name != "torch-compile"]
        result = runner.run_case(case, runner.RunConfig(CPU, quick=True), roofline)
        if fused_runs_on_cpu:
            assert result["status"] == "ok", (case.name, result["reason"], result["impls"])
        else:
            assert result["status"] == "refused" and "fuseformer-triton" in result["reason"], (case.name, result)
        seen = set(result["impls"])
        if case.name != "g_varlen":  # varlen has a triton kernel only
            assert result["impls"]["fuseformer-cuda"]["status"] == "refused"
        if case.name.startswith(("g_attn", "g_varlen")):
            # Peers beside SDPA: the opt-in Hopper kernel (sm_90 only) and FlashAttention-4 (when
            # installed) are declared on every CUDA case and refused with a reason elsewhere.
            hopper, fa4 = result["impls"]["fuseformer-triton-hopper"], result["impls"]["flash-attn-4"]
            assert hopper["status"] == "refused" and "(9, 0)" in hopper["reason"], hopper
            assert fa4["status"] == "refused" and fa4["reason"], fa4
        if case.name == "g_lg":
            # The cuda backend's Linear+GELU kernels one by one (CUTLASS for every GELU, and
            # cuBLASLt alone, the old default) are declared beside fuseformer-cuda (`auto`).
            for name in ("fuseformer-cuda-cutlass", "fuseformer-cuda-cublaslt"):
                entry = result["impls"][name]
                assert entry["status"] == "refused" and entry["reason"], entry
        expected = {"g_attn_pad": {"torch-eager", "sdpa-math", "sdpa-efficient"}, "g_varlen": {"sdpa-padded"},
                    "g_ln_bwd": {"torch-eager"}, "g_lg": {"torch-eager", "cublaslt-gelu"}}.get(case.name, set())
        assert expected <= seen, (case.name, seen)
        for name, entry in result["impls"].items():
            assert entry.get("status") in ("refused", "not-timed"), (case.name, name, entry)
            if entry["status"] == "refused":
                assert entry["reason"], (case.name, name)
            elif "parity" in entry:
                assert entry["parity"]["ok"], (case.name, name, entry["parity"])
    # The attention cases' float64 reference runs one batch element at a time on a GPU.
    assert cases[0].batch_keys and not cases[3].batch_keys


def test_every_threshold_rule_names_a_gpu_case():
    """A renamed case must not silently drop its gate: each rule matches a GPU case."""
    import fnmatch

    from fuseformer.bench import ops

    names = [c.name for c in ops.gpu_cases() + model_cases.cases("cuda")]
    assert len(names) == len(set(names))
    for rule in runner.load_thresholds(cli.THRESHOLDS):
        assert any(fnmatch.fnmatchcase(n, rule["case"]) for n in names), rule


def test_flash_attn_4_peer_calls_and_refusals(monkeypatch):
    """flash-attn-4 is not installed here: a stand-in module checks what the peer passes it
    ((B, L, H, D) views, causal), that its (out, lse) answer comes back as (B, H, L, D), and
    that its declines (asserts) become one-line refusals, as SDPA backends' do."""
    import sys
    import types

    from fuseformer.bench import ops
    from fuseformer.bench.core import Refused

    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((q.shape, causal))
        assert q.shape[-1] <= 256, "head dim must be <= 256\nsecond line"
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    out = ops._fa4_impl(True, False).fn({"q": q, "k": k, "v": v, "mask": None})
    assert calls == [((2, 5, 3, 8), True)]
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    with pytest.raises(Refused, match="^flash-attn-4: head dim must be <= 256$"):
        ops._fa4_impl(False, False).fn({"q": torch.randn(1, 1, 2, 300), "k": torch.randn(1, 1, 2, 300),
                                        "v": torch.randn(1, 1, 2, 300), "mask": None})
    with pytest.raises(Refused, match="no attention mask"):
        ops._fa4_impl(False, False).fn({"q": q, "k": k, "v": v, "mask": torch.ones(2, 1, 1, 5, dtype=torch.bool)})


@pytest.mark.parametrize("api", ["0.6", "earlier"])
def test_quack_peer_takes_either_layer_norm_api(monkeypatch, api):
    """quack-kernels is not installed here: stand-in modules of its two LayerNorm APIs (0.6's
    quack.rmsnorm.layernorm_fwd with fp32 weight and bias, the earlier quack.layernorm.layernorm
    with an fp32 weight and no bias) both give the add+LN forward case a peer that computes
    LayerNorm(x + residual) with the bias; the forward+backward case gets none (no autograd)."""
    import importlib.machinery
    import sys
    import types

    from fuseformer.bench import ops

    seen = []

    def layer_norm(h, w, b, eps):
        seen.append((w.dtype, None if b is None else b.dtype))
        return torch.nn.functional.layer_norm(h.float(), h.shape[-1:], w, b, eps).to(h.dtype)

    quack = types.ModuleType("quack")
    quack.__spec__ = importlib.machinery.ModuleSpec("quack", None)
    monkeypatch.setitem(sys.modules, "quack", quack)
    if api == "0.6":
        sub = types.ModuleType("quack.rmsnorm")
        sub.layernorm_fwd = layer_norm
        monkeypatch.setitem(sys.modules, "quack.rmsnorm", sub)
    else:
        sub = types.ModuleType("quack.layernorm")
        sub.layernorm = lambda h, w, eps: layer_norm(h, w, None, eps)
        monkeypatch.setitem(sys.modules, "quack.layernorm", sub)
        monkeypatch.setitem(sys.modules, "quack.rmsnorm", None)  # 0.6's module absent: its import fails

    fn, note = ops._quack_layer_norm()
    assert "QuACK" in note
    x, r = torch.randn(6, 16, dtype=torch.bfloat16), torch.randn(6, 16, dtype=torch.bfloat16)
    w, b = torch.randn(16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    out = fn(x + r, w, b, 1e-5)
    assert seen[-1] == ((torch.float32, torch.float32) if api == "0.6" else (torch.float32, None))
    torch.testing.assert_close(out.float(), torch.nn.functional.layer_norm((x + r).float(), (16,), w.float(),
                                                                           b.float(), 1e-5), atol=0.05, rtol=0.02)
    fwd = ops.add_ln_case("q", M=6, N=16, device_type="cuda")
    fwd_bwd = ops.add_ln_case("q", M=6, N=16, grad=True, device_type="cuda")
    assert "quack" in [i.name for i in fwd.impls] and "quack" not in [i.name for i in fwd_bwd.impls]


def _variant_case(name, times, parity_ok=None):
    impls = {}
    for impl, ms in times.items():
        entry = {"kind": OURS if impl.startswith("fuseformer") else BASELINE, "status": "timed", "median_ms": ms,
                 "parity": {"ok": (parity_ok or {}).get(impl, True), "checks": []}}
        if ms is None:
            entry.update(status="not-timed", median_ms=None)
        impls[impl] = entry
    return {"name": name, "impls": impls}


def test_variants_report_each_opt_in_kernel_against_the_default_it_would_replace(tmp_path, capsys):
    doc = {"cases": [
        _variant_case("a", {"fuseformer-triton": 2.0, "fuseformer-triton-tma": 1.0, "fuseformer-cuda": 4.0,
                            "fuseformer-cuda-cute": 8.0, "sdpa-cudnn": 1.5}),
        _variant_case("b", {"fuseformer-triton": 1.0, "fuseformer-triton-tma": 2.0, "fuseformer-cuda": 4.0,
                            "fuseformer-cuda-cute": None}),
        # A variant that fails parity counts as a failure, never as a speedup.
        _variant_case("c", {"fuseformer-triton": 3.0, "fuseformer-triton-tma": 0.1},
                      parity_ok={"fuseformer-triton-tma": False}),
    ]}
    rows = {r["variant"]: r for r in report.variant_rows(doc)}
    assert set(rows) == {"fuseformer-triton-tma", "fuseformer-cuda-cute"}  # baselines and defaults are no variants
    tma = rows["fuseformer-triton-tma"]
    assert tma["default"] == "fuseformer-triton" and tma["cases"] == 2 and tma["wins"] == 1
    assert tma["geomean"] == pytest.approx(1.0) and (tma["worst"], tma["worst_case"]) == (0.5, "b")
    assert (tma["best"], tma["best_case"]) == (2.0, "a") and tma["parity_fail"] == 1
    cute = rows["fuseformer-cuda-cute"]
    assert cute["default"] == "fuseformer-cuda" and cute["cases"] == 1 and cute["untimed"] == 1
    assert cute["geomean"] == pytest.approx(0.5) and cute["wins"] == 0

    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    assert cli.main(["bench", "variants", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fuseformer-triton-tma | fuseformer-triton | 2 | 1 | 1.00x | 0.50x (b) | 2.00x (a) | 1 | 0 |" in out
    assert "graph geomean" not in out  # no graph times in this run
    assert cli.main(["bench", "variants", str(tmp_path / "missing.json")]) == 2
    # A GPU run's CUDA-graph times give the same comparison on device time, where both were graphed.
    for name, graph_ms in (("fuseformer-triton", 1.0), ("fuseformer-triton-tma", 0.25)):
        doc["cases"][0]["impls"][name]["graph_ms"] = graph_ms
    rows = {r["variant"]: r for r in report.variant_rows(doc)}
    assert (rows["fuseformer-triton-tma"]["graph_geomean"], rows["fuseformer-triton-tma"]["graph_cases"]) == (4.0, 1)
    assert "graph_geomean" not in rows["fuseformer-cuda-cute"]
    lines = report.variant_lines(doc)
    assert "| fuseformer-triton-tma | fuseformer-triton | 2 | 1 | 1.00x | 0.50x (b) | 2.00x (a) | 1 | 0 | 4.00x (1) |" in lines
    assert "| fuseformer-cuda-cute | fuseformer-cuda | 1 | 0 | 0.50x | 0.50x (a) | 0.50x (a) | 0 | 1 | - |" in lines


def test_targets_report_each_rule_against_each_case_of_a_gpu_run(tmp_path, capsys):
    """`fuseformer bench targets` and results.md's targets table: met, short, not measured, and a
    case the run did not reach, each said; a CPU run's timings get no such table."""
    doc = {"env": {"device": "cuda"}, "cases": [
        {"name": "attn_a", "dtype": "bfloat16", "status": "ok", "reason": "",
         "speedups": {"fuseformer-best": {"sdpa-best": 1.2}}},
        {"name": "attn_b", "dtype": "bfloat16", "status": "ok", "reason": "",
         "speedups": {"fuseformer-best": {"sdpa-best": 0.8}}},
        {"name": "attn_c", "dtype": "bfloat16", "status": "ok", "reason": "", "speedups": {}},
        {"name": "attn_d", "dtype": "bfloat16", "status": "skipped", "reason": "cut off by the time box"},
        {"name": "attn_e", "dtype": "float16", "status": "ok", "reason": "",
         "speedups": {"fuseformer-best": {"sdpa-best": 0.5}}},
    ]}
    rules = [{"case": "attn_*", "dtype": "bfloat16", "vs": "sdpa-best", "min": 1.05, "target": "t"}]
    rows = {r["case"]: r for r in runner.target_rows(doc, rules)}
    assert {c: r["status"] for c, r in rows.items()} == {
        "attn_a": "met", "attn_b": "short", "attn_c": "not measured", "attn_d": "skipped"}  # attn_e: other dtype
    lines = report.target_lines(doc, rules)
    assert "1 of 4 met" in "\n".join(lines)
    assert "| attn_b | speedup vs sdpa-best | 0.8 | >= 1.05 | short |" in lines
    assert "| attn_d | speedup vs sdpa-best | - | >= 1.05 | skipped: cut off by the time box |" in lines
    # The gate says the same of the same rows.
    failures = runner.gate(doc, rules, gate_speed=True)
    assert len(failures) == 3 and any("attn_b" in f and "< 1.05" in f for f in failures)
    assert report.target_lines(dict(doc, env={"device": "cpu"}), rules) == []

    path = tmp_path / "results.json"
    path.write_text(json.dumps(doc))
    thresholds = tmp_path / "rules.json"
    thresholds.write_text(json.dumps({"rules": rules}))
    assert cli.main(["bench", "targets", str(path), "--thresholds", str(thresholds)]) == 0
    assert "| attn_a | speedup vs sdpa-best | 1.2 | >= 1.05 | met |" in capsys.readouterr().out
    # The shipped targets file, on the committed H100 run: every rule's cases get a row.
    shipped = runner.load_thresholds(cli.THRESHOLDS)
    h100 = compare.load(pathlib.Path(__file__).resolve().parent.parent / "bench/results/h100/ops_results.json")
    assert any(r["status"] == "met" for r in runner.target_rows(h100, shipped))


def _graph_case(suite="ops"):
    """A case prepared without a device: four implementations whose eager and graph times
    (set by _fake_gpu_timers) rank them differently, as a host-bound call would."""
    from fuseformer.bench.core import Case, Prepared

    fns = {name: (lambda name=name: name) for name in ("fuseformer-fake", "fuseformer-fake-tma", "eager", "sdpa-x")}

    class Graphed(Case):
        def prepare(self, device, dtype, l2_bytes):
            kinds = {n: OURS if n.startswith("fuseformer") else BASELINE for n in fns}
            return Prepared(dict(fns), {}, {}, {}, {}, kinds)

    return Graphed(name=f"graphed_{suite}", suite=suite, elements=1e6)


# name -> (eager ms, graph ms or an error): ours is host-bound eagerly (slower than both
# baselines) but the faster one on the device; the -tma variant cannot be captured.
_FAKE_TIMES = {"fuseformer-fake": (0.20, 0.05), "fuseformer-fake-tma": (0.15, "not capturable: it syncs"),
               "eager": (0.10, 0.09), "sdpa-x": (0.12, 0.06)}


def _fake_gpu_timers(monkeypatch):
    graphed = []

    def time_fn(fn, device, quick):
        ms = _FAKE_TIMES[fn()][0]
        return timing.Timing(ms, ms, ms, runs=10)

    def time_graph(fn, one_ms, quick):
        name = fn()
        graphed.append((name, one_ms))
        value = _FAKE_TIMES[name][1]
        if isinstance(value, str):
            raise RuntimeError(value)
        return timing.Timing(value, value * 0.9, value * 1.1, runs=100)

    monkeypatch.setattr(timing, "time_fn", time_fn)
    monkeypatch.setattr(timing, "time_graph", time_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # after a failed capture
    return graphed


def test_gpu_run_times_each_ops_implementation_in_a_cuda_graph_too(monkeypatch, tmp_path):
    """On a GPU every timed implementation of an ops case is timed again in a CUDA graph (its
    eager time sizes the graph); the device times get their own best and speedups, a call
    that cannot be captured an error of its own while its eager time stands, and the report
    shows both. Models cases, --no-graph and the CPU time eagerly only."""
    graphed = _fake_gpu_timers(monkeypatch)
    gpu = torch.device("cuda")
    ceiling = timing.Roofline(copy_gbps=1e3, matmul_tflops=1e3, matmul_dtype="bfloat16", l2_bytes=0)
    result = runner.run_case(_graph_case(), runner.RunConfig(gpu, quick=True), ceiling)
    assert sorted(graphed) == sorted((n, t[0]) for n, t in _FAKE_TIMES.items())
    impls = result["impls"]
    assert impls["fuseformer-fake"]["graph_ms"] == 0.05 and impls["fuseformer-fake"]["graph_p80_ms"] == 0.05 * 1.1
    tma = impls["fuseformer-fake-tma"]
    assert tma["status"] == "timed" and tma["median_ms"] == 0.15 and "graph_ms" not in tma
    assert tma["graph_error"] == "RuntimeError: not capturable: it syncs"
    # Eagerly the -tma variant is our best and loses to eager torch; on the device ours wins.
    assert result["best_ours"] == "fuseformer-fake-tma" and result["best_ours_graph"] == "fuseformer-fake"
    assert result["speedups"]["fuseformer-best"]["eager"] == pytest.approx(0.10 / 0.15)
    assert result["graph_speedups"]["fuseformer-best"] == pytest.approx({"eager": 0.09 / 0.05, "sdpa-x": 1.2,
                                                                         "sdpa-best": 1.2})
    doc = {"env": {"device_name": "x", "git_commit": None, "torch": "", "triton": "", "cuda": None, "timestamp": "",
                   "device": "cuda"}, "roofline": ceiling.as_dict(), "cases": [result]}
    report.write_markdown(doc, tmp_path / "results.md")
    md = (tmp_path / "results.md").read_text()
    assert "| graph speedup |" in md and "1.20x (fuseformer-fake 0.05 vs sdpa-x 0.06 ms)" in md
    assert "| graphed_ops | fuseformer-fake | timed | 0.2 | 0.2-0.2 | 0.05 |" in md
    assert "| not graphed: RuntimeError: not capturable: it syncs |" in md

    graphed.clear()
    for case, config in ((_graph_case("models"), runner.RunConfig(gpu, quick=True)),
                         (_graph_case(), runner.RunConfig(gpu, quick=True, graph=False)),
                         (_graph_case(), runner.RunConfig(CPU, quick=True))):
        result = runner.run_case(case, config, ceiling)
        assert graphed == [] and "graph_speedups" not in result, (case.suite, config)
        assert all("graph_ms" not in e and "graph_error" not in e for e in result["impls"].values())
    doc["cases"] = [result]
    report.write_markdown(doc, tmp_path / "results.md")
    md = (tmp_path / "results.md").read_text()
    assert "graph speedup" not in md and "graph ms" not in md


def test_training_steps_are_graph_timed_and_inference_model_cases_are_not():
    """A model training step gets the graph timing (its device time, and whether it syncs);
    model inference has its own graph implementations instead; ops cases all get it."""
    from fuseformer.bench import model_cases

    assert model_cases.ModelCase(name="t", family="bert", task="train").graph_timed
    assert not model_cases.ModelCase(name="i", family="bert", task="infer").graph_timed
    assert _graph_case().graph_timed and not _graph_case("models").graph_timed
    trains = [c for c in model_cases.cases("cuda") if c.task == "train"]
    assert trains and all(c.graph_timed for c in trains)


def test_no_graph_flag():
    assert cli._bench_parser().parse_args(["--no-graph"]).graph is False
    assert cli._bench_parser().parse_args([]).graph is True


@pytest.mark.gpu
def test_gpu_graph_timer_captures_our_ops_forward_and_backward_and_refuses_a_sync():
    """timing.time_graph on a GPU: a plain op and our fused attention and add+LN forward+
    backward are captured and timed (no host sync anywhere in them: the capture would fail);
    a call that syncs is refused with a clear error before any capture, and the CUDA context
    still works after it."""
    from fuseformer import kernels as K

    x = torch.randn(2048, 2048, device="cuda")
    x * 2
    t = timing.time_graph(lambda: x * 2, 0.02, quick=True)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.runs >= 10
    q, k, v = (torch.randn(2, 4, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    pad = torch.ones(2, 1, 1, 200, dtype=torch.bool, device="cuda")
    pad[1, ..., 150:] = False
    h = torch.randn(400, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(768, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        a = K.scaled_dot_product_attention(q, k, v, attn_mask=pad, backend="triton")
        y = K.add_layer_norm(h, h, w, w, backend="triton")
        return torch.autograd.grad((a.float().sum() + y.float().sum()), (q, k, v, h, w))

    step()  # as in the bench, graphed after its eager timing: first-call autotuning (which syncs) done
    assert timing.time_graph(step, 0.5, quick=True).median_ms > 0
    with pytest.raises(RuntimeError, match="not capturable: the call synchronises with the host"):
        timing.time_graph(lambda: x.sum().item(), 0.02, quick=True)
    assert torch.equal((x * 2).cpu(), x.cpu() * 2)


class _FakeCuda:
    """The torch.cuda calls timing.time_graph makes, recorded on a CPU: a sync debug mode that
    raises when a call "syncs" under "error", a graph whose capture records the calls made in
    it, and events whose elapsed time is 1 ms a call replayed."""

    def __init__(self):
        self.mode, self.log, self.capturing = 0, [], None
        fake = self

        class Graph:
            def __init__(self):
                self.calls = 0

            def replay(self):
                fake.log.append("replay")

        class Capture:
            def __init__(self, graph):
                self.graph = graph

            def __enter__(self):
                fake.capturing = self.graph

            def __exit__(self, *exc):
                fake.capturing = None

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = len(fake.log)

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return 1.0 * fake.graph.calls  # 1 ms a captured call, per replay

        class Stream:
            def wait_stream(self, other):
                pass

        self.Graph, self.Capture, self.Event, self.Stream = Graph, Capture, Event, Stream
        self.graph = None

    def install(self, monkeypatch):
        import contextlib

        cuda = torch.cuda
        monkeypatch.setattr(cuda, "get_sync_debug_mode", lambda: self.mode)
        monkeypatch.setattr(cuda, "set_sync_debug_mode", lambda mode: setattr(self, "mode", mode))
        monkeypatch.setattr(cuda, "synchronize", lambda *a: self.log.append("synchronize"))
        monkeypatch.setattr(cuda, "Stream", self.Stream)
        monkeypatch.setattr(cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(cuda, "current_stream", lambda *a: self.Stream())
        monkeypatch.setattr(cuda, "CUDAGraph", lambda: setattr(self, "graph", self.Graph()) or self.graph)
        monkeypatch.setattr(cuda, "graph", self.Capture)
        monkeypatch.setattr(cuda, "Event", self.Event)
        monkeypatch.setattr(cuda, "empty_cache", lambda: self.log.append("empty_cache"))

    def call(self, syncs=False):
        """A timed call: counted into the graph while capturing; under the "error" debug mode
        a syncing one raises as torch does."""
        if syncs and self.mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if self.capturing is not None:
            self.capturing.calls += 1
        self.log.append("call")


def test_graph_timer_checks_for_syncs_then_captures_n_calls_and_divides_by_them(monkeypatch):
    """timing.time_graph's steps with torch.cuda stood in for (the real capture needs a GPU:
    test_gpu_graph_timer_... runs it there): one eager call under the sync debug mode "error",
    the mode restored after it even when it raises, two warm-up calls, n calls captured (n from
    the eager time), and each replay's time divided by n."""
    fake = _FakeCuda()
    fake.install(monkeypatch)
    t = timing.time_graph(fake.call, one_ms=0.1, quick=True)
    n = round(timing.GRAPH_MS[True] / 0.1)
    assert fake.graph.calls == n and fake.mode == 0
    assert fake.log.count("call") == 1 + 2 + n  # the sync check, the warm-up, the capture
    assert fake.log.count("replay") == 1 + timing.GRAPH_REPLAYS[True] and fake.log[-1] == "empty_cache"
    assert t.median_ms == pytest.approx(1.0) and t.runs == n * timing.GRAPH_REPLAYS[True]
    # A long call is captured once; a very short one at most GRAPH_MAX_CALLS times.
    timing.time_graph(fake.call, one_ms=50.0, quick=False)
    assert fake.graph.calls == 1
    timing.time_graph(fake.call, one_ms=1e-6, quick=False)
    assert fake.graph.calls == timing.GRAPH_MAX_CALLS

    fake.mode, fake.graph = "warn", None
    with pytest.raises(RuntimeError, match="not capturable: the call synchronises with the host"):
        timing.time_graph(lambda: fake.call(syncs=True), one_ms=0.1, quick=True)
    assert fake.mode == "warn" and fake.graph is None  # the user's mode back, nothing captured
