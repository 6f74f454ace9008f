"""CUDAGraphRunner: bucket choice, padding, slicing back and the eager fallback, checked on
the CPU with an eager stand-in for the capture; the real capture against eager on a GPU."""
import types

import pytest
import torch

from models_util import VOCAB, padded_batch

import fuseformer.models as M
from fuseformer.models import CUDAGraphRunner

BUCKETS = [(4, 16), (2, 8), (8, 32)]


def eager_capture(log):
    """Stand-in for capture_cuda_graph: 'replay' reruns the call on the static buffers."""
    def capture(fn):
        log.append(fn)
        return fn
    return capture


def bert_cfg(num_labels=3):
    return M.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=40, num_labels=num_labels)


def gpt2_cfg():
    return M.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=40)


def runner_for(model, **kw):
    log = []
    return CUDAGraphRunner(model, BUCKETS, capture=eager_capture(log), **kw), log


def test_smallest_bucket_that_holds_the_input():
    runner, log = runner_for(M.BertModel(bert_cfg()).eval())
    assert len(log) == 3 and runner.buckets == [(2, 8), (4, 16), (8, 32)]
    assert runner.bucket_for(1, 1) == (2, 8)
    assert runner.bucket_for(2, 9) == (4, 16)
    assert runner.bucket_for(3, 8) == (4, 16)
    assert runner.bucket_for(5, 16) == (8, 32)
    assert runner.bucket_for(9, 1) is None and runner.bucket_for(1, 33) is None


@pytest.mark.parametrize("name,outs", [
    ("BertModel", ["last_hidden_state", "pooler_output"]),
    ("BertForSequenceClassification", ["logits"]),
    ("BertForTokenClassification", ["logits"]),
    ("BertForQuestionAnswering", ["start_logits", "end_logits"]),
    ("GPT2LMHeadModel", ["logits"]),
])
def test_padded_to_a_bucket_equals_eager(name, outs):
    torch.manual_seed(0)
    model = getattr(M, name)(gpt2_cfg() if name.startswith("GPT2") else bert_cfg(2 if "Question" in name else 3)).eval()
    names = ("input_ids", "attention_mask") if name.startswith("GPT2") else ("input_ids", "attention_mask",
                                                                              "token_type_ids")
    runner, _ = runner_for(model, input_names=names)
    ids, mask, types = padded_batch(vocab=VOCAB, seq=11)  # (3, 11) -> bucket (4, 16)
    kw = dict(input_ids=ids, attention_mask=mask)
    if "token_type_ids" in names:
        kw["token_type_ids"] = types
    with torch.no_grad():
        ref = model(**kw)
    out = runner(**kw)
    assert runner.last_bucket == (4, 16)
    keep = mask.bool()
    for field in outs:
        a, r = getattr(out, field), getattr(ref, field)
        assert a.shape == r.shape, field
        if a.dim() >= 2 and a.shape[:2] == keep.shape:
            a, r = a[keep], r[keep]  # padded positions of the caller's own batch are not compared
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_no_mask_given_and_a_second_call_leaves_no_trace():
    torch.manual_seed(1)
    model = M.BertModel(bert_cfg()).eval()
    runner, _ = runner_for(model)
    ids = torch.randint(0, VOCAB, (4, 16))
    runner(ids)  # fills the whole (4, 16) bucket
    small = ids[:1, :5]
    with torch.no_grad():
        ref = model(small).last_hidden_state
    out = runner(small)
    assert runner.last_bucket == (2, 8)
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    again = runner(ids[:1, :3])  # shorter input in the same bucket: earlier tokens are padding again
    with torch.no_grad():
        torch.testing.assert_close(again.last_hidden_state, model(ids[:1, :3]).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_outputs_are_copies_unless_asked_otherwise():
    model = M.BertModel(bert_cfg()).eval()
    ids = torch.randint(0, VOCAB, (2, 8))
    runner, _ = runner_for(model)
    assert runner(ids).last_hidden_state._base is None
    runner, _ = runner_for(model, clone_outputs=False)
    assert runner(ids[:1]).last_hidden_state._base is not None  # a view of the static output


def test_other_shapes_run_eagerly():
    torch.manual_seed(2)
    model = M.BertModel(bert_cfg()).eval()
    runner, _ = runner_for(model)
    ids = torch.randint(0, VOCAB, (9, 5))
    out = runner(ids)
    assert runner.last_bucket is None
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, model(ids).last_hidden_state)


