"""CI compile check of csrc/ without a GPU: a syntax or type error in the CUDA C++ backend fails
here even on a runner that will never launch a kernel.

- the pure-CUDA kernels (*.cu) compile with nvcc alone for sm_80 and sm_90;
- bindings.cpp parses against torch's headers (when torch ships its c10/cuda headers);
- cublaslt_gelu.cpp parses when the cuBLAS headers it needs are installed.
- the CuTe attention (attention_cute.cu, on the `nvidia-cutlass` package's headers) compiles
  with -O3 for sm_80 and sm_90a, its SASS uses the tensor cores (HMMA) and ptxas reports no
  register spills: what can be proven of a kernel's speed without a GPU.
- bindings_gemm.cpp (the second module, fuseformer_cuda_gemm) parses the same way;
- the CUTLASS Linear+GELU (linear_gelu_cutlass*.cu, the separate fuseformer_cuda_gemm module)
  compiles with -O3 for sm_80 and sm_90a without spills; its sm_80 kernels are mma.sync (HMMA)
  with cp.async, its sm_90a kernels wgmma (HGMMA) fed by TMA (UTMALDG) and storing by TMA; and
  its host entry point refuses bad arguments with a status, run here on the CPU.
Each part is skipped, with the reason, where its compiler or headers are absent. Unoptimised
nvcc and -fsyntax-only keep the rest well under a minute of CPU; the -O3 builds are the costly
part: the CuTe attention about a minute per architecture on one core (both run at once), the
CUTLASS Linear+GELU's six compiles (three files, two architectures) about three minutes of one
core in all (20-40 s each; as many at once as there are cores).
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
CUTE_FILES = ("attention_cute.cu",)
# The CUTLASS Linear+GELU: sm80 kernels + dispatch, then one file of sm90 kernels per dtype.
CUTLASS_GEMM_FILES = ("linear_gelu_cutlass.cu", "linear_gelu_cutlass_sm90_bf16.cu", "linear_gelu_cutlass_sm90_f16.cu")
GEMM_HEADERS = ("linear_gelu_cutlass.h", "linear_gelu_cutlass.cuh", "linear_gelu_cutlass_sm90.cuh")
PLAIN_CU_FILES = [name for name in CU_FILES if name not in CUTE_FILES + CUTLASS_GEMM_FILES]
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
    for name in ("bindings.cpp", "kernels.h", "common.cuh", "attention_common.cuh", "cublaslt_gelu.cpp", "cublaslt_gelu.h",
                 "bindings_gemm.cpp", *GEMM_HEADERS):
        assert (CSRC / name).is_file(), name
    assert {"add_layer_norm.cu", "gelu.cu", "attention_forward.cu", "attention_backward.cu", *CUTE_FILES,
            *CUTLASS_GEMM_FILES} <= set(CU_FILES)


@pytest.mark.parametrize("name", CU_FILES + ["common.cuh", "attention_common.cuh", "kernels.h", *GEMM_HEADERS])
def test_kernels_do_not_include_torch(name):
    """The .cu side must stay compilable by nvcc alone: no torch, ATen, c10 or pybind headers."""
    text = (CSRC / name).read_text()
    includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', text)
    bad = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
    assert not bad, f"{name} includes torch-side headers {bad}"


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Compile every .cu at once (one nvcc per file, both gencodes): the files are independent,
    so the wall time is that of the slowest one where cores are free."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {}
    for name in PLAIN_CU_FILES:
        cmd = [nvcc, "-std=c++17", *FAST, *GENCODE, "-c", str(CSRC / name), "-o", str(out / (name + ".o"))]
        procs[name] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for name, (cmd, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            output = "timed out after 300 s\n" + output
        results[name] = (proc.returncode, " ".join(cmd), output, out / (name + ".o"))
    return results


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


@pytest.mark.parametrize("name", ["bindings.cpp", "bindings_gemm.cpp"])
def test_bindings_parse_against_torch_headers(tmp_path, name):
    flags, reason = _torch_cuda_flags(tmp_path)
    if flags is None:
        pytest.skip(reason)
    _run([_cxx(), "-std=c++20", "-fsyntax-only", "-w", *flags, str(CSRC / name)])


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
    """The JIT build's two modules (the cuda backend and the CUTLASS GEMMs) compile every source,
    each once; setup.py's ahead-of-time build gets the same split (test_setup_aot_build_*)."""
    from fuseformer.kernels import cuda_backend

    on_disk = sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu"))
    assert not set(cuda_backend.SOURCES) & set(cuda_backend.GEMM_SOURCES)
    assert sorted(cuda_backend.SOURCES + cuda_backend.GEMM_SOURCES) == on_disk


