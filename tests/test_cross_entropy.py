"""cross_entropy on the triton backend against the float64 reference (parity rule), forward
and backward: odd vocabularies (one class, a row wider than a forward step), ignored rows,
every reduction, int32 labels, strided logits (a padded vocabulary's view, a transpose),
empty inputs, outputs poisoned before each launch, and bad input named. Every test runs both
forward forms: the reducing program computing a small problem's rows itself (one launch), and
a program per row then the reducing one (two launches)."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from fuseformer import kernels as K
from fuseformer.kernels import _util, reference
from fuseformer.kernels.parity import assert_parity

ce = importlib.import_module("fuseformer.kernels.cross_entropy")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(K.unavailable_reason("triton") is not None, reason=str(K.unavailable_reason("triton")))


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_util, "_POISON", True)  # an unwritten gradient element fails as NaN


@pytest.fixture(autouse=True, params=["one_launch", "two_launches"])
def forward_form(request, monkeypatch):
    """The tests' problems are small: "one_launch" as they come (ce.SMALL_SCORES), and
    "two_launches" with no problem small, so _ce_fwd makes every row."""
    if request.param == "two_launches":
        monkeypatch.setattr(ce, "SMALL_SCORES", 0)
    return request.param


def test_small_problems_take_one_launch_and_large_ones_two(monkeypatch, forward_form):
    """The forward's launches, recorded: one (the reducing program makes the rows too) while
    the rows' scores, padded to a power of two, fit ce.SMALL_SCORES in at most two tiles; two
    beyond (a program per row first); the reducing program always last. And the same loss."""
    launched = []
    real = ce.launch

    def recording(fn, grid, *args, **kwargs):
        launched.append((getattr(fn, "__name__", None) or fn.fn.__name__, kwargs.get("ROWS_V")))
        return real(fn, grid, *args, **kwargs)

    monkeypatch.setattr(ce, "launch", recording)
    small = forward_form == "one_launch"
    g = torch.Generator().manual_seed(11)
    for M, V, one in ((8, 128, small), (3, 1000, small), (1, 4096, small), (64, 128, small), (65, 128, False),
                      (2, 4097, False)):
        logits = torch.randn(M, V, generator=g).to(DEVICE)
        labels = _labels((M,), V, g, ignored=[0] if M > 1 else []).to(DEVICE)
        launched.clear()
        loss = K.cross_entropy(logits, labels, backend="triton")
        padded = 1 << (V - 1).bit_length()
        expected = [("_ce_reduce", padded)] if one else [("_ce_fwd", None), ("_ce_reduce", 0)]
        assert launched == expected, (M, V, launched)
        torch.testing.assert_close(loss.double(), reference.cross_entropy(logits.double(), labels),
                                   rtol=1e-5, atol=1e-5)


def _labels(shape, V, generator, ignored=(), dtype=torch.int64):
    y = torch.randint(0, max(V, 1), shape, generator=generator)
    for index in ignored:
        y[index] = -100
    return y.to(dtype)


def _plain_torch(logits, labels, reduction):
    """What plain PyTorch computes in the logits' own dtype (the parity rule's torch_d)."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1).long(), reduction=reduction)
    return loss.view(labels.shape) if reduction == "none" else loss


def check(logits, labels, reduction="mean", where=None):
    """Loss and d logits of the kernel against the float64 reference, torch's own error in
    the logits' dtype as the yardstick."""
    dtype = logits.dtype
    g = torch.Generator().manual_seed(5)
    out_shape = labels.shape if reduction == "none" else ()
    dout = torch.rand(out_shape, generator=g, dtype=torch.float64) + 0.5
    results = {}
    for name in ("impl", "ref64", "torch_d"):
        x = (logits.detach().double() if name == "ref64" else logits.detach().clone()).requires_grad_(True)
        if name == "impl":
            loss = K.cross_entropy(x, labels, reduction=reduction, backend="triton")
        elif name == "ref64":
            loss = reference.cross_entropy(x, labels, reduction=reduction)
        else:
            loss = _plain_torch(x, labels, reduction)
        (dx,) = torch.autograd.grad(loss, x, dout.to(loss.dtype).to(loss.device))
        results[name] = (loss, dx)
    impl, ref64, torch_d = results["impl"], results["ref64"], results["torch_d"]
    assert impl[0].dtype == torch.float32 and impl[0].shape == ref64[0].shape
    assert impl[1].dtype == dtype and impl[1].shape == logits.shape
    assert_parity(impl[0], ref64[0], torch_d[0], dtype, what=f"loss ({reduction})")
    assert_parity(impl[1], ref64[1], torch_d[1], dtype, where=where, what=f"d logits ({reduction})")
    return impl


