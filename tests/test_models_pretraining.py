"""Pretraining objectives: BERT's 15% / 80-10-10 masking, NSP and SOP pairs."""
import random

import pytest
import torch

from fuseformer.models import pretraining as P

CLS, SEP, MASK, PAD, V = 1, 2, 3, 0, 500


def test_mask_tokens_proportions_and_exclusions():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (64, 200), generator=g)
    ids[:, 0], ids[:, 100] = CLS, SEP
    attn = torch.ones_like(ids)
    attn[:, 150:] = 0
    ids = ids.masked_fill(attn == 0, PAD)
    out, labels = P.mask_tokens(ids, vocab_size=V, mask_token_id=MASK, special_token_ids=(CLS, SEP, PAD),
                                attention_mask=attn, generator=g)
    chosen = labels != -100
    eligible = (attn == 1) & (ids != CLS) & (ids != SEP)
    assert not (chosen & ~eligible).any()  # never special or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(out[~chosen], ids[~chosen])
    frac = chosen.sum().item() / eligible.sum().item()
    assert 0.14 < frac < 0.16
    n = chosen.sum().item()
    masked = (out[chosen] == MASK).sum().item() / n
    kept = (out[chosen] == ids[chosen]).sum().item() / n
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.13  # kept includes the rare random == original


