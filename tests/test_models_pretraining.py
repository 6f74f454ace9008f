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
