"""The `cuda` backend (csrc/ through kernels/cuda_backend.py).

CPU part (runs everywhere): the package works without the extension, the backend says why it
is unavailable, asking for it by name raises a clear error, and `unsupported` refuses what
the kernels do not do.

GPU part (marked `gpu`, skipped without a CUDA device; NOT YET RUN: written on a machine with
no GPU): every op forward and backward against the float64 reference by the parity rule on
odd shapes, outputs poisoned with NaN first; and the CHECK macros of csrc/bindings.cpp
surfacing as Python exceptions.
"""
import math
import pathlib

import pytest
import torch

from fuseformer.kernels import _util
from fuseformer import kernels as K
from fuseformer.kernels import backends, cuda_backend, reference
from fuseformer.kernels.parity import assert_parity

HAS_CUDA = torch.cuda.is_available()
# The gpu tests' device and backend: module constants, so that their logic can be dry-run on
# the CPU against the torch backend.
DEV, BACKEND = "cuda", "cuda"
CUDA_REASON = cuda_backend.unavailable_reason() if not HAS_CUDA else None
gpu = pytest.mark.gpu


# ----------------------------------------------------------------------------- CPU


def test_registered_for_the_three_ops_only():
    for op in ("attention", "add_layer_norm", "linear_gelu"):
        impl = backends.get_impl(op, "cuda")
        assert callable(impl.forward) and callable(impl.backward) and callable(impl.unsupported)
    with pytest.raises(backends.BackendUnsupportedError, match="no implementation of varlen_attention"):
        backends.get_impl("varlen_attention", "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA device")
def test_package_works_without_the_extension():
    reason = K.unavailable_reason("cuda")
    assert isinstance(reason, str) and reason
    assert "cuda" not in K.available_backends()
    assert "torch" in K.available_backends()
    if torch.version.cuda is None:
        assert reason == "torch was built without CUDA"
    # Nothing was built or even attempted: the reason came from torch alone.
    assert cuda_backend._module is None and not cuda_backend._tried
    x = torch.randn(3, 5)
    torch.testing.assert_close(K.add_layer_norm(x, None, None, None), reference.add_layer_norm(x, None, None, None))


def _named_cuda_calls():
    x = torch.randn(3, 7, 16)
    w, b = torch.randn(16), torch.randn(16)
    q = torch.randn(2, 2, 5, 16)
    return {
        "add_layer_norm": lambda: K.add_layer_norm(x, None, w, b, backend="cuda"),
        "linear_gelu": lambda: K.linear_gelu(x, torch.randn(8, 16), None, backend="cuda"),
        "attention": lambda: K.scaled_dot_product_attention(q, q, q, backend="cuda"),
    }


@pytest.mark.parametrize("op", ["add_layer_norm", "linear_gelu", "attention"])
def test_named_cuda_backend_raises_a_clear_error(op):
    # CPU tensors: the cuda backend can never run them, with or without a GPU here.
    with pytest.raises(backends.BackendUnsupportedError, match="backend 'cuda' cannot run") as info:
        _named_cuda_calls()[op]()
    message = str(info.value)
    if CUDA_REASON is not None:
        assert CUDA_REASON in message
    else:
        assert "tensors are on cpu" in message


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a CUDA device")
def test_set_backend_cuda_is_refused_where_it_is_chosen():
    # A global choice that can run nothing here fails at once, not at the first op.
    with pytest.raises(backends.BackendUnsupportedError, match=f"backend 'cuda' cannot run anything here: {CUDA_REASON}"):
        with K.use_backend("cuda"):
            pass
    with pytest.raises(backends.BackendUnsupportedError, match=CUDA_REASON):
        K.set_backend("cuda")
    assert K.get_backend() != "cuda"


@pytest.mark.parametrize("float_mask", [False, True])
def test_key_padding_args(float_mask):
    lengths = torch.tensor([5, 0, 3, 1])
    keep = torch.arange(5) < lengths[:, None]
    keep[2, 0] = False  # a hole before the end does not move the end
    mask = keep.view(4, 1, 1, 5).expand(4, 3, 7, 5)
    if float_mask:
        mask = torch.zeros(4, 1, 1, 5).masked_fill(~keep.view(4, 1, 1, 5), float("-inf")).expand(4, 3, 7, 5)
    bias, key_end = cuda_backend.key_padding_args(mask)
    assert bias.dtype == torch.float32 and bias.shape == (4, 5) and bias.is_contiguous()
    assert torch.equal(torch.isneginf(bias), ~keep)
    assert not torch.isnan(bias).any()
    assert key_end.dtype == torch.int32 and key_end.tolist() == [5, 0, 3, 1]


@pytest.fixture
def fresh_loader(monkeypatch):
    """cuda_backend's loader as if nothing had been tried, with no ahead-of-time build."""
    for name, value in (("_module", None), ("_reason", None), ("_tried", False)):
        monkeypatch.setattr(cuda_backend, name, value)
    real_import = cuda_backend.importlib.import_module

    def no_aot(name, *args):
        if name == "fuseformer._C":
            raise ImportError("no ahead-of-time build")
        return real_import(name, *args)

    monkeypatch.setattr(cuda_backend.importlib, "import_module", no_aot)
    return monkeypatch


