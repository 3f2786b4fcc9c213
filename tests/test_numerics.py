"""harness.numerics: the error metrics and the flash-attention rule, on exact cases."""

from __future__ import annotations

import pytest
import torch

from harness.numerics import NumericsError, calc_diff, max_rel_err, rel_err, within_low_precision_rule


def test_calc_diff():
    x = torch.randn(100, dtype=torch.float64)
    assert calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    # y = a x gives (1 - a)^2 / (1 + a^2) (float64 identity to ~1e-12)
    assert calc_diff(x, 1.1 * x) == pytest.approx(0.01 / 2.21, rel=1e-10)
    assert calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0
    with pytest.raises(NumericsError, match="^y: expected the shape"):
        calc_diff(torch.zeros(3), torch.zeros(4))


def test_relative_errors():
    ref = torch.tensor([3.0, -4.0])
    assert rel_err(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)  # |(0.3, 0.4)| / |(3, -4)|
    assert max_rel_err(ref + torch.tensor([0.0, 0.2]), ref) == pytest.approx(0.05)  # 0.2 / 4
    assert rel_err(torch.zeros(2), torch.zeros(2)) == 0.0 == max_rel_err(torch.zeros(0), torch.zeros(0))
    assert rel_err(torch.ones(2), torch.zeros(2)) == float("inf") == max_rel_err(torch.ones(2), torch.zeros(2))
    assert rel_err(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.float64)) == 0.0


def test_low_precision_rule():
    truth = torch.tensor([1.0, 2.0])
    low, good, bad = truth + 0.1, truth + 0.15, truth + 0.3
    assert within_low_precision_rule(good, low, truth).ok  # 1.5x the reference's error
    check = within_low_precision_rule(bad, low, truth)
    assert not check.ok and "3.00x; allowed 2.0x" in str(check)
    assert within_low_precision_rule(bad, low, truth, floor=0.1).ok
    assert within_low_precision_rule(bad, low, truth, metric=max_rel_err).err == pytest.approx(0.15)
