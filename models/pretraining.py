"""Pretraining objectives from the BERT and ALBERT papers: masked LM, next sentence
prediction (NSP) and sentence order prediction (SOP), on token-id lists.

Also the cheap relatives: ELECTRA's replaced-token detection (electra_corrupt,
replaced_token_loss) and distillation from a teacher's soft outputs (distillation_loss).

Labels follow Hugging Face: MLM labels are -100 where no loss is taken; NSP label 0 = B
really follows A, 1 = B is random; SOP label 0 = segments in order, 1 = swapped.
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .layers import vocab_loss, wide

IGNORE_INDEX = -100


def mask_tokens(input_ids: torch.Tensor, *, vocab_size: int, mask_token_id: int,
                special_token_ids: Iterable[int] = (), attention_mask: torch.Tensor | None = None,
                mlm_probability: float = 0.15, generator: torch.Generator | None = None):
    """BERT's masking: choose `mlm_probability` of the ordinary tokens; of those 80% become
    [MASK], 10% a random token, 10% stay. Special and padding tokens are never chosen.

    Returns (masked input_ids, labels): labels hold the original id where chosen, else -100.
    Dynamic masking (RoBERTa) is calling this again every epoch."""
    if not 0.0 <= mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in [0, 1], got {mlm_probability}")
    if not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"mask_token_id must be in [0, vocab_size={vocab_size}), got {mask_token_id}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    device = input_ids.device

    def rand(shape):
        return torch.rand(shape, generator=generator, device=generator.device if generator else "cpu").to(device)

    eligible = torch.ones_like(input_ids, dtype=torch.bool)
    for sid in special_token_ids:
        eligible &= input_ids != sid
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    chosen = (rand(input_ids.shape) < mlm_probability) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    roll = rand(input_ids.shape)
    to_mask = chosen & (roll < 0.8)
    to_random = chosen & (roll >= 0.8) & (roll < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator,
                               device=generator.device if generator else "cpu").to(device)
    out = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    out = torch.where(to_random, random_ids, out)
    return out, labels


def encode_pair(a: Sequence[int], b: Sequence[int], *, cls_id: int, sep_id: int, max_length: int):
    """[CLS] a [SEP] b [SEP] with token types 0 for A, 1 for B; the longer side is
    trimmed from its end until the pair fits."""
    a, b = list(a), list(b)
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 for [CLS] a [SEP] b [SEP], got {max_length}")
    while len(a) + len(b) + 3 > max_length:
        (a if len(a) >= len(b) else b).pop()
    ids = [cls_id] + a + [sep_id] + b + [sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return ids, types


def next_sentence_pairs(sentences: Sequence[Sequence[int]], *, rng: random.Random, **encode):
    """NSP examples from consecutive sentences of one text: half keep the real next
    sentence (label 0), half take a random other one (label 1)."""
    if len(sentences) < 3:
        raise ValueError("sentences must hold at least 3 sentences to draw random non-next ones")
    out = []
    for i in range(len(sentences) - 1):
        if rng.random() < 0.5:
            b, label = sentences[i + 1], 0
        else:
            j = rng.choice([j for j in range(len(sentences)) if j not in (i, i + 1)])
            b, label = sentences[j], 1
        out.append((*encode_pair(sentences[i], b, **encode), label))
    return out


def sentence_order_pairs(sentences: Sequence[Sequence[int]], *, rng: random.Random, **encode):
    """SOP examples from consecutive sentences: in order (label 0) or swapped (label 1), 50/50."""
    if len(sentences) < 2:
        raise ValueError("sentences must hold at least 2 sentences")
    out = []
    for i in range(len(sentences) - 1):
        a, b = sentences[i], sentences[i + 1]
        swapped = rng.random() < 0.5
        pair = encode_pair(b, a, **encode) if swapped else encode_pair(a, b, **encode)
        out.append((*pair, int(swapped)))
    return out


def collate(examples, pad_id: int = 0):
    """[(ids, types, label)] -> dict of padded tensors: input_ids, token_type_ids,
    attention_mask (1 = token), pair_labels."""
    T = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for r, (i, t, _) in enumerate(examples):
        ids[r, :len(i)] = torch.tensor(i)
        types[r, :len(t)] = torch.tensor(t)
        mask[r, :len(i)] = 1
    labels = torch.tensor([e[2] for e in examples])
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "pair_labels": labels}


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Mean cross-entropy over the chosen tokens only (labels != -100), in float32 at least:
    the heads' own loss (models/layers.py vocab_loss) on `backend` (None: the backend in force)."""
    return vocab_loss(logits, labels, IGNORE_INDEX, backend)


