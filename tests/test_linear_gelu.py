"""linear_gelu on the triton backend against the float64 reference (parity rule), and
torch.compile over both of this file's ops."""
import importlib
import warnings

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseformer.kernels import _util
from fuseformer import kernels as K
from fuseformer.kernels import reference
from fuseformer.kernels._util import draw_seed
from fuseformer.kernels.parity import assert_parity

aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
lg = importlib.import_module("fuseformer.kernels.linear_gelu")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_util, "_POISON", True)  # what FUSEFORMER_POISON=1 sets at import


def check_parity(x, weight, bias, approximate, dtype):
    """x/weight/bias: float32 tensors of any strides; the layout is kept in every dtype."""

    def cast(t, dt):
        if t is None:
            return None
        # Same strides in the new dtype, so a transposed view stays a transposed view.
        c = torch.empty_strided(t.shape, t.stride(), dtype=dt, device=t.device)
        c.copy_(t)
        return c.requires_grad_(True)

    grad_out = None
    results = {}
    for name, dt in (("impl", dtype), ("ref64", torch.float64), ("torch_d", dtype)):
        leaves = [cast(t, dt) for t in (x, weight, bias)]
        if name == "impl":
            out = K.linear_gelu(*leaves, approximate=approximate, backend="triton")
        else:
            out = reference.linear_gelu(*leaves, approximate=approximate)
        if grad_out is None:
            grad_out = torch.randn(out.shape, device=out.device)
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), present) if out.numel() else None
        results[name] = (out, grads, present)

    assert_parity(results["impl"][0], results["ref64"][0], results["torch_d"][0], dtype, what="out")
    assert results["impl"][0].dtype == dtype
    if results["impl"][1] is None:
        return results
    for i, what in enumerate(("dx", "dweight", "dbias")[: len(results["impl"][1])]):
        g = results["impl"][1][i]
        assert g.shape == results["impl"][2][i].shape and g.dtype == dtype
        assert_parity(g, results["ref64"][1][i], results["torch_d"][1][i], dtype, what=what)
    return results


def _make(M, Kf, N, device, bias=True):
    x = torch.randn(M, Kf, device=device)
    w = torch.randn(N, Kf, device=device) / max(1, Kf) ** 0.5
    b = torch.randn(N, device=device) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("M,Kf,N", [(3, 17, 33), (1, 1, 1), (50, 100, 70)])
def test_parity_shapes(M, Kf, N, approximate, dtype, device):
    check_parity(*_make(M, Kf, N, device), approximate, dtype)


