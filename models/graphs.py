"""CUDA graphs: capture a model once per static (batch, length) bucket and replay it, so a call
costs one graph launch instead of a Python call and a kernel launch per op.

    runner = CUDAGraphRunner(model.eval().cuda(), buckets=[(8, 128), (32, 128), (8, 512)])
    out = runner(input_ids=ids, attention_mask=mask)    # same output object as model(...)

    step = CUDAGraphTrainStep(model.train().cuda(), buckets=[(32, 128)])
    loss = step(input_ids=ids, attention_mask=mask, labels=labels)   # forward + backward
    optimizer.step()                                     # the parameters' .grad are this batch's

An input of shape (B, L) runs in the smallest bucket with at least B rows and L tokens: it is
copied into the bucket's static buffers, the rest is padding (pad tokens with attention_mask
0, labels -100; the extra rows attend to one pad token of their own, so no row is fully
masked), and the outputs are sliced back to (B, L). Padded keys are masked out and padded
labels ignored, so the real tokens' results, a training step's loss and gradients included,
are those of the unpadded call (up to the different summation order of a longer row; dropout
draws other masks for another shape). Inputs that fit no bucket, or live on another device,
run the model eagerly.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from .pretraining import IGNORE_INDEX  # the label padding gets: no loss

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_TRAIN_INPUTS = _INPUTS + ("labels",)
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


def _fill(static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], pad_token_id: int) -> None:
    """Copy a (B, L) input into a bucket's static buffers and pad the rest (module docstring)."""
    B, L = inputs["input_ids"].shape
    ids, mask = static["input_ids"], static["attention_mask"]
    ids.fill_(pad_token_id)
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
    if "labels" in static:
        static["labels"].fill_(IGNORE_INDEX)[:B, :L].copy_(inputs["labels"])


def _check_inputs(inputs: dict, names: tuple[str, ...]) -> torch.Tensor:
    """input_ids, after refusing inputs the graphs do not take or of another shape."""
    extra = sorted(k for k, v in inputs.items() if v is not None and k not in names)
    if extra:
        raise ValueError(f"{', '.join(extra)} not among the captured inputs {names} "
                         "(pass input_names= to the runner, or call the model itself)")
    input_ids = inputs["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, "
                         f"got {getattr(input_ids, 'shape', type(input_ids))}")
    for name, value in inputs.items():
        if value is not None and (not isinstance(value, torch.Tensor) or value.shape != input_ids.shape):
            raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {getattr(value, 'shape', type(value))}")
    return input_ids


