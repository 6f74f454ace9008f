"""Compile the benchmark's Triton kernels here, for sm_90, and carry them to a lent GPU.

Why: a lent H100/H200 has 15 minutes in all. On the H100 run (bench/results/h100/README.md)
the ops suite's first 21 cases took 230 s, less than 10 s of it timing: the rest was first
calls, mostly Triton compiling every autotune config of every kernel. bench/prewarm.py moves
those compiles onto the machine's 16 cores, but they still spend lent minutes. They need no
GPU at all: bench/offline.py's stand-in driver runs Triton's whole compile for sm_90 on a CPU.

    build:   python -m fuseformer.bench.triton_cache build [--suite ops,models,overhead,tests]
                 [--filter F] [--out .tritoncache/sm90.tar.xz] [--launcher-python PY]
    unpack:  python -m fuseformer.bench.triton_cache unpack ARCHIVE DIR    (on the GPU machine,
                 then TRITON_CACHE_DIR=DIR; bench/gpu_session.sh does both)

`build` runs, under the stand-in driver and on CPU tensors, what the GPU session will run of
our Triton kernels, with its shapes and dtypes, so that the specializations are the ones asked
for there: every fuseformer Triton implementation of the benchmark's cases (forward, and
backward for the training cases), the `overhead` group's calls, and the session's tests of the
Triton kernels and models. Each autotuned kernel's first call compiles all its configs
(kernels/precompile.py). The Triton cache is packed with each kernel's metadata and cubin
only: the intermediate IRs are nearly 90% of its size, and nothing on the launch path reads
them.

Triton names a cache entry by a hash of its whole key: the compiler build (`triton_key()`: the
hash of Triton's Python files and its libtriton binary), the kernel source and specialization,
the backend (ptxas version, arch), the options and the cache-relevant environment. The binary
differs between Python versions' wheels of one Triton release, and this machine's Python is
not the GPU machines' (3.12), so the archive keeps each entry's key without the compiler part,
and `unpack` re-keys the entries with the installed Triton's own `triton_key()`. The two wheels
compile alike: the 345 kernels of an ops-suite build made with triton 3.6.0's Python 3.11
wheel, recompiled from their TTIR by its Python 3.12 wheel, gave the same cubins byte for byte
(2026-11-27, on this CPU machine). `unpack` refuses an archive made by another Triton release;
anything else that differs (ptxas, options, source) leaves the entry under a name no lookup
asks for, so a kernel is compiled there as before, never loaded wrongly. bench/gpu_session.sh
lists, by kernel, what its run compiled all the same. That key also holds each kernel's first
line number: any edit above a kernel in its file moves it, so rebuild after editing kernel
files (`unpack` names the ones edited since the build).

Triton 3.6 also builds, with the C compiler, a launcher module per kernel signature and its
driver utilities module, on first use in a process with an empty cache (~0.4 s each; the
benchmark's ops, models and overhead calls need about 30). With --launcher-python (a Python of
the GPU machines' version, 3.12, with the same Triton release installed: no torch needed),
`build` has that Python's Triton build them too, from the very sources the kernels run here
would have it generate on a GPU, and carries them: Triton names them by a hash of the source
and the platform, so the GPU machine's Triton finds them where it would have put its own.
They are linked against a stand-in libcuda.so.1 (still naming libcuda.so.1 as needed, so the
real one is loaded there); `unpack` places them only for a Python of the same extension suffix.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

SUITES = ("ops", "models", "overhead", "tests")
MANIFEST = "manifest.json"
DEFAULT_ARCHIVE = Path(".tritoncache") / "sm90.tar.xz"


# ----------------------------------------------------------------------------- cache keys


def _entry_name(key: str) -> str:
    """The folder Triton's FileCacheManager keeps the kernel of cache key `key` in."""
    from triton.runtime.cache import _base32

    return _base32(hashlib.sha256(key.encode("utf-8")).hexdigest())


