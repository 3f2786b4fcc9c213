"""`dsv3` end to end: the report reproduces the paper's analytic numbers; bad input exits 2 with one line."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.report import render
from harness.report_sections import Table
from harness.results import Record

USER_MODEL = ('vocab_size = 100\nhidden_size = 64\nnum_layers = 2\nintermediate_size = 128\n'
              '[attention]\nkind = "mqa"\nnum_heads = 8\n')


@pytest.fixture(scope="module")
def report_json(tmp_path_factory):
    """One full quick report (every section runs once for the whole module), with a user model added."""
    out = tmp_path_factory.mktemp("report")
    (out / "mine.toml").write_text(USER_MODEL)
    assert main(["report", "--format", "json", "--out", str(out), "--model", str(out / "mine.toml")]) == 0
    return json.loads((out / "results.json").read_text()), out


def _value(doc, metric, subject, profile=None, method=None, kind="analytic"):
    hits = [r for r in doc["results"] if r["metric"] == metric and r["subject"] == subject and r["kind"] == kind
            and r["profile"] == profile and (method is None or r["method"] == method)]
    assert len(hits) == 1, (metric, subject, profile, method)
    return hits[0]["value"]


def test_report_reproduces_the_papers_tables(report_json):
    doc, _ = report_json
    assert doc["schema"] == "dsv3-results/1" and doc["env"]["torch"].startswith("2.13.0")
    assert _value(doc, "kv_cache_bytes_per_token", "deepseek-v3-671b") == 70_272
    assert _value(doc, "kv_cache_bytes_per_token", "qwen2.5-72b") == 327_680
    assert _value(doc, "kv_cache_bytes_per_token", "llama3.1-405b") == 516_096
    for model, paper in (("deepseek-v3-671b", 250), ("deepseek-v2-236b", 155), ("qwen2.5-72b", 394),
                         ("llama3.1-405b", 2448)):
        assert _value(doc, "train_gflops_per_token", model, method="paper-table2") == pytest.approx(paper, rel=0.01)
    assert _value(doc, "params_total", "deepseek-v3-671b") == pytest.approx(671e9, rel=5e-3)
    assert 36.5e9 <= _value(doc, "params_activated", "deepseek-v3-671b") <= 38.0e9
    assert _value(doc, "tpot_ms", "deepseek-v3-671b", "h800", "paper-7k") == pytest.approx(14.76, rel=5e-3)
    assert _value(doc, "tokens_per_s", "deepseek-v3-671b", "h800", "paper-7k") == pytest.approx(67.76, rel=5e-3)
    assert _value(doc, "tpot_ms", "deepseek-v3-671b", "gb200-nvl72", "paper-7k") == pytest.approx(0.82, rel=5e-3)
    assert _value(doc, "tokens_per_s", "deepseek-v3-671b", "gb200-nvl72", "paper-7k") == pytest.approx(1220,
                                                                                                     rel=5e-3)


def test_report_predicts_v3_decode_per_profile_and_counts_model_flops(report_json):
    doc, _ = report_json
    h800 = [r for r in doc["results"] if r["metric"] == "tpot_ms" and r["method"] == "roofline"
            and r["profile"] == "h800"]
    assert len(h800) == 1 and h800[0]["paper"] == 14.76 and h800[0]["context"] == 4096 and h800[0]["batch"] == 32
    assert h800[0]["value"] >= h800[0]["all_to_all_ms"]  # the prediction includes the EP all-to-all
    counted = {(r["kind"], r["phase"]): r["value"] for r in doc["results"]
               if r["metric"] == "fwd_gflops_per_token" and r["subject"] == "dsv3-tiny"}
    assert counted[("measured", "decode")] == counted[("analytic", "decode")] > 0
    assert counted[("measured", "prefill")] == counted[("analytic", "prefill")]


def test_report_writes_markdown_and_flags_the_papers_inconsistencies(report_json):
    _, out = report_json
    md = (out / "report.md").read_text()
    assert "7.34x" in md and "7.28x is inconsistent" in md
    assert "## EP-communication bound on TPOT" in md


def test_user_model_is_added(report_json):
    doc, _ = report_json
    assert _value(doc, "kv_cache_bytes_per_token", "mine") == 2 * 2 * 1 * 8 * 2  # layers x K,V x 1 head x 8 x 2 B


@pytest.mark.parametrize("fmt", ["text", "github", "latex", "csv"])
def test_every_format_renders_every_table(report_json, fmt):
    doc, _ = report_json
    records = [Record.from_dict(r) for r in doc["results"]]
    table = Table("KV", ["model", "bytes"], [["deepseek-v3-671b", "70,272"]], records, ["a note"])
    out = render([table], doc["env"], fmt)
    if fmt == "csv":
        assert out.count("\n") == len(records) + 1 and "kv_cache_bytes_per_token,deepseek-v3-671b," in out
    else:
        assert "70,272" in out and "a note" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--profile", "nope"], "dsv3: error: unknown profile 'nope'; known: b200, gb200-nvl72"),
    (["report", "--model", "nope"], "dsv3: error: preset: unknown model 'nope'"),
    (["report", "--format", "xml"], "dsv3: error: dsv3 report: argument --format: invalid choice"),
    (["frobnicate"], "dsv3: error: dsv3: argument command: invalid choice"),
])
def test_bad_usage_is_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_malformed_profile_names_file_and_field(capsys, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "b"\ndescription = "d"\nkind = "gpu"\nbf16_dense_TFLOPS = { value = "fast", '
                    'source = "s" }\n')
    assert main(["report", "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.toml: field 'bf16_dense_TFLOPS': expected a positive number" in err and err.count("\n") == 1


def test_profiles_command(capsys):
    assert main(["profiles"]) == 0
    assert "gb200-nvl72" in capsys.readouterr().out
    assert main(["profiles", "h800"]) == 0
    assert "Insights §2.3.2/§4: one 400 Gb/s CX7" in capsys.readouterr().out
