"""CI compile check of csrc/ without a GPU: a syntax or type error in the CUDA C++ backend fails
here even on a runner that will never launch a kernel.

- the pure-CUDA kernels (*.cu) compile with nvcc alone for sm_80 and sm_90;
- bindings.cpp parses against torch's headers (when torch ships its c10/cuda headers);
- cublaslt_gelu.cpp parses when the cuBLAS headers it needs are installed.
- the CuTe attention forward and backward (attention_cute.cu, attention_cute_backward.cu, on
  the `nvidia-cutlass` package's headers) compile with -O3 for sm_80 and sm_90a, their SASS
  uses the tensor cores (HMMA) and ptxas reports no register spills: what can be proven of a
  kernel's speed without a GPU;
- add_layer_norm.cu compiles the same way for sm_80 and sm_90 without spills or stack frames,
  its aligned configs move rows with 16-byte global loads and stores (LDG/STG.E.128), and its
  one-vector configs fit 40 registers a thread forward (1536 threads an SM), 64 backward (1024);
- gelu.cu's aligned kernels move their elements 16 bytes an access (LDG/STG.E.128);
- the Hopper attention (attention_sm90*.cu, CUTLASS's FMHA collectives) compiles for sm_90a
  with wgmma (HGMMA) and TMA (UTMALDG/UTMASTG) in its SASS, no spills, and no wgmma
  serialization warning from ptxas;
- bindings_gemm.cpp (the second module, fuseformer_cuda_gemm) parses as bindings.cpp does;
- the CUTLASS Linear+GELU (linear_gelu_cutlass*.cu, the separate fuseformer_cuda_gemm module)
  compiles with -O3 for sm_80 and sm_90a without spills; its sm_80 kernels are mma.sync (HMMA)
  with cp.async, its sm_90a kernels wgmma (HGMMA) fed by TMA (UTMALDG) and storing by TMA; and
  its host entry point refuses bad arguments with a status, run here on the CPU.
Each part is skipped, with the reason, where its compiler or headers are absent. Unoptimised
nvcc and -fsyntax-only keep the rest well under a minute of CPU; the -O3 CuTe builds are the
costly part (one to two minutes per file and architecture on one core; as many run at once as
there are CPUs, or FUSEFORMER_NVCC_JOBS); the CUTLASS Linear+GELU's six compiles (three files,
two architectures) take about three minutes of one core in all.
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

import compile_ahead

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
# Built on CUTLASS/CuTe: compiled (optimised, then disassembled) by the tests at the end.
CUTE_FILES = ("attention_cute.cu", "attention_cute_backward.cu")
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


def _nvcc_or_skip():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    return nvcc


def _cutlass_include_or_skip(what):
    """The nvidia-cutlass package's include folder; the test skips without it (`what` names the
    headers it needs in the skip message)."""
    from fuseformer.kernels import cuda_backend

    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip(f"the nvidia-cutlass package ({what} headers) is not installed")
    return include


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
    for name in ("bindings.cpp", "kernels.h", "common.cuh", "attention_common.cuh", "attention_cute.cuh",
                 "attention_sm90.cuh", "attention_sm90_backward.cuh", "cublaslt_gelu.cpp", "cublaslt_gelu.h", "bindings_gemm.cpp", *GEMM_HEADERS):
        assert (CSRC / name).is_file(), name
    assert {"add_layer_norm.cu", "gelu.cu", "attention_forward.cu", "attention_backward.cu", *CUTE_FILES,
            *CUTLASS_GEMM_FILES} <= set(CU_FILES)


@pytest.mark.parametrize("name", CU_FILES + ["common.cuh", "attention_common.cuh", "attention_cute.cuh", "attention_sm90.cuh",
                                  "attention_sm90_backward.cuh", "kernels.h", *GEMM_HEADERS])
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
            running[key] = (cmd, path, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                        env=compile_ahead.environ()))
        key = next(iter(running))
        cmd, path, proc = running.pop(key)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output = f"timed out after {timeout} s\n" + proc.communicate()[0]
        results[key] = (proc.returncode, " ".join(map(str, cmd)), output, path)
    return results


@compile_ahead.build
def nvcc_results(tmp_path_factory):
    """Compile every .cu (one nvcc per file, both gencodes): the wall time is that of the
    slowest one where cores are free."""
    nvcc = _nvcc_or_skip()
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
# Kernels each CuTe file must hold (fp16 and bf16 each, at head dims 64 and 128). The backward's
# preprocess (delta) and dq conversion are row-wise, in attention_backward_rows.cu.
CUTE_KERNELS = {
    "attention_cute.cu": {"attention_forward_cute_kernel": 4},
    "attention_cute_backward.cu": {"attention_backward_cute_kernel": 4},
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


def _cubin_command(nvcc, source, arch, flags, out, object_file=False):
    """(nvcc command, output) building csrc/`source` as the JIT extension builds it (-O3, torch's
    nvcc flags, + `flags`) for one architecture, with ptxas's resource report: a cubin (device
    code), or with object_file an object holding the host code too."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what the JIT build adds (no half operators, ...)

    from fuseformer.kernels import cuda_backend

    target = out / f"{source}.{arch}.{'o' if object_file else 'cubin'}"
    return [nvcc, "-std=c++17", *COMMON_NVCC_FLAGS, *cuda_backend.CUDA_FLAGS, *flags, "-Xptxas", "-v", f"-arch={arch}",
            "-c" if object_file else "-cubin", str(CSRC / source), "-o", str(target)], target