def test_no_build_switch_refuses_the_jit_build(fresh_loader):
    """FUSEFORMER_CUDA_NO_BUILD=1 (the benchmark prewarm's processes): without an ahead-of-time
    build the backend is unavailable, with a reason naming the switch, and nothing is built."""
    fresh_loader.setattr(cuda_backend, "_NO_BUILD", True)
    fresh_loader.setattr(cuda_backend, "_jit_build", lambda: pytest.fail("the JIT build started"))
    cuda_backend._load()
    assert cuda_backend._module is None and "FUSEFORMER_CUDA_NO_BUILD=1" in cuda_backend._reason


def test_build_failure_becomes_the_reason(fresh_loader, capsys):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        assert kwargs["name"] == cuda_backend.EXTENSION_NAME
        assert [pathlib.Path(s).name for s in kwargs["sources"]] == list(cuda_backend.SOURCES)
        raise RuntimeError("Error building extension 'fuseformer_cuda'\n[1/6] nvcc ...\nattention_forward.cu(7): error: bad")

    fresh_loader.setattr(cuda_backend, "_nvcc", lambda: "/usr/bin/nvcc")
    fresh_loader.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    fresh_loader.setattr(cpp_extension, "load", failing_load)
    cuda_backend._load()
    assert cuda_backend._module is None
    assert cuda_backend._reason.startswith("the csrc/ extension could not be built: Error building extension")
    assert "attention_forward.cu(7): error: bad" in cuda_backend._reason
    err = capsys.readouterr().err
    assert "the first use compiles csrc/" in err and "[1/6] nvcc" in err
    cuda_backend._load()  # tried once per process: no second attempt
    assert capsys.readouterr().err == ""


def test_missing_nvcc_becomes_the_reason(fresh_loader):
    fresh_loader.setattr(cuda_backend, "_nvcc", lambda: None)
    cuda_backend._load()
    assert "nvcc not found" in cuda_backend._reason


def _ready_toolchain(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cuda_backend, "_nvcc", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(cpp_extension, "verify_ninja_availability", lambda: None)
    return cpp_extension


def test_missing_cutlass_becomes_the_reason(fresh_loader):
    cpp_extension = _ready_toolchain(fresh_loader)
    fresh_loader.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built without the CuTe headers"))
    fresh_loader.setattr(cuda_backend, "cutlass_include", lambda: None)
    cuda_backend._load()
    assert cuda_backend._module is None
    assert "nvidia-cutlass package is not installed" in cuda_backend._reason


def test_jit_build_gets_the_cutlass_headers(fresh_loader, tmp_path):
    """The include folder comes from the installed package and reaches cpp_extension.load."""
    cpp_extension = _ready_toolchain(fresh_loader)
    include = tmp_path / "source" / "include"
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        return object()

    fresh_loader.setattr(cuda_backend, "cutlass_include", lambda: include)
    fresh_loader.setattr(cpp_extension, "load", fake_load)
    cuda_backend._load()
    assert cuda_backend._reason is None
    assert seen["extra_include_paths"] == [str(include)]
    assert {"attention_cute.cu", "attention_cute_backward.cu"} <= {pathlib.Path(s).name for s in seen["sources"]}


def test_cutlass_include_found_through_the_package():
    include = cuda_backend.cutlass_include()
    if include is None:
        pytest.skip("nvidia-cutlass is not installed here")
    assert (include / "cute" / "tensor.hpp").is_file() and (include / "cutlass" / "cutlass.h").is_file()


def test_kernel_switches():
    """csrc/'s kernel switches (backends.Variants): the defaults are what the GPU runs measured
    (sm90 attention; Linear+GELU `auto`: CUTLASS for erf, cuBLASLt's epilogue for tanh), a block
    restores what it found, an unknown name is refused and changes nothing."""
    defaults = {"attention": "sm90", "attention_backward": "cute", "linear_gelu": "auto"}
    assert cuda_backend.VARIANT == defaults
    with cuda_backend.variant(attention="cute", attention_backward="sm90", linear_gelu="cutlass"):
        assert cuda_backend.VARIANT == {"attention": "cute", "attention_backward": "sm90", "linear_gelu": "cutlass"}
    assert cuda_backend.VARIANT == defaults
    with pytest.raises(ValueError, match="unknown attention variant 'cutlass'"):
        cuda_backend.set_variant(attention="cutlass")
    with pytest.raises(ValueError, match="unknown attention_backward variant 'wmma'"):
        cuda_backend.set_variant(attention_backward="wmma")
    with pytest.raises(ValueError, match="unknown linear_gelu variant 'cute'"):
        cuda_backend.set_variant(linear_gelu="cute")
    assert cuda_backend.VARIANT == defaults


@pytest.mark.parametrize("kernel,backward_kernel,D,forward,backward", [
    ("wmma", "cute", 64, "attention_forward", "attention_backward"),
    ("wmma", "sm90", 64, "attention_forward", "attention_backward"),
    ("cute", "cute", 64, "attention_forward_cute", "attention_backward_cute"),
    ("cute", "cute", 128, "attention_forward_cute", "attention_backward_cute"),
    ("cute", "cute", 80, "attention_forward", "attention_backward"),
    ("sm90", "cute", 64, "attention_forward_sm90", "attention_backward_cute"),
    ("sm90", "sm90", 64, "attention_forward_sm90", "attention_backward_sm90"),
    ("cute", "sm90", 128, "attention_forward_cute", "attention_backward_sm90"),
    ("sm90", "sm90", 80, "attention_forward_sm90", "attention_backward")])
def test_attention_dispatch(monkeypatch, kernel, backward_kernel, D, forward, backward):
    """The switches pick the extension's entry points, forward and backward; head dims the CuTe
    kernels lack keep WMMA; the sm90 forward entry takes every call (it hands what its kernels do
    not fit to cute/wmma itself) and pairs with the CuTe backward, or with the Hopper backward
    entry (which hands what its kernels do not fit to the CuTe one) under attention_backward=sm90.
    Those two take the forward's out (they compute delta themselves), the WMMA one a delta
    computed in torch."""
    calls = []

    class FakeExtension:
        def __getattr__(self, name):
            return lambda *args: calls.append((name, args)) or name

    monkeypatch.setattr(cuda_backend, "module", FakeExtension)
    q, out, lse = torch.randn(1, 2, 5, D), torch.randn(1, 2, 5, D), torch.randn(1, 2, 5)
    with cuda_backend.variant(attention=kernel, attention_backward=backward_kernel):
        assert cuda_backend._attention_forward(q, q, q, None, False, None, 0.0, None) == calls[-1][0]
        assert cuda_backend._attention_backward(q, q, q, q, out, lse, None, False, None, 0.0, None) == calls[-1][0]
    assert [name for name, _ in calls] == [forward, backward]
    backward_args = calls[1][1]
    if backward != "attention_backward":
        assert backward_args[4] is out
    else:
        torch.testing.assert_close(backward_args[5], (q * out).sum(-1))  # delta


def test_sources_found():
    folder = cuda_backend.source_dir()
    assert folder is not None
    for name in cuda_backend.SOURCES:
        assert (folder / name).is_file()


ATTN_OK = dict(dtype=torch.float16, head_dim=64, mask_kind="key_padding", dropout_p=0.0, requires_grad=False,
               is_causal=True, gqa=True)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({}, None),
        ({"dtype": torch.bfloat16, "head_dim": 128, "mask_kind": "none"}, None),
        ({"dtype": torch.float32}, "float16 and bfloat16"),
        ({"head_dim": 40}, "head dim 40 has no cuda kernel"),
        ({"head_dim": 256}, "head dim 256"),
        ({"mask_kind": "dense"}, "key-padding masks only"),
        ({"dropout_p": 0.1}, "dropout"),
        ({"requires_grad": True}, None),
    ],
)
def test_attention_unsupported(change, expected):
    reason = backends.get_impl("attention", "cuda").unsupported(**{**ATTN_OK, **change})
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


