"""CUDAGraphRunner: bucket choice, padding, slicing back and the eager fallback, checked on
the CPU with an eager stand-in for the capture; the real capture against eager on a GPU."""
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
