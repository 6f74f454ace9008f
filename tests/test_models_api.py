"""What a transformers user expects of our models beyond parity: backend names refused where
they are given, decisions bound once (no lookup or host read per forward), .device / .dtype /
num_parameters(), inputs_embeds, 4-D masks."""
import pytest
import torch

from models_util import VOCAB, padded_batch

import fuseformer.models as M
from fuseformer import kernels as K
from fuseformer.models import bert as bert_mod
from fuseformer.models import layers



@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")  # only where needed: the GPU test runs without it


def bert_cfg(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=40, num_labels=3)
    base.update(kw)
    return M.BertConfig(**base)


def gpt2_cfg(**kw):
    base = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=40)
    base.update(kw)
    return M.GPT2Config(**base)


# --- F: a misspelt backend is refused where it is given ----------------------------------------

def test_misspelt_backend_refused_where_given(tmp_path, transformers):
    with pytest.raises(ValueError, match=r"backend must be one of .*'triton'.*got 'trtion'"):
        M.BertModel(bert_cfg(), backend="trtion")
    with pytest.raises(ValueError, match="got 'trtion'"):
        M.GPT2LMHeadModel(gpt2_cfg(), backend="trtion")
    m = M.BertForMaskedLM(bert_cfg(), backend="torch")
    with pytest.raises(ValueError, match="got 'trtion'"):
        m.set_backend("trtion")
    assert all(b.attn.backend == "torch" for b in m.bert.encoder.layer)  # nothing half-changed
    with pytest.raises(ValueError, match="got 'trtion'"):
        m.bert.encoder.layer[0].attn.backend = "trtion"
    # from_pretrained refuses before reading anything (the folder does not even exist)
    with pytest.raises(ValueError, match="got 'trtion'"):
        M.BertModel.from_pretrained(str(tmp_path / "nothing"), backend="trtion")
    hf = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ValueError, match="got 'trtion'"):
        M.BertModel.from_hf(hf, backend="trtion")
    with pytest.raises(ValueError, match="got 'trtion'"):
        M.patch_hf(hf, backend="trtion")
    assert hf.config._attn_implementation != "fuseformer"  # refused before patching anything
    assert M.BertModel(bert_cfg(), backend="TORCH").encoder.layer[0].ffn.backend == "torch"


# --- A: decisions bound once --------------------------------------------------------------------

def test_torch_path_decided_once_and_follows_the_global_backend(monkeypatch):
    m = M.BertModel(bert_cfg()).eval()  # backend=None: follows the global backend
    calls = []
    real = layers.runs_torch
    monkeypatch.setattr(layers, "runs_torch", lambda *a: calls.append(a) or real(*a))
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=9)
    with torch.no_grad():
        m(ids, mask)
        first = len(calls)
        assert first > 0
        m(ids, mask)
        m(ids, mask)
        assert len(calls) == first  # no lookup per forward once decided
        with K.use_backend("torch"):  # the global backend changed: every module notices
            m(ids, mask)
        assert len(calls) == 2 * first
        m.set_backend("torch")  # its own backend changed: decided again
        m(ids, mask)
        assert len(calls) == 3 * first


def test_ids_on_a_device_are_checked_there_without_a_host_read(monkeypatch):
    """A GPU tensor is checked by torch._assert_async; emulated with the meta device, where
    any read of a value back to the host raises."""
    seen = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg="": seen.append((cond.device.type, msg)))
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    bert_mod.check_ids("input_ids", ids, VOCAB, "vocab_size")
    assert seen == [("meta", f"input_ids must lie in [0, {VOCAB}) (vocab_size)")]
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 1000\) \(vocab_size\), got values in \[-1, 3\]"):
        bert_mod.check_ids("input_ids", torch.tensor([[-1, 3]]), VOCAB, "vocab_size")  # CPU: a Python error


def _count_host_reads(monkeypatch):
    reads = []
    for method in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist", "nonzero"):
        real = getattr(torch.Tensor, method)

        def spy(self, *a, _real=real, _name=method, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, method, spy)
    return reads


def test_unpadder_reads_the_lengths_back_once(monkeypatch):
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=11)
    reads = _count_host_reads(monkeypatch)
    packer = bert_mod.Unpadder(mask)
    assert reads == ["tolist"]
    monkeypatch.undo()
    assert torch.equal(packer.index, mask.flatten().nonzero().squeeze(1))
    assert packer.max_seqlen == int(mask.sum(1).max())
    assert packer.cu_seqlens.tolist() == [0] + mask.sum(1).cumsum(0).tolist()


