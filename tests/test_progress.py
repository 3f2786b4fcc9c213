"""Progress on stderr: a bar on a terminal, nothing when stderr is not one or under --quiet."""

from __future__ import annotations

import io

import pytest

from harness.progress import Progress, notify


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_silent_when_not_a_terminal_or_quiet():
    for stream, quiet in ((io.StringIO(), False), (Terminal(), True)):
        with Progress(3, "run", quiet=quiet, stream=stream) as progress:
            progress("section 1")
            progress.fraction(0.5)
            progress.advance()
        assert not progress.enabled and stream.getvalue() == ""


def test_a_bar_with_the_current_message_and_fractional_units_on_a_terminal():
    stream = Terminal()
    with Progress(4, "dsv3 report", stream=stream) as progress:
        progress("[1/4] " + "x" * 200)
        progress.advance()
        progress.fraction(0.5)  # half of the second unit: 1.5 of 4
        shown = stream.getvalue()
    assert "dsv3 report" in shown and " 38%" in shown  # 1.5 / 4, rounded
    assert "[1/4] xxx" in shown and "x" * 100 not in shown  # long messages are cut to one line


def test_notify_is_silenced_by_quiet(capsys):
    notify("wrote report.md", quiet=True)
    notify("wrote results.json")
    assert capsys.readouterr().err == "wrote results.json\n"


_TINY = dict(seeds=2, steps=5, batch_size=2, seq_len=16, eval_batches=1, overhead_reps=2)


def test_each_training_run_of_a_seed_reports_its_steps(monkeypatch):
    from dsv3ref.config import ModelConfig
    from dsv3ref.corpus import stdlib_corpus
    from dsv3ref.train import TrainResult
    from harness.experiments import fp8_training

    def fake_train(model, corpus, cfg, progress=None):  # train's step callbacks, no training
        for step in range(cfg.steps):
            progress(step, 1.0)
        return TrainResult([1.0] * cfg.steps, [(cfg.steps // 2, 1.0), (cfg.steps, 1.0)], [1.0])

    monkeypatch.setattr(fp8_training, "train", fake_train)
    done = []
    fp8_training.run_seed(fp8_training.Budget(**_TINY), ModelConfig.preset("dsv3-tiny-fp8"), 0, stdlib_corpus(),
                          fraction=done.append)
    runs = len(fp8_training.RUNS)
    assert done == [pytest.approx((run + (step + 1) / 5) / runs) for run in range(runs) for step in range(5)]


def test_the_fp8_experiment_reports_its_share_of_all_training_steps(monkeypatch):
    from dsv3ref.config import ModelConfig
    from harness.experiments import fp8_training

    def fake_run_seed(budget, cfg, seed, corpus, progress, label, fraction):  # the step callbacks, no training
        runs = len(fp8_training.RUNS)
        for run in range(runs):
            for step in range(budget.steps):
                fraction((run + (step + 1) / budget.steps) / runs)
        return fp8_training.SeedResult(seed, {}, {}, 0.0, {})

    monkeypatch.setattr(fp8_training, "run_seed", fake_run_seed)
    monkeypatch.setattr(fp8_training, "step_overhead", lambda budget, cfg, corpus: None)
    messages, done = [], []
    fp8_training.run_experiment(fp8_training.Budget(**_TINY), ModelConfig.preset("dsv3-tiny-fp8"), corpus=object(),
                                progress=messages.append, fraction=done.append)
    assert len(messages) == 1  # the step-time comparison; the seeds' messages come from run_seed
    # the step-time comparison's 2 x (2 warm-up + 2 timed) steps, then 2 seeds x 3 runs x 5 steps, in order
    assert done == [pytest.approx(k / 38) for k in range(8, 39)]