def describe_key(src, backend, options, env_vars) -> dict:
    """The parts of a compile's cache key (Triton's get_cache_key arguments), readable: what
    tells two specializations of one kernel apart when an archive misses one on a GPU."""
    opts = getattr(options, "__dict__", {})
    fn = getattr(src, "fn", None)
    names = getattr(fn, "arg_names", [])

    def name(k):  # a constant's key: (argument index,) for a kernel argument, by name here
        return names[k[0]] if isinstance(k, tuple) and len(k) == 1 and k[0] < len(names) else str(k)

    return {
        "kernel": getattr(src, "name", "?"),
        "source": getattr(fn, "cache_key", "?")[:16],  # its code and first line
        "signature": dict(getattr(src, "signature", {})),  # argument name -> type or "constexpr"
        "constants": {name(k): getattr(v, "cache_key", str(v)) for k, v in getattr(src, "constants", {}).items()},
        "attrs": str(getattr(src, "attrs", "")),
        "options": {k: opts[k] for k in ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                                         "sanitize_overflow", "debug", "launch_pdl") if k in opts},
        "options_hash": options.hash()[:16] if hasattr(options, "hash") else "?",
        "backend": hashlib.sha256(backend.hash().encode()).hexdigest()[:16] if hasattr(backend, "hash") else "?",
        "env": str(sorted(env_vars.items())) if env_vars else "",
    }


@contextlib.contextmanager
def recorded_keys(details: dict | None = None):
    """Within: every compile's cache key, without the compiler build's part, by entry name;
    and into `details`, describe_key's account of each, by entry name."""
    import triton.compiler.compiler as C
    from triton.runtime.cache import triton_key

    build = triton_key() + "-"
    keys: dict[str, str] = {}
    original = C.get_cache_key

    def get_cache_key(src, backend, options, env_vars, **kwargs):
        key = original(src, backend, options, env_vars=env_vars, **kwargs)
        if not key.startswith(build):  # not an assert: the tests suite runs under python -O
            raise RuntimeError("Triton's cache key no longer starts with triton_key()")
        entry = _entry_name(key)
        keys[entry] = key[len(build):]
        if details is not None:
            details[entry] = describe_key(src, backend, options, env_vars)
        return key

    C.get_cache_key = get_cache_key
    try:
        yield keys
    finally:
        C.get_cache_key = original


# FUSEFORMER_TRITON_COMPILE_LOG=PATH: every process of a GPU session (tests/conftest.py, the
# bench's CLI) appends a line to PATH per Triton compile of ours, with describe_key's parts and
# who asked (the test, the command). The H200 run of 2026-11-28 still compiled 699 kernels
# beside an archive of 1055, the same configs in more specializations than the build had made;
# `python -m fuseformer.bench.triton_cache misses LOG` sets such a log against the archive.
COMPILE_LOG_ENV = "FUSEFORMER_TRITON_COMPILE_LOG"
_log_lock = threading.Lock()


def log_compiles_from_env() -> bool:
    """Install the compile log when FUSEFORMER_TRITON_COMPILE_LOG names a file; once a process."""
    path = os.environ.get(COMPILE_LOG_ENV, "").strip()
    if not path:
        return False
    import triton.compiler.compiler as C
    from triton.runtime.cache import triton_key

    original = C.get_cache_key
    if getattr(original, "_fuseformer_log", None):
        return True
    build = triton_key() + "-"

    failed = []

    def get_cache_key(src, backend, options, env_vars, **kwargs):
        key = original(src, backend, options, env_vars=env_vars, **kwargs)
        name = getattr(src, "name", "")
        if not name.startswith("triton_") and not failed:  # torch.compile's own kernels: not ours to carry
            try:
                line = {"entry": _entry_name(key), "key": key[len(build):] if key.startswith(build) else key,
                        **describe_key(src, backend, options, env_vars), "pid": os.getpid(),
                        "test": os.environ.get("PYTEST_CURRENT_TEST", ""), "argv": sys.argv[:6],
                        "time": round(time.time(), 1)}
                with _log_lock, open(path, "a") as f:
                    f.write(json.dumps(line, default=str) + "\n")
            except Exception as err:  # noqa: BLE001 - a diagnostic log must never fail a compile
                failed.append(err)
                import warnings

                warnings.warn(f"fuseformer: {COMPILE_LOG_ENV}={path}: compiles are no longer logged ({err})",
                              stacklevel=2)
        return key

    get_cache_key._fuseformer_log = True
    C.get_cache_key = get_cache_key
    return True


# ----------------------------------------------------------------------------- C launchers


