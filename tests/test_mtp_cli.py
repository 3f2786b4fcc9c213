"""`dsv3 train` and the MTP bench's cached run: a short run prints its loss curve and writes checkpoints, a
resume continues it, bad input is one line; the bench trains a run once and reuses it."""

from __future__ import annotations

import json

import pytest

from dsv3ref.config import ModelConfig
from dsv3ref.generate import Sampling
from dsv3ref.train import TrainConfig
from harness.bench import mtp as bench
from harness.cli import main

SHORT = ["--model", "dsv3-tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--threads", "1"]


def test_train_command_and_resume(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SHORT, "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "dsv3-tiny: 2 steps, batch 2 x 16 bytes, fp32 on cpu" in text and "mtp1" in text
    assert sorted(p.name for p in out.iterdir()) == ["step-000001", "step-000002"]
    assert main(["train", *SHORT, "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 2
    assert "holds checkpoints of a run" in capsys.readouterr().err
    assert main(["train", *SHORT, "--steps", "2", "--checkpoint-every", "1", "--out", str(out), "--resume"]) == 0
    assert len(json.loads((out / "step-000002" / "history.json").read_text())["total"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--seq-len", "1"], "mtp_depth: expected < the sequence length 1"),
    (["--model", "deepseek-v2-lite-16b"], "mtp_depth: expected >= 1 to train MTP modules"),
    (["--mtp-lambda", "-1"], "mtp_lambda: expected a value >= 0"),
])
def test_train_bad_input_is_one_line(capsys, tmp_path, args, message):
    assert main(["train", *SHORT, "--steps", "1", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dsv3: error: ") and message in err[-1]


def test_bench_trains_once_and_measures(monkeypatch, tmp_path):
    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path))
    cfg = ModelConfig.preset("dsv3-tiny")
    plan = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1, precision="fp32")
    out, history = bench.trained(cfg, "cpu", tcfg=plan)
    assert out.parent == tmp_path / "mtp" and len(history.total) == 2
    monkeypatch.setattr(bench, "train_mtp", lambda *a, **k: pytest.fail("trained twice"))
    assert bench.trained(cfg, "cpu", tcfg=plan)[0] == out
    model, mtp = bench.load_step(out, 2, "cpu")
    a = bench.acceptance(model, mtp, 2, Sampling(), rows=[[1, 2, 3], [4, 5]])
    r = bench.acceptance_record(a, "cpu")
    assert r.metric == "mtp_acceptance_rate" and r.value == a.gen.accepted / a.gen.drafted
    assert r.extra["steps_trained"] == 2 and r.extra["batch"] == 2 and r.extra["sampling"] == "greedy"
    assert r.paper == 0.85
    assert r.extra["mean_accepted_length"] == 1 + a.gen.accepted / (a.gen.row_forwards - 2)
    greedy, sampled = bench.text_acceptance(model, mtp, windows=2, length=16)
    assert 0 <= greedy <= 1 and 0 < sampled <= 1
    _, gen, s = bench.speedup(model, mtp, 2, "cpu", reps=1, new_tokens=4)
    assert s.metric == "mtp_speedup" and s.kind == "measured" and s.paper == 1.8 and s.extra["new_tokens"] == 4


def test_report_section_tables_and_records(monkeypatch, tmp_path):
    """The `mtp` section of `dsv3 report --full` on a 2-step run: both tables, the records the issue names."""
    from hardware.profile import load_profile
    from harness.report_sections import ReportContext, sections

    (section,) = [s for s in sections(full=True) if s.name == "mtp"]

    monkeypatch.setenv("DSV3_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(bench, "PLAN", TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=1,
                                                   precision="fp32"))
    for name, value in (("CHECKPOINT_EVERY", 1), ("ACCEPT_STEPS", (1, 2)), ("NEW_TOKENS", 4), ("PROMPTS", 2),
                        ("SPEED_NEW_TOKENS", 4)):
        monkeypatch.setattr(bench, name, value)
    local = load_profile("h800")  # stands in for the probed local profile (minutes to probe); only named here
    ctx = ReportContext(models=(), profiles=(local,), local=local, device="cpu", full=True, progress=lambda m: None)
    summary, steps = section.run(ctx)
    metrics = [(r.metric, r.subject) for r in summary.records]
    assert metrics == [("mtp_acceptance_rate", "dsv3-tiny@2")] * 2 + [("mtp_speedup", "dsv3-tiny@2")]
    assert [r.extra["sampling"] for r in summary.records[:2]] == ["greedy", "temperature 1.0"]
    assert [row[0] for row in steps.rows] == [1, 2] and len(steps.records) == 2
    assert "1.80x" in summary.rows[-1]
