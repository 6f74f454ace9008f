"""The eager call path (issue: eager speed): launchers reached without the torch.library
dispatcher, no host-device synchronisation, and the `overhead` benchmark group that keeps
its host cost measurable on a CPU."""
import importlib

import pytest
import torch

from fuseformer import kernels as K
from fuseformer.bench import overhead
from fuseformer.kernels import _util

aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
lg = importlib.import_module("fuseformer.kernels.linear_gelu")
attn = importlib.import_module("fuseformer.kernels.attention")
varlen = importlib.import_module("fuseformer.kernels.varlen_attention")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _forbid(*_args, **_kwargs):
    raise AssertionError("an eager call went through the torch.library custom op")


@pytest.mark.parametrize("grad", [False, True])
def test_eager_calls_never_enter_the_custom_ops(monkeypatch, grad):
    # The custom ops are torch.compile's path; eager calls run the same launchers directly.
    for module, name in ((aln, "_add_ln_op"), (aln, "_add_ln_prenorm_op"), (aln, "_add_ln_train_op"),
                         (aln, "_ln_train_op"), (aln, "_add_ln_bwd_op"), (lg, "_linear_gelu_op"),
                         (lg, "_linear_gelu_train_op"), (lg, "_linear_gelu_bwd_op"), (attn, "attention_fwd"),
                         (attn, "attention_bwd"), (varlen, "varlen_attention_fwd"), (varlen, "varlen_attention_bwd")):
        monkeypatch.setattr(module, name, _forbid)
    x = torch.randn(6, 16, device=DEVICE, requires_grad=grad)
    w = torch.randn(16, device=DEVICE, requires_grad=grad)
    fc = torch.randn(24, 16, device=DEVICE, requires_grad=grad)
    q = torch.randn(2, 2, 6, 16, device=DEVICE, requires_grad=grad)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    outs = [
        K.add_layer_norm(x, x, w, w, backend="triton"),
        K.linear_gelu(x, fc, backend="triton"),
        K.scaled_dot_product_attention(q, q, q, is_causal=True, backend="triton"),
        K.varlen_attention(x.view(6, 1, 16), x.view(6, 1, 16), x.view(6, 1, 16), cu, cu, 4, 4, backend="triton"),
    ]
    if grad:
        sum(o.float().sum() for o in outs).backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, w, fc, q))


def test_stubbed_launches_run_no_kernel():
    # The overhead group on a CPU replaces every Triton launch with a no-op: with outputs
    # poisoned, an op under the stub returns NaN (nothing wrote it), and a real one does not.
    x = torch.randn(4, 8, device=DEVICE)
    with _util.poison_outputs():
        with overhead.stubbed_launches():
            stubbed = K.add_layer_norm(x, None, None, None, backend="triton")
        real = K.add_layer_norm(x, None, None, None, backend="triton")
    assert torch.isnan(stubbed).all()
    assert torch.isfinite(real).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the group (launches stubbed)")
def test_stubbed_cross_entropy_reads_a_written_label_flag(monkeypatch):
    # cross_entropy's reducing kernel has a stand-in under the stub that writes its label flag:
    # a valid call never falls into the search for a bad label, as a real one does not.
    ce = importlib.import_module("fuseformer.kernels.cross_entropy")

    def searched(*args):
        raise AssertionError("the stubbed call searched for a bad label")

    monkeypatch.setattr(ce, "_bad_labels", searched)
    # Outputs zeroed: a flag left unwritten reads "a bad label" (poisoned, NaN would not).
    monkeypatch.setattr(ce, "new_output", lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
    with overhead.stubbed_launches():
        K.cross_entropy(torch.randn(3, 7), torch.tensor([0, -100, 6]), backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the group (launches stubbed)")
def test_overhead_group_measures_every_op_on_cpu():
    rows = overhead.measure_ops(torch.device("cpu"), torch.float32, calls=2, repeats=1)
    names = {r["case"] for r in rows}
    for op in ("attention_pad", "attention_causal", "add_layer_norm", "linear_gelu"):
        assert {f"{op}_fwd", f"{op}_fwd+bwd"} <= names
    for r in rows:
        assert r["launch"] == "stubbed" and r["ours_us"] > 0 and r["torch_us"] > 0
        assert r["ratio"] == pytest.approx(r["ours_us"] / r["torch_us"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form of the group")
def test_overhead_through_tritons_launch_path_on_cpu():
    """The CPU's second overhead table: a child process without the interpreter runs the calls
    through Triton's launch path with the stand-in driver, Triton's JITFunction.run and the
    fast launch in the same rounds (add+LN only here: three compiles)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fuseformer.bench.overhead", "--offline-child", "--quick",
                           "--only", "add_layer_norm"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    rows = doc["rows"]
    assert [r["case"] for r in rows] == ["add_layer_norm_fwd", "add_layer_norm_fwd+bwd"]
    for r in rows:
        assert r["launch"] == "offline" and r["ours_us"] > 0 and r["ours_fast_launch_us"] > 0 and r["torch_us"] > 0


def test_poisoning_is_read_once_not_per_call(monkeypatch):
    # The environment is read at import; changing it later must not cost (or change) a call.
    monkeypatch.setenv("FUSEFORMER_POISON", "1")
    monkeypatch.setattr(_util, "_POISON", False)
    assert not _util.poison_enabled()
    with _util.poison_outputs():
        assert torch.isnan(_util.new_output((3,), torch.float32, "cpu")).all()
    assert not _util.poison_enabled()


@pytest.mark.gpu
def test_no_host_device_sync_in_eager_ops():
    """torch raises on any synchronising CUDA call in "error" mode: none may happen in an
    eager forward or backward of our ops (the models' own check is in test_models_api.py)."""
    x = torch.randn(64, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fc = torch.randn(160, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q = torch.randn(2, 3, 70, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pad = torch.ones(2, 1, 1, 40, dtype=torch.bool, device="cuda")
    pad[1, ..., 30:] = False
    packed = torch.randn(64, 2, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32, device="cuda")

    def step():
        loss = K.add_layer_norm(x, x, w, w, dropout_p=0.1).float().sum()
        loss = loss + K.linear_gelu(x, fc).float().sum()
        loss = loss + K.scaled_dot_product_attention(q, q[:, :, :40], q[:, :, :40], attn_mask=pad,
                                                     dropout_p=0.1).float().sum()
        loss = loss + K.varlen_attention(packed, packed, packed, cu, cu, 44, 44, is_causal=True).float().sum()
        loss.backward()

    for _ in range(2):  # warm-up: autotuning, compiles and the one check of cu's offsets may synchronise
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_bert_under_compile_reduce_overhead_matches_eager():
    """torch.compile(model, mode="reduce-overhead", fullgraph=True): our custom ops inside
    torch's own CUDA-graph trees, no graph break, the eager model's outputs."""
    from fuseformer.models import BertConfig, BertModel

    torch._dynamo.reset()
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     vocab_size=500, max_position_embeddings=64)
    model = BertModel(cfg).cuda().half().eval()
    ids = torch.randint(5, 500, (4, 48), device="cuda")
    mask = torch.ones(4, 48, dtype=torch.long, device="cuda")
    mask[2, 30:] = 0
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for _ in range(3):  # the first calls record; later ones replay the graph
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state.clone()
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], rtol=2e-3, atol=2e-3)
