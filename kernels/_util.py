"""Small helpers shared by the fused ops' launchers."""
from __future__ import annotations

import contextlib
import math
import os

import torch


def poison_enabled() -> bool:
    """FUSEFORMER_POISON=1 (set by the tests) makes launchers fill outputs with NaN first,
    so an element a kernel forgets to write fails the parity check instead of passing as
    whatever torch.empty happened to hold."""
    return os.environ.get("FUSEFORMER_POISON", "0") not in ("", "0")


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised normally, NaN-filled when poisoning is on."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def maybe_poison(t: torch.Tensor) -> torch.Tensor:
    if poison_enabled() and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def as_rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t viewed as (rows, last dim), the layout the row-wise kernels address; None stays None.
    The row count is spelled out: reshape(-1, N) would be ambiguous when a tensor is empty."""
    if t is None:
        return None
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def draw_seed(device) -> torch.Tensor:
    """A Philox seed as a 1-element int64 tensor on the device.

    A tensor rather than a Python int: drawing it needs no host sync and torch.compile
    traces it without a graph break; it comes from torch's generator, so
    torch.manual_seed makes dropout reproducible.
    """
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def device_guard(t: torch.Tensor):
    """Make t's GPU the current one while launching: Triton launches on the current device,
    which is not t's when a process drives several GPUs."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
