"""The results document: records validate, files are written atomically and appended, malformed files are named."""

from __future__ import annotations

import json
import math
import os

import pytest

from harness.results import Record, ResultsError, append_records, document, read_document, write_atomic


def test_record_round_trip_and_deviation():
    r = Record("kv_cache_bytes_per_token", "m", 110.0, "B", paper=100.0, extra={"context": 4})
    assert Record.from_dict(r.to_dict()) == r
    assert r.deviation_pct == pytest.approx(10.0)
    assert Record("x", "m", 1.0, "B").deviation_pct is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1", True])
def test_record_rejects_non_finite_values(bad):
    with pytest.raises(ResultsError, match="value: expected a finite number"):
        Record("x", "m", bad, "B")


def test_record_rejects_bad_kind_and_shadowing_extra():
    with pytest.raises(ResultsError, match="kind: expected one of"):
        Record("x", "m", 1.0, "B", kind="guessed")
    with pytest.raises(ResultsError, match="shadows a required key"):
        Record("x", "m", 1.0, "B", extra={"paper": 3})


def test_append_creates_then_extends(tmp_path):
    path = tmp_path / "out" / "results.json"
    append_records(path, [Record("a", "m", 1.0, "B", kind="measured")], {"device": "cpu"})
    append_records(path, [Record("b", "m", 2.0, "B", kind="measured")], {"device": "cpu"})
    doc = read_document(path)
    assert doc["schema"] == "dsv3-results/1"
    assert [r["metric"] for r in doc["results"]] == ["a", "b"]
    # no temp file left behind; the lock file that serialises concurrent writers stays beside it, by design
    assert sorted(os.listdir(path.parent)) == [".results.json.lock", "results.json"]


def test_write_atomic_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_atomic_honours_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "report.md").st_mode & 0o777 == mode


def test_malformed_documents_are_named(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("{")
    with pytest.raises(ResultsError, match="r.json: malformed JSON"):
        read_document(path)
    path.write_bytes(b'{"schema": "\xe9"}')
    with pytest.raises(ResultsError, match="r.json: cannot read results \\(not UTF-8 text: byte 12\\)"):
        read_document(path)
    path.write_text(json.dumps({"schema": "other", "results": []}))
    with pytest.raises(ResultsError, match="schema: expected 'dsv3-results/1'"):
        read_document(path)
    path.write_text(json.dumps(document([], {}) | {"results": [{"metric": "a"}]}))
    with pytest.raises(ResultsError, match="missing required key 'subject'"):
        read_document(path)
