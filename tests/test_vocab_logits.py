"""VocabLogits (models/layers.py): the vocabulary projection computed over rows padded to a
multiple of 64 (weight 0, bias -inf) must give F.linear's logits and gradients, its loss must
run over the padded logits with the real vocabulary's label check, and the models' heads must
give the same outputs, losses and gradients as unpadded.

On a CPU the rule pads nothing (it pads fp16/bf16 GPU weights whose row count is not a
multiple of 8, for calls of 1024 tokens or more); these tests force it, as the GPU takes it,
by replacing the rule."""
import pytest
import torch
import torch.nn.functional as F

import fuseformer.models as M
from fuseformer.models import layers


@pytest.fixture
def always_pad(monkeypatch):
    monkeypatch.setattr(layers, "vocab_padding", lambda weight, tokens: -weight.shape[0] % layers.VOCAB_ALIGN)


def _inputs(vocab=97, hidden=24, bias=True, grad=False):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, hidden, dtype=torch.float64, generator=g).requires_grad_(grad)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=g).requires_grad_(grad)
    b = torch.randn(vocab, dtype=torch.float64, generator=g).requires_grad_(grad) if bias else None
    return h, w, b


def test_the_rule_pads_only_unaligned_gpu_half_weights_on_many_tokens():
    assert layers.vocab_padding(torch.empty(30522, 8, dtype=torch.float16), 4096) == 0  # a CPU tensor
    assert layers.vocab_padding(torch.empty(30522, 8, dtype=torch.float32), 4096) == 0
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert layers.vocab_padding(torch.empty(30522, 8, dtype=torch.bfloat16, device=cuda), 4096) == 30528 - 30522
        assert layers.vocab_padding(torch.empty(50257, 8, dtype=torch.float16, device=cuda), 1024) == 50304 - 50257
        assert layers.vocab_padding(torch.empty(50257, 8, dtype=torch.float16, device=cuda), 1023) == 0  # decoding
        assert layers.vocab_padding(torch.empty(30000, 8, dtype=torch.float16, device=cuda), 4096) == 0  # 8 | 30000
        assert layers.vocab_padding(torch.empty(50257, 8, dtype=torch.float32, device=cuda), 4096) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_padded_logits_and_gradients_equal_f_linear(always_pad, bias):
    h, w, b = _inputs(bias=bias, grad=True)
    out = layers.VocabLogits()(h, w, b)
    assert out.shape == (3, 5, 97)
    assert out.stride()[-2] == 128  # computed over 128 rows, the first 97 returned
    ref = F.linear(h, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [t for t in (h, w, b) if t is not None], dy)
    ref_grads = torch.autograd.grad(ref, [t for t in (h, w, b) if t is not None], dy)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_aligned_or_unpadded_weights_take_f_linear_unchanged():
    h, w, b = _inputs(vocab=96)
    out = layers.VocabLogits()(h, w, b)  # the CPU rule: no padding
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(h, w, b), rtol=0, atol=0)


def test_writes_through_data_reach_the_next_call(always_pad):
    """Nothing is kept between calls: a write no version counter sees (`.data`, as EMA updates
    and weight initialisers do it) is in the next call's logits."""
    h, w, b = _inputs()
    head = layers.VocabLogits()
    with torch.no_grad():
        head(h, w, b)
    w.data.add_(1.0)
    b.data.mul_(2.0)
    with torch.no_grad():
        torch.testing.assert_close(head(h, w, b), F.linear(h, w, b), rtol=1e-12, atol=1e-12)


def _tiny(name):
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=101, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2))
        return M.GPT2LMHeadModel.from_hf(hf.double())
    if name == "bert":
        hf = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
        return M.BertForMaskedLM.from_hf(hf.double())
    hf = transformers.AlbertForMaskedLM(transformers.AlbertConfig(
        vocab_size=101, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    return M.AlbertForMaskedLM.from_hf(hf.double())


def test_padding_rows_score_minus_infinity_and_the_loss_runs_over_the_padded_logits(always_pad, monkeypatch):
    h, w, b = _inputs(grad=True)
    head = layers.VocabLogits()
    logits = head(h, w, b)
    full = logits._fuseformer_padded
    assert full.shape == (3, 5, 128) and full.data_ptr() == logits.data_ptr()
    assert torch.isneginf(full[..., 97:]).all()
    seen = []
    real = layers.K.cross_entropy
    monkeypatch.setattr(layers.K, "cross_entropy", lambda x, *a, **k: seen.append(x.shape) or real(x, *a, **k))
    labels = torch.randint(0, 97, (3, 5))
    labels[1, 2] = -100
    loss = head.loss(logits, labels)
    assert seen == [(3, 5, 128)]  # the padded logits, so the gradient needs no slicing copy
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 97), labels.reshape(-1))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, [h, w, b])
    ref_grads = torch.autograd.grad(ref, [h, w, b])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    head.loss(logits[:, 1:], labels[:, 1:])  # a slice of the view: the plain logits
    assert seen[-1] == (3, 4, 97)
    head.loss(logits, labels.reshape(-1))  # flattened labels, as transformers takes them
    assert seen[-1] == (3, 5, 128)
    # A label past the vocabulary names a padding column (score -inf): refused, not an inf loss.
    bad = labels.clone()
    bad[0, 0] = 100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 97\)"):
        head.loss(logits, bad)
    # The loss is a tensor of its own: changed in place, it still backpropagates.
    again = head.loss(head(h, w, b), labels)  # a new graph: the grads above freed the first
    again /= 2
    (dh,) = torch.autograd.grad(again, [h])
    torch.testing.assert_close(dh, grads[0] / 2, rtol=1e-10, atol=1e-12)
    # csrc/ has no cross-entropy: a head on the cuda backend takes auto's, not an error.
    torch.testing.assert_close(layers.VocabLogits("cuda").loss(logits, labels), loss)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["gpt2", "bert", "albert"])
