"""BERT: parity with transformers for every head (from_hf, patch_hf, save_pretrained round
trip), unpadding, checkpoint errors, bad input, torch.compile."""

import pytest
import torch

from models_util import VOCAB, check_against_hf, compare_outputs, padded_batch

import fuseformer.models as M
from fuseformer.models import CheckpointMismatchError

transformers = pytest.importorskip("transformers")

HEADS = {
    "BertModel": ["last_hidden_state", "pooler_output"],
    "BertForPreTraining": ["prediction_logits", "seq_relationship_logits"],
    "BertForMaskedLM": ["logits"],
    "BertForSequenceClassification": ["logits"],
    "BertForTokenClassification": ["logits"],
    "BertForQuestionAnswering": ["start_logits", "end_logits"],
}


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                intermediate_size=200, max_position_embeddings=40, num_labels=3)
    base.update(kw)
    return transformers.BertConfig(**base)


def inputs():
    ids, mask, types = padded_batch()
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types), mask


@pytest.mark.parametrize("name", list(HEADS))
def test_from_hf_matches_transformers(name):
    torch.manual_seed(1)
    labels = 2 if name == "BertForQuestionAnswering" else 3  # QA: start and end
    hf = getattr(transformers, name)(hf_config(num_labels=labels)).double()
    kw, mask = inputs()
    check_against_hf(hf, getattr(M, name).from_hf, kw, HEADS[name], mask)


@pytest.mark.parametrize("name", ["BertForPreTraining", "BertForSequenceClassification", "BertForQuestionAnswering"])
def test_patch_hf_matches_transformers(name):
    torch.manual_seed(2)
    labels = 2 if name == "BertForQuestionAnswering" else 3
    hf = getattr(transformers, name)(hf_config(num_labels=labels)).double()
    kw, mask = inputs()
    check_against_hf(hf, M.patch_hf, kw, HEADS[name], mask)


def test_patch_hf_keeps_weights_and_swaps_modules():
    hf = transformers.BertForMaskedLM(hf_config())
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    patched = M.patch_hf(hf, backend="torch")
    assert patched is hf
    assert type(hf.bert.encoder.layer[0].output).__name__ == "FusedBertOutput"
    assert type(hf.bert.encoder.layer[0].intermediate).__name__ == "FusedBertIntermediate"
    after = hf.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_losses_match_transformers():
    torch.manual_seed(3)
    hf = transformers.BertForPreTraining(hf_config()).double().eval()
    ours = M.BertForPreTraining.from_hf(hf)
    kw, mask = inputs()
    labels = torch.where(torch.rand(mask.shape) < 0.3, kw["input_ids"], torch.full_like(mask, -100))
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        a = hf(**kw, labels=labels, next_sentence_label=nsp).loss
        b = ours(**kw, labels=labels, next_sentence_label=nsp).loss
    assert torch.isfinite(b) and abs(a.item() - b.item()) < 1e-10


@pytest.mark.parametrize("num_labels,problem_type", [(1, None), (3, "regression"), (3, None)])
def test_classification_losses_match_transformers(num_labels, problem_type):
    # (3, "regression"): several regression targets, labels (B, num_labels) as transformers takes them.
    torch.manual_seed(5)
    hf = transformers.BertForSequenceClassification(
        hf_config(num_labels=num_labels, problem_type=problem_type)).double().eval()
    ours = M.BertForSequenceClassification.from_hf(hf)
    kw, _ = inputs()
    if problem_type == "regression" or num_labels == 1:
        labels = torch.randn(3, num_labels, dtype=torch.float64).squeeze(-1)
    else:
        labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a = hf(**kw, labels=labels).loss
        b = ours(**kw, labels=labels).loss
    assert torch.isfinite(b) and abs(a.item() - b.item()) < 1e-10


def test_forward_reads_no_tensor_value_while_a_cuda_graph_is_captured(monkeypatch):
    """The benchmark captures our inference in a CUDA graph (fuseformer-fused-graphs), where
    any read of a tensor value back to the host aborts the capture. Emulated on the CPU: the
    capture query answers True and converting a tensor to a Python number raises."""
    torch.manual_seed(6)
    bert = M.BertModel(M.BertConfig.from_dict(hf_config().to_dict())).eval()
    gpt2 = M.GPT2LMHeadModel(M.GPT2Config(vocab_size=VOCAB, n_embd=96, n_layer=2, n_head=6, n_positions=40)).eval()
    kw, mask = inputs()

    def no_host_read(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    for method in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, no_host_read)
    with torch.no_grad():
        assert bert(**kw).last_hidden_state.shape == (3, 17, 96)
        assert gpt2(kw["input_ids"], attention_mask=mask).logits.shape == (3, 17, VOCAB)


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(4)
    ours = M.BertForPreTraining(M.BertConfig.from_dict(hf_config().to_dict())).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path).eval()
    again = M.BertForPreTraining.from_pretrained(tmp_path)
    kw, mask = inputs()
    with torch.no_grad():
        mine, theirs, back = ours(**kw), hf(**kw), again(**kw)
    compare_outputs(theirs, mine, mine, HEADS["BertForPreTraining"], mask, torch.float32)
    for name in HEADS["BertForPreTraining"]:
        assert torch.equal(getattr(back, name), getattr(mine, name))


def test_base_model_loads_task_checkpoint_and_back(tmp_path):
    """The `bert.` prefix: BertModel from a BertForPreTraining folder keeps only the encoder."""
    hf = transformers.BertForPreTraining(hf_config())
    hf.save_pretrained(tmp_path)
    base = M.BertModel.from_pretrained(tmp_path)
    assert torch.equal(base.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    qkv = base.encoder.layer[1].attn.qkv.weight
    sa = hf.bert.encoder.layer[1].attention.self
    assert torch.equal(qkv, torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))


