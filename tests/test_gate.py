"""`dsv3 gate`: the statistical rule's self-test on synthetic samples, the per-metric rules, record keys, machines,
pytest-benchmark JSON, and the command's exit codes (0 pass, 1 regression with a table, 2 bad input)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from harness.cli import main
from harness.gate import stats
from harness.gate.compare import Options, gate, record_key
from harness.gate.rules import ANALYTIC, KEY_EXTRAS, UNKNOWN, UNKNOWN_TIMING, has_rule, rule_for
from harness.gate.sources import BENCHMARK_METRIC, read_source
from harness.results import Record, document

TRIALS = 50
SAMPLES = 10  # the fewest rounds a default-size perf case records


def _times(rng: np.random.Generator, n: int, scale: float = 1.0) -> list[float]:
    """n timings of 10 ms with 5% Gaussian noise, times `scale`."""
    return list(0.010 * scale * (1 + 0.05 * rng.standard_normal(n)))


@pytest.mark.parametrize("n", [SAMPLES, 30])
def test_no_false_alarm_in_50_trials_without_a_change(n):
    rng = np.random.default_rng(0)
    verdicts = [stats.shift(_times(rng, n), _times(rng, n), "lower").verdict for _ in range(TRIALS)]
    assert verdicts.count("regressed") == 0 and verdicts.count("improved") == 0


@pytest.mark.parametrize("n", [SAMPLES, 30])
def test_a_25_percent_slowdown_is_detected_in_at_least_48_of_50(n):
    rng = np.random.default_rng(1)
    verdicts = [stats.shift(_times(rng, n), _times(rng, n, 1.25), "lower").verdict for _ in range(TRIALS)]
    assert verdicts.count("regressed") >= 48


def test_ratios_gate_on_their_per_round_samples_in_their_direction():
    """A speedup (higher is better) that drops by 25% regressed; one that rises improved; times are the reverse."""
    rng = np.random.default_rng(2)
    base = [3.0 * (1 + 0.05 * e) for e in rng.standard_normal(SAMPLES)]
    assert stats.shift(base, [v / 1.25 for v in base], "higher").verdict == "regressed"
    assert stats.shift(base, [v * 1.25 for v in base], "higher").verdict == "improved"
    assert stats.shift(base, [v * 1.25 for v in base], "lower").verdict == "regressed"
    assert stats.shift(base, [v * 1.25 for v in base], None).verdict == "changed"


def test_a_significant_change_below_the_minimum_effect_does_not_count():
    base = [1.0 + 0.001 * i for i in range(30)]
    slower = [v * 1.05 for v in base]  # every sample 5% slower: p tiny, effect under 10%
    found = stats.shift(base, slower, "lower")
    assert found.p < stats.ALPHA and found.verdict == "same"
    assert stats.shift(base, slower, "lower", min_effect=0.04).verdict == "regressed"


def test_the_smallest_p_value_bounds_what_few_samples_can_show():
    assert stats.min_p_value(5, 5) == pytest.approx(1 / 252)
    assert not stats.enough_samples(5, 5, "lower") and stats.enough_samples(6, 6, "lower")
    assert not stats.enough_samples(6, 6, None)  # two-sided: 2 / 924 > 0.002
    assert stats.shift([1.0] * 8, [1.0] * 8, "lower").verdict == "same"  # all tied: no evidence


# --- documents ------------------------------------------------------------------------------------------------------

MACHINE = {"id": "aaaaaaaaaaaa", "hostname": "here", "cpu": "CPU A", "cpu_count": 2, "arch": "x86_64", "os": "Linux"}
OTHER = {**MACHINE, "id": "bbbbbbbbbbbb", "hostname": "there"}


def _speedup(per_round: list[float], **extra) -> Record:
    return Record("moe_speedup", "grouped-vs-loop", float(np.median(per_round)), "x", kind="measured",
                  method="median of per-round time ratios, interleaved",
                  extra={"tokens": 16, "threads": 2, "per_round": per_round, **extra})


def _records(per_round: list[float] | None = None, kv: float = 70272.0, err: float = 0.01) -> list[Record]:
    rng = np.random.default_rng(3)
    return [Record("kv_cache_bytes_per_token", "deepseek-v3-671b", kv, "B", method="bf16"),
            Record("roundtrip_rel_rms_error", "e4m3", err, "ratio", kind="measured", method="1x128-tiles",
                   extra={"tokens": 256}),
            _speedup(per_round or [2.0 * (1 + 0.05 * e) for e in rng.standard_normal(SAMPLES)])]


def _write(path, records: list[Record], machine: dict | None = MACHINE):
    path.write_text(json.dumps(document(records, {"machine": machine} if machine else {})))
    return path


@pytest.fixture
def base(tmp_path):
    return _write(tmp_path / "baseline.json", _records())


def _gate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["gate", "--quiet", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_identical_documents_pass(base, capsys):
    code, out, err = _gate(capsys, "--baseline", base, "--results", base)
    assert code == 0 and err == ""
    assert "gate: 3 same -> passed" in out


def test_a_regression_exits_1_with_a_table_of_what_moved(base, tmp_path, capsys):
    slow = [v / 1.25 for v in _records()[2].extra["per_round"]]
    results = _write(tmp_path / "r.json", _records(per_round=slow))
    code, out, _ = _gate(capsys, "--baseline", base, "--results", results)
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("regressed"))
    assert "moe_speedup" in row and "grouped-vs-loop" in row and "-20.00%" in row
    assert "1 regressed, 2 same -> FAILED" in out


def test_any_change_of_an_analytic_value_fails(base, tmp_path, capsys):
    results = _write(tmp_path / "r.json", _records(kv=70272.0 * (1 + 1e-12)))
    code, out, _ = _gate(capsys, "--baseline", base, "--results", results)
    assert code == 1 and "kv_cache_bytes_per_token" in out and "exact" in out


def test_a_deterministic_measurement_fails_beyond_its_tolerance_only(base, tmp_path, capsys):
    within = _write(tmp_path / "within.json", _records(err=0.01 * (1 + 1e-4)))  # rel_tol 1e-3
    assert _gate(capsys, "--baseline", base, "--results", within)[0] == 0
    beyond = _write(tmp_path / "beyond.json", _records(err=0.01 * 0.99))  # better, but beyond: it changed
    code, out, _ = _gate(capsys, "--baseline", base, "--results", beyond)
    assert code == 1 and "changed" in out and "roundtrip_rel_rms_error" in out


def test_pytest_benchmark_json_is_read_with_its_raw_rounds(tmp_path, capsys):
    rng = np.random.default_rng(4)

    def bench_json(path, scale):
        doc = {"machine_info": {"node": "here", "machine": "x86_64", "system": "Linux",
                                "cpu": {"brand_raw": "CPU A", "count": 2}},
               "benchmarks": [{"fullname": "suites/performance/test_x.py::test_y[a]", "extra_info": {},
                               "stats": {"median": 0.01 * scale, "rounds": 20, "data": _times(rng, 20, scale)}}]}
        path.write_text(json.dumps(doc))
        return path

    base, slow = bench_json(tmp_path / "b.json", 1.0), bench_json(tmp_path / "s.json", 1.3)
    source = read_source(base)
    assert source.format == "pytest-benchmark" and source.records[0].metric == BENCHMARK_METRIC
    assert len(source.records[0].extra["samples_s"]) == 20
    assert _gate(capsys, "--baseline", base, "--results", base)[0] == 0
    code, out, _ = _gate(capsys, "--baseline", base, "--results", slow)
    assert code == 1 and "test_x.py::test_y[a]" in out


def test_records_are_keyed_by_their_parameters_not_their_results():
    a = Record("tpot_ms", "m", 1.0, "ms", kind="measured", extra={"context": 512, "batch": 1, "loadavg_1min": 0.5})
    b = Record("tpot_ms", "m", 2.0, "ms", kind="measured", extra={"context": 512, "batch": 1, "loadavg_1min": 3.0})
    c = Record("tpot_ms", "m", 1.0, "ms", kind="measured", extra={"context": 4096, "batch": 1})
    assert record_key(a) == record_key(b) != record_key(c)
    assert {"context", "batch", "tokens", "dtype", "device"} <= set(KEY_EXTRAS)


def test_rules_analytic_exact_known_measured_by_table_unknown_by_samples():
    assert rule_for(Record("kv_cache_bytes_per_token", "m", 1.0, "B"), False) .check == ANALYTIC.check
    assert rule_for(Record("mtp_speedup", "m", 1.0, "x", kind="measured"), True).direction == "higher"
    assert rule_for(Record("tpot_ms", "m", 1.0, "ms", kind="measured"), True).machine_dependent
    assert rule_for(Record("new_metric", "m", 1.0, "x", kind="measured"), True) == UNKNOWN_TIMING
    assert rule_for(Record("new_metric", "m", 1.0, "x", kind="measured"), False) == UNKNOWN
    local = Record("tpot_ms", "m", 1.0, "ms", profile="local", method="roofline")
    assert rule_for(local, False).check == "info"


ROOT = Path(__file__).resolve().parent.parent
RECORDED = re.compile(r"(?:Record|speedup_record)\(\s*\"([A-Za-z0-9_]+)\"")  # a record builder's literal metric id


def test_every_metric_the_project_records_has_a_rule():
    """Every metric id a record builder names (harness/, suites/) and every one in the committed baseline is
    decided by the rule table: a component that adds a metric adds its row."""
    sources = [p for d in ("harness", "suites") for p in (ROOT / d).rglob("*.py")]
    named = {m for p in sources for m in RECORDED.findall(p.read_text())}
    baseline = {r["metric"] for r in json.loads((ROOT / "ci" / "perf-baseline.json").read_text())["results"]}
    assert {"ep_throughput_GBps_per_rank", "fp8_step_overhead", "decode_speedup", "tpot_ms"} <= named | baseline
    assert sorted(m for m in named | baseline if not has_rule(m)) == []


def test_a_measured_metric_without_a_rule_is_compared_and_named(tmp_path):
    rng = np.random.default_rng(3)
    base = Record("new_metric", "m", 1.0, "x", kind="measured", extra={"per_round": _times(rng, SAMPLES)})
    moved = Record("new_metric", "m", 1.0, "x", kind="measured", extra={"per_round": _times(rng, SAMPLES, 0.7)})
    outcome = gate(*_sources(tmp_path, [base], [moved]), Options())
    assert outcome.rows[0].verdict == "changed" and outcome.failed  # no direction known: a move either way fails
    assert any("no rule for the measured metric(s) new_metric" in n for n in outcome.notes)


def _sources(tmp_path, base_records, new_records, base_machine=MACHINE, new_machine=MACHINE):
    return (read_source(_write(tmp_path / "b.json", base_records, base_machine)),
            [read_source(_write(tmp_path / "n.json", new_records, new_machine))])


def test_timings_from_another_machine_or_thread_count_are_skipped(tmp_path):
    slow = [v / 1.25 for v in _records()[2].extra["per_round"]]
    outcome = gate(*_sources(tmp_path, _records(), _records(per_round=slow), new_machine=OTHER), Options())
    assert not outcome.failed and {r.verdict for r in outcome.rows} == {"same", "skipped"}
    assert "not compared" in outcome.notes[-1]
    assert gate(*_sources(tmp_path, _records(), _records(per_round=slow), new_machine=OTHER),
                Options(any_machine=True)).failed
    four = [_records()[0], _records()[1], _speedup(slow, threads=4)]
    row = gate(*_sources(tmp_path, _records(), four), Options()).rows[2]
    assert (row.verdict, row.note) == ("skipped", "threads 2 vs 4")


def test_too_few_samples_are_not_gated_and_said_so(tmp_path):
    few = [_speedup([2.0, 2.1, 1.9, 2.0, 2.05])]
    outcome = gate(*_sources(tmp_path, few, [_speedup([1.0, 1.1, 0.9, 1.0, 1.05])]), Options())
    assert outcome.rows[0].verdict == "not gated" and "too few samples (5 and 5" in outcome.rows[0].note


def test_update_records_the_results_atomically(base, tmp_path, capsys):
    target = tmp_path / "ci" / "baseline.json"
    assert _gate(capsys, "--baseline", target, "--results", base, "--update")[0] == 0
    assert json.loads(target.read_text()) == json.loads(base.read_text())
    records = len(json.loads(base.read_text())["results"])
    assert sum(line.startswith('    {"metric"') for line in target.read_text().splitlines()) == records  # one a line
    assert sorted(os.listdir(target.parent)) == ["baseline.json"]  # no temp file left
    assert _gate(capsys, "--baseline", target, "--results", base)[0] == 0


# --- bad input: one line, exit 2, nothing overwritten ---------------------------------------------------------------

def _bad(capsys, *args) -> str:
    code, out, err = _gate(capsys, *args)
    assert code == 2 and out == ""
    assert err.startswith("dsv3: error: ") and err.count("\n") == 1, err
    return err


def test_a_baseline_of_another_schema_version(base, tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "dsv3-results/0", "env": {}, "results": []}))
    err = _bad(capsys, "--baseline", old, "--results", base)
    assert "schema: expected 'dsv3-results/1', got 'dsv3-results/0'" in err
    _bad(capsys, "--baseline", old, "--results", base, "--update")
    assert json.loads(old.read_text())["schema"] == "dsv3-results/0"  # not overwritten


@pytest.mark.parametrize("text", ['{"schema": "dsv3-results/1", "env": {}, "resu', "", "[1, 2]",
                                  '{"benchmarks": [{"fullname": "t", "stats": {}}], "machine_info": {}}'])
def test_a_corrupt_or_truncated_results_file(base, tmp_path, capsys, text):
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    before = base.read_text()
    assert "bad.json" in _bad(capsys, "--baseline", base, "--results", bad)
    _bad(capsys, "--baseline", base, "--results", bad, "--update")
    assert base.read_text() == before


def test_another_machine_on_machine_dependent_metrics_only(tmp_path, capsys):
    base = _write(tmp_path / "b.json", [_records()[2]])
    there = _write(tmp_path / "r.json", [_records()[2]], OTHER)
    assert "another machine" in _bad(capsys, "--baseline", base, "--results", there)
    both = _write(tmp_path / "both.json", _records(), OTHER)
    assert "--metric moe_speedup is machine-dependent" in _bad(capsys, "--baseline", _write(
        tmp_path / "b2.json", _records()), "--results", both, "--metric", "moe_speedup")
    assert _gate(capsys, "--baseline", base, "--results", there, "--any-machine")[0] == 0


def test_other_bad_input(base, tmp_path, capsys):
    twice = _write(tmp_path / "twice.json", _records() + _records()[:1])
    assert "two records with key" in _bad(capsys, "--baseline", base, "--results", twice)
    unrelated = _write(tmp_path / "u.json", [Record("params_total", "x", 1.0, "count")])
    assert "no record in common" in _bad(capsys, "--baseline", base, "--results", unrelated)
    assert "--metric nope" in _bad(capsys, "--baseline", base, "--results", base, "--metric", "nope")
    assert "missing.json: cannot read" in _bad(capsys, "--baseline", tmp_path / "missing.json", "--results", base)
    assert "--alpha" in _bad(capsys, "--baseline", base, "--results", base, "--alpha", "2")
    readme = tmp_path / "README.md"
    readme.write_text("# not a baseline\n")
    _bad(capsys, "--baseline", readme, "--results", base, "--update")
    assert readme.read_text() == "# not a baseline\n"

