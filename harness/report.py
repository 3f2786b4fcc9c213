"""`dsv3 report`: run the registered sections and render their tables (text, github, latex, csv, json)."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.report_sections import ReportContext, Table, sections
from harness.results import REQUIRED, Record, document, write_atomic

FORMATS = ("text", "github", "latex", "csv", "json")
OUTPUT_FILES = ("report.md", "results.json")  # what write_outputs writes into --out
_TABLEFMT = {"text": "simple", "github": "github", "latex": "latex_booktabs"}


def run_sections(ctx: ReportContext, log: Callable[[str], None]) -> list[Table]:
    """Run every quick section (and the full ones under ctx.full), in order, logging progress."""
    chosen = sections(ctx.full)
    tables: list[Table] = []
    for i, sec in enumerate(chosen, 1):
        log(f"[{i}/{len(chosen)}] {sec.title} ...")
        start = time.perf_counter()
        tables.extend(sec.run(ctx))
        log(f"[{i}/{len(chosen)}] {sec.title}: {time.perf_counter() - start:.1f} s")
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


def write_outputs(out_dir: Path, tables: list[Table], env: dict[str, Any]) -> None:
    """Write OUTPUT_FILES (report.md, results.json) into `out_dir`, each atomically."""
    report_md, results_json = OUTPUT_FILES
    write_atomic(out_dir / report_md, f"# dsv3 report\n\n{render_tables(tables, 'github')}")
    write_atomic(out_dir / results_json, render(tables, env, "json"))


def progress_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