# ----------------------------------------------------------------------------- CuTe attention

# HMMA.16816 instructions one key tile needs per warp, by head dim (the kernel's loop body is
# not unrolled across tiles): S = Q K^T is (kBlockM/64)(kBlockN/8)(D/16), O += P V is
# (kBlockM/64)(D/8)(kBlockN/16), with (kBlockM, kBlockN) = (128, 32) at D 64, (64, 64) at D 128.
HMMA_PER_TILE = {64: 2 * 4 * 4 + 2 * 8 * 2, 128: 1 * 8 * 8 + 1 * 16 * 4}
CUTE_ARCHS = ("sm_80", "sm_90a")


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
    """attention_cute.cu built as the JIT extension builds it (-O3, torch's nvcc flags), one cubin per architecture,
    both at once, with ptxas's resource report."""
    from fuseformer.kernels import cuda_backend

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("the nvidia-cutlass package (CuTe headers) is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the JIT build adds (no half operators, ...)

    out = tmp_path_factory.mktemp("cute")
    procs = {}
    for arch in CUTE_ARCHS:
        cubin = out / f"attention_cute.{arch}.cubin"
        cmd = [nvcc, "-std=c++17", *COMMON_NVCC_FLAGS, *cuda_backend.CUDA_FLAGS, f"-I{include}", "-Xptxas", "-v",
               f"-arch={arch}", "-cubin", str(CSRC / "attention_cute.cu"), "-o", str(cubin)]
        procs[arch] = (cmd, cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for arch, (cmd, cubin, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = "timed out after 600 s\n" + proc.communicate()[0]
        results[arch] = (proc.returncode, " ".join(cmd), output, cubin)
    return results


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
    found = re.search(r"CuteAttnTraits.*?ELi(\d+)E", mangled)
    assert found, mangled
    return int(found.group(1))


@pytest.mark.parametrize("arch", CUTE_ARCHS)
def test_cute_attention_compiles_without_spills(cute_builds, arch):
    returncode, cmd, output, cubin = cute_builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    kernels = {name: lines for name, lines in reports.items() if "attention_forward_cute_kernel" in name}
    # fp16 and bf16 at head dims 64 and 128.
    assert len(kernels) == 4, f"expected 4 kernels, ptxas compiled {list(reports)}"
    for name, lines in kernels.items():
        text = "\n".join(lines)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert spills, f"no spill report for {name}:\n{text}"
        assert spills.groups() == ("0", "0"), f"{name} spills on {arch}:\n{text}"
        assert re.search(r"\b0 bytes stack frame", text), f"{name} uses local memory on {arch}:\n{text}"


@pytest.mark.parametrize("arch", CUTE_ARCHS)
def test_cute_attention_uses_tensor_cores(cute_builds, arch):
    """Every kernel's SASS holds the mma.sync HMMA.16816 with fp32 accumulation, as many as one
    key tile needs, and loads its tiles with cp.async (LDGSTS) and ldmatrix (LDSM)."""
    returncode, cmd, output, cubin = cute_builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)")
    result = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    functions = re.split(r"\n\s*Function : ", result.stdout)[1:]
    sass = {chunk.split("\n", 1)[0].strip(): chunk for chunk in functions}
    kernels = {name: body for name, body in sass.items() if "attention_forward_cute_kernel" in name}
    assert len(kernels) == 4, list(sass)
    for name, body in kernels.items():
        hmma = re.findall(r"\bHMMA\.16816\.F32(\.BF16)?\b", body)
        bf16 = "bfloat16" in name
        assert len(hmma) >= HMMA_PER_TILE[_head_dim(name)], f"{name} on {arch}: {len(hmma)} HMMA.16816.F32"
        assert all(bool(kind) == bf16 for kind in hmma), f"{name}: HMMA of the wrong input type"
        assert "LDGSTS" in body and "LDSM" in body, f"{name}: no cp.async / ldmatrix in the SASS"


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
        "print(json.dumps({'ext': seen['ext_modules'][0], 'gemm': seen['ext_modules'][1], 'cuda': seen['extras_require']['cuda']}))\n"
    )
    env = dict(os.environ, FUSEFORMER_BUILD_CUDA="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=CSRC.parent, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["ext"]["include_dirs"] == [str(include)]
    assert "csrc/attention_cute.cu" in seen["ext"]["sources"]
    assert "nvidia-cutlass" in seen["cuda"]
    # The CUTLASS GEMMs: their own module, the JIT build's sources, sm_80 and sm_90a.
    gemm = seen["gemm"]
    assert gemm["name"] == "fuseformer._C_gemm" and gemm["include_dirs"] == [str(include)]
    assert sorted(gemm["sources"]) == sorted(f"csrc/{name}" for name in cuda_backend.GEMM_SOURCES)
    assert not set(gemm["sources"]) & set(seen["ext"]["sources"])
    assert sorted(seen["ext"]["sources"]) == sorted(f"csrc/{name}" for name in cuda_backend.SOURCES)
    nvcc = gemm["extra_compile_args"]["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc and "-gencode=arch=compute_80,code=sm_80" in nvcc


# ----------------------------------------------------------------------------- CUTLASS Linear+GELU

GEMM_ARCHS = ("sm_80", "sm_90a")
# Kernels each architecture's image holds: the CUTLASS 2 GEMMs (f16/bf16 x erf/tanh x with and
# without the pre-activation store) everywhere; the CUTLASS 3 ones (f16/bf16 x erf/tanh, the aux
# store skipped at run time on a null pointer) are real only in sm_90a, CUTLASS's printf stub in sm_80.
SM80_KERNELS, SM90_KERNELS = 8, 4


def _gemm_kind(mangled):
    if "GemmWithFusedEpilogue" in mangled:
        return "sm80"
    if "GemmUniversal" in mangled and "CollectiveMma" in mangled:
        return "sm90"
    return None


@pytest.fixture(scope="module")
def cutlass_gemm_builds(tmp_path_factory):
    """The CUTLASS Linear+GELU files compiled as the JIT build compiles them (-O3, torch's nvcc
    flags), per architecture, with ptxas's report and each file's wall time: for sm_80 as objects
    (the CPU test links their host code), for sm_90a as cubins (device code only: the host side is
    the same). As many nvcc at once as there are cores (the JIT build's ninja does the same), one
    at a time with FUSEFORMER_TEST_SERIAL_NVCC=1 (machines short of memory: an sm_90a file takes
    ~4 GB). {arch: (returncode, commands, output, [files], {file: seconds})}."""
    import time

    from fuseformer.kernels import cuda_backend

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("the nvidia-cutlass package (CUTLASS headers) is not installed")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    out = tmp_path_factory.mktemp("cutlass_gemm")
    serial = os.environ.get("FUSEFORMER_TEST_SERIAL_NVCC", "0") not in ("", "0")
    jobs = 1 if serial else max(1, os.cpu_count() or 1)
    queue = [(arch, name) for arch in GEMM_ARCHS for name in CUTLASS_GEMM_FILES]
    running, done = {}, {}

    def finish(key):
        cmd, target, proc, start = running.pop(key)
        try:
            output, _ = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = "timed out after 900 s\n" + proc.communicate()[0]
        done[key] = (proc.returncode, " ".join(cmd), output, target, time.monotonic() - start)

    for arch, name in queue:
        while len(running) >= jobs:
            finish(next(iter(running)))
        kind = "-c" if arch == "sm_80" else "-cubin"
        target = out / f"{name}.{arch}.{'o' if kind == '-c' else 'cubin'}"
        cmd = [nvcc, "-std=c++17", *COMMON_NVCC_FLAGS, *cuda_backend.CUDA_FLAGS, f"-I{include}", "-Xptxas", "-v",
               f"-arch={arch}", kind, str(CSRC / name), "-o", str(target)]
        running[(arch, name)] = (cmd, target, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                               text=True), time.monotonic())
    while running:
        finish(next(iter(running)))
    results = {}
    for arch in GEMM_ARCHS:
        parts = [done[(arch, name)] for name in CUTLASS_GEMM_FILES]
        failed = next((p for p in parts if p[0] != 0), None)
        results[arch] = (failed[0] if failed else 0, "\n".join(p[1] for p in parts), "\n".join(p[2] for p in parts),
                         [p[3] for p in parts], {name: p[4] for name, p in zip(CUTLASS_GEMM_FILES, parts)})
        times = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results[arch][4].items())
        print(f"CUTLASS Linear+GELU -O3 for {arch}: {times}")
    return results


def _gemm_build(builds, arch):
    returncode, cmd, output, files, seconds = builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    return output, files


@pytest.mark.parametrize("arch", GEMM_ARCHS)
def test_cutlass_gemm_compiles_without_spills(cutlass_gemm_builds, arch):
    output, _ = _gemm_build(cutlass_gemm_builds, arch)
    reports = _kernel_reports(output)
    kernels = {name: lines for name, lines in reports.items() if _gemm_kind(name)}
    kinds = [_gemm_kind(name) for name in kernels]
    assert kinds.count("sm80") == SM80_KERNELS and kinds.count("sm90") == SM90_KERNELS, list(reports)
    for name, lines in kernels.items():
        text = "\n".join(lines)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert spills, f"no spill report for {name}:\n{text}"
        assert spills.groups() == ("0", "0"), f"{name} spills on {arch}:\n{text}"
        if _gemm_kind(name) == "sm80" or arch == "sm_90a":  # the real kernels (not sm_80's sm90 stubs)
            assert re.search(r"\b0 bytes stack frame", text), f"{name} uses local memory on {arch}:\n{text}"


def _sass_functions(obj):
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)")
    result = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    functions = re.split(r"\n\s*Function : ", result.stdout)[1:]
    return {chunk.split("\n", 1)[0].strip(): chunk for chunk in functions}


