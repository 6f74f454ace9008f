"""Convergence, as Liger-Kernel tests it: train tiny BERT (MLM + NSP), ALBERT (MLM + SOP)
and GPT-2 for a few dozen steps on a small text made here, once on the `triton` backend
(Triton's interpreter on the CPU) and once on `torch`, from the same seed. The losses must
fall and the two curves agree within RTOL at every step."""
import random

import pytest
import torch

import fuseformer.models as M
from fuseformer import kernels as K
from fuseformer.models import pretraining as P

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the triton backend runs CUDA tensors on a GPU
# Dropout off: the only difference between the runs is the kernels, in fp32 with exact
# (ieee) products. Largest relative gap seen over the 6 steps under the interpreter: 1.5e-7
# (ALBERT; the BERT and GPT-2 curves were identical); 2e-6 keeps a ~10x margin. The GPU gap
# is not measured yet (compiled kernels sum in another order and use exp2): 1e-4 there until
# a GPU run shows the real gap. Both catch a real bug that the old 2e-2 let through: with
# the mean(g * xhat) term of the LayerNorm dx scaled by 0.9, the curves part by 4e-3
# (ALBERT) to 1.5e-2 (GPT-2). AdamW is blind to a gradient's scale, so this test catches
# wrong directions, not wrong magnitudes; each op's parity tests cover those.
STEPS, RTOL = 6, (1e-4 if DEVICE == "cuda" else 2e-6)
PAD, CLS, SEP, MASK = 0, 1, 2, 3

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a bird", "the child"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "watches"]
OBJECTS = ["the ball", "a tree", "the river", "an apple", "the house", "a book"]


def make_text(n=12, seed=0):
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}" for _ in range(n)]


def tokenize(sentences):
    words = sorted({w for s in sentences for w in s.split()})
    vocab = {w: i + 4 for i, w in enumerate(words)}
    return [[vocab[w] for w in s.split()] for s in sentences], len(vocab) + 4


def pair_batch(kind):
    sentences, vocab = tokenize(make_text())
    maker = P.next_sentence_pairs if kind == "nsp" else P.sentence_order_pairs
    # 4 pairs: Triton's interpreter costs ~ programs x steps, so the batch stays tiny.
    pairs = maker(sentences, rng=random.Random(1), cls_id=CLS, sep_id=SEP, max_length=16)[:4]
    batch = P.collate(pairs, PAD)
    masked, labels = P.mask_tokens(batch["input_ids"], vocab_size=vocab, mask_token_id=MASK,
                                   special_token_ids=(CLS, SEP), attention_mask=batch["attention_mask"],
                                   mlm_probability=0.3, generator=torch.Generator().manual_seed(2))
    return vocab, dict(input_ids=masked, attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]), labels, batch["pair_labels"]


def train(build, step_inputs, backend):
    torch.manual_seed(0)
    model = build(backend).to(DEVICE).train()
    step_inputs = {name: t.to(DEVICE) for name, t in step_inputs.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(**step_inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def bert(vocab):
    cfg = M.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return lambda backend: M.BertForPreTraining(cfg, backend=backend)


def albert(vocab):
    cfg = M.AlbertConfig(vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=16,
                         classifier_dropout_prob=0.0)
    return lambda backend: M.AlbertForPreTraining(cfg, backend=backend)


def gpt2(vocab):
    cfg = M.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return lambda backend: M.GPT2LMHeadModel(cfg, backend=backend)


def cases():
    vocab, kw, labels, pair = pair_batch("nsp")
    yield "bert", bert(vocab), dict(kw, labels=labels, next_sentence_label=pair)
    vocab, kw, labels, pair = pair_batch("sop")
    yield "albert", albert(vocab), dict(kw, labels=labels, sentence_order_label=pair)
    sentences, vocab = tokenize(make_text())
    ids = torch.tensor([sum(([CLS] + s for s in sentences[i:i + 3]), [])[:16] for i in range(0, 6, 3)])
    yield "gpt2", gpt2(vocab), dict(input_ids=ids, labels=ids)


@pytest.mark.slow
@pytest.mark.skipif(K.unavailable_reason("triton") is not None, reason=str(K.unavailable_reason("triton")))
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: c[0])
def test_triton_and_torch_curves_agree(case):
    name, build, step_inputs = case
    ref = train(build, step_inputs, "torch")
    fused = train(build, step_inputs, "triton")
    assert ref[-1] < 0.8 * ref[0], f"{name}: torch loss did not fall: {ref}"
    assert fused[-1] < 0.8 * fused[0], f"{name}: triton loss did not fall: {fused}"
    for step, (a, b) in enumerate(zip(fused, ref)):
        assert abs(a - b) <= RTOL * abs(b), f"{name} step {step}: triton {a:.5f} vs torch {b:.5f}"