@pytest.mark.parametrize("V", [1, 17, 97, ce.FWD_BLOCK + 904])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parity_over_vocabularies_and_reductions(V, reduction):
    g = torch.Generator().manual_seed(V)
    logits = (3 * torch.randn(3, 5, V, generator=g)).to(DEVICE)
    labels = _labels((3, 5), V, g, ignored=[(0, 1), (2, 4)]).to(DEVICE)
    loss, dx = check(logits, labels, reduction)
    assert (dx[0, 1] == 0).all() and (dx[2, 4] == 0).all()  # ignored rows: no gradient
    if reduction == "none":
        assert loss[0, 1] == 0 and loss[2, 4] == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_keep_a_float32_loss(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(7, 300, generator=g)).to(DEVICE, dtype)
    labels = _labels((7,), 300, g, ignored=[3]).to(DEVICE)
    check(logits, labels)


def test_int32_labels_and_strided_labels():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 50, generator=g).to(DEVICE)
    wide = _labels((4, 12), 50, g, ignored=[(1, 2)], dtype=torch.int32).to(DEVICE)
    check(logits, wide[:, ::2])  # int32, every other column: a strided (4, 6) view


def test_padded_vocabulary_view_and_transposed_logits():
    """The models' padded logits: rows 64 apart, 57 columns used; and a transpose, whose
    scores are not adjacent in memory."""
    g = torch.Generator().manual_seed(3)
    padded = torch.randn(2, 9, 64, generator=g).to(DEVICE)
    labels = _labels((2, 9), 57, g, ignored=[(0, 0)]).to(DEVICE)
    view = padded[..., :57]
    assert view.stride()[-2] == 64
    check(view, labels)
    t = torch.randn(30, 11, generator=g).to(DEVICE).t()  # (11, 30), column stride 11
    check(t, _labels((11,), 30, g).to(DEVICE), "none")


def test_rows_of_minus_infinity_but_the_label():
    """A row whose scores are all -inf but the label's gives loss 0 and gradient 0: the
    running max starts at -inf without a NaN."""
    logits = torch.full((2, 40), float("-inf"), device=DEVICE)
    logits[0, 7] = 2.0
    logits[1, 39] = -3.0
    labels = torch.tensor([7, 39], device=DEVICE)
    x = logits.clone().requires_grad_(True)
    loss = K.cross_entropy(x, labels, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_every_row_ignored_gives_nan_mean_and_zero_gradient_as_torch():
    logits = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    labels = torch.full((3,), -100, device=DEVICE)
    loss = K.cross_entropy(logits, labels, backend="triton")
    assert torch.isnan(loss) and torch.isnan(reference.cross_entropy(logits, labels))
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert K.cross_entropy(logits, labels, reduction="sum", backend="triton").item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_inputs(reduction):
    logits = torch.randn(0, 5, 11, device=DEVICE, requires_grad=True)
    labels = torch.zeros(0, 5, dtype=torch.long, device=DEVICE)
    loss = K.cross_entropy(logits, labels, reduction=reduction, backend="triton")
    expected = reference.cross_entropy(logits.detach(), labels, reduction=reduction)
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    (dx,) = torch.autograd.grad(loss.sum(), logits)
    assert dx.shape == logits.shape
    # No class at all: fine while every label is ignored.
    none = torch.randn(4, 0, device=DEVICE)
    for backend in ("triton", "torch"):
        assert torch.isnan(K.cross_entropy(none, torch.full((4,), -100, device=DEVICE), backend=backend))


def test_ignore_index_other_than_minus_100():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 20, generator=g).to(DEVICE)
    labels = _labels((6,), 20, g).to(DEVICE)
    labels[2] = 0
    x = logits.clone().requires_grad_(True)
    loss = K.cross_entropy(x, labels, ignore_index=0, backend="triton")
    xr = logits.double().requires_grad_(True)
    ref = reference.cross_entropy(xr, labels, ignore_index=0)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_loss_may_be_changed_in_place(reduction):
    """`loss /= steps` (gradient accumulation) works as on F.cross_entropy's loss: the loss is
    a tensor of its own, not a view of the buffer the backward reads."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 3, 20, generator=g).to(DEVICE)
    labels = _labels((2, 3), 20, g, ignored=[(1, 1)]).to(DEVICE)
    x = logits.clone().requires_grad_(True)
    loss = K.cross_entropy(x, labels, reduction=reduction, backend="triton")
    loss /= 4
    loss.sum().backward()
    xr = logits.double().requires_grad_(True)
    (reference.cross_entropy(xr, labels, reduction=reduction) / 4).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_classes_below_the_width_for_padded_logits(backend):
    """A padded vocabulary's logits (the extra columns -inf) with classes = the real size: the
    loss and gradient of the unpadded logits, and a label past `classes` refused by name."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 45, generator=g).to(DEVICE)
    labels = _labels((5,), 45, g, ignored=[2]).to(DEVICE)
    padded = torch.cat([logits, torch.full((5, 19), float("-inf"), device=DEVICE)], dim=1).requires_grad_(True)
    plain = logits.clone().requires_grad_(True)
    loss = K.cross_entropy(padded, labels, classes=45, backend=backend)
    ref = K.cross_entropy(plain, labels, backend=backend)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded.grad[:, :45], plain.grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(padded.grad[:, 45:], torch.zeros(5, 19, device=DEVICE))
    bad = labels.clone()
    bad[0] = 50  # a padding column
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 45\).*got 50"):
        K.cross_entropy(padded, bad, classes=45, backend=backend)
    for wrong in (65, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"classes must be an int in \[0, 64\]"):
            K.cross_entropy(padded, labels, classes=wrong, backend=backend)


