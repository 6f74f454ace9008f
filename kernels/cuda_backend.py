"""The `cuda` backend: the CUDA C++ kernels of csrc/, built as a torch extension.

Loading, on the first call of `unavailable_reason()` (never at import):
  1. `fuseformer._C`, the ahead-of-time build
     (FUSEFORMER_BUILD_CUDA=1 pip install --no-build-isolation -e .);
  2. otherwise a JIT build of csrc/ with torch.utils.cpp_extension.load (ninja), cached by
     torch under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and rebuilt only when a
     source changes. The first build takes minutes; a message says so while it runs.
Any failure (no CUDA torch, no device, no nvcc, no ninja, no `nvidia-cutlass` package, a compile
error) makes the backend unavailable with that reason; the package itself keeps working on
triton / torch. csrc/ builds on the CuTe headers that pip's `nvidia-cutlass` ships
(cutlass_library/source/include); they are found through the installed package, whose Python
code is never imported.

Attention forward kernel, chosen at import by FUSEFORMER_CUDA_ATTENTION (or
`set_variant(attention=...)` / `variant(attention=...)`, as the benchmark and the tests do). Measured on
an H100 (bench/results/h100/, bf16, 2026-11-26; parity passed in every case), `sm90` is the
default: faster than `cute` wherever it runs, and `cute` faster than `wmma` in all 14 cases
(2.5x-6.9x).
  sm90  (default) csrc/attention_sm90*.cu, FlashAttention-3's structure from CUTLASS's Hopper FMHA
        collectives (TMA, warp-specialized wgmma), on compute capability 9.0 for fp16/bf16,
        head dims 64/128, causal or not, no mask, no GQA, Lq % 8 == 0; every other call (and
        every call on another GPU, or a build without sm_90a) takes the cute kernel at head
        dims 64/128, else wmma. d128 L4096: 0.417 ms, 659 TFLOP/s, cuDNN 0.414 ms.
  cute  csrc/attention_cute.cu, FlashAttention-2's structure on CuTe (register accumulators,
        mma.sync, cp.async), head dims CUTE_HEAD_DIMS; other head dims keep the wmma kernel.
  wmma  csrc/attention_forward.cu, the first kernel (WMMA fragments, scores through shared
        memory): 5-17x slower than sm90; kept for head dims the others lack.
The backward follows the same switch: under `cute` and `sm90`, at CUTE_HEAD_DIMS,
csrc/attention_cute_backward.cu (FlashAttention-2's backward on CuTe); otherwise
csrc/attention_backward.cu. Every backward takes every forward's out and lse (same
conventions). Under `cute` and `sm90` a second switch, FUSEFORMER_CUDA_ATTENTION_BACKWARD
(`set_variant(attention_backward=...)`), picks between:
  cute  (default, the measured one) the CuTe backward above.
  sm90  csrc/attention_sm90_backward.cuh: FlashAttention-3's backward structure from CUTLASS's
        Hopper FMHA backward collective (TMA loads, warp-specialized wgmma, dQ by TMA
        reduce-add into fp32), over the sm90 forward's scope (compute capability 9.0, no mask,
        no GQA, Lq % 8 == 0); other calls take the CuTe backward. Built and compile-checked
        (tests/test_csrc_compile.py), not yet run on a GPU: opt-in until a GPU run times it.

Linear+GELU forward, chosen at import by FUSEFORMER_CUDA_LINEAR_GELU (or
`set_variant(linear_gelu=...)` / `variant(linear_gelu=...)`):
  auto     (default since the H200 run of 2026-11-27) cutlass for erf GELU, cublaslt for tanh: the
           faster of the two for each GELU in both GPU runs (below).
  cublaslt tanh through cuBLASLt's GELU epilogue, erf as GEMM + bias and gelu.cu.
  cutlass  csrc/linear_gelu_cutlass*.cu: one CUTLASS GEMM with bias + GELU (erf or tanh) and the
           pre-activation store (only when autograd needs it) fused into its epilogue; CUTLASS 3
           TMA warp-specialized on compute capability 9.0, CUTLASS 2 elsewhere (sm_80+). A second
           extension, fuseformer_cuda_gemm (fuseformer._C_gemm ahead of time), JIT-built only
           once this kernel is selected (about a minute of nvcc for sm_90a). fp16/bf16 with K and N
           multiples of 8 and 16-byte aligned data; other cases, or a failed build (one warning),
           keep the cublaslt path. H100, bf16, 16384x768x3072: erf 0.185 ms against cublaslt's
           0.258 (GEMM, then gelu.cu), tanh 0.166 against cuBLASLt's epilogue 0.136, erf
           forward+backward 0.627 against 0.686. H200 (bench/results/h200/2026-11-27-5e53e2b/): erf 0.1711 against
           0.2501 at 768 -> 3072 and 0.3008 against 0.3731 at 1024 -> 4096, erf forward+backward
           0.598 against 0.754; tanh 0.1712 against the epilogue's 0.1332. Hence `auto`. Its
           module is a second build (one to three minutes of nvcc the first time on a machine):
           under `cutlass` at the backend's availability check, under `auto` at its first erf
           forward, and only when the cuda backend is named (the backend 'auto' never takes the
           cuda Linear+GELU). Where it cannot be built (no nvidia-cutlass, no sm_90a), `auto`
           keeps cuBLASLt quietly and `cutlass` warns once.
The backward is the same for both: gelu.cu's dGELU from the stored pre-activation + torch.mm.

What the kernels cover (anything else is refused by `unsupported`, so `auto` passes over the
backend and naming it explicitly raises BackendUnsupportedError with the reason):
  attention       forward and backward, fp16/bf16, head dims ATTENTION_HEAD_DIMS, causal and/or
                  a key-padding mask, GQA; no dropout, no dense masks.
  add_layer_norm  forward and backward, fp16/bf16/fp32, hidden <= LAYER_NORM_MAX_HIDDEN, no dropout.
  linear_gelu     forward and backward, fp16/bf16/fp32; tanh GELU through cuBLASLt's GELU
                  epilogue, erf GELU as GEMM + bias and a fused elementwise kernel.

STATUS: run on an H100 on 2026-11-26 (bench/results/h100/) and an H200 on 2026-11-27 and
2026-11-28 (bench/results/h200/ and its dated folders): every op passed parity in the benchmark,
and on the H200 all 435 csrc/ gpu tests passed (the argument checks that crashed on the H100
included); compute-sanitizer's memcheck and racecheck ran clean on the first parametrization
of each csrc/ gpu test on 2026-11-27 (bench/results/h200/2026-11-27-a3eeca9/sanitizer.txt).
`auto` takes the cuda backend only where those results show it faster than triton and only
once the module is loaded (it never builds it): attention inference at head dim 128 on Hopper
(`_attention_auto_unsupported`) and add+LayerNorm in training
(`_add_layer_norm_auto_unsupported`).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pathlib
import shutil
import sys
import threading
import warnings

import torch

from . import backends
from ._util import poison_enabled
from .backends import BackendUnsupportedError, Impl

# Mirrors of what csrc/ is built for (a gpu test checks them against the module), so that
# `unsupported` answers without touching the extension.
ATTENTION_HEAD_DIMS = (16, 32, 64, 80, 96, 128)
LAYER_NORM_MAX_HIDDEN = 8192
SOURCES = (
    "bindings.cpp",
    "cublaslt_gelu.cpp",
    "add_layer_norm.cu",
    "gelu.cu",
    "attention_forward.cu",
    "attention_backward.cu",
    "attention_cute.cu",
    "attention_cute_backward.cu",
    "attention_backward_rows.cu",
    "attention_sm90.cu",
    "attention_sm90_f16_d64.cu",
    "attention_sm90_f16_d128.cu",
    "attention_sm90_bf16_d64.cu",
    "attention_sm90_bf16_d128.cu",
    "attention_sm90_bwd_f16_d64.cu",
    "attention_sm90_bwd_f16_d128.cu",
    "attention_sm90_bwd_bf16_d64.cu",
    "attention_sm90_bwd_bf16_d128.cu",
)
# The CUTLASS GEMM module: its own extension, so the main one builds without CUTLASS 3.
# One translation unit per sm90 dtype: ninja compiles the slow CUTLASS 3 instantiations at once.
GEMM_SOURCES = ("bindings_gemm.cpp", "linear_gelu_cutlass.cu", "linear_gelu_cutlass_sm90_bf16.cu",
                "linear_gelu_cutlass_sm90_f16.cu")
GEMM_EXTENSION_NAME = "fuseformer_cuda_gemm"
ATTENTION_KERNELS = ("sm90", "cute", "wmma")  # [0] is the default
ATTENTION_BACKWARD_KERNELS = ("cute", "sm90")  # [0] is the default
LINEAR_GELU_KERNELS = ("auto", "cublaslt", "cutlass")  # [0] is the default
# Mirror of attention_{forward,backward}_cute_supports_head_dim (a gpu test compares).
CUTE_HEAD_DIMS = (64, 128)
EXTENSION_NAME = "fuseformer_cuda"
# The same flags as setup.py's ahead-of-time build. No --use_fast_math: it may replace tanhf
# and expf with approximations, and the fp32 GELU kernels must meet fp32 parity.
CUDA_FLAGS = ["-O3", "-lineinfo"]



# The kernel switches (see the module docstring), read once from FUSEFORMER_CUDA_ATTENTION and
# FUSEFORMER_CUDA_LINEAR_GELU at import; set_variant(attention=, linear_gelu=) or the `variant`
# context change them (the benchmark and the tests do). Changing linear_gelu builds nothing:
# the CUTLASS module is built at the next availability check or forward.
VARIANT = backends.Variants(
    "cuda",
    {"attention": ATTENTION_KERNELS, "attention_backward": ATTENTION_BACKWARD_KERNELS, "linear_gelu": LINEAR_GELU_KERNELS},
    {"attention": "FUSEFORMER_CUDA_ATTENTION", "attention_backward": "FUSEFORMER_CUDA_ATTENTION_BACKWARD",
     "linear_gelu": "FUSEFORMER_CUDA_LINEAR_GELU"})
set_variant = VARIANT.set
variant = VARIANT.using


def cutlass_include() -> pathlib.Path | None:
    """The CUTLASS/CuTe include folder of the installed `nvidia-cutlass` package, found without
    importing it (its Python side is a kernel generator we do not need), or None."""
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        include = pathlib.Path(folder) / "source" / "include"
        if (include / "cute" / "tensor.hpp").is_file():
            return include
    return None


def cutlass_fmha_include(include: pathlib.Path | None) -> pathlib.Path | None:
    """The folder of CUTLASS's Hopper FMHA collectives (examples/88_hopper_fmha, shipped beside
    the include folder), which csrc/attention_sm90.cuh builds on; None when this package
    version lacks it (the sm90 attention is then not compiled)."""
    if include is None:
        return None
    folder = include.parent / "examples" / "88_hopper_fmha"
    return folder if (folder / "kernel" / "fmha_kernel_builder.hpp").is_file() else None


def sm90a_flags(arch_list: str | None, capabilities: set) -> list[str]:
    """nvcc flags that compile the sm_90a attention (csrc/attention_sm90.cuh): with
    TORCH_CUDA_ARCH_LIST set, only when it names 9.0a (torch then emits the gencode); unset,
    when every visible GPU is compute capability 9.0, whose build then targets sm_90a instead
    of torch's default sm_90 (flags naming an arch stop torch adding its own)."""
    if arch_list:
        return ["-DFUSEFORMER_SM90A"] if "9.0a" in arch_list.replace(" ", ";").split(";") else []
    if capabilities == {(9, 0)}:
        return gemm_arch_flags((9, 0)) + ["-DFUSEFORMER_SM90A"]
    return []