def _sass(returncode, cmd, output, cubin) -> str:
    """cuobjdump's SASS of a build's cubin (the build must have succeeded)."""
    assert returncode == 0, f"{cmd}\n{output}"
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)")
    result = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _assert_no_spills(reports, arch):
    """Every kernel's ptxas report: no spill stores or loads, no stack frame (local memory)."""
    for name, lines in reports.items():
        text = "\n".join(lines)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
        assert spills, f"no spill report for {name}:\n{text}"
        assert spills.groups() == ("0", "0"), f"{name} spills on {arch}:\n{text}"
        assert re.search(r"\b0 bytes stack frame", text), f"{name} uses local memory on {arch}:\n{text}"


def _setup_arguments(**env) -> dict:
    """What setup.py hands to setup() with FUSEFORMER_BUILD_CUDA=1 and `env` (setup() and
    CUDAExtension stubbed out: nothing is compiled)."""
    script = (
        "import json, setuptools, torch.utils.cpp_extension as ce\n"
        "seen = {}\n"
        "setuptools.setup = lambda **kw: seen.update(kw)\n"
        "ce.CUDAExtension = lambda **kw: kw\n"
        "exec(open('setup.py').read())\n"
        "print(json.dumps({'ext': seen['ext_modules'][0], 'gemm': seen['ext_modules'][1], 'extras': seen['extras_require']}))\n"
    )
    env = dict(os.environ, FUSEFORMER_BUILD_CUDA="1", **env)
    result = subprocess.run([sys.executable, "-c", script], cwd=CSRC.parent, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@compile_ahead.build
def cute_builds(tmp_path_factory):
    """Each CuTe file built as the JIT extension builds it (-O3, torch's nvcc flags), one cubin
    per architecture, with ptxas's resource report."""
    nvcc = _nvcc_or_skip()
    include = _cutlass_include_or_skip("CuTe")
    out = tmp_path_factory.mktemp("cute")
    commands = {(name, arch): _cubin_command(nvcc, name, arch, [f"-I{include}"], out) for name, arch in CUTE_BUILDS}
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
    _assert_no_spills(reports, arch)


@pytest.mark.parametrize("name,arch", CUTE_BUILDS)
def test_cute_attention_uses_tensor_cores(cute_builds, name, arch):
    """Every tensor-core kernel's SASS holds the mma.sync HMMA.16816 with fp32 accumulation, as
    many as one loop iteration needs, and loads its tiles with cp.async (LDGSTS) and ldmatrix
    (LDSM); the backward adds its dq into fp32 with atomics (RED), on sm_90a as fp32x2 vectors."""
    functions = re.split(r"\n\s*Function : ", _sass(*cute_builds[(name, arch)]))[1:]
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
            # dq's fp32 atomics: on sm_90a two neighbouring columns a reduction (F32x2), none alone.
            scalar = re.findall(r"\bREDG?\.E\.ADD\.F32\.", body)
            pairs = re.findall(r"\bREDG?\.E\.ADD\.F32x2\.", body)
            if arch == "sm_90a":
                assert pairs and not scalar, f"{kernel}: {len(pairs)} fp32x2 and {len(scalar)} fp32 atomic adds"
            else:
                assert scalar, f"{kernel}: no fp32 atomic add (dq) in the SASS"


def test_setup_aot_build_gets_the_cutlass_include():
    """FUSEFORMER_BUILD_CUDA=1: setup.py hands the installed package's CuTe include folder to
    the extension (setup() and CUDAExtension stubbed out: nothing is compiled)."""
    from fuseformer.kernels import cuda_backend

    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("the nvidia-cutlass package (CuTe headers) is not installed")
    seen = _setup_arguments()
    fmha = cuda_backend.cutlass_fmha_include(include)  # a package version without it builds no sm90 attention
    assert seen["ext"]["include_dirs"] == [str(include)] + ([str(fmha)] if fmha is not None else [])
    assert {"csrc/attention_cute.cu", "csrc/attention_cute_backward.cu"} <= set(seen["ext"]["sources"])
    assert "nvidia-cutlass" in seen["extras"]["cuda"]
    # The CUTLASS GEMMs: their own module, the JIT build's sources, sm_80 and sm_90a.
    gemm = seen["gemm"]
    assert gemm["name"] == "fuseformer._C_gemm" and gemm["include_dirs"] == [str(include)]
    assert sorted(gemm["sources"]) == sorted(f"csrc/{name}" for name in cuda_backend.GEMM_SOURCES)
    assert not set(gemm["sources"]) & set(seen["ext"]["sources"])
    assert sorted(seen["ext"]["sources"]) == sorted(f"csrc/{name}" for name in cuda_backend.SOURCES)
    nvcc = gemm["extra_compile_args"]["nvcc"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc and "-gencode=arch=compute_80,code=sm_80" in nvcc


# ----------------------------------------------------------------------------- Hopper attention (sm_90a)


@compile_ahead.build
def sm90_build(tmp_path_factory):
    """attention_sm90_bf16_d64.cu as the JIT build compiles it on an H100 (-O3, torch's nvcc
    flags, sm_90a, FUSEFORMER_SM90A), its causal instantiation alone
    (FUSEFORMER_SM90_CAUSAL_ONLY: one kernel, about a minute of ptxas instead of two)."""
    from fuseformer.kernels import cuda_backend

    nvcc = _nvcc_or_skip()
    include = cuda_backend.cutlass_include()
    fmha = cuda_backend.cutlass_fmha_include(include)
    if fmha is None:
        pytest.skip("the nvidia-cutlass package with its Hopper FMHA collectives is not installed")
    # The JIT build on an H100 passes -gencode for sm_90a and this define (sm90a_flags).
    assert "-DFUSEFORMER_SM90A" in cuda_backend.sm90a_flags(None, {(9, 0)})
    flags = ["-DFUSEFORMER_SM90A", "-DFUSEFORMER_SM90_CAUSAL_ONLY", f"-I{include}", f"-I{fmha}"]
    command = _cubin_command(nvcc, "attention_sm90_bf16_d64.cu", "sm_90a", flags, tmp_path_factory.mktemp("sm90"))
    return _compile_all({"sm_90a": command}, timeout=900)["sm_90a"]


def test_sm90_attention_compiles_without_spills_or_wgmma_serialization(sm90_build):
    returncode, cmd, output, _ = sm90_build
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    kernels = {n: lines for n, lines in reports.items() if "FmhaKernelTmaWarpSpecialized" in n}
    assert len(kernels) == 1 and "CausalTailFusion" in next(iter(kernels)), list(reports)
    _assert_no_spills(kernels, "sm_90a")
    # ptxas C7510: wgmma serialized across a call (the collectives' device asserts do that;
    # attention_sm90.cuh compiles them out).
    assert "serialized" not in output, output


def test_sm90_attention_uses_wgmma_and_tma(sm90_build):
    sass = _sass(*sm90_build)
    # One 128-key tile at head dim 64: S = Q K^T is 64 (rows a warpgroup) x 128 (keys) x 64 in
    # k-steps of 16; O += P V is 64 x 64 (head dim) x 128 (keys).
    s_products = re.findall(r"\bHGMMA\.64x128x16\.F32\.BF16\b", sass)
    pv_products = re.findall(r"\bHGMMA\.64x64x16\.F32\.BF16\b", sass)
    assert len(s_products) >= 4 and len(pv_products) >= 8, f"{len(s_products)} S, {len(pv_products)} PV HGMMAs"
    assert "UTMALDG" in sass and "UTMASTG" in sass, "no TMA loads/stores in the SASS"


@compile_ahead.build
def sm90_backward_build(tmp_path_factory):
    """attention_sm90_bwd_bf16_d64.cu as the JIT build compiles it on an H100, its causal
    instantiation alone (as sm90_build: about a minute of ptxas)."""
    from fuseformer.kernels import cuda_backend

    nvcc = _nvcc_or_skip()
    include = cuda_backend.cutlass_include()
    fmha = cuda_backend.cutlass_fmha_include(include)
    if fmha is None:
        pytest.skip("the nvidia-cutlass package with its Hopper FMHA collectives is not installed")
    flags = ["-DFUSEFORMER_SM90A", "-DFUSEFORMER_SM90_CAUSAL_ONLY", f"-I{include}", f"-I{fmha}"]
    command = _cubin_command(nvcc, "attention_sm90_bwd_bf16_d64.cu", "sm_90a", flags, tmp_path_factory.mktemp("sm90bwd"))
    return _compile_all({"sm_90a": command}, timeout=900)["sm_90a"]


# What ptxas reports for the Hopper backward's kernel (nvcc 13.0), all of it from CUTLASS's
# collective as it is written, none from our parts: its 24-register producer warp spills 20
# bytes, and the consumers keep one 32-float fragment (the tile's lse, filled by a loop the
# collective does not unroll) in a 128-byte stack frame. Held as ceilings, so that a change of
# ours that adds spills fails here.
SM90_BACKWARD_MAX_SPILL_BYTES = 32
SM90_BACKWARD_MAX_STACK_BYTES = 160


def test_sm90_attention_backward_compiles_within_its_spill_ceiling(sm90_backward_build):
    returncode, cmd, output, _ = sm90_backward_build
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    kernels = {n: "\n".join(lines) for n, lines in reports.items() if "FmhaBwdMainloopTmaWarpSpecialized" in n}
    assert len(kernels) == 1 and "CausalTailFusion" in next(iter(kernels)), list(reports)
    text = next(iter(kernels.values()))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    assert spills and stack, text
    assert max(map(int, spills.groups())) <= SM90_BACKWARD_MAX_SPILL_BYTES, text
    assert int(stack.group(1)) <= SM90_BACKWARD_MAX_STACK_BYTES, text
    assert "serialized" not in output, output  # wgmma kept asynchronous (ptxas C7510), as the forward


def test_sm90_attention_backward_uses_wgmma_and_tma(sm90_backward_build):
    sass = _sass(*sm90_backward_build)
    # Per query tile, in each consumer warpgroup (64 keys) at head dim 64: S^T = K Q^T and
    # dP^T = V dO^T (64 x 64 x 64 each), dV += P^T dO and dK += dS^T Q (64 x 64 x 64 each),
    # and in one of the two dQ = dS K (64 x 64 x 128): 4 + 4 + 4 + 4 + 8 products of k 16.
    products = re.findall(r"\bHGMMA\.64x64x16\.F32\.BF16\b", sass)
    assert len(products) >= 24, f"{len(products)} HGMMAs"
    assert "HMMA" not in sass.replace("HGMMA", ""), "mma.sync in the Hopper backward"
    assert "UTMALDG" in sass, "no TMA loads (Q, K, V, dO, lse, delta)"
    assert re.search(r"\bUTMAREDG\.\w+\.ADD\b", sass), "no TMA reduce-add of dQ into its fp32 buffer"
    assert "UTMASTG" in sass, "no TMA stores of dK, dV"
    assert not re.search(r"\bREDG?\.E\.ADD\.F32", sass), "per-element fp32 atomics (dQ goes by TMA reduce)"


@pytest.mark.parametrize("arch_list,capabilities,expected", [
    (None, {(9, 0)}, ["-gencode=arch=compute_90a,code=sm_90a", "-DFUSEFORMER_SM90A"]),  # an H100/H200 box
    (None, {(8, 0), (9, 0)}, []),  # mixed GPUs: torch's own arch list, no sm_90a kernels
    (None, {(8, 0)}, []),
    ("8.0;9.0a", set(), ["-DFUSEFORMER_SM90A"]),  # torch emits the gencode for a named 9.0a
    ("8.0 9.0", {(9, 0)}, []),  # the user's list wins: no 9.0a, no sm90 kernels
])
def test_sm90a_flags(arch_list, capabilities, expected):
    from fuseformer.kernels import cuda_backend

    assert cuda_backend.sm90a_flags(arch_list, capabilities) == expected


def test_setup_aot_build_compiles_sm90a_kernels_only_for_9_0a():
    from fuseformer.kernels import cuda_backend

    if cuda_backend.cutlass_fmha_include(cuda_backend.cutlass_include()) is None:
        pytest.skip("the nvidia-cutlass package with its Hopper FMHA collectives is not installed")
    for arch_list, define in (("8.0;9.0a", True), ("8.0;9.0", False)):
        nvcc_flags = _setup_arguments(TORCH_CUDA_ARCH_LIST=arch_list)["ext"]["extra_compile_args"]["nvcc"]
        assert ("-DFUSEFORMER_SM90A" in nvcc_flags) == define


# ----------------------------------------------------------------------------- add + LayerNorm

LN_ARCHS = ("sm_80", "sm_90")
LN_DTYPES = {"f": "float32", "6__half": "float16", "13__nv_bfloat16": "bfloat16"}
# add_layer_norm_{forward,backward}_kernel<T, VW, THREADS_PER_ROW, VECS> as mangled.
LN_KERNEL = re.compile(r"add_layer_norm_(forward|backward)_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELi(\d+)E")


@compile_ahead.build
def add_layer_norm_builds(tmp_path_factory):
    """add_layer_norm.cu built as the JIT extension builds it (-O3, torch's nvcc flags), one cubin
    per architecture, both at once, with ptxas's resource report (a few seconds each)."""
    nvcc = _nvcc_or_skip()
    out = tmp_path_factory.mktemp("add_layer_norm")
    return _compile_all({arch: _cubin_command(nvcc, "add_layer_norm.cu", arch, [], out) for arch in LN_ARCHS}, timeout=300)


def _ln_kernels(names):
    """{mangled name: (direction, dtype, VW, threads per row, vecs)} of the add+LN kernels among names."""
    found = {}
    for name in names:
        m = LN_KERNEL.search(name)
        if m:
            found[name] = (m.group(1), LN_DTYPES[m.group(2)], *map(int, m.groups()[2:]))
    return found


@pytest.mark.parametrize("arch", LN_ARCHS)
def test_add_layer_norm_compiles_without_spills(add_layer_norm_builds, arch):
    """Every forward and backward config keeps its row in registers: no spills, no stack frame
    (the 512-thread backward at hidden 8192 spilled ~300 bytes per thread when it held 32
    elements per thread)."""
    returncode, cmd, output, cubin = add_layer_norm_builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    kernels = _ln_kernels(reports)
    seen = {(direction, dtype) for direction, dtype, *_ in kernels.values()}
    assert seen == {(d, t) for d in ("forward", "backward") for t in LN_DTYPES.values()}, list(reports)
    _assert_no_spills(reports, arch)


@pytest.mark.parametrize("arch", LN_ARCHS)
def test_add_layer_norm_one_vector_configs_leave_room_for_their_threads(add_layer_norm_builds, arch):
    """The aligned one-vector configs (one 16-byte vector a thread) fit the registers that let
    their kernels keep many rows' loads in flight: the forward 40 a thread (1536 threads an SM),
    the backward 64 (1024). The configs they replaced took 58-72 (forward) and 93-96 (backward
    above hidden 1024), and the H200 timed the forward on them at 68-83% of copy bandwidth
    (csrc/add_layer_norm.cu, pick_config)."""
    returncode, cmd, output, cubin = add_layer_norm_builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    reports = _kernel_reports(output)
    budget = {"forward": 40, "backward": 64}
    one_vector = {name: info for name, info in _ln_kernels(reports).items() if info[2] > 1 and info[4] == 1}
    assert {(info[0], info[1], info[3]) for info in one_vector.values()} >= {
        (direction, dtype, threads) for direction in budget for dtype in LN_DTYPES.values()
        for threads in (32, 64, 128, 256, 512)}
    for name, info in one_vector.items():
        used = re.search(r"Used (\d+) registers", "\n".join(reports[name]))
        assert used and int(used.group(1)) <= budget[info[0]], f"{info} on {arch}: {used and used.group(0)}"


@pytest.mark.parametrize("arch", LN_ARCHS)
def test_add_layer_norm_uses_128bit_accesses(add_layer_norm_builds, arch):
    """Aligned configs (VW > 1) move every row element with 16-byte LDG.E.128 / STG.E.128: the only
    narrower global accesses are the two fp32 statistics per row (stored by the forward, loaded by
    the backward); unaligned configs (VW == 1) exist and are left scalar."""
    functions = re.split(r"\n\s*Function : ", _sass(*add_layer_norm_builds[arch]))[1:]
    sass = {chunk.split("\n", 1)[0].strip(): chunk for chunk in functions}
    kernels = _ln_kernels(sass)
    assert any(vw == 1 for _, _, vw, _, _ in kernels.values()), "no unaligned (VW == 1) config left"
    aligned = {name: info for name, info in kernels.items() if info[2] > 1}
    assert {(d, t) for d, t, *_ in aligned.values()} == {(d, t) for d in ("forward", "backward") for t in LN_DTYPES.values()}
    for name, (direction, dtype, vw, threads, vecs) in aligned.items():
        body = sass[name]
        accesses = re.findall(r"\b(LDG|STG)\.E((?:\.\w+)*)", body)
        wide = {op: sum(1 for o, mods in accesses if o == op and ".128" in mods) for op in ("LDG", "STG")}
        narrow = [op + ".E" + mods for op, mods in accesses if ".128" not in mods]
        what = f"{direction} {dtype} VW={vw} {threads}x{vecs} on {arch}"
        # Forward: x and residual (and weight, bias) per vector; backward: stream and dy (and weight).
        assert wide["LDG"] >= 2 * vecs, f"{what}: {wide['LDG']} LDG.E.128"
        assert wide["STG"] >= vecs, f"{what}: {wide['STG']} STG.E.128"
        assert not [a for a in narrow if re.search(r"\.(U8|S8|U16|S16|64)\b", a)], f"{what}: narrow accesses {narrow}"
        assert len(narrow) <= 2, f"{what}: {len(narrow)} 32-bit global accesses (mean and rstd are 2): {sorted(set(narrow))}"


def _wide_accesses(body) -> dict:
    """16-byte global loads and stores (LDG.E.128*, STG.E.128) in one kernel's SASS."""
    accesses = re.findall(r"\b(LDG|STG)\.E((?:\.\w+)*)", body)
    return {op: sum(1 for o, mods in accesses if o == op and ".128" in mods) for op in ("LDG", "STG")}


# gelu_{forward,backward}_kernel<T, VW> as mangled.
GELU_KERNEL = re.compile(r"gelu_(forward|backward)_kernelI(f|6__half|13__nv_bfloat16)Li(\d+)E")


@compile_ahead.build
def gelu_builds(tmp_path_factory):
    """gelu.cu built as the JIT extension builds it (-O3) for sm_90, with ptxas's report."""
    nvcc = _nvcc_or_skip()
    out = tmp_path_factory.mktemp("gelu")
    return _compile_all({"sm_90": _cubin_command(nvcc, "gelu.cu", "sm_90", [], out)}, timeout=300)["sm_90"]


def test_gelu_vector_kernels_move_16_bytes_an_access(gelu_builds):
    """The elementwise GELU and dGELU (every csrc/ Linear+GELU backward's dGELU, the cublaslt
    path's erf forward) move their elements in 16-byte LDG.E.128 / STG.E.128 where pointers are
    aligned; only their n % VW tail loop, and the VW = 1 kernels kept for unaligned pointers, go an
    element at a time. Before, every access of a 16-bit kernel was 2 bytes wide (LDG.E.U16)."""
    functions = re.split(r"\n\s*Function : ", _sass(*gelu_builds))[1:]
    kernels = {m.groups(): chunk for chunk in functions if (m := GELU_KERNEL.search(chunk.split("\n", 1)[0]))}
    assert {(d, t) for d, t, vw in kernels if int(vw) > 1} == {(d, t) for d in ("forward", "backward")
                                                            for t in LN_DTYPES}, list(kernels)
    assert all(int(vw) == 1 or int(vw) * (4 if t == "f" else 2) == 16 for _, t, vw in kernels)
    for (direction, dtype, vw), body in kernels.items():
        wide = _wide_accesses(body)
        what = f"{direction} {LN_DTYPES[dtype]} VW={vw}"
        if int(vw) > 1:  # pre (and dout) in, out: one 16-byte access each in the vector loop
            assert wide["LDG"] >= (2 if direction == "backward" else 1) and wide["STG"] >= 1, f"{what}: {wide}"
        else:
            assert wide == {"LDG": 0, "STG": 0}, f"{what}: {wide}"


# attention_backward_{preprocess_kernel<T, VW, G>, convert_dq_kernel<T, VW>} as mangled.
ROWS_KERNEL = re.compile(r"attention_backward_(preprocess|convert_dq)_kernelI(6__half|13__nv_bfloat16)Li(\d+)E")


@compile_ahead.build
def rows_builds(tmp_path_factory):
    """attention_backward_rows.cu built as the JIT extension builds it (-O3) for sm_90."""
    nvcc = _nvcc_or_skip()
    out = tmp_path_factory.mktemp("rows")
    return _compile_all({"sm_90": _cubin_command(nvcc, "attention_backward_rows.cu", "sm_90", [], out)},
                        timeout=300)["sm_90"]


def test_attention_backward_row_kernels_move_16_bytes_an_access(rows_builds):
    """The delta preprocess and the dq conversion around the CuTe and Hopper backwards: where rows
    are 16-byte aligned, O and dO come in 16-byte loads and the zeroed fp32 accumulator goes out
    in 16-byte stores (the preprocess was a warp a row at 2 bytes a lane), and dq is converted 8
    elements a step; the VW = 1 kernels, for other rows and pointers, have no 16-byte access.
    No spills."""
    returncode, cmd, output, _ = rows_builds
    assert returncode == 0, f"{cmd}\n{output}"
    _assert_no_spills(_kernel_reports(output), "sm_90")
    functions = re.split(r"\n\s*Function : ", _sass(*rows_builds))[1:]
    kernels = {}
    for chunk in functions:
        found = ROWS_KERNEL.search(chunk.split("\n", 1)[0])
        if found:
            kernels.setdefault(found.groups(), []).append(chunk)
    vector = {(kind, t) for kind, t, vw in kernels if vw == "8"}
    assert vector == {(kind, t) for kind in ("preprocess", "convert_dq") for t in ("6__half", "13__nv_bfloat16")}, kernels
    for (kind, dtype, vw), bodies in kernels.items():
        for body in bodies:  # the preprocess has one kernel per threads-a-row count
            wide = _wide_accesses(body)
            if vw == "8":  # O and dO in, zeros out; or two fp32 halves in, dq out
                assert wide["LDG"] >= 2 and wide["STG"] >= 1, f"{kind} {dtype}: {wide}"
            else:
                assert wide == {"LDG": 0, "STG": 0}, f"{kind} {dtype} VW=1: {wide}"


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


@compile_ahead.build
def cutlass_gemm_builds(tmp_path_factory):
    """The CUTLASS Linear+GELU files compiled as the JIT build compiles them (-O3, torch's nvcc
    flags), per architecture, with ptxas's report: for sm_80 as objects (the CPU test links their
    host code), for sm_90a as cubins (device code only: the host side is the same). At most
    FUSEFORMER_NVCC_JOBS at once (an sm_90a file takes ~4 GB of memory).
    {arch: (returncode, commands, output, [files])}."""
    nvcc = _nvcc_or_skip()
    include = _cutlass_include_or_skip("CUTLASS")
    out = tmp_path_factory.mktemp("cutlass_gemm")
    done = _compile_all({(arch, name): _cubin_command(nvcc, name, arch, [f"-I{include}"], out,
                                                      object_file=arch == "sm_80")
                         for arch in GEMM_ARCHS for name in CUTLASS_GEMM_FILES}, timeout=900)
    results = {}
    for arch in GEMM_ARCHS:
        parts = [done[(arch, name)] for name in CUTLASS_GEMM_FILES]
        failed = next((part for part in parts if part[0] != 0), None)
        results[arch] = (failed[0] if failed else 0, "\n".join(part[1] for part in parts),
                         "\n".join(part[2] for part in parts), [part[3] for part in parts])
    return results


def _gemm_build(builds, arch):
    returncode, cmd, output, files = builds[arch]
    assert returncode == 0, f"{cmd}\n{output}"
    return output, files


@pytest.mark.parametrize("arch", GEMM_ARCHS)
def test_cutlass_gemm_compiles_without_spills(cutlass_gemm_builds, arch):
    output, _ = _gemm_build(cutlass_gemm_builds, arch)
    reports = _kernel_reports(output)
    kernels = {name: lines for name, lines in reports.items() if _gemm_kind(name)}
    kinds = [_gemm_kind(name) for name in kernels]
    assert kinds.count("sm80") == SM80_KERNELS and kinds.count("sm90") == SM90_KERNELS, list(reports)
    # The real kernels: not sm_80's images of the sm90 ones (CUTLASS's printf stubs use a stack frame).
    _assert_no_spills({n: lines for n, lines in kernels.items() if _gemm_kind(n) == "sm80" or arch == "sm_90a"}, arch)
    stubs = {n: lines for n, lines in kernels.items() if not (_gemm_kind(n) == "sm80" or arch == "sm_90a")}
    for name, lines in stubs.items():
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", "\n".join(lines)), f"{name} spills on {arch}"


def _sass_functions(obj):
    functions = re.split(r"\n\s*Function : ", _sass(0, "", "", obj))[1:]
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


GELU_PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include "linear_gelu_cutlass.cuh"

// The epilogue's GELU functors on the host (their maths with exact division and exp2 where the
// device runs rcp.approx and ex2.approx) against float64 over [-14, 14]: the largest error
// scaled by max(|gelu|, 1), and the largest relative error where |gelu| > 1e-5, of the erf
// GELU, of erff's 0.5 x (1 + erf) and of the tanh GELU (against the tanh formula in float64).
int main() {
  using namespace fuseformer::cutlass_gelu;
  double worst[3] = {0, 0, 0}, tail[3] = {0, 0, 0};
  for (int i = 0; i <= 200000; ++i) {
    const float x = -14.f + 28.f * static_cast<float>(i) / 200000.f;
    const double xd = x, erf_ref = xd * 0.5 * std::erfc(-xd / std::sqrt(2.0));
    const double tanh_ref = xd * 0.5 * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (xd + 0.044715 * xd * xd * xd)));
    const double got[3] = {gelu_erf(x), 0.5 * x * (1.0f + erff(x * 0.70710678118654752f)), gelu_tanh(x)};
    const double ref[3] = {erf_ref, erf_ref, tanh_ref};
    for (int k = 0; k < 3; ++k) {
      const double err = std::fabs(got[k] - ref[k]);
      worst[k] = std::fmax(worst[k], err / std::fmax(std::fabs(ref[k]), 1.0));
      if (std::fabs(ref[k]) > 1e-5) tail[k] = std::fmax(tail[k], err / std::fabs(ref[k]));
    }
  }
  std::printf("%.6g %.6g %.6g %.6g %.6g %.6g\n", worst[0], tail[0], worst[1], tail[1], worst[2], tail[2]);
  return 0;
}
"""


def test_cutlass_gelu_epilogue_maths_on_the_cpu(tmp_path):
    """The CUTLASS epilogue's GELUs (the Triton kernels' fast form) compiled for the host. erf,
    by the fitted polynomial: within 3.2e-6 of float64 (errors scaled by max(|gelu|, 1)), as
    the Triton form is held to, and not erff's 0.5 x (1 + erf) in disguise (that form is
    within 1e-6 overall and off by more than 1e-3 relative in the negative tail). tanh: the
    formula itself, to fp32 rounding."""
    nvcc = _nvcc_or_skip()
    include = _cutlass_include_or_skip("CUTLASS")
    source = tmp_path / "gelu.cu"
    source.write_text(GELU_PROGRAM)
    program = tmp_path / "gelu"
    _run([nvcc, "-std=c++17", f"-I{CSRC}", f"-I{include}", str(source), "-o", str(program)], timeout=300)
    result = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    ours, ours_tail, erff_form, erff_tail, tanh, tanh_tail = map(float, result.stdout.split())
    assert 1e-6 < ours <= 3.2e-6, ours
    assert erff_form < 1e-6 and erff_tail > 1e-3, (erff_form, erff_tail)
    assert tanh < 1e-6 and tanh_tail < 1e-4, (tanh, tanh_tail)
