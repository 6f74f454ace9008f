"""tests/interpreter_sanitizer.py, the memcheck every interpreted kernel in this suite runs
under: an access outside the launch's tensors raises and names the kernel and the direction;
accesses inside them, in one tensor or several, pass."""
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the sanitizer wraps Triton's interpreter (no CUDA device here only)")

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

FAR = 1 << 24  # elements past the tensor: no other argument's storage lies there


@triton.jit
def _sanitized_copy(X, Y, n, LOAD_SHIFT, STORE_SHIFT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = offs < n
    tl.store(Y + STORE_SHIFT + offs, tl.load(X + LOAD_SHIFT + offs, mask=keep), mask=keep)


def _copy(x, y, n, load_shift=0, store_shift=0):
    _sanitized_copy[(1,)](x, y, n, load_shift, store_shift, BLOCK=64)


def test_in_bounds_accesses_pass():
    x, y = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    _copy(x, y, 64)
    assert torch.equal(x, y)
    _copy(x[32:], y[:32], 32)  # views: their storages' bounds count, not the view's
    assert torch.equal(y[:32], x[32:])


@pytest.mark.parametrize("direction,shifts", [("load", dict(load_shift=FAR)), ("store", dict(store_shift=FAR)),
                                              ("store", dict(store_shift=-FAR))])
def test_an_access_outside_every_argument_raises(direction, shifts):
    x, y = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    with pytest.raises(Exception, match=f"{direction} out of bounds in Triton kernel _sanitized_copy"):
        _copy(x, y, 64, **shifts)
    assert torch.equal(y, torch.zeros(64))  # the store never happened


def test_a_masked_off_lane_may_point_anywhere():
    x, y = torch.arange(64, dtype=torch.float32), torch.zeros(8)
    _copy(x, y, 8)  # lanes 8..63 would store past y, but they are masked off
    assert torch.equal(y, x[:8])
