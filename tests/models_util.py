"""Helpers shared by tests/test_models_*.py: build a transformers twin, run both sides, and
compare by the parity rule (kernels/parity.py) at the positions that exist."""
from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the network

import torch

from fuseformer.kernels.parity import assert_parity

VOCAB, SEQ, BATCH = 1000, 17, 3


def padded_batch(vocab=VOCAB, batch=BATCH, seq=SEQ, types=2, seed=0):
    """Random ids with right padding of different lengths (one row unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = [seq, seq - 7, 3][:batch]
    for r, n in enumerate(lengths):
        mask[r, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    token_types = torch.randint(0, types, (batch, seq), generator=g) * mask
    return ids, mask, token_types


def where_for(t: torch.Tensor, mask: torch.Tensor):
    """Positions to compare: drop padded tokens for per-token outputs."""
    if t.dim() >= 2 and t.shape[:2] == mask.shape:
        return mask.bool().reshape(*mask.shape, *([1] * (t.dim() - 2)))
    return None


def compare_outputs(impl, ref64, torch_d, names, mask, dtype):
    """assert_parity for each named output; returns how many tensors were compared."""
    n = 0
    for name in names:
        a, r, t = getattr(impl, name), getattr(ref64, name), getattr(torch_d, name)
        assert a is not None and r is not None, name
        assert_parity(a.detach(), r.detach(), t.detach(), dtype, where_for(r, mask), what=name)
        n += 1
    return n


def check_against_hf(hf64, build, inputs, names, mask):
    """`build(hf_model)` makes the model under test from a transformers model. Checked twice:
    built from the float64 twin (bound: the float64 floor) and from a float32 copy against
    float64 transformers with float32 transformers' own error as the yardstick."""
    hf64.eval()
    hf32 = copy.deepcopy(hf64).float().eval()
    with torch.no_grad():
        ref64 = hf64(**inputs)
        ours64 = build(copy.deepcopy(hf64))(**inputs)
        compare_outputs(ours64, ref64, ref64, names, mask, torch.float64)
        t32 = hf32(**inputs)
        ours32 = build(copy.deepcopy(hf32))(**inputs)
        assert all(getattr(ours32, n).dtype == torch.float32 for n in names)
        compare_outputs(ours32, ref64, t32, names, mask, torch.float32)
