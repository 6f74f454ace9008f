"""patch_hf beyond parity: unpatch restores the stock model, the torch backend runs PyTorch's
SDPA (not the L x L reference), key-padding masks reach attention as (B, 1, 1, S) without a
per-call comparison, and no deprecated transformers keyword is used."""
import copy
import warnings

import pytest
import torch

from models_util import VOCAB, padded_batch

import fuseformer.models as M
from fuseformer import kernels as K
from fuseformer.models import layers

transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=40)).eval()


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=40)).eval()


def kw_of(model):
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=9)
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("build", [bert, gpt2])
def test_unpatch_restores_the_stock_model(build):
    hf = build()
    stock = copy.deepcopy(hf)
    kw = kw_of(hf)
    classes = [type(m) for m in hf.modules()]
    attn = hf.config._attn_implementation
    M.patch_hf(hf, backend="torch")
    M.patch_hf(hf, backend="torch")  # twice: unpatch still restores the stock attention
    assert any(type(m).__name__.startswith("Fused") for m in hf.modules())
    assert M.unpatch(hf) is hf
    assert [type(m) for m in hf.modules()] == classes
    assert hf.config._attn_implementation == attn
    assert not any(hasattr(m, "fuseformer_backend") for m in hf.modules())
    with torch.no_grad():
        torch.testing.assert_close(hf(**kw).logits, stock(**kw).logits, rtol=0, atol=0)


@pytest.mark.parametrize("build", [bert, gpt2])
def test_torch_backend_runs_pytorch_sdpa_not_the_reference(build, monkeypatch):
    hf = M.patch_hf(build(), backend="torch")

    def refuse(*a, **k):
        raise AssertionError("the torch backend must not go through the fused op / reference")

    for op in ("scaled_dot_product_attention", "add_layer_norm", "linear_gelu"):
        monkeypatch.setattr(K, op, refuse)
    with torch.no_grad():
        assert torch.isfinite(hf(**kw_of(hf)).logits).all()


def test_key_padding_mask_reaches_attention_as_b11s_without_comparisons(monkeypatch):
    hf = M.patch_hf(bert(), backend="torch")
    kw = kw_of(hf)
    masks = []
    real = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, m, *a: masks.append(m) or real(q, k, v, m, *a))
    monkeypatch.setattr(torch, "equal", lambda *a: (_ for _ in ()).throw(AssertionError("torch.equal per call")))
    with torch.no_grad():
        hf(**kw)
    B, S = kw["input_ids"].shape
    assert len(masks) == 2 and all(m.dtype == torch.bool and m.shape == (B, 1, 1, S) for m in masks)
    monkeypatch.undo()
    assert torch.equal(masks[0][:, 0, 0, :], kw["attention_mask"].bool())


def test_gpt2_patched_uses_no_deprecated_keyword():
    hf = M.patch_hf(gpt2(), backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            out = hf(**kw_of(hf), use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values  # named as this version names it
            hf(torch.zeros(3, 1, dtype=torch.long), cache)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpt2_padded_batch_reaches_fused_attention_as_key_row_and_causal(monkeypatch, backend):
    """A patched GPT-2 on a padded batch: the fused attention gets the key-padding row
    (B, 1, 1, S) with is_causal=True (tiles past the diagonal skipped, one row read per batch),
    not transformers' dense (B, 1, L, L) mask; torch's SDPA keeps the dense mask. Right and left
    padding give the stock model's logits at the real tokens; an unpadded batch gets no mask
    but is_causal, as from transformers."""
    stock = gpt2().float()
    hf = M.patch_hf(copy.deepcopy(stock), backend=backend)
    seen = []
    real = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, m, p, causal, *a: seen.append(
        (None if m is None else tuple(m.shape), causal)) or real(q, k, v, m, p, causal, *a))
    ids, right, _ = padded_batch(vocab=VOCAB, seq=9)
    B, S = ids.shape
    for mask in (right, right.flip(1), torch.ones_like(right)):
        seen.clear()
        with torch.no_grad():
            ours, theirs = hf(input_ids=ids, attention_mask=mask).logits, stock(input_ids=ids, attention_mask=mask).logits
        real_tokens = mask.bool()
        torch.testing.assert_close(ours[real_tokens], theirs[real_tokens], rtol=1e-4, atol=1e-4)
        if not mask.all():
            assert seen == ([((B, 1, S, S), False)] if backend == "torch" else [((B, 1, 1, S), True)]) * 2
        else:
            assert seen == [(None, True)] * 2