@pytest.mark.parametrize("arch", GEMM_ARCHS)
def test_cutlass_gemm_uses_tensor_cores_and_tma(cutlass_gemm_builds, arch):
    """sm80 kernels: HMMA.16816 with fp32 accumulation (64 per 32-deep k step of a 64 x 64 warp
    tile), cp.async (LDGSTS), ldmatrix (LDSM). sm90 kernels in the sm_90a image: wgmma
    (HGMMA.64xNx16, fp32 accumulation; 8 per 64-deep k tile of a warpgroup's 128 x 128), TMA
    loads (UTMALDG, multicast across the 2 x 1 cluster) and TMA stores (UTMASTG: out and aux)."""
    _, files = _gemm_build(cutlass_gemm_builds, arch)
    sass = {}
    for target in files:
        sass.update(_sass_functions(target))
    kernels = {name: body for name, body in sass.items() if _gemm_kind(name)}
    assert len(kernels) == SM80_KERNELS + SM90_KERNELS, list(sass)
    for name, body in kernels.items():
        bf16 = "bfloat16" in name
        if _gemm_kind(name) == "sm80":
            hmma = re.findall(r"\bHMMA\.16816\.F32(\.BF16)?\b", body)
            assert len(hmma) >= 64, f"{name} on {arch}: {len(hmma)} HMMA.16816.F32"
            assert all(bool(kind) == bf16 for kind in hmma), f"{name}: HMMA of the wrong input type"
            assert "LDGSTS" in body and "LDSM" in body, f"{name}: no cp.async / ldmatrix in the SASS"
        elif arch == "sm_90a":
            hgmma = re.findall(r"\bHGMMA\.64x\d+x16\.F32(\.BF16)?\b", body)
            assert len(hgmma) >= 8, f"{name}: {len(hgmma)} HGMMA.64xNx16.F32"
            assert all(bool(kind) == bf16 for kind in hgmma), f"{name}: HGMMA of the wrong input type"
            assert re.search(r"\bUTMALDG\.\dD\.MULTICAST\b", body) and re.search(r"\bUTMALDG\.\dD\b", body), \
                f"{name}: no TMA loads (plain and multicast)"
            assert re.search(r"\bUTMASTG\b", body), f"{name}: no TMA store"
            assert "HMMA" not in body, f"{name}: mma.sync in the wgmma kernel"
        else:  # sm_80's image of an sm90 kernel: CUTLASS's stub, no tensor-core code
            assert "HGMMA" not in body and "UTMALDG" not in body


