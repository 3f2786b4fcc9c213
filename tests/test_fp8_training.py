"""The FP8-vs-BF16 training experiment: its statistics, its records and tables on a tiny budget, a diverging run,
bad settings, and `dsv3 experiment fp8-training` end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
from scipy import stats

from dsv3ref.config import ModelConfig
from dsv3ref.corpus import stdlib_corpus
from harness.cli import main
from harness.experiments import fp8_training as ft
from harness.results import Record

TINY_BUDGET = ft.Budget(seeds=2, steps=5, batch_size=2, seq_len=16, eval_batches=3, overhead_reps=2)
TINY_ARGS = ["--budget", "report", "--seeds", "2", "--steps", "5", "--batch-size", "2", "--seq-len", "16",
             "--eval-batches", "3", "--threads", "1"]


def test_gap_summary_is_the_t_interval_of_the_mean():
    gaps = [0.001, -0.002, 0.0005, 0.003, -0.001]  # fractions; the summary is in percent
    s = ft.gap_summary(gaps)
    pct = [g * 100 for g in gaps]
    mean = sum(pct) / 5
    sd = math.sqrt(sum((p - mean) ** 2 for p in pct) / 4)
    half = stats.t.ppf(0.975, 4) * sd / math.sqrt(5)  # 2.776 sd / sqrt(5)
    assert s["mean"] == pytest.approx(mean, rel=1e-12) and s["sd"] == pytest.approx(sd, rel=1e-12)
    assert s["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-12)
    assert s["half_width"] == pytest.approx(2.7764451 * sd / math.sqrt(5), rel=1e-6)
    assert s["mean_abs"] == pytest.approx(sum(abs(p) for p in pct) / 5, rel=1e-12)
    assert ft.gap_summary([0.01])["ci95"] is None


@pytest.mark.parametrize("gaps,resolved", [
    ([0.0005, -0.0005, 0.001, 0.0, -0.001], True),  # mean 0, interval about +-0.1%
    ([0.002, 0.0022, 0.0021, 0.0023, 0.0024], True),  # mean 0.22%, interval inside 0.25%
    ([0.002, 0.003, 0.0025, 0.0028, 0.0022], False),  # the interval reaches past 0.25%
    ([0.01, -0.01, 0.0, 0.005, -0.005], False),  # mean 0 but the interval is wider than +-0.25%
])
def test_resolution_needs_the_interval_inside_the_bound(gaps, resolved):
    assert ft.resolves(ft.gap_summary(gaps)) is resolved


@pytest.mark.parametrize("gaps,verdict", [
    ([0.0005, -0.0005, 0.001, 0.0, -0.001], r"^resolved: FP8 stays within 0.25% of BF16 here: mean \|gap\| 0.060%"),
    ([0.01, 0.011, 0.012, 0.0105, 0.0115], r"^resolved against the bound: .* lies entirely beyond ±0.25%"),
    ([0.01, -0.01, 0.0, 0.005, -0.005], r"^not resolved at this budget: .*\(resolution ±0.982%\) .* cannot decide"),
    ([0.01], "^not resolved: one seed gives no confidence interval"),
])
def test_verdict_says_in_words_whether_the_budget_settles_the_bound(gaps, verdict):
    s = ft.gap_summary(gaps)
    record = Record("fp8_rel_loss_gap", "fp8-vs-bf16", s["mean"], "%", kind="measured",
                    extra={**s, "bound": ft.PAPER_BOUND, "resolved": ft.resolves(s)})
    assert re.match(verdict, ft.verdict(record))


@pytest.fixture(scope="module")
def tiny_result():
    return ft.run_experiment(TINY_BUDGET, ModelConfig.preset("dsv3-tiny-fp8"), stdlib_corpus())


def test_records_of_a_tiny_run(tiny_result):
    fp8, noise, *curves, overhead = ft.records(tiny_result)
    assert [(c.metric, c.subject, c.extra["seed"]) for c in curves] == [
        ("train_loss", run, seed) for seed in (0, 1) for run in ft.RUNS]
    assert all(c.extra["curve_steps"] == [1, 2, 3, 4, 5] and c.value == c.extra["curve_loss"][-1] for c in curves)
    assert (fp8.metric, fp8.subject, noise.subject) == ("fp8_rel_loss_gap", "fp8-vs-bf16", "bf16-seed-noise")
    for r, run in ((fp8, "fp8"), (noise, "bf16_other_order")):
        for key in ("ci95", "mean_abs", "per_seed", "seeds", "steps", "tokens", "val_loss_bf16", "last20_change",
                    "half_width", "val_sem_rel", "val_gap_sem", "fp8_path", "threads", f"val_loss_{run}"):
            assert key in r.extra, key
        per_seed = [(a - b) / b * 100 for a, b in zip(r.extra[f"val_loss_{run}"], r.extra["val_loss_bf16"],
                                                       strict=True)]
        assert r.extra["per_seed"] == pytest.approx(per_seed, rel=1e-9)  # signed, not |.|
        assert r.value == pytest.approx(sum(per_seed) / 2, rel=1e-9)
        assert r.extra["seeds"] == [0, 1] and r.extra["tokens"] == 5 * 2 * 16 and r.extra["steps"] == 5
    assert fp8.paper == 0.25 and noise.paper is None
    assert overhead.metric == "fp8_step_overhead" and overhead.value > 0 and len(overhead.extra["per_round"]) == 2
    assert tiny_result.stopped is None


def test_tables_print_the_gap_beside_the_noise_floor_and_the_bound(tiny_result):
    gaps, timing = ft.tables(tiny_result)
    labels = [row[0] for row in gaps.rows]
    assert labels == [0, 1, "mean", "95% interval", "mean |gap|", "paper"]
    assert gaps.rows[-1][4] == "< 0.25%" and gaps.headers[4:] == ["fp8 gap", "bf16 noise"]
    assert gaps.notes[0].startswith(("resolved", "not resolved"))
    assert timing.records[0].metric == "fp8_step_overhead"


def diverge_in_the_fourth_run(monkeypatch) -> None:
    """Make seed 1's first run (the fourth run of an experiment) diverge: a learning rate of 1e30 from step 1."""
    real = ft.train
    calls = []

    def train(model, corpus, cfg, *args, **kwargs):
        calls.append(cfg.name)
        if len(calls) == 4:
            cfg = ft.dataclasses.replace(cfg, lr=1e30, warmup_steps=0)
        return real(model, corpus, cfg, *args, **kwargs)

    monkeypatch.setattr(ft, "train", train)


