"""torch.compile(fullgraph=True) traces a function that uses all three fused ops (custom ops
with fake implementations and autograd) without a graph break, forward and backward, and
gives what eager gives. aot_eager: the CPU has no inductor-compatible Triton backend."""
import importlib

import pytest
import torch

from fuseformer import kernels as K

pytestmark = pytest.mark.skipif(K.unavailable_reason("triton") is not None, reason=str(K.unavailable_reason("triton")))


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


def _op_calls(graph_module) -> list[str]:
    return [str(n.target) for n in graph_module.graph.nodes if n.op == "call_function" and "fuseformer" in str(n.target)]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", ["plain", "prenorm", "residual", "dropout", "strided"])
def test_add_layer_norm_compiles_to_the_op_with_exactly_the_outputs_it_needs(case, grad, device):
    """Each custom op has fixed outputs, all real (no 0-element stand-ins): inference writes no
    statistics; training without residual or dropout saves x instead of a copy of the stream.
    The compiled call matches eager, values and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x, r = torch.randn(5, 24, device=device), torch.randn(5, 24, device=device)
    if case == "strided":  # non-contiguous inputs: the ops' outputs are contiguous whatever they get
        x, r = torch.randn(24, 5, device=device).t(), torch.randn(5, 48, device=device)[:, ::2]
    w, b = torch.randn(24, device=device), torch.randn(24, device=device)
    prenorm, residual = case == "prenorm", None if case in ("plain", "dropout") else r
    if case == "strided":
        prenorm = True
    # Dropout draws its seed from torch's generator: the same seed for eager and compiled.
    p = 0.25 if case == "dropout" else 0.0

    def f(x, r, w, b):
        out = K.add_layer_norm(x, r, w, b, dropout_p=p, prenorm=prenorm, backend="triton")
        return out[0] * 2 + out[1] if prenorm else out

    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm

    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=capture)):
        leaves = [t.clone().requires_grad_(grad) for t in (x, residual, w, b) if t is not None]
        args = leaves[:1] + ([leaves[1]] if residual is not None else [None]) + leaves[-2:]
        torch.manual_seed(1)
        out = fn(*args)
        if grad:
            out.square().sum().backward()
        runs.append([out] + [t.grad for t in leaves if grad])
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    ref = K.reference.add_layer_norm(x.double(), None if residual is None else residual.double(), w.double(),
                                     b.double(), 1e-5, 0.0, prenorm)
    if p == 0.0:  # the float64 reference (dropout's own keep-mask is checked in test_add_layer_norm.py)
        expected = ref[0] * 2 + ref[1] if prenorm else ref
        torch.testing.assert_close(runs[1][0].double(), expected, rtol=1e-4, atol=1e-4)
    calls = _op_calls(graphs[0])
    if grad:
        stream = prenorm or residual is not None or p > 0
        expected = "add_layer_norm_train.default" if stream else "layer_norm_train.default"
    else:
        expected = "add_layer_norm_prenorm.default" if prenorm else "add_layer_norm.default"
    assert [c.split("fuseformer.")[-1] for c in calls] == [expected]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("preact", ["store", "recompute"])
def test_linear_gelu_compiled_backward_per_variant(preact, bias, device):
    """linear_gelu_train returns (out, pre); linear_gelu returns out alone, for inference and for
    the recompute variant's training; the backward op returns dbias only with a bias."""
    LG = importlib.import_module("fuseformer.kernels.linear_gelu")

    torch._dynamo.reset()
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 16, device=device), torch.randn(24, 16, device=device) / 4, torch.randn(24, device=device)
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm

    def f(x, w, b):
        return K.linear_gelu(x, w, b, backend="triton")

    runs = []
    with LG.variant(preact=preact):
        for fn in (f, torch.compile(f, fullgraph=True, backend=capture)):
            leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
            out = fn(leaves[0], leaves[1], leaves[2] if bias else None)
            out.square().sum().backward()
            runs.append([out, leaves[0].grad, leaves[1].grad] + ([leaves[2].grad] if bias else []))
    for eager, compiled in zip(*runs):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    op = "linear_gelu_train.default" if preact == "store" else "linear_gelu.default"
    assert [c.split("fuseformer.")[-1] for c in _op_calls(graphs[0])] == [op]