@pytest.mark.parametrize(
    "case,expected",
    [
        (dict(dtype=torch.float32, hidden=1023, dropout_p=0.0, requires_grad=True), None),
        (dict(dtype=torch.bfloat16, hidden=8192, dropout_p=0.0, requires_grad=False), None),
        (dict(dtype=torch.float16, hidden=8193, dropout_p=0.0, requires_grad=False), "hidden size 8193"),
        (dict(dtype=torch.float64, hidden=64, dropout_p=0.0, requires_grad=False), "float64"),
        (dict(dtype=torch.float16, hidden=64, dropout_p=0.1, requires_grad=False), "dropout"),
    ],
)
def test_add_layer_norm_unsupported(case, expected):
    reason = backends.get_impl("add_layer_norm", "cuda").unsupported(**case)
    assert reason is None if expected is None else expected in reason


@pytest.mark.parametrize(
    "case,expected",
    [
        (dict(dtype=torch.float16, in_features=17, out_features=33, approximate="tanh", requires_grad=True), None),
        (dict(dtype=torch.float64, in_features=8, out_features=8, approximate="none", requires_grad=False), "float64"),
        (dict(dtype=torch.float32, in_features=8, out_features=8, approximate="sigmoid", requires_grad=False), "sigmoid"),
    ],
)
def test_linear_gelu_unsupported(case, expected):
    reason = backends.get_impl("linear_gelu", "cuda").unsupported(**case)
    assert reason is None if expected is None else expected in reason


# ----------------------------------------------------------------------------- GPU helpers


@pytest.fixture
def cuda_ext(monkeypatch):
    """The built extension (JIT on first use), outputs poisoned with NaN."""
    monkeypatch.setattr(_util, "_POISON", True)  # what FUSEFORMER_POISON=1 sets at import
    reason = cuda_backend.unavailable_reason()
    if reason is not None:
        pytest.fail(f"a CUDA device is present but the cuda backend is unavailable: {reason}")
    return cuda_backend.module()


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _parity_with_grads(run_impl, run_ref, inputs, dtype, names, grad=True):
    """impl (dtype) vs reference in float64 and in dtype: the outputs, then every input's grad."""
    results = {}
    for label, dt in (("impl", dtype), ("ref64", torch.float64), ("torch_d", dtype)):
        leaves = _leaves(inputs, dt)
        with torch.set_grad_enabled(grad):
            out = (run_impl if label == "impl" else run_ref)(*leaves)
        results[label] = (out if isinstance(out, tuple) else (out,), leaves)
    impl_outs = results["impl"][0]
    for i in range(len(impl_outs)):
        assert_parity(impl_outs[i], results["ref64"][0][i], results["torch_d"][0][i], dtype, what=f"output {i}")
    if not grad:
        return
    gen = torch.Generator(device="cpu").manual_seed(7)
    douts = [torch.randn(o.shape, generator=gen).to(o.device) for o in impl_outs]
    grads = {}
    for label, (outs, leaves) in results.items():
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, douts))
        present = [t for t in leaves if t is not None]
        grads[label] = torch.autograd.grad(loss, present)
    present_names = [n for n, t in zip(names, inputs) if t is not None]
    for i, what in enumerate(present_names):
        assert grads["impl"][i].dtype == dtype
        assert_parity(grads["impl"][i], grads["ref64"][i], grads["torch_d"][i], dtype, what=what)


