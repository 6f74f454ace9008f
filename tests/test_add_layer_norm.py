"""add_layer_norm on the triton backend against the float64 reference (parity rule)."""
import dataclasses
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseformer.kernels import _util
from fuseformer import kernels as K
from fuseformer.kernels import reference
from fuseformer.kernels._util import draw_seed
from fuseformer.kernels.parity import assert_parity

# The package re-exports the function under the module's name; fetch the module itself.
aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_util, "_POISON", True)  # what FUSEFORMER_POISON=1 sets at import


def _inputs(shape, dtype, device, residual=True, weight=True, bias=True):
    N = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device)
    r = torch.randn(shape, dtype=dtype, device=device) if residual else None
    # Weights away from 1 and biases away from 0, so a kernel that skips them fails.
    w = (1.0 + 0.5 * torch.randn(N, device=device)).to(dtype) if weight else None
    b = (0.5 * torch.randn(N, device=device)).to(dtype) if bias else None
    return x, r, w, b


def _leaves(tensors, dtype=None):
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        t = t.detach().to(dtype or t.dtype).requires_grad_(True)
        out.append(t)
    return out


def check_parity(shape, dtype, device, *, residual=True, weight=True, bias=True, p=0.0, prenorm=False, eps=1e-5):
    """Run kernel, float64 reference and same-dtype reference; compare outputs and every grad."""
    base = _inputs(shape, dtype, device, residual, weight, bias)
    torch.manual_seed(1234)
    seed = draw_seed(device)
    mask = aln.dropout_mask(seed, shape, p) if p > 0 else None

    results = {}
    for name, dt in (("impl", dtype), ("ref64", torch.float64), ("torch_d", dtype)):
        leaves = _leaves(base, dt)
        if name == "impl":
            torch.manual_seed(1234)  # the public op draws the same seed as above
            out = K.add_layer_norm(*leaves, eps=eps, dropout_p=p, prenorm=prenorm, backend="triton")
        else:
            out = reference.add_layer_norm(*leaves, eps=eps, dropout_p=p, prenorm=prenorm, dropout_mask=mask)
        outs = out if prenorm else (out,)
        results[name] = (outs, leaves)

    gens = torch.Generator(device="cpu").manual_seed(7)
    grads_out = [torch.randn(o.shape, generator=gens).to(device) for o in results["impl"][0]]
    for name, (outs, leaves) in results.items():
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, grads_out))
        present = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(loss, present)
        results[name] = (outs, grads)

    labels = ["y", "stream"]
    for i in range(len(results["impl"][0])):
        assert_parity(results["impl"][0][i], results["ref64"][0][i], results["torch_d"][0][i], dtype, what=labels[i])
    names = [n for n, t in zip(("dx", "dresidual", "dweight", "dbias"), base) if t is not None]
    for i, what in enumerate(names):
        impl_g, ref_g, td_g = results["impl"][1][i], results["ref64"][1][i], results["torch_d"][1][i]
        assert impl_g.shape == ref_g.shape and impl_g.dtype == dtype
        assert_parity(impl_g, ref_g, td_g, dtype, what=what)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [1, 100, 768, 1023])
def test_parity_hidden_sizes(hidden, dtype, device):
    check_parity((3, 5, hidden), dtype, device)


