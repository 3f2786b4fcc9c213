"""Pair the records of a baseline and of new results by key and give each pair a verdict.

Key: (metric, subject, profile, kind, method, and the identifying extra keys of rules.KEY_EXTRAS that the record
has, as name=value pairs). Two records of one document with the same key are bad input (a results file appended to
twice). Verdicts: regressed and changed fail the gate; improved, same, not gated (too few or no raw samples, or a
rule that only shows), skipped (machine-dependent, measured on another machine or thread count), missing (in the
baseline only) and new (in the results only) do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from harness.gate import stats
from harness.gate.rules import KEY_EXTRAS, Rule, has_rule, rule_for
from harness.gate.sources import Source, finite_list
from harness.progress import Progress
from harness.results import Record, ResultsError

Key = tuple[Any, ...]
FAILING = ("regressed", "changed")
MOVED = (*FAILING, "improved")


_METHOD_CHARS = 30  # a longer method (a sentence) is cut in the table; the key keeps it whole


def _hashable(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value, sort_keys=True)


def record_key(r: Record) -> Key:
    """The identity of a record (see the module docstring)."""
    extras = tuple((k, _hashable(r.extra[k])) for k in KEY_EXTRAS if k in r.extra)
    return r.metric, r.subject, r.profile, r.kind, r.method, extras


def describe(key: Key) -> str:
    """'subject @profile kind method k=v ...', for a table cell."""
    _, subject, profile, kind, method, extras = key
    if method and len(method) > _METHOD_CHARS:
        method = method[: _METHOD_CHARS - 3] + "..."
    parts = [subject, f"@{profile}" if profile else "", kind, method or "", *(f"{k}={v}" for k, v in extras)]
    return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class Entry:
    record: Record
    source: Source


@dataclass(frozen=True)
class Row:
    """One key's outcome; `change` is relative (new / baseline - 1) where both values exist."""

    verdict: str
    key: Key
    check: str
    baseline: float | None
    current: float | None
    unit: str
    p: float | None = None
    note: str = ""

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return stats.ratio(self.current, self.baseline) - 1


@dataclass(frozen=True)
class Options:
    alpha: float = stats.ALPHA
    min_effect: float = stats.MIN_EFFECT
    any_machine: bool = False
    metrics: tuple[str, ...] = ()  # compare only these (all when empty)


@dataclass
class Outcome:
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(r.verdict in FAILING for r in self.rows)

    def count(self, verdict: str) -> int:
        return sum(r.verdict == verdict for r in self.rows)


def index(sources: Iterable[Source]) -> dict[Key, Entry]:
    """Every record by key; a key twice is a ResultsError naming the file."""
    out: dict[Key, Entry] = {}
    for source in sources:
        for r in source.records:
            key = record_key(r)
            if key in out:
                raise ResultsError(f"{source.path}: two records with key {r.metric} {describe(key)} "
                                   "(a results file appended to twice? write each run to a new file)")
            out[key] = Entry(r, source)
    return out


def samples(entry: Entry) -> tuple[str, list[float]] | None:
    """The raw samples of a record: its per-round values (`per_round`, the value's own samples) or its times
    (`samples_s`, lower is better); None when it keeps neither."""
    for name in ("per_round", "samples_s"):
        value = entry.record.extra.get(name)
        if value is None or (name == "samples_s" and isinstance(value, dict)):  # speed records: per_round
            continue
        if not finite_list(value) or not value:
            raise ResultsError(f"{entry.source.path}: record {entry.record.metric} {describe(record_key(entry.record))}"
                               f": {name}: expected a non-empty list of finite numbers")
        return name, value
    return None


def _skip_reason(base: Entry, new: Entry, rule: Rule, opts: Options) -> str | None:
    """Why a machine-dependent pair is not compared (another machine, another thread count), or None."""
    if not rule.machine_dependent or opts.any_machine:
        return None
    if not base.source.machine_id or base.source.machine_id != new.source.machine_id:
        return "another machine"
    threads = base.record.extra.get("threads"), new.record.extra.get("threads")
    if None not in threads and threads[0] != threads[1]:
        return f"threads {threads[0]} vs {threads[1]}"
    return None


def _statistical(key: Key, base: Entry, new: Entry, rule: Rule, opts: Options) -> Row:
    b, n = base.record, new.record
    sb, sn = samples(base), samples(new)
    values = dict(key=key, check=rule.check, baseline=b.value, current=n.value, unit=n.unit)
    if sb is None or sn is None:
        return Row("not gated", **values, note="no raw samples")
    if sb[0] != sn[0]:
        return Row("not gated", **values, note=f"samples differ in kind: {sb[0]} vs {sn[0]}")
    direction = "lower" if sb[0] == "samples_s" else rule.direction
    if not stats.enough_samples(len(sb[1]), len(sn[1]), direction, opts.alpha):
        low = stats.min_p_value(len(sb[1]), len(sn[1]), direction is None)
        return Row("not gated", **values, note=f"too few samples ({len(sb[1])} and {len(sn[1])}: p >= {low:.2g})")
    found = stats.shift(sb[1], sn[1], direction, opts.alpha, opts.min_effect)
    what = "times" if sb[0] == "samples_s" else "rounds"
    note = f"n={len(sb[1])}/{len(sn[1])} {what}, median {found.factor - 1:+.1%}"
    return Row(found.verdict, **values, p=found.p, note=note)


