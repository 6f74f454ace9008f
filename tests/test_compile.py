"""torch.compile(fullgraph=True) traces a function that uses all three fused ops (custom ops
with fake implementations and autograd) without a graph break, forward and backward, and
gives what eager gives. aot_eager: the CPU has no inductor-compatible Triton backend."""
import pytest
import torch

from fuseformer import kernels as K

pytestmark = pytest.mark.skipif("triton" not in K.available_backends(), reason=str(K.unavailable_reason("triton")))


def block(x, w_qkv, w_fc, b_fc, ln_w, ln_b, pad):
    B, T, C = x.shape
    q, k, v = (x @ w_qkv.T).view(B, T, 3, 2, C // 2).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
    a = K.scaled_dot_product_attention(q, k, v, attn_mask=pad, backend="triton")
    h = K.add_layer_norm(a.transpose(1, 2).reshape(B, T, C), x, ln_w, ln_b, backend="triton")
    return K.linear_gelu(h, w_fc, b_fc, backend="triton")


def test_all_three_ops_compile_without_graph_break_and_match_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    C = 32
    pad = torch.ones(3, 1, 1, 9, dtype=torch.bool, device=device)
    pad[1, ..., 5:] = False
    params = [torch.randn(3, 9, C), torch.randn(3 * C, C) / 6, torch.randn(48, C) / 6, torch.randn(48),
              torch.randn(C), torch.randn(C)]
    params = [p.to(device) for p in params]
    runs = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        leaves = [p.clone().requires_grad_(True) for p in params]
        out = fn(*leaves, pad)
        out.square().sum().backward()
        runs.append([out] + [t.grad for t in leaves])
    for eager, compiled in zip(*runs):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # fullgraph=True already raises on a break; explain() states it in numbers too.
    explanation = torch._dynamo.explain(block)(*params, pad)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_public_functions_with_default_arguments_trace_fullgraph(backend, device):
    """No `backend=` argument: the backend in force is read inside the traced region (it was a
    ContextVar once, which Dynamo cannot trace)."""
    torch._dynamo.reset()

    def f(q, k, v, x, r, w, b, fc_w):
        a = K.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = K.add_layer_norm(x, r, w, b)
        return a.sum() + K.linear_gelu(h, fc_w).sum()

    torch.manual_seed(0)
    args = [torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(5, 16),
            torch.randn(5, 16), torch.randn(16), torch.randn(16), torch.randn(24, 16) / 4]
    args = [a.to(device) for a in args]
    before = K.get_backend()
    K.set_backend(backend)
    try:
        expected = f(*args)
        got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    finally:
        K.set_backend(before)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
