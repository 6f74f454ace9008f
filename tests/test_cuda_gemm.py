"""The cuda backend's CUTLASS Linear+GELU (csrc/linear_gelu_cutlass*.cu, the second extension
fuseformer_cuda_gemm, selected by FUSEFORMER_CUDA_LINEAR_GELU=cutlass).

CPU part (runs everywhere): the switch, which module each case reaches, the fallback to the
cuBLASLt path, and the JIT build of the second module (its sources, its one architecture).
tests/test_csrc_compile.py proves the kernels compile (no spills, tensor cores, TMA) and runs
their argument checks on the CPU.

GPU part (marked `gpu`; NOT YET RUN: written on a machine with no GPU): both kernels (sm80 on every
sm_80+ device, sm90 on 9.0) against the float64 reference by the parity rule, through the op
with autograd, and the binding's CHECK macros. The first of them builds the module (a minute or
two for sm_90a).
"""
import math
import pathlib

import pytest
import torch

from fuseformer import kernels as K
from fuseformer.kernels import backends, cuda_backend, reference
from fuseformer.kernels.parity import assert_parity

# Shared with the rest of the cuda backend's tests: the device constants, the loader fixtures
# (fresh_loader, cuda_ext: pytest finds fixtures imported into a test module) and helpers.
from test_cuda_backend import (  # noqa: F401
    BACKEND, DEV, HAS_CUDA, _parity_with_grads, _ready_toolchain, cuda_ext, fresh_loader, gpu,
)


# ----------------------------------------------------------------------------- CPU


class _RecordingExtension:
    """Stands for a built module: records which entry point each call reached."""

    def __init__(self, calls, label):
        self.calls, self.label = calls, label

    def set_poison(self, on):
        pass

    def paths(self, device):
        return ["sm80"]

    def linear_gelu_forward(self, *args):
        self.calls.append(self.label)
        return "out", "preact"


@pytest.fixture
def recorded_linear_gelu(monkeypatch):
    """cuda_backend with both modules replaced by recorders (the CUTLASS one loaded)."""
    calls = []
    main = _RecordingExtension(calls, "cublaslt")
    monkeypatch.setattr(cuda_backend, "module", lambda: main)
    monkeypatch.setattr(cuda_backend, "_gemm_module", _RecordingExtension(calls, "cutlass"))
    return calls