def _deterministic(key: Key, b: Record, n: Record, rule: Rule) -> Row:
    values = dict(key=key, check=rule.check, baseline=b.value, current=n.value, unit=n.unit)
    if rule.check == "info":
        return Row("not gated", **values, note=rule.why)
    allowed = 0.0 if rule.check == "exact" else rule.abs_tol + rule.rel_tol * abs(b.value)
    if abs(n.value - b.value) <= allowed:
        return Row("same", **values)
    worse = rule.direction is not None and (n.value > b.value) == (rule.direction == "lower")
    bound = "" if rule.check == "exact" else f"beyond {rule.abs_tol:g} + {rule.rel_tol:g} x |baseline|"
    return Row("regressed" if worse else "changed", **values, note=bound)


def compare_pair(key: Key, base: Entry, new: Entry, opts: Options) -> Row:
    """The verdict for one key present in both."""
    b, n = base.record, new.record
    if b.unit != n.unit:
        return Row("changed", key, "unit", b.value, n.value, n.unit, note=f"unit {b.unit} -> {n.unit}")
    rule = rule_for(n, samples(new) is not None)
    skip = _skip_reason(base, new, rule, opts)
    if skip is not None:
        return Row("skipped", key, rule.check, b.value, n.value, n.unit, note=skip)
    if rule.check == "statistical":
        return _statistical(key, base, new, rule, opts)
    return _deterministic(key, b, n, rule)


def _check_machines(results: list[Source]) -> None:
    ids = {s.machine_id for s in results}
    if len(ids) > 1:
        raise ResultsError("--results: files from different machines (" + ", ".join(
            f"{s.path}: {s.machine_id or 'unnamed'}" for s in results) + "); gate each machine's results alone")


def _check_selection(base: dict[Key, Entry], new: dict[Key, Entry], opts: Options) -> None:
    """A --metric in neither document is bad input."""
    present = {k[0] for k in (*base, *new)}
    for metric in opts.metrics:
        if metric not in present:
            raise ResultsError(f"--metric {metric}: no record of this metric in the baseline or the results")


def _check_machine_rule(baseline: Source, rows: list[Row], opts: Options) -> None:
    """Machine-dependent metrics asked for across machines without --any-machine are bad input: a --metric with
    records skipped for that reason, or (without --metric) a comparison where every common record was."""
    skipped = [r for r in rows if r.verdict == "skipped" and r.note == "another machine"]
    asked = sorted({r.key[0] for r in skipped if r.key[0] in opts.metrics})
    compared = [r for r in rows if r.verdict not in ("missing", "new")]
    if asked or (skipped and len(skipped) == len(compared)):
        what = f"--metric {asked[0]} is machine-dependent" if asked else "every record in common is machine-dependent"
        raise ResultsError(f"{baseline.path}: recorded on another machine ({baseline.describe_machine()}) and {what}; "
                           "pass --any-machine to compare anyway, or record a baseline on this machine with --update")


def gate(baseline: Source, results: list[Source], opts: Options, quiet: bool = True) -> Outcome:
    """Compare `results` (one machine) with `baseline` under `opts`, with a progress bar on stderr unless `quiet`;
    bad input is a ResultsError."""
    _check_machines(results)
    base, new = index([baseline]), index(results)
    _check_selection(base, new, opts)
    keys = [k for k in dict.fromkeys([*base, *new]) if not opts.metrics or k[0] in opts.metrics]
    if not any(k in base and k in new for k in keys):
        raise ResultsError(f"{baseline.path}: no record in common with the results (records pair by metric, "
                           "subject, profile, kind, method and their parameters): is it the baseline of this run?")
    rows = []
    with Progress(len(keys), "dsv3 gate", quiet=quiet) as progress:
        for key in keys:
            progress(f"{key[0]} {key[1]}")
            if key not in new:
                b = base[key].record
                rows.append(Row("missing", key, "", b.value, None, b.unit, note="in the baseline only"))
            elif key not in base:
                n = new[key].record
                rows.append(Row("new", key, "", None, n.value, n.unit, note="in the results only"))
            else:
                rows.append(compare_pair(key, base[key], new[key], opts))
            progress.advance()
    _check_machine_rule(baseline, rows, opts)
    notes = [f"baseline: {baseline.path} ({baseline.format}), machine {baseline.describe_machine()}",
             f"results: {', '.join(str(s.path) for s in results)}, machine {results[0].describe_machine()}"]
    missing, new_ = sum(r.verdict == "missing" for r in rows), sum(r.verdict == "new" for r in rows)
    if missing:
        notes.append(f"{missing} baseline records have no counterpart in the results ({new_} new ones): a suite "
                     "not run, or a changed parameter of the key (dtype, context, ...); --all lists them")
    unknown = sorted({k[0] for k in keys if k[3] == "measured" and not has_rule(k[0])})
    if unknown:
        notes.append(f"no rule for the measured metric(s) {', '.join(unknown)}: compared by their raw samples (a "
                     "change either way beyond the minimum effect fails), shown only without samples; add a row to "
                     "harness/gate/rules.py")
    skipped = sum(r.verdict == "skipped" and r.note == "another machine" for r in rows)
    if skipped:
        notes.append(f"{skipped} machine-dependent records not compared: the baseline comes from another machine "
                     "(--any-machine compares them)")
    return Outcome(rows, notes)
