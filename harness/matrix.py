"""The conformance matrix: property x implementation, each cell pass / fail (with its first counterexample, shrunk)
/ n/a (declared by the implementation, with its reason) / skip / xfail (a listed known deviation) / xpass (a listed
deviation that now passes) / error; rendered as text, GitHub markdown, LaTeX, CSV or JSON.

A row is one property: a test function of a component's suite (`component/test`); the variants of a parametrised
test (e.g. `[bf16]`) are folded into its cell, the worst one shown. A column is one implementation name (a
built-in name such as `reference` spans every component that has one; a user implementation is its
`module:factory`); a cell of a component the implementation does not belong to is empty.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from tabulate import tabulate

from harness.conformance import Outcome, Run
from harness.pytest_plugin import property_id

SCHEMA = "dsv3-conformance/1"
FORMATS = ("text", "github", "latex", "csv", "json")
SEVERITY = ("error", "fail", "xfail", "xpass", "pass", "n/a", "skip")  # the worst variant decides a cell
FAILING = ("error", "fail")
LABELS = {"pass": "pass", "fail": "FAIL", "error": "ERROR", "n/a": "n/a", "skip": "skip", "xfail": "xfail",
          "xpass": "XPASS"}
_TABLEFMT = {"text": "simple", "github": "github", "latex": "latex_booktabs"}


@dataclass(frozen=True)
class Cell:
    """One implementation on one property: the worst variant's status and details, and every variant's."""

    status: str
    shown: Outcome  # the variant whose details the cell shows
    variants: tuple[Outcome, ...]


@dataclass
class Matrix:
    """Rows (property ids in suite order), columns (implementation names in the order chosen), cells."""

    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    run: Run
    components: dict[str, str] = field(default_factory=dict)  # row -> component

    @property
    def failed(self) -> bool:
        """True when some chosen implementation fails (or errors on) some property."""
        return any(c.status in FAILING for c in self.cells.values())

    def counts(self, column: str) -> dict[str, int]:
        """How many of a column's cells have each status."""
        found = [c.status for (_, col), c in self.cells.items() if col == column]
        return {s: found.count(s) for s in SEVERITY if found.count(s)}


def build(run: Run) -> Matrix:
    """Fold a run's outcomes into the matrix."""
    columns = list(dict.fromkeys(i.name for i in run.implementations))
    grouped: dict[tuple[str, str], list[Outcome]] = {}
    components: dict[str, str] = {}
    lines: dict[str, int] = {}
    for o in run.outcomes:
        row = property_id(o.component, o.test)
        components[row], lines[row] = o.component, o.line
        grouped.setdefault((row, o.impl), []).append(o)
    order = {c: n for n, c in enumerate(run.components)}
    rows = sorted(components, key=lambda r: (order.get(components[r], len(order)), lines[r], r))
    cells = {}
    for key, found in sorted(grouped.items()):
        variants = tuple(sorted(found, key=lambda o: o.variant))
        worst = min(variants, key=lambda o: SEVERITY.index(o.status))
        cells[key] = Cell(worst.status, worst, variants)
    return Matrix(rows, columns, cells, run, components)


Note = tuple[str, str]  # a footnote: its headline and the lines below it (example, rebuild lines), maybe empty


def _notes(matrix: Matrix) -> tuple[dict[tuple[str, str], int], list[Note]]:
    """Footnote numbers per cell and the footnotes: one per failure (message, example, rebuild), one per distinct
    reason of the other non-pass cells."""
    numbers: dict[tuple[str, str], int] = {}
    notes: list[Note] = []
    by_text: dict[Note, int] = {}
    for row in matrix.rows:
        for col in matrix.columns:
            cell = matrix.cells.get((row, col))
            if cell is None or cell.status == "pass":
                continue
            note = _note(col, cell)
            if cell.status not in FAILING and note in by_text:
                numbers[(row, col)] = by_text[note]
                continue
            notes.append(note)
            numbers[(row, col)] = by_text[note] = len(notes)
    return numbers, notes


def _note(col: str, cell: Cell) -> Note:
    o = cell.shown
    where = property_id(o.component, o.test, o.variant)
    body = "\n".join(p for p in (o.details, o.example, o.rebuild, o.reproduce) if p)
    if cell.status in FAILING:
        return f"{col} fails {where}: {o.message or 'no message'}", body
    if cell.status == "xpass":
        return f"{col}: {where} passes, though listed as a known deviation ({o.reason}): remove the entry", ""
    if cell.status == "xfail":
        return f"{col}: {o.reason}; {where} fails: {o.message}", body
    return o.reason, ""


