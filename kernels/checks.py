"""Argument checks shared by the public ops: each raises an exception that names the argument
and says what was expected, before anything reaches a kernel."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def same_floats(ref, *others) -> bool:
    """True when `ref` is a floating tensor and each of `others` is None or a tensor with
    ref's dtype and device: the common case, answered in a few attribute reads so that the
    public ops can run their detailed checks (and build their messages) only when it fails."""
    if not isinstance(ref, torch.Tensor) or ref.dtype not in FLOAT_DTYPES:
        return False
    dtype, device = ref.dtype, ref.device
    for t in others:
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != device):
            return False
    return True


def check_causal_and_scale(is_causal, scale) -> None:
    """The attention flags, refused by type as torch's SDPA refuses them."""
    # isinstance, not `__class__ is bool`: Dynamo on torch 2.11 (the GPU machines' torch)
    # got the identity test on a traced constant wrong and raised "is_causal must be a bool,
    # got bool" (tests/test_compile.py, H100, 2026-11-26).
    # bool has no subclasses, so the two tests accept the same values.
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")


def check_tensor(name: str, t, *, min_dim: int = 0, dim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({names}), got {t.dtype}")
    return t


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Same dtype and device as the reference argument."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must share a device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_prob(name: str, p, *, allow_one: bool = False) -> float:
    """p as a float in [0, 1) (or [0, 1] with allow_one); bools are refused, as torch does."""
    if p.__class__ is float and 0.0 <= p < 1.0:
        return p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0 if allow_one else 0.0 <= p < 1.0):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be a float in {interval}, got {p!r}")
    return float(p)
