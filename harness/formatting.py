"""Cell formatting shared by every report table."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hardware.timing import quartiles
from harness.results import Record


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


def with_quartiles(value: float, per_round: Sequence[float], percent: bool = False) -> str:
    """A median over rounds with its inter-quartile range over rounds: `1.52x (1.41-1.60)` or `62% (60%-70%)`."""
    q1, q3 = quartiles(per_round)
    if percent:
        return f"{value:.0%} ({q1:.0%}-{q3:.0%})"
    return f"{value:.2f}x ({q1:.2f}-{q3:.2f})"


def ratio_cell(record: Record | None) -> str:
    """A side-by-side speed record (`harness.bench.common.speedup_record`) with its quartiles; a dash for None."""
    return "—" if record is None else with_quartiles(record.value, record.extra["per_round"])