@pytest.mark.parametrize(
    "residual,weight,bias", [(False, True, True), (True, False, True), (True, True, False), (False, False, False)]
)
def test_optional_arguments(residual, weight, bias, device):
    check_parity((7, 100), torch.float32, device, residual=residual, weight=weight, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prenorm_gradients_into_both_outputs(dtype, device):
    check_parity((3, 3, 257), dtype, device, prenorm=True)


def test_prenorm_without_residual_returns_stream(device):
    x = torch.randn(4, 33, device=device)
    y, stream = K.add_layer_norm(x, None, None, None, prenorm=True, backend="triton")
    torch.testing.assert_close(stream, x, rtol=0, atol=0)
    assert stream.data_ptr() != x.data_ptr()


def test_chunked_rows_beyond_block_limit(monkeypatch, device):
    # 5000 > the limit forces the multi-pass path that loops over the row in chunks.
    monkeypatch.setattr(aln, "MAX_FUSED_BLOCK", 1024)
    check_parity((3, 5000), torch.float32, device, p=0.2, prenorm=True)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("weight,bias,p", [(True, True, 0.0), (True, True, 0.3), (False, False, 0.0),
                                           (True, False, 0.3)])
def test_backward_sums_dx_over_the_rows_when_asked(monkeypatch, device, chunked, weight, bias, p):
    """dx_sum (Impl.backward_extras; a fused block's bias gradient of the layer before the
    LN): a fifth output, dx (after dropout) summed over the rows in the dtype asked, from the
    kernel's partial sums beside dweight's and dbias's, which stay what they were; on the
    one-block and the chunked path, with weight and bias or neither, and for no rows."""
    if chunked:
        monkeypatch.setattr(aln, "CHUNK", 128)
    x, r, w, b = _inputs((7, 300), torch.float32, device, weight=weight, bias=bias)
    dy = torch.randn(7, 300, device=device)
    seed = draw_seed(device) if p else None
    _, stream, mean, rstd = aln.forward(x, r, w, b, 1e-5, p, seed, True)
    ref = aln.backward(dy, None, stream, w, b, mean, rstd, p, seed, True)
    got = aln.backward(dy, None, stream, w, b, mean, rstd, p, seed, True, dx_sum=torch.float16)
    assert len(ref) == 4 and len(got) == 5 and got[4].dtype == torch.float16 and got[4].shape == (300,)
    for a, e in zip(got[:4], ref):
        assert (a is None and e is None) or torch.equal(a, e)
    torch.testing.assert_close(got[4], ref[0].double().sum(0).half(), rtol=2e-3, atol=2e-3)
    empty = aln.backward(dy[:0], None, stream[:0], w, b, mean[:0], rstd[:0], p, seed, True, dx_sum=torch.float32)
    assert torch.equal(empty[4], torch.zeros(300, device=device))


def test_backward_chunked_while_forward_fits_one_block(monkeypatch, device):
    # Rows wider than CHUNK: the forward keeps the row in one block, the backward (which holds
    # more values per element) takes its two-pass chunked path.
    monkeypatch.setattr(aln, "CHUNK", 128)
    assert aln._block(300)[1] and not aln._bwd_block(300)[1]
    check_parity((3, 300), torch.float32, device, p=0.2, prenorm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [768, 1023, 4096, 16384, 20000])
def test_bf16_on_gpu(hidden, device):
    check_parity((6, hidden), torch.bfloat16, device, prenorm=True, p=0.1)


def test_non_default_eps(device):
    # eps = 0.1 against a row variance of ~2 moves rstd by ~2.5%, far beyond the fp32 bound:
    # a kernel that dropped eps, or read the default, fails here.
    check_parity((4, 100), torch.float32, device, eps=0.1, prenorm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N", [(8192, 768), (4096, 16500)])
def test_gpu_backward_many_rows_per_program(M, N, device):
    """The backward launches at most 4 programs per SM, each summing its rows into one row of
    dweight/dbias partials; small test shapes give every program a single row. M >> 4 x SMs
    exercises the per-program accumulation, on the one-block and the chunked (N > 16384) path."""
    for variant in aln.BACKWARD_VARIANTS:
        _, _, _, programs = aln.backward_plan(M, N, variant, torch.device(device))
        assert programs * 4 <= M
        with aln.variant(backward=variant):
            check_parity((M, N), torch.float32, device, prenorm=True, p=0.1)


# ----------------------------------------------------------------------------- dropout


def test_dropout_exact_parity_with_rebuilt_mask(device):
    check_parity((5, 300), torch.float32, device, p=0.3, prenorm=True)


def test_dropout_keep_fraction_and_scaling(device):
    p = 0.3
    x = torch.randn(64, 256, device=device)
    torch.manual_seed(3)
    seed = draw_seed(device)
    torch.manual_seed(3)
    _, stream = K.add_layer_norm(x, None, None, None, dropout_p=p, prenorm=True, backend="triton")
    mask = aln.dropout_mask(seed, x.shape, p)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02
    assert torch.equal(stream == 0, ~mask)
    torch.testing.assert_close(stream[mask], x[mask] / (1 - p))


def test_dropout_bits_serve_four_columns_each_and_do_not_depend_on_the_block(device):
    """One Philox call's four words serve four consecutive columns (kernels/philox.py): each
    column position within a group of four keeps at 1 - p on its own, two neighbours agree
    only as often as independent draws would, and the mask is the same whatever block the
    kernel walks the row in (the wide path's chunks, a narrow row's per-lane words)."""
    from fuseformer.kernels.add_layer_norm_kernels import _keep_mask_kernel

    seed, p = torch.tensor([77], device=device), 0.5
    M, N = 64, 512
    keep = aln.dropout_mask(seed, (M, N), p).view(M, N // 4, 4).float()
    for lane in range(4):
        assert abs(keep[..., lane].mean().item() - (1 - p)) < 0.04
    same = (keep[..., 0] == keep[..., 1]).float().mean().item()
    assert abs(same - 0.5) < 0.05  # p^2 + (1 - p)^2 for independent draws
    rows = 3  # the interpreter runs each program in turn: few of them
    for width, blocks in ((40, (8, 16, 64)), (6, (1, 2, 4, 8)), (3, (1, 2, 4))):
        masks = []
        for block in blocks:
            out = torch.empty(rows, width, dtype=torch.int8, device=device)
            _keep_mask_kernel[(rows, -(-width // block))](seed, out, width, p, BLOCK=block)
            masks.append(out)
        assert all(torch.equal(m, masks[0]) for m in masks[1:]), width
    assert torch.equal(masks[0].bool(), aln.dropout_mask(seed, (rows, 3), p))


def test_dropout_bits_follow_the_documented_formula(device):
    """kernels/add_layer_norm_kernels.py's _keep: column c of row r is kept iff word c % 4 of
    Philox4x32 under the key seed + r at counter c // 4, as tl.rand maps a word, is >= p.
    Written out here per element, apart from kernels/philox.py's tiles."""
    import triton
    import triton.language as tl

    @triton.jit
    def formula(OUT, SEED, N, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        q = (c // 4).to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(tl.load(SEED) + r, q, q * 0, q * 0, q * 0)
        lane = c % 4
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        tl.store(OUT + r * N + c, tl.random.uint_to_uniform_float(word), mask=c < N)

    seed, (M, N), p = torch.tensor([31], device=device), (5, 45), 0.3
    u = torch.empty(M, N, device=device)
    formula[(M,)](u, seed, N, BLOCK=64)
    assert torch.equal(aln.dropout_mask(seed, (M, N), p), u >= p)


def test_dropout_determinism(device):
    x, r, w, b = _inputs((6, 128), torch.float32, device)
    torch.manual_seed(11)
    a = K.add_layer_norm(x, r, w, b, dropout_p=0.5, backend="triton")
    torch.manual_seed(11)
    b2 = K.add_layer_norm(x, r, w, b, dropout_p=0.5, backend="triton")
    c = K.add_layer_norm(x, r, w, b, dropout_p=0.5, backend="triton")
    assert torch.equal(a, b2)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------- shapes


def test_non_contiguous_inputs(device):
    base = torch.randn(100, 6, device=device)
    x = base.t()  # (6, 100), a transposed view
    r = torch.randn(100, 6, device=device).t()
    w, b = torch.randn(100, device=device), torch.randn(100, device=device)
    assert not x.is_contiguous()
    y = K.add_layer_norm(x, r, w, b, backend="triton")
    ref = reference.add_layer_norm(x.double(), r.double(), w.double(), b.double())
    assert_parity(y, ref, reference.add_layer_norm(x, r, w, b), torch.float32)


@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)])
def test_empty_rows(shape, device):
    x, r, w, b = _leaves(_inputs(shape, torch.float32, device))
    y, stream = K.add_layer_norm(x, r, w, b, prenorm=True, backend="triton")
    assert y.shape == shape and stream.shape == shape
    (y.sum() + stream.sum()).backward()
    assert x.grad.shape == shape and r.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_no_grad_path_skips_saving(device):
    x, r, w, b = _inputs((3, 64), torch.float32, device)
    with torch.no_grad():
        y = K.add_layer_norm(x, r, w, b, backend="triton")
    assert_parity(
        y, reference.add_layer_norm(x.double(), r.double(), w.double(), b.double()), reference.add_layer_norm(x, r, w, b)
    )


# ----------------------------------------------------------------------------- errors


def test_bad_inputs_name_the_argument(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(8, device=device)
    with pytest.raises(ValueError, match="x"):
        K.add_layer_norm(torch.tensor(1.0), None, None, None, backend="triton")
    with pytest.raises(TypeError, match="x"):
        K.add_layer_norm(torch.ones(4, 8, dtype=torch.int32), None, None, None, backend="triton")
    with pytest.raises(ValueError, match="residual"):
        K.add_layer_norm(x, torch.randn(4, 9), None, None, backend="triton")
    with pytest.raises(TypeError, match="residual"):
        K.add_layer_norm(x, x.half(), None, None, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        K.add_layer_norm(x, None, torch.randn(9), None, backend="triton")
    with pytest.raises(TypeError, match="bias"):
        K.add_layer_norm(x, None, w, w.double(), backend="triton")
    with pytest.raises(ValueError, match="eps"):
        K.add_layer_norm(x, None, w, None, eps=0.0, backend="triton")
    with pytest.raises(ValueError, match="dropout_p"):
        K.add_layer_norm(x, None, w, None, dropout_p=1.0, backend="triton")
    with pytest.raises(K.BackendUnsupportedError, match="float64"):
        K.add_layer_norm(x.double(), None, None, None, backend="triton")


# ----------------------------------------------------------------------------- fuzz


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 6),
    hidden=st.integers(1, 300),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    p=st.sampled_from([0.0, 0.25]),
    prenorm=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-12, 0.1]),
)
def test_fuzz(rows, hidden, flags, p, prenorm, eps):
    residual, weight, bias = flags
    check_parity(
        (rows, hidden), torch.float32, DEVICE, residual=residual, weight=weight, bias=bias, p=p, prenorm=prenorm, eps=eps
    )


# ----------------------------------------------------------------------------- forward variants


@pytest.mark.parametrize("variant", ["rows", "persistent"])
@pytest.mark.parametrize(
    "M,N,p,prenorm",
    [(17, 768, 0.0, False), (17, 768, 0.2, True), (1, 100, 0.0, True), (17, 257, 0.0, False), (5, 1, 0.0, False),
     (3, 1023, 0.0, True)],
)
def test_forward_variants(variant, M, N, p, prenorm, monkeypatch, device):
    """The multi-row kernel (several rows per program, and the persistent grid that loops over
    tiles) against the reference: partial last tiles (M 17 over 4-row tiles), one row, rows
    whose length is odd (no 16-byte alignment to claim), dropout and the prenorm stream."""
    monkeypatch.setitem(aln.VARIANT, "forward", variant)
    rows, _, align, programs, stages = aln.rows_plan(M, N, variant, torch.device(device))
    assert stages == (aln.PIPELINE_STAGES if variant == "persistent" else 1)
    assert align == min(16, N & -N)  # the largest power of two (<= 16) dividing N
    if variant == "persistent" and (M, N) == (17, 768):
        assert programs < aln.cdiv(M, rows)  # several tiles per program: the loop runs
    check_parity((M, N), torch.float32, device, p=p, prenorm=prenorm)
    check_parity((M, N), torch.float16, device, p=p, prenorm=prenorm, residual=False, bias=False)


def test_forward_variant_runs_the_multi_row_kernel(monkeypatch, device):
    """The switch reaches the launcher: the rows kernel runs (and the one-row kernel does not)."""
    launched = []
    for name in ("_add_ln_fwd", "_add_ln_fwd_rows"):
        kernel = getattr(aln, name)
        monkeypatch.setattr(aln, name, _Recorder(kernel, name, launched))
    x = torch.randn(6, 64, device=device)
    with aln.variant(forward="persistent"):
        K.add_layer_norm(x, None, None, None, backend="triton")
    K.add_layer_norm(x, None, None, None, backend="triton")
    assert launched == ["_add_ln_fwd_rows", "_add_ln_fwd"]
    with pytest.raises(ValueError, match="rows"):
        aln.set_variant(forward="fast")


class _Recorder:
    def __init__(self, kernel, name, log, keep=()):
        self.kernel, self.name, self.log, self.keep = kernel, name, log, keep

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.log.append((self.name, *(kwargs[k] for k in self.keep)) if self.keep else self.name)
            return launch(*args, **kwargs)

        return run


@pytest.mark.parametrize(
    "M,N,p,prenorm,flags",
    [(13, 768, 0.0, False, {}), (13, 100, 0.2, True, {}), (9, 1, 0.0, True, {}),
     (11, 257, 0.0, False, dict(weight=False, bias=False)), (6, 64, 0.0, True, dict(residual=False, bias=False))],
)
def test_pipelined_backward(M, N, p, prenorm, flags, device):
    """The backward with its row loop software-pipelined: on the interpreter's 4 programs each
    walks up to 4 rows, so the loop carries its dweight/dbias sums across iterations."""
    block, single, stages, programs = aln.backward_plan(M, N, "pipelined", torch.device(device))
    assert single and stages == aln.PIPELINE_STAGES and programs < M
    with aln.variant(backward="pipelined"):
        check_parity((M, N), torch.float32, device, p=p, prenorm=prenorm, **flags)
        check_parity((M, N), torch.float16, device, p=p, prenorm=prenorm, **flags)


def test_backward_variant_reaches_the_kernel(monkeypatch, device):
    """The switch reaches the launch: STAGES 2 under "pipelined" (the chunked path, whose loop
    over a row's chunks is not the row loop, keeps 1), 1 by default; restored after the block."""
    launched = []
    monkeypatch.setattr(aln, "_add_ln_bwd", _Recorder(aln._add_ln_bwd, "bwd", launched, keep=("STAGES", "SINGLE")))
    x = torch.randn(6, 64, device=device, requires_grad=True)
    with aln.variant(backward="pipelined"):
        K.add_layer_norm(x, None, None, None, backend="triton").sum().backward()
        monkeypatch.setattr(aln, "CHUNK", 32)
        K.add_layer_norm(x, None, None, None, backend="triton").sum().backward()
        monkeypatch.setattr(aln, "CHUNK", 4096)
    K.add_layer_norm(x, None, None, None, backend="triton").sum().backward()
    assert launched == [("bwd", aln.PIPELINE_STAGES, True), ("bwd", 1, False), ("bwd", 1, True)]
    assert aln.VARIANT == {"forward": "row", "backward": "loop"}  # the measured defaults
    with pytest.raises(ValueError, match="pipelined"):
        aln.set_variant(backward="prefetch")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_residual_gradient_is_written_once_without_dropout(monkeypatch, device, p):
    """h = x + residual: without dropout d residual == d x, so the backward writes one tensor
    and hands it to both (kernel asked for no residual gradient); with dropout they differ and
    both are written. x passed as its own residual (a shared leaf) sums the two, 2 dh."""
    asked = []
    get_impl = aln.backends.get_impl

    def recording_impl(op, name):
        impl = get_impl(op, name)

        def backward(*args):
            asked.append(args[-1])  # has_residual: is a residual gradient asked for?
            return impl.backward(*args)

        return dataclasses.replace(impl, backward=backward) if op == "add_layer_norm" else impl

    monkeypatch.setattr(aln.backends, "get_impl", recording_impl)
    x, r, w, b = _leaves(_inputs((7, 40), torch.float32, device))
    y = K.add_layer_norm(x, r, w, b, dropout_p=p, backend="triton")
    dx, dr = torch.autograd.grad((y * torch.randn_like(y)).sum(), (x, r))
    assert asked == [p > 0]
    assert (dx is dr) == (p == 0) and torch.equal(dx, dr) == (p == 0)
    if p == 0:
        check_parity((7, 40), torch.float32, device)  # the shared tensor has the right values
        x2 = x.detach().clone().requires_grad_(True)
        g = torch.randn(7, 40, device=device)
        (K.add_layer_norm(x2, x2, w, b, backend="triton") * g).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        (reference.add_layer_norm(x64, x64, w.double(), b.double()) * g.double()).sum().backward()
        torch.testing.assert_close(x2.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)


def test_weight_grads_are_deterministic(device):
    """dweight/dbias come from per-program partials summed in a fixed order (kernels/reduce.py):
    the same inputs give the same bits."""
    x, r, w, b = _leaves(_inputs((9, 100), torch.float32, device))
    grads = []
    for _ in range(2):
        w.grad = b.grad = None
        K.add_layer_norm(x, r, w, b, backend="triton").square().sum().backward()
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("P,N", [(1, 1), (70, 130), (4, 768)])
def test_sum_rows_reduces_every_partial_row(P, N, stages, device):
    """The second step of the dweight/dbias reductions: P > its 32-row step and N over several
    64-column programs, so a skipped row block or column block shows; pipelined or not."""
    from fuseformer.kernels.reduce import sum_rows

    part = torch.randn(P, N, device=device)
    out = sum_rows(part, torch.float16, stages=stages)
    assert out.dtype == torch.float16 and out.shape == (N,)
    torch.testing.assert_close(out, part.double().sum(0).half(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("P,N", [(1, 1), (70, 130)])
def test_sum_rows_two_interleaved_sums(P, N, device):
    """(P, 2, N) partials (add+LN's dweight and dbias in one buffer) -> two sums from one
    launch, each in its own dtype; poisoned outputs, so a group or column left unwritten shows."""
    from fuseformer.kernels._util import poison_outputs
    from fuseformer.kernels.reduce import sum_rows

    part = torch.randn(P, 2, N, device=device)
    with poison_outputs():
        first, second = sum_rows(part, torch.float16, torch.float32)
    assert (first.dtype, second.dtype, first.shape, second.shape) == (torch.float16, torch.float32, (N,), (N,))
    torch.testing.assert_close(first, part[:, 0].double().sum(0).half(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(second, part[:, 1].double().sum(0).float(), rtol=1e-5, atol=1e-5)
    # The pipelined walk adds in the same order: the same bits.
    again = sum_rows(part, torch.float16, torch.float32, stages=2)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)
    empty = sum_rows(part[:0], torch.float16, torch.float32)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in empty)


def test_sum_rows_three_interleaved_sums(device):
    """(P, 3, N) partials (add+LN's dweight, dbias and a fused block's dx sum) -> three sums
    from one launch, each in its dtype; poisoned outputs, so one left unwritten shows."""
    from fuseformer.kernels._util import poison_outputs
    from fuseformer.kernels.reduce import sum_rows

    part = torch.randn(70, 3, 130, device=device)
    with poison_outputs():
        sums = sum_rows(part, torch.float16, torch.float32, torch.bfloat16)
    assert [t.dtype for t in sums] == [torch.float16, torch.float32, torch.bfloat16]
    for g, t in enumerate(sums):
        torch.testing.assert_close(t.double(), part[:, g].double().sum(0), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["rows", "persistent"])
@pytest.mark.parametrize("M,N", [(8192, 768), (17, 1000), (4099, 1024)])
def test_forward_variants_on_gpu(variant, M, N, monkeypatch, device):
    monkeypatch.setitem(aln.VARIANT, "forward", variant)
    check_parity((M, N), torch.bfloat16, device, prenorm=True, p=0.1)
