"""`dsv3 gate`: compare results (`dsv3-results/1` documents or pytest-benchmark JSON) with a recorded baseline, per
metric: analytic values exactly, deterministic measurements within a tolerance, timings by Mann-Whitney U with a
minimum effect size. Exit 0 when nothing regressed, 1 with a table of what moved, 2 on bad input; `--update`
records the results as the baseline instead (atomically). See docs/gate.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from tabulate import tabulate

from harness.formatting import significant
from harness.gate import stats
from harness.gate.compare import MOVED, Options, Outcome, Row, describe, gate
from harness.gate.sources import Source, merged_text, read_source
from harness.progress import notify
from harness.registry import UsageError
from harness.results import ResultsError, write_atomic

HELP = "compare results with a recorded baseline (exit 1 on a regression); --update records one"
INPUT_ERRORS = (ResultsError,)
FORMATS = ("text", "github", "json")
_TABLEFMT = {"text": "simple", "github": "github"}
_ORDER = ("regressed", "changed", "improved", "same", "not gated", "skipped", "missing", "new")


def _fraction(text: str) -> float:
    """argparse type for --alpha and --min-effect: a number in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--baseline", required=True, metavar="FILE", help="the recorded baseline")
    parser.add_argument("--results", required=True, action="append", metavar="FILE",
                        help="results to check (repeatable; one machine): a dsv3 results document "
                             "(`dsv3 report --format json`, pytest --dsv3-results) or pytest-benchmark JSON")
    parser.add_argument("--update", action="store_true",
                        help="record the results as the baseline (atomically) instead of comparing")
    parser.add_argument("--any-machine", action="store_true",
                        help="compare machine-dependent metrics (timings) even when the baseline comes from "
                             "another machine or thread count")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help="compare only this metric (repeatable)")
    parser.add_argument("--alpha", type=_fraction, default=stats.ALPHA, metavar="P",
                        help=f"significance level of the Mann-Whitney U test (default {stats.ALPHA})")
    parser.add_argument("--min-effect", type=_fraction, default=stats.MIN_EFFECT, metavar="F",
                        help=f"smallest relative change of the medians that counts (default {stats.MIN_EFFECT})")
    parser.add_argument("--all", action="store_true", help="list every record, not only those that moved")
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages on stderr")


def _value(value: float | None, other: float | None) -> str:
    """A cell: 6 significant digits, or every digit when that would hide a difference from `other`."""
    if value is None:
        return "—"
    text = significant(value, 6)
    return repr(value) if other is not None and other != value and text == significant(other, 6) else text


def _cells(row: Row) -> list[str]:
    change = "—" if row.change is None else f"{row.change:+.2%}"
    p = "—" if row.p is None else f"{row.p:.2g}"
    return [row.verdict, row.key[0], describe(row.key), row.check, _value(row.baseline, row.current),
            _value(row.current, row.baseline), row.unit, change, p, row.note]


def render(outcome: Outcome, fmt: str, show_all: bool) -> str:
    """The rows that moved (all with show_all), worst first, then the summary and the notes."""
    if fmt == "json":
        rows = [{**dataclasses.asdict(r), "key": describe(r.key), "metric": r.key[0], "change": r.change}
                for r in outcome.rows]
        return json.dumps({"failed": outcome.failed, "rows": rows, "notes": outcome.notes}, indent=2) + "\n"
    shown = sorted((r for r in outcome.rows if show_all or r.verdict in MOVED), key=lambda r: _ORDER.index(r.verdict))
    summary = "gate: " + ", ".join(f"{outcome.count(v)} {v}" for v in _ORDER if outcome.count(v))
    lines = "\n".join([summary + (" -> FAILED" if outcome.failed else " -> passed"),
                       *(f"  * {n}" for n in outcome.notes)])
    if not shown:
        return lines + "\n"
    table = tabulate([_cells(r) for r in shown], disable_numparse=True, tablefmt=_TABLEFMT[fmt],
                     headers=["verdict", "metric", "record", "rule", "baseline", "results", "unit", "change", "p",
                              "note"])
    return f"{table}\n\n{lines}\n"


def _update(baseline: Path, results: list[Source], quiet: bool) -> int:
    """Record the results as the baseline; an existing file must be a baseline (never overwrite anything else)."""
    if baseline.is_dir():
        raise UsageError(f"--baseline {baseline}: is a directory; expected a file")
    if baseline.exists():
        read_source(baseline)
    ids = {s.machine_id for s in results}
    if len(ids) > 1:
        raise ResultsError("--results: files from different machines; record each machine's baseline alone")
    write_atomic(baseline, merged_text(results))
    notify(f"gate: recorded {sum(len(s.records) for s in results)} records as the baseline {baseline} "
           f"(machine {results[0].describe_machine()})", quiet)
    return 0


def run(args: argparse.Namespace) -> int:
    """`dsv3 gate`: every input is read and checked before anything is compared or written."""
    results = [read_source(p) for p in args.results]
    baseline = Path(args.baseline)
    if args.update:
        if args.metric:
            raise UsageError("--update records every record; --metric only selects what a comparison checks")
        return _update(baseline, results, args.quiet)
    base = read_source(baseline)
    opts = Options(args.alpha, args.min_effect, args.any_machine, tuple(args.metric))
    outcome = gate(base, results, opts, quiet=args.quiet)
    sys.stdout.write(render(outcome, args.format, args.all))
    return 1 if outcome.failed else 0
