"""bench/triton_cache.py: kernels compiled here for sm_90 and carried in an archive are the
ones a later process finds in Triton's cache, also where its Triton build names cache entries
differently (another Python version's wheel), and never across Triton releases.

Each step runs in a subprocess with the stand-in driver (bench/offline.py) and no interpreter,
on one benchmark case whose three add+LN kernels compile in seconds.
"""
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
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


def test_a_gpu_sessions_compile_log_names_what_the_archive_lacks_and_how_it_differs(archive, tmp_path):
    """FUSEFORMER_TRITON_COMPILE_LOG in a process of another build (as on the GPU machine)
    that runs CASE, which the archive holds, and another add+LN width, which it does not:
    `misses` lists the second's kernels alone, each set against the archive's entry of the
    same kernel, with the key's parts that differ."""
    from fuseformer.bench import triton_cache as tc

    with tarfile.open(archive) as tar:
        entries = json.loads(tar.extractfile("manifest.json").read())["entries"]
    kernels = {"_add_ln_fwd", "_add_ln_fwd_rows"}  # the row kernel; the rows one, plain and persistent
    assert sorted(e["detail"]["kernel"] for e in entries.values()) == sorted([*kernels, "_add_ln_fwd_rows"])
    log = tmp_path / "compiles.jsonl"
    other = "add_ln_fwd_16384x2048"
    args = ["build", "--child", "--suite", "ops", "--filter", f"{CASE},{other}", "--out", str(tmp_path / "x.tar.xz")]
    _python(OTHER_BUILD + f"import os, sys; os.environ[{tc.COMPILE_LOG_ENV!r}] = {str(log)!r}; "
            "from fuseformer.bench.triton_cache import log_compiles_from_env, main; "
            f"assert log_compiles_from_env(); sys.exit(main({args!r}))", tmp_path / "cache")
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    held = {e["key"] for e in entries.values()}
    new = {c["key"] for c in logged} - held
    assert held <= {c["key"] for c in logged} and new, logged  # CASE's three found under this build too
    said = tc.misses(log, archive)
    assert said[0].startswith(f"{len(logged)} compiles logged, {len(new)} distinct keys not in"), said
    counts = [int(line.split(" x ")[0]) for line in said[1:] if " x _add_ln_fwd" in line]
    assert sum(counts) == len(new), said
    # The same code, compiler back end and environment: what differs is the call's (N = 2048,
    # not 768: its block, and the warps the launcher picks for it).
    differing = {line.split(":")[0].strip() for line in said if line.startswith("    ") and ": here" in line}
    assert "constants" in differing and not differing & {"source", "backend", "env"}, said


def _rewritten(archive, path, edit):
    """A copy of `archive` with edit(manifest) applied to its manifest."""
    with tarfile.open(archive) as src, tarfile.open(path, "w:xz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "manifest.json":
                manifest = json.loads(data)
                edit(manifest)
                data = json.dumps(manifest).encode()
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return path


def test_unpack_names_the_kernel_files_edited_since_the_build(archive, tmp_path):
    """Triton keys a kernel by its source and first line number, so an edit above a kernel
    (an import line) moves it to a key the archive lacks: unpack names such files."""
    from fuseformer.bench import triton_cache as tc

    said = tc.unpack(archive, tmp_path / "as_built")
    assert said.endswith("; kernel files as built"), said
    stale = _rewritten(archive, tmp_path / "stale.tar.xz",
                       lambda m: m["sources"].update({"add_layer_norm_kernels.py": "0" * 64}))
    said = tc.unpack(stale, tmp_path / "stale")
    assert said.endswith("kernel files changed since the build (their kernels compile here): "
                         "add_layer_norm_kernels.py"), said


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


# A minimal extension module standing in for a Triton launcher's C source (the real ones come
# from triton 3.6's per-signature launchers; the triton these tests run on has none).
MINI_MODULE = r"""
#include <Python.h>
static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "fuseformer_mini", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_fuseformer_mini(void) { return PyModule_Create(&def); }
"""


def test_c_modules_are_built_by_the_given_python_carried_and_placed_for_its_suffix(tmp_path):
    """build_launchers has the given Python's Triton build each module into a cache folder
    (here this Python, on a minimal module): linked against a stand-in libcuda.so.1 that it
    still names as needed, so the GPU machine's real one is loaded with it. pack carries the
    files, unpack places them under the same entry names for a Python of the same extension
    suffix only."""
    from fuseformer.bench import triton_cache as tc

    if importlib.util.find_spec("triton.backends.nvidia") is None or not shutil.which("gcc"):
        pytest.skip("needs triton's NVIDIA backend and gcc")
    staging = tmp_path / "staging"
    staging.mkdir()
    built = tc.build_launchers({("fuseformer_mini", MINI_MODULE): None}, sys.executable, staging)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert built["suffix"] == suffix and len(built["files"]) == 1, built
    assert built["files"][0].endswith("/fuseformer_mini" + suffix), built
    needed = subprocess.run(["readelf", "-d", str(staging / built["files"][0])], capture_output=True, text=True).stdout
    assert "[libcuda.so.1]" in needed, needed
    archive = tmp_path / "a.tar.xz"
    tc.pack(tmp_path, {}, archive, (staging, built))
    said = tc.unpack(archive, tmp_path / "placed")
    assert "1 C modules" in said, said
    assert (tmp_path / "placed" / built["files"][0]).read_bytes() == (staging / built["files"][0]).read_bytes()
    other = _rewritten(archive, tmp_path / "b.tar.xz",  # another Python's modules
                       lambda m: m["launchers"].update(suffix=".cpython-399-x86_64-linux-gnu.so"))
    said = tc.unpack(other, tmp_path / "not_placed")
    assert "not placed" in said and not (tmp_path / "not_placed" / built["files"][0]).exists(), said


def test_a_compile_log_that_cannot_be_written_warns_once_and_never_fails_a_compile(tmp_path, monkeypatch):
    import types
    import warnings

    import triton.compiler.compiler as C
    from triton.runtime.cache import triton_key

    from fuseformer.bench import triton_cache as tc

    keys = []

    def original(src, backend, options, env_vars=None):
        keys.append(src.name)
        return f"{triton_key()}-{src.name}"

    monkeypatch.setattr(C, "get_cache_key", original)
    monkeypatch.setenv(tc.COMPILE_LOG_ENV, str(tmp_path / "no such folder" / "log.jsonl"))
    assert tc.log_compiles_from_env()
    src = types.SimpleNamespace(name="_kernel", fn=None, signature={}, constants={}, attrs={})
    backend = types.SimpleNamespace(hash=lambda: "backend")
    options = types.SimpleNamespace(hash=lambda: "options", num_warps=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert C.get_cache_key(src, backend, options, env_vars={}) == f"{triton_key()}-_kernel"
    assert keys == ["_kernel"] * 3
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "compiles are no longer logged" in said[0], said
    # Written where it can be: one JSON line a compile, with its key's parts.
    monkeypatch.setattr(C, "get_cache_key", original)
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(tc.COMPILE_LOG_ENV, str(log))
    assert tc.log_compiles_from_env()
    C.get_cache_key(src, backend, options, env_vars={"TRITON_X": "1"})
    line = json.loads(log.read_text())
    assert line["kernel"] == "_kernel" and line["key"] == "_kernel" and line["options"] == {"num_warps": 4}
    assert line["env"] == "[('TRITON_X', '1')]"
