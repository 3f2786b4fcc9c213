"""What the gate reads: a `dsv3-results/1` document or pytest-benchmark JSON (`--benchmark-json`, or a saved run
with `--benchmark-save-data`), as records with the machine they were measured on.

A pytest-benchmark entry becomes a record `pytest_benchmark_time` (unit s, measured) whose subject is the test's
full name (parameters included), value its median and `samples_s` its raw round times (`stats.data`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.environment import machine_id
from harness.results import SCHEMA, Record, ResultsError, document, read_json, validate_document

BENCHMARK_METRIC = "pytest_benchmark_time"
FORMATS = ("dsv3-results", "pytest-benchmark")


@dataclass(frozen=True)
class Source:
    """One file the gate read: its records, format, machine (`{"id": ..., ...}`, {} when it names none) and the
    document itself (what --update writes back)."""

    path: Path
    format: str
    records: tuple[Record, ...]
    machine: dict[str, Any]
    doc: dict[str, Any]

    @property
    def machine_id(self) -> str | None:
        return self.machine.get("id")

    def describe_machine(self) -> str:
        """'a4a2a964f7ad (vm: AMD EPYC, 2 CPUs, Linux x86_64)', or a note that the file names no machine."""
        m = self.machine
        if not m.get("id"):
            return "an unknown machine (the document has no env.machine)"
        return f"{m['id']} ({m.get('hostname')}: {m.get('cpu')}, {m.get('cpu_count')} CPUs, {m.get('os')} " \
               f"{m.get('arch')}" + (f", {m['gpu']}" if m.get("gpu") else "") + ")"


def _dsv3_source(path: Path, doc: Any) -> Source:
    doc = validate_document(doc, path)
    env = doc.get("env") if isinstance(doc.get("env"), dict) else {}
    machine = env.get("machine") if isinstance(env.get("machine"), dict) else {}
    return Source(path, "dsv3-results", tuple(Record.from_dict(r) for r in doc["results"]), machine, doc)


def finite_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in value)


def benchmark_record(entry: Any, where: str) -> Record:
    """One pytest-benchmark entry as a record (see the module docstring)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("fullname"), str):
        raise ResultsError(f"{where}: fullname: expected a string")
    stats = entry.get("stats")
    if not isinstance(stats, dict) or not finite_list([stats.get("median")]):
        raise ResultsError(f"{where}: stats.median: expected a finite number")
    extra: dict[str, Any] = {"rounds": stats.get("rounds"), "extra_info": entry.get("extra_info") or {}}
    if "data" in stats:
        if not finite_list(stats["data"]) or not stats["data"]:
            raise ResultsError(f"{where}: stats.data: expected a list of finite numbers (seconds)")
        extra["samples_s"] = stats["data"]
    return Record(BENCHMARK_METRIC, entry["fullname"], stats["median"], "s", kind="measured",
                  method="pytest-benchmark", extra=extra)


def benchmark_machine(info: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's machine_info in the shape of env.machine (harness.environment.machine), same id."""
    cpu = info.get("cpu") if isinstance(info.get("cpu"), dict) else {}
    fields = {"hostname": info.get("node"), "cpu": cpu.get("brand_raw"), "cpu_count": cpu.get("count"),
              "arch": info.get("machine"), "os": info.get("system")}
    return {"id": machine_id(fields), **fields}


def _benchmark_source(path: Path, doc: dict[str, Any]) -> Source:
    if not isinstance(doc.get("benchmarks"), list):
        raise ResultsError(f"{path}: benchmarks: expected a list (pytest-benchmark JSON)")
    if not isinstance(doc.get("machine_info"), dict):
        raise ResultsError(f"{path}: machine_info: expected an object (pytest-benchmark JSON)")
    records = tuple(benchmark_record(b, f"{path}: benchmarks[{i}]") for i, b in enumerate(doc["benchmarks"]))
    return Source(path, "pytest-benchmark", records, benchmark_machine(doc["machine_info"]), doc)


def read_source(path: str | Path) -> Source:
    """A results document or pytest-benchmark JSON; anything else is a one-line ResultsError."""
    path = Path(path)
    doc = read_json(path)
    if isinstance(doc, dict) and "schema" not in doc and "benchmarks" in doc:
        return _benchmark_source(path, doc)
    if isinstance(doc, dict) and "schema" in doc:
        return _dsv3_source(path, doc)
    raise ResultsError(f"{path}: expected a results document ({SCHEMA!r}) or pytest-benchmark JSON, got neither")


def baseline_text(doc: dict[str, Any]) -> str:
    """A results document as a baseline file: its env indented, then one record per line, so that a re-recorded
    baseline diffs record by record and the file stays small (no line per sample)."""
    head = json.dumps({k: v for k, v in doc.items() if k != "results"}, indent=2)[:-2]  # without "\n}"
    records = ",\n".join("    " + json.dumps(r) for r in doc["results"])
    return f'{head},\n  "results": [\n{records}\n  ]\n}}\n'


def merged_text(sources: list[Source]) -> str:
    """What --update records: the one document as read (pytest-benchmark JSON as it was), or the records of several
    (from one machine) in one results document whose env is the first dsv3 document's (or names the machine
    alone)."""
    if len(sources) == 1 and sources[0].format != "dsv3-results":
        return json.dumps(sources[0].doc, indent=2) + "\n"
    if len(sources) == 1:
        return baseline_text(sources[0].doc)
    env = next((s.doc.get("env", {}) for s in sources if s.format == "dsv3-results"), {"machine": sources[0].machine})
    env = {**env, "merged_from": [s.path.name for s in sources]}
    return baseline_text(document([r for s in sources for r in s.records], env))