# ----------------------------------------------------------------------------- GPU: add + LayerNorm


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# One shape per row config of csrc/add_layer_norm.cu's pick_config, (threads a row, vectors a
# thread) for 16-bit / fp32, forward and backward alike unless named: 1 unaligned {32,8}; 40
# {32,1}; 100 unaligned {32,8} / {32,1}; 512 {64,1} / {128,1}; 1023 unaligned {32,32}; 768
# forward {128,1} / {256,1}, backward {32,4} / {32,8}; 1536 {256,1} / {512,1}; 4096 {512,1} /
# {512,4}; 4099 unaligned {256,32}; 8192 {512,2} / {512,4}. 2200 x 768, 1100 x 1536 and 4500 x
# 40 have more rows than the backward's grid (one wave, at most 8 blocks an SM) holds, so row
# groups walk several rows: their dw/db sums, and the one-vector configs' next-row prefetch.
@pytest.mark.parametrize("M,N", [(3, 1), (17, 100), (9, 512), (5, 1023), (2200, 768), (1100, 1536), (3, 4096),
                                 (3, 4099), (2, 8192), (257, 40), (4500, 40)])
@pytest.mark.parametrize("prenorm", [False, True])
def test_gpu_add_layer_norm_parity(cuda_ext, dtype, M, N, prenorm):
    x, r = torch.randn(M, N, device=DEV), torch.randn(M, N, device=DEV)
    w, b = 1.0 + 0.5 * torch.randn(N, device=DEV), 0.5 * torch.randn(N, device=DEV)
    _parity_with_grads(
        lambda *t: K.add_layer_norm(*t, prenorm=prenorm, backend=BACKEND),
        lambda *t: reference.add_layer_norm(*t, prenorm=prenorm),
        (x, r, w, b), dtype, ("dx", "dresidual", "dweight", "dbias"),
    )


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("residual,weight,bias", [(False, False, False), (False, True, False), (True, False, True)])
def test_gpu_add_layer_norm_optional_args(cuda_ext, dtype, residual, weight, bias):
    N = 520  # 3-D input: the op flattens it to (33, N) rows
    x = torch.randn(3, 11, N, device=DEV)
    args = (x, torch.randn_like(x) if residual else None, 1.0 + torch.randn(N, device=DEV) if weight else None,
            torch.randn(N, device=DEV) if bias else None)
    _parity_with_grads(lambda *t: K.add_layer_norm(*t, backend=BACKEND), reference.add_layer_norm, args, dtype,
                       ("dx", "dresidual", "dweight", "dbias"))


@gpu
def test_gpu_add_layer_norm_no_rows(cuda_ext):
    """Zero rows: no row kernel runs, and the partial-sum kernel still writes dweight = dbias = 0."""
    x = torch.randn(0, 768, device=DEV, dtype=torch.float16, requires_grad=True)
    w = torch.randn(768, device=DEV, dtype=torch.float16, requires_grad=True)
    b = torch.randn(768, device=DEV, dtype=torch.float16, requires_grad=True)
    y = K.add_layer_norm(x, torch.randn_like(x), w, b, backend=BACKEND)
    dw, db = torch.autograd.grad(y.sum(), (w, b))
    assert y.shape == (0, 768) and not dw.any() and not db.any()


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [768, 8192])
def test_gpu_add_layer_norm_inference_keeps_no_statistics(cuda_ext, dtype, N):
    """Without autograd the launcher asks for neither the stream nor mean/rstd: the kernel skips
    those stores and y still meets parity."""
    x, r = torch.randn(5, N, device=DEV, dtype=dtype), torch.randn(5, N, device=DEV, dtype=dtype)
    w, b = torch.randn(N, device=DEV, dtype=dtype), torch.randn(N, device=DEV, dtype=dtype)
    y, stream, mean, rstd = cuda_ext.add_layer_norm_forward(x, r, w, b, 1e-5, False, False)
    assert stream is None and mean is None and rstd is None
    ref64 = reference.add_layer_norm(*(t.double() for t in (x, r, w, b)))
    with torch.no_grad():
        assert_parity(K.add_layer_norm(x, r, w, b, backend=BACKEND), ref64, reference.add_layer_norm(x, r, w, b), dtype)
    assert_parity(y, ref64, reference.add_layer_norm(x, r, w, b), dtype)


# ----------------------------------------------------------------------------- GPU: Linear + GELU


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,Kf,N,bias", [(3, 17, 33, True), (1, 1, 1, True), (50, 100, 70, False), (96, 128, 256, True),
                                         (96, 128, 256, False)])
def test_gpu_linear_gelu_parity(cuda_ext, dtype, approximate, M, Kf, N, bias):
    x = torch.randn(M, Kf, device=DEV)
    w = torch.randn(N, Kf, device=DEV) / math.sqrt(Kf)
    b = torch.randn(N, device=DEV) if bias else None
    _parity_with_grads(
        lambda *t: K.linear_gelu(*t, approximate=approximate, backend=BACKEND),
        lambda *t: reference.linear_gelu(*t, approximate=approximate),
        (x, w, b), dtype, ("dx", "dweight", "dbias"),
    )


# ----------------------------------------------------------------------------- GPU: attention


