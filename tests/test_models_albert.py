"""ALBERT: parity with transformers for every head, parameter sharing as transformers groups
it, save_pretrained round trip, bad input."""
import pytest
import torch

from models_util import VOCAB, check_against_hf, compare_outputs, padded_batch

import fuseformer.models as M

transformers = pytest.importorskip("transformers")

HEADS = {
    "AlbertModel": ["last_hidden_state", "pooler_output"],
    "AlbertForPreTraining": ["prediction_logits", "sop_logits"],
    "AlbertForMaskedLM": ["logits"],
    "AlbertForSequenceClassification": ["logits"],
}


def hf_config(**kw):
    # 4 layers drawn from 2 groups of 2 blocks: shared weights reused, as transformers does it.
    base = dict(vocab_size=VOCAB, embedding_size=40, hidden_size=96, num_hidden_layers=4, num_hidden_groups=2,
                inner_group_num=2, num_attention_heads=6, intermediate_size=200, max_position_embeddings=40,
                num_labels=3, classifier_dropout_prob=0.1, hidden_dropout_prob=0.1)
    base.update(kw)
    return transformers.AlbertConfig(**base)


def inputs():
    ids, mask, types = padded_batch()
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types), mask


@pytest.mark.parametrize("name", list(HEADS))
def test_from_hf_matches_transformers(name):
    torch.manual_seed(1)
    hf = getattr(transformers, name)(hf_config()).double()
    kw, mask = inputs()
    check_against_hf(hf, getattr(M, name).from_hf, kw, HEADS[name], mask)


def test_patch_hf_matches_transformers():
    torch.manual_seed(2)
    hf = transformers.AlbertForPreTraining(hf_config()).double()
    kw, mask = inputs()
    check_against_hf(hf, M.patch_hf, kw, HEADS["AlbertForPreTraining"], mask)


def test_parameters_are_shared():
    m = M.AlbertModel(M.AlbertConfig.from_dict(hf_config(num_hidden_layers=6).to_dict()))
    blocks = list(m.encoder.schedule())
    assert len(blocks) == 12 and len({id(b) for b in blocks}) == 4  # 6 layers x 2 inner, 2 x 2 distinct
    assert blocks[0] is blocks[2] and blocks[6] is blocks[10]
    assert m.embeddings.word_embeddings.weight.shape == (VOCAB, 40)  # factorised: V x E


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(3)
    ours = M.AlbertForPreTraining(M.AlbertConfig.from_dict(hf_config().to_dict())).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AlbertForPreTraining.from_pretrained(tmp_path).eval()
    kw, mask = inputs()
    with torch.no_grad():
        mine, theirs = ours(**kw), hf(**kw)
    compare_outputs(theirs, mine, mine, HEADS["AlbertForPreTraining"], mask, torch.float32)


def test_sop_loss_matches_transformers():
    torch.manual_seed(4)
    hf = transformers.AlbertForPreTraining(hf_config(num_labels=2)).double().eval()
    ours = M.AlbertForPreTraining.from_hf(hf)
    kw, mask = inputs()
    labels = torch.where(torch.rand(mask.shape) < 0.3, kw["input_ids"], torch.full_like(mask, -100))
    order = torch.tensor([1, 0, 1])
    with torch.no_grad():
        a = hf(**kw, labels=labels, sentence_order_label=order).loss
        b = ours(**kw, labels=labels, sentence_order_label=order).loss
    assert abs(a.item() - b.item()) < 1e-10


def test_bad_input_is_named():
    m = M.AlbertModel(M.AlbertConfig.from_dict(hf_config().to_dict())).eval()
    with pytest.raises(ValueError, match="input_ids must lie in"):
        m(input_ids=torch.full((1, 3), VOCAB + 5))
    with pytest.raises(ValueError, match="longer than the position table"):
        m(input_ids=torch.zeros(1, 50, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(5, 2))
    with pytest.raises(ValueError, match="must be divisible by num_attention_heads"):
        M.AlbertConfig(hidden_size=96, num_attention_heads=5)
    with pytest.raises(ValueError, match="num_hidden_groups"):
        M.AlbertConfig(hidden_size=96, num_attention_heads=6, num_hidden_layers=2, num_hidden_groups=3)


def test_unpad_matches_padded():
    torch.manual_seed(5)
    cfg = M.AlbertConfig.from_dict(hf_config(hidden_dropout_prob=0.0).to_dict())
    padded = M.AlbertModel(cfg).eval()
    packed = M.AlbertModel(cfg, unpad=True).eval()
    packed.load_state_dict(padded.state_dict())
    kw, mask = inputs()
    with torch.no_grad():
        a, b = padded(**kw), packed(**kw)
    w = mask.bool()
    torch.testing.assert_close(b.last_hidden_state[w], a.last_hidden_state[w], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=2e-5, rtol=1e-5)