@contextlib.contextmanager
def recorded_launchers():
    """Within: {(module name, C source): None} of the C modules Triton would build on a GPU for
    every kernel that runs here (its launcher per signature, and its driver utilities); empty
    on a Triton release without them (3.9 launches every kernel through one built-in module)."""
    import triton.backends.nvidia.driver as nvidia

    from .offline import OfflineDriver

    sources: dict = {}
    if not (hasattr(nvidia, "compile_module_from_src") and hasattr(nvidia, "CudaLauncher")):
        yield sources
        return

    class Built:  # what CudaLauncher reads of the module it asked for
        launch = None

    def record(src, name, **_):
        sources[(name, src)] = None
        return Built

    utils = Path(os.path.dirname(nvidia.__file__), "driver.c")
    if utils.is_file():  # what CudaUtils() compiles, once per process
        sources[("cuda_utils", utils.read_text())] = None
    offline_launcher = OfflineDriver.launcher_cls

    def launcher_cls(self, src, metadata):
        nvidia.CudaLauncher(src, metadata)  # generates the launcher's source, as on a GPU
        return offline_launcher(self, src, metadata)

    with mock.patch.object(nvidia, "compile_module_from_src", record), \
            mock.patch.object(nvidia, "library_dirs", lambda: []), \
            mock.patch.object(OfflineDriver, "launcher_cls", launcher_cls):
        yield sources


# Run by the launcher Python: Triton's own compile_module_from_src builds and caches each module
# (its C compiler command, its cache key); loading it afterwards fails here, without libcuda.
_BUILD_LAUNCHERS = """
import json, sys
import triton.backends.nvidia.driver as nvidia
from triton.runtime.build import compile_module_from_src
for name, src in json.load(sys.stdin):
    try:
        compile_module_from_src(src=src, name=name, library_dirs=[sys.argv[1]], include_dirs=nvidia.include_dirs,
                                libraries=nvidia.libraries)
    except ImportError:
        pass
"""


def build_launchers(sources: dict, python: str, staging: Path) -> dict:
    """Build `sources` (recorded_launchers') with `python`'s Triton into the cache folder
    `staging`; returns what pack records of them: that Python's version and extension suffix,
    and the files built (entry/file). Raises if `python` has another Triton release."""
    import triton

    probe = subprocess.run([python, "-c", "import json, sys, sysconfig, triton; print(json.dumps([triton.__version__, "
                            "sys.version.split()[0], sysconfig.get_config_var('EXT_SUFFIX')]))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise RuntimeError(f"--launcher-python {python}: {(probe.stderr.strip().splitlines() or ['failed'])[-1]}")
    version, py_version, suffix = json.loads(probe.stdout)
    if version != triton.__version__:
        raise RuntimeError(f"--launcher-python {python} has triton {version}, the kernels are triton {triton.__version__}'s")
    with tempfile.TemporaryDirectory(prefix="fuseformer_launchers_") as stub:
        # A libcuda.so.1 to link against, and a C compiler that keeps it as a needed library
        # though the stand-in defines nothing (Debian's linker drops unused ones by default).
        subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "/dev/null", "-Wl,-soname,libcuda.so.1", "-o",
                        os.path.join(stub, "libcuda.so.1")], check=True)
        cc = Path(stub, "cc")
        cc.write_text('#!/bin/sh\nexec gcc -Wl,--no-as-needed "$@"\n')
        cc.chmod(0o755)
        env = {**os.environ, "TRITON_CACHE_DIR": str(staging), "CC": str(cc)}
        subprocess.run([python, "-c", _BUILD_LAUNCHERS, stub], input=json.dumps(list(sources)), text=True, env=env,
                       check=True)
    files = sorted(f"{path.parent.name}/{path.name}" for path in staging.glob(f"*/*{suffix}"))
    return {"python": py_version, "suffix": suffix, "files": files}


# ----------------------------------------------------------------------------- build


class Tally:
    """Runs one call each and logs how it ended. A refusal (a case a kernel does not take)
    compiles nothing and is expected; any other exception is an error: `build` reports it and
    exits 1, after packing what did compile."""

    def __init__(self, log=print):
        self.log, self.errors = log, []

    def run(self, label: str, call) -> None:
        from fuseformer.kernels import BackendUnsupportedError

        from .core import Refused

        started = time.perf_counter()
        try:
            call()
            status = "ok"
        except (BackendUnsupportedError, Refused) as err:
            status = f"refused: {str(err).strip().splitlines()[0]}"
        except Exception as err:  # noqa: BLE001 - reported, and the build's exit status
            status = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            self.errors.append(f"{label}: {status}")
        self.log(f"  {label}: {status} ({time.perf_counter() - started:.1f} s)")


