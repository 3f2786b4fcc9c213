"""Error metrics and tolerance rules: one definition each, used by the suites, the tests and the report.

- `rel_err`: norm-wise relative error ||y - ref|| / ||ref|| (float64 identities, and the flash-attention rule);
- `max_rel_err`: max |y - ref| / max |ref| (elementwise bound scaled to the output's range, where zero-mean
  outputs make an elementwise relative error meaningless);
- `calc_diff`: DeepGEMM's similarity 1 - 2 sum(xy) / sum(x^2 + y^2) (FP8 GEMM < 1e-3, BF16 GEMM < 1e-5);
- `within_low_precision_rule`: the flash-attention rule, error of the implementation <= k x error of a plain
  low-precision reference, both against an fp64 truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

F64_IDENTITY_RTOL = 1e-10  # algebraic identities in float64: ~1e-16 per operation, a few hundred operations deep
CALC_DIFF_FP8 = 1e-3  # DeepGEMM's QuantConfig.max_diff for FP8 x FP8 GEMMs
CALC_DIFF_BF16 = 1e-5  # DeepGEMM's threshold for BF16 GEMMs


class NumericsError(ValueError):
    """Tensors that cannot be compared (different shapes); the message names them."""


def _pair(y: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if y.shape != ref.shape:
        raise NumericsError(f"y: expected the shape of ref {tuple(ref.shape)}, got {tuple(y.shape)}")
    return y.detach().double().cpu(), ref.detach().double().cpu()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64 (0 when both are zero; inf when only ref is)."""
    y, ref = _pair(y, ref)
    diff, norm = float((y - ref).norm()), float(ref.norm())
    if norm == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / norm


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref| in float64 (0 when both are zero; inf when only ref is)."""
    y, ref = _pair(y, ref)
    if y.numel() == 0:
        return 0.0
    diff, scale = float((y - ref).abs().max()), float(ref.abs().max())
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / scale


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's similarity 1 - 2 sum(xy) / sum(x^2 + y^2) in float64 (0 when both are all-zero).

    Not a cosine: for y = a x it is (1 - a)^2 / (1 + a^2), so 1e-3 is about a 4.5% scale error.
    """
    x, y = _pair(x, y)
    denominator = (x * x + y * y).sum()
    if denominator == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denominator)


@dataclass(frozen=True)
class LowPrecisionCheck:
    """The flash-attention rule's verdict: err <= factor x err_ref + floor."""

    err: float
    err_ref: float
    factor: float
    floor: float = 0.0

    @property
    def ok(self) -> bool:
        return self.err <= self.factor * self.err_ref + self.floor

    def __str__(self) -> str:
        ratio = self.err / self.err_ref if self.err_ref else float("inf")
        return (f"error {self.err:.3e} vs the low-precision reference's {self.err_ref:.3e} ({ratio:.2f}x; allowed "
                f"{self.factor}x" + (f" + {self.floor:.1e}" if self.floor else "") + ")")


Metric = Callable[[torch.Tensor, torch.Tensor], float]


def within_low_precision_rule(y: torch.Tensor, low: torch.Tensor, truth: torch.Tensor, factor: float = 2.0,
                              floor: float = 0.0, metric: Metric = rel_err) -> LowPrecisionCheck:
    """The flash-attention rule: `y` (the implementation) and `low` (the plain low-precision reference) both
    against the fp64 `truth`; FlashAttention's tests allow factor 2."""
    return LowPrecisionCheck(metric(y, truth), metric(low, truth), factor, floor)
