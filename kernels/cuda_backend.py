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
`set_attention_kernel` / `use_attention_kernel`, as the benchmark and the tests do):
  wmma  (default) csrc/attention_forward.cu, the kernel that passed parity on an H200;
  cute  csrc/attention_cute.cu, FlashAttention-2's structure on CuTe (register accumulators,
        mma.sync, cp.async), head dims CUTE_HEAD_DIMS; other head dims keep the wmma kernel.
        Compiled and checked on the CPU only (tests/test_csrc_compile.py); NOT YET RUN on a GPU.
  sm90  csrc/attention_sm90*.cu, FlashAttention-3's structure from CUTLASS's Hopper FMHA
        collectives (TMA, warp-specialized wgmma), on compute capability 9.0 for fp16/bf16,
        head dims 64/128, no mask or causal, no GQA, Lq % 8 == 0; every other call takes the
        cute (head dims 64/128) or wmma kernel. Compiled for sm_90a when the build targets it
        (`sm90a_flags`). Compiled and checked on the CPU only; NOT YET RUN on a GPU.
The backward follows the same switch: under `cute` and `sm90`, at CUTE_HEAD_DIMS,
csrc/attention_cute_backward.cu (FlashAttention-2's backward on CuTe, likewise compiled only, not
yet run); otherwise csrc/attention_backward.cu. Every backward takes every forward's out and lse
(same conventions).

What the kernels cover (anything else is refused by `unsupported`, so `auto` passes over the
backend and naming it explicitly raises BackendUnsupportedError with the reason):
  attention       forward and backward, fp16/bf16, head dims ATTENTION_HEAD_DIMS, causal and/or
                  a key-padding mask, GQA; no dropout, no dense masks.
  add_layer_norm  forward and backward, fp16/bf16/fp32, hidden <= LAYER_NORM_MAX_HIDDEN, no dropout.
  linear_gelu     forward and backward, fp16/bf16/fp32; tanh GELU through cuBLASLt's GELU
                  epilogue, erf GELU as GEMM + bias and a fused elementwise kernel.

STATUS: written and compiled (nvcc, sm_80 + sm_90) on a machine without a GPU. None of it has
run on a GPU yet: tests/test_cuda_backend.py's gpu-marked tests, compute-sanitizer and the
timings are still to be done on one. Until H100 measurements show a cuda op faster than the
triton one for a case, backends.AUTO_ORDER keeps triton ahead of cuda for every op; cuda should
lead `auto` for an op only after such measurements (record them here when they exist).
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
from contextlib import contextmanager

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
    "attention_sm90.cu",
    "attention_sm90_f16_d64.cu",
    "attention_sm90_f16_d128.cu",
    "attention_sm90_bf16_d64.cu",
    "attention_sm90_bf16_d128.cu",
)
ATTENTION_KERNELS = ("wmma", "cute", "sm90")
# Mirror of attention_{forward,backward}_cute_supports_head_dim (a gpu test compares).
CUTE_HEAD_DIMS = (64, 128)
EXTENSION_NAME = "fuseformer_cuda"
# The same flags as setup.py's ahead-of-time build. No --use_fast_math: it may replace tanhf
# and expf with approximations, and the fp32 GELU kernels must meet fp32 parity.
CUDA_FLAGS = ["-O3", "-lineinfo"]



def _attention_kernel_from_env() -> str:
    name = os.environ.get("FUSEFORMER_CUDA_ATTENTION", "wmma").strip().lower() or "wmma"
    if name not in ATTENTION_KERNELS:
        # Refused where it is given, but without breaking the import of the whole package.
        warnings.warn(f"FUSEFORMER_CUDA_ATTENTION={name!r} is not one of {ATTENTION_KERNELS}; using 'wmma'",
                      stacklevel=2)
        return "wmma"
    return name


_attention_kernel = _attention_kernel_from_env()


def attention_kernel() -> str:
    """The csrc/ attention kernels in use (forward and backward): 'wmma', 'cute' or 'sm90'."""
    return _attention_kernel


def set_attention_kernel(name: str) -> str:
    """Select the csrc/ attention kernels, forward and backward ('wmma', 'cute' or 'sm90'); returns the previous choice."""
    global _attention_kernel
    if name not in ATTENTION_KERNELS:
        raise ValueError(f"unknown cuda attention kernel {name!r}; choose one of {ATTENTION_KERNELS}")
    previous, _attention_kernel = _attention_kernel, name
    return previous