ARGS_PROGRAM = r"""
#include <cstdio>
#include "linear_gelu_cutlass.h"
using namespace fuseformer;
alignas(16) static char buffer[4096];

static void check(const char* name, DType dtype, LinearGeluCutlassParams p, GemmPath path = GemmPath::kAuto) {
  const char* why = linear_gelu_cutlass_unsupported(dtype, p);
  // Only refused calls and M == 0 reach the entry point: both return before touching a device.
  const int status = (why != nullptr || p.M == 0) ? int(linear_gelu_cutlass(dtype, p, path, nullptr)) : -1;
  std::printf("%s|%s|%d\n", name, why ? why : "", status);
}

int main() {
  const LinearGeluCutlassParams ok{buffer, buffer, buffer, buffer, buffer, 3, 64, 32, false};
  LinearGeluCutlassParams p = ok;
  check("ok", DType::BF16, ok);
  check("fp32", DType::F32, ok);
  p = ok; p.K = 36; check("k_not_multiple_of_8", DType::F16, p);
  p = ok; p.N = 100; check("n_not_multiple_of_8", DType::BF16, p);
  p = ok; p.K = 0; check("k_zero", DType::BF16, p);
  p = ok; p.M = -1; check("m_negative", DType::BF16, p);
  p = ok; p.x = buffer + 2; check("x_misaligned", DType::BF16, p);
  p = ok; p.bias = buffer + 8; check("bias_misaligned", DType::BF16, p);
  p = ok; p.preact = buffer + 4; check("preact_misaligned", DType::F16, p);
  p = ok; p.M = 1ll << 31; check("m_too_large", DType::BF16, p);
  p = ok; p.weight = nullptr; check("weight_null", DType::BF16, p);
  p = ok; p.M = 0; check("m_zero", DType::BF16, p);
  p = ok; p.M = 0; p.x = nullptr; p.out = nullptr; p.preact = nullptr; check("m_zero_empty", DType::F16, p);
  p = ok; p.x = nullptr; check("x_null", DType::BF16, p);
  p = ok; p.M = 0; check("bad_path", DType::BF16, p, static_cast<GemmPath>(7));
  return 0;
}
"""


