"""bench/gpu_session.sh's quiesce, run here on stand-in processes: before the stages that time
host work it stops what cut-off test stages left running (a pytest, an xdist worker), never a
process the script descends from, and records the load in load.txt."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"


def _function(name: str) -> str:
    """The shell function `name` as gpu_session.sh defines it (from `name() {` to its `}`)."""
    found = re.search(rf"^{name}\(\) \{{\n.*?^\}}\n", SCRIPT.read_text(), re.S | re.M)
    assert found, f"{name} not found in {SCRIPT}"
    return found.group(0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("pgrep") is None,
                    reason="needs Linux's /proc and pgrep")
@pytest.mark.skipif("PYTEST_XDIST_WORKER" in os.environ,
                    reason="under pytest-xdist quiesce would stop this run's other workers, as it is built to")
def test_quiesce_stops_leftover_test_processes_but_not_its_ancestors(tmp_path):
    # This pytest process is an ancestor of the shell below, and its command line matches the
    # pattern quiesce looks for when run as `python3 -m pytest`: it must survive either way.
    script = tmp_path / "run.sh"
    script.write_text(
        f"OUT={tmp_path}\n" + _function("quiesce") +
        '(exec -a "python3 -m pytest -m gpu tests/" sleep 120) &\n'
        "leftover=$!\n"
        f'"{sys.executable}" -c "import time, sys; sys.stdin.readline; time.sleep(120)" </dev/null &\n'
        "worker=$!\n"
        "sleep 0.5\n"
        "quiesce bench-models\n"
        "sleep 0.5\n"
        'kill -0 "$leftover" 2>/dev/null && echo "leftover alive" || echo "leftover stopped"\n'
        'kill -0 "$worker" 2>/dev/null && echo "worker alive" || echo "worker stopped"\n'
    )
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "leftover stopped" in result.stdout and "worker stopped" in result.stdout, result.stdout
    load = (tmp_path / "load.txt").read_text()
    stopped = re.search(r"# before bench-models: stopping leftovers: ([\d ]+)\n", load)
    assert stopped, load
    # quiesce spared its ancestors: this pytest process matches its pattern and is not listed.
    assert str(os.getpid()) not in stopped.group(1).split(), load
    assert "python3 -m pytest -m gpu tests/" in load and "sys.stdin.readline" in load
    assert re.search(r"# before bench-models at \+\d+s: loadavg [\d.]+ ", load), load