@pytest.mark.parametrize("kernel,dtype,K,N,approximate,expected", [
    ("cublaslt", torch.bfloat16, 64, 128, "tanh", "cublaslt"),
    ("cublaslt", torch.bfloat16, 64, 128, "none", "cublaslt"),
    ("cutlass", torch.bfloat16, 64, 128, "tanh", "cutlass"),
    ("cutlass", torch.float16, 768, 3072, "none", "cutlass"),
    ("cutlass", torch.float32, 64, 128, "tanh", "cublaslt"),   # CUTLASS path: fp16/bf16 only
    ("cutlass", torch.bfloat16, 36, 128, "tanh", "cublaslt"),  # K not a multiple of 8
    ("cutlass", torch.float16, 64, 100, "tanh", "cublaslt"),   # N not a multiple of 8
    # auto, the default: each GELU on the kernel the GPU runs measured faster for it.
    ("auto", torch.bfloat16, 768, 3072, "none", "cutlass"),
    ("auto", torch.bfloat16, 768, 3072, "tanh", "cublaslt"),   # cuBLASLt's GELU epilogue
    ("auto", torch.float32, 64, 128, "none", "cublaslt"),
    ("auto", torch.bfloat16, 36, 128, "none", "cublaslt"),
])
def test_linear_gelu_forward_dispatch(recorded_linear_gelu, kernel, dtype, K, N, approximate, expected):
    """The switch picks the module; cases the CUTLASS kernels do not take keep the cuBLASLt path."""
    x, w, b = torch.randn(5, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    with cuda_backend.variant(linear_gelu=kernel):
        assert cuda_backend._linear_gelu_forward(x, w, b, approximate, True) == ("out", "preact")
    assert recorded_linear_gelu == [expected]


def test_cutlass_needs_aligned_data(recorded_linear_gelu):
    flat = torch.randn(5 * 64 + 1, dtype=torch.bfloat16)
    x = flat[1:].view(5, 64)  # contiguous, but 2 bytes past a 16-byte boundary
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    assert "16-byte aligned" in cuda_backend.cutlass_linear_gelu_reason(x, w, None)
    with cuda_backend.variant(linear_gelu="cutlass"):
        cuda_backend._linear_gelu_forward(x, w, None, "none", False)
    assert recorded_linear_gelu == ["cublaslt"]


def test_cutlass_unavailable_falls_back_with_one_warning(monkeypatch, recorded_linear_gelu):
    monkeypatch.setattr(cuda_backend, "_gemm_module", None)
    monkeypatch.setattr(cuda_backend, "_cutlass_warned", False)
    monkeypatch.setattr(cuda_backend, "gemm_unavailable_reason", lambda: "nvcc exploded")
    x, w = torch.randn(3, 64, dtype=torch.float16), torch.randn(64, 64, dtype=torch.float16)
    with cuda_backend.variant(linear_gelu="cutlass"):
        with pytest.warns(UserWarning, match=r"cutlass Linear\+GELU is selected, but nvcc exploded"):
            cuda_backend._linear_gelu_forward(x, w, None, "none", False)
        cuda_backend._linear_gelu_forward(x, w, None, "none", False)  # warned once only
    assert recorded_linear_gelu == ["cublaslt", "cublaslt"]


def test_cutlass_unavailable_under_auto_falls_back_quietly(monkeypatch, recorded_linear_gelu):
    """`auto` (the default) on a machine where the CUTLASS module cannot be built (no
    nvidia-cutlass, say): cuBLASLt, the other measured path, without a warning."""
    import warnings

    monkeypatch.setattr(cuda_backend, "_gemm_module", None)
    monkeypatch.setattr(cuda_backend, "_cutlass_warned", False)
    monkeypatch.setattr(cuda_backend, "gemm_unavailable_reason", lambda: "no nvidia-cutlass")
    x, w = torch.randn(3, 64, dtype=torch.float16), torch.randn(64, 64, dtype=torch.float16)
    with cuda_backend.variant(linear_gelu="auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda_backend._linear_gelu_forward(x, w, None, "none", False)
    assert recorded_linear_gelu == ["cublaslt"]


@pytest.mark.parametrize("capability,expected", [((9, 0), "90a"), ((8, 0), "80"), ((8, 6), "86"), ((10, 0), "100")])
def test_gemm_arch_flags(capability, expected):
    assert cuda_backend.gemm_arch_flags(capability) == [f"-gencode=arch=compute_{expected},code=sm_{expected}"]


def test_gemm_arch_flags_refuse_pre_ampere():
    with pytest.raises(RuntimeError, match="compute capability 8.0 or newer"):
        cuda_backend.gemm_arch_flags((7, 5))


@pytest.fixture
def fresh_gemm_loader(fresh_loader):
    for name, value in (("_gemm_module", None), ("_gemm_reason", None), ("_gemm_tried", False)):
        fresh_loader.setattr(cuda_backend, name, value)
    real_import = cuda_backend.importlib.import_module

    def no_aot(name, *args):
        if name in ("fuseformer._C", "fuseformer._C_gemm"):
            raise ImportError("no ahead-of-time build")
        return real_import(name, *args)

    fresh_loader.setattr(cuda_backend.importlib, "import_module", no_aot)
    fresh_loader.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    fresh_loader.setattr(torch.cuda, "current_device", lambda: 0)
    return fresh_loader


def test_gemm_jit_build_is_its_own_module(fresh_gemm_loader, tmp_path):
    """Only the CUTLASS sources, under their own name, for the device's one architecture (sm_90a
    on 9.0), with the CUTLASS headers; built by the availability check once the kernel is chosen."""
    cpp_extension = _ready_toolchain(fresh_gemm_loader)
    include = tmp_path / "source" / "include"
    built = {}

    def fake_load(**kwargs):
        built[kwargs["name"]] = kwargs
        return _RecordingExtension([], kwargs["name"])

    fresh_gemm_loader.setattr(cuda_backend, "cutlass_include", lambda: include)
    fresh_gemm_loader.setattr(cpp_extension, "load", fake_load)
    fresh_gemm_loader.setattr(torch.cuda, "is_available", lambda: True)
    fresh_gemm_loader.setattr(torch.version, "cuda", "13.0")
    with cuda_backend.variant(linear_gelu="cublaslt"):
        assert cuda_backend.unavailable_reason() is None
    assert list(built) == [cuda_backend.EXTENSION_NAME]  # the default builds no CUTLASS GEMM
    with cuda_backend.variant(linear_gelu="cutlass"):
        assert cuda_backend.unavailable_reason() is None
    gemm = built[cuda_backend.GEMM_EXTENSION_NAME]
    assert [pathlib.Path(s).name for s in gemm["sources"]] == list(cuda_backend.GEMM_SOURCES)
    assert gemm["extra_include_paths"] == [str(include)]
    assert gemm["extra_cuda_cflags"] == cuda_backend.CUDA_FLAGS + ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_backend.gemm_unavailable_reason() is None and cuda_backend._gemm_module is not None


def test_gemm_build_failure_becomes_its_reason(fresh_gemm_loader, capsys):
    cpp_extension = _ready_toolchain(fresh_gemm_loader)

    def load(**kwargs):
        if kwargs["name"] == cuda_backend.GEMM_EXTENSION_NAME:
            raise RuntimeError("Error building extension 'fuseformer_cuda_gemm'\nlinear_gelu_cutlass.cu(9): error: boom")
        return _RecordingExtension([], kwargs["name"])

    fresh_gemm_loader.setattr(cuda_backend, "cutlass_include", lambda: pathlib.Path("/nowhere"))
    fresh_gemm_loader.setattr(cpp_extension, "load", load)
    fresh_gemm_loader.setattr(torch.cuda, "is_available", lambda: True)
    fresh_gemm_loader.setattr(torch.version, "cuda", "13.0")
    with cuda_backend.variant(linear_gelu="cutlass"):
        assert cuda_backend.unavailable_reason() is None  # the cuda backend itself is fine
    reason = cuda_backend.gemm_unavailable_reason()
    assert reason.startswith("the CUTLASS GEMM extension could not be loaded: Error building extension")
    assert "linear_gelu_cutlass.cu(9): error: boom" in reason
    with pytest.raises(backends.BackendUnsupportedError, match="the CUTLASS Linear\\+GELU is unavailable"):
        cuda_backend.gemm_module()


# ----------------------------------------------------------------------------- GPU: CUTLASS Linear + GELU
# csrc/linear_gelu_cutlass.cu through its own module (built on first use: minutes for sm_90a).


@pytest.fixture
def cuda_gemm(monkeypatch, cuda_ext):
    reason = cuda_backend.gemm_unavailable_reason()
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the CUTLASS GEMM module is unavailable: {reason}")
    return cuda_backend.gemm_module()


def _gemm_paths():
    # Collected without building anything: sm80 runs on every sm_80+ device, sm90 on 9.0 only.
    if not HAS_CUDA:
        return ["sm80", "sm90"]
    return ["sm80"] + (["sm90"] if torch.cuda.get_device_capability() == (9, 0) else [])


CUTLASS_SHAPES = [(1, 8, 8), (3, 64, 136), (97, 128, 256), (257, 40, 72), (1000, 768, 3072)]  # (M, K, N)


@gpu
@pytest.mark.parametrize("path", _gemm_paths())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("save_preact", [True, False])
@pytest.mark.parametrize("M,Kf,N", CUTLASS_SHAPES)
def test_gpu_cutlass_linear_gelu_parity(cuda_gemm, path, dtype, approximate, bias, save_preact, M, Kf, N):
    """Each kernel (sm80: CUTLASS 2; sm90: CUTLASS 3 TMA + EVT) against the float64 reference:
    the activated output and, when stored, the pre-activation; odd M, K and N multiples of 8."""
    x = torch.randn(M, Kf, device=DEV)
    w = torch.randn(N, Kf, device=DEV) / math.sqrt(Kf)
    b = torch.randn(N, device=DEV) if bias else None
    cast = (lambda t, dt: None if t is None else t.to(dt))
    out, pre = cuda_gemm.linear_gelu_forward(cast(x, dtype), cast(w, dtype), cast(b, dtype), approximate, save_preact, path)
    assert out.dtype == dtype and out.shape == (M, N)
    ref64 = reference.linear_gelu(x.double(), w.double(), cast(b, torch.float64), approximate)
    torch_d = reference.linear_gelu(cast(x, dtype), cast(w, dtype), cast(b, dtype), approximate)
    assert_parity(out, ref64, torch_d, dtype, what="out")
    if not save_preact:
        assert pre is None
        return
    pre64 = torch.nn.functional.linear(x.double(), w.double(), cast(b, torch.float64))
    pre_d = torch.nn.functional.linear(cast(x, dtype), cast(w, dtype), cast(b, dtype))
    assert_parity(pre, pre64, pre_d, dtype, what="preact")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,Kf,N,bias,takes_cutlass", [(3, 64, 136, True, True), (97, 128, 256, False, True),
                                                       (5, 36, 40, True, False), (3, 17, 33, True, False)])