def test_a_diverging_run_stops_the_experiment_and_keeps_the_seeds_before(monkeypatch):
    diverge_in_the_fourth_run(monkeypatch)
    saved = []
    result = ft.run_experiment(TINY_BUDGET, ModelConfig.preset("dsv3-tiny-fp8"), stdlib_corpus(),
                               on_seed=lambda r: saved.append(len(r.seeds)))
    assert [s.seed for s in result.seeds] == [0] and saved == [1]
    assert re.match(r"seed 1 bf16: (non-finite activations|training loss not finite) at step \d of 5 ",
                    result.stopped)
    assert result.stopped.endswith("1 of 2 seeds completed")
    fp8, _, *curves, _ = ft.records(result)
    assert len(curves) == len(ft.RUNS)  # the completed seed's runs
    assert fp8.extra["seeds"] == [0] and fp8.extra["stopped"] == result.stopped and fp8.extra["ci95"] is None


@pytest.mark.parametrize("change,message", [
    ({"seeds": 1}, "^seeds: expected >= 2"), ({"steps": 4}, "^steps: expected >= 5"),
    ({"device": "tpu"}, "^device: expected cpu or cuda"), ({"warmup_fraction": 1.0}, "^warmup_fraction"),
    ({"eval_batches": -1}, "^eval_batches: expected >= 0")])
def test_bad_budgets(change, message):
    with pytest.raises(ft.ExperimentError, match=message):
        ft.with_overrides(TINY_BUDGET, **change)


def test_a_model_the_recipe_cannot_tile_is_refused_up_front():
    with pytest.raises(ft.ExperimentError, match=r"^model dsv3-small: layers\.0\.attn\.wq_b: in_features 96"):
        ft.check_model(ModelConfig.preset("dsv3-small"))
    ft.check_model(ModelConfig.preset("dsv3-small-fp8"))


def test_command_writes_the_records(tmp_path, capsys):
    assert main(["experiment", "fp8-training", *TINY_ARGS, "--out", str(tmp_path), "--format", "json"]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["metric"] for r in doc["results"]] == ["fp8_rel_loss_gap"] * 2 + ["train_loss"] * 6 + [
        "fp8_step_overhead"]
    assert json.loads(capsys.readouterr().out)["results"] == doc["results"]
    assert (tmp_path / "report.md").read_text().startswith("# dsv3 report")


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "1"], "seeds: expected >= 2"),
    (["--model", "dsv3-small"], "model dsv3-small: layers.0.attn.wq_b: in_features 96 is not a multiple of 128"),
    (["--model", "no-such-model"], "preset: unknown model 'no-such-model'"),
    (["--budget", "huge"], "argument --budget: invalid choice"),
    (["--steps", "0"], "argument --steps: expected an integer >= 1"),
])
def test_command_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["experiment", "fp8-training", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: ") and message in err and err.count("\n") == 1


def test_command_stops_on_a_diverging_run_naming_it_and_keeps_the_seeds_written(tmp_path, capsys, monkeypatch):
    diverge_in_the_fourth_run(monkeypatch)
    assert main(["experiment", "fp8-training", *TINY_ARGS, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.match(r"dsv3: error: fp8-training stopped: seed 1 bf16: (non-finite activations|training loss not "
                    r"finite) at step \d of 5 ", err)
    assert err.endswith(f"1 of 2 seeds completed (records kept in {tmp_path})")
    doc = json.loads((tmp_path / "results.json").read_text())
    gap = next(r for r in doc["results"] if r["subject"] == "fp8-vs-bf16")
    assert gap["seeds"] == [0] and gap["stopped"].startswith("seed 1 bf16: ")
