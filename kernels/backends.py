"""Which implementation runs an op: `triton`, `cuda` (csrc/), `torch` (reference.py) or `auto`.

The op files register their fused implementations here (`register_impl`) and ask `resolve`
which backend to run for a given call. The rules (DESIGN.md):

- `torch` always works: it is the reference, on any device.
- A backend asked for by name that cannot run the case raises BackendUnsupportedError
  saying why; nothing is silently swapped.
- `auto` picks the first fused backend in AUTO_ORDER that can run the case on this device
  and otherwise falls back to `torch`, with one warning per (op, reason) on a CUDA device.
  On the CPU `auto` is always `torch`: the Triton interpreter is a correctness tool, not a
  fast path.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("triton", "cuda", "torch")
_CHOICES = BACKENDS + ("auto",)

# Preference of `auto` among fused backends, per op. The cuda backend is listed only where
# measurements showed it faster than triton (see kernels/cuda_backend.py for the numbers).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("triton", "cuda"),
    "varlen_attention": ("triton",),
    "add_layer_norm": ("triton", "cuda"),
    "linear_gelu": ("triton", "cuda"),
}


class BackendUnsupportedError(RuntimeError):
    """A backend asked for by name cannot run this call; the message says why."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """A fused implementation of one op on one backend.

    forward/backward are the launchers the op's custom op calls; `unsupported(**case)`
    returns None when the case can run, otherwise a short reason ("head dim 512 > 256").
    """

    forward: Callable
    backward: Callable | None
    unsupported: Callable[..., str | None] = lambda **case: None


_IMPLS: dict[tuple[str, str], Impl] = {}


def register_impl(op: str, backend: str, impl: Impl) -> None:
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda' to register an impl, got {backend!r}")
    _IMPLS[(op, backend)] = impl


def get_impl(op: str, backend: str) -> Impl:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise BackendUnsupportedError(f"backend {backend!r} has no implementation of {op}") from None


def _check_name(name: str, what: str = "backend") -> str:
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, _CHOICES))}, got {name!r}")
    return name.lower()


_default = _check_name(os.environ.get("FUSEFORMER_BACKEND", "auto"), "FUSEFORMER_BACKEND")
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fuseformer_backend", default=None)


def set_backend(name: str) -> None:
    """Set the process-wide default backend ('triton', 'cuda', 'torch' or 'auto')."""
    global _default
    _default = _check_name(name)


def get_backend() -> str:
    """The backend in force here: the innermost `use_backend`, else the default."""
    return _scoped.get() or _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run a block with another backend: `with K.use_backend("torch"): ...`."""
    token = _scoped.set(_check_name(name))
    try:
        yield name
    finally:
        _scoped.reset(token)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run anything in this process, or None when it can."""
    backend = _check_name(backend)
    if backend in ("torch", "auto"):
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            return f"triton is not importable ({err})"
        if not (torch.cuda.is_available() or interpreting()):
            return "no CUDA device and TRITON_INTERPRET is not set"
        return None
    from . import cuda_backend

    return cuda_backend.unavailable_reason()


def available_backends() -> list[str]:
    """The backends that can run here, `torch` always among them."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _device_reason(backend: str, device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if backend == "triton" and device.type == "cpu" and interpreting():
        return None
    return f"tensors are on {device.type}, and the {backend} backend needs CUDA tensors"


_warned: set[tuple[str, str]] = set()


def resolve(op: str, device: torch.device, requested: str | None = None, **case) -> str:
    """The backend that runs `op` for this call.

    `requested` overrides the backend in force (a layer's own `backend=`); `case` is passed
    to each candidate's `unsupported` check (dtype, head dim, mask kind, ...).
    """
    name = get_backend() if requested is None else _check_name(requested)
    if name == "torch":
        return "torch"
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        reasons = []
        for candidate in AUTO_ORDER.get(op, ()):
            reason = _why_not(op, candidate, device, case)
            if reason is None:
                return candidate
            reasons.append(f"{candidate}: {reason}")
        key = (op, "; ".join(reasons))
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"fuseformer: {op} falls back to the torch backend ({key[1]})", stacklevel=3)
        return "torch"
    reason = _why_not(op, name, device, case)
    if reason is not None:
        raise BackendUnsupportedError(f"backend {name!r} cannot run {op}: {reason}")
    return name


def _why_not(op: str, backend: str, device: torch.device, case: dict) -> str | None:
    reason = unavailable_reason(backend) or _device_reason(backend, device)
    if reason is not None:
        return reason
    impl = _IMPLS.get((op, backend))
    if impl is None:
        return f"no {backend} implementation of {op}"
    return impl.unsupported(**case)
