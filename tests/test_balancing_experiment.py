"""The balancing experiment (harness.experiments.balancing): the bias update balances a skewed stream that stays
unbalanced without it; bad input."""

from __future__ import annotations

import pytest

from dsv3ref.balancing import BalancingInputError
from dsv3ref.config import MoEConfig
from harness.experiments.balancing import balancing_records, run_balancing


def test_balancing_experiment_reaches_the_target_on_a_small_config():
    # 32 experts, top-4, 4 groups / 2, 1024 tokens: 1280 tokens per expert over the 10-batch window, so sampling
    # noise alone gives a max/mean of ~1.1; at seed 0 the update reaches 1.2 after ~75 of the 120 batches.
    moe = MoEConfig(n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=8, n_group=4, topk_group=2,
                    bias=True)
    balanced = run_balancing(moe, steps=120, tokens=1024, gamma=0.002, skew_std=0.5)
    unbalanced = run_balancing(moe, steps=120, tokens=1024, gamma=0.0, skew_std=0.5)
    assert balanced.max_over_mean[0] == unbalanced.max_over_mean[0] > 2.0  # same stream, same first batch
    assert balanced.final.max_over_mean <= 1.2 < unbalanced.final.max_over_mean
    assert balanced.first_step_at_or_below(1.2) is not None
    assert unbalanced.first_step_at_or_below(1.2) is None
    assert balanced.final_load.sum() == 10 * 1024 * 4
    assert balanced.final.cv < unbalanced.final.cv


def test_balancing_experiment_bad_input():
    no_bias = MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)
    with pytest.raises(BalancingInputError, match="moe.bias"):
        run_balancing(no_bias, steps=2, tokens=8, gamma=0.001)
    assert run_balancing(no_bias, steps=2, tokens=8, gamma=0.0).final_load.sum() == 2 * 8 * 2  # 2 batches so far
    with pytest.raises(BalancingInputError, match="steps"):
        run_balancing(no_bias, steps=0, tokens=8, gamma=0.0)


def test_records_carry_the_final_load_and_the_curve():
    moe = MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, bias=True)
    runs = {"bias-update": run_balancing(moe, steps=30, tokens=64, gamma=0.01, window=5),
            "no-balancing": run_balancing(moe, steps=30, tokens=64, gamma=0.0, window=5)}
    records = {r.subject: r for r in balancing_records(runs, "tiny", 30, 64)}
    assert set(records) == {"bias-update", "no-balancing"}
    for subject, run in runs.items():
        r = records[subject]
        assert r.metric == "moe_load_max_over_mean" and r.value == run.final.max_over_mean
        assert r.extra["curve"] == {str(s): run.max_over_mean[s - 1] for s in (1, 10, 25)}
        assert r.extra["final_cv"] == run.final.cv