def _gpu_dtype(case):
    """The dtype a GPU run gives the case."""
    import torch

    from .runner import RunConfig

    return RunConfig(torch.device("cuda")).dtype_for(case)


def run_op_case(case, tally: Tally) -> None:
    """Every fuseformer Triton implementation of an ops-suite case, once, forward (and backward
    for a forward+backward case), on CPU tensors of its GPU shapes and dtype."""
    import torch

    inputs = case.make_inputs(torch.device("cpu"), _gpu_dtype(case), torch.Generator().manual_seed(1234))
    for impl in case.impls:
        if impl.name != "fuseformer-triton" and not impl.name.startswith("fuseformer-triton-"):
            continue
        # impl.available() is not asked: it refuses the Hopper variants without a GPU, which
        # pretend_sm90 admits for exactly this.

        def call(impl=impl):
            with impl.context() if impl.context else contextlib.nullcontext():
                case._wrap(impl.fn)(inputs)

        tally.run(f"{case.name} {impl.name}", call)


def run_model_case(case, tally: Tally) -> None:
    """The fused model of a models-suite case, one forward, and a backward for a training
    case, in the case's GPU dtype, nn.Linear an empty stand-in (bench/offline.py's
    empty_linears: its GEMM is cuBLAS's, not ours). Backend triton: what `auto`
    (the bench's `fuseformer-fused`) picks for every op of these models on an H100, where on
    a CPU it would pick torch."""
    import torch
    import transformers

    from fuseformer import models

    from .model_cases import FAMILIES, hf_config, mlm_rows_bound
    from .offline import empty_linears

    ours_name, hf_name = FAMILIES[(case.family, case.task)]
    hf = getattr(transformers, hf_name)(hf_config(case.family, case.size))
    train = case.task == "train"
    hf.train(train)
    inputs = case._inputs(torch.device("cpu"), hf.config.vocab_size)
    variants = [{}]
    if case.family == "bert" and case.pad and not train:
        variants.append({"unpad": True})  # the bench's fuseformer-fused-unpad
    bound = mlm_rows_bound(case, inputs)
    if bound:
        variants.append({"max_predictions_per_seq": bound})  # fuseformer-fused-mlm-rows
    for kwargs in variants:

        def call(kwargs=kwargs):
            model = getattr(models, ours_name).from_hf(hf, backend="triton", **kwargs).to(dtype=_gpu_dtype(case))
            with empty_linears(), torch.set_grad_enabled(train):
                out = case._main_output(model(**inputs))
                if train:
                    out.float().sum().backward()

        tally.run(f"{case.name} {kwargs or ''}".strip(), call)


def run_overhead(tally: Tally) -> None:
    """The `overhead` group's calls (bench/overhead.py's run_group on a GPU): each op's tiny
    float16 case forward and forward+backward, and the BERT-base B1 L16 forward and training
    step, attention on its default configs as there."""
    import torch

    from . import overhead
    from .offline import empty_linears

    cpu, dtype = torch.device("cpu"), torch.float16
    with overhead.attention_default_configs():
        for grad in (False, True):
            for case in overhead.op_cases(cpu, dtype, "triton", grad):
                tally.run(f"overhead {case.name}", case.ours)
        model, forward = overhead._bert_b1_l16(cpu, dtype)
        model.set_backend("triton")

        def bert():
            with empty_linears(), torch.inference_mode():
                forward()

        tally.run("overhead bert_base_forward", bert)

        def bert_train():  # measure_bert_train_step's step
            model.train()
            with empty_linears():
                forward().last_hidden_state.float().sum().backward()

        tally.run("overhead bert_base_train_step", bert_train)


# What bench/gpu_session.sh's `tests` stage runs of the Triton kernels and models: its
# test_compile.py and test_eager_path.py whole (the H200 run of 2026-11-28 compiled 50 kernels
# of ours while those two ran, and this list lacked the first), then the gpu-marked tests but
# csrc/'s.
TEST_RUNS = (["tests/test_compile.py", "tests/test_eager_path.py"],
             ["-m", "gpu", "tests", "--ignore=tests/test_cuda_backend.py", "--ignore=tests/test_cuda_gemm.py"])


