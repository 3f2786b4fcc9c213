"""Cell formatting: significant digits without raw floats or exponents."""

from __future__ import annotations

import pytest

from harness.formatting import significant


@pytest.mark.parametrize(("value", "digits", "text"), [
    (0.0179277557783743, 4, "0.01793"),
    (989.4, 4, "989.4"),
    (1978.9, 4, "1,979"),
    (1978.9, 6, "1,978.9"),
    (3350.0, 4, "3,350"),
    (80.0, 4, "80"),
    (123456.7, 4, "123,457"),
    (999.96, 4, "1,000"),
    (-0.5, 3, "-0.5"),
    (0.0, 4, "0"),
    (None, 4, "—"),
])
def test_significant(value, digits, text):
    assert significant(value, digits) == text