def _key_padding(B, Lk, dtype=torch.bool, empty_batch=False):
    lengths = torch.randint(1, Lk + 1, (B,), device=DEV)
    lengths[0] = Lk
    if empty_batch:
        lengths[-1] = 0  # every key of the last batch masked: its rows must come out 0
    keep = torch.arange(Lk, device=DEV) < lengths[:, None]
    if dtype == torch.bool:
        return keep.view(B, 1, 1, Lk)
    return torch.zeros(B, 1, 1, Lk, device=DEV).masked_fill(~keep.view(B, 1, 1, Lk), float("-inf"))


ATTN_CASES = [  # (B, Hq, Hkv, Lq, Lk, D, causal, mask)
    (3, 2, 2, 1, 1, 16, False, None),
    (3, 2, 2, 17, 17, 32, True, None),
    (2, 2, 2, 97, 97, 64, False, "bool"),
    (2, 4, 2, 128, 128, 64, True, "float"),
    (1, 1, 1, 257, 257, 128, True, None),
    (2, 2, 1, 97, 17, 80, False, "bool"),
    (2, 2, 2, 17, 257, 96, True, "bool"),
    (3, 2, 2, 65, 70, 128, False, "empty"),
    (1, 2, 2, 1, 257, 64, False, "bool"),
    (2, 4, 1, 130, 130, 128, True, "bool"),  # several key tiles of the cute kernel, GQA 4:1, causal + padding
    (1, 2, 2, 300, 33, 64, True, None),  # more queries than keys: causal rows past Lk see every key
    (2, 4, 2, 33, 200, 64, True, "bool"),  # fewer queries than keys, causal: the cute backward's key blocks past Lq only write zeros
]


def _attention_reference(q, k, v, mask, causal, gqa):
    return reference.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, None, gqa)


@pytest.fixture(params=cuda_backend.ATTENTION_KERNELS)
def attention_kernel(request):
    """Each csrc/ attention kernel pair (forward and backward) in turn (the cute ones take head
    dims 64 and 128; at the others its setting runs the wmma kernels, so those cases check the
    fallback)."""
    with cuda_backend.variant(attention=request.param):
        yield request.param


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,causal,mask", ATTN_CASES)
def test_gpu_attention_parity(cuda_ext, attention_kernel, dtype, B, Hq, Hkv, Lq, Lk, D, causal, mask):
    """Forward and dq, dk, dv."""
    q = torch.randn(B, Hq, Lq, D, device=DEV)
    k, v = torch.randn(B, Hkv, Lk, D, device=DEV), torch.randn(B, Hkv, Lk, D, device=DEV)
    m = None
    if mask is not None:
        m = _key_padding(B, Lk, torch.bool if mask != "float" else torch.float32, empty_batch=mask == "empty")
    gqa = Hq != Hkv

    def with_mask_in(dt):
        return m if m is None or m.dtype == torch.bool else m.to(dt)

    _parity_with_grads(
        lambda q_, k_, v_: K.scaled_dot_product_attention(q_, k_, v_, with_mask_in(q_.dtype), 0.0, causal, None, gqa,
                                                          backend=BACKEND),
        lambda q_, k_, v_: _attention_reference(q_, k_, v_, with_mask_in(q_.dtype), causal, gqa),
        (q, k, v), dtype, ("dq", "dk", "dv"),
    )


@gpu
@pytest.mark.parametrize("entry,D", [("attention_forward", 64), ("attention_forward_cute", 64), ("attention_forward_cute", 128)])
def test_gpu_attention_lse_and_fused_qkv_views(cuda_ext, entry, D):
    """q, k, v as strided views of one QKV projection; lse against torch's logsumexp."""
    B, L, H, dtype = 2, 97, 3, torch.float16
    qkv = torch.randn(B, L, 3, H, D, device=DEV, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), unit last stride
    scale = 0.3
    out, lse = getattr(cuda_ext, entry)(q, k, v, None, None, True, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float(), atol=2e-3, rtol=2e-3)
    torch_d = reference.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale)
    ref64 = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), None, 0.0, True, scale)
    assert_parity(out, ref64, torch_d, dtype, what="out")


@gpu
@pytest.mark.parametrize("D", cuda_backend.CUTE_HEAD_DIMS)
@pytest.mark.parametrize("misaligned", [False, True])
def test_gpu_cute_attention_long_rows(cuda_ext, D, misaligned):
    """The CuTe forward over many query and key tiles (causal + key padding, GQA 2:1), against
    the WMMA forward's checked numbers and the reference. Rows that do not start 16-byte
    aligned (a storage offset of one element) must take the WMMA kernel inside the same call."""
    B, Hq, Hkv, L, dtype = 2, 4, 2, 1000, torch.bfloat16

    def tensor(H):
        flat = torch.randn(B * H * L * D + 1, device=DEV).to(dtype)
        return (flat[1:] if misaligned else flat[:-1]).view(B, H, L, D)

    q, k, v = tensor(Hq), tensor(Hkv), tensor(Hkv)
    assert (q.data_ptr() % 16 != 0) == misaligned
    mask = _key_padding(B, L)
    bias, key_end = cuda_backend.key_padding_args(mask.expand(B, Hq, L, L))
    out, lse = cuda_ext.attention_forward_cute(q, k, v, bias, key_end, True, D ** -0.5)
    out_w, lse_w = cuda_ext.attention_forward(q, k, v, bias, key_end, True, D ** -0.5)
    finite = torch.isfinite(lse_w)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], lse_w[finite], atol=2e-3, rtol=2e-3)
    kv = (k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1))
    ref64 = reference.scaled_dot_product_attention(q.double(), kv[0].double(), kv[1].double(), mask, 0.0, True)
    torch_d = reference.scaled_dot_product_attention(q, kv[0], kv[1], mask, 0.0, True)
    assert_parity(out, ref64, torch_d, dtype, what="out")


