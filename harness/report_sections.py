"""Registration of report sections: a component adds a table to `dsv3 report` without touching the report code.

A section is a function `run(ctx) -> list[Table]` registered with `@section(...)` in a module of
`harness/sections/`; `quick=False` sections run only under `dsv3 report --full`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsv3ref.config import ModelConfig
from hardware.profile import Profile
from harness.results import Record


@dataclass
class Table:
    """One rendered table plus the records behind it (what `--format json` emits)."""

    title: str
    headers: list[str]
    rows: list[list[Any]]
    records: list[Record]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportContext:
    """What a section may use: the models (the defaults and those named with --model) and profiles (local first),
    the models named with --model alone (`chosen`), the device, and progress hooks: `progress(message)` says what
    runs now, `fraction(f)` how much (0..1) of the section is done, for a section that runs for minutes."""

    models: tuple[ModelConfig, ...]
    profiles: tuple[Profile, ...]
    local: Profile
    device: str
    full: bool
    chosen: tuple[ModelConfig, ...] = ()
    progress: Callable[[str], None] = print
    fraction: Callable[[float], None] = lambda done: None

    def measured_models(self, fits: Callable[[ModelConfig], bool], default: ModelConfig) -> list[ModelConfig]:
        """The models a measured table runs: those named with --model that it can run (`fits`), else `default`."""
        return [m for m in self.chosen if fits(m)] or [default]


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    order: int
    quick: bool
    run: Callable[[ReportContext], list[Table]]


_SECTIONS: dict[str, Section] = {}


def section(name: str, title: str, order: int, quick: bool = True) -> Callable:
    """Decorator: register `run(ctx) -> list[Table]` as a report section (lower `order` prints first)."""

    def register(run: Callable[[ReportContext], list[Table]]) -> Callable[[ReportContext], list[Table]]:
        if name in _SECTIONS:
            raise ValueError(f"report section {name!r} is already registered")
        _SECTIONS[name] = Section(name, title, order, quick, run)
        return run

    return register


def sections(full: bool) -> list[Section]:
    """All quick sections, plus the full ones when `full`, in order."""
    import harness.sections as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return sorted((s for s in _SECTIONS.values() if s.quick or full), key=lambda s: (s.order, s.name))
