"""fuseformer: fused Triton / CUDA C++ kernels for transformer layers.

A plain `pip install -e .` is pure Python. The CUDA C++ backend in csrc/ is JIT-built with
ninja on first use; set FUSEFORMER_BUILD_CUDA=1 (with --no-build-isolation, so the installed
torch is used) to compile it ahead of time instead. Both builds need the CUTLASS/CuTe headers of
the `nvidia-cutlass` package (the `cuda` extra), found through the installed package.
"""
import os

from setuptools import setup

# Three subpackages of one import namespace: nothing we ship is importable as a bare
# `kernels` or `models` that could collide with a user's own module.
PACKAGES = {
    "fuseformer.kernels": "kernels",
    "fuseformer.models": "models",
    "fuseformer.bench": "bench",
    # Sources only: the JIT build (kernels/cuda_backend.py) compiles them on first use.
    "fuseformer.csrc": "csrc",
}

ext_modules, cmdclass = [], {}
if os.environ.get("FUSEFORMER_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    import glob
    import importlib.util
    import pathlib

    # The headers ship inside the package (cutlass_library/source/include); locate them without
    # importing its Python side, and refuse the build with the fix when they are missing.
    spec = importlib.util.find_spec("cutlass_library")
    includes = [pathlib.Path(f) / "source" / "include" for f in (spec.submodule_search_locations or [])] if spec else []
    includes = [str(i) for i in includes if (i / "cute" / "tensor.hpp").is_file()]
    if not includes:
        raise SystemExit("FUSEFORMER_BUILD_CUDA=1 needs the nvidia-cutlass package (pip install nvidia-cutlass) for its CuTe headers")

    # CUTLASS's Hopper FMHA collectives (csrc/attention_sm90.cuh) sit beside the include folder;
    # their kernels are compiled only for an arch list naming 9.0a (TORCH_CUDA_ARCH_LIST).
    fmha = pathlib.Path(includes[0]).parent / "examples" / "88_hopper_fmha"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";")
    sm90a = ["-DFUSEFORMER_SM90A"] if "9.0a" in arch_list and fmha.is_dir() else []
    # The CUTLASS GEMM module (kernels/cuda_backend.py: GEMM_SOURCES) is an extension of its own:
    # its CUTLASS 3 sm_90a instantiations take minutes, and the JIT build compiles it only when
    # FUSEFORMER_CUDA_LINEAR_GELU=cutlass asks for it.
    gemm_sources = ["csrc/bindings_gemm.cpp"] + sorted(glob.glob("csrc/linear_gelu_cutlass*.cu"))
    # No --use_fast_math: it may swap tanhf/expf for approximations that break the fp32
    # parity of the GELU kernels (kernels/cuda_backend.py's JIT build uses the same flags).
    nvcc_flags = ["-O3", "-lineinfo"]
    ext_modules = [
        CUDAExtension(
            name="fuseformer._C",
            sources=sorted(set(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu")) - set(gemm_sources)),
            include_dirs=includes[:1] + ([str(fmha)] if fmha.is_dir() else []),
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags + sm90a},
        ),
        CUDAExtension(
            name="fuseformer._C_gemm",
            sources=gemm_sources,
            include_dirs=includes[:1],
            # Ampere's kernels for sm_80 (and 8.6/8.9 run them), both paths for Hopper: wgmma
            # and TMA need the arch-specific sm_90a. Explicit, so torch adds no list of its own.
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags + [
                "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]},
        ),
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="fuseformer",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for attention, add+LayerNorm and Linear+GELU",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"fuseformer.bench": ["*.json"], "fuseformer.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "rich", "matplotlib", "safetensors"],
    extras_require={
        "hf": ["transformers>=5,<6"],
        "cuda": ["pybind11", "ninja", "nvidia-cutlass"],
        "dev": [
            "pytest>=8",
            "pytest-xdist",
            "pytest-benchmark",
            "hypothesis",
            "transformers>=5,<6",
            "pybind11",
            "ninja",
            "nvidia-cutlass",
        ],
    },
    entry_points={"console_scripts": ["fuseformer = fuseformer.bench.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
