"""Which implementation runs an op: `triton`, `cuda` (csrc/), `torch` (reference.py) or `auto`.

The op files register their fused implementations here (`register_impl`) and ask `resolve`
which backend to run for a given call. The rules (docs/design.md):

- `torch` always works: it is the reference, on any device.
- A backend asked for by name that cannot run the case raises BackendUnsupportedError
  saying why; nothing is silently swapped. A name that is misspelt, or a global choice that
  can run nothing in this process (`set_backend("cuda")` without CUDA), is refused where it
  is given.
- `auto` picks the first fused backend in AUTO_ORDER that can run the case on this device
  and otherwise falls back to `torch`, with one warning per (op, reason) on a CUDA device.
  On the CPU `auto` is always `torch`: the Triton interpreter is a correctness tool, not a
  fast path.

Decisions are made once: the answer for (op, device, backend name, case) is cached, the
environment is read at import (or when changed through this module's functions), and the
backend in force is a plain module global, so that an eager call costs a dict lookup and
torch.compile traces `get_backend()` as a guarded constant (it cannot trace a ContextVar).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Callable, Iterator

import torch

BACKENDS = ("triton", "cuda", "torch")
_CHOICES = BACKENDS + ("auto",)

# Preference of `auto` among fused backends, per op. A candidate whose Impl has an
# `auto_unsupported` is asked that first, and `auto` passes over it unless it says the case is
# one where committed GPU results show it the faster (bench/results/). The cuda backend (csrc/)
# leads for attention only that way: never when its module is not already loaded (`auto` must
# not start its JIT build from inside a forward), and only for the cases
# cuda_backend._attention_auto_unsupported names (H100, 2026-11-26: head dim 128 inference on
# the sm_90a kernels, 1.39x the Triton kernel), and for add+LayerNorm in training
# (cuda_backend._add_layer_norm_auto_unsupported: forward+backward 1.19-1.32x on the H200).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "attention": ("cuda", "triton"),
    "varlen_attention": ("triton",),
    "add_layer_norm": ("cuda", "triton"),
    "linear_gelu": ("triton",),
    "cross_entropy": ("triton",),
}


class BackendUnsupportedError(RuntimeError):
    """A backend asked for by name cannot run this call; the message says why."""


@dataclasses.dataclass(frozen=True)
class Impl:
    """A fused implementation of one op on one backend.

    forward/backward are the launchers the op calls; `unsupported(**case)` returns None when
    the case can run, otherwise a short reason ("head dim 512 > 256").
    """

    forward: Callable
    backward: Callable | None
    unsupported: Callable[..., str | None] = lambda **case: None
    # Asked by `auto` alone, before anything that could build or load the backend:
    # auto_unsupported(device, **case) is None only where `auto` should prefer this backend.
    auto_unsupported: Callable[..., str | None] | None = None
    # Keyword arguments `backward` takes beyond the op's contract, for callers that can use
    # them (models/fused_block.py): "grads" (attention: writes dq, dk, dv into the given
    # tensors, unit last stride, any others), "acc" (linear_gelu: returns acc + dx, the add
    # in the GEMM), "dx_sum" (add_layer_norm: also returns dx summed over the rows).
    backward_extras: frozenset = frozenset()


_IMPLS: dict[tuple[str, str], Impl] = {}
# (op, device, requested name or None, backend in force, case items) -> backend name; and
# memo's (key, backend in force) -> its caller's answer.
_plans: dict[tuple, object] = {}


def register_impl(op: str, backend: str, impl: Impl) -> None:
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda' to register an impl, got {backend!r}")
    _IMPLS[(op, backend)] = impl
    _plans.clear()


def get_impl(op: str, backend: str) -> Impl:
    try:
        return _IMPLS[(op, backend)]
    except KeyError:
        raise BackendUnsupportedError(f"backend {backend!r} has no implementation of {op}") from None


def check_name(name, what: str = "backend") -> str:
    """`name` lower-cased if it is one of the backend names, else a ValueError naming `what`."""
    if not isinstance(name, str) or name.lower() not in _CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, _CHOICES))}, got {name!r}")
    return name.lower()




def choice(name, options, what: str, where: str) -> str:
    """`name` stripped and lower-cased when it is one of `options`; else a ValueError that
    says where it was given (an API call or an environment variable) and what was expected."""
    value = str(name).strip().lower()
    if value not in options:
        raise ValueError(f"{where}: unknown {what} {name!r}; expected one of {tuple(options)}")
    return value


def env_choice(variable: str, options, default: str, what: str) -> str:
    """choice() for an environment variable, read once (at import); empty means `default`."""
    return choice(os.environ.get(variable, "").strip() or default, options, what, variable)


_VARIANT_SETS: list = []  # every op's Variants, for settings_signature


class Variants(dict):
    """The kernel-variant settings of one op: setting -> chosen option, the first option of
    each being the default (the measured path). Each is read once, at import, from its
    environment variable; `set` and the `using` context change them through the API. The
    launchers read the dict per call (one lookup)."""

    def __init__(self, op: str, options: dict, env: dict):
        super().__init__()
        self.op, self.options = op, options
        for what, choices in options.items():
            self[what] = env_choice(env[what], choices, choices[0], f"{op} {what} variant")
        _VARIANT_SETS.append(self)

    def set(self, **choices) -> dict:
        """Change the named settings; returns all the previous ones (a dict for `update`)."""
        checked = {}
        for what, value in choices.items():
            if what not in self.options:
                raise ValueError(f"{self.op} variant: unknown setting {what!r} (one of {', '.join(self.options)})")
            checked[what] = choice(value, self.options[what], f"{what} variant", f"{self.op} variant {what}")
        before = dict(self)
        self.update(checked)
        return before

    @contextlib.contextmanager
    def using(self, **choices):
        """`set` inside a block (the benchmark times the variants side by side)."""
        before = self.set(**choices)
        try:
            yield
        finally:
            self.update(before)


def _env_flag(name: str) -> bool:
    # Triton's own reading of a boolean variable (triton.knobs): these words mean on, any
    # other value (including "false" and "0") means off.
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on", "y")


def _backend_from_env() -> str:
    value = os.environ.get("FUSEFORMER_BACKEND", "").strip()
    return check_name(value, "FUSEFORMER_BACKEND") if value else "auto"  # empty means unset


# Read once. Triton reads TRITON_INTERPRET when a kernel is decorated, so a later change of
# the variable could not switch already-built kernels anyway.
_INTERPRET = _env_flag("TRITON_INTERPRET")
_default = _backend_from_env()
_scoped: list[str] = []  # use_backend's stack, innermost last
_version = 0


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return _INTERPRET


def _changed() -> None:
    global _version
    _version += 1


def backend_version() -> int:
    """A counter that moves whenever the backend in force may have changed: modules that
    cache a decision for backend=None compare it instead of resolving on every call."""
    return _version


def _refuse_unusable(name: str) -> str:
    reason = None if name in ("auto", "torch") else _global_reason(name)
    if reason is not None:
        raise BackendUnsupportedError(f"backend {name!r} cannot run anything here: {reason}")
    return name


def _global_reason(name: str) -> str | None:
    # Cheap facts only: choosing cuda must not start its JIT build (the first op builds it).
    if name == "cuda":
        if torch.version.cuda is None:
            return "torch was built without CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return unavailable_reason(name)


def set_backend(name: str) -> None:
    """Set the process-wide default backend ('triton', 'cuda', 'torch' or 'auto')."""
    global _default
    _default = _refuse_unusable(check_name(name))
    _changed()


def get_backend() -> str:
    """The backend in force here: the innermost `use_backend`, else the default."""
    return _scoped[-1] if _scoped else _default


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run a block with another backend: `with K.use_backend("torch"): ...`.

    Process-wide while the block runs, like torch.backends' own switches (sdpa_kernel)."""
    _scoped.append(_refuse_unusable(check_name(name)))
    _changed()
    try:
        yield _scoped[-1]
    finally:
        _scoped.pop()
        _changed()


