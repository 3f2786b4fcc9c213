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


def test_each_training_run_of_a_seed_reports_its_steps():
    from dsv3ref.corpus import stdlib_corpus
    from dsv3ref.train import TrainConfig
    from harness.experiments import fp8_training

    steps = []
    tiny = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_batches=1)
    fp8_training.run_seed(fp8_training.experiment_config(), 0, tiny, stdlib_corpus(),
                          on_step=lambda run, step: steps.append((run, step)))
    assert steps == [(run, step) for run in range(fp8_training.RUNS_PER_SEED) for step in range(2)]


def test_the_fp8_experiment_reports_its_share_of_all_training_steps(monkeypatch):
    from harness.experiments import fp8_training

    def fake_run_seed(cfg, seed, train_cfg, corpus, on_step=None):  # the step callbacks of three runs, no training
        for run in range(fp8_training.RUNS_PER_SEED):
            for step in range(train_cfg.steps):
                on_step(run, step)
        return fp8_training.SeedResult(seed, 1.0, 1.0, 1.0, 0.0)

    monkeypatch.setitem(fp8_training.BUDGETS, "report", (2, (0, 1)))  # 2 steps, 2 seeds
    monkeypatch.setattr(fp8_training, "run_seed", fake_run_seed)
    messages, done = [], []
    fp8_training.fp8_vs_bf16("report", fp8_training.experiment_config(), corpus=object(),
                             progress=messages.append, fraction=done.append)
    assert len(messages) == 2
    assert done == [pytest.approx(k / 12) for k in range(1, 13)]  # 2 seeds x 3 runs x 2 steps, in order