def test_model_heads_give_the_same_logits_loss_and_gradients_padded(monkeypatch, name, backend):
    pytest.importorskip("transformers")
    model = _tiny(name)
    if backend == "triton":  # float32: the kernels take no float64
        if layers.K.unavailable_reason("triton") is not None:
            pytest.skip(str(layers.K.unavailable_reason("triton")))
        model = model.float()
    model.set_backend(backend)
    model.eval()  # no dropout: the two runs must see the same network
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (2, 9), generator=g)
    labels = ids.clone()
    labels[:, ::2] = -100

    def run():
        model.zero_grad()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                        if p.grad is not None}

    logits, loss, grads = run()
    monkeypatch.setattr(layers, "vocab_padding", lambda weight, tokens: -weight.shape[0] % layers.VOCAB_ALIGN)
    padded_logits, padded_loss, padded_grads = run()
    assert padded_logits.shape == logits.shape and padded_logits.stride()[-2] == 128
    tol = dict(rtol=1e-10, atol=1e-10) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded_logits, logits, **tol)
    torch.testing.assert_close(padded_loss, loss, **tol)
    assert padded_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(padded_grads[n], grads[n], **tol, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_gpt2_sized_head_is_padded_and_matches_the_unpadded_matmul(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2, 600, 768, device="cuda", dtype=dtype, generator=g)  # 1200 tokens: padded
    w = torch.randn(50257, 768, device="cuda", dtype=dtype, generator=g) * 0.02
    with torch.no_grad():
        out = layers.VocabLogits()(h, w)
    assert out.shape == (2, 600, 50257) and out.stride()[-2] == 50304
    ref = F.linear(h.double(), w.double())
    err, torch_err = (out.double() - ref).abs().max(), (F.linear(h, w).double() - ref).abs().max()
    assert err <= 2 * torch_err + 1e-3, (err, torch_err)  # the parity rule's form


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lm_losses_compile_fullgraph(backend):
    """Under torch.compile the heads call F.linear unpadded and the loss traces as the custom
    op (triton) or the reference (torch): no graph break, the eager loss."""
    pytest.importorskip("transformers")
    if backend == "triton" and layers.K.unavailable_reason("triton") is not None:
        pytest.skip(str(layers.K.unavailable_reason("triton")))
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 101, (2, 9), generator=g)
    for name in ("gpt2", "bert"):
        model = _tiny(name).float().eval()
        model.set_backend(backend)
        labels = ids.clone()
        if name == "bert":
            labels[:, ::2] = -100
        eager = model(input_ids=ids, labels=labels).loss
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids, labels=labels).loss
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
def test_gpu_autocast_with_fp32_weights_is_padded():
    """Mixed-precision training keeps fp32 weights and runs the matmul in bf16 under autocast:
    the head pads there too, and gives autocast's unpadded logits."""
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(4, 300, 256, device="cuda", generator=g)  # 1200 tokens
    w = torch.randn(30522, 256, device="cuda", generator=g) * 0.05
    b = torch.randn(30522, device="cuda", generator=g) * 0.1
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        out = layers.VocabLogits()(h, w, b)
        ref = F.linear(h, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape and out.stride()[-2] == 30528
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_gpu_padded_heads_train_without_synchronising(name):
    """bf16, 1024 tokens, an odd vocabulary: the padded head, its -inf bias and the fused
    cross-entropy (its label check a device-side assert) in a training step that never waits
    for the GPU, and a loss that matches the unpadded model's."""
    import transformers

    torch.manual_seed(0)
    if name == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=1001, n_embd=64, n_layer=2, n_head=2, n_positions=256, bos_token_id=1, eos_token_id=2))
        model = M.GPT2LMHeadModel.from_hf(hf)
    else:
        hf = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=1001, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
        model = M.BertForMaskedLM.from_hf(hf)
    model = model.to("cuda", torch.bfloat16).eval()
    for e in model.modules():  # torch's embedding backward reads its id count back: not ours
        if isinstance(e, torch.nn.Embedding):
            e.weight.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1001, (8, 128), generator=g).cuda()
    labels = ids.clone()
    if name == "bert":
        labels[torch.rand(8, 128, generator=g).cuda() < 0.85] = -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits.stride()[-2] == 1024  # padded
    out.loss.backward()  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # The same loss as the unpadded head gives.
    with torch.no_grad():
        layers_rule = layers.vocab_padding
        try:
            layers.vocab_padding = lambda weight, tokens: 0
            plain = model(input_ids=ids, labels=labels).loss
        finally:
            layers.vocab_padding = layers_rule
    torch.testing.assert_close(loss.detach(), plain, rtol=1e-2, atol=1e-2)  # bf16 logits, two GEMMs