def test_gpu_cutlass_through_the_op(cuda_gemm, monkeypatch, dtype, approximate, M, Kf, N, bias, takes_cutlass):
    """K.linear_gelu with FUSEFORMER_CUDA_LINEAR_GELU=cutlass: forward by CUTLASS where it
    applies (K, N multiples of 8), cuBLASLt otherwise; gradients from the stored pre-activation."""
    calls = []
    real = cuda_gemm.linear_gelu_forward

    class Spy:
        def __getattr__(self, name):
            return getattr(cuda_gemm, name)

        def linear_gelu_forward(self, *args):
            calls.append(args[4])  # save_preact
            return real(*args)

    monkeypatch.setattr(cuda_backend, "_gemm_module", Spy())
    x = torch.randn(3, M, Kf, device=DEV)
    w = torch.randn(N, Kf, device=DEV) / math.sqrt(Kf)
    b = torch.randn(N, device=DEV) if bias else None
    with cuda_backend.variant(linear_gelu="cutlass"):
        _parity_with_grads(
            lambda *t: K.linear_gelu(*t, approximate=approximate, backend=BACKEND),
            lambda *t: reference.linear_gelu(*t, approximate=approximate),
            (x, w, b), dtype, ("dx", "dweight", "dbias"),
        )
        assert calls == ([True] if takes_cutlass else [])  # training: the pre-activation is stored
        calls.clear()
        with torch.no_grad():
            K.linear_gelu(x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), approximate, backend=BACKEND)
        assert calls == ([False] if takes_cutlass else [])  # inference: no pre-activation store


