"""Unit tests of dsv3ref.balancing: the bias update, the sequence-wise balance loss, load statistics and the
balancing experiment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from dsv3ref.balancing import (
    ALPHA,
    GAMMA,
    BalancingInputError,
    apply_bias_update_,
    bias_update,
    expert_load,
    load_stats,
    sequence_balance_loss,
)
from dsv3ref.config import MoEConfig
from dsv3ref.moe import select_experts

loads = st.lists(st.integers(0, 1000), min_size=1, max_size=64).map(torch.tensor)


def test_constants_are_deepseek_v3s():
    assert GAMMA == 0.001 and ALPHA == 0.0001


@given(loads, st.floats(0.0, 1.0))
def test_bias_update_sums_to_zero(load, gamma):
    # float64 identity: the mean is subtracted, so the sum is zero up to rounding of E terms of size gamma.
    delta = bias_update(load, gamma)
    assert delta.dtype == torch.float64
    assert abs(delta.sum().item()) <= 1e-12 * max(gamma, 1e-300) * load.numel()


@given(loads, st.floats(1e-4, 1.0))
def test_bias_update_moves_toward_under_loaded(load, gamma):
    delta = bias_update(load, gamma)
    mean = load.double().mean()
    over, under = load > mean, load < mean
    if over.any() and under.any():
        assert (delta[over] < delta[under].min()).all()
        assert torch.allclose(delta[over], delta[over][0].expand_as(delta[over]))
        # before centring the step is exactly -gamma / +gamma: over and under differ by 2 gamma
        assert delta[under][0] - delta[over][0] == pytest.approx(2 * gamma, rel=1e-12)
    else:
        assert torch.all(delta == 0)  # every load equal to the mean


def test_bias_update_exact_values():
    delta = bias_update(torch.tensor([4, 0, 2, 2]), 0.5)  # mean 2: signs -1, +1, 0, 0 -> mean 0
    assert delta.tolist() == [-0.5, 0.5, 0.0, 0.0]
    delta = bias_update(torch.tensor([3, 0, 0]), 0.3)  # mean 1: -1, +1, +1 -> minus 1/3
    assert delta.tolist() == pytest.approx([-0.4, 0.2, 0.2], abs=1e-15)


@given(st.integers(0, 2**31 - 1), st.integers(4, 32), st.integers(1, 4), st.floats(0.001, 0.2))
def test_update_never_gives_an_over_loaded_expert_more_tokens(seed, experts, topk, gamma):
    # With one group, raising under-loaded and lowering over-loaded biases can only move tokens from over- to
    # under-loaded experts: every over-loaded expert keeps <= its tokens, every under-loaded one >= its tokens.
    topk = min(topk, experts - 1)
    moe = MoEConfig(n_routed_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=8, bias=True)
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randn(256, experts, generator=gen, dtype=torch.float64) + torch.randn(experts, generator=gen,
                                                                                          dtype=torch.float64)).sigmoid()
    bias = torch.zeros(experts, dtype=torch.float64)
    before = expert_load(select_experts(scores, bias, moe), experts)
    mean = before.double().mean()
    apply_bias_update_(bias, before, gamma)
    after = expert_load(select_experts(scores, bias, moe), experts)
    assert (after[before > mean] <= before[before > mean]).all()
    assert (after[before < mean] >= before[before < mean]).all()
    assert after.sum() == before.sum()


def test_apply_bias_update_in_place_without_gradient():
    bias = torch.nn.Parameter(torch.zeros(4), requires_grad=False)
    out = apply_bias_update_(bias, torch.tensor([4, 0, 2, 2]), 0.5)
    assert out is bias and bias.tolist() == [-0.5, 0.5, 0.0, 0.0] and bias.dtype == torch.float32
    with pytest.raises(BalancingInputError, match="bias: expected shape"):
        apply_bias_update_(torch.zeros(3), torch.tensor([1, 2, 3, 4]))


def test_expert_load_counts_and_ignores_dropped_slots():
    indices = torch.tensor([[0, 3], [3, -1], [2, 3]])
    assert expert_load(indices, 5).tolist() == [1, 0, 1, 3, 0]
    assert expert_load(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]


@pytest.mark.parametrize(("indices", "match"), [
    (torch.tensor([[0.0, 1.0]]), "integer"),
    (torch.tensor([[0, 5]]), r"\[-1, 5\)"),
    (torch.tensor([[-2, 1]]), r"\[-1, 5\)"),
])
def test_expert_load_bad_input(indices, match):
    with pytest.raises(BalancingInputError, match=match):
        expert_load(indices, 5)


@pytest.mark.parametrize(("load", "gamma", "match"), [
    (torch.tensor([1.0, float("nan")]), 0.1, "finite"),
    (torch.tensor([1, -1]), 0.1, ">= 0"),
    (torch.zeros(0), 0.1, "non-empty"),
    (torch.ones(2, 2), 0.1, "1-D"),
    (torch.ones(3), -0.1, "gamma"),
    (torch.ones(3), float("nan"), "gamma"),
    (torch.ones(3), float("inf"), "gamma"),
])
def test_bias_update_bad_input(load, gamma, match):
    with pytest.raises(BalancingInputError, match=match):
        bias_update(load, gamma)


def test_sequence_balance_loss_exact_values():
    # One sequence, T = 2 tokens, E = 4 experts, k = 1. f_i = E / (k T) * count_i; P_i = mean_t s_i / sum_j s_j.
    scores = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)
    indices = torch.tensor([[[0], [0]]])
    f = torch.tensor([4.0, 0.0, 0.0, 0.0])  # expert 0 gets both tokens: 4 / 2 * 2
    p = torch.tensor([(0.25 + 0.75) / 2, (0.25 + 0.25) / 2, 0.125, 0.125], dtype=torch.float64)
    loss = sequence_balance_loss(scores, indices, alpha=0.5)
    assert loss.item() == pytest.approx(0.5 * float((f * p).sum()), rel=1e-15)


@given(st.integers(1, 8), st.integers(1, 4))
def test_sequence_balance_loss_of_perfect_balance_is_alpha(experts_per_slot, topk):
    # Every expert receives exactly k T / E tokens and affinities are uniform: f_i = 1, P_i = 1/E, L = alpha.
    experts = experts_per_slot * topk
    tokens = experts_per_slot
    indices = torch.arange(experts).view(1, tokens, topk)
    scores = torch.ones(2, tokens, experts, dtype=torch.float64)
    loss = sequence_balance_loss(scores, indices.expand(2, -1, -1), ALPHA)
    assert loss.item() == pytest.approx(ALPHA, rel=1e-12)


def test_sequence_balance_loss_is_differentiable_through_scores_only():
    scores = torch.rand(2, 5, 8, dtype=torch.float64, requires_grad=True)
    indices = scores.topk(2, dim=-1).indices
    sequence_balance_loss(scores, indices).backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


@pytest.mark.parametrize(("scores", "indices", "match"), [
    (torch.ones(4, 8), torch.zeros(4, 2, dtype=torch.long), r"\[B, T, E\]"),
    (torch.ones(1, 4, 8), torch.zeros(1, 3, 2, dtype=torch.long), "same B, T"),
    (torch.ones(1, 0, 8), torch.zeros(1, 0, 2, dtype=torch.long), "T = 0"),
    (torch.ones(1, 4, 8), torch.full((1, 4, 2), 8), r"\[0, 8\)"),
    (torch.ones(1, 4, 8), torch.full((1, 4, 2), -1), r"\[0, 8\)"),
])
def test_sequence_balance_loss_bad_input(scores, indices, match):
    with pytest.raises(BalancingInputError, match=match):
        sequence_balance_loss(scores, indices)


def test_load_stats_exact_values():
    s = load_stats(torch.tensor([1, 2, 3, 6]))  # mean 3, population std sqrt((4 + 1 + 0 + 9) / 4)
    assert s.max_over_mean == 2.0 and s.min == 1 and s.max == 6 and s.mean == 3.0
    assert s.cv == pytest.approx(3.5**0.5 / 3, rel=1e-15)
    with pytest.raises(BalancingInputError, match="all zeros"):
        load_stats(torch.zeros(4, dtype=torch.long))


@given(loads)
def test_load_stats_bounds(load):
    assume(load.sum() > 0)
    s = load_stats(load)
    assert s.max_over_mean >= 1.0 and s.cv >= 0.0
    assert (s.cv == 0) == (s.max_over_mean == 1.0)
