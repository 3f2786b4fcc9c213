"""The paper's stated values, kept as data (`paper.toml`) and shown only as the `paper` reference beside a
computed value. Each entry names its source and, where the paper is inconsistent, a note."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources


@dataclass(frozen=True)
class PaperRef:
    metric: str
    subject: str
    value: float
    source: str
    profile: str | None = None
    method: str | None = None
    note: str | None = None


@cache
def _refs() -> tuple[PaperRef, ...]:
    data = tomllib.loads(resources.files("harness").joinpath("paper.toml").read_text())
    return tuple(PaperRef(**entry) for entry in data["ref"])


def ref(metric: str, subject: str, profile: str | None = None, method: str | None = None) -> PaperRef | None:
    """The paper's value for this metric/subject (and profile/method when the entry names them), or None."""
    for r in _refs():
        if (r.metric, r.subject) != (metric, subject):
            continue
        if r.profile not in (None, profile) or r.method not in (None, method):
            continue
        return r
    return None
