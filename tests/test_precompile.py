"""kernels/precompile.py and the fast launch, through Triton's real JIT path without a GPU.

tests/offline_launch_check.py runs our launchers on CPU tensors with a stand-in Triton driver
(bench/offline.py), compiling for sm_90: the binder, our autotuners' pruning
and pre_hooks, the autotuner and the compiles are Triton's own, as on a GPU; only the launches
and the timings do nothing. It runs in a subprocess: this process has Triton's interpreter on
(conftest.py), under which no kernel is a JITFunction. Each autotuner gets its first two
configs, to keep the compiles near half a minute on two cores.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from fuseformer.kernels import precompile as P

SCRIPT = pathlib.Path(__file__).resolve().parent / "offline_launch_check.py"

# The autotuned kernels each case must reach: a routing slip (the Hopper cases running the
# portable kernels, say) would otherwise pass unnoticed.
TUNED = {
    "linear_gelu_portable": {"_linear_gelu_fwd"},
    "linear_gelu_tma": {"_linear_gelu_tma"},
    "add_layer_norm": set(),  # rule-planned, no autotuner
    "cross_entropy": set(),  # likewise
    "attention_portable": {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"},
    "attention_portable_atomic_dq": {"_attn_bwd_dkdv"},  # its forward was compiled by the case before
    "attention_portable_fused_dq": {"_attn_bwd_dkdv"},  # the one-kernel backward's own tuner
    "attention_portable_fused_dq_grads_into": set(),  # tuned by the case before
    "attention_hopper": {"_attn_fwd_hopper", "_attn_bwd_dkdv_hopper", "_attn_bwd_dq_hopper"},
    "attention_hopper_host": {"_attn_fwd_hopper", "_attn_bwd_dkdv_hopper", "_attn_bwd_dq_hopper"},
    # Its forward's key was tuned by attention_hopper_host's, its backward's by attention_hopper's.
    "attention_hopper_auto_descriptors": set(),
    "attention_hopper_atomic_dq": {"_attn_bwd_dkdv_hopper"},  # no dQ pass
    "attention_portable_default_config": set(),  # FUSEFORMER_AUTOTUNE=0: no autotuner
    "attention_hopper_default_config": set(),
    "attention_portable_dropout": {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"},
    # Their keys were tuned by the attention_portable / attention_hopper_host cases before.
    "attention_portable_grads_into": set(),
    "attention_hopper_grads_into": set(),
    "varlen_portable": {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"},
    "varlen_hopper": {"_attn_fwd_hopper", "_attn_bwd_dkdv_hopper", "_attn_bwd_dq_hopper"},
}
# The launches each case's last run makes through launch plans (kernels/launch.py's Bound):
# every one of add+LN (forward, backward, the partial sums), of Linear+GELU (the portable
# forward and dgelu, or the TMA forward) and of the attention, portable and Hopper, varlen
# too (forward; the Hopper and atomic backwards' preprocess; dQ unless atomic, then dK/dV: the
# portable dQ pass makes delta itself), host descriptors or not (a plan of a launch through
# host descriptors makes new ones over each call's tensors: DescriptorBound).
PLAN_LAUNCHES = {
    "linear_gelu_portable": 2, "linear_gelu_tma": 1, "add_layer_norm": 3, "cross_entropy": 8,
    "attention_portable": 3, "attention_portable_atomic_dq": 3, "attention_portable_default_config": 3,
    "attention_portable_dropout": 3, "attention_hopper": 3, "attention_hopper_host": 3,
    "attention_hopper_auto_descriptors": 3,
    "attention_hopper_atomic_dq": 3, "attention_hopper_default_config": 3, "varlen_portable": 3, "varlen_hopper": 3,
    # A forward and three backwards (new gradients, into views, new again) a run, 7 launches
    # (the dQ pass and the dK/dV pass each): the second run (fast path) re-launches all six
    # backward launches through the plans the first run bound, the third all seven. A plan keyed
    # without the gradients' strides would hand the views' call the new tensors' strides:
    # same_launch_args catches it.
    "attention_portable_grads_into": 13, "attention_hopper_grads_into": 13,
    # The one-kernel backward: a forward and one backward launch a run; grads-into as above with
    # one backward launch each: 3 + 4.
    "attention_portable_fused_dq": 2, "attention_portable_fused_dq_grads_into": 7,
}


def _run(*args, threads=None):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if threads is not None:
        env["FUSEFORMER_COMPILE_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, {row["case"]: row for row in rows}


def test_every_launcher_through_tritons_jit_path_offline():
    """Every case gets through Triton's JIT path (an attention autotuner's pruning once
    crashed there, on every GPU launch, unseen by the interpreter tests) and reaches the
    kernels it names; the autotuner compiles nothing precompile.py did not compile already;
    the fast launch and the launch plans give every launcher what Triton's path gives it; the
    fast launch takes every launch (host tensor descriptors included), and the plans re-launch
    what PLAN_LAUNCHES says."""
    proc, rows = _run("--configs", "2", threads=2)
    assert set(rows) == set(TUNED), proc.stdout + proc.stderr[-3000:]
    for name, row in rows.items():
        assert row["error"] is None, f"{name}:\n{row['error']}"
        assert set(row["tuned"]) >= TUNED[name], name
        assert row["autotuner"] == 0, f"{name}: the autotuner compiled {row['autotuner']} configs itself"
        if TUNED[name]:
            assert row["precompiled"] == row["precompile"] >= 2 * len(TUNED[name]), name
        assert row["same_launch_args"] and row["launches"] >= 1, name
        assert row["plan_launches"] == PLAN_LAUNCHES[name], name
        assert row["fast_launches"] == row["launches"], name
    # The grads-into cases reach no autotuner (their keys were tuned before): their kernels.
    assert rows["attention_portable_grads_into"]["kernels"] == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"]
    assert rows["attention_hopper_grads_into"]["kernels"] == [
        "_attn_bwd_dkdv_hopper", "_attn_bwd_dq_hopper", "_attn_fwd_hopper"]  # no preprocess: the dQ pass makes delta
    # The one-kernel backward launches neither the preprocess nor a dQ pass.
    for name in ("attention_portable_fused_dq", "attention_portable_fused_dq_grads_into"):
        assert rows[name]["kernels"] == ["_attn_bwd_dkdv", "_attn_fwd"], name
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_without_the_pool_the_autotuner_compiles_each_config():
    """The counting above can tell: with one compile thread precompile.py stands aside and
    Triton's autotuner asks for both configs itself."""
    proc, rows = _run("--configs", "2", "--only", "linear_gelu_portable", threads=1)
    row = rows["linear_gelu_portable"]
    assert row["error"] is None and row["threads"] == 1
    assert row["precompiled"] == row["precompile"] == 0 and row["autotuner"] == 2
    assert proc.returncode == 1  # an extra compile by the autotuner is what the check reports


