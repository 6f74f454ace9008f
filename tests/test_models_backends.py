"""The models on the `triton` backend (Triton's interpreter on the CPU, real kernels on a GPU):
forward outputs by the parity rule against float64 transformers, padded and unpadded
(varlen), through patch_hf, and GPT-2's cached decoding. Tiny shapes: the interpreter is slow."""
import copy

import pytest
import torch

from models_util import compare_outputs, padded_batch

import fuseformer.models as M
from fuseformer import kernels as K

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(K.unavailable_reason("triton") is not None, reason=str(K.unavailable_reason("triton")))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bert_config():
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=48, max_position_embeddings=16)


def twin_outputs(hf64, kw):
    hf32 = copy.deepcopy(hf64).float()
    with torch.no_grad():
        return hf64(**kw), hf32(**kw), hf32


def on(kw, device=DEVICE):
    return {k: v.to(device) for k, v in kw.items()}


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "varlen"])
def test_bert_on_triton_matches_transformers(unpad):
    torch.manual_seed(0)
    hf64 = transformers.BertModel(bert_config()).double().eval()
    ids, mask, types = padded_batch(vocab=100, seq=11)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref64, t32, hf32 = twin_outputs(hf64, kw)
    ours = M.BertModel.from_hf(hf32, backend="triton", unpad=unpad).to(DEVICE)
    assert ours.encoder.layer[0].attn.backend == "triton"
    with torch.no_grad():
        out = ours(**on(kw))
    out = type(out)(*(t.cpu() if torch.is_tensor(t) else t for t in out.__dict__.values()))
    compare_outputs(out, ref64, t32, ["last_hidden_state", "pooler_output"], mask, torch.float32)


def test_patch_hf_on_triton_matches_transformers():
    torch.manual_seed(1)
    hf64 = transformers.BertForSequenceClassification(bert_config()).double().eval()
    ids, mask, types = padded_batch(vocab=100, seq=11)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref64, t32, hf32 = twin_outputs(hf64, kw)
    patched = M.patch_hf(copy.deepcopy(hf32), backend="triton").to(DEVICE)
    with torch.no_grad():
        logits = patched(**on(kw)).logits.cpu()
    from fuseformer.kernels.parity import assert_parity

    assert_parity(logits, ref64.logits, t32.logits, torch.float32, what="logits")


def test_gpt2_cached_decoding_on_triton():
    torch.manual_seed(2)
    cfg = M.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    ref = M.GPT2LMHeadModel(cfg, backend="torch").eval()
    fused = copy.deepcopy(ref).set_backend("triton").to(DEVICE)
    prompt = torch.randint(0, 100, (2, 4))
    a = ref.generate(prompt, max_new_tokens=5)
    b = fused.generate(prompt.to(DEVICE), max_new_tokens=5).cpu()
    assert torch.equal(a, b)