def test_torch_backend_is_the_reference_and_auto_on_cpu_is_torch():
    logits = torch.randn(5, 9, dtype=torch.float64)
    labels = torch.tensor([0, 8, -100, 3, 3])
    expected = reference.cross_entropy(logits, labels)
    assert torch.equal(K.cross_entropy(logits, labels, backend="torch"), expected)
    assert torch.equal(K.cross_entropy(logits, labels, backend="auto"), expected)
    assert expected.dtype == torch.float64


def test_bad_input_is_named():
    x = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, 4])
    with pytest.raises(TypeError, match="labels must be an int64 or int32"):
        K.cross_entropy(x, y.float())
    with pytest.raises(ValueError, match=r"labels must have the shape of logits without its last \(class\) dim"):
        K.cross_entropy(x, y[:3])
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        K.cross_entropy(x.long(), y)
    with pytest.raises(ValueError, match="logits must have at least 1 dimensions"):
        K.cross_entropy(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="reduction must be one of"):
        K.cross_entropy(x, y, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        K.cross_entropy(x, y, ignore_index=1.5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got 10"):
        K.cross_entropy(x, torch.tensor([1, 10, 3, 4]), backend="triton")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\).*got -3"):
        K.cross_entropy(x, torch.tensor([1, -3, 3, 4]))
    with pytest.raises(K.BackendUnsupportedError, match="float64"):
        K.cross_entropy(x.double(), y, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_labels_on_another_device_are_refused():
    with pytest.raises(ValueError, match="labels is on cpu but logits is on cuda"):
        K.cross_entropy(torch.randn(2, 3, device="cuda"), torch.tensor([0, 1]))


def test_compiles_without_graph_break_and_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 7, 33, generator=g).to(DEVICE)
    labels = _labels((4, 7), 33, g, ignored=[(0, 0), (3, 6)]).to(DEVICE)

    def f(x, y):
        return K.cross_entropy(x, y, backend="triton") + K.cross_entropy(x, y, reduction="none", backend="triton")[1, 2]

    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_(True)
        out = fn(x, labels)
        out.backward()
        runs.append((out, x.grad))
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_bert_vocabulary(dtype):
    """BERT's 30522 classes over 512 rows, 85% ignored as in masked-LM training."""
    g = torch.Generator().manual_seed(7)
    logits = (3 * torch.randn(512, 30522, generator=g)).to("cuda", dtype)
    labels = _labels((512,), 30522, g).cuda()
    labels[torch.rand(512, generator=g).cuda() < 0.85] = -100
    check(logits, labels)


@pytest.mark.gpu
def test_gpu_bad_label_fails_the_stream_with_a_device_side_assert():
    """On a GPU the reducing kernel asserts on the labels itself (as F.cross_entropy's kernels
    do): the stream fails, and the host learns it at its next sync. In a child process: a
    device-side assert leaves the CUDA context unusable."""
    import subprocess
    import sys

    code = ("import torch\nfrom fuseformer import kernels as K\n"
            "x = torch.randn(4, 10, device='cuda')\n"
            "ok = K.cross_entropy(x, torch.tensor([1, -100, 9, 0], device='cuda'), backend='triton')\n"
            "torch.cuda.synchronize()\nprint('valid ok', flush=True)\n"
            "K.cross_entropy(x, torch.tensor([1, 10, 3, 4], device='cuda'), backend='triton')\n"
            "torch.cuda.synchronize()\nprint('bad label passed', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "valid ok" in out, out[-2000:]
    assert proc.returncode != 0 and "bad label passed" not in out, out[-2000:]
    assert "device-side assert" in out or "labels must lie" in out, out[-2000:]