def test_unpad_refused_inside_a_cuda_graph_capture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="unpad=True cannot run inside a CUDA graph capture"):
        bert_mod.Unpadder(torch.ones(2, 3, dtype=torch.long))


@pytest.mark.gpu
def test_forward_and_backward_never_synchronise():
    torch.manual_seed(0)
    ids, mask, types = (t.cuda() for t in padded_batch(vocab=VOCAB, seq=17))
    models = [M.BertForMaskedLM(bert_cfg()).cuda().train(), M.GPT2LMHeadModel(gpt2_cfg()).cuda().train()]
    for m in models:
        # PyTorch's own embedding backward reads the number of distinct ids back to the host;
        # frozen embeddings leave it out, so what is checked is ours.
        for e in m.modules():
            if isinstance(e, torch.nn.Embedding):
                e.weight.requires_grad_(False)
        kw = dict(input_ids=ids, attention_mask=mask, labels=ids)
        m(**kw).loss.backward()  # warm-up: autotuning and lazy initialisation may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            m(**kw).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


# --- C: what transformers' models also answer ---------------------------------------------------

def test_device_dtype_num_parameters_match_transformers(transformers):
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**bert_cfg().to_dict()))
    ours = M.BertForMaskedLM.from_hf(hf)
    assert ours.device == hf.device and ours.dtype == hf.dtype == torch.float32
    assert ours.num_parameters() == hf.num_parameters()  # tied decoder counted once
    assert ours.num_parameters(exclude_embeddings=True) == hf.num_parameters(exclude_embeddings=True)
    ours.bert.embeddings.requires_grad_(False)
    hf.bert.embeddings.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == hf.num_parameters(only_trainable=True)
    assert ours.double().dtype == torch.float64


@pytest.mark.parametrize("family", ["bert", "albert", "gpt2"])
def test_inputs_embeds_equals_input_ids(family):
    torch.manual_seed(3)
    if family == "gpt2":
        m = M.GPT2LMHeadModel(gpt2_cfg()).eval()
        table = m.transformer.wte
    elif family == "albert":
        m = M.AlbertForMaskedLM(M.AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32,
                                               num_attention_heads=2, intermediate_size=48, num_hidden_layers=2)).eval()
        table = m.albert.embeddings.word_embeddings
    else:
        m = M.BertForMaskedLM(bert_cfg()).eval()
        table = m.bert.embeddings.word_embeddings
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=9)
    with torch.no_grad():
        a = m(input_ids=ids, attention_mask=mask).logits
        b = m(inputs_embeds=table(ids), attention_mask=mask).logits
    torch.testing.assert_close(b, a)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds, got both"):
        m(input_ids=ids, inputs_embeds=table(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds, got neither"):
        m(attention_mask=mask)
    with pytest.raises(ValueError, match=r"inputs_embeds must be a \(batch, seq_len, "):
        m(inputs_embeds=table(ids)[..., :3])


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_4d_masks_as_transformers_builds_them(family):
    """transformers' extended masks: bool (True = attend) or additive float (0 / dtype min),
    (B, 1, 1, S) or (B, 1, T, S); the same outputs as the 2-D mask they encode."""
    torch.manual_seed(4)
    m = (M.GPT2LMHeadModel(gpt2_cfg()) if family == "gpt2" else M.BertForMaskedLM(bert_cfg())).eval()
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=9)
    keep = mask.bool()
    additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    T = ids.shape[1]
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask).logits
        for m4 in (keep[:, None, None, :], additive, additive.expand(-1, 1, T, -1).clone(),
                   torch.zeros(additive.shape).masked_fill(~keep[:, None, None, :], float("-inf"))):
            out = m(input_ids=ids, attention_mask=m4).logits
            torch.testing.assert_close(out[keep], ref[keep])
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(input_ids=ids, attention_mask=keep[:, None, :])


def test_unpadded_bert_runs_under_inference_mode():
    # Regression: varlen_attention read the version counter of cu_seqlens, which inference
    # tensors do not have, so BertModel(unpad=True) failed under torch.inference_mode().
    from fuseformer.models import BertConfig, BertModel

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    packed = BertModel(cfg, unpad=True, backend="triton").to(device).eval()
    padded = BertModel(cfg, backend="torch").to(device).eval()
    padded.load_state_dict(packed.state_dict())
    ids = torch.randint(0, 100, (2, 9), device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, 5:] = 0
    with torch.inference_mode():
        got = packed(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = padded(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-4, atol=1e-4)