CUTLASS_MISSING = "the nvidia-cutlass package is not installed (pip install nvidia-cutlass): csrc/ needs its CuTe headers"


_lock = threading.Lock()
_module = None
_reason: str | None = None
_tried = False


def source_dir() -> pathlib.Path | None:
    """The folder holding csrc/'s sources (both modules'): <repo>/csrc in a checkout or editable
    install, the `fuseformer.csrc` package data in an installed wheel."""
    candidates = [pathlib.Path(__file__).resolve().parent.parent / "csrc"]
    try:
        # csrc/ holds no __init__.py: a namespace package, whose folders find_spec lists.
        spec = importlib.util.find_spec("fuseformer.csrc")
        candidates += [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    except (ImportError, ValueError, OSError):
        pass
    for folder in candidates:
        if all((folder / name).is_file() for name in SOURCES + GEMM_SOURCES):
            return folder
    return None


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _check_toolchain():
    """The csrc/ folder and the CUTLASS include folder, or RuntimeError with the missing piece."""
    from torch.utils import cpp_extension

    if _nvcc() is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME to a CUDA toolkit, or build ahead of time)")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise RuntimeError("ninja not found (pip install ninja), needed to JIT-build csrc/") from None
    folder = source_dir()
    if folder is None:
        raise RuntimeError("the csrc/ sources were not found next to the package")
    include = cutlass_include()
    if include is None:
        raise RuntimeError(CUTLASS_MISSING)
    return folder, include


