"""Cell formatting shared by every report table."""

from __future__ import annotations

import math


def num(value: float | None, digits: int = 2) -> str:
    """A number with thousands separators and `digits` decimals; an em dash for None."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def significant(value: float | None, digits: int = 4) -> str:
    """`value` to `digits` significant digits, with thousands separators, no exponent and no trailing zeros; the
    integer part is never rounded away (0.0179277557783743 -> 0.01793, 1978.9 -> 1,979, 80.0 -> 80,
    123456.7 -> 123,457); an em dash for None."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def count(value: float | None) -> str:
    """An integer count with thousands separators."""
    return "—" if value is None else f"{round(value):,}"


def billions(value: float | None, digits: int = 3) -> str:
    """A parameter count in billions."""
    return "—" if value is None else f"{value / 1e9:,.{digits}f}B"


def deviation(value: float, paper: float | None) -> str:
    """(value - paper) / paper as a signed percentage; an em dash without a paper value."""
    if paper is None or paper == 0:
        return "—"
    return f"{(value - paper) / paper * 100:+.2f}%"
