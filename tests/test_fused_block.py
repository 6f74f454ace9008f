"""A transformer block as one fused autograd node (models/fused_block.py) against the per-op path
it replaces, and against float64 by the parity rule: forward and every gradient, post-LN (BERT,
ALBERT's shared block) and pre-LN (GPT-2, causal), with padding masks, dropout and frozen
weights; and the calls that must keep the per-op path (hooks, subclassed layers, the torch
backend, torch.compile, a KV cache, the switch)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fuseformer.kernels.parity import assert_parity
from fuseformer.models import AlbertConfig, AlbertModel, BertConfig, BertModel, GPT2Config, GPT2Model, fused_block

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _bert(dropout=0.0, layers=2, dtype=torch.float32, backend="triton"):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=72, max_position_embeddings=32, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    model = BertModel(cfg, add_pooling_layer=False).to(DEVICE, dtype)
    model.set_backend(backend)
    return model


def _batch(B=2, T=11, padded=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:
        mask[1, T - 4:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _step(model, ids, mask, block: bool, seed=5):
    """Output and every parameter's gradient of a weighted sum of the last hidden state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout seeds on both paths
    with fused_block.use(block):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape)
    (out.float() * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, out.grad_fn


def _nodes(out):
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dropout,padded", [(0.0, True), (0.0, False), (0.25, True)])
def test_block_computes_what_the_per_op_path_computes(dropout, padded):
    model = _bert(dropout).train()
    ids, mask = _batch(padded=padded)
    out, grads, fn = _step(model, ids, mask, block=True)
    ref, ref_grads, ref_fn = _step(model, ids, mask, block=False)
    assert type(fn).__name__ == "PostLNBlockBackward" and type(ref_fn).__name__ == "AddLayerNormFunctionBackward"
    # The same launchers and matmuls in the same order: the forward is the same bits. dW is
    # dY^T X here where autograd computes (X^T dY)^T, and the residual gradients are added in
    # the dX GEMMs (one rounding where autograd has two): equal up to rounding.
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_backend_without_the_backward_extras_computes_the_same(monkeypatch):
    """The block's backward hands the attention launcher views of one dqkv buffer ("grads"),
    folds the residual gradients into the dX GEMMs ("acc") and has each LN backward sum the
    bias gradient of the linear layer before it ("dx_sum"), where the launchers take them
    (kernels/backends.py: Impl.backward_extras; the triton ones do); a backend whose
    launchers take none (the cuda backend's) gets new gradients, stacked, plain adds and
    torch's column sums: the same gradients, either way."""
    from dataclasses import replace

    from fuseformer.kernels import backends

    model = _bert().train()
    ids, mask = _batch()
    out, grads, _ = _step(model, ids, mask, block=True)
    calls = []
    for op in ("attention", "linear_gelu", "add_layer_norm"):
        impl = backends.get_impl(op, "triton")
        assert impl.backward_extras  # what the block's default path relies on

        def plain(*args, _backward=impl.backward, _op=op, **kwargs):
            assert not {"grads", "acc", "dx_sum"} & kwargs.keys()
            calls.append(_op)
            return _backward(*args, **kwargs)

        monkeypatch.setitem(backends._IMPLS, (op, "triton"),
                            replace(impl, backward=plain, backward_extras=frozenset()))
    ref, ref_grads, fn = _step(model, ids, mask, block=True)
    assert type(fn).__name__ == "PostLNBlockBackward"
    assert sorted(set(calls)) == ["add_layer_norm", "attention", "linear_gelu"]
    assert torch.equal(out, ref) and grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def _parity_against_float64(model, ids, mask):
    """Our fp32 block against the float64 model on the torch backend, with fp32 on the torch
    backend as the yardstick (kernels/parity.py): the output and every gradient."""
    ref64 = copy.deepcopy(model).double()
    ref64.set_backend("torch")
    torch32 = copy.deepcopy(model)
    torch32.set_backend("torch")
    out, grads, _ = _step(model, ids, mask, block=True)
    out64, grads64, _ = _step(ref64, ids, mask, block=True)
    out32, grads32, _ = _step(torch32, ids, mask, block=True)
    assert_parity(out, out64, out32, torch.float32, mask.bool()[..., None], what="last_hidden_state")
    for name in grads64:
        assert_parity(grads[name], grads64[name], grads32[name], torch.float32, None, what=f"grad {name}")


def test_block_meets_the_parity_rule_against_float64():
    _parity_against_float64(_bert().eval(), *_batch())


def test_inference_takes_the_block_without_an_autograd_node():
    model = _bert().eval()
    ids, mask = _batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with fused_block.use(False):
            ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert out.grad_fn is None and torch.equal(out, ref)


def test_one_autograd_node_per_block():
    model = _bert(layers=3).train()
    names = _nodes(model(input_ids=_batch()[0], attention_mask=_batch()[1]).last_hidden_state)
    assert names.count("PostLNBlockBackward") == 3
    assert not any(n in names for n in ("AttentionFunctionBackward", "LinearGeluFunctionBackward"))


def test_frozen_weights_get_no_gradient_and_the_rest_are_unchanged():
    model = _bert().train()
    ids, mask = _batch()
    frozen = model.encoder.layer[0].attn.qkv
    frozen.weight.requires_grad_(False)
    frozen.bias.requires_grad_(False)
    _, grads, _ = _step(model, ids, mask, block=True)
    _, ref_grads, _ = _step(model, ids, mask, block=False)
    assert frozen.weight.grad is None and "encoder.layer.0.attn.qkv.weight" not in grads
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_shared_albert_block_accumulates_every_layer():
    torch.manual_seed(0)
    cfg = AlbertConfig(vocab_size=97, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=72, max_position_embeddings=32, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    model = AlbertModel(cfg, add_pooling_layer=False).to(DEVICE).train()
    model.set_backend("triton")
    ids, mask = _batch()
    out, grads, fn = _step(model, ids, mask, block=True)
    ref, ref_grads, _ = _step(model, ids, mask, block=False)
    assert type(fn).__name__ == "PostLNBlockBackward" and torch.equal(out, ref)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


class _Scaled(nn.Linear):
    """A Linear subclass that computes something else (as a LoRA layer would)."""

    def forward(self, x):
        return 2 * super().forward(x)


def _last_node(model, ids, mask):
    return type(model(input_ids=ids, attention_mask=mask).last_hidden_state.grad_fn).__name__


def test_hooks_subclassed_layers_and_the_switch_keep_the_per_op_path():
    ids, mask = _batch()
    model = _bert().train()
    calls = []
    # The per-op path calls qkv as a module: its hook must run, so layer 0 takes that path.
    handle = model.encoder.layer[0].attn.qkv.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == [(2, 11, 96)]
    handle.remove()
    # layer 0 took the per-op path, layer 1 (the last) the block
    assert type(out.grad_fn).__name__ == "PostLNBlockBackward"
    model.encoder.layer[1].attn.proj.__class__ = _Scaled
    assert _last_node(model, ids, mask) == "AddLayerNormFunctionBackward"
    model.encoder.layer[1].attn.proj.__class__ = nn.Linear
    assert _last_node(model, ids, mask) == "PostLNBlockBackward"
    with fused_block.use(False):
        assert _last_node(model, ids, mask) == "AddLayerNormFunctionBackward"
    assert fused_block.enabled()


def test_the_torch_backend_never_takes_the_block():
    model = _bert(backend="torch").train()
    ids, mask = _batch()
    assert _last_node(model, ids, mask) == "NativeLayerNormBackward0"


def test_the_plan_is_decided_once_per_key_and_follows_the_backend_in_force(monkeypatch):
    """fused_block.plan decides its backends once per key (backends.memo): a repeated call
    resolves nothing, a mask of another layout or a scoped backend change is a new key, and
    clear_plans forgets it. The mask expanded per call is the call's own mask, not a cached one."""
    from fuseformer.kernels import backends

    backends.clear_plans()
    x = torch.randn(2, 5, 32, device=DEVICE)
    calls = []
    resolve = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a, **k: calls.append(a[0]) or resolve(*a, **k))
    row = torch.ones(2, 1, 1, 5, dtype=torch.bool, device=DEVICE)

    def plan(mask, backend="triton"):
        return fused_block.plan(x, mask, False, 2, 0.0, 0.0, 0.0, 72, "none", backend, False)

    mask4, names = plan(row)
    assert names == ("triton",) * 4 and len(calls) == 3  # attention, add+LN (both), Linear+GELU
    other = row.clone()
    other[1, ..., 3:] = False
    mask4, again = plan(other)
    assert again == names and len(calls) == 3 and mask4.data_ptr() == other.data_ptr()
    assert mask4.shape == (2, 2, 5, 5) and not mask4[1, 0, 0, 4]
    plan(torch.ones(2, 1, 5, 5, dtype=torch.bool, device=DEVICE))  # a dense mask: another key
    assert len(calls) == 6
    with backends.use_backend("torch"):
        assert plan(row, backend=None) is None  # the torch backend in force: the per-op path
    backends.clear_plans()
    plan(row)
    assert len(calls) == 12


def test_torch_compile_traces_the_per_op_path():
    torch._dynamo.reset()
    model = _bert().eval()
    ids, mask = _batch()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_gpu_bf16_block_against_the_per_op_path_without_a_sync(family):
    if family == "bert":
        model = _bert(dropout=0.1, layers=2, dtype=torch.bfloat16).train()
    else:
        model = _gpt2(dropout=0.1).to(torch.bfloat16).train()
    ids, mask = _batch(B=4, T=32)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, grads, fn = _step(model, ids, mask, block=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref, ref_grads, _ = _step(model, ids, mask, block=False)
    assert type(fn).__name__ == ("PostLNBlockBackward" if family == "bert" else "AddLayerNormFunctionBackward")
    assert torch.equal(out, ref)
    for name, g in grads.items():
        torch.testing.assert_close(g.float(), ref_grads[name].float(), rtol=2e-2, atol=2e-2, msg=name)


def test_bad_input_to_a_block_gets_the_per_op_paths_errors():
    from fuseformer.models import TransformerBlock

    block = TransformerBlock(32, 2, 72, backend="triton").to(DEVICE).train()
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        block(x, attn_mask=torch.ones(3, 1, 1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(RuntimeError, match="dtype"):  # nn.Linear's own error, as without the block
        block(x.double())
    good = block(x, attn_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool, device=DEVICE))
    assert type(good.grad_fn).__name__ == "PostLNBlockBackward"


def test_a_double_backward_through_the_block_raises():
    model = _bert().train()
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (g,) = torch.autograd.grad(out.float().pow(2).sum(), model.encoder.layer[0].ffn_norm.weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def _gpt2(dropout=0.0, layers=2):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=2, n_positions=32, resid_pdrop=dropout,
                     attn_pdrop=dropout, embd_pdrop=0.0)
    model = GPT2Model(cfg).to(DEVICE)
    model.set_backend("triton")
    return model


@pytest.mark.parametrize("dropout,padded", [(0.0, False), (0.0, True), (0.2, True)])
def test_pre_ln_gpt2_block_computes_what_the_per_op_path_computes(dropout, padded):
    """Causal attention (with a key-padding row beside is_causal), the stream as a second
    output, the first block without a residual."""
    model = _gpt2(dropout).train()
    ids, mask = _batch(padded=padded)
    out, grads, fn = _step(model, ids, mask, block=True)
    ref, ref_grads, _ = _step(model, ids, mask, block=False)
    assert torch.equal(out, ref)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    names = _nodes(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert names.count("PreLNBlockBackward") == 2 and "AttentionFunctionBackward" not in names


def test_pre_ln_block_meets_the_parity_rule_against_float64():
    _parity_against_float64(_gpt2().eval(), *_batch())


def test_a_kv_cache_in_inference_takes_the_block(monkeypatch):
    """GPT-2's generate: a padded prefill that keeps its cache, a decoding step (one token) and a
    chunk of three after the cache, through the block (the per-op attention module is never
    called), each the same bits as op by op, cache included; the last token of the steps is
    the full forward's. With gradients a cache keeps the per-op path."""
    from fuseformer.models.layers import MultiHeadSelfAttention

    model = _gpt2().eval()
    ids, mask = _batch(T=11)
    cat = lambda a, b: torch.cat([a, b], dim=1)  # noqa: E731
    calls = [(ids[:, :7], mask[:, :7], None), (ids[:, 7:8], mask[:, :8], 7), (ids[:, 8:], mask, 8)]
    with torch.no_grad():
        results = {}
        for block in (False, True):
            past, outs = None, []
            with fused_block.use(block), monkeypatch.context() as m:
                if block:
                    m.setattr(MultiHeadSelfAttention, "forward", lambda *a, **k: pytest.fail("the per-op path ran"))
                for step_ids, step_mask, seen in calls:
                    assert (past is None) == (seen is None)
                    out = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    outs.append(out.last_hidden_state)
            results[block] = (outs, past)
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    (outs, past), (ref_outs, ref_past) = results[True], results[False]
    for a, b in zip(outs, ref_outs):
        assert torch.equal(a, b)
    for (k, v), (rk, rv) in zip(past, ref_past):
        assert torch.equal(k, rk) and torch.equal(v, rv) and k.shape[2] == ids.shape[1]
    real = mask.bool()
    torch.testing.assert_close(cat(cat(*outs[:2]), outs[2])[real], full[real], rtol=1e-5, atol=1e-5)
    model.train()
    first = model(input_ids=ids[:, :7], use_cache=True)
    names = _nodes(model(input_ids=ids[:, 7:8], past_key_values=first.past_key_values).last_hidden_state)
    assert "PreLNBlockBackward" not in names and "AttentionFunctionBackward" in names


def test_frozen_layers_below_trainable_ones_keep_the_per_op_path_there():
    """A block whose input needs no gradient but some of whose weights do: per op, the ops
    before the first trainable weight run as inference there, so that block keeps the per-op
    path; the block above it (its input now needs a gradient) runs as one node."""
    model = _bert().train()
    ids, mask = _batch()
    for p in model.embeddings.parameters():
        p.requires_grad_(False)
    low = model.encoder.layer[0]
    for m in (low.attn, low.attn_norm, low.ffn.fc):
        for p in m.parameters():
            p.requires_grad_(False)
    out, grads, _ = _step(model, ids, mask, block=True)
    ref, ref_grads, _ = _step(model, ids, mask, block=False)
    assert torch.equal(out, ref) and grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    names = _nodes(model(input_ids=ids, attention_mask=mask).last_hidden_state)
    assert names.count("PostLNBlockBackward") == 1 and "AddLayerNormFunctionBackward" in names
    for p in model.parameters():
        p.requires_grad_(False)
    assert model(input_ids=ids, attention_mask=mask).last_hidden_state.grad_fn is None


@pytest.mark.parametrize("change,error", [
    (lambda b: setattr(b.attn_norm, "eps", 0.0), "eps must be a float > 0"),
    (lambda b: setattr(b.ffn_norm, "dropout", -0.5), "dropout_p"),
    (lambda b: setattr(b.ffn, "approximate", "sigmoid"), "approximate"),
])
def test_settings_the_per_op_path_refuses_are_refused_by_name(change, error):
    from fuseformer.models import TransformerBlock

    block = TransformerBlock(32, 2, 72, backend="triton").to(DEVICE).train()
    change(block)
    with pytest.raises(ValueError, match=error):
        block(torch.randn(2, 5, 32, device=DEVICE, requires_grad=True))