def check_max_predictions(value) -> int | None:
    """max_predictions_per_seq as the MLM models take it: None, or an int >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_predictions_per_seq must be None or an int >= 1, got {value!r}")
    return value


def predicted_rows(hidden: torch.Tensor, labels: torch.Tensor | None, max_predictions_per_seq: int | None,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the hidden states the MLM head predicts, their labels).

    Without labels or a bound: (hidden, labels) as they are, every token predicted (Hugging
    Face's heads). With both: the B x min(T, max_predictions_per_seq) rows of `hidden` (B, T,
    C) whose tokens carry a label first, in row-major order, then unlabelled ones to fill the
    bound (their labels ignore_index: no loss), as a (rows, C) tensor, and their labels.

    Why: the MLM head (the H x H transform and the H x V decoder GEMM, BERT's largest, a fifth
    of a training step) and the cross-entropy over its logits only matter at the ~15% of
    tokens that carry a label, so computing them there gives the same loss and gradients for
    a fraction of the work (the original BERT's max_predictions_per_seq: 20 at L128, 80 at
    L512; NVIDIA's and MosaicML's BERTs do the same). A bound fixed by the shapes, not the
    labels' count, keeps the shapes static: no read-back of the count (no host sync), and a
    CUDA graph or torch.compile captures it. The bound is on the batch's total: more labelled
    tokens than B x max_predictions_per_seq is a ValueError on a CPU, a device-side assert
    elsewhere and while compiling (the count never reaches the host there)."""
    if labels is None or max_predictions_per_seq is None:
        return hidden, labels
    B, T, C = hidden.shape
    if labels.numel() != B * T:
        raise ValueError(f"labels must have one label per token, {B} x {T}, got shape {tuple(labels.shape)}")
    flat = labels.reshape(-1)
    bound = B * min(T, max_predictions_per_seq)
    unlabelled = flat == ignore_index
    what = f"max_predictions_per_seq={max_predictions_per_seq} allows at most {bound} labelled tokens in this batch"
    if flat.device.type == "cpu" and not torch.compiler.is_compiling():
        count = B * T - int(unlabelled.sum())
        if count > bound:
            raise ValueError(f"labels mark {count} tokens for prediction, but {what}")
    else:
        torch._assert_async(unlabelled.sum() >= B * T - bound, f"too many labelled tokens: {what}")
    # Labelled tokens first: a stable sort on 0 (labelled) / 1 (not), a few launches.
    rows = torch.argsort(unlabelled.to(torch.uint8), stable=True)[:bound]
    return hidden.reshape(B * T, C).index_select(0, rows), flat.index_select(0, rows)


def pair_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """NSP or SOP: two-way cross-entropy on the pooled [CLS]."""
    return F.cross_entropy(wide(logits), labels.reshape(-1))


def pretraining_loss(mlm_logits, mlm_labels, pair_logits, pair_labels,
                     mlm_loss=masked_lm_loss) -> torch.Tensor | None:
    """BERT / ALBERT pretraining loss: MLM + NSP (or SOP), summed as in the papers. A term
    whose labels are None is left out, as Hugging Face's heads do; None when both are.
    mlm_loss(logits, labels): the models pass their head's VocabLogits.loss."""
    terms = []
    if mlm_labels is not None:
        terms.append(mlm_loss(mlm_logits, mlm_labels))
    if pair_labels is not None:
        terms.append(pair_loss(pair_logits, pair_labels))
    return sum(terms[1:], terms[0]) if terms else None


def electra_corrupt(input_ids: torch.Tensor, labels: torch.Tensor, generator_logits: torch.Tensor,
                    generator: torch.Generator | None = None):
    """ELECTRA: a small MLM generator's samples replace the chosen tokens (labels != -100).

    Returns (corrupted input_ids, replaced): replaced is 1 where the corrupted token differs
    from the original (a sample equal to the original counts as original, as in the paper)."""
    if generator_logits.shape[:-1] != input_ids.shape or labels.shape != input_ids.shape:
        raise ValueError(f"labels and generator_logits[..., :] must have the shape of input_ids {tuple(input_ids.shape)}")
    chosen = labels != IGNORE_INDEX
    probs = torch.softmax(wide(generator_logits.detach()[chosen]), -1)  # (n_chosen, V)
    corrupted = input_ids.clone()
    if probs.shape[0]:
        corrupted[chosen] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return corrupted, (corrupted != input_ids).long()


def replaced_token_loss(discriminator_logits: torch.Tensor, replaced: torch.Tensor,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ELECTRA's discriminator loss: per-token original/replaced, over real tokens only."""
    keep = attention_mask.bool() if attention_mask is not None else torch.ones_like(replaced, dtype=torch.bool)
    return F.binary_cross_entropy_with_logits(wide(discriminator_logits)[keep], replaced[keep].to(wide(discriminator_logits).dtype))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float = 2.0,
                      labels: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """Knowledge distillation: KL(teacher || student) on temperature-softened distributions,
    scaled by T^2 so its gradients keep their size as T changes; mixed with the hard-label
    loss (weight 1 - alpha) when labels are given. Positions labelled -100 are left out."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    V = student_logits.shape[-1]
    s = wide(student_logits.reshape(-1, V)) / temperature
    t = wide(teacher_logits.detach().reshape(-1, V)) / temperature
    keep = labels.reshape(-1) != IGNORE_INDEX if labels is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    kl = F.kl_div(F.log_softmax(s[keep], -1), F.log_softmax(t[keep], -1), log_target=True, reduction="batchmean")
    soft = kl * temperature**2
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * masked_lm_loss(student_logits, labels)


__all__ = ["distillation_loss", "electra_corrupt", "replaced_token_loss", "mask_tokens", "encode_pair", "next_sentence_pairs", "sentence_order_pairs", "collate",
           "masked_lm_loss", "pair_loss", "pretraining_loss", "predicted_rows", "IGNORE_INDEX"]