SM90_CASES = [  # (B, H, Lq, Lk, layout): every case fits the sm_90a kernels (Lq % 8 == 0, no mask, no GQA)
    (2, 3, 128, 128, "contiguous"),
    (1, 2, 1000, 1000, "contiguous"),  # many tiles, ragged last key tile (1000 = 15 x 64 + 40)
    (2, 2, 64, 300, "contiguous"),  # fewer queries than keys
    (1, 2, 200, 72, "contiguous"),  # more queries than keys: causal rows past Lk see every key
    (2, 3, 96, 96, "qkv_view"),  # strided views of one QKV projection (B, L, 3, H, D)
]


def _sm90_inputs(B, H, Lq, Lk, D, layout, dtype):
    if layout == "qkv_view":
        qkv = torch.randn(B, Lq, 3, H, D, device=DEV).to(dtype)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    return torch.randn(B, H, Lq, D, device=DEV).to(dtype), *(torch.randn(B, H, Lk, D, device=DEV).to(dtype) for _ in range(2))


def sm90_cases(test):
    """Every SM90_CASES shape at both dtypes and head dims, causal or not."""
    for name, values in (("B,H,Lq,Lk,layout", SM90_CASES), ("causal", [False, True]), ("D", [64, 128]),
                         ("dtype", [torch.float16, torch.bfloat16])):
        test = pytest.mark.parametrize(name, values)(test)
    return gpu(test)


@sm90_cases
def test_gpu_sm90_attention(cuda_ext, dtype, D, causal, B, H, Lq, Lk, layout):
    """The Hopper kernels themselves (the extension says it ran them, not a fallback): out and
    lse against the reference and torch's logsumexp, then dq, dk, dv through the shared backward."""
    if torch.cuda.get_device_capability() != (9, 0) or not cuda_ext.attention_sm90_built():
        pytest.skip("the sm_90a attention needs compute capability 9.0 and a build for sm_90a")
    q, k, v = _sm90_inputs(B, H, Lq, Lk, D, layout, dtype)
    assert cuda_ext.attention_sm90_reason(q, k, v, None, None, causal) == ""
    scale = 0.7 * D ** -0.5  # not the collectives' built-in 1/sqrt(D): ours must reach the kernel
    out, lse = cuda_ext.attention_forward_sm90(q, k, v, None, None, causal, scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float(), atol=2e-3, rtol=2e-3)
    ref64 = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), None, 0.0, causal, scale)
    torch_d = reference.scaled_dot_product_attention(q, k, v, None, 0.0, causal, scale)
    assert_parity(out, ref64, torch_d, dtype, what="out")
    with cuda_backend.variant(attention="sm90"):
        _parity_with_grads(
            lambda q_, k_, v_: K.scaled_dot_product_attention(q_, k_, v_, None, 0.0, causal, scale, backend=BACKEND),
            lambda q_, k_, v_: reference.scaled_dot_product_attention(q_, k_, v_, None, 0.0, causal, scale),
            (q, k, v), dtype, ("dq", "dk", "dv"),
        )


@sm90_cases
def test_gpu_sm90_attention_backward(cuda_ext, dtype, D, causal, B, H, Lq, Lk, layout):
    """The Hopper backward's kernels themselves (the extension says it runs them): dq, dk, dv of
    the sm_90a forward's out and lse against the reference by the parity rule, on ragged last
    key tiles and query tiles, more queries than keys and fewer, strided q/k/v/dout, and a scale
    that is not the collective's built-in one; then the same through the op under
    attention_backward=sm90."""
    if torch.cuda.get_device_capability() != (9, 0) or not cuda_ext.attention_sm90_built():
        pytest.skip("the sm_90a attention needs compute capability 9.0 and a build for sm_90a")
    q, k, v = _sm90_inputs(B, H, Lq, Lk, D, layout, dtype)
    dout = torch.randn(B, Lq, H, D, device=DEV).to(dtype).transpose(1, 2)  # strided rows
    scale = 0.7 * D ** -0.5
    out, lse = cuda_ext.attention_forward_sm90(q, k, v, None, None, causal, scale)
    assert cuda_ext.attention_sm90_backward_reason(dout, q, k, v, lse, None, None, causal) == ""
    grads = cuda_ext.attention_backward_sm90(dout, q, k, v, out, lse, None, None, causal, scale)

    def reference_grads(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(*leaves, None, 0.0, causal, scale)
        return torch.autograd.grad(o, leaves, dout.to(dt))

    ref64, torch_d = reference_grads(torch.float64), reference_grads(dtype)
    for name, impl, r64, rd in zip(("dq", "dk", "dv"), grads, ref64, torch_d):
        assert impl.dtype == dtype and impl.is_contiguous()
        assert_parity(impl, r64, rd, dtype, what=name)
    with cuda_backend.variant(attention="sm90", attention_backward="sm90"):
        _parity_with_grads(
            lambda q_, k_, v_: K.scaled_dot_product_attention(q_, k_, v_, None, 0.0, causal, scale, backend=BACKEND),
            lambda q_, k_, v_: reference.scaled_dot_product_attention(q_, k_, v_, None, 0.0, causal, scale),
            (q, k, v), dtype, ("dq", "dk", "dv"),
        )


@gpu
def test_gpu_sm90_attention_backward_hands_other_calls_to_cute(cuda_ext):
    """What the Hopper backward does not fit (a key-padding mask, GQA) names why and still
    comes back right, from the CuTe backward."""
    B, Hq, Hkv, L, D, dtype = 2, 4, 2, 136, 64, torch.bfloat16
    q, dout = (torch.randn(B, Hq, L, D, device=DEV).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, Hkv, L, D, device=DEV).to(dtype) for _ in range(2))
    mask = _key_padding(B, L)
    bias, key_end = cuda_backend.key_padding_args(mask.expand(B, Hq, L, L))
    out, lse = cuda_ext.attention_forward_cute(q, k, v, bias, key_end, False, D ** -0.5)
    assert cuda_ext.attention_sm90_backward_reason(dout, q, k, v, lse, bias, key_end, False) != ""
    grads = cuda_ext.attention_backward_sm90(dout, q, k, v, out, lse, bias, key_end, False, D ** -0.5)
    expected = cuda_ext.attention_backward_cute(dout, q, k, v, out, lse, bias, key_end, False, D ** -0.5)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        torch.testing.assert_close(got, want, msg=name)  # not bitwise: dq's fp32 atomics sum in any order