def _check_model(model, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(getattr(m, "unpad", False) for m in model.modules()):
        raise ValueError(f"a model built with unpad=True cannot be captured (its packed length depends on the "
                         f"mask's values); build it with unpad=False: {who} pads to static buckets instead")


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


class _Bucketed:
    """What both graph classes share: the checks, the buckets, each bucket's static inputs,
    the capture, and the choice of bucket for a call."""

    def __init__(self, model, buckets, names, allowed, pad_token_id, warmup, capture, who):
        _check_model(model, who)
        taken = set(names) | {"attention_mask"}
        if "input_ids" not in taken or not taken <= set(allowed):
            raise ValueError(f"input_names must include 'input_ids' and be among {allowed}, got {tuple(names)}")
        self.model, self.buckets = model, _check_buckets(buckets)
        self.input_names = tuple(n for n in allowed if n in taken)
        self.device = next(model.parameters()).device
        if capture is None:
            if self.device.type != "cuda":
                raise ValueError(f"{type(self).__name__} needs a model on a CUDA device, got {self.device}")
            # One memory pool for all buckets, captured largest first: a smaller graph reuses
            # the larger one's intermediates (dead between replays); outputs stay alive.
            pool = torch.cuda.graph_pool_handle()
            capture = lambda fn, warm=None: capture_cuda_graph(fn, pool, warmup, warm)  # noqa: E731
        self._capture = capture
        config = getattr(model, "config", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None) or 0
        self.pad_token_id = pad_token_id
        self.last_bucket: tuple[int, int] | None = None  # the bucket of the last call, None = eager

    def _static(self, bucket: tuple[int, int]) -> dict[str, torch.Tensor]:
        """A bucket's static input buffers, all padding (valid ids, no label)."""
        static = {n: torch.zeros(bucket, dtype=torch.long, device=self.device) for n in self.input_names}
        nothing = static["input_ids"][:0, :0]
        _fill(static, {"input_ids": nothing, "labels": nothing}, self.pad_token_id)
        return static

    def bucket_for(self, batch: int, length: int) -> tuple[int, int] | None:
        """The smallest bucket (fewest padded tokens) that holds a (batch, length) input."""
        for b in self.buckets:  # sorted by size
            if b[0] >= batch and b[1] >= length:
                return b
        return None

    def _bucket_of(self, inputs: dict) -> tuple[int, int] | None:
        """The checked call's bucket, None for an eager call (also kept in last_bucket)."""
        input_ids = _check_inputs(inputs, self.input_names)
        B, L = input_ids.shape
        self.last_bucket = self.bucket_for(B, L) if input_ids.device == self.device and B * L > 0 else None
        return self.last_bucket

    def _fill(self, static: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> None:
        _fill(static, inputs, self.pad_token_id)


class CUDAGraphRunner(_Bucketed):
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
        super().__init__(model, buckets, input_names, _INPUTS, pad_token_id, warmup, capture, "the runner")
        if model.training:
            raise ValueError("model must be in eval mode (model.eval()): the runner runs inference without "
                             "gradients (CUDAGraphTrainStep captures a training step)")
        self.clone_outputs = clone_outputs
        self._graphs = {}
        for bucket in reversed(self.buckets):
            static = self._static(bucket)

            def call(static=static):
                with torch.no_grad():
                    return model(**static)

            self._graphs[bucket] = (static, self._capture(call))

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
        bucket = self._bucket_of(inputs)
        if bucket is None:
            with torch.no_grad():
                return self.model(**{k: v for k, v in inputs.items() if v is not None})
        static, replay = self._graphs[bucket]
        self._fill(static, inputs)
        out = replay()
        B, L = input_ids.shape
        return type(out)(**{k: self._cut(k, getattr(out, k), B, L) for k in out.keys()})


class CUDAGraphTrainStep(_Bucketed):
    """One training step's forward and backward (a model with token-level labels: the MLM and
    causal-LM models), replayed from CUDA graphs captured per bucket. A call returns the
    loss (a tensor of its own) and leaves this batch's gradients in the parameters' .grad,
    for the optimizer to step on eagerly:

        step = CUDAGraphTrainStep(model.train().cuda(), buckets=[(32, 128)])
        for batch in loader:
            loss = step(**batch)   # input_ids, attention_mask, labels (and token_type_ids)
            optimizer.step()
            optimizer.zero_grad()

    Why: an eager step of our fused models is bound by its host time on the GPU machines this
    project measures (H200, a3eeca9: BERT-base bf16 B32 L128 MLM, 30.2 ms eagerly against 7.6
    ms with the same step in a CUDA graph; Hugging Face sdpa 20.8). A replay is one launch.

    What differs from an eager step:
    - Each call's gradients replace the ones before (as after zero_grad): the backward was
      captured with every .grad None, so it writes the gradients into tensors of its own,
      and a call points each parameter's .grad at them again. No accumulation over calls:
      for gradient accumulation, add .grad into buffers of your own between calls.
    - Each bucket keeps a set of gradients of its own (the parameters' size again per bucket).
    - Dropout draws fresh masks every replay (torch's generator is graph-safe); padding
      (module docstring) makes them other masks than an unpadded eager call's.
    - Capturing runs `warmup` eager steps per bucket first, on padding only (no label: no loss
      term, the gradients are dropped); parameters are not changed (no optimizer step).
    An input that fits no bucket runs eagerly, with the same semantics (its gradients replace
    the ones before). The model must be in training mode, on a CUDA device, built with
    unpad=False, and must return its loss given labels. capture, pad_token_id, warmup: as
    CUDAGraphRunner's.
    """

    def __init__(self, model: nn.Module, buckets: Iterable[tuple[int, int]], *,
                 input_names: Iterable[str] = ("input_ids", "attention_mask", "labels"),
                 pad_token_id: int | None = None, warmup: int = 3, capture: Callable | None = None):
        super().__init__(model, buckets, input_names, _TRAIN_INPUTS, pad_token_id, warmup, capture,
                         "CUDAGraphTrainStep")
        if "labels" not in self.input_names:
            raise ValueError(f"input_names must include 'labels' (the loss is what a step computes), "
                             f"got {tuple(input_names)}")
        if not model.training:
            raise ValueError("model must be in training mode (model.train()): CUDAGraphTrainStep captures a "
                             "training step (CUDAGraphRunner captures inference)")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no parameter that requires grad: nothing for a training step to compute")
        custom = capture is not None
        self._graphs = {}
        for bucket in reversed(self.buckets):
            static = self._static(bucket)
            step = lambda static=static: self._step(static)  # noqa: E731
            # The warm-up steps drop their gradients after them, so that the capture starts
            # with none (its backward then writes tensors of its own) and frees nothing.
            replay = self._capture(step) if custom else self._capture(step, lambda s=step: (s(), self._drop_grads()))
            # The gradients the captured backward writes (None: a parameter it does not reach).
            self._graphs[bucket] = (static, replay, [p.grad for p in self.params])
        self._drop_grads()

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _step(self, inputs: dict) -> torch.Tensor:
        """Forward and backward from no gradient; the loss, detached."""
        self._drop_grads()
        loss = self.model(**inputs).loss
        if loss is None:
            raise ValueError(f"{type(self.model).__name__} returned no loss given labels: CUDAGraphTrainStep needs "
                             "a model that computes its loss (BertForMaskedLM, GPT2LMHeadModel, ...)")
        loss.backward()
        return loss.detach()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if labels is None:
            raise ValueError("labels are required: a training step computes the loss on them")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **kwargs}
        bucket = self._bucket_of(inputs)
        if bucket is None:
            return self._step({k: v for k, v in inputs.items() if v is not None})
        static, replay, grads = self._graphs[bucket]
        self._fill(static, inputs)
        loss = replay().clone()
        for p, g in zip(self.params, grads):
            if p.grad is not g:
                p.grad = g
        return loss


__all__ = ["CUDAGraphRunner", "CUDAGraphTrainStep", "capture_cuda_graph"]