def test_checkpoint_mismatch_names_every_key(tmp_path):
    ours = M.BertModel(M.BertConfig.from_dict(hf_config().to_dict()))
    state = ours.hf_state_dict()
    del state["encoder.layer.0.attention.self.key.bias"]
    state["encoder.layer.0.surprise.weight"] = torch.zeros(3)
    state["pooler.dense.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointMismatchError) as err:
        M.BertModel(ours.config).load_hf_state_dict(state)
    msg = str(err.value)
    assert "missing keys (1): encoder.layer.0.attention.self.key.bias" in msg
    assert "unexpected keys (1): encoder.layer.0.surprise.weight" in msg
    assert "pooler.dense.weight: checkpoint (5, 5) vs model (96, 96)" in msg


def test_unpad_matches_padded():
    torch.manual_seed(5)
    cfg = M.BertConfig.from_dict(hf_config().to_dict())
    padded = M.BertModel(cfg).eval()
    packed = M.BertModel(cfg, unpad=True).eval()
    packed.load_state_dict(padded.state_dict())
    kw, mask = inputs()
    with torch.no_grad():
        a, b = padded(**kw), packed(**kw)
    w = mask.bool()
    torch.testing.assert_close(b.last_hidden_state[w], a.last_hidden_state[w], atol=2e-5, rtol=1e-5)
    assert b.last_hidden_state[~w].abs().max() == 0  # padding comes back as zeros
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=2e-5, rtol=1e-5)


def test_hidden_states_and_tuple_output():
    m = M.BertModel(M.BertConfig.from_dict(hf_config(num_hidden_layers=2).to_dict())).eval()
    kw, _ = inputs()
    out = m(**kw, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    tup = m(**kw, return_dict=False)
    assert torch.equal(tup[0], out.last_hidden_state) and torch.equal(out[1], out["pooler_output"])


def test_empty_batch():
    m = M.BertForSequenceClassification(M.BertConfig.from_dict(hf_config().to_dict())).eval()
    out = m(input_ids=torch.zeros(0, 7, dtype=torch.long), attention_mask=torch.zeros(0, 7, dtype=torch.long))
    assert out.logits.shape == (0, 3)


def test_bad_input_is_named():
    m = M.BertModel(M.BertConfig.from_dict(hf_config().to_dict())).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(input_ids=ids.clone().fill_(VOCAB))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(input_ids=ids.clone().fill_(-1))
    with pytest.raises(ValueError, match="longer than the position table"):
        m(input_ids=torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(input_ids=ids, attention_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="token_type_ids must lie in"):
        m(input_ids=ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="input_ids must be a"):
        m(input_ids=ids[0])
    with pytest.raises(ValueError, match=r"hidden_size \(100\) must be divisible by num_attention_heads \(6\)"):
        M.BertConfig(hidden_size=100, num_attention_heads=6)
    with pytest.raises(ValueError, match="hidden_act"):
        M.BertConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="model_type"):
        M.BertConfig.from_dict({"model_type": "gpt2"})


def test_layers_show_backend():
    m = M.BertModel(M.BertConfig.from_dict(hf_config(num_hidden_layers=1).to_dict()), backend="torch")
    text = repr(m)
    assert "backend=torch" in text and "heads=6" in text
    m.set_backend("triton")
    assert m.encoder.layer[0].attn.backend == "triton" and m.encoder.layer[0].ffn_norm.backend == "triton"


def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    m = M.BertModel(M.BertConfig.from_dict(hf_config(num_hidden_layers=2).to_dict()), backend="torch").eval()
    kw, mask = inputs()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        a, b = m(**kw), compiled(**kw)
    w = mask.bool()
    torch.testing.assert_close(b.last_hidden_state[w], a.last_hidden_state[w])
    torch.testing.assert_close(b.pooler_output, a.pooler_output)


def test_patch_hf_rejects_other_models():
    with pytest.raises(TypeError, match="must be a transformers model"):
        M.patch_hf(M.BertModel(M.BertConfig.from_dict(hf_config(num_hidden_layers=1).to_dict())))
    gpt_neo = transformers.GPTNeoConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                                        attention_types=[[["global"], 1]])
    with pytest.raises(ValueError, match="model_type='gpt_neo'"):
        M.patch_hf(transformers.GPTNeoModel(gpt_neo))


@pytest.mark.parametrize("family,option,value", [
    ("Bert", "is_decoder", True),
    ("Bert", "position_embedding_type", "relative_key"),
    ("GPT2", "scale_attn_by_inverse_layer_idx", True),
    ("GPT2", "reorder_and_upcast_attn", True),
    ("Albert", "position_embedding_type", "relative_key_query"),
])
def test_configs_with_options_we_do_not_implement_are_refused_by_name(family, option, value):
    """Loading them would give a model that silently computes something else."""
    hf_config = getattr(transformers, f"{family}Config")(**{option: value})
    with pytest.raises(ValueError, match=option):
        getattr(M, f"{family}Config").from_hf(hf_config)
    getattr(M, f"{family}Config").from_hf(getattr(transformers, f"{family}Config")())  # the defaults load


def test_class_names_survive_from_hf_and_save_pretrained(tmp_path):
    names = {0: "negative", 1: "neutral", 2: "positive"}
    hf = transformers.BertForSequenceClassification(hf_config(id2label=names, label2id={v: k for k, v in names.items()}))
    ours = M.BertForSequenceClassification.from_hf(hf)
    assert ours.config.num_labels == 3 and ours.config.id2label == names
    ours.save_pretrained(tmp_path)
    back = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    assert back.config.id2label == names and back.config.label2id == {v: k for k, v in names.items()}