@gpu
def test_gpu_sm90_attention_reasons(cuda_ext):
    """The calls the sm_90a kernels do not fit name why (and take cute/wmma, checked by
    test_gpu_attention_parity under the sm90 setting)."""
    q = torch.randn(2, 2, 64, 64, device=DEV, dtype=torch.float16)
    if torch.cuda.get_device_capability() != (9, 0) or not cuda_ext.attention_sm90_built():
        assert cuda_ext.attention_sm90_reason(q, q, q, None, None, False) != ""
        return
    bias, key_end = cuda_backend.key_padding_args(_key_padding(2, 64).expand(2, 2, 64, 64))
    assert "key-padding" in cuda_ext.attention_sm90_reason(q, q, q, bias, key_end, False)
    assert "grouped-query" in cuda_ext.attention_sm90_reason(q, q[:, :1], q[:, :1], None, None, False)
    assert "multiple of 8" in cuda_ext.attention_sm90_reason(q[:, :, :63], q, q, None, None, False)
    assert "head dim" in cuda_ext.attention_sm90_reason(q[..., :32], q[..., :32], q[..., :32], None, None, False)
    assert "no batch" in cuda_ext.attention_sm90_reason(q[:0], q[:0], q[:0], None, None, False)  # CuTe returns at once
    # The backward: the forward's reasons, and an lse the TMA cannot read.
    lse = torch.zeros(2, 2, 64, device=DEV)
    assert cuda_ext.attention_sm90_backward_reason(q, q, q, q, lse, None, None, False) == ""
    assert "grouped-query" in cuda_ext.attention_sm90_backward_reason(q, q, q[:, :1], q[:, :1], lse, None, None, False)
    unaligned = torch.zeros(2 * 2 * 64 + 1, device=DEV)[1:].view(2, 2, 64)
    assert "16-byte" in cuda_ext.attention_sm90_backward_reason(q, q, q, q, unaligned, None, None, False)


