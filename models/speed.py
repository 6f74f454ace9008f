"""The CPU speed case: our BertModel (torch backend) vs transformers' BertModel (eager) on the
same weights, for the benchmark harness and for a quick check by hand:

    python -c "from fuseformer.models.speed import cpu_speed_case; print(cpu_speed_case())"
"""
from __future__ import annotations

import torch


def cpu_speed_case(batch: int = 8, seq: int = 128, layers: int = 4, hidden: int = 256, heads: int = 4,
                   pad_fraction: float = 0.3, min_run_time: float = 1.0, attn_implementation: str = "eager"):
    """Best forward time of ours and of transformers' on one padded batch, in seconds.

    Returns dict(ours_s, hf_s, speedup, max_abs_diff); needs transformers."""
    import time

    import transformers

    from .bert import BertModel

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=heads, intermediate_size=4 * hidden,
                                  attn_implementation=attn_implementation)
    hf = transformers.BertModel(cfg).eval()
    ours = BertModel.from_hf(hf, backend="torch").eval()
    ids = torch.randint(1000, 30000, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[: batch // 2, int(seq * (1 - pad_fraction)):] = 0  # half the rows padded

    def best_of(fn, budget):
        # Interleaved rounds, best time kept: on a shared CPU the minimum is the stable statistic.
        best, spent = float("inf"), 0.0
        while spent < budget or best == float("inf"):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best, spent = min(best, dt), spent + dt
        return best

    with torch.inference_mode():
        diff = ours(ids, mask).last_hidden_state - hf(input_ids=ids, attention_mask=mask).last_hidden_state
        diff = diff[mask.bool()].abs().max().item()
        t_ours = t_hf = float("inf")
        for _ in range(3):
            t_ours = min(t_ours, best_of(lambda: ours(ids, mask), min_run_time / 3))
            t_hf = min(t_hf, best_of(lambda: hf(input_ids=ids, attention_mask=mask), min_run_time / 3))
    return {"ours_s": t_ours, "hf_s": t_hf, "speedup": t_hf / t_ours, "max_abs_diff": diff,
            "attn_implementation": attn_implementation}


__all__ = ["cpu_speed_case"]