def test_refusals_are_named():
    model = M.BertModel(bert_cfg()).eval()
    with pytest.raises(ValueError, match="needs a model on a CUDA device, got cpu"):
        CUDAGraphRunner(model, BUCKETS)
    with pytest.raises(ValueError, match="eval mode"):
        CUDAGraphRunner(M.BertModel(bert_cfg()), BUCKETS, capture=lambda fn: fn)
    with pytest.raises(ValueError, match="unpad=True cannot be captured"):
        CUDAGraphRunner(M.BertModel(bert_cfg(), unpad=True).eval(), BUCKETS, capture=lambda fn: fn)
    with pytest.raises(ValueError, match=r"buckets must be \(batch, length\) pairs of positive ints, got \(0, 8\)"):
        CUDAGraphRunner(model, [(0, 8)], capture=lambda fn: fn)
    with pytest.raises(ValueError, match="at least one"):
        CUDAGraphRunner(model, [], capture=lambda fn: fn)
    with pytest.raises(ValueError, match="input_names must include 'input_ids'"):
        CUDAGraphRunner(model, BUCKETS, input_names=("labels",), capture=lambda fn: fn)
    runner, _ = runner_for(model)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_type_ids not among the captured inputs \('input_ids', 'attention_mask'\)"):
        runner(ids, token_type_ids=ids)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        runner(ids, attention_mask=torch.ones(2, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["BertModel", "GPT2LMHeadModel"])
def test_captured_graphs_equal_eager_on_a_gpu(name):
    torch.manual_seed(0)
    model = getattr(M, name)(gpt2_cfg() if name.startswith("GPT2") else bert_cfg()).cuda().eval()
    runner = CUDAGraphRunner(model, [(2, 8), (4, 16)])
    field = "logits" if name.startswith("GPT2") else "last_hidden_state"
    for seq, batch in [(11, 3), (8, 2), (5, 1), (33, 3)]:  # the last one fits no bucket: eager
        ids, mask, _ = (t.cuda() for t in padded_batch(vocab=VOCAB, seq=seq, batch=batch))
        out = getattr(runner(ids, attention_mask=mask), field)
        with torch.no_grad():
            ref = getattr(model(ids, attention_mask=mask), field)
        keep = mask.bool()
        # Same kernels both ways; only the bucket's extra (masked) keys and rows differ, and a
        # different batch may pick another matmul tiling: far below a padding error (O(1)).
        torch.testing.assert_close(out[keep], ref[keep], atol=1e-4, rtol=1e-4)
    assert runner.last_bucket is None


@pytest.mark.parametrize("name", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_the_captured_call_reads_nothing_back_to_the_host(name, monkeypatch):
    """A read of a tensor value back to the host aborts a CUDA graph capture. Emulated on the
    CPU: during the stand-in capture the capture query answers True and reads raise."""
    model = getattr(M, name)(gpt2_cfg() if name.startswith("GPT2") else bert_cfg()).eval()

    def no_host_read(self, *args):
        raise RuntimeError("operation not permitted when stream is capturing")

    def capture(fn):
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", lambda: True)
            m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            for method in ("__int__", "__index__", "__bool__", "__float__", "item", "tolist", "nonzero"):
                m.setattr(torch.Tensor, method, no_host_read)
            fn()
        return fn

    runner = CUDAGraphRunner(model, BUCKETS, capture=capture)
    assert runner(torch.randint(0, VOCAB, (3, 9))).logits.shape == (3, 9, VOCAB)


# ----------------------------------------------------------------------------- CUDAGraphTrainStep


def graph_capture(params, log):
    """Stand-in for capture_cuda_graph with a graph's memory semantics, on the CPU: the captured
    call's outputs and the gradients it left are static tensors that every replay writes again
    (the replay reruns the call and copies its results into them)."""
    def capture(fn):
        log.append(fn)
        out = fn()
        grads = [p.grad for p in params]

        def replay():
            before = [p.grad for p in params]  # a replay runs no Python: .grad stays as it was
            new = fn()
            for g, p, b in zip(grads, params, before):
                if g is not None:
                    g.copy_(p.grad)
                p.grad = b
            return out.copy_(new)
        return replay
    return capture


def _train_model(name):
    torch.manual_seed(0)
    cfg = gpt2_cfg() if name.startswith("GPT2") else bert_cfg()
    for field in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(cfg, field):
            setattr(cfg, field, 0.0)  # deterministic steps: the eager reference must draw nothing
    return getattr(M, name)(cfg).double().train()


def _eager_grads(model, **inputs):
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_train_step_padded_to_a_bucket_gives_the_eager_loss_and_gradients(name):
    model = _train_model(name)
    names = ("input_ids", "attention_mask", "labels") + (() if name.startswith("GPT2") else ("token_type_ids",))
    log = []
    step = M.CUDAGraphTrainStep(model, BUCKETS, input_names=names,
                                capture=graph_capture([p for p in model.parameters() if p.requires_grad], log))
    assert len(log) == 3 and all(p.grad is None for p in model.parameters())  # nothing left of the captures
    for seq in (11, 7):  # two batches through one bucket (4, 16): the second's gradients replace the first's
        ids, mask, types = padded_batch(vocab=VOCAB, seq=seq)
        labels = ids.masked_fill(mask == 0, -100) if name.startswith("GPT2") else \
            torch.where(torch.rand(ids.shape, generator=torch.Generator().manual_seed(seq)) < 0.4, ids, -100)
        extra = {} if name.startswith("GPT2") else {"token_type_ids": types}
        loss = step(input_ids=ids, attention_mask=mask, labels=labels, **extra)
        assert step.last_bucket == (4, 16)
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        ref_loss, ref = _eager_grads(model, input_ids=ids, attention_mask=mask, labels=labels, **extra)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
        assert got.keys() == ref.keys() and len(got) > 10
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
        # the loss is a tensor of its own; zero_grad(set_to_none=True) between steps is fine
        assert loss.data_ptr() != step._graphs[(4, 16)][1]().data_ptr()
        model.zero_grad(set_to_none=True)


def test_train_step_eager_fallback_and_refusals():
    model = _train_model("BertForMaskedLM")
    params = [p for p in model.parameters() if p.requires_grad]
    step = M.CUDAGraphTrainStep(model, [(2, 8)], capture=graph_capture(params, []))
    ids, mask, _ = padded_batch(vocab=VOCAB, seq=11)  # (3, 11): no bucket holds it
    labels = ids.masked_fill(mask == 0, -100)
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # stale gradients: replaced, not added to
    loss = step(input_ids=ids, attention_mask=mask, labels=labels)
    assert step.last_bucket is None
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_loss, ref = _eager_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(loss, ref_loss)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n])
    with pytest.raises(ValueError, match="labels are required"):
        step(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        step(input_ids=ids, attention_mask=mask, labels=labels[:, :4])
    with pytest.raises(ValueError, match="token_type_ids not among the captured inputs"):
        step(input_ids=ids, labels=labels, token_type_ids=ids)
    with pytest.raises(ValueError, match="training mode"):
        M.CUDAGraphTrainStep(model.eval(), BUCKETS, capture=lambda fn: fn)
    with pytest.raises(ValueError, match="input_names must include 'labels'"):
        M.CUDAGraphTrainStep(model.train(), BUCKETS, input_names=("input_ids",), capture=lambda fn: fn)
    with pytest.raises(ValueError, match="unpad=True"):
        M.CUDAGraphTrainStep(M.BertForMaskedLM(bert_cfg(), unpad=True).train(), BUCKETS, capture=lambda fn: fn)
    class NoLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask=None, labels=None):
            return types.SimpleNamespace(loss=None)

    with pytest.raises(ValueError, match="NoLoss returned no loss given labels"):
        M.CUDAGraphTrainStep(NoLoss(), BUCKETS, capture=lambda fn: fn())
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        M.CUDAGraphTrainStep(model, BUCKETS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_captured_train_step_equals_eager_on_a_gpu(name):
    """The real capture: losses and gradients of padded replays against eager steps on the
    same batches (no dropout), the model's parameters untouched by the capture, nothing read
    back to the host (the capture would fail), and dropout drawing fresh masks per replay."""
    model = _train_model(name).float().cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = M.CUDAGraphTrainStep(model, [(2, 8), (4, 16)])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for seq, batch in [(11, 3), (8, 2), (33, 3)]:  # the last one fits no bucket: eager
        ids, mask, _ = (t.cuda() for t in padded_batch(vocab=VOCAB, seq=seq, batch=batch))
        labels = ids.masked_fill(mask == 0, -100)
        loss = step(input_ids=ids, attention_mask=mask, labels=labels)
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        ref_loss, ref = _eager_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-4, rtol=1e-3, msg=lambda m, n=n: f"{n}: {m}")
    assert step.last_bucket is None
    dropout = getattr(M, name)(gpt2_cfg() if name.startswith("GPT2") else bert_cfg()).cuda().train()
    step = M.CUDAGraphTrainStep(dropout, [(2, 8)])
    ids = torch.randint(5, VOCAB, (2, 8), device="cuda")
    losses = {step(input_ids=ids, labels=ids).item() for _ in range(3)}
    assert len(losses) == 3  # a new dropout pattern every replay
