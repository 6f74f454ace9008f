"""compile_ahead, the plugin that starts the compile checks' builds at collection: run on a
small suite of its own in a pytest subprocess (it changes the run's order and starts threads,
which this session's own run must not see)."""
import os
import pathlib
import re
import subprocess
import sys

TESTS = pathlib.Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import compile_ahead

def pytest_configure(config):
    config.pluginmanager.register(compile_ahead, "fuseformer-compile-ahead")
"""

# Named to sort first: without the plugin it would run before test_b_plain.py.
AHEAD = """
import os, pathlib, threading
import pytest
import compile_ahead

@compile_ahead.build
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    (out / "file").write_text("x")
    return threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), out

@compile_ahead.build
def no_compiler(tmp_path_factory):
    pytest.skip("no compiler here")

@compile_ahead.build
def deselected(tmp_path_factory):
    pathlib.Path(os.environ["MARKER"]).write_text("started")

def test_built(built):
    thread, nice, out = built
    pathlib.Path(os.environ["REPORT"]).write_text(f"{thread} {nice}")
    assert (out / "file").read_text() == "x"

def test_skipped(no_compiler):
    raise AssertionError("the build's skip did not reach the test")

def test_never_selected(deselected):
    pass
"""

PLAIN = """
def test_plain():
    pass
"""


def _run(tmp_path, **env):
    for name, text in (("conftest.py", CONFTEST), ("test_a_ahead.py", AHEAD), ("test_b_plain.py", PLAIN)):
        (tmp_path / name).write_text(text)
    marker, report = tmp_path / "marker", tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-k", "not never",
                             str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "MARKER": str(marker), "REPORT": str(report), **env})
    assert result.returncode == 0, result.stdout + result.stderr
    order = re.findall(r"::(test_\w+) (?:PASSED|SKIPPED)", result.stdout)
    return result.stdout, order, report.read_text().split(), marker.exists()


def test_builds_start_ahead_at_low_priority_and_their_modules_run_last(tmp_path):
    out, order, (thread, nice), marker = _run(tmp_path)
    assert order == ["test_plain", "test_built", "test_skipped"], out
    assert thread.startswith("compile-ahead") and nice == "19", out
    assert re.search(r"SKIPPED.*no compiler here", out), out
    assert not marker, "a build whose tests were all deselected was started"


def test_switched_off_the_fixtures_build_in_the_test_thread(tmp_path):
    out, order, (thread, nice), _ = _run(tmp_path, FUSEFORMER_COMPILE_AHEAD="0")
    assert order == ["test_built", "test_skipped", "test_plain"], out
    assert thread == "MainThread" and nice == str(os.getpriority(os.PRIO_PROCESS, 0)), out


def test_compilers_started_ahead_get_the_environment_as_collection_left_it(monkeypatch):
    """A test's monkeypatch.setenv must not reach a compiler the builds' thread starts meanwhile."""
    import concurrent.futures

    import compile_ahead

    monkeypatch.setattr(compile_ahead, "_environ", {"AT_COLLECTION": "1"})
    monkeypatch.setenv("SET_BY_A_TEST", "1")
    with concurrent.futures.ThreadPoolExecutor(1, initializer=compile_ahead._runner_thread_init) as runner:
        assert runner.submit(compile_ahead.environ).result() == {"AT_COLLECTION": "1"}
    assert compile_ahead.environ()["SET_BY_A_TEST"] == "1"  # elsewhere: os.environ as it is
