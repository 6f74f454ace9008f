"""GPT-2: parity with transformers (from_hf, patch_hf, save_pretrained round trip), the KV
cache in generate(), Conv1D transposes, initialisation, bad input."""
import copy
import math

import pytest
import torch

from models_util import VOCAB, check_against_hf, compare_outputs, padded_batch

import fuseformer.models as M

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, n_embd=96, n_layer=3, n_head=6, n_positions=40,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return transformers.GPT2Config(**base)


def inputs():
    ids, mask, _ = padded_batch()
    return dict(input_ids=ids, attention_mask=mask), mask


@pytest.mark.parametrize("name,outs", [("GPT2Model", ["last_hidden_state"]), ("GPT2LMHeadModel", ["logits"])])
def test_from_hf_matches_transformers(name, outs):
    torch.manual_seed(1)
    hf = getattr(transformers, name)(hf_config()).double()
    kw, mask = inputs()
    check_against_hf(hf, getattr(M, name).from_hf, kw, outs, mask)


def test_patch_hf_matches_transformers():
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(hf_config()).double()
    kw, mask = inputs()
    check_against_hf(hf, M.patch_hf, kw, ["logits"], mask)


@pytest.mark.parametrize("backend,block", [("triton", True), ("triton", False), ("torch", False)])
def test_padding_mask_stays_a_key_row_with_causal(monkeypatch, backend, block):
    """An attention_mask reaches the fused attention as a key-padding row (B, 1, 1, S) with
    is_causal=True (its kernels skip the tiles past the diagonal and read the row once), not
    folded into a dense (B, 1, T, S) mask, in the one-node block and op by op; the torch
    backend folds it (torch's SDPA takes one or the other). Left padding, whose first rows
    attend no key at all, matches transformers at the real tokens either way."""
    import fuseformer.kernels.attention as A
    import fuseformer.models.fused_block as FB
    import fuseformer.models.layers as L

    seen = []
    fused, plan = L.K.scaled_dot_product_attention, FB.plan

    def spy_op(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((A.mask_kind(None if attn_mask is None else attn_mask.expand(*q.shape[:-1], k.shape[-2])),
                     is_causal))
        return fused(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    def spy_plan(x, mask, is_causal, *args, **kw):
        out = plan(x, mask, is_causal, *args, **kw)
        seen.append((A.mask_kind(out[0]), is_causal))
        return out

    monkeypatch.setattr(L.K, "scaled_dot_product_attention", spy_op)
    monkeypatch.setattr(FB, "plan", spy_plan)
    torch.manual_seed(4)
    hf = transformers.GPT2LMHeadModel(hf_config()).double().eval()
    hf32 = copy.deepcopy(hf).float()
    ours = M.GPT2LMHeadModel.from_hf(copy.deepcopy(hf32), backend=backend)
    ids, right, _ = padded_batch()
    left = right.flip(1)  # the same lengths, padded on the left
    for mask in (right, left):
        seen.clear()
        kw = dict(input_ids=ids, attention_mask=mask)
        with torch.no_grad(), FB.use(block):
            compare_outputs(ours(**kw), hf(**kw), hf32(**kw), ["logits"], mask, torch.float32)
        assert seen == ([] if backend == "torch" else [("key_padding", True)] * 3)


@pytest.mark.parametrize("block", [True, False])
def test_padded_causal_training_matches_the_folded_mask(block):
    """Forward and backward of a left- and right-padded batch over 70 tokens (several key tiles,
    so a query block's first attended tile can lie past its diagonal), the key-padding row
    with is_causal on the triton backend, one node per block or op by op, against the torch
    backend, which folds the two into one dense mask: the same logits at the real tokens and
    the same gradients of every parameter. One layer: the masking is each layer's own, and each
    interpreted layer costs ~8 s of CI."""
    import fuseformer.models.fused_block as FB

    torch.manual_seed(5)
    base = M.GPT2LMHeadModel.from_hf(transformers.GPT2LMHeadModel(hf_config(
        n_layer=1, n_positions=80, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), backend="torch")  # deterministic
    ids = torch.randint(5, VOCAB, (3, 70))
    lengths = torch.tensor([70, 41, 3])
    right = (torch.arange(70)[None, :] < lengths[:, None]).long()
    mask = torch.cat([right[:2], right[2:].flip(1)])  # the last row left-padded, 67 pads first
    labels = ids.masked_fill(mask == 0, -100)
    grads, logits = [], []
    for backend in ("torch", "triton"):
        model = copy.deepcopy(base).train()
        model.set_backend(backend)
        with FB.use(block):
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
        logits.append(out.logits.detach()[mask.bool()])
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_conv1d_weights_are_transposed_and_tied():
    hf = transformers.GPT2LMHeadModel(hf_config())
    ours = M.GPT2LMHeadModel.from_hf(hf)
    assert torch.equal(ours.transformer.h[0].attn.qkv.weight, hf.transformer.h[0].attn.c_attn.weight.t())
    assert torch.equal(ours.transformer.h[2].ffn.fc.weight, hf.transformer.h[2].mlp.c_fc.weight.t())
    assert "lm_head.weight" not in ours.state_dict()  # tied: one matrix, wte
    assert ours.hf_state_dict()["transformer.h.1.mlp.c_proj.weight"].shape == (4 * 96, 96)


def test_loss_matches_transformers():
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(hf_config()).double().eval()
    ours = M.GPT2LMHeadModel.from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        a, b = hf(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
    # transformers' causal-LM loss upcasts to float32 even for a float64 model; ours keeps float64.
    assert abs(a.item() - b.item()) < 1e-5 * abs(b.item())


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(4)
    ours = M.GPT2LMHeadModel(M.GPT2Config.from_dict(hf_config().to_dict())).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    back = M.GPT2LMHeadModel.from_pretrained(tmp_path)
    kw, mask = inputs()
    with torch.no_grad():
        mine, theirs = ours(**kw), hf(**kw)
        assert torch.equal(back(**kw).logits, mine.logits)
    compare_outputs(theirs, mine, mine, ["logits"], mask, torch.float32)


def test_generate_cache_equals_no_cache_equals_transformers():
    torch.manual_seed(5)
    hf = transformers.GPT2LMHeadModel(hf_config()).double().eval()
    ours = M.GPT2LMHeadModel.from_hf(hf)
    prompt = torch.randint(3, VOCAB, (2, 5))
    cached = ours.generate(prompt, max_new_tokens=12)
    uncached = ours.generate(prompt, max_new_tokens=12, use_cache=False)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         min_new_tokens=12, pad_token_id=0)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, theirs)


def test_cache_feeds_one_token_per_step():
    ours = M.GPT2LMHeadModel(M.GPT2Config.from_dict(hf_config().to_dict())).eval()
    seen = []
    hook = ours.transformer.wte.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    ours.generate(torch.randint(3, VOCAB, (1, 6)), max_new_tokens=4)
    hook.remove()
    assert seen == [6, 1, 1, 1]


def test_sampling_top_k_stays_in_top_k():
    torch.manual_seed(6)
    ours = M.GPT2LMHeadModel(M.GPT2Config.from_dict(hf_config(n_layer=1).to_dict())).eval()
    prompt = torch.randint(3, VOCAB, (4, 3))
    with torch.no_grad():
        top = ours(prompt).logits[:, -1].topk(3).indices
    g = torch.Generator().manual_seed(0)
    out = ours.generate(prompt, max_new_tokens=1, do_sample=True, top_k=3, temperature=0.7, generator=g)
    assert all(out[r, -1] in top[r] for r in range(4))


def test_residual_projections_scaled_at_init():
    torch.manual_seed(7)
    cfg = M.GPT2Config(vocab_size=50, n_embd=64, n_layer=8, n_head=4, n_positions=16)
    m = M.GPT2Model(cfg)
    std = cfg.initializer_range
    proj = torch.cat([b.attn.proj.weight.flatten() for b in m.h])
    fc = torch.cat([b.ffn.fc.weight.flatten() for b in m.h])
    assert abs(proj.std().item() - std / math.sqrt(2 * cfg.n_layer)) < 0.1 * std / math.sqrt(2 * cfg.n_layer)
    assert abs(fc.std().item() - std) < 0.1 * std


def test_bad_input_is_named():
    m = M.GPT2LMHeadModel(M.GPT2Config.from_dict(hf_config().to_dict())).eval()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="beyond the position table"):
        m(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 1, 4))
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(3\)"):
        M.GPT2Config(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(torch.zeros(1, 2, dtype=torch.long), 2, do_sample=True, top_k=0)


def test_torch_compile_with_cache():
    torch.manual_seed(8)
    m = M.GPT2LMHeadModel(M.GPT2Config.from_dict(hf_config(n_layer=2).to_dict()), backend="torch").eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        a, b = m(ids, use_cache=True), compiled(ids, use_cache=True)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.past_key_values[1][0], a.past_key_values[1][0])