@gpu
@pytest.mark.parametrize("D", cuda_backend.CUTE_HEAD_DIMS)
@pytest.mark.parametrize("misaligned", [False, True])
def test_gpu_cute_attention_backward_long_rows(cuda_ext, D, misaligned):
    """The CuTe backward over many key blocks and query tiles (causal + key padding with an
    empty batch, GQA 2:1): dq, dk, dv against the reference by the parity rule. Rows that do not
    start 16-byte aligned must take the WMMA backward inside the same call (after the CuTe
    preprocess kernel computed delta)."""
    B, Hq, Hkv, L, dtype, scale = 3, 4, 2, 700, torch.bfloat16, D ** -0.5

    def tensor(H):
        flat = torch.randn(B * H * L * D + 1, device=DEV).to(dtype)
        return (flat[1:] if misaligned else flat[:-1]).view(B, H, L, D)

    q, k, v, dout = tensor(Hq), tensor(Hkv), tensor(Hkv), tensor(Hq)
    mask = _key_padding(B, L, empty_batch=True)
    bias, key_end = cuda_backend.key_padding_args(mask.expand(B, Hq, L, L))
    out, lse = cuda_ext.attention_forward_cute(q, k, v, bias, key_end, True, scale)
    grads = cuda_ext.attention_backward_cute(dout, q, k, v, out, lse, bias, key_end, True, scale)

    def reference_grads(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
        o = reference.scaled_dot_product_attention(*leaves, mask, 0.0, True, scale, True)
        return torch.autograd.grad(o, leaves, dout.to(dt))

    ref64, torch_d = reference_grads(torch.float64), reference_grads(dtype)
    for name, impl, r64, rd in zip(("dq", "dk", "dv"), grads, ref64, torch_d):
        assert impl.dtype == dtype and impl.is_contiguous()
        assert_parity(impl, r64, rd, dtype, what=name)
    assert not grads[0][-1].any() and not grads[1][-1].any()  # the empty batch: no key attended, zero gradients


@gpu
def test_gpu_attention_refuses_dropout_by_name(cuda_ext):
    q = torch.randn(1, 1, 8, 64, device=DEV, dtype=torch.float16)
    with pytest.raises(backends.BackendUnsupportedError, match="dropout is not implemented in the cuda backend"):
        K.scaled_dot_product_attention(q, q, q, dropout_p=0.1, backend="cuda")


@gpu
def test_gpu_built_module_matches_python_mirrors(cuda_ext):
    assert tuple(cuda_ext.attention_head_dims()) == cuda_backend.ATTENTION_HEAD_DIMS
    assert tuple(cuda_ext.attention_cute_head_dims()) == cuda_backend.CUTE_HEAD_DIMS
    assert tuple(cuda_ext.attention_cute_backward_head_dims()) == cuda_backend.CUTE_HEAD_DIMS
    assert cuda_ext.layer_norm_max_hidden == cuda_backend.LAYER_NORM_MAX_HIDDEN


# ----------------------------------------------------------------------------- GPU: CHECK macros


def _bad_calls(ext):
    h = torch.randn(4, 64, device=DEV, dtype=torch.float16)
    w = torch.randn(64, device=DEV, dtype=torch.float16)
    q = torch.randn(1, 2, 8, 64, device=DEV, dtype=torch.float16)
    lse = torch.zeros(1, 2, 8, device=DEV)
    return [
        (lambda: ext.add_layer_norm_forward(h.double(), None, None, None, 1e-5, False), TypeError, "x must be float16"),
        (lambda: ext.add_layer_norm_forward(h.t(), None, None, None, 1e-5, False), ValueError, "x must be contiguous"),
        (lambda: ext.add_layer_norm_forward(h.cpu(), None, None, None, 1e-5, False), ValueError, "must be a CUDA tensor"),
        (lambda: ext.add_layer_norm_forward(h, None, w.float(), None, 1e-5, False), TypeError, "weight has dtype"),
        (lambda: ext.add_layer_norm_forward(h, None, w[:10], None, 1e-5, False), ValueError, "weight must have shape"),
        (lambda: ext.add_layer_norm_forward(torch.randn(2, 9000, device=DEV), None, None, None, 1e-5, False),
         ValueError, "hidden size"),
        (lambda: ext.linear_gelu_forward(h, w.view(1, 64).repeat(3, 1), None, "relu", False), ValueError, "approximate"),
        (lambda: ext.linear_gelu_forward(h, torch.randn(3, 65, device=DEV, dtype=torch.float16), None, "none", False),
         ValueError, "weight must have shape"),
        (lambda: ext.attention_forward(q, q, q.float(), None, None, False, 1.0), TypeError, "dtype"),
        (lambda: ext.attention_forward(q.float(), q.float(), q.float(), None, None, False, 1.0), TypeError, "q must be float16"),
        (lambda: ext.attention_forward(q[..., :40], q[..., :40], q[..., :40], None, None, False, 1.0), ValueError, "head dim 40"),
        (lambda: ext.attention_forward(q.transpose(-1, -2), q, q, None, None, False, 1.0), ValueError, "last dimension"),
        (lambda: ext.attention_forward(q, q[:, :1], q, None, None, False, 1.0), ValueError, "v must have shape"),
        (lambda: ext.attention_forward(q, q, q, torch.zeros(1, 9, device=DEV), None, False, 1.0), ValueError,
         "key_bias must have shape"),
        (lambda: ext.attention_forward(q, q, q, None, torch.zeros(1, device=DEV), False, 1.0), TypeError,
         "key_end must be int32"),
        (lambda: ext.attention_backward(q, q, q, q, torch.zeros(1, 2, 8, device=DEV, dtype=torch.float16),
                                        torch.zeros(1, 2, 8, device=DEV), None, None, False, 1.0), TypeError,
         "lse and delta must be float32"),
        (lambda: ext.attention_forward_cute(q[..., :32], q[..., :32], q[..., :32], None, None, False, 1.0), ValueError,
         "head dim 32 has no CuTe attention kernel"),
        (lambda: ext.attention_forward_cute(q[0], q[0], q[0], None, None, False, 1.0), ValueError, "q must have 4 dimensions"),
        (lambda: ext.attention_forward_cute(q, q.bfloat16(), q, None, None, False, 1.0), TypeError, "k has dtype"),
        (lambda: ext.attention_forward_cute(q, q, q, torch.zeros(1, 9, device=DEV), None, False, 1.0), ValueError,
         "key_bias must have shape"),
        (lambda: ext.attention_backward_cute(q[..., :32], q[..., :32], q[..., :32], q[..., :32], q[..., :32], lse, None,
                                             None, False, 1.0), ValueError, "head dim 32 has no CuTe attention backward"),
        (lambda: ext.attention_backward_cute(q, q, q, q, q[:, :1], lse, None, None, False, 1.0), ValueError,
         "out must have shape"),
        (lambda: ext.attention_backward_cute(q, q, q, q, q, lse.half(), None, None, False, 1.0), TypeError,
         "lse and delta must be float32"),
        (lambda: ext.attention_backward_cute(q.bfloat16(), q, q, q, q, lse, None, None, False, 1.0), TypeError,
         "dout has dtype"),
        (lambda: ext.attention_backward_sm90(q[..., :32], q[..., :32], q[..., :32], q[..., :32], q[..., :32], lse, None,
                                             None, False, 1.0), ValueError, "head dim 32 has no CuTe attention backward"),
        (lambda: ext.attention_backward_sm90(q, q, q, q, q[:, :1], lse, None, None, False, 1.0), ValueError,
         "out must have shape"),
    ]


N_BAD_CALLS = 26


@gpu
@pytest.mark.parametrize("case", range(N_BAD_CALLS))
def test_gpu_check_macros_raise_python_errors(cuda_ext, case):
    calls = _bad_calls(cuda_ext)
    assert len(calls) == N_BAD_CALLS
    call, error, text = calls[case]
    with pytest.raises(error, match=text):
        call()
    torch.cuda.synchronize()  # nothing was launched with a bad pointer: the context is intact
