"""CI compile check of csrc/ without a GPU: a syntax or type error in the CUDA C++ backend fails
here even on a runner that will never launch a kernel.

- the pure-CUDA kernels (*.cu) compile with nvcc alone for sm_80 and sm_90;
- bindings.cpp parses against torch's headers (when torch ships its c10/cuda headers);
- cublaslt_gelu.cpp parses when the cuBLAS headers it needs are installed.
- the CuTe attention forward and backward (attention_cute.cu, attention_cute_backward.cu, on
  the `nvidia-cutlass` package's headers) compile with -O3 for sm_80 and sm_90a, their SASS
  uses the tensor cores (HMMA) and ptxas reports no register spills: what can be proven of a
  kernel's speed without a GPU.
Each part is skipped, with the reason, where its compiler or headers are absent. Unoptimised
nvcc and -fsyntax-only keep the rest well under a minute of CPU; the -O3 CuTe builds are the
costly part (one to two minutes per file and architecture on one core; as many run at once as
there are CPUs, or FUSEFORMER_NVCC_JOBS).
"""
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# Built on CUTLASS/CuTe: compiled (optimised, then disassembled) by the tests at the end.
CUTE_FILES = ("attention_cute.cu", "attention_cute_backward.cu")
PLAIN_CU_FILES = [name for name in CU_FILES if name not in CUTE_FILES]
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# Every stage still runs (front end, device code generation, ptxas for both archs), unoptimised:
# errors are caught all the same, in a quarter of the time of -O3.
FAST = ["-O0", "-Xcicc", "-O0", "-Xptxas", "-O0"]
TORCH_INCLUDE = pathlib.Path(torch.__file__).resolve().parent / "include"


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def _cuda_include():
    """The toolkit's include folder (nvcc may be a wrapper script outside the toolkit)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = _nvcc()
    if nvcc is not None:
        candidates.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        include = pathlib.Path(home) / "include"
        if (include / "cuda_runtime_api.h").is_file():
            return include
    return None


def _cxx():
    return shutil.which("g++") or shutil.which("c++")


def _run(cmd, timeout=240):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout}\n{result.stderr}"


def test_sources_are_present():
    for name in ("bindings.cpp", "kernels.h", "common.cuh", "attention_common.cuh", "attention_cute.cuh", "cublaslt_gelu.cpp",
                 "cublaslt_gelu.h"):
        assert (CSRC / name).is_file(), name
    assert {"add_layer_norm.cu", "gelu.cu", "attention_forward.cu", "attention_backward.cu", *CUTE_FILES} <= set(CU_FILES)


@pytest.mark.parametrize("name", CU_FILES + ["common.cuh", "attention_common.cuh", "attention_cute.cuh", "kernels.h"])
def test_kernels_do_not_include_torch(name):
    """The .cu side must stay compilable by nvcc alone: no torch, ATen, c10 or pybind headers."""
    text = (CSRC / name).read_text()
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
    bad = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
    assert not bad, f"{name} includes torch-side headers {bad}"


def _nvcc_jobs():
    """How many nvcc may run at once: FUSEFORMER_NVCC_JOBS, or one per usable CPU."""
    jobs = os.environ.get("FUSEFORMER_NVCC_JOBS")
    if jobs:
        return max(1, int(jobs))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _compile_all(commands, timeout):
    """Run {key: (cmd, output file)} at most _nvcc_jobs() at a time (the compiles are
    independent); {key: (returncode, command line, output, output file)}."""
    pending, running, results = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < _nvcc_jobs():
            key, (cmd, path) = pending.pop(0)
            running[key] = (cmd, path, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        key = next(iter(running))
        cmd, path, proc = running.pop(key)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = f"timed out after {timeout} s\n" + proc.communicate()[0]
        results[key] = (proc.returncode, " ".join(map(str, cmd)), output, path)
    return results


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every .cu (one nvcc per file, both gencodes): the wall time is that of the
    slowest one where cores are free."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    commands = {}
    for name in PLAIN_CU_FILES:
        obj = out / (name + ".o")
        commands[name] = ([nvcc, "-std=c++17", *FAST, *GENCODE, "-c", str(CSRC / name), "-o", str(obj)], obj)
    return _compile_all(commands, timeout=300)


@pytest.mark.parametrize("name", PLAIN_CU_FILES)
def test_cu_compiles_for_sm80_and_sm90(nvcc_results, name):
    returncode, cmd, output, obj = nvcc_results[name]
    assert returncode == 0, f"{cmd}\n{output}"
    assert obj.is_file() and obj.stat().st_size > 0


def _torch_cuda_flags(tmp_path):
    """Include flags for torch's CUDA headers, or the reason they cannot be used here."""
    if _cxx() is None:
        return None, "no C++ compiler"
    cuda_include = _cuda_include()
    if cuda_include is None:
        return None, "the CUDA toolkit headers (cuda_runtime_api.h) are absent"
    if not (TORCH_INCLUDE / "c10" / "cuda" / "CUDAStream.h").is_file():
        return None, "this torch ships no c10/cuda headers"
    flags = [f"-I{TORCH_INCLUDE}", f"-I{TORCH_INCLUDE / 'torch' / 'csrc' / 'api' / 'include'}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{cuda_include}", f"-I{CSRC}", "-DTORCH_EXTENSION_NAME=_C"]
    if not (TORCH_INCLUDE / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # A CPU-only wheel ships c10/cuda but not this generated header; it only carries
        # build-configuration macros, so an empty stand-in is enough for a syntax check.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        flags.append(f"-I{tmp_path / 'stub'}")
    return flags, None


def test_bindings_parse_against_torch_headers(tmp_path):
    flags, reason = _torch_cuda_flags(tmp_path)
    if flags is None:
        pytest.skip(reason)
    _run([_cxx(), "-std=c++20", "-fsyntax-only", "-w", *flags, str(CSRC / "bindings.cpp")])


def test_cublaslt_part_parses(tmp_path):
    flags, reason = _torch_cuda_flags(tmp_path)
    if flags is None:
        pytest.skip(reason)
    # ATen/cuda/CUDAContext.h pulls in every one of these.
    needed = ("cublasLt.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")
    missing = [h for h in needed if not (_cuda_include() / h).is_file()]
    if missing:
        pytest.skip(f"the CUDA toolkit here lacks {', '.join(missing)}")
    _run([_cxx(), "-std=c++20", "-fsyntax-only", "-w", *flags, str(CSRC / "cublaslt_gelu.cpp")])


def test_setup_builds_every_source():
    """setup.py's ahead-of-time build and the JIT build compile the same file list."""
    from fuseformer.kernels import cuda_backend

    on_disk = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    assert sorted(cuda_backend.SOURCES) == on_disk


# ----------------------------------------------------------------------------- CuTe attention

# HMMA.16816 instructions one loop iteration needs per warp, by head dim (the loops are not
# unrolled across iterations).
# Forward, per key tile: S = Q K^T is (kBlockM/64)(kBlockN/8)(D/16), O += P V is
# (kBlockM/64)(D/8)(kBlockN/16), with (kBlockM, kBlockN) = (128, 32) at D 64, (64, 64) at D 128.
# Backward, per query tile, 8 warps along the keys (16 each): S^T = K Q^T and dP^T = V dO^T are
# (kBlockM/8)(D/16) each, dV += P^T dO and dK += dS^T Q are (D/8)(kBlockM/16) each, dQ = dS K
# is (kBlockM/16/wm)(D/8/wn)(kBlockN/16) with the 8 warps as wm x wn over (queries, head dim):
# (kBlockN, kBlockM, wm x wn) = (128, 64, 4 x 2) at D 64, (128, 32, 2 x 4) at D 128.
HMMA_PER_ITERATION = {
    "attention_forward_cute_kernel": {64: 2 * 4 * 4 + 2 * 8 * 2, 128: 1 * 8 * 8 + 1 * 16 * 4},
    "attention_backward_cute_kernel": {64: 2 * 8 * 4 + 2 * 8 * 4 + 1 * 4 * 8, 128: 2 * 4 * 8 + 2 * 16 * 2 + 1 * 4 * 8},
}
# Kernels each CuTe file must hold (fp16 and bf16 each; the tensor-core ones at head dims 64
# and 128): the backward's preprocess (delta) and dq conversion are elementwise.
CUTE_KERNELS = {
    "attention_cute.cu": {"attention_forward_cute_kernel": 4},
    "attention_cute_backward.cu": {"attention_backward_cute_kernel": 4, "attention_backward_cute_preprocess_kernel": 2,
                                   "attention_backward_cute_convert_dq_kernel": 2},
}
CUTE_ARCHS = ("sm_80", "sm_90a")
CUTE_BUILDS = [(name, arch) for name in CUTE_FILES for arch in CUTE_ARCHS]


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    nvcc = _nvcc()
    candidates = [pathlib.Path(nvcc).resolve().parent / "cuobjdump"] if nvcc else []
    try:
        import triton  # its NVIDIA backend carries the toolkit's binary utilities

        candidates.append(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


@pytest.fixture(scope="module")
def cute_builds(tmp_path_factory):
    """Each CuTe file built as the JIT extension builds it (-O3, torch's nvcc flags), one cubin
    per architecture, with ptxas's resource report."""
    from fuseformer.kernels import cuda_backend

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("the nvidia-cutlass package (CuTe headers) is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the JIT build adds (no half operators, ...)

    out = tmp_path_factory.mktemp("cute")
    commands = {}
    for name, arch in CUTE_BUILDS:
        cubin = out / f"{name}.{arch}.cubin"
        commands[(name, arch)] = ([nvcc, "-std=c++17", *COMMON_NVCC_FLAGS, *cuda_backend.CUDA_FLAGS, f"-I{include}",
                                   "-Xptxas", "-v", f"-arch={arch}", "-cubin", str(CSRC / name), "-o", str(cubin)], cubin)
    return _compile_all(commands, timeout=600)


def _kernel_reports(ptxas_output):
    """{mangled kernel name: its ptxas report lines}."""
    reports, current = {}, None
    for line in ptxas_output.splitlines():
        found = re.search(r"Compiling entry function '(\w+)'", line)
        if found:
            current = found.group(1)
            reports[current] = []
        elif current is not None:
            reports[current].append(line)
    return reports


def _head_dim(mangled):
    found = re.search(r"Cute\w*Traits.*?ELi(\d+)E", mangled)
    assert found, mangled
    return int(found.group(1))


def _kind(name, kinds):
    """The entry of `kinds` (kernel base names) this mangled name is an instance of, or None."""
    return next((kind for kind in sorted(kinds, key=len, reverse=True) if kind in name), None)


@pytest.mark.parametrize("name,arch", CUTE_BUILDS)
def test_cute_attention_compiles_without_spills(cute_builds, name, arch):
    returncode, cmd, output, cubin = cute_builds[(name, arch)]
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    expected = CUTE_KERNELS[name]
    found = {kind: [k for k in reports if _kind(k, expected) == kind] for kind in expected}
    assert {kind: len(ks) for kind, ks in found.items()} == expected, f"ptxas compiled {list(reports)}"
    for kernel, lines in reports.items():
        text = "\n".join(lines)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert spills, f"no spill report for {kernel}:\n{text}"
        assert spills.groups() == ("0", "0"), f"{kernel} spills on {arch}:\n{text}"
        assert re.search(r"\b0 bytes stack frame", text), f"{kernel} uses local memory on {arch}:\n{text}"


@pytest.mark.parametrize("name,arch", CUTE_BUILDS)
def test_cute_attention_uses_tensor_cores(cute_builds, name, arch):
    """Every tensor-core kernel's SASS holds the mma.sync HMMA.16816 with fp32 accumulation, as
    many as one loop iteration needs, and loads its tiles with cp.async (LDGSTS) and ldmatrix
    (LDSM); the backward adds its dq into fp32 with atomics (RED)."""
    returncode, cmd, output, cubin = cute_builds[(name, arch)]
    assert returncode == 0, f"{cmd}\n{output}"
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)")
    result = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    functions = re.split(r"\n\s*Function : ", result.stdout)[1:]
    sass = {chunk.split("\n", 1)[0].strip(): chunk for chunk in functions}
    kind = next(k for k in CUTE_KERNELS[name] if k in HMMA_PER_ITERATION)
    kernels = {kernel: body for kernel, body in sass.items() if _kind(kernel, CUTE_KERNELS[name]) == kind}
    assert len(kernels) == 4, list(sass)
    for kernel, body in kernels.items():
        hmma = re.findall(r"\bHMMA\.16816\.F32(\.BF16)?\b", body)
        bf16 = "bfloat16" in kernel
        assert len(hmma) >= HMMA_PER_ITERATION[kind][_head_dim(kernel)], f"{kernel} on {arch}: {len(hmma)} HMMA.16816.F32"
        assert all(bool(k) == bf16 for k in hmma), f"{kernel}: HMMA of the wrong input type"
        assert "LDGSTS" in body and "LDSM" in body, f"{kernel}: no cp.async / ldmatrix in the SASS"
        if kind == "attention_backward_cute_kernel":
            assert re.search(r"\bREDG?\.E\.ADD\.F32", body), f"{kernel}: no fp32 atomic add (dq) in the SASS"


def test_setup_aot_build_gets_the_cutlass_include():
    """FUSEFORMER_BUILD_CUDA=1: setup.py hands the installed package's CuTe include folder to
    the extension (setup() and CUDAExtension stubbed out: nothing is compiled)."""
    from fuseformer.kernels import cuda_backend

    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("the nvidia-cutlass package (CuTe headers) is not installed")
    script = (
        "import json, setuptools, torch.utils.cpp_extension as ce\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "ce.CUDAExtension = lambda **kw: kw\n"
        "exec(open('setup.py').read())\n"
        "print(json.dumps({'ext': seen['ext_modules'][0], 'cuda': seen['extras_require']['cuda']}))\n"
    )
    env = dict(os.environ, FUSEFORMER_BUILD_CUDA="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=CSRC.parent, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["ext"]["include_dirs"] == [str(include)]
    assert {"csrc/attention_cute.cu", "csrc/attention_cute_backward.cu"} <= set(seen["ext"]["sources"])
    assert "nvidia-cutlass" in seen["cuda"]
