"""The oracle itself: kernels/reference.py agrees with PyTorch's own ops in float64, and the
parity rule (kernels/parity.py) fails where it must."""
import math

import pytest
import torch
import torch.nn.functional as F

from fuseformer.kernels import parity as P
from fuseformer.kernels import reference as R

f64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 17), (5, 23)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_matches_torch(lq, lk, causal):
    q, k, v = torch.randn(3, 2, lq, 40, **f64), torch.randn(3, 2, lk, 40, **f64), torch.randn(3, 2, lk, 24, **f64)
    mask = torch.randn(3, 1, lq, lk, **f64)
    ours = R.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, scale=0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, theirs)
    ours = R.scaled_dot_product_attention(q, k, v, is_causal=causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, theirs)


def test_sdpa_gqa_matches_torch():
    q, k, v = torch.randn(2, 6, 9, 16, **f64), torch.randn(2, 2, 11, 16, **f64), torch.randn(2, 2, 11, 16, **f64)
    ours = R.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    theirs = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(ours, theirs)


def test_sdpa_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = (torch.randn(2, 3, 7, 16, **f64, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 3, 7, 7) > 0.5
    mask[:, :, 2] = False  # row 2 sees no key
    out = R.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 2] == 0)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :, 2] == 0)


def test_sdpa_dropout_mask_is_applied():
    q, k, v = (torch.randn(1, 1, 5, 8, **f64) for _ in range(3))
    keep = torch.rand(1, 1, 5, 5) > 0.3
    out = R.scaled_dot_product_attention(q, k, v, dropout_p=0.3, dropout_mask=keep)
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, (probs * keep / 0.7) @ v)


def test_varlen_matches_per_sequence_sdpa():
    lengths = [3, 1, 6]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    q, k, v = (torch.randn(10, 4, 8, **f64) for _ in range(3))
    out = R.varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), is_causal=True)
    for i in range(3):
        s = slice(cu[i].item(), cu[i + 1].item())
        one = F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1), is_causal=True)
        torch.testing.assert_close(out[s], one.transpose(0, 1))


@pytest.mark.parametrize("hidden", [1, 100, 1023])
def test_add_layer_norm_matches_torch(hidden):
    x, res = torch.randn(3, 5, hidden, **f64), torch.randn(3, 5, hidden, **f64)
    w, b = torch.randn(hidden, **f64), torch.randn(hidden, **f64)
    y, stream = R.add_layer_norm(x, res, w, b, eps=1e-6, prenorm=True)
    torch.testing.assert_close(stream, x + res)
    torch.testing.assert_close(y, F.layer_norm(x + res, (hidden,), w, b, eps=1e-6))
    torch.testing.assert_close(R.add_layer_norm(x, None, None, None), F.layer_norm(x, (hidden,)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_matches_torch(approximate):
    x, w, b = torch.randn(3, 7, 10, **f64), torch.randn(13, 10, **f64), torch.randn(13, **f64)
    torch.testing.assert_close(R.linear_gelu(x, w, b, approximate), F.gelu(x @ w.T + b, approximate=approximate))


def test_parity_rule():
    ref = torch.randn(100, **f64)
    torch_d = ref.float().double()  # fp32 rounding only
    torch_err = (torch_d - ref).abs().max().item()
    ok = P.parity(ref + 1e-6, ref, torch_d, torch.float32)
    assert ok.ok and ok.bound == pytest.approx(2 * torch_err + P.FLOORS[torch.float32])
    bad = P.parity(ref + 1e-3, ref, torch_d, torch.float32)
    assert not bad.ok and "FAIL" in str(bad)
    # An unwritten (NaN-poisoned) element fails however small the rest of the error is.
    poisoned = ref.clone()
    poisoned[7] = float("nan")
    assert not P.parity(poisoned, ref, torch_d, torch.float32).ok
    # ... unless it sits at a position that does not exist (padding), which is left out.
    where = torch.ones(100, dtype=torch.bool)
    where[7] = False
    assert P.parity(poisoned, ref, torch_d, torch.float32, where=where).ok
    with pytest.raises(AssertionError, match="dx"):
        P.assert_parity(ref + 1.0, ref, torch_d, torch.float32, what="dx")
    with pytest.raises(ValueError, match="shapes differ"):
        P.parity(ref[:5], ref, torch_d)