def run_tests(tally: Tally) -> None:
    """The GPU session's tests of our kernels and models, here, on CPU tensors (conftest.py's
    FUSEFORMER_OFFLINE_SM90: no interpreter, nothing skipped), so that their kernels compile as
    there. No kernel runs, so their checks cannot hold: the build runs these under `python -O`
    and pytest's --assert=plain, where every assert is gone, and with torch.testing's
    assert_close a no-op, so that a test goes on from its forward to its backward. A test that
    fails all the same (a CUDA-only call, say) is listed with the last line of its error, to
    be read, not counted as the build's error: only a run that could not collect or start is
    one."""
    import pytest

    class Failures:
        def pytest_runtest_logreport(self, report):
            if report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                said = crash.message.splitlines()[0] if crash else "failed"
                tally.log(f"\n    {report.nodeid} ({report.when}): {said}")

    if sys.flags.optimize == 0:
        raise RuntimeError("the tests suite needs `python -O` (build starts its child so)")
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "conftest.py").is_file():
        raise RuntimeError(f"no tests/ beside {Path(__file__).parent}: a source checkout is needed")
    os.environ["FUSEFORMER_OFFLINE_SM90"] = "1"
    for args in TEST_RUNS:

        def call(args=args):
            # Patched before collection, so that a module importing the name binds the no-op.
            with contextlib.chdir(root), mock.patch("torch.testing.assert_close", lambda *a, **k: None):
                code = pytest.main(["-q", "-p", "no:cacheprovider", "--tb=no", "--assert=plain", *args],
                                   plugins=[Failures()])
            if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
                raise RuntimeError(f"pytest {' '.join(args)} ended with {code!r}")

        tally.run("pytest " + " ".join(args), call)


def harvest(suites: list[str], filter_text: str | None, tally: Tally,
            details: dict | None = None) -> tuple[dict[str, str], dict]:
    """Run the chosen cases' Triton implementations in this process (which must have no
    Triton interpreter and a fresh TRITON_CACHE_DIR); return the compiles' keys by entry, and
    the C modules Triton would build for them on a GPU (recorded_launchers). `details` gets
    describe_key's account of each entry."""
    from .cli import _collect, _select
    from .offline import Counts, admit_triton, install, pretend_sm90

    install()
    pretend_sm90()
    admit_triton()
    counts = Counts()
    counts.install()
    # One --filter over the cases of both suites, as `fuseformer bench --suite all` takes it:
    # each name need only match in one of them.
    cases = [c for suite in ("ops", "models") if suite in suites for c in _collect(suite, "cuda")]
    cases = _select(cases, filter_text or "*", False) if cases else []
    with recorded_keys(details) as keys, recorded_launchers() as launchers:
        tally.log(f"{len(cases)} cases")
        for case in cases:
            (run_model_case if case.suite == "models" else run_op_case)(case, tally)
        if "overhead" in suites:
            run_overhead(tally)
        if "tests" in suites:
            run_tests(tally)
    tally.log(f"compiles asked: {counts.by} (precompiled configs {counts.precompiled}); cache entries {len(keys)}; "
              f"C modules a GPU would build {len(launchers)}")
    return keys, launchers


def pack(cache_dir: Path, keys: dict[str, str], out: Path, launchers: tuple[Path, dict] | None = None,
         details: dict | None = None) -> dict:
    """A tar.xz of the entries in `keys`: metadata, binary and the key's tail of each (xz:
    half of gzip's size on cubins, which counts against the device tool's 64 MiB), with
    describe_key's account of the key where `details` has it; and with `launchers`
    (build_launchers' cache folder and account) the C modules it built."""
    import triton

    from .envinfo import _git

    entries = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        for name, rest in sorted(keys.items()):
            folder = cache_dir / name
            groups = list(folder.glob("__grp__*.json"))
            if len(groups) != 1:
                continue  # a compile that failed, or a helper entry without a group
            children = json.loads(groups[0].read_text())["child_paths"]
            kept = {c: Path(p).name for c, p in children.items() if c.endswith((".json", ".cubin"))}
            if len(kept) != 2:
                continue
            for child in kept.values():
                tar.add(folder / child, arcname=f"{name}/{child}")
            entries[name] = {"key": rest, "files": kept}
            if details and name in details:
                entries[name]["detail"] = details[name]
        manifest = {"triton": triton.__version__, "python": sys.version.split()[0],
                    "commit": _git("rev-parse", "--short", "HEAD"),
                    "made": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "entries": entries,
                    "sources": kernel_sources()}
        if launchers is not None:
            staging, manifest["launchers"] = launchers
            for file in manifest["launchers"]["files"]:
                tar.add(staging / file, arcname=f"launchers/{file}")
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return manifest