# K a multiple of every BLOCK_K (32 under the interpreter, 32 or 64 on a GPU) over several
# tiles: the EVEN_K loop without masks, which every BERT/GPT-2 shape takes (K = 768), and
# where a wrong pointer advance only shows from the second tile on. M and N stay small: one
# program, so the interpreter pays only for the K loop.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,Kf,N,transpose_w", [(5, 192, 33, False), (3, 768, 20, False), (7, 128, 9, True)])
def test_parity_full_k_tiles(M, Kf, N, transpose_w, dtype, device):
    x, w, b = _make(M, Kf, N, device)
    if transpose_w:  # a (K, N) buffer seen as (N, K): the W step is a column stride
        w = w.t().contiguous().t()
    check_parity(x, w, b, "none" if transpose_w else "tanh", dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_no_bias(approximate, device):
    check_parity(*_make(9, 40, 24, device, bias=False), approximate, torch.float32)


def test_leading_dims(device):
    x = torch.randn(3, 5, 24, device=device)
    _, w, b = _make(1, 24, 40, device)
    res = check_parity(x, w, b, "none", torch.float16)
    assert res["impl"][0].shape == (3, 5, 40)


def test_non_contiguous_views(device):
    # x: a slice of a fused projection (row stride 3K); W: a transposed (K, N) buffer.
    M, Kf, N = 13, 20, 36
    fused = torch.randn(M, 3 * Kf, device=device)
    x = fused[:, Kf : 2 * Kf]
    w = (torch.randn(Kf, N, device=device) / Kf**0.5).t()
    assert not x.is_contiguous() and not w.is_contiguous()
    check_parity(x, w, torch.randn(N, device=device), "tanh", torch.float32)
    # x as a transposed view, too.
    xt = torch.randn(Kf, M, device=device).t()
    check_parity(xt, w, None, "none", torch.float32)


def test_empty_rows(device):
    x = torch.randn(0, 8, device=device, requires_grad=True)
    w = torch.randn(5, 8, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    out = K.linear_gelu(x, w, b, backend="triton")
    assert out.shape == (0, 5)
    out.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_zero_in_features_is_gelu_of_bias(device):
    x = torch.randn(4, 0, device=device)
    w = torch.randn(6, 0, device=device)
    b = torch.randn(6, device=device)
    out = K.linear_gelu(x, w, b, backend="triton")
    torch.testing.assert_close(out, torch.nn.functional.gelu(b).expand(4, 6))


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bf16_on_gpu(approximate, device):
    check_parity(*_make(300, 768, 1000, device), approximate, torch.bfloat16)


def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(5, 8, device=device)
    with pytest.raises(ValueError, match="x"):
        K.linear_gelu(torch.tensor(1.0), w, backend="triton")
    with pytest.raises(TypeError, match="x"):
        K.linear_gelu(torch.ones(4, 8, dtype=torch.int64), w, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        K.linear_gelu(x, torch.randn(8), backend="triton")
    with pytest.raises(ValueError, match="weight"):
        K.linear_gelu(x, torch.randn(5, 7), backend="triton")
    with pytest.raises(TypeError, match="weight"):
        K.linear_gelu(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="bias"):
        K.linear_gelu(x, w, torch.randn(4), backend="triton")
    with pytest.raises(ValueError, match="approximate"):
        K.linear_gelu(x, w, approximate="fast", backend="triton")
    with pytest.raises(K.BackendUnsupportedError, match="float64"):
        K.linear_gelu(x.double(), w.double(), backend="triton")


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    M=st.integers(1, 40),
    Kf=st.integers(1, 80),
    N=st.integers(1, 80),
    approximate=st.sampled_from(["none", "tanh"]),
    bias=st.booleans(),
    transpose_w=st.booleans(),
)
def test_fuzz(M, Kf, N, approximate, bias, transpose_w):
    x, w, b = _make(M, Kf, N, DEVICE, bias)
    if transpose_w:
        w = w.t().contiguous().t()
    check_parity(x, w, b, approximate, torch.float32)


# ----------------------------------------------------------------------------- compile


def _block(x, w1, b1, res, lw, lb):
    h = K.linear_gelu(x, w1, b1, "tanh", backend="triton")
    y, stream = K.add_layer_norm(h, res, lw, lb, dropout_p=0.1, prenorm=True, backend="triton")
    return y, stream


def test_torch_compile_fullgraph_new_variants(launched, device):
    """The same with every new variant: TMA GEMM, recompute instead of a saved pre (the
    compiled backward op gets bias and no pre), persistent multi-row LayerNorm."""
    with lg.variant(forward="tma", preact="recompute", dgelu="fused_db"), aln.variant(forward="persistent"):
        test_torch_compile_fullgraph_both_ops(device)
    assert launched == ["_linear_gelu_tma"] * 4  # forward and dgelu recompute, eager then compiled


def test_torch_compile_fullgraph_both_ops(device):
    torch._dynamo.reset()
    params = [
        torch.randn(3, 5, 16, device=device),
        torch.randn(24, 16, device=device) / 4,
        torch.randn(24, device=device),
        torch.randn(3, 5, 24, device=device),
        torch.randn(24, device=device),
        torch.randn(24, device=device),
    ]
    runs = []
    for fn in (_block, torch.compile(_block, fullgraph=True, backend="aot_eager")):
        leaves = [p.clone().requires_grad_(True) for p in params]
        torch.manual_seed(5)
        y, stream = fn(*leaves)
        (y.square().sum() + (stream * 0.5).sum()).backward()
        runs.append([y, stream] + [t.grad for t in leaves])
    for eager, compiled in zip(*runs):
        assert not torch.isnan(compiled).any()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # Both runs drew the seed torch.manual_seed(5) gives: rebuild that mask and check the
    # compiled stream against the reference, so dropout is known to have really run.
    torch.manual_seed(5)
    mask = aln.dropout_mask(draw_seed(device), (3, 5, 24), 0.1)
    assert not mask.all()
    h = reference.linear_gelu(*params[:3], approximate="tanh")
    _, ref_stream = reference.add_layer_norm(h, *params[3:], dropout_p=0.1, prenorm=True, dropout_mask=mask)
    torch.testing.assert_close(runs[1][1], ref_stream, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- variants


class _Recorder:
    """Wraps a kernel attribute of linear_gelu (autotuned or plain) and logs its launches."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log
        self.fn = _Recorder(kernel.fn, name, log) if hasattr(kernel, "fn") and hasattr(kernel, "configs") else None
        self.configs = getattr(kernel, "configs", None)

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]

    def __getattr__(self, attr):
        return getattr(self.kernel, attr)


@pytest.fixture
def launched(monkeypatch):
    log = []
    for name in ("_linear_gelu_fwd", "_linear_gelu_tma", "_gelu_bwd", "_gelu_bwd_db"):
        monkeypatch.setattr(lg, name, _Recorder(getattr(lg, name), name, log))
    return log


@pytest.mark.parametrize(
    "M,Kf,N,dtype",
    [
        (17, 100, 257, torch.float32),  # 400-byte rows: TMA loads; 257 columns: pointer stores
        (1, 768, 257, torch.float16),  # one row, several K steps
        (17, 768, 256, torch.float16),  # 512-byte output rows: stores through descriptors too
        (17, 100, 64, torch.float16),  # 200-byte rows: TMA cannot describe them, portable
    ],
)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_tma_forward(M, Kf, N, dtype, approximate, launched, device):
    tma = (Kf * torch.empty((), dtype=dtype).element_size()) % 16 == 0
    with lg.variant(forward="tma"):
        check_parity(*_make(M, Kf, N, device), approximate, dtype)
    assert launched[0] == ("_linear_gelu_tma" if tma else "_linear_gelu_fwd")


@pytest.mark.parametrize("forward", ["tma", "portable"])
@pytest.mark.parametrize("M,Kf,N,bias", [(17, 100, 257, True), (1, 768, 257, True), (17, 100, 64, False)])
def test_recompute_backward(forward, M, Kf, N, bias, launched, device):
    """preact="recompute": nothing (M, N)-shaped is kept for the backward, which rebuilds pre
    with the forward GEMM (the TMA kernel's dgelu epilogue, or the portable kernel)."""
    x, w, b = _make(M, Kf, N, device, bias=bias)
    with lg.variant(forward=forward, preact="recompute"):
        check_parity(x, w, b, "none", torch.float32)
        calls = list(launched)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            K.linear_gelu(x.requires_grad_(True), w, b, backend="triton")
    assert saved and (M, N) not in saved, saved
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        K.linear_gelu(x, w, b, backend="triton")  # "store" (the default) does keep pre
    assert (M, N) in saved
    if forward == "tma":
        assert calls == ["_linear_gelu_tma"] * 2  # the forward, then the GEMM again with the dgelu epilogue
    else:
        assert calls == ["_linear_gelu_fwd", "_linear_gelu_fwd", "_gelu_bwd"]


@pytest.mark.parametrize("M,N,bias", [(70, 257, True), (1, 257, True), (17, 100, False)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_dgelu_db(M, N, bias, approximate, launched, device):
    """dgelu="fused_db": dpre and db in one pass (M 70 = 3 row blocks over 2 programs: the
    row-block loop and the per-program partials both run)."""
    with lg.variant(dgelu="fused_db"):
        check_parity(*_make(M, 40, N, device, bias=bias), approximate, torch.float16)
    assert "_gelu_bwd_db" in launched and "_gelu_bwd" not in launched


def test_variant_setting_is_checked():
    with pytest.raises(ValueError, match="tma"):
        lg.set_variant(forward="cutlass")
    with pytest.raises(ValueError, match="unknown setting"):
        lg.set_variant(backward="x")
    assert lg.VARIANT == {"forward": "auto", "dgelu": "elementwise", "preact": "store", "gelu": "fast",
                          "tanh": "cublaslt"}  # measured


# ----------------------------------------------------------------------------- fast GELU maths

lgk = importlib.import_module("fuseformer.kernels.linear_gelu_kernels")


@triton.jit
def _gelu_probe(U, Y, DY, n, APPROX_TANH: tl.constexpr, FAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(U + offs, mask=offs < n)
    tl.store(Y + offs, lgk._gelu(u, APPROX_TANH, FAST), mask=offs < n)
    tl.store(DY + offs, lgk._gelu_grad(u, APPROX_TANH, FAST), mask=offs < n)


def _gelu64(u, approximate):
    """GELU and GELU' in float64, the erf one through erfc so the tail (u << 0) keeps its digits."""
    u = u.double()
    if approximate == "tanh":
        z = (2 / torch.pi) ** 0.5 * (u + 0.044715 * u**3)
        s = torch.sigmoid(2 * z)
        return u * s, s + 2 * u * s * (1 - s) * (2 / torch.pi) ** 0.5 * (1 + 3 * 0.044715 * u**2)
    phi = 0.5 * torch.erfc(-u / 2**0.5)
    return u * phi, phi + u * torch.exp(-0.5 * u * u) / (2 * torch.pi) ** 0.5


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fast_gelu_maths(approximate, device):
    """The fast formulas (u sigmoid(2 z(u)) with 1 / (1 + 2^x), linear_gelu_kernels.py) as the
    kernels evaluate them in fp32 (the interpreter's division and exp2 standing in for
    rcp.approx and ex2.approx: their few ulps count on a GPU, hence the slack) against float64
    over u in [-14, 14], errors scaled by max(|value|, 1). tanh: the formula itself, as close
    as the exact maths. erf: a fitted z(u), within the bounds the kernels' comments state,
    3.2e-6 for GELU and 1.6e-5 for GELU' (3.14e-6 and 1.51e-5 in the interpreter; the slack
    is the GPU's approximate instructions; these maths serve 16-bit outputs only, and half an
    fp16 ulp at 1 is 4.9e-4), the far negative tail included."""
    u = torch.linspace(-14, 14, 200_001, device=device)
    n = u.numel()
    ref, dref = _gelu64(u, approximate)
    errors = {}
    for fast in (True, False):
        y, dy = torch.empty_like(u), torch.empty_like(u)
        with warnings.catch_warnings():  # numpy's exp2 overflowing to inf, as the GPU's does
            warnings.simplefilter("ignore", RuntimeWarning)
            _gelu_probe[(triton.cdiv(n, 4096),)](u, y, dy, n, APPROX_TANH=approximate == "tanh", FAST=fast,
                                                 BLOCK=4096)
        errors[fast] = [((got.double() - want).abs() / want.abs().clamp_min(1)).max().item()
                        for got, want in ((y, ref), (dy, dref))]
    if approximate == "tanh":
        for what, fast_err, exact_err in zip(("gelu", "gelu'"), errors[True], errors[False]):
            assert fast_err <= 2.0 * exact_err + 2e-7, (what, fast_err, exact_err)
    else:
        assert errors[True][0] <= 3.2e-6 and errors[True][1] <= 1.6e-5, errors[True]
        assert max(errors[False]) < 1e-6, errors[False]  # the exact maths: fp32's own rounding
        # The fit is a fit: it is measurably not erf (a check that it is not the exact path).
        assert errors[True][0] > 1e-6, errors[True]


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_fast_gelu_maths_on_ptx(approximate, device):
    """The same bounds with rcp.approx / ex2.approx themselves (the GPU session runs the
    gpu-marked tests, not the whole suite)."""
    test_fast_gelu_maths(approximate, device)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("forward,dgelu", [("portable", "elementwise"), ("tma", "fused_db")])
@pytest.mark.parametrize("gelu", ["fast", "exact"])
def test_gelu_maths_parity(gelu, forward, dgelu, approximate, launched, device):
    """Both GELU maths (gelu="fast", the default, and "exact") through every kernel that
    evaluates GELU or GELU': the portable and TMA forwards and both dgelu passes, fp16 (float32
    keeps the exact maths), odd shapes, K over several tiles."""
    assert lg.VARIANT["gelu"] == "fast"  # the default this test's "fast" half stands for
    with lg.variant(gelu=gelu, forward=forward, dgelu=dgelu):
        assert lg._fast_gelu(torch.float16) == lg._fast_gelu(torch.bfloat16) == (gelu == "fast")
        assert not lg._fast_gelu(torch.float32)
        check_parity(*_make(17, 768, 256, device), approximate, torch.float16)
        check_parity(*_make(5, 40, 33, device), approximate, torch.float16)
    expected = "_linear_gelu_tma" if forward == "tma" else "_linear_gelu_fwd"
    assert launched[:2] == [expected, "_gelu_bwd_db" if dgelu == "fused_db" else "_gelu_bwd"]


@pytest.mark.parametrize("split", [1, 2])
def test_tma_epilogue_slices(split, monkeypatch, launched, device):
    """The interpreter's one TMA config runs the epilogue in column quarters (SPLIT_N=4, as the
    GPU's 128 x 256 config does); the GPU's other configs use halves or the whole tile."""
    import triton

    tuned = lg._linear_gelu_tma.kernel  # the autotuner under the recorder
    config = tuned.configs[0]
    assert config.kwargs["SPLIT_N"] == 4
    whole = triton.Config({**config.kwargs, "SPLIT_N": split}, num_warps=config.num_warps,
                          num_stages=config.num_stages)
    monkeypatch.setattr(tuned, "configs", [whole])
    monkeypatch.setattr(_util, "_tuned_configs", {})
    with lg.variant(forward="tma", preact="recompute"):
        check_parity(*_make(17, 768, 256, device), "tanh", torch.float32)
    assert launched == ["_linear_gelu_tma"] * 2


def test_bench_variant_impls_run_their_variant_forward_and_backward(launched):
    """`fuseformer bench` times each variant beside fuseformer-triton: the variant must be in
    force for the backward too (bench.core.Impl.context spans forward and backward)."""
    from fuseformer.bench import ops

    case = ops.linear_gelu_case("lg", M=17, K_in=40, N=80, grad=True, device_type="cpu")
    names = [i.name for i in case.impls]
    assert names[:2] == ["fuseformer-triton", "fuseformer-triton-tma"]
    case.impls = [i for i in case.impls if i.name == "fuseformer-triton-fused-db"]
    prepared = case.prepare(torch.device("cpu"), torch.float32, 0)
    assert not prepared.errors and all(p.ok for _, p in prepared.parity["fuseformer-triton-fused-db"])
    assert launched == ["_linear_gelu_fwd", "_gelu_bwd_db"]
    assert lg.VARIANT["dgelu"] == "elementwise"  # restored after the call


@pytest.mark.gpu
@pytest.mark.parametrize("choice", [dict(forward="tma"), dict(forward="tma", preact="recompute"),
                                    dict(dgelu="fused_db"), dict(forward="tma", preact="recompute", dgelu="fused_db"),
                                    dict(gelu="exact"), dict(forward="tma", dgelu="fused_db", gelu="exact"),
                                    dict(forward="tma", preact="recompute", gelu="exact")])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bf16_variants_on_gpu(choice, approximate, launched, device):
    """On a GPU the TMA kernel autotunes over configs of different BLOCK_M: the recompute
    path's db partial rows must not keep what a losing config wrote (reset_to_zero)."""
    with lg.variant(**choice):
        check_parity(*_make(300, 768, 1000, device), approximate, torch.bfloat16)
    if choice.get("forward") == "tma" and torch.cuda.get_device_capability()[0] >= 9:
        assert "_linear_gelu_tma" in launched


def _inference_parity(x, w, b, approximate, dtype):
    from fuseformer.kernels.parity import assert_parity

    with torch.no_grad():
        out = K.linear_gelu(x.to(dtype), w.to(dtype), b.to(dtype), approximate=approximate, backend="triton")
        ref64 = reference.linear_gelu(x.double(), w.double(), b.double(), approximate=approximate)
        torch_d = reference.linear_gelu(x.to(dtype), w.to(dtype), b.to(dtype), approximate=approximate)
    assert out.dtype == dtype and out.shape == ref64.shape
    assert_parity(out, ref64, torch_d, dtype)


def test_tanh_inference_runs_our_kernel_off_the_gpu(launched, device):
    """cuBLASLt's tanh epilogue (VARIANT["tanh"]) is a CUDA path: on the CPU torch's
    _addmm_activation computes the erf GELU, so our kernel runs there whatever the setting."""
    if device != "cpu":
        pytest.skip("the CPU's side of the rule")
    x, w, b = _make(5, 40, 24, device)
    assert not lg._tanh_epilogue(x.half(), w.half(), b.half(), "tanh", False)
    _inference_parity(x, w, b, "tanh", torch.float16)
    assert launched and launched[0] in ("_linear_gelu_tma", "_linear_gelu_fwd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_tanh_inference_takes_cublaslt_epilogue(launched, dtype, device):
    """Inference with tanh GELU and a bias: cuBLASLt's GELU epilogue, no Triton kernel, within
    the parity rule, also for a 3-D x; our kernel under tanh="triton", for erf, without a bias
    and when autograd needs the pre-activation."""
    x, w, b = _make(300, 768, 1000, device)
    _inference_parity(x, w, b, "tanh", dtype)
    _inference_parity(x.view(3, 100, 768), w, b, "tanh", dtype)
    assert launched == []
    with lg.variant(tanh="triton"):
        _inference_parity(x, w, b, "tanh", dtype)
    _inference_parity(x, w, b, "none", dtype)
    assert len(launched) == 2
    with torch.no_grad():
        K.linear_gelu(x.to(dtype), w.to(dtype), approximate="tanh", backend="triton")
    assert len(launched) == 3
    check_parity(x, w, b, "tanh", dtype)
    assert len(launched) > 4  # forward, dgelu


def test_allocator_for_device_side_descriptors_is_set_where_missing_and_never_replaced(monkeypatch):
    """The TMA kernels' tensor maps (Linear+GELU, Hopper attention) live in scratch from
    triton.set_allocator, a ContextVar: set ours where a thread has none (a new thread always
    starts without), keep a user's own."""
    import threading

    import triton
    from triton.runtime import _allocation

    from fuseformer.kernels import _util

    calls = []
    monkeypatch.setattr(triton, "set_allocator", lambda fn: calls.append(fn))
    token = _allocation._allocator.set(_allocation.NullAllocator())
    try:
        _util.ensure_tma_allocator()
        assert calls == [_util._scratch]
        _allocation._allocator.set(lambda size, alignment, stream: None)  # a user's allocator
        _util.ensure_tma_allocator()
        assert calls == [_util._scratch]
        thread = threading.Thread(target=_util.ensure_tma_allocator)
        thread.start()
        thread.join()
        assert calls == [_util._scratch] * 2
    finally:
        _allocation._allocator.reset(token)


@pytest.mark.parametrize("shape", [(0, 8, 5), (4, 0, 6), (3, 8, 0)])
def test_new_variants_on_empty_shapes(shape, device):
    M, Kf, N = shape
    with lg.variant(forward="tma", preact="recompute", dgelu="fused_db"):
        x = torch.randn(M, Kf, device=device, requires_grad=True)
        w = torch.randn(N, Kf, device=device, requires_grad=True)
        b = torch.randn(N, device=device, requires_grad=True)
        out = K.linear_gelu(x, w, b, backend="triton")
        out.sum().backward()
    ref = reference.linear_gelu(x.detach(), w.detach(), b.detach())
    torch.testing.assert_close(out.detach(), ref)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape
    if M == 0 or N == 0:
        assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("grad", [False, True])
def test_auto_forward_takes_tma_for_inference_and_portable_for_training(grad, launched, device):
    """forward="auto" (the default): the TMA kernel where nothing has to be kept for the
    backward, the portable one where the pre-activation is stored (the H100's faster paths)."""
    x, w, b = _make(17, 64, 96, device)
    with lg.variant(forward="auto"):
        if grad:
            check_parity(x, w, b, "none", torch.float16)
        else:
            x16, w16, b16 = x.half(), w.half(), b.half()
            out = K.linear_gelu(x16, w16, b16, backend="triton")
            assert_parity(out, reference.linear_gelu(x16.double(), w16.double(), b16.double()),
                          reference.linear_gelu(x16, w16, b16), torch.float16, what="out")
    assert launched[0] == ("_linear_gelu_fwd" if grad else "_linear_gelu_tma")


@pytest.mark.parametrize("forward", ["portable", "tma"])
@pytest.mark.parametrize("shape", [(3, 5, 24), (24,), (2, 0, 24), (2, 3, 0)])
def test_inference_takes_a_contiguous_x_of_any_rank_in_place(forward, shape, launched, device):
    """Inference on a contiguous x of any rank: the launcher reads it where it is (rows at
    row * K, no reshape view) and writes out in x's leading shape; a non-contiguous 3-D x
    (a transposed view) takes the reshape path. Outputs start as NaN (poisoned)."""
    N = 40
    w16 = (torch.randn(N, shape[-1], device=device) / max(1, shape[-1]) ** 0.5).half()
    b16 = torch.randn(N, device=device).half()
    x16 = torch.randn(*shape, device=device).half()
    variants = [x16]
    if len(shape) == 3:
        variants.append(torch.randn(shape[1], shape[0], shape[2], device=device).half().transpose(0, 1))
    for x in variants:
        with lg.variant(forward=forward):
            out = K.linear_gelu(x, w16, b16, backend="triton")
        assert out.shape == (*shape[:-1], N) and out.is_contiguous()
        ref64 = reference.linear_gelu(x.double(), w16.double(), b16.double())
        if out.numel() and shape[-1]:
            assert_parity(out, ref64, reference.linear_gelu(x, w16, b16), torch.float16, what="out")
        else:
            torch.testing.assert_close(out.double(), ref64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stored", [True, False])
def test_backward_adds_acc_to_dx_in_its_gemm(stored):
    """`acc` (Impl.backward_extras; a fused block's residual gradient): dx comes back as
    acc + dx, the add done by the dX GEMM, with pre stored or recomputed; dW and db unchanged."""
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in ((13, 24), (40, 24), (40,)))
    dout, acc = torch.randn(13, 40, generator=g).to(DEVICE), torch.randn(13, 24, generator=g).to(DEVICE)
    _, pre = lg.forward(x, w, b, "none", True)
    pre = pre if stored else None
    bias = None if stored else b
    dx, dw, db = lg.backward(dout, x, w, pre, "none", True, bias=bias)
    dx2, dw2, db2 = lg.backward(dout, x, w, pre, "none", True, bias=bias, acc=acc)
    torch.testing.assert_close(dx2, acc + dx, rtol=1e-5, atol=1e-5)
    assert torch.equal(dw2, dw) and torch.equal(db2, db)
