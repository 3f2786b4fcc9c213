"""The results document (`dsv3-results/1`): records of analytic and measured metrics, written atomically.

RECORD = {"metric", "subject", "profile", "kind", "value", "unit", "paper", "method", ...extra keys}.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

SCHEMA = "dsv3-results/1"
KINDS = ("analytic", "measured")
REQUIRED = ("metric", "subject", "profile", "kind", "value", "unit", "paper", "method")


class ResultsError(ValueError):
    """A malformed results document or record."""


@dataclass(frozen=True)
class Record:
    """One metric value; `extra` holds additional keys (context length, raw samples, ...)."""

    metric: str
    subject: str
    value: float
    unit: str
    kind: str = "analytic"
    profile: str | None = None
    paper: float | None = None
    method: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ResultsError(f"record {self.metric}: kind: expected one of {KINDS}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ResultsError(f"record {self.metric}/{self.subject}: value: expected a finite number, "
                               f"got {self.value!r}")
        clash = set(self.extra) & set(REQUIRED)
        if clash:
            raise ResultsError(f"record {self.metric}: extra key {sorted(clash)[0]!r} shadows a required key")

    @property
    def deviation_pct(self) -> float | None:
        """(value - paper) / paper in percent, or None without a paper value."""
        if self.paper is None or self.paper == 0:
            return None
        return (self.value - self.paper) / self.paper * 100.0

    def to_dict(self) -> dict[str, Any]:
        d = {"metric": self.metric, "subject": self.subject, "profile": self.profile, "kind": self.kind,
             "value": self.value, "unit": self.unit, "paper": self.paper, "method": self.method}
        d.update(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        if not isinstance(d, dict):
            raise ResultsError(f"record: expected an object, got {type(d).__name__}")
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise ResultsError(f"record: missing required key {missing[0]!r}")
        extra = {k: v for k, v in d.items() if k not in REQUIRED}
        return cls(metric=d["metric"], subject=d["subject"], value=d["value"], unit=d["unit"], kind=d["kind"],
                   profile=d["profile"], paper=d["paper"], method=d["method"], extra=extra)


def document(records: list[Record], env: dict[str, Any]) -> dict[str, Any]:
    """The results document for `records`."""
    return {"schema": SCHEMA, "env": env, "results": [r.to_dict() for r in records]}


def write_atomic(path: str | Path, content: str | bytes) -> None:
    """Write `content` (text as UTF-8, or bytes) to `path` through a temp file in the same folder and a rename:
    never half-written.

    The file gets the mode a plain open() would give it (0o666 less the umask), so that others can read results the
    user's umask lets them read; the temp file is created exclusively, so it is never another writer's.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path, what: str = "results") -> Any:
    """The parsed JSON of a file; a missing, unreadable, non-UTF-8, truncated or malformed file is a ResultsError
    naming the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ResultsError(f"{path}: cannot read {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ResultsError(f"{path}: cannot read {what} (not UTF-8 text: byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: malformed JSON ({e})") from None


def validate_document(doc: Any, path: str | Path) -> dict[str, Any]:
    """`doc` if it is a results document of this schema version with valid records, else a ResultsError."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else None
        raise ResultsError(f"{path}: schema: expected {SCHEMA!r}" + (f", got {found!r}" if found else ""))
    if not isinstance(doc.get("results"), list):
        raise ResultsError(f"{path}: results: expected a list")
    for r in doc["results"]:
        Record.from_dict(r)
    return doc


def read_document(path: str | Path) -> dict[str, Any]:
    """Read and validate a results document."""
    return validate_document(read_json(path), path)


def append_records(path: str | Path, records: list[Record], env: dict[str, Any]) -> None:
    """Append records to the document at `path` (created if absent), atomically, under a lock file beside it
    (`.NAME.lock`), so that concurrent writers (separate sessions on one results file) lose no records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.name}.lock")):
        doc = read_document(path) if path.exists() else document([], env)
        doc["results"].extend(r.to_dict() for r in records)
        write_atomic(path, json.dumps(doc, indent=2) + "\n")