def kernel_sources() -> dict[str, str]:
    """The sha256 of each file of the installed fuseformer.kernels that defines Triton kernels.
    Triton's cache key of a kernel holds its source and the number of its first line, so an
    edit anywhere above a kernel in its file (an import line) moves it to another key too: an
    archive built before the edit misses it."""
    try:
        spec = importlib.util.find_spec("fuseformer.kernels")
    except ModuleNotFoundError:  # not installed in this Python
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(list(spec.submodule_search_locations)[0])
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.py"))}
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items() if b"@triton.jit" in data}


def _manifest(tar: tarfile.TarFile) -> dict:
    return json.loads(tar.extractfile(MANIFEST).read())


_PARTS = ("source", "signature", "constants", "attrs", "options", "options_hash", "backend", "env")


def misses(log: Path, archive: Path) -> list[str]:
    """The compiles in a GPU session's log whose key the archive lacks, grouped by kernel and
    by who asked (the test, else the command); for each, the parts of its key that differ from
    the nearest archive entry of the same kernel (fewest parts differing), with both values."""
    with tarfile.open(archive, "r:xz") as tar:
        entries = _manifest(tar)["entries"]
    held = {e["key"] for e in entries.values()}
    by_kernel: dict[str, list[dict]] = {}
    for e in entries.values():
        if "detail" in e:
            by_kernel.setdefault(e["detail"]["kernel"], []).append(e["detail"])
    lines, seen, groups = [], set(), {}
    compiled = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    for c in compiled:
        if c["key"] in held or c["key"] in seen:
            continue
        seen.add(c["key"])
        # pytest's "nodeid (call)"; else the command line (python -m fuseformer.bench ...).
        who = c["test"].rsplit(" (", 1)[0] if c["test"] else " ".join(c["argv"][:4]) or "?"
        groups.setdefault((c["kernel"], who), []).append(c)
    lines.append(f"{len(compiled)} compiles logged, {len(seen)} distinct keys not in {archive} "
                 f"({len(held)} entries)")
    for (kernel, who), items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"\n{len(items)} x {kernel}, asked by {who}")
        candidates = by_kernel.get(kernel, [])
        for c in items[:3]:
            if not candidates:
                lines.append("    no entry of this kernel in the archive (or it was built without details)")
                break
            near = min(candidates, key=lambda d: sum(d.get(p) != c.get(p) for p in _PARTS))
            for part in _PARTS:
                here, there = c.get(part), near.get(part)
                if here == there:
                    continue
                if isinstance(here, dict) and isinstance(there, dict):  # the differing names only
                    names = sorted(k for k in here.keys() | there.keys() if here.get(k) != there.get(k))
                    here, there = {k: here.get(k) for k in names}, {k: there.get(k) for k in names}
                lines.append(f"    {part}: here {here!r}\n    {' ' * len(part)}  archive {there!r}")
            lines.append("    --")
    return lines