def unavailable_reason(backend: str) -> str | None:
    """Why `backend` cannot run anything in this process, or None when it can. For `cuda`
    this loads (the first time: builds) the csrc/ extension."""
    backend = check_name(backend)
    if backend in ("torch", "auto"):
        return None
    if backend == "triton":
        return _triton_reason()
    from . import cuda_backend

    return cuda_backend.unavailable_reason()


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not importable ({err})"
    return None


# Settled once, at import (the package's kernel modules import triton anyway), so that a call,
# or a torch.compile trace of one, never reads sys.modules. Dynamo's trace of that read
# iterated the dict while a test's background thread imported a module, and failed
# ("dictionary changed size during iteration").
_TRITON_IMPORT_ERROR = _triton_import_error()


def _triton_reason() -> str | None:
    if _TRITON_IMPORT_ERROR is not None:
        return _TRITON_IMPORT_ERROR
    if not (torch.cuda.is_available() or _INTERPRET):
        return "no CUDA device and TRITON_INTERPRET is not set"
    return None


def available_backends() -> list[str]:
    """The backends that can run here, `torch` always among them."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _device_reason(backend: str, device: torch.device) -> str | None:
    if device.type == "cuda":
        return None
    if backend == "triton" and device.type == "cpu" and _INTERPRET:
        return None
    return f"tensors are on {device.type}, and the {backend} backend needs CUDA tensors"


_warned: set[tuple[str, str]] = set()


def resolve(op: str, device: torch.device, requested: str | None = None, **case) -> str:
    """The backend that runs `op` for this call.

    `requested` overrides the backend in force (a layer's own `backend=`); `case` is passed
    to each candidate's `unsupported` check (dtype, head dim, mask kind, ...). The answer is
    cached, so a repeated call costs one dict lookup; errors and warnings are raised on the
    first call of a key (errors, never cached, on every call).
    """
    if torch.compiler.is_compiling():
        # Decided at trace time, into the graph's guards; the cache (a global dict keyed by
        # devices and dtypes) stays out of what Dynamo has to trace.
        return _decide(op, device, requested, case)
    key = (op, device, requested, _scoped[-1] if _scoped else _default, *case.items())
    name = _plans.get(key)
    if name is None:
        name = _plans[key] = _decide(op, device, requested, case)
    return name


def settings_signature() -> tuple:
    """The backend in force, every op's kernel-variant settings and torch's matmul precision
    flags (the linear_gelu launcher and cuBLAS read them): what a captured sequence of launches
    (generate's CUDA graph) was chosen under, beyond its tensors and modules."""
    matmul = torch.backends.cuda.matmul
    return (get_backend(), tuple((v.op, tuple(v.items())) for v in _VARIANT_SETS),
            matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction,
            matmul.allow_bf16_reduced_precision_reduction, torch.get_float32_matmul_precision())


def memo(key: tuple, decide):
    """decide() for this key under the backend in force, cached beside resolve's decisions (and
    forgotten with them by clear_plans): for callers that derive one answer from several
    resolve calls (models/fused_block.py's plan). An exception from decide() is not cached."""
    key = (key, _scoped[-1] if _scoped else _default)
    try:
        return _plans[key]
    except KeyError:
        value = _plans[key] = decide()
        return value


def clear_plans() -> None:
    """Forget every cached decision (tests that swap implementations call this)."""
    _plans.clear()


def warn_fallback(op: str, reason: str, stacklevel: int) -> None:
    """`auto` runs `op` on the torch backend: one warning per (op, reason) in a process."""
    if (op, reason) not in _warned:
        _warned.add((op, reason))
        warnings.warn(f"fuseformer: {op} falls back to the torch backend ({reason})", stacklevel=stacklevel)


def _decide(op: str, device: torch.device, requested: str | None, case: dict) -> str:
    name = get_backend() if requested is None else check_name(requested)
    if name == "torch":
        return "torch"
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        reasons = []
        for candidate in AUTO_ORDER.get(op, ()):
            impl = _IMPLS.get((op, candidate))
            auto_check = None if impl is None else impl.auto_unsupported
            reason = (auto_check(device, **case) if auto_check is not None else None) or _why_not(op, candidate, device,
                                                                                                  case)
            if reason is None:
                return candidate
            reasons.append(f"{candidate}: {reason}")
        warn_fallback(op, "; ".join(reasons), stacklevel=5)
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
