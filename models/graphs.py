"""CUDA graphs for inference: capture a model once per static (batch, length) bucket and
replay it, so a forward costs one graph launch instead of a Python call and a kernel launch
per op.

    runner = CUDAGraphRunner(model.eval().cuda(), buckets=[(8, 128), (32, 128), (8, 512)])
    out = runner(input_ids=ids, attention_mask=mask)    # same output object as model(...)

An input of shape (B, L) runs in the smallest bucket with at least B rows and L tokens: it is
copied into the bucket's static buffers, the rest is padding (pad tokens with attention_mask
0; the extra rows attend to one pad token of their own, so no row is fully masked), and the
outputs are sliced back to (B, L). Padded keys are masked out, so the real tokens' results
are those of the unpadded call (up to the different summation order of a longer row). Inputs
that fit no bucket, or live on another device, run the model eagerly.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Outputs whose second dimension is the sequence (sliced back to L); other outputs are per row.
_PER_TOKEN = {"last_hidden_state", "hidden_states", "prediction_logits", "start_logits", "end_logits"}


def capture_cuda_graph(fn: Callable[[], object], pool=None, warmup: int = 3,
                       warm: Callable[[], object] | None = None) -> Callable[[], object]:
    """Run `fn` (or `warm`, which must launch what fn does) `warmup` times on a side stream
    (autotuning, lazy allocations and cuBLAS workspaces happen outside the graph), capture one
    call of fn, and return `replay()` -> the captured call's (static) outputs. `warm` is for
    a fn that changes state a warm-up must start from again (a decoding step's slot)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            (warm or fn)()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()

    def replay():
        graph.replay()
        return out

    replay.graph = graph
    return replay


def _check_buckets(buckets: Iterable) -> list[tuple[int, int]]:
    out = []
    for b in buckets:
        if (not isinstance(b, (tuple, list)) or len(b) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in b)):
            raise ValueError(f"buckets must be (batch, length) pairs of positive ints, got {b!r}")
        out.append((b[0], b[1]))
    if not out:
        raise ValueError("buckets must hold at least one (batch, length) pair")
    return sorted(set(out), key=lambda b: (b[0] * b[1], b[1]))


class CUDAGraphRunner:
    """Replays `model` (in eval mode, on a CUDA device) from CUDA graphs captured per bucket.

    buckets: (batch, length) shapes to capture. input_names: the keyword inputs the graphs
    take; attention_mask is always one of them (it masks the padding). pad_token_id: the
    token written into padding (default: the config's, else 0). clone_outputs=False returns
    views of the graph's static outputs, overwritten by the next call (no copy; for
    benchmarks). capture: how one bucket's call is captured (default capture_cuda_graph; the
    tests pass an eager stand-in to check bucketing and padding without a GPU).
    """

    def __init__(self, model: nn.Module, buckets: Iterable[tuple[int, int]], *,
                 input_names: Iterable[str] = ("input_ids", "attention_mask"), pad_token_id: int | None = None,
                 clone_outputs: bool = True, warmup: int = 3, capture: Callable | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if model.training:
            raise ValueError("model must be in eval mode (model.eval()): a CUDA graph replays one fixed "
                             "dropout pattern")
        if any(getattr(m, "unpad", False) for m in model.modules()):
            raise ValueError("a model built with unpad=True cannot be captured (its packed length depends on the "
                             "mask's values); build it with unpad=False: the runner pads to static buckets instead")
        names = set(input_names) | {"attention_mask"}
        if "input_ids" not in names or not names <= set(_INPUTS):
            raise ValueError(f"input_names must include 'input_ids' and be among {_INPUTS}, got {tuple(input_names)}")
        self.model, self.buckets = model, _check_buckets(buckets)
        self.input_names = tuple(n for n in _INPUTS if n in names)
        self.device = next(model.parameters()).device
        if capture is None:
            if self.device.type != "cuda":
                raise ValueError(f"CUDAGraphRunner needs a model on a CUDA device, got {self.device}")
            # One memory pool for all buckets, captured largest first: a smaller graph reuses
            # the larger one's intermediates (dead between replays); outputs stay alive.
            pool = torch.cuda.graph_pool_handle()
            capture = lambda fn: capture_cuda_graph(fn, pool, warmup)  # noqa: E731
        config = getattr(model, "config", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None) or 0
        self.pad_token_id, self.clone_outputs = pad_token_id, clone_outputs
        self.last_bucket: tuple[int, int] | None = None  # the bucket of the last call, None = eager
        self._graphs = {}
        for bucket in reversed(self.buckets):
            static = {n: torch.zeros(bucket, dtype=torch.long, device=self.device) for n in self.input_names}
            self._fill(static, {"input_ids": static["input_ids"][:0, :0]})  # all padding: valid ids

            def call(static=static):
                with torch.no_grad():
                    return model(**static)

            self._graphs[bucket] = (static, capture(call))

    def bucket_for(self, batch: int, length: int) -> tuple[int, int] | None:
        """The smallest bucket (fewest padded tokens) that holds a (batch, length) input."""
        for b in self.buckets:  # sorted by size
            if b[0] >= batch and b[1] >= length:
                return b
        return None

    def _fill(self, static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        B, L = inputs["input_ids"].shape
        ids, mask = static["input_ids"], static["attention_mask"]
        ids.fill_(self.pad_token_id)
        ids[:B, :L].copy_(inputs["input_ids"])
        mask.zero_()
        mask[:, 0] = 1  # padding rows attend to their first (pad) token: no fully masked row
        given = inputs.get("attention_mask")
        if given is None:
            mask[:B, :L].fill_(1)
        else:
            mask[:B, :L].copy_(given)
        if "token_type_ids" in static:
            types = static["token_type_ids"].zero_()
            if inputs.get("token_type_ids") is not None:
                types[:B, :L].copy_(inputs["token_type_ids"])

    def _cut(self, name: str, value, B: int, L: int):
        if value is None:
            return None
        if isinstance(value, tuple):
            return tuple(self._cut(name, v, B, L) for v in value)
        per_token = name in _PER_TOKEN or (name == "logits" and value.dim() == 3)
        value = value[:B, :L] if per_token else value[:B]
        return value.clone() if self.clone_outputs else value

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in self.input_names)
        if extra:
            raise ValueError(f"{', '.join(extra)} not among the captured inputs {self.input_names} "
                             "(pass input_names= to the runner, or call the model itself)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        for name, value in inputs.items():
            if value is not None and (not isinstance(value, torch.Tensor) or value.shape != input_ids.shape):
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, "
                                 f"got {getattr(value, 'shape', type(value))}")
        B, L = input_ids.shape
        bucket = self.bucket_for(B, L) if input_ids.device == self.device and B * L > 0 else None
        self.last_bucket = bucket
        if bucket is None:
            with torch.no_grad():
                return self.model(**{k: v for k, v in inputs.items() if v is not None})
        static, replay = self._graphs[bucket]
        self._fill(static, inputs)
        out = replay()
        return type(out)(**{k: self._cut(k, getattr(out, k), B, L) for k in out.keys()})


__all__ = ["CUDAGraphRunner", "capture_cuda_graph"]
