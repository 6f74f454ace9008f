"""The parity rule (docs/design.md), shared by the tests and the benchmark harness.

For an output or gradient in dtype d, with ref64 the reference evaluated in float64 and
torch_d plain PyTorch run in dtype d:

    max|impl - ref64|  <=  2 * max|torch_d - ref64|  +  floor_d

The factor 2 is FlashAttention's rule: a fused kernel may be up to twice as far from the
exact answer as PyTorch itself is in the same precision. The floor covers cases where
PyTorch happens to be (nearly) exact, e.g. a sum of a few terms.
"""
from __future__ import annotations

import dataclasses

import torch

FLOORS = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@dataclasses.dataclass(frozen=True)
class Parity:
    error: float  # max|impl - ref64|
    torch_error: float  # max|torch_d - ref64|
    bound: float  # 2 * torch_error + floor

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{verdict}: error {self.error:.3g} vs bound {self.bound:.3g} (torch error {self.torch_error:.3g})"


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None) -> float:
    diff = (a.double() - b.double()).abs()
    if where is not None:
        diff = diff[where.expand_as(diff)]
    if diff.numel() == 0:
        return 0.0
    # NaN anywhere (an unwritten, poisoned element) must fail, not vanish in max().
    if torch.isnan(diff).any():
        return float("inf")
    return diff.max().item()


def parity(
    impl: torch.Tensor,
    ref64: torch.Tensor,
    torch_d: torch.Tensor,
    dtype: torch.dtype | None = None,
    where: torch.Tensor | None = None,
) -> Parity:
    """Measure `impl` against the float64 reference by the parity rule.

    `where` (bool, broadcastable) selects the positions that exist; padded tokens are left
    out of the comparison on both sides.
    """
    if impl.shape != ref64.shape or torch_d.shape != ref64.shape:
        raise ValueError(
            f"shapes differ: impl {tuple(impl.shape)}, ref64 {tuple(ref64.shape)}, torch_d {tuple(torch_d.shape)}"
        )
    dtype = dtype or impl.dtype
    error = _max_abs_diff(impl, ref64, where)
    torch_error = _max_abs_diff(torch_d, ref64, where)
    if torch_error == float("inf"):
        # A NaN in PyTorch's own result would make the bound infinite: a check that cannot fail.
        raise ValueError("torch_d has NaN at compared positions; the parity bound would be meaningless")
    return Parity(error, torch_error, 2.0 * torch_error + FLOORS[dtype])


def assert_parity(impl, ref64, torch_d, dtype=None, where=None, what: str = "output") -> Parity:
    result = parity(impl, ref64, torch_d, dtype, where)
    assert result.ok, f"{what}: {result}"
    return result