def test_threads_setting():
    before = P.set_threads(3)
    try:
        assert P.THREADS == 3 and P.set_threads(before) == 3
        with pytest.raises(ValueError, match="threads must be >= 0"):
            P.set_threads(-1)
    finally:
        P.set_threads(before)


@pytest.mark.parametrize("value,expected", [("4", 4), (" 0 ", 0), ("", None), ("x", "must be an integer"),
                                            ("-2", "must be >= 0")])
def test_threads_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("FUSEFORMER_COMPILE_THREADS", value)
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"FUSEFORMER_COMPILE_THREADS {expected}"):
            P._threads_from_env()
    elif expected is None:  # unset: the CPUs this process may use, at most 16
        assert 1 <= P._threads_from_env() <= 16
    else:
        assert P._threads_from_env() == expected


def test_nothing_to_do_under_the_interpreter():
    """The interpreter runs no compile: precompile leaves the (single-config) autotuners alone."""
    from fuseformer.kernels import attention_launchers as A

    assert P.precompile(A.attn_fwd_tuned, (1,), (), {}) == 0


def test_every_autotuner_of_ours_times_configs_with_the_short_bench(monkeypatch):
    """Every autotuned kernel is made by precompile.autotune: its timing is tuning_bench, which
    hands the active driver's benchmarker TUNE_WARMUP_MS and TUNE_REP_MS (Triton's do_bench
    defaults, 25 and 100 ms, would spend ~0.13 s on each config)."""
    import importlib

    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    modules = [importlib.import_module(f"fuseformer.kernels.{name}")
               for name in ("attention_kernels", "attention_bwd_kernels", "attention_hopper", "attention_hopper_bwd",
                            "linear_gelu_kernels")]
    tuners = {id(v): v for m in modules for v in vars(m).values() if isinstance(v, Autotuner)}
    names = {t.base_fn.__name__ for t in tuners.values()}
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd_hopper", "_attn_bwd_dkdv_hopper",
            "_attn_bwd_dq_hopper", "_linear_gelu_fwd", "_linear_gelu_tma"} <= names, names
    for tuner in tuners.values():
        assert tuner._do_bench is P.tuning_bench, tuner.base_fn.__name__

    asked = {}

    class Driver:
        def get_benchmarker(self):
            def bench(fn, **kwargs):
                fn()
                asked.update(kwargs)
                return [0.5, 0.4, 0.6]
            return bench

    monkeypatch.setattr(driver, "_active", Driver())
    calls = []
    assert P.tuning_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.5, 0.4, 0.6] and calls == [1]
    assert asked == {"warmup": P.TUNE_WARMUP_MS, "rep": P.TUNE_REP_MS, "quantiles": (0.5, 0.2, 0.8)}
