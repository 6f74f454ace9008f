"""bench/triton_cache.py: kernels compiled here for sm_90 and carried in an archive are the
ones a later process finds in Triton's cache, also where its Triton build names cache entries
differently (another Python version's wheel), and never across Triton releases.

Each step runs in a subprocess with the stand-in driver (bench/offline.py) and no interpreter,
on one benchmark case whose three add+LN kernels compile in seconds.
"""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile

import pytest

CASE = "add_ln_fwd_16384x768"
# Another compiler build, as the GPU machines' Python 3.12 wheel is to this machine's: its
# triton_key() (the hash of Triton's own files) differs, so every cache entry's name does.
OTHER_BUILD = "import triton.runtime.cache as c; c.triton_key = lambda: 'another build of this triton'; "


def _python(code: str, cache_dir=None, status=0):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = str(cache_dir)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _build(out, prefix="", cache_dir=None, status=0):
    """The build of CASE in this process's cache (`cache_dir`), `prefix` run first."""
    args = ["build", "--child", "--suite", "ops", "--filter", CASE, "--out", str(out)]
    return _python(f"{prefix}import sys; from fuseformer.bench.triton_cache import main; sys.exit(main({args!r}))",
                   cache_dir, status)


def _kernels(cache_dir) -> set:
    return {e for e in os.listdir(cache_dir) if any(n.startswith("__grp__") for n in os.listdir(cache_dir / e))}


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    base = tmp_path_factory.mktemp("triton_cache")
    path = base / "sm90.tar.xz"
    (base / "build").mkdir()
    out = _build(path, cache_dir=base / "build")
    assert "fuseformer-triton-persistent: ok" in out, out
    return path


def test_the_archive_holds_each_kernel_s_metadata_and_cubin_only(archive):
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        members = {m.name for m in tar.getmembers()} - {"manifest.json"}
    entries = manifest["entries"]
    assert len(entries) == 3, entries  # the row, rows and persistent forward kernels
    for name, entry in entries.items():
        assert sorted(os.path.splitext(f)[1] for f in entry["files"].values()) == [".cubin", ".json"]
        assert {f"{name}/{f}" for f in entry["files"].values()} <= members
    assert len(members) == 2 * len(entries)


def test_carried_kernels_are_found_under_another_builds_keys(archive, tmp_path):
    cache = tmp_path / "carried"
    said = _python(OTHER_BUILD + f"from fuseformer.bench.triton_cache import unpack; from pathlib import Path; "
                                 f"print(unpack(Path({str(archive)!r}), Path({str(cache)!r})))")
    assert "3 kernels" in said and "re-keyed for this build" in said, said
    carried = set(os.listdir(cache))
    assert len(_kernels(cache)) == 3
    # The same case in a process of that other build: every kernel found, nothing compiled.
    _build(tmp_path / "again.tar.xz", OTHER_BUILD, cache)
    assert set(os.listdir(cache)) == carried
    # Control: the same process over an empty cache compiles its three kernels, so the check
    # above can fail.
    empty = tmp_path / "empty"
    empty.mkdir()
    _build(tmp_path / "control.tar.xz", OTHER_BUILD, empty)
    assert len(_kernels(empty)) == 3


def test_an_archive_of_another_triton_release_is_not_unpacked(archive, tmp_path):
    said = _python("import triton; triton.__version__ = '0.0.1'; from fuseformer.bench.triton_cache import unpack; "
                   f"from pathlib import Path; print(unpack(Path({str(archive)!r}), Path({str(tmp_path / 'c')!r})))")
    assert said.startswith("not unpacked: the archive holds triton"), said
    assert not os.listdir(tmp_path / "c")


def test_a_failing_call_fails_the_build(tmp_path):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("triton has no NVIDIA backend")
    # A bug on the launch path (a NameError in a pruning hook, say) must not pass as a build
    # that merely packed fewer kernels.
    broken = ("import importlib; m = importlib.import_module('fuseformer.kernels.add_layer_norm'); "
              "m._run_forward = lambda *a, **k: undefined_name; ")
    out = _build(tmp_path / "a.tar.xz", broken, tmp_path, status=1)
    assert "3 calls failed" in out and "NameError" in out, out
