"""Which backend each fused op of a model really ran.

A model on the `auto` backend falls back to `torch` where no fused backend can run an op,
with one warning per process (and the model cases silence warnings). Without this record, a
"fused" timing could be plain PyTorch and nobody would see it. It works through the public
API only. While a block runs, the public ops of fuseformer.kernels (which the models call as
`K.<op>`) are wrapped. For each call that was left to `auto`, the wrapper asks each fused
backend by name whether it runs those exact arguments. A backend named explicitly raises
BackendUnsupportedError rather than falling back, so the first one that does not raise is
what `auto` ran; if none runs them, it was `torch`.

The probe runs the op once more per call. Use it on one call of a model (the parity call),
never on a timed one. It stays off during CUDA-graph capture, which must not record it. A
block that runs as one fused node records the backends its plan resolved.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from fuseformer import kernels as K

# Public name -> the op name the backend registry uses.
OPS = {
    "scaled_dot_product_attention": "attention",
    "varlen_attention": "varlen_attention",
    "add_layer_norm": "add_layer_norm",
    "linear_gelu": "linear_gelu",
}
FUSED = ("triton", "cuda")


def _device(args, kwargs) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def _auto_order(op: str) -> tuple[str, ...]:
    from fuseformer.kernels import backends

    return tuple(getattr(backends, "AUTO_ORDER", {}).get(op, FUSED))


def _which(op: str, fn, args, kwargs) -> str:
    requested = (kwargs.get("backend") or K.get_backend()).lower()
    if requested != "auto":
        return requested  # by name: it ran, or the call raised
    device = _device(args, kwargs)
    if device is None or device.type != "cuda":
        return "torch"  # `auto` off CUDA is torch by definition
    if torch.cuda.is_current_stream_capturing():
        return "auto (not probed during CUDA-graph capture)"
    for candidate in _auto_order(op):
        try:
            fn(*args, **dict(kwargs, backend=candidate))
        except K.BackendUnsupportedError:
            continue
        return candidate
    return "torch"


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, dict[str, int]]]:
    """Yields {op: {backend that ran: number of calls}}, filled while the block runs."""
    seen: dict[str, dict[str, int]] = {}
    originals = {name: getattr(K, name) for name in OPS if hasattr(K, name)}

    def traced(name, fn):
        def call(*args, **kwargs):
            ran = _which(OPS[name], fn, args, kwargs)
            counts = seen.setdefault(OPS[name], {})
            counts[ran] = counts.get(ran, 0) + 1
            return fn(*args, **kwargs)

        return call

    from fuseformer.models import fused_block

    block_run = fused_block.run

    def block(x, residual, mask4, params, cfg, names, *rest):
        # A block as one fused node (models/fused_block.py) calls no public op: its
        # plan names the backend of each of its ops (resolved as the public ops resolve them;
        # a block with an op on torch takes the per-op path, which the wrappers above see).
        for op, ran in zip(("attention", "add_layer_norm", "linear_gelu", "add_layer_norm"), names):
            counts = seen.setdefault(op, {})
            counts[ran] = counts.get(ran, 0) + 1
        return block_run(x, residual, mask4, params, cfg, names, *rest)

    for name, fn in originals.items():
        setattr(K, name, traced(name, fn))
    fused_block.run = block
    try:
        yield seen
    finally:
        for name, fn in originals.items():
            setattr(K, name, fn)
        fused_block.run = block_run


def summary(seen: dict[str, dict[str, int]], fused: bool) -> str | None:
    """A one-line warning when a fused implementation did not run fused ops only, else None."""
    if fused and not seen:
        return "no call of a fused op was seen: this ran PyTorch only"
    fallbacks = sorted(op for op, counts in seen.items() if "torch" in counts)
    if fused and fallbacks:
        return "fell back to torch for: " + ", ".join(fallbacks)
    return None


def tuned_keys() -> set:
    """The (autotuner, key) pairs tuned so far in this process (kernels/_util.py keeps each
    winner, so a key is tuned once per process: by the first case and implementation that
    reaches it)."""
    from fuseformer.kernels import _util

    return set(_util._tuned_configs)


def tuned_since(before: set) -> list[dict]:
    """What the autotuners chose for each key tuned after `before` (tuned_keys()): the kernel,
    the key, the winning config, and each config's time (ms) where the autotuner tuned one
    key only in that span (its configs_timings then belong to that key).

    Why: the H200 run of 2026-11-28 timed the TMA Linear+GELU at 4096 x 768 -> 3072 42% slower
    than the run before (0.0464 -> 0.0661 ms) and its exact-maths variant 39% slower, where the
    16384-row case was not: a results file that says which config each key took, against what
    the others timed, tells a worse pick from a slower kernel."""
    from fuseformer.kernels import _util

    new = [(tuned, key) for (tuned, key) in _util._tuned_configs if (tuned, key) not in before]
    per_tuner: dict = {}
    for tuned, _ in new:
        per_tuner[id(tuned)] = per_tuner.get(id(tuned), 0) + 1
    out = []
    for tuned, key in new:
        entry = {"kernel": getattr(getattr(tuned, "fn", tuned), "__name__", str(tuned)), "key": repr(key),
                 "config": {k: v for k, v in _util._tuned_configs[(tuned, key)].items()
                            if isinstance(v, (int, float, bool, str, type(None)))}}
        timings = getattr(tuned, "configs_timings", None)
        if timings and per_tuner[id(tuned)] == 1:
            entry["timings_ms"] = {str(config): (list(t) if isinstance(t, (list, tuple)) else t)
                                   for config, t in timings.items()}
        out.append(entry)
    return out