def _indented(note: Note, indent: str) -> str:
    head, body = note
    return head + "".join(f"\n{indent}{line}" for line in body.splitlines())


def _cell_text(matrix: Matrix, numbers: dict[tuple[str, str], int], row: str, col: str) -> str:
    cell = matrix.cells.get((row, col))
    if cell is None:
        return "—"
    label = LABELS[cell.status]
    return f"{label} [{numbers[(row, col)]}]" if (row, col) in numbers else label


def _summary(matrix: Matrix) -> list[str]:
    lines = []
    for col in matrix.columns:
        counts = ", ".join(f"{n} {s}" for s, n in matrix.counts(col).items())
        lines.append(f"{col}: {counts or 'no test ran'}")
    request = matrix.run.request
    lines.append(f"hypothesis profile {request.profile!r}; verdict: "
                 + ("FAIL (a chosen implementation fails a property)" if matrix.failed else "conforms"))
    lines += [f"collection error: {e}" for e in matrix.run.collection_errors]
    lines += [f"known deviation that matched no test: {d}" for d in matrix.run.unused_deviations]
    return lines


def render(matrix: Matrix, fmt: str, env: dict[str, Any]) -> str:
    """The matrix in `fmt` (FORMATS)."""
    if fmt == "json":
        return json.dumps(to_json(matrix, env), indent=2) + "\n"
    if fmt == "csv":
        return _csv(matrix)
    numbers, notes = _notes(matrix)
    table = tabulate([[row, *(_cell_text(matrix, numbers, row, col) for col in matrix.columns)]
                      for row in matrix.rows], headers=["property", *matrix.columns], tablefmt=_TABLEFMT[fmt],
                     disable_numparse=True)
    summary = _summary(matrix)
    if fmt == "github":
        body = "\n".join(f"{n}. {_github_note(note)}" for n, note in enumerate(notes, 1))
        return (f"## Conformance matrix\n\n{table}\n\n" + "".join(f"- {s}\n" for s in summary)
                + (f"\n### Notes\n\n{body}\n" if notes else ""))
    if fmt == "latex":
        comments = [f"% [{n}] " + _indented(note, "% ") for n, note in enumerate(notes, 1)]
        return "\n".join([f"% Conformance matrix\n{table}", *(f"% {s}" for s in summary), *comments]) + "\n"
    title = "Conformance matrix"
    text = [f"{title}\n{'=' * len(title)}\n{table}", *(f"  * {s}" for s in summary)]
    text += [f"[{n}] " + _indented(note, "    ") for n, note in enumerate(notes, 1)]
    return "\n".join(text) + "\n"


def _github_note(note: Note) -> str:
    """A footnote as a markdown list item: the headline, the lines below it in a fenced block."""
    head, body = note
    return head + (f"\n\n   ```\n{_indented(('', body), '   ').lstrip(chr(10))}\n   ```\n" if body else "")


def _csv(matrix: Matrix) -> str:
    """One row per cell variant: property, implementation, variant, status, reason, message."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["property", "implementation", "variant", "status", "reason", "message"])
    for row in matrix.rows:
        for col in matrix.columns:
            cell = matrix.cells.get((row, col))
            for o in cell.variants if cell else ():
                writer.writerow([row, col, o.variant, o.status, o.reason, o.message])
    return buf.getvalue()


def to_json(matrix: Matrix, env: dict[str, Any]) -> dict[str, Any]:
    """The matrix as a document for tools: `{"schema", "env", "profile", "verdict", "implementations",
    "properties", "cells"}`, each cell with its status, details and variants."""
    impls = [{"name": i.name, "component": i.component, "description": i.description}
             for i in matrix.run.implementations]
    cells = []
    for (row, col), cell in matrix.cells.items():
        shown = asdict(cell.shown)
        cells.append({"property": row, "implementation": col, "status": cell.status,
                      **{k: shown[k] for k in ("variant", "reason", "message", "details", "example", "rebuild",
                                               "reproduce")},
                      "variants": [{k: v[k] for k in ("variant", "status", "reason", "message")}
                                   for v in map(asdict, cell.variants)]})
    return {"schema": SCHEMA, "env": env, "profile": matrix.run.request.profile,
            "verdict": "fail" if matrix.failed else "pass",
            "implementations": impls,
            "properties": [{"id": r, "component": matrix.components[r]} for r in matrix.rows],
            "cells": cells, "summary": {col: matrix.counts(col) for col in matrix.columns},
            "collection_errors": matrix.run.collection_errors,
            "unused_deviations": matrix.run.unused_deviations}
