"""The statistical rule for timings, as asv gates them: a change counts only when Mann-Whitney U on the raw samples
is significant (p < alpha, default 0.002) and the medians moved by at least a minimum effect (default 10%).

The test is one-sided towards worse (and, separately, towards better, to report improvements) when the metric says
which way is better; two-sided when it does not. Mann-Whitney U assumes nothing about the distribution of the
samples (timings are skewed, with outliers from other jobs) and is scipy's maintained implementation: exact for
small samples without ties, the normal approximation with a tie correction otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import mannwhitneyu

ALPHA = 0.002
MIN_EFFECT = 0.10


@dataclass(frozen=True)
class Shift:
    """What the test found: the verdict (regressed, improved, changed, same), the p-value of the test that speaks
    for it (towards the observed change), and the sample medians."""

    verdict: str
    p: float
    base_median: float
    new_median: float

    @property
    def factor(self) -> float:
        """new median / baseline median."""
        return ratio(self.new_median, self.base_median)


def ratio(new: float, base: float) -> float:
    """new / base, with 0 / 0 = 1 and x / 0 = inf (a quantity that appears from nothing moved without bound)."""
    if base == 0:
        return 1.0 if new == 0 else math.inf
    return new / base


def min_p_value(n: int, m: int, two_sided: bool = False) -> float:
    """The smallest p-value Mann-Whitney U can give for samples of n and m values (exact test, no ties): one over
    the number of ways to split n + m ranks (twice that two-sided). At or above alpha the test can never fire."""
    return (2.0 if two_sided else 1.0) / math.comb(n + m, n)


def enough_samples(n: int, m: int, direction: str | None, alpha: float = ALPHA) -> bool:
    """Whether n and m samples can reach p < alpha at all."""
    return n > 0 and m > 0 and min_p_value(n, m, direction is None) < alpha


def _p(new: Sequence[float], base: Sequence[float], alternative: str) -> float:
    p = float(mannwhitneyu(new, base, alternative=alternative).pvalue)
    return 1.0 if math.isnan(p) else p  # every sample equal: no evidence of a shift


def shift(base: Sequence[float], new: Sequence[float], direction: str | None, alpha: float = ALPHA,
          min_effect: float = MIN_EFFECT) -> Shift:
    """Compare raw samples `new` against `base` for a quantity where `direction` ("lower", "higher" or None) is
    better. A regression needs p < alpha towards worse and medians worse by a factor >= 1 + min_effect."""
    mb, mn = statistics.median(base), statistics.median(new)
    up, down = ratio(mn, mb), ratio(mb, mn)  # how far the median rose, and fell
    if direction is None:
        p = _p(new, base, "two-sided")
        moved = p < alpha and max(up, down) >= 1 + min_effect
        return Shift("changed" if moved else "same", p, mb, mn)
    worse, better = ("greater", "less") if direction == "lower" else ("less", "greater")
    p_worse, p_better = _p(new, base, worse), _p(new, base, better)
    bad, good = (up, down) if direction == "lower" else (down, up)  # > 1: by how much worse, better
    if p_worse < alpha and bad >= 1 + min_effect:
        return Shift("regressed", p_worse, mb, mn)
    if p_better < alpha and good >= 1 + min_effect:
        return Shift("improved", p_better, mb, mn)
    return Shift("same", min(p_worse, p_better), mb, mn)
