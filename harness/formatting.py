"""Cell formatting shared by every report table."""

from __future__ import annotations


def num(value: float | None, digits: int = 2) -> str:
    """A number with thousands separators and `digits` decimals; an em dash for None."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


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