@contextmanager
def use_attention_kernel(name: str):
    previous = set_attention_kernel(name)
    try:
        yield
    finally:
        set_attention_kernel(previous)


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
        return ["-gencode=arch=compute_90a,code=sm_90a", "-DFUSEFORMER_SM90A"]
    return []


CUTLASS_MISSING = "the nvidia-cutlass package is not installed (pip install nvidia-cutlass): csrc/ needs its CuTe headers"


_lock = threading.Lock()
_module = None
_reason: str | None = None
_tried = False


def source_dir() -> pathlib.Path | None:
    """The folder holding csrc/'s sources: <repo>/csrc in a checkout or editable install,
    the `fuseformer.csrc` package data in an installed wheel."""
    candidates = [pathlib.Path(__file__).resolve().parent.parent / "csrc"]
    try:
        # csrc/ holds no __init__.py: a namespace package, whose folders find_spec lists.
        spec = importlib.util.find_spec("fuseformer.csrc")
        candidates += [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    except (ImportError, ValueError, OSError):
        pass
    for folder in candidates:
        if all((folder / name).is_file() for name in SOURCES):
            return folder
    return None


def _nvcc() -> str | None:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _jit_build():
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


def _load() -> None:
    global _module, _reason, _tried
    with _lock:
        if _tried:
            return
        _tried = True
        try:
            _module = importlib.import_module("fuseformer._C")
            return
        except ImportError:
            pass  # no ahead-of-time build: JIT below
        try:
            _module = _jit_build()
        except Exception as err:  # noqa: BLE001 - any build failure becomes the reason
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            # torch's message starts "Error building extension ..."; the compiler's first error
            # line is the useful part.
            detail = next((line for line in lines[1:] if "error" in line.lower()), None)
            _reason = f"the csrc/ extension could not be built: {lines[0]}" + (f" ({detail})" if detail else "")
            print(f"fuseformer: {_reason}\n{err}", file=sys.stderr, flush=True)


def unavailable_reason() -> str | None:
    """Why the cuda backend cannot run here, or None when it can (this builds it the first time)."""
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device"
    _load()
    return _reason


def module():
    """The loaded extension; BackendUnsupportedError when it is unavailable."""
    reason = unavailable_reason()
    if reason is not None:
        raise BackendUnsupportedError(f"backend 'cuda' is unavailable: {reason}")
    _module.set_poison(poison_enabled())
    return _module


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
    if _attention_kernel == "sm90":  # takes every call: the ones its kernels do not fit go to cute/wmma
        forward = ext.attention_forward_sm90
    elif _attention_kernel == "cute" and q.shape[-1] in CUTE_HEAD_DIMS:
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
    if _attention_kernel in ("cute", "sm90") and q.shape[-1] in CUTE_HEAD_DIMS:
        # delta = rowsum(dout * out) is the CuTe backward's own preprocess kernel.
        return ext.attention_backward_cute(dout, q, k, v, out, lse.contiguous(), key_bias, key_end, bool(is_causal),
                                           scale)
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


# ----------------------------------------------------------------------------- Linear + GELU


def _linear_gelu_forward(x2d, weight, bias, approximate, save_preact):
    return module().linear_gelu_forward(x2d.contiguous(), weight.contiguous(), _contiguous(bias), approximate, bool(save_preact))


def _linear_gelu_backward(dout, x2d, weight, preact, approximate, has_bias):
    return module().linear_gelu_backward(dout, x2d.contiguous(), weight.contiguous(), preact, approximate, bool(has_bias))


def _linear_gelu_unsupported(dtype=None, in_features=None, out_features=None, approximate="none", requires_grad=False, **_):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype}: the cuda kernels take float16, bfloat16, float32"
    if approximate not in ("none", "tanh"):
        return f"approximate={approximate!r} (the cuda kernels take 'none' and 'tanh')"
    return None


# Registration only: cheap, builds nothing. The build happens on the first unavailable_reason().
backends.register_impl("attention", "cuda", Impl(_attention_forward, _attention_backward, _attention_unsupported))
backends.register_impl(
    "add_layer_norm", "cuda", Impl(_add_layer_norm_forward, _add_layer_norm_backward, _add_layer_norm_unsupported)
)
backends.register_impl("linear_gelu", "cuda", Impl(_linear_gelu_forward, _linear_gelu_backward, _linear_gelu_unsupported))
