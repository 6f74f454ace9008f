"""GPT2LMHeadModel.generate against transformers' generate on the same random weights:
left-padded batches, eos / pad from the config, max_length, sampling filters, limits."""
import weakref

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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_static_cache_decodes_the_tokens_of_the_growing_cache(backend):
    """generate(static_cache=True): the prompt's cache copied into buffers for every token to
    come, each step writing its slot in place and attending under the cache's key mask. Greedy
    and seeded-sampled tokens, left padding and eos padding, as the growing cache gives them
    (itself checked against transformers above).

    On the triton backend greedy decoding alone: what that backend changes is the attention
    over the cache's buffers under its key mask, which every greedy step runs. Sampling and eos
    padding are decoding logic above the model, the same on every backend, and each
    interpreted generation costs ~9 s of CI."""
    hf, ours = twins()
    if backend == "triton":  # the interpreter's kernels, in float32
        ours = ours.float()
    ours.set_backend(backend)
    ids, mask = left_padded()
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                                     static_cache=True), greedy)
    if backend == "triton":
        return
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, theirs)
    sampled = [ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.5,
                             static_cache=static, generator=torch.Generator().manual_seed(4)) for static in (False, True)]
    assert torch.equal(*sampled)
    assert len(set(sampled[0][0, 7:].tolist())) > 3  # sampled tokens vary: the check has teeth
    eos = _eos_of(ours, ids[:1, :])
    stopped = [ours.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=7, static_cache=static)
               for static in (False, True)]
    assert torch.equal(*stopped) and (stopped[0] == 7).any()


def test_a_static_cache_step_computes_the_growing_caches_logits():
    """One decoding step on a StaticKVCache against the same step on the growing (k, v) cache,
    three steps in a row on a left-padded batch, float64: the logits, the slot written, the
    mask marked and the position advanced."""
    from fuseformer.models.layers import StaticKVCache

    _, ours = twins()
    ids, mask = left_padded()
    B, P = ids.shape
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        past = out.past_key_values
        cache = StaticKVCache(past, P + 5, mask)
        assert cache.position.tolist() == [P] and cache.key_mask[:, 0, 0, :P].equal(mask.bool())
        pos, grown = positions[:, -1:] + 1, mask
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for i in range(3):
            grown = torch.cat([grown, torch.ones(B, 1, dtype=torch.long)], dim=1)
            want = ours(token, past_key_values=past, attention_mask=grown, position_ids=pos, use_cache=True)
            got = ours(token, past_key_values=cache, position_ids=pos, use_cache=True)
            assert got.past_key_values is cache and cache.position.tolist() == [P + i + 1]
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)
            assert cache.key_mask[:, 0, 0, :P + i + 1].equal(grown.bool()) and not cache.key_mask[..., P + i + 1:].any()
            past = want.past_key_values
            torch.testing.assert_close(cache.keys[0][:, :, :P + i + 1], past[0][0], rtol=0, atol=0)
            token, pos = want.logits[:, -1].argmax(-1, keepdim=True), pos + 1


def _stand_in_capture(monkeypatch, generation):
    """capture_cuda_graph replaced by what a capture does on the host: the warm-up calls run, the
    capture records and runs nothing, a replay runs the step. Returns the list of captured
    calls. The module's step registry is a fresh one (the stand-in's steps hold their model)."""
    from fuseformer.models import graphs

    captures = []

    def stand_in(fn, pool=None, warmup=3, warm=None):
        captures.append(fn)
        for _ in range(warmup):
            (warm or fn)()
        return fn

    monkeypatch.setattr(graphs, "capture_cuda_graph", stand_in)
    monkeypatch.setattr(generation, "_STEPS", weakref.WeakKeyDictionary())
    return captures


def _drive_static_step(model, ids, mask, new):
    """generate(cuda_graph=True)'s decoding as generate drives it, after the prompt's forward:
    the captured step replayed for every token after the first, each step's logits compared
    with the growing cache's (float64)."""
    from fuseformer.models import generation

    B, P = ids.shape
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=positions, use_cache=True)
        step, step_ids = generation._static_step(model, out.past_key_values, P + new, mask, positions[:, -1:] + 1,
                                                 True)
        past, grown, pos = out.past_key_values, mask, positions[:, -1:] + 1
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new - 1):
            grown = torch.cat([grown, torch.ones(B, 1, dtype=torch.long)], dim=1)
            want = model(token, past_key_values=past, attention_mask=grown, position_ids=pos, use_cache=True)
            step_ids.copy_(token)
            torch.testing.assert_close(step(), want.logits, rtol=1e-12, atol=1e-12)
            past, pos, token = want.past_key_values, pos + 1, want.logits[:, -1].argmax(-1, keepdim=True)


@pytest.mark.parametrize("new", [2, 4])
def test_the_graphed_steps_warm_ups_leave_the_cache_as_the_prompt_left_it(new, monkeypatch):
    """generate(cuda_graph=True)'s step with a stand-in capture: every warm-up starts from the
    state after the prompt, so with buffers for only two new tokens none writes past them, and
    the first replayed steps give the growing cache's logits."""
    from fuseformer.models import generation

    _stand_in_capture(monkeypatch, generation)
    ids, mask = left_padded()
    _, ours = twins(eos=None, n_positions=ids.shape[1] + new)  # buffers of exactly P + new slots
    _drive_static_step(ours, ids, mask, new)


