"""The `fuseformer bench` command end to end on the CPU, in a subprocess as a user runs it,
and its argument errors."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fuseformer.bench import cli

TINY = "add_ln_fwd_51x100"


def _run(*args, timeout=240, env_extra=None):
    env = dict(os.environ)
    # The command must switch Triton's interpreter on by itself when there is no GPU.
    env.pop("TRITON_INTERPRET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fuseformer.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # --device cpu: what these tests check is the CPU run, which a CUDA machine would not pick.
    proc = _run("--quick", "--device", "cpu", "--filter", TINY, "--out", str(out))
    return proc, out


def test_cli_exits_zero_and_says_what_cpu_cannot_do(quick_run):
    proc, _ = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stdout
    assert 'pip install -e ".[dev]" && fuseformer bench' in proc.stdout
    assert TINY in proc.stdout


def test_cli_json_schema(quick_run):
    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == 2 and doc["complete"] is True
    env = doc["env"]
    for key in ("git_commit", "git_dirty", "device", "device_name", "driver", "torch", "triton", "cuda", "timestamp"):
        assert key in env
    assert env["device"] == "cpu" and isinstance(env["torch"], str) and isinstance(env["triton"], str)
    assert env["git_dirty"] in (True, False, None)
    roof = doc["roofline"]
    assert roof["copy_gbps"] > 0 and roof["matmul_tflops"] > 0
    assert any("needs a CUDA GPU" in n for n in doc["notes"])
    [case] = doc["cases"]
    assert case["name"] == TINY and case["status"] == "ok"
    assert case["dtype"] == "float32" and isinstance(case["params"], dict)
    assert case["bytes"] == 3 * 51 * 100 * 4
    triton_entry = case["impls"]["fuseformer-triton"]
    assert triton_entry["kind"] == "ours"
    # On the CPU the interpreter is checked, never timed.
    assert triton_entry["status"] == "not-timed" and "median_ms" not in triton_entry
    parity = triton_entry["parity"]
    assert parity["ok"] is True
    for check in parity["checks"]:
        assert {"what", "ok", "error", "bound", "torch_error"} <= set(check)
        assert 0 <= check["error"] <= check["bound"]


def test_cli_writes_markdown_and_png(quick_run):
    _, out = quick_run
    md = (out / "results.md").read_text()
    assert "| case |" in md and TINY in md and "commit" in md
    png = (out / "parity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_suite_lists_valid_ones(capsys):
    assert cli.bench_main(["--suite", "kernels"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "ops" in err and "models" in err and "all" in err


def _here_cases():
    """The cases the command picks on this machine: with CUDA present its default device is
    CUDA and it declares the GPU cases, not the small CPU ones."""
    import torch

    from fuseformer.bench import model_cases, ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return ops.cases(device), model_cases.cases(device)


def test_unknown_filter_lists_valid_names(capsys, tmp_path):
    assert cli.bench_main(["--filter", "no_such_case", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'no_such_case'" in err and "groups" in err
    ops_cases, models = _here_cases()
    assert ops_cases[0].name in err and models[0].name in err


def test_unwritable_out_is_a_clear_error(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    some_case = _here_cases()[0][0].name
    assert cli.bench_main(["--filter", some_case, "--out", str(blocker / "results")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot write results there" in err


def test_device_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.bench_main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_device_cuda_n_becomes_the_current_device(monkeypatch):
    """do_bench's events, the peak-memory counters and Triton's launches use the current
    CUDA device: --device cuda:1 must make device 1 current, or device 0 is what is timed."""
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert cli._device("cuda:1") == torch.device("cuda:1")
    assert current == [torch.device("cuda:1")]


def test_list_shows_quick_cases(capsys):
    assert cli.bench_main(["--list", "--quick", "--suite", "ops"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["case", "suite", "group", "quick"]
    ops_cases, _ = _here_cases()
    quick = [c.name for c in ops_cases if c.quick]
    assert quick and len(quick) < len(ops_cases)
    # The ops suite ends with the `overhead` group (host µs per eager call, no timed case).
    assert [row.split()[0] for row in rows] == quick + ["overhead"]
    assert all(row.split()[1:] == [c.suite, c.group, "yes"] for row, c in zip(rows, [c for c in ops_cases if c.quick]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the group needs the interpreter")
def test_overhead_group_alone_runs_and_is_written(tmp_path, capsys):
    import json

    out = tmp_path / "res"
    assert cli.bench_main(["--filter", "overhead", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["cases"] == []
    group = doc["overhead"]
    assert group["launch"].startswith("stubbed")
    assert {r["case"] for r in group["rows"]} >= {"add_layer_norm_fwd", "attention_pad_fwd+bwd", "linear_gelu_fwd"}
    assert group["bert_base_forward"]["fused_calls"] > 0
    assert "## Host overhead per eager call" in (out / "results.md").read_text()
    assert "add_layer_norm_fwd" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the group needs the interpreter")
def test_overhead_group_cut_short_keeps_its_rows_and_says_so(tmp_path, monkeypatch):
    """A time box's SIGINT (bench/gpu_session.sh) during the BERT forward: the op rows measured
    before it are written, with the part that was cut named, in the JSON and the markdown."""
    import json

    from fuseformer.bench import overhead

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    every = overhead.op_cases
    monkeypatch.setattr(overhead, "op_cases",
                        lambda *args: [c for c in every(*args) if c.name.startswith("add_layer_norm")])
    monkeypatch.setattr(overhead, "measure_bert_forward", interrupted)
    out = tmp_path / "res"
    assert cli.bench_main(["--filter", "overhead", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    group = json.loads((out / "results.json").read_text())["overhead"]
    assert [r["case"] for r in group["rows"]] == ["add_layer_norm_fwd", "add_layer_norm_fwd+bwd"]
    assert group["cut"] == "interrupted while measuring bert_base_forward, 2 rows measured"
    assert group["bert_base_forward"] is None and group["launch_floor"] is None
    md = (out / "results.md").read_text()
    assert "Cut short: interrupted while measuring bert_base_forward" in md and "| add_layer_norm_fwd |" in md


def test_case_names_start_with_their_group():
    """--filter takes a group or a name: a case must read as a member of its group."""
    from fuseformer.bench import model_cases, ops

    for device in ("cpu", "cuda"):
        for case in ops.cases(device) + model_cases.cases(device):
            assert case.name.startswith(case.group + "_"), (device, case.name, case.group)


def test_bare_command_and_help_list_the_subcommands(capsys):
    assert cli.main([]) == 2  # nothing was asked for: a script calling it bare must notice
    bare = capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    helped = capsys.readouterr().out
    assert bare == helped
    for line in ("bench ", "bench --list", "bench compare OLD.json NEW.json", "fuseformer bench --help"):
        assert line in helped, line
    assert cli.main(["--quick"]) == 2
    assert "fuseformer bench --quick" in capsys.readouterr().err
    assert cli.main(["benchh"]) == 2
    assert "unknown command 'benchh'" in capsys.readouterr().err


def test_bench_help_is_the_benchmarks_own(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: fuseformer bench" in out and "--quick" in out and "--resume" in out


def test_device_cpu_in_process_leaves_triton_interpret_alone_once_kernels_exist(monkeypatch, capsys):
    """On a CUDA machine the kernels are compiled when they are imported; a later in-process
    `--device cpu` that set TRITON_INTERPRET would make fuseformer hand CPU tensors to compiled
    kernels in every test after it."""
    import fuseformer.kernels  # noqa: F401 - defined before the command runs, as in a test session

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.bench_main(["--list", "--device", "cpu", "--suite", "ops"]) == 0
    assert "TRITON_INTERPRET" not in os.environ
    capsys.readouterr()


@pytest.mark.parametrize("value", ["nonsense", "trtion"])
def test_bad_backend_variable_is_one_line_and_status_2(value):
    proc = _run("--list", env_extra={"FUSEFORMER_BACKEND": value}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "FUSEFORMER_BACKEND must be one of" in lines[0] and value in lines[0], proc.stderr


def test_prewarm_plan_deals_the_cases_by_their_work():
    """bench/prewarm.py splits the timed run's cases (its filter and order) over the processes:
    each case once, the headline ones spread over every group's start, no empty group, and
    the cases with a backward (BACKWARD_WEIGHT each) spread too, not dealt by count."""
    from fuseformer.bench import prewarm

    selected = cli._select(cli._collect("ops", "cpu"), "add_ln,linear_gelu", False)
    groups = prewarm.plan("ops", "add_ln,linear_gelu", False, 3, "cpu")
    assert len(groups) == 3 and all(groups)
    assert sorted(sum(groups, [])) == sorted(c.name for c in selected)
    assert [g[0] for g in groups] == [c.name for c in selected[:3]]
    weight = {c.name: prewarm._weight(c) for c in selected}
    assert set(weight.values()) == {1, prewarm.BACKWARD_WEIGHT}  # both kinds are in the split
    work = [sum(weight[n] for n in g) for g in groups]
    assert max(work) - min(work) <= prewarm.BACKWARD_WEIGHT, (groups, work)
    assert prewarm.plan("ops", TINY, False, 8, "cpu") == [[TINY]]  # never more processes than cases


def test_prewarm_spreads_the_models_training_cases():
    """The GPU models suite's three training cases, which dealt round-robin by count all fell in
    one of two processes (2026-11-28), go to different processes of three."""
    from fuseformer.bench import prewarm

    groups = prewarm.plan("models", "bert_train_B32_L128*,bert_infer_B32_L128*,bert_infer_B8_L512_pad30,"
                          "gpt2_infer_B8_L512,*", True, 3, "cuda")
    train = [[n for n in g if "_train_" in n] for g in groups]
    assert sum(len(t) for t in train) == 3 and max(len(t) for t in train) <= 2, groups


def test_prewarm_runs_each_share_in_a_process_of_its_own(tmp_path):
    """Two cases, two `fuseformer bench` processes, with the cuda backend's JIT build switched
    off in them; results go to a scratch folder, one log per process to --logs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fuseformer.bench.prewarm", "--suite", "ops", "--filter",
                           f"{TINY},linear_gelu_fwd_erf_17x100x257", "--procs", "2", "--seconds", "200", "--logs",
                           str(tmp_path), "--device-type", "cpu"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "prewarm ops [0] 1 cases, exit 0" in proc.stdout and "prewarm ops [1] 1 cases, exit 0" in proc.stdout
    logs = sorted(p.name for p in tmp_path.iterdir())
    assert logs == ["prewarm_ops_0.txt", "prewarm_ops_1.txt"]
    assert f"{TINY}: ok" in (tmp_path / "prewarm_ops_0.txt").read_text()
    assert not (tmp_path / "results.json").exists()


def test_prewarm_interrupts_what_outlives_its_time_limit(tmp_path, monkeypatch):
    from fuseformer.bench import prewarm

    seen_env = []
    real_popen = subprocess.Popen

    def popen(cmd, **kwargs):
        # subprocess.Popen is patched for the whole process: a thread's own call meanwhile (the
        # csrc/ build ahead of the tests runs nvcc) must reach the real one, or its build is lost.
        if cmd[1:3] != ["-m", "fuseformer.bench"]:
            return real_popen(cmd, **kwargs)
        seen_env.append(kwargs["env"].get("FUSEFORMER_CUDA_NO_BUILD"))
        return real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)

    monkeypatch.setattr(prewarm.subprocess, "Popen", popen)
    start = time.monotonic()
    assert prewarm.run([["a"], ["b"]], "ops", False, 1.0, tmp_path) == 1
    assert time.monotonic() - start < 30  # SIGINT ended them (Python's KeyboardInterrupt), no 60 s sleep
    assert seen_env == ["1", "1"]