def _bad_gemm_calls(gemm):
    h = torch.randn(4, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(64, 64, device=DEV, dtype=torch.bfloat16)
    misaligned = torch.randn(4 * 64 + 1, device=DEV, dtype=torch.bfloat16)[1:].view(4, 64)
    not_hopper = torch.cuda.get_device_capability() != (9, 0)
    calls = [
        (lambda: gemm.linear_gelu_forward(h.float(), w.float(), None, "none", False), TypeError, "x must be float16 or bfloat16"),
        (lambda: gemm.linear_gelu_forward(h, w.half(), None, "none", False), TypeError, "weight has dtype"),
        (lambda: gemm.linear_gelu_forward(h[:, :36].contiguous(), w[:, :36].contiguous(), None, "none", False),
         ValueError, "multiple of 8"),
        (lambda: gemm.linear_gelu_forward(h, w[:60], None, "none", False), ValueError, "out_features \\(N\\) must be"),
        (lambda: gemm.linear_gelu_forward(h, w[:, :32].contiguous(), None, "none", False), ValueError, "weight must have shape"),
        (lambda: gemm.linear_gelu_forward(misaligned, w, None, "none", False), ValueError, "16-byte aligned"),
        (lambda: gemm.linear_gelu_forward(h.t(), w, None, "none", False), ValueError, "x must be contiguous"),
        (lambda: gemm.linear_gelu_forward(h, w, w[0, :8], "none", False), ValueError, "bias must have shape"),
        (lambda: gemm.linear_gelu_forward(h, w, None, "exact", False), ValueError, "approximate"),
        (lambda: gemm.linear_gelu_forward(h, w, None, "none", False, "sm100"), ValueError, "path must be"),
        (lambda: gemm.linear_gelu_forward(h.cpu(), w, None, "none", False), ValueError, "must be a CUDA tensor"),
    ]
    if not_hopper:
        calls.append((lambda: gemm.linear_gelu_forward(h, w, None, "none", False, "sm90"), ValueError, "cannot run on this device"))
    return calls


@gpu
@pytest.mark.parametrize("case", range(12))
def test_gpu_cutlass_check_macros_raise_python_errors(cuda_gemm, case):
    calls = _bad_gemm_calls(cuda_gemm)
    if case >= len(calls):
        pytest.skip("the sm90-on-another-device case needs a device that is not 9.0")
    call, error, text = calls[case]
    with pytest.raises(error, match=text):
        call()
    torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("path", _gemm_paths())
def test_gpu_cutlass_no_rows(cuda_gemm, path):
    x = torch.empty(0, 64, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(24, 64, device=DEV, dtype=torch.bfloat16)
    out, pre = cuda_gemm.linear_gelu_forward(x, w, None, "tanh", True, path)
    assert out.shape == pre.shape == (0, 24)


@gpu
def test_gpu_cutlass_paths_of_this_device(cuda_gemm):
    device = torch.cuda.current_device()
    assert cuda_gemm.paths(device) == _gemm_paths()
    assert cuda_gemm.auto_path(device) == _gemm_paths()[-1]
    assert cuda_gemm.has_sm90()