def test_a_captured_step_is_replayed_by_later_calls_of_its_bucket(monkeypatch):
    """generate(cuda_graph=True) keeps its captured step per model and bucket (batch, buffer
    length rounded up to a power of two, dtype, device, the weights' addresses, the settings):
    a later call loads its own prompt into the same buffers and replays without a capture,
    giving its own growing cache's logits; new weights (the steps over the old ones dropped),
    another batch, inference mode, another backend in force or the model's own capture anew;
    at most two steps are kept per model, none after release_cuda_graphs."""
    from fuseformer import kernels as K
    from fuseformer.models import generation

    captures = _stand_in_capture(monkeypatch, generation)
    _, ours = twins(eos=None, n_positions=40)
    assert generation._buffer_length(9, 40) == 40 and generation._buffer_length(9, 1024) == 64
    assert generation._buffer_length(65, 1024) == 128

    def check(ids, mask, new=3):
        _drive_static_step(ours, ids, mask, new)

    ids, mask = left_padded()
    check(ids, mask)
    other = torch.randint(3, VOCAB, (3, 11), generator=torch.Generator().manual_seed(9))
    other_mask = torch.ones(3, 11, dtype=torch.long)
    other_mask[0, :6] = 0
    check(other, other_mask, new=5)  # another prompt length and padding: the same step replayed
    assert len(captures) == 1
    ours.double()  # the same weights at the same addresses: replayed
    check(ids, mask)
    assert len(captures) == 1
    ours.float().double()  # new tensors: captured anew, the step over the old ones dropped
    check(ids, mask)
    assert len(captures) == 2 and len(generation._STEPS[ours]) == 1
    check(ids[:2], mask[:2])  # another batch
    assert len(captures) == 3
    with torch.inference_mode():  # buffers made under it could not be written outside it
        check(ids[:2], mask[:2])
    assert len(captures) == 4
    check(ids[:2], mask[:2])  # and the step made outside it replays
    assert len(captures) == 4
    with K.use_backend("torch"):  # another backend in force
        check(ids, mask)
    assert len(captures) == 5
    ours.set_backend("torch")  # the model's own backend
    check(ids, mask)
    assert len(captures) == 6 and len(generation._STEPS[ours]) == 2  # the latest two kept
    ours.release_cuda_graphs()
    assert ours not in generation._STEPS


def test_static_cache_bad_use_is_named():
    from fuseformer.models.layers import StaticKVCache

    _, ours = twins()
    ids = torch.randint(3, VOCAB, (2, 4))
    with torch.no_grad():
        past = ours(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match=r"max_length \(3\) must be at least the cached length \(4\)"):
        StaticKVCache(past, 3)
    with pytest.raises(ValueError, match=r"prompt_mask must have shape \(2, 4\), got \(2, 5\)"):
        StaticKVCache(past, 8, torch.ones(2, 5))
    cache = StaticKVCache(past, 8)
    pos = torch.full((2, 1), 4)
    with pytest.raises(ValueError, match="takes one token .* with its position_ids and no attention_mask"):
        ours(ids[:, :2], past_key_values=cache, position_ids=pos.expand(2, 2))
    with pytest.raises(ValueError, match="takes one token .* with its position_ids"):
        ours(ids[:, :1], past_key_values=cache)
    with pytest.raises(ValueError, match="takes one token .* and no attention_mask"):
        ours(ids[:, :1], past_key_values=cache, position_ids=pos, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="cuda_graph=True needs the model and input_ids on a CUDA device, got cpu"):
        ours.generate(ids, 2, cuda_graph=True)
    with pytest.raises(ValueError, match="static_cache=True decodes on a cache: it needs use_cache=True"):
        ours.generate(ids, 2, static_cache=True, use_cache=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_cuda_graph_decoding_replays_the_static_step(dtype):
    """generate(cuda_graph=True): the static step captured once and replayed per token gives
    the tokens of the same step run eagerly (the same kernels on the same shapes), and, in
    float32, those of the growing cache; sampling too, with the generator on the GPU."""
    _, ours = twins(eos=None)
    ours = ours.to("cuda", dtype).eval()
    ours.set_backend("auto")
    ids, mask = (t.cuda() for t in left_padded())
    graphed = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, cuda_graph=True)
    eager = ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, static_cache=True)
    assert torch.equal(graphed, eager)
    # Later calls of the bucket replay the captured step on their own prompt.
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, cuda_graph=True),
                       graphed)
    shorter = [ours.generate(ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=9, pad_token_id=0, **kw)
               for kw in ({"cuda_graph": True}, {"static_cache": True})]
    assert torch.equal(*shorter)
    from fuseformer.models import generation
    assert len(generation._STEPS[ours]) == 1  # one capture, replayed by the later calls
    if dtype == torch.float32:
        assert torch.equal(graphed, ours.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0))
    sampled = [ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0,
                             generator=torch.Generator("cuda").manual_seed(3), **kw)
               for kw in ({"cuda_graph": True}, {"static_cache": True})]
    assert torch.equal(*sampled)