def test_cutlass_gemm_refuses_bad_arguments_on_the_cpu(cutlass_gemm_builds, tmp_path):
    """The host entry point, linked from the sm_80 objects and run here without a GPU: each bad
    argument has a reason and cudaErrorInvalidValue (1), and nothing reaches the runtime (no
    device here, so any call that did would answer with a device error, or crash)."""
    _, objects = _gemm_build(cutlass_gemm_builds, "sm_80")
    source = tmp_path / "args.cu"
    source.write_text(ARGS_PROGRAM)
    program = tmp_path / "args"
    _run([_nvcc(), "-std=c++17", f"-I{CSRC}", str(source), *map(str, objects), "-o", str(program)], timeout=300)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {name: (why, int(status)) for name, why, status in (line.split("|") for line in result.stdout.splitlines())}
    assert rows["ok"] == ("", -1)
    assert rows["m_zero"] == ("", 0)  # cudaSuccess: nothing to compute, nothing launched
    assert rows["m_zero_empty"] == ("", 0)  # torch's empty tensors have null data pointers
    expected = {
        "fp32": "float16 and bfloat16", "k_not_multiple_of_8": "multiples of 8", "n_not_multiple_of_8": "multiples of 8",
        "k_zero": "K > 0", "m_negative": "M >= 0", "x_misaligned": "16-byte aligned", "bias_misaligned": "16-byte aligned",
        "preact_misaligned": "16-byte aligned", "m_too_large": "below 2^31", "weight_null": "must not be null",
        "x_null": "must not be null",
    }
    for name, text in expected.items():
        why, status = rows[name]
        assert text in why and status == 1, (name, rows[name])
    assert rows["bad_path"] == ("", 1)
