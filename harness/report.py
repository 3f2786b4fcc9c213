"""`dsv3 report`: run the registered sections and render their tables (text, github, latex, csv, json)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.progress import Progress
from harness.report_sections import ReportContext, Section, Table
from harness.results import REQUIRED, Record, document, write_atomic

FORMATS = ("text", "github", "latex", "csv", "json")
OUTPUT_FILES = ("report.md", "results.json")  # what write_outputs writes into --out
_TABLEFMT = {"text": "simple", "github": "github", "latex": "latex_booktabs"}


def run_sections(ctx: ReportContext, chosen: list[Section], progress: Progress) -> list[Table]:
    """Run the `chosen` sections in order, one unit of `progress` each (ctx.progress and ctx.fraction report
    within a section)."""
    tables: list[Table] = []
    for i, sec in enumerate(chosen, 1):
        progress(f"[{i}/{len(chosen)}] {sec.title}")
        tables.extend(sec.run(ctx))
        progress.advance()
    return tables


def render_tables(tables: list[Table], fmt: str) -> str:
    """Tables as text, GitHub markdown or LaTeX."""
    out: list[str] = []
    for t in tables:
        body = tabulate(t.rows, headers=t.headers, tablefmt=_TABLEFMT[fmt], disable_numparse=True)
        if fmt == "github":
            out.append(f"## {t.title}\n\n{body}\n" + "".join(f"\n- {n}" for n in t.notes))
        elif fmt == "latex":
            out.append(f"% {t.title}\n{body}" + "".join(f"\n% {n}" for n in t.notes))
        else:
            out.append(f"{t.title}\n{'=' * len(t.title)}\n{body}" + "".join(f"\n  * {n}" for n in t.notes))
    return "\n\n".join(out) + "\n"


def render_csv(records: list[Record]) -> str:
    """One row per record: the required keys, the deviation from the paper, and the extra keys as JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*REQUIRED, "deviation_pct", "extra"])
    for r in records:
        d = r.to_dict()
        dev = r.deviation_pct
        writer.writerow([*(d[k] for k in REQUIRED), "" if dev is None else f"{dev:.4f}",
                         json.dumps(r.extra, sort_keys=True) if r.extra else ""])
    return buf.getvalue()


def render(tables: list[Table], env: dict[str, Any], fmt: str) -> str:
    """The report in format `fmt`."""
    records = [r for t in tables for r in t.records]
    if fmt == "json":
        return json.dumps(document(records, env), indent=2) + "\n"
    if fmt == "csv":
        return render_csv(records)
    return render_tables(tables, fmt)


@dataclass(frozen=True)
class Figure:
    """A figure written beside report.md (`harness.plots`); `file` None when there was nothing to draw, and the
    caption says what is absent."""

    title: str
    file: str | None
    caption: str


def render_figures(figures: Sequence[Figure]) -> str:
    """The markdown that embeds the figures (relative paths: they lie beside report.md)."""
    out = ["## Figures\n"]
    for f in figures:
        image = f"![{f.title}]({f.file})\n\n" if f.file else "(not drawn)\n\n"
        out.append(f"### {f.title}\n\n{image}*{f.caption}*\n")
    return "\n".join(out)


def write_outputs(out_dir: Path, tables: list[Table], env: dict[str, Any], figures: Sequence[Figure] = ()) -> None:
    """Write OUTPUT_FILES (report.md, embedding `figures` when there are any, and results.json) into `out_dir`,
    each atomically."""
    report_md, results_json = OUTPUT_FILES
    figure_md = f"\n{render_figures(figures)}" if figures else ""
    write_atomic(out_dir / report_md, f"# dsv3 report\n\n{render_tables(tables, 'github')}{figure_md}")
    write_atomic(out_dir / results_json, render(tables, env, "json"))