def unpack(archive: Path, dest: Path) -> str:
    """Install the archive's entries into the Triton cache folder `dest` under this Triton's
    own keys; return a one-line account of what was done."""
    import sysconfig

    import triton
    from triton.runtime.cache import triton_key

    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        manifest = _manifest(tar)
        if manifest["triton"] != triton.__version__:
            return (f"not unpacked: the archive holds triton {manifest['triton']}'s kernels, this is triton "
                    f"{triton.__version__}")
        build = triton_key()
        placed = 0
        for name, entry in manifest["entries"].items():
            key = f"{build}-{entry['key']}"
            new_hash = hashlib.sha256(key.encode("utf-8")).hexdigest()
            folder = dest / _entry_name(key)
            folder.mkdir(exist_ok=True)
            group = {}
            for child, file in entry["files"].items():
                data = tar.extractfile(f"{name}/{file}").read()
                if child.endswith(".json"):
                    metadata = json.loads(data)
                    metadata["hash"] = new_hash  # what Triton itself writes under this name
                    data = json.dumps(metadata).encode()
                (folder / file).write_bytes(data)
                group[child] = str(folder / file)  # Triton's groups hold absolute paths
            metadata_file = next(c for c in group if c.endswith(".json"))
            (folder / f"__grp__{metadata_file}").write_text(json.dumps({"child_paths": group}))
            placed += 1
        launchers = manifest.get("launchers")
        if launchers is None:
            modules = ""
        elif launchers["suffix"] != sysconfig.get_config_var("EXT_SUFFIX"):
            modules = f"; its C modules not placed (built for Python {launchers['python']})"
        else:
            for file in launchers["files"]:
                (dest / file).parent.mkdir(exist_ok=True)
                (dest / file).write_bytes(tar.extractfile(f"launchers/{file}").read())
            modules = f"; {len(launchers['files'])} C modules (Python {launchers['python']})"
    same = "the same compiler build" if all(n == _entry_name(f"{build}-{e['key']}")
                                             for n, e in manifest["entries"].items()) else "re-keyed for this build"
    built, now = manifest.get("sources") or {}, kernel_sources()
    changed = sorted(name for name in set(built) | set(now) if built.get(name) != now.get(name))
    sources = ("" if not (built and now) else f"; kernel files changed since the build (their kernels compile "
               f"here): {', '.join(changed)}" if changed else "; kernel files as built")
    return (f"{placed} kernels of triton {manifest['triton']} (python {manifest['python']}, commit "
            f"{manifest['commit']}, made {manifest['made']}) into {dest}: {same}{modules}{sources}")


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuseformer.bench.triton_cache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the benchmark's kernels for sm_90 and pack them")
    b.add_argument("--suite", default=",".join(SUITES),
                   help="comma-separated: ops, models (their cases), overhead (the group's calls), tests (the "
                        "GPU session's tests of the Triton kernels and models); default all")
    b.add_argument("--filter", default=None,
                   help="the ops and models cases, as fuseformer bench --filter takes them (default all)")
    b.add_argument("--out", type=Path, default=DEFAULT_ARCHIVE)
    b.add_argument("--launcher-python", default=None,
                   help="a Python of the GPU machines' version with the same triton: it builds Triton's C launcher "
                        "modules for the kernels, carried too (default: none carried)")
    b.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    u = sub.add_parser("unpack", help="install an archive into a Triton cache folder")
    u.add_argument("archive", type=Path)
    u.add_argument("dest", type=Path)
    m = sub.add_parser("misses", help="what a GPU session's compile log (FUSEFORMER_TRITON_COMPILE_LOG) compiled "
                                      "that the archive does not hold, and how it differs from the nearest entry")
    m.add_argument("log", type=Path)
    m.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    args = parser.parse_args(argv)

    if args.command == "unpack":
        print(unpack(args.archive, args.dest))
        return 0
    if args.command == "misses":
        print("\n".join(misses(args.log, args.archive)))
        return 0
    suites = [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = set(suites) - set(SUITES)
    if unknown or not suites:
        parser.error(f"--suite: {', '.join(sorted(unknown)) or 'nothing'} is not among {', '.join(SUITES)}")
    if not args.child:
        # A process of its own: no interpreter (the bench's CLI and our tests turn it on) and
        # an empty cache, so that every entry packed is one this run asked for.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        with tempfile.TemporaryDirectory(prefix="fuseformer_triton_cache_") as cache:
            env["TRITON_CACHE_DIR"] = cache
            given = sys.argv[1:] if argv is None else list(argv)
            optimize = ["-O"] if "tests" in suites else []  # see run_tests
            child = [sys.executable, *optimize, "-m", "fuseformer.bench.triton_cache", *given, "--child"]
            return subprocess.call(child, env=env)
    started = time.perf_counter()
    tally = Tally()
    details: dict = {}
    keys, sources = harvest(suites, args.filter, tally, details)
    with tempfile.TemporaryDirectory(prefix="fuseformer_launchers_") as staging:
        launchers = None
        if args.launcher_python and not sources:
            print("no C modules to build: this Triton launches every kernel through one built-in module")
        elif args.launcher_python:
            try:
                launchers = Path(staging), build_launchers(sources, args.launcher_python, Path(staging))
            except (RuntimeError, subprocess.CalledProcessError) as err:
                tally.errors.append(f"C modules: {err}")
        manifest = pack(Path(os.environ["TRITON_CACHE_DIR"]), keys, args.out, launchers, details)
    modules = f" and {len(manifest['launchers']['files'])} of its C modules" if launchers else ""
    print(f"{len(manifest['entries'])} kernels of triton {manifest['triton']}{modules} packed into {args.out} "
          f"({args.out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.0f} s")
    if tally.errors:
        print(f"{len(tally.errors)} calls failed:\n  " + "\n  ".join(tally.errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
