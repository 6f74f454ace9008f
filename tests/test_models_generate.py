"""GPT2LMHeadModel.generate against transformers' generate on the same random weights:
left-padded batches, eos / pad from the config, max_length, sampling filters, limits."""
import pytest
import torch

from models_util import VOCAB

import fuseformer.models as M
from fuseformer.models.generation import next_token_logits_filter

transformers = pytest.importorskip("transformers")


def twins(eos=2, pad=None, n_positions=40, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=n_positions,
                                  bos_token_id=1, eos_token_id=eos, pad_token_id=pad)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    return hf, M.GPT2LMHeadModel.from_hf(hf)


def left_padded(batch=3, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for r, n in enumerate([0, 3, 5][:batch]):
        mask[r, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_same_tokens_as_transformers(use_cache):
    hf, ours = twins()
    ids, mask = left_padded()
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, use_cache=use_cache)
    assert torch.equal(mine, theirs)
    # each row is what it gives alone, unpadded
    alone = ours.generate(ids[2:, 5:], max_new_tokens=10, pad_token_id=0)
    assert torch.equal(mine[2, 5:5 + alone.shape[1]], alone[0])


def _eos_of(model, prompt):
    """A config eos id that greedy decoding of row 0 reaches early, so stopping shows."""
    new = model.generate(prompt, max_new_tokens=6, eos_token_id=[])[0, prompt.shape[1]:].tolist()
    return new[2] if new[2] not in new[:2] else new[0]


def test_eos_and_pad_from_the_config_as_transformers():
    hf, ours = twins()
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    eos = _eos_of(ours, prompt[:1])
    hf.config.eos_token_id = hf.generation_config.eos_token_id = eos
    ours.config.eos_token_id = eos
    hf.generation_config.pad_token_id = ours.config.pad_token_id = 7
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    mine = ours.generate(prompt, max_new_tokens=12)
    assert torch.equal(mine, theirs)
    stop = mine[0, 5:].tolist().index(eos)
    assert stop <= 2 and (mine[0, 5 + stop + 1:] == 7).all() and mine.shape[1] > 5 + stop + 1  # padded
    # without a pad token the eos token pads, as transformers does
    ours.config.pad_token_id = None
    assert (ours.generate(prompt, max_new_tokens=12)[0, 5 + stop:] == eos).all()


def test_max_length_counts_the_prompt():
    _, ours = twins(eos=None)
    prompt = torch.randint(3, VOCAB, (2, 5))
    assert ours.generate(prompt, max_length=9).shape == (2, 9)
    assert ours.generate(prompt, max_new_tokens=3, max_length=30).shape == (2, 8)  # max_new_tokens wins
    assert ours.generate(prompt).shape == (2, 25)
    with pytest.raises(ValueError, match=r"max_length \(4\) is shorter than the prompt \(5 tokens\)"):
        ours.generate(prompt, max_length=4)


def test_prompt_beyond_the_position_table_refused_up_front(monkeypatch):
    _, ours = twins(n_positions=16)
    calls = []
    monkeypatch.setattr(ours, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"input_ids has 17 tokens, longer than the position table \(n_positions=16\)"):
        ours.generate(torch.zeros(1, 17, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"would reach position 20, beyond the position table \(n_positions=16\)"):
        ours.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=10)
    assert calls == []


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(5))
    for t, k, p in [(0.7, None, None), (1.0, 5, None), (1.3, None, 0.8), (0.9, 10, 0.5), (1.0, None, 0.01)]:
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k is not None:
            ref = TopKLogitsWarper(k)(None, ref)
        if p is not None:
            ref = TopPLogitsWarper(p)(None, ref)
        torch.testing.assert_close(next_token_logits_filter(logits, t, k, p), ref)


def test_sampling_is_seeded_and_stays_in_the_nucleus():
    _, ours = twins(eos=None)
    prompt = torch.randint(3, VOCAB, (4, 3))
    with torch.no_grad():
        probs = ours(prompt).logits[:, -1].float().softmax(-1)
    top = probs.argmax(-1)
    a = ours.generate(prompt, 1, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[:, -1], top)  # a tiny nucleus is the most likely token
    b = ours.generate(prompt, 6, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(1))
    c = ours.generate(prompt, 6, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(b, c)


@pytest.mark.parametrize("kw,match", [
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_k=0), "top_k must be a positive integer"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(eos_token_id="2"), "eos_token_id must be a non-negative int"),
    (dict(attention_mask=torch.ones(1, 3)), r"attention_mask must have the prompt's shape \(1, 2\)"),
])
def test_bad_arguments_are_named(kw, match):
    _, ours = twins()
    with pytest.raises(ValueError, match=match):
        ours.generate(torch.zeros(1, 2, dtype=torch.long), **kw)