def test_mask_tokens_bad_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="mlm_probability"):
        P.mask_tokens(ids, vocab_size=V, mask_token_id=MASK, mlm_probability=1.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        P.mask_tokens(ids, vocab_size=V, mask_token_id=V)
    with pytest.raises(ValueError, match="attention_mask"):
        P.mask_tokens(ids, vocab_size=V, mask_token_id=MASK, attention_mask=torch.ones(3, 2))


def test_pairs_are_balanced_and_well_formed():
    sentences = [[10 + i, 20 + i, 30 + i] for i in range(400)]
    nsp = P.next_sentence_pairs(sentences, rng=random.Random(0), cls_id=CLS, sep_id=SEP, max_length=9)
    sop = P.sentence_order_pairs(sentences, rng=random.Random(0), cls_id=CLS, sep_id=SEP, max_length=9)
    for pairs in (nsp, sop):
        share = sum(p[2] for p in pairs) / len(pairs)
        assert 0.4 < share < 0.6
        ids, types, _ = pairs[0]
        assert ids[0] == CLS and ids.count(SEP) == 2 and len(ids) == len(types) == 9
    for i, (ids, _, label) in enumerate(sop):
        a, b = ids[1:4], ids[5:8]
        assert (a, b) == ((sentences[i], sentences[i + 1]) if label == 0 else (sentences[i + 1], sentences[i]))
    for i, (ids, _, label) in enumerate(nsp):
        assert (ids[5:8] == sentences[i + 1]) == (label == 0)


def test_encode_pair_truncates_longer_side():
    ids, types = P.encode_pair(list(range(10, 20)), [5, 6], cls_id=CLS, sep_id=SEP, max_length=8)
    assert ids == [CLS, 10, 11, 12, SEP, 5, 6, SEP] and types == [0] * 5 + [1] * 3


def test_distillation_loss():
    torch.manual_seed(0)
    teacher = torch.randn(4, 5, 11)
    assert P.distillation_loss(teacher.clone(), teacher, temperature=3.0).abs() < 1e-6  # same distribution
    student = torch.randn(4, 5, 11, requires_grad=True)
    loss = P.distillation_loss(student, teacher, temperature=2.0)
    s, t = torch.log_softmax(student / 2, -1), torch.log_softmax(teacher / 2, -1)
    expected = (t.exp() * (t - s)).sum(-1).mean() * 4
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad.abs().sum() > 0
    labels = torch.randint(0, 11, (4, 5))
    labels[0] = -100
    mixed = P.distillation_loss(student, teacher, labels=labels, alpha=0.3)
    assert torch.isfinite(mixed)
    with pytest.raises(ValueError, match="teacher_logits"):
        P.distillation_loss(student, teacher[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        P.distillation_loss(student, teacher, temperature=0)


def test_electra_corrupt_and_loss():
    ids = torch.randint(4, 20, (3, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    # A generator sure of the original token replaces nothing; one sure of token 1 replaces exactly the chosen.
    sure = torch.nn.functional.one_hot(ids, 20).float() * 50
    out, replaced = P.electra_corrupt(ids, labels, sure)
    assert torch.equal(out, ids) and replaced.sum() == 0
    wrong = torch.zeros(3, 6, 20)
    wrong[..., 1] = 50
    out, replaced = P.electra_corrupt(ids, labels, wrong)
    assert torch.equal(replaced, (labels != -100).long()) and (out[:, 2] == 1).all()
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    good = P.replaced_token_loss((replaced * 2 - 1).float() * 20, replaced, mask)
    bad = P.replaced_token_loss((1 - replaced * 2).float() * 20, replaced, mask)
    assert good < 1e-6 < 1.0 < bad


# ----------------------------------------------------------------------------- MLM on the labelled rows only


def _labels(B, T, chosen, vocab=50):
    labels = torch.full((B, T), P.IGNORE_INDEX)
    for b, t in chosen:
        labels[b, t] = (7 * b + t) % vocab
    return labels


def test_predicted_rows_puts_the_labelled_tokens_first():
    B, T, C = 3, 7, 4
    hidden = torch.randn(B, T, C)
    chosen = [(0, 5), (1, 0), (1, 6), (2, 2)]
    labels = _labels(B, T, chosen)
    rows, row_labels = P.predicted_rows(hidden, labels, 3)
    assert rows.shape == (B * 3, C) and row_labels.shape == (B * 3,)
    # the labelled tokens in row-major order, then others with the ignored label
    for i, (b, t) in enumerate(chosen):
        assert torch.equal(rows[i], hidden[b, t]) and row_labels[i] == labels[b, t]
    assert (row_labels[len(chosen):] == P.IGNORE_INDEX).all()
    # no labels or no bound: everything as it is, as Hugging Face's heads take it
    assert P.predicted_rows(hidden, None, 3)[0] is hidden
    same = P.predicted_rows(hidden, labels, None)
    assert same[0] is hidden and same[1] is labels
    # a bound past the sequence length keeps every token: B x T rows
    assert P.predicted_rows(hidden, labels, 100)[0].shape == (B * T, C)


def test_predicted_rows_refuses_more_labels_than_the_bound():
    hidden = torch.randn(2, 5, 3)
    labels = _labels(2, 5, [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4)])
    P.predicted_rows(hidden, labels, 3)  # 5 labelled <= 2 x 3: the total is bounded, not each row
    with pytest.raises(ValueError, match=r"mark 5 tokens.*max_predictions_per_seq=2 allows at most 4"):
        P.predicted_rows(hidden, labels, 2)
    with pytest.raises(ValueError, match="one label per token"):
        P.predicted_rows(hidden, labels[:, :4], 2)
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError, match="max_predictions_per_seq"):
            P.check_max_predictions(bad)


def _mlm_models():
    import fuseformer.models as M

    bert = M.BertConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    albert = M.AlbertConfig(vocab_size=61, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                            classifier_dropout_prob=0.0, max_position_embeddings=32)
    return {"BertForMaskedLM": (M.BertForMaskedLM, bert), "BertForPreTraining": (M.BertForPreTraining, bert),
            "AlbertForMaskedLM": (M.AlbertForMaskedLM, albert),
            "AlbertForPreTraining": (M.AlbertForPreTraining, albert)}


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("name", ["BertForMaskedLM", "BertForPreTraining", "AlbertForMaskedLM", "AlbertForPreTraining"])
def test_labelled_rows_only_give_the_same_loss_and_gradients(name, backend, dtype):
    """max_predictions_per_seq: the MLM head on the labelled tokens only, the same loss and
    gradients as the head on every token (Hugging Face's), and those tokens' logits."""
    cls, config = _mlm_models()[name]
    torch.manual_seed(0)
    full = cls(config, backend=backend).to(dtype).train()
    bounded = cls(config, backend=backend, max_predictions_per_seq=4).to(dtype).train()
    bounded.load_state_dict(full.state_dict())
    B, T = 3, 9
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[2, 6:] = 0
    chosen = [(0, 1), (0, 4), (0, 8), (1, 0), (1, 3), (1, 5), (1, 7), (2, 2)]  # 8 <= 3 x 4; row 1 has 4
    labels = _labels(B, T, chosen, config.vocab_size)
    extra = {"next_sentence_label" if "Bert" in name else "sentence_order_label": torch.tensor([0, 1, 1])} \
        if "PreTraining" in name else {}
    outs = []
    for model in (full, bounded):
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        out.loss.backward()
        outs.append(out)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1].loss, outs[0].loss, **tol)
    first = outs[0].logits if "MaskedLM" in name else outs[0].prediction_logits
    rows = outs[1].logits if "MaskedLM" in name else outs[1].prediction_logits
    assert rows.shape == (B * 4, config.vocab_size)
    torch.testing.assert_close(rows[:len(chosen)], torch.stack([first[b, t] for b, t in chosen]), **tol)
    grads = dict(bounded.named_parameters())
    compared = 0
    for pname, p in full.named_parameters():
        if p.grad is None:
            assert grads[pname].grad is None, pname
            continue
        torch.testing.assert_close(grads[pname].grad, p.grad, **tol, msg=lambda m, n=pname: f"{n}: {m}")
        compared += 1
    assert compared > 10
    # more labelled tokens than B x max_predictions_per_seq: refused by name
    with pytest.raises(ValueError, match="max_predictions_per_seq=4"):
        bounded(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100), **extra)


def test_labelled_rows_only_compile_fullgraph():
    """No read-back of the count: the bounded head traces whole (the count is checked on the
    device there, by torch._assert_async)."""
    cls, config = _mlm_models()["BertForMaskedLM"]
    torch.manual_seed(0)
    model = cls(config, backend="torch", max_predictions_per_seq=2).train()
    ids = torch.randint(5, config.vocab_size, (2, 6))
    labels = _labels(2, 6, [(0, 1), (1, 2), (1, 5)], config.vocab_size)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    eager = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(compiled(input_ids=ids, labels=labels).loss, eager)
    with pytest.raises(RuntimeError, match="too many labelled tokens"):
        compiled(input_ids=ids, labels=torch.where(ids > 0, ids, -100)).loss.item()