def _jit_build():
    from torch.utils import cpp_extension

    folder, include = _check_toolchain()
    print(
        "fuseformer: loading the cuda backend (the first use compiles csrc/ with nvcc, a few minutes; "
        "later runs load it from torch's extension cache) ...",
        file=sys.stderr,
        flush=True,
    )
    includes, flags = [str(include)], list(CUDA_FLAGS)
    fmha = cutlass_fmha_include(include)
    if fmha is not None:
        capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        includes.append(str(fmha))
        flags += sm90a_flags(os.environ.get("TORCH_CUDA_ARCH_LIST"), capabilities)
    module = cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(folder / name) for name in SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=flags,
        extra_include_paths=includes,
        verbose=os.environ.get("FUSEFORMER_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    print("fuseformer: cuda backend ready.", file=sys.stderr, flush=True)
    return module


# FUSEFORMER_CUDA_NO_BUILD=1: use an ahead-of-time build only, never start the JIT one (the
# benchmark's compile-cache prewarm runs with it: processes that would queue behind a build in
# progress for minutes skip the cuda backend instead, which autotunes nothing).
_NO_BUILD = backends._env_flag("FUSEFORMER_CUDA_NO_BUILD")


def _load() -> None:
    global _module, _reason, _tried
    with _lock:
        if _tried:
            return
        _tried = True
        # `auto` decisions made while the module was absent are re-made once it is here.
        backends.clear_plans()
        try:
            _module = importlib.import_module("fuseformer._C")
            return
        except ImportError:
            pass  # no ahead-of-time build: JIT below
        if _NO_BUILD:
            _reason = "no ahead-of-time build of csrc/ (fuseformer._C), and FUSEFORMER_CUDA_NO_BUILD=1 forbids the JIT one"
            return
        try:
            _module = _jit_build()
        except Exception as err:  # noqa: BLE001 - any build failure becomes the reason
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            # torch's message starts "Error building extension ..."; the compiler's first error
            # line is the useful part.
            detail = next((line for line in lines[1:] if "error" in line.lower()), None)
            _reason = f"the csrc/ extension could not be built: {lines[0]}" + (f" ({detail})" if detail else "")
            print(f"fuseformer: {_reason}\n{err}", file=sys.stderr, flush=True)


_no_aot_build = False  # fuseformer._C failed to import once: not asked again


def loaded_without_build() -> bool:
    """Whether the module is loaded, or an ahead-of-time build (fuseformer._C) imports: what
    `auto` may use. Never starts the JIT build."""
    global _no_aot_build
    if _module is not None:
        return True
    if _tried or _no_aot_build or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("fuseformer._C")
    except ImportError:
        _no_aot_build = True
        return False
    _load()  # imports the module just found; no build
    return _module is not None


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None when it can (this builds it the first time,
    and the CUTLASS GEMM module too when FUSEFORMER_CUDA_LINEAR_GELU=cutlass selects it; that
    one failing only keeps Linear+GELU on cuBLASLt)."""
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    _load()
    if _reason is None and VARIANT["linear_gelu"] == "cutlass":
        _load_gemm()
    return _reason


def module():
    """The loaded extension; BackendUnsupportedError when it is unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnsupportedError(f"backend 'cuda' is unavailable: {reason}")
    _module.set_poison(poison_enabled())
    return _module


# ----------------------------------------------------------------------------- CUTLASS GEMM module

_gemm_module = None
_gemm_reason: str | None = None
_gemm_tried = False


def gemm_arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc's -gencode for the CUTLASS module on a device of this compute capability: sm_90a on
    9.0 (wgmma and TMA need the arch-specific target, and plain sm_90 would get CUTLASS's stubs),
    the device's own sm_XY elsewhere (the CUTLASS 2 kernels only). One architecture, not torch's
    list: this build is the slow one."""
    major, minor = capability
    if major < 8:
        raise RuntimeError(f"the CUTLASS kernels need compute capability 8.0 or newer, this device is {major}.{minor}")
    arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _jit_build_gemm():
    from torch.utils import cpp_extension

    folder, include = _check_toolchain()
    arch = gemm_arch_flags(torch.cuda.get_device_capability())
    print(
        "fuseformer: building the CUTLASS Linear+GELU (FUSEFORMER_CUDA_LINEAR_GELU=cutlass; the first build "
        "takes a minute or two, later runs load it from torch's extension cache) ...",
        file=sys.stderr,
        flush=True,
    )
    module = cpp_extension.load(
        name=GEMM_EXTENSION_NAME,
        sources=[str(folder / name) for name in GEMM_SOURCES],
        extra_cflags=["-O3"],
        extra_cuda_cflags=CUDA_FLAGS + arch,
        extra_include_paths=[str(include)],
        verbose=os.environ.get("FUSEFORMER_VERBOSE_BUILD", "0") not in ("", "0"),
    )
    print("fuseformer: CUTLASS Linear+GELU ready.", file=sys.stderr, flush=True)
    return module


def _load_gemm() -> None:
    global _gemm_module, _gemm_reason, _gemm_tried
    with _lock:
        if _gemm_tried:
            return
        _gemm_tried = True
        try:
            try:
                _gemm_module = importlib.import_module("fuseformer._C_gemm")
            except ImportError:
                _gemm_module = _jit_build_gemm()
            # Asked once here, cached in the module: the device's paths, and on 9.0 whether the
            # build holds sm_90a code (a device read that must not happen inside a graph capture).
            if not _gemm_module.paths(torch.cuda.current_device()):
                raise RuntimeError("this device runs neither CUTLASS path (compute capability below 8.0)")
        except Exception as err:  # noqa: BLE001 - as _load: any failure becomes the reason
            _gemm_module = None
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = next((line for line in lines[1:] if "error" in line.lower()), None)
            _gemm_reason = f"the CUTLASS GEMM extension could not be loaded: {lines[0]}" + (f" ({detail})" if detail else "")
            print(f"fuseformer: {_gemm_reason}\n{err}", file=sys.stderr, flush=True)


def gemm_unavailable_reason() -> str | None:
    """Why the CUTLASS GEMM module cannot run here, or None (this builds it the first time)."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    _load_gemm()
    return _gemm_reason


def gemm_module():
    """The loaded CUTLASS GEMM module; BackendUnsupportedError when it is unavailable."""
    reason = gemm_unavailable_reason()
    if reason is not None:
        raise BackendUnsupportedError(f"the CUTLASS Linear+GELU is unavailable: {reason}")
    _gemm_module.set_poison(poison_enabled())
    return _gemm_module


# ----------------------------------------------------------------------------- attention


def key_padding_args(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From a key-padding mask view (B, H, Lq, Lk) whose heads and rows broadcast: the kernel's
    (B, Lk) fp32 additive bias, and per batch one past the last attended key (int32, (B,)),
    so that the kernel skips the padded tail. Small torch ops, no host sync."""
    keys = mask[:, 0, 0, :]  # (B, Lk)
    if keys.dtype == torch.bool:
        allowed = keys
        bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill_(~keys, float("-inf"))
    else:
        bias = keys.to(torch.float32).contiguous()
        allowed = ~torch.isneginf(bias)
    Lk = keys.shape[-1]
    if Lk == 0:
        return bias, None
    # argmax returns the first maximum: on the flipped row, the last attended key.
    last_from_right = allowed.flip(-1).to(torch.int32).argmax(-1)
    key_end = torch.where(allowed.any(-1), Lk - last_from_right, 0).to(torch.int32).contiguous()
    return bias, key_end


def _attention_forward(q, k, v, mask, is_causal, scale, dropout_p, seed):
    if dropout_p:
        raise BackendUnsupportedError("backend 'cuda' cannot run attention: dropout is not implemented in the cuda backend")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_bias, key_end = (None, None) if mask is None else key_padding_args(mask)
    # The kernel reads rows through their strides but needs each row contiguous.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    ext = module()
    if VARIANT["attention"] == "sm90":  # takes every call: the ones its kernels do not fit go to cute/wmma
        forward = ext.attention_forward_sm90
    elif VARIANT["attention"] == "cute" and q.shape[-1] in CUTE_HEAD_DIMS:
        forward = ext.attention_forward_cute
    else:
        forward = ext.attention_forward
    return forward(q, k, v, key_bias, key_end, bool(is_causal), scale)


def _attention_backward(dout, q, k, v, out, lse, mask, is_causal, scale, dropout_p, seed):
    if dropout_p:
        raise BackendUnsupportedError("backend 'cuda' cannot run attention: dropout is not implemented in the cuda backend")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    key_bias, key_end = (None, None) if mask is None else key_padding_args(mask)
    dout, q, k, v, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (dout, q, k, v, out))
    ext = module()
    if VARIANT["attention"] in ("cute", "sm90") and q.shape[-1] in CUTE_HEAD_DIMS:
        # delta = rowsum(dout * out) is their own preprocess kernel (csrc/attention_backward_rows.cu);
        # the Hopper entry hands the calls its kernels do not fit to the CuTe backward.
        backward = ext.attention_backward_sm90 if VARIANT["attention_backward"] == "sm90" else ext.attention_backward_cute
        return backward(dout, q, k, v, out, lse.contiguous(), key_bias, key_end, bool(is_causal), scale)
    # delta_i = sum_d dout_id * out_id: one cheap row reduction, kept out of the WMMA kernels.
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    return ext.attention_backward(dout, q, k, v, lse.contiguous(), delta, key_bias, key_end, bool(is_causal), scale)


def _attention_unsupported(dtype=None, head_dim=None, mask_kind="none", dropout_p=0.0, requires_grad=False,
                           is_causal=False, gqa=False, **_):
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}: the cuda attention kernel takes float16 and bfloat16"
    if head_dim not in ATTENTION_HEAD_DIMS:
        return f"head dim {head_dim} has no cuda kernel (built for {', '.join(map(str, ATTENTION_HEAD_DIMS))})"
    if mask_kind not in ("none", "key_padding"):
        return f"{mask_kind} masks: the cuda kernel takes key-padding masks only"
    if dropout_p:
        return "dropout is not implemented in the cuda backend"
    return None


# ----------------------------------------------------------------------------- add + LayerNorm


def _contiguous(t):
    return None if t is None else t.contiguous()


def _add_layer_norm_forward(x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True):
    if dropout_p:
        raise BackendUnsupportedError("backend 'cuda' cannot run add_layer_norm: dropout is not implemented in the cuda backend")
    return module().add_layer_norm_forward(
        x.contiguous(), _contiguous(residual), _contiguous(weight), _contiguous(bias), float(eps), bool(save_stream),
        bool(save_stats),
    )


def _add_layer_norm_backward(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual):
    if dropout_p:
        raise BackendUnsupportedError("backend 'cuda' cannot run add_layer_norm: dropout is not implemented in the cuda backend")
    return module().add_layer_norm_backward(
        dy.contiguous(), _contiguous(dstream), stream.contiguous(), _contiguous(weight), mean, rstd,
        bias is not None, bool(has_residual),
    )


def _add_layer_norm_unsupported(dtype=None, hidden=None, dropout_p=0.0, requires_grad=False, **_):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the cuda kernels take float16, bfloat16, float32"
    if hidden is not None and not 1 <= hidden <= LAYER_NORM_MAX_HIDDEN:
        return f"hidden size {hidden} is outside the cuda kernel's 1..{LAYER_NORM_MAX_HIDDEN}"
    if dropout_p:
        return "dropout is not implemented in the cuda backend"
    return None


def _loaded_on_hopper(device) -> str | None:
    """The conditions every `auto` rule of this backend shares: a compute capability 9.0
    device (where the GPU runs measured it) and the module already loaded (`auto` never builds
    it); None when both hold, else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "measured on compute capability 9.0 only"
    if not loaded_without_build():
        return "the csrc/ module is not loaded (auto never builds it: backend='cuda' or an ahead-of-time build does)"
    return None


def _add_layer_norm_auto_unsupported(device, dtype=None, hidden=None, dropout_p=0.0, requires_grad=False, **_):
    """Where `auto` takes this backend's add+LayerNorm over triton's: training (the forward
    and backward of one call), where both GPU runs measured it faster, and only with the
    module already loaded. bf16, 16384 rows, forward+backward: H200 (bench/results/h200/2026-11-27-5e53e2b/)
    0.610 against 0.726 ms eagerly at hidden 768 and 0.324 against 0.429 at 4096, 0.0665
    against 0.0776 and 0.293 against 0.354 in CUDA graphs (the backward kernel: 30 against
    41 µs at 768); H100 0.211 against 0.853 and 0.454 against 0.644. Inference stays on triton
    (its forward was the faster: 0.0262 against 0.0311 ms at 768, 0.102 against 0.123 at 4096).
    Those figures are of csrc/add_layer_norm.cu before its row configs changed (one 16-byte vector
    a thread: more rows in flight an SM; the backward at hidden 768 kept as timed); the bench
    times both backends side by side, and the next GPU run decides whether this rule stands."""
    if not (requires_grad and dtype in (torch.float16, torch.bfloat16) and not dropout_p
            and hidden is not None and 768 <= hidden <= 4096):
        return "measured faster than triton only for fp16/bf16 training at hidden 768..4096 without dropout"
    return _loaded_on_hopper(device)


# ----------------------------------------------------------------------------- Linear + GELU


def cutlass_linear_gelu_reason(x2d, weight, bias) -> str | None:
    """Why the CUTLASS Linear+GELU cannot take these (contiguous) tensors, or None. Attribute
    reads only: no sync, cheap enough for every call."""
    if x2d.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {x2d.dtype}: the CUTLASS kernels take float16 and bfloat16"
    K, N = x2d.shape[1], weight.shape[0]
    if K == 0 or N == 0 or K % 8 or N % 8:
        return f"in_features {K} and out_features {N} must be positive multiples of 8 for the CUTLASS kernels"
    if any(t is not None and t.data_ptr() % 16 for t in (x2d, weight, bias)):
        return "the CUTLASS kernels need 16-byte aligned data"
    return None


_cutlass_warned = False


def _cutlass_module_or_none():
    """The CUTLASS module, or None when it cannot be built here: after one warning where the
    switch names it (`cutlass`), quietly under `auto`, whose other path is the measured default
    of a machine without it."""
    global _cutlass_warned
    if _gemm_module is not None:  # the common case: two attribute reads and a bool set
        _gemm_module.set_poison(poison_enabled())
        return _gemm_module
    reason = gemm_unavailable_reason()
    if reason is None:
        return gemm_module()
    if not _cutlass_warned and VARIANT["linear_gelu"] == "cutlass":
        _cutlass_warned = True
        warnings.warn(f"fuseformer: the cuda backend's cutlass Linear+GELU is selected, but {reason}; "
                      "Linear+GELU keeps the cuBLASLt path", stacklevel=4)
    return None


def _cutlass_chosen(approximate: str) -> bool:
    """Does the Linear+GELU switch pick the CUTLASS kernel for this GELU (see the docstring)?"""
    kernel = VARIANT["linear_gelu"]
    return kernel == "cutlass" or (kernel == "auto" and approximate == "none")


def _linear_gelu_forward(x2d, weight, bias, approximate, save_preact):
    x2d, weight, bias = x2d.contiguous(), weight.contiguous(), _contiguous(bias)
    if _cutlass_chosen(approximate) and cutlass_linear_gelu_reason(x2d, weight, bias) is None:
        gemm = _cutlass_module_or_none()
        if gemm is not None:
            return gemm.linear_gelu_forward(x2d, weight, bias, approximate, bool(save_preact))
    return module().linear_gelu_forward(x2d, weight, bias, approximate, bool(save_preact))


def _linear_gelu_backward(dout, x2d, weight, preact, approximate, has_bias):
    return module().linear_gelu_backward(dout, x2d.contiguous(), weight.contiguous(), preact, approximate, bool(has_bias))


def _linear_gelu_unsupported(dtype=None, in_features=None, out_features=None, approximate="none", requires_grad=False, **_):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the cuda kernels take float16, bfloat16, float32"
    if approximate not in ("none", "tanh"):
        return f"approximate={approximate!r} (the cuda kernels take 'none' and 'tanh')"
    return None


def _attention_auto_unsupported(device, dtype=None, head_dim=None, mask_kind="none", dropout_p=0.0,
                                requires_grad=False, is_causal=False, gqa=False, lq_multiple_of_8=False, **_):
    """Where `auto` takes this backend's attention over triton's: the cases the H100 run
    (bench/results/h100/, bf16, 2026-11-26) measured faster, and only with the module already
    loaded. Head dim 128, no mask, not causal, inference: the sm_90a kernels took 0.135 ms
    against triton's 0.187 at L1024 and 0.417 against 0.580 at L4096 (1.39x both; cuDNN 0.119
    and 0.414). Head dim 64 (0.79 against 0.69 ms at L4096), causal (0.45 against 0.40) and
    forward+backward (the CuTe backward: 2.40 against 1.61 ms) stay on triton, as does every
    call the sm_90a kernels would hand to cute (masks, GQA, Lq % 8 != 0)."""
    if not (VARIANT["attention"] == "sm90" and dtype in (torch.float16, torch.bfloat16) and head_dim == 128
            and mask_kind == "none" and not is_causal and not gqa and not requires_grad and not dropout_p
            and lq_multiple_of_8):
        return "measured faster than triton only for head-dim-128 inference without mask or causal on sm_90a"
    reason = _loaded_on_hopper(device)
    if reason is not None:
        return reason
    if not _module.attention_sm90_built():
        return "the csrc/ module was built without the sm_90a kernels"
    return None


# Registration only: cheap, builds nothing. The build happens on the first unavailable_reason().
backends.register_impl("attention", "cuda", Impl(_attention_forward, _attention_backward, _attention_unsupported,
                                                  auto_unsupported=_attention_auto_unsupported))
backends.register_impl(
    "add_layer_norm", "cuda", Impl(_add_layer_norm_forward, _add_layer_norm_backward, _add_layer_norm_unsupported,
                                   auto_unsupported=_add_layer_norm_auto_unsupported)
)
backends.register_impl("linear_gelu", "cuda", Impl(_linear_gelu_forward, _linear_gelu_backward, _linear_gelu_unsupported))
