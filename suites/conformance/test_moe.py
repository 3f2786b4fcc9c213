"""Conformance of a DeepSeekMoE router and layer (component `moe`) to the official DeepSeek-V3 semantics.

Every property is checked against an independent float64 routing computed here (sort-based, per token), on random
configs, weights, biases (mostly negative, where masking unselected groups with 0.0 instead of -inf selects
experts from dropped groups) and inputs. Selection must be exact, so examples whose top-k or top-group cut is
closer than MARGIN are skipped (`assume`): that leaves room for routers that compute in fp32 (relative rounding
2^-24 on scores below 1) and keeps ties out by construction.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from dsv3ref.comms.dispatch import dispatch_layout
from dsv3ref.config import ModelConfig, MoEConfig
from harness.numerics import F64_IDENTITY_RTOL, max_rel_err
from harness.pytest_plugin import skip_if_not_applicable
from harness.registry import not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("moe")]

BASE = ModelConfig.preset("dsv3-tiny")
MARGIN = 1e-5
FP64_RTOL = F64_IDENTITY_RTOL
# A router that computes in fp32 (as transformers does) sees the fp64 weights and inputs rounded to fp32 (2^-24
# relative), so logits, scores and weights carry ~1e-7 relative error; 1e-5 bounds it with room for the sums.
FP32_ROUTER_RTOL = 1e-5


def model(moe: MoEConfig, dim: int) -> ModelConfig:
    return BASE.replace(hidden_size=dim, moe=moe)


@st.composite
def moe_cfgs(draw: st.DrawFn, bias: bool = True, score: str = "sigmoid", groups: tuple[int, ...] = (1, 2, 4, 8),
             max_topk: int = 8) -> ModelConfig:
    """A small valid config; the group size is >= 2 (a top-2 group score needs two experts)."""
    n_group = draw(st.sampled_from(groups))
    per_group = draw(st.integers(2, 8))
    topk_group = draw(st.integers(1, n_group))
    topk = draw(st.integers(1, min(max_topk, topk_group * per_group)))
    moe = MoEConfig(n_routed_experts=n_group * per_group, num_experts_per_tok=topk,
                    moe_intermediate_size=draw(st.sampled_from([4, 8, 16])),
                    n_shared_experts=draw(st.integers(0, 2)), n_group=n_group, topk_group=topk_group,
                    score_func=score, route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])),
                    norm_topk_prob=score == "sigmoid", bias=bias)
    return model(moe, draw(st.sampled_from([8, 16, 32])))


def make_state(cfg: ModelConfig, seed: int, bias_low: float = -3.0, bias_high: float = 1.0,
               logit_scale: float = 2.0) -> dict[str, torch.Tensor]:
    """Random float64 weights in the official names; biases uniform in [bias_low, bias_high] (fp32 values)."""
    gen = torch.Generator().manual_seed(seed)
    m, d = cfg.moe, cfg.hidden_size

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    state = {"gate.weight": randn(m.n_routed_experts, d, scale=logit_scale / d**0.5)}
    if m.bias:
        u = torch.rand(m.n_routed_experts, generator=gen, dtype=torch.float64)
        state["gate.bias"] = (bias_low + (bias_high - bias_low) * u).float().double()
    experts = [f"experts.{i}" for i in range(m.n_routed_experts)]
    if m.n_shared_experts:
        experts.append("shared_experts")
    for name in experts:
        inter = m.moe_intermediate_size * (m.n_shared_experts if name == "shared_experts" else 1)
        state[f"{name}.w1.weight"] = randn(inter, d, scale=d**-0.5)
        state[f"{name}.w3.weight"] = randn(inter, d, scale=d**-0.5)
        state[f"{name}.w2.weight"] = randn(d, inter, scale=inter**-0.5)
    return state


def inputs(cfg: ModelConfig, seed: int, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)


class Expected:
    """The official routing recomputed in float64 by sorting, token by token."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> None:
        m = cfg.moe
        logits = x.double() @ state["gate.weight"].double().T
        self.scores = logits.sigmoid() if m.score_func == "sigmoid" else logits.softmax(dim=-1)
        has_bias = "gate.bias" in state
        biased = self.scores + state["gate.bias"].double() if has_bias else self.scores
        per_group = m.n_routed_experts // m.n_group
        self.groups, self.indices, self.margin = [], [], float("inf")
        for row in biased:
            members = row.view(m.n_group, per_group).sort(dim=-1, descending=True).values
            group_score = members[:, :2].sum(-1) if has_bias else members[:, 0]
            ranked = group_score.sort(descending=True)
            if m.topk_group < m.n_group:
                self.margin = min(self.margin, (ranked.values[m.topk_group - 1] - ranked.values[m.topk_group]).item())
            kept = set(ranked.indices[: m.topk_group].tolist())
            candidates = sorted((e for e in range(m.n_routed_experts) if e // per_group in kept),
                                key=lambda e: -row[e].item())
            if m.num_experts_per_tok < len(candidates):
                gap = row[candidates[m.num_experts_per_tok - 1]] - row[candidates[m.num_experts_per_tok]]
                self.margin = min(self.margin, gap.item())
            self.groups.append(kept)
            self.indices.append(candidates[: m.num_experts_per_tok])
        chosen = self.scores.gather(1, torch.tensor(self.indices).view(len(self.indices), -1))
        if m.norm_topk_prob:
            chosen = chosen / chosen.sum(-1, keepdim=True)
        self.weights = chosen * m.route_scale  # [N, k], in the order of self.indices

    def weight_of(self, token: int, expert: int) -> float:
        return self.weights[token, self.indices[token].index(expert)].item()

    @property
    def selection(self) -> list[list[int]]:
        """Each token's experts, sorted (compare with `selected`)."""
        return [sorted(r) for r in self.indices]


def decided(cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> Expected:
    """The exact routing, for inputs whose selection no rounding can flip: a draw within MARGIN of a tie is
    rejected (which of two tied experts wins is not a conformance question)."""
    ex = Expected(cfg, state, x)
    assume(ex.margin > MARGIN)
    return ex


def swiglu(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    w1, w2, w3 = (state[f"{name}.{w}.weight"].double() for w in ("w1", "w2", "w3"))
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def dense_output(cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor, ex: Expected) -> torch.Tensor:
    """sum_k w_k Expert_{i_k}(x) + Shared(x), every expert applied to the whole token, in float64."""
    x = x.double()
    y = swiglu(state, "shared_experts", x) if cfg.moe.n_shared_experts else torch.zeros_like(x)
    for t, experts in enumerate(ex.indices):
        for e in experts:
            y[t] += ex.weight_of(t, e) * swiglu(state, f"experts.{e}", x[t:t + 1])[0]
    return y


def rtol(impl: object) -> float:
    return FP32_ROUTER_RTOL if "fp64_router" in not_applicable(impl) else FP64_RTOL


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    err = max_rel_err(actual, expected)
    assert err <= rel, f"max |error| / max |expected| = {err:.3e} > {rel:.1e}"


def routed(impl: object, cfg: ModelConfig, state: dict[str, torch.Tensor],
           x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    weights, indices = impl.route(cfg, state, x)
    assert indices.shape == (x.shape[0], cfg.moe.num_experts_per_tok)
    assert weights.shape == indices.shape
    return weights, indices.tolist()


def selected(impl: object, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> list[list[int]]:
    """Each token's selected experts, sorted (the order of a token's k experts carries no meaning)."""
    return [sorted(r) for r in routed(impl, cfg, state, x)[1]]


seeds = st.integers(0, 2**31 - 1)
tokens = st.integers(1, 16)


# --- routing -----------------------------------------------------------------------------------------------------
@given(moe_cfgs(), seeds, tokens)
def test_exactly_k_distinct_experts_in_range(impl, cfg, seed, n):
    _, indices = routed(impl, cfg, make_state(cfg, seed), inputs(cfg, seed, n))
    for row in indices:
        assert len(set(row)) == cfg.moe.num_experts_per_tok
        assert all(0 <= e < cfg.moe.n_routed_experts for e in row)


@given(moe_cfgs(groups=(2, 4, 8)), seeds, tokens)
def test_selected_experts_lie_in_the_top_groups(impl, cfg, seed, n):
    # Group score = sum of the top-2 biased scores; with negative biases a 0.0 fill of dropped groups would win.
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    ex = decided(cfg, state, x)
    per_group = cfg.moe.n_routed_experts // cfg.moe.n_group
    for t, row in enumerate(routed(impl, cfg, state, x)[1]):
        assert {e // per_group for e in row} <= ex.groups[t]


@given(moe_cfgs(groups=(2, 4, 8)), seeds, tokens)
def test_all_negative_biases_never_select_dropped_groups(impl, cfg, seed, n):
    # Every biased score is below 0, so masking with 0.0 instead of -inf would always pick dropped experts.
    assume(cfg.moe.topk_group < cfg.moe.n_group)
    state, x = make_state(cfg, seed, bias_low=-3.0, bias_high=-1.5), inputs(cfg, seed, n)
    assert decided(cfg, state, x).selection == selected(impl, cfg, state, x)  # decided first: no tie


@given(moe_cfgs(), seeds, tokens)
def test_selection_uses_biased_scores(impl, cfg, seed, n):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    assert decided(cfg, state, x).selection == selected(impl, cfg, state, x)  # decided first: no tie


@given(moe_cfgs(), seeds, tokens)
def test_weights_are_normalised_unbiased_scores(impl, cfg, seed, n):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    ex = decided(cfg, state, x)
    weights, indices = routed(impl, cfg, state, x)
    expected = torch.tensor([[ex.weight_of(t, e) for e in row] for t, row in enumerate(indices)], dtype=torch.float64)
    assert_close(weights, expected, rtol(impl))


@given(moe_cfgs(), seeds, tokens)
def test_sigmoid_weights_sum_to_route_scale(impl, cfg, seed, n):
    weights, _ = routed(impl, cfg, make_state(cfg, seed), inputs(cfg, seed, n))
    assert_close(weights.double().sum(-1), torch.full((n,), cfg.moe.route_scale, dtype=torch.float64), rtol(impl))


@given(moe_cfgs(), seeds, tokens)
def test_weights_sum_to_route_scale_for_tiny_scores(impl, cfg, seed, n):
    # Logits near -60 give sigmoid scores ~1e-26: a normaliser with an epsilon (e.g. + 1e-20) breaks the sum.
    skip_if_not_applicable(impl, "exact_normaliser")
    state = make_state(cfg, seed, logit_scale=0.1)
    x = inputs(cfg, seed, n)
    state["gate.weight"] = state["gate.weight"] - 60.0 * x.sum(0) / x.sum(0).square().sum()
    x = x.sum(0, keepdim=True).expand(n, -1).contiguous()
    weights, _ = routed(impl, cfg, state, x)
    assert_close(weights.double().sum(-1), torch.full((n,), cfg.moe.route_scale, dtype=torch.float64), rtol(impl))


@given(moe_cfgs(), seeds, tokens, st.floats(-5.0, 5.0))
def test_selection_invariant_to_a_uniform_bias_shift(impl, cfg, seed, n, shift):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    decided(cfg, state, x)
    shifted = dict(state, **{"gate.bias": (state["gate.bias"] + shift).float().double()})
    decided(cfg, shifted, x)  # the fp32 rounding of the shift may not create a tie
    assert selected(impl, cfg, state, x) == selected(impl, cfg, shifted, x)


@given(moe_cfgs(), seeds, st.integers(2, 16), st.randoms(use_true_random=False))
def test_routing_equivariant_to_token_permutation(impl, cfg, seed, n, rnd):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    decided(cfg, state, x)
    perm = list(range(n))
    rnd.shuffle(perm)
    w, idx = routed(impl, cfg, state, x)
    wp, idxp = routed(impl, cfg, state, x[perm])
    assert [sorted(idx[p]) for p in perm] == [sorted(r) for r in idxp]
    assert_close(wp.double().sort(-1).values, w.double()[perm].sort(-1).values, rtol(impl))


@given(moe_cfgs(bias=False, groups=(1,)), seeds, tokens)
def test_one_group_without_bias_selects_topk_of_logits(impl, cfg, seed, n):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    decided(cfg, state, x)
    logits = x @ state["gate.weight"].T
    top = logits.topk(cfg.moe.num_experts_per_tok, dim=-1).indices.tolist()
    assert selected(impl, cfg, state, x) == [sorted(r) for r in top]


@given(moe_cfgs(bias=False, groups=(2, 4, 8)), seeds, tokens)
def test_group_score_is_the_max_without_bias(impl, cfg, seed, n):
    skip_if_not_applicable(impl, "max_group_score_without_bias")
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    assert decided(cfg, state, x).selection == selected(impl, cfg, state, x)  # decided first: no tie


@given(moe_cfgs(bias=False, score="softmax"), seeds, tokens)
def test_softmax_weights_are_unnormalised_probabilities(impl, cfg, seed, n):
    # DeepSeek-V2: softmax over all experts, top-k probabilities times route_scale, not renormalised.
    skip_if_not_applicable(impl, "softmax_scoring")
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    ex = decided(cfg, state, x)
    weights, indices = routed(impl, cfg, state, x)
    assert [sorted(r) for r in indices] == ex.selection
    expected = torch.tensor([[ex.weight_of(t, e) for e in row] for t, row in enumerate(indices)], dtype=torch.float64)
    assert_close(weights, expected, rtol(impl))


@given(st.sampled_from([2, 4, 8]), st.integers(1, 4), st.integers(2, 4), seeds, tokens, st.data())
def test_node_limited_routing_reaches_at_most_m_nodes(impl, nodes, gpus_per_node, experts_per_gpu, seed, n, data):
    # Node-limited routing as group-limited routing with one group per node (n_group = nodes, topk_group = M).
    limit = data.draw(st.integers(1, nodes))
    per_node = gpus_per_node * experts_per_gpu
    topk = data.draw(st.integers(1, min(8, limit * per_node)))
    moe = MoEConfig(n_routed_experts=nodes * per_node, num_experts_per_tok=topk, moe_intermediate_size=4,
                    n_group=nodes, topk_group=limit, route_scale=2.5, bias=True)
    cfg = model(moe, 16)
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    decided(cfg, state, x)
    _, indices = impl.route(cfg, state, x)
    layout = dispatch_layout(indices, moe.n_routed_experts, nodes * gpus_per_node, gpus_per_node)
    assert int(layout.is_token_in_node.sum(-1).max()) <= limit
    assert int(layout.tokens_per_node.sum()) <= limit * n


# --- the layer ---------------------------------------------------------------------------------------------------
@given(moe_cfgs(), seeds, tokens)
def test_output_is_the_dense_weighted_sum_of_experts(impl, cfg, seed, n):
    state, x = make_state(cfg, seed), inputs(cfg, seed, n)
    ex = decided(cfg, state, x)
    assert_close(impl.forward(cfg, state, x), dense_output(cfg, state, x, ex), rtol(impl))


@given(moe_cfgs(), seeds, st.integers(1, 3), st.integers(1, 6))
def test_output_keeps_the_leading_shape(impl, cfg, seed, batch, seq):
    state, x = make_state(cfg, seed), inputs(cfg, seed, batch * seq)
    decided(cfg, state, x)
    flat = impl.forward(cfg, state, x)
    shaped = impl.forward(cfg, state, x.view(batch, seq, -1))
    assert shaped.shape == (batch, seq, cfg.hidden_size)
    assert_close(shaped.reshape(batch * seq, -1), flat, FP64_RTOL)


@given(st.integers(4, 16), st.integers(1, 4), seeds, st.integers(2, 8), st.integers(0, 1))
def test_bf16_output_error_within_a_bf16_reference(impl, experts, topk, seed, n, shared):
    # Flash-attention rule: the implementation's bf16 error against the float64 truth (max over n x 64 outputs)
    # must stay within 3x the error of a plain bf16 evaluation of the same formula, plus half a bf16 ulp at the
    # largest output (2^-9 relative: the rounding of the output itself). The two round differently per element,
    # so up to 2-3x is ordinary; a wrong routing or a dropped term is orders of magnitude larger. The logits are
    # the first `experts` input features, a permutation of well-spaced values, so bf16 routing equals float64.
    topk = min(topk, experts)
    moe = MoEConfig(n_routed_experts=experts, num_experts_per_tok=topk, moe_intermediate_size=16,
                    n_shared_experts=shared, route_scale=2.5, bias=False)
    dim = 64
    cfg = model(moe, dim)
    state = make_state(cfg, seed)
    state["gate.weight"] = torch.eye(experts, dim, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    levels = torch.linspace(-3, 3, experts, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x[:, :experts] = torch.stack([levels[torch.randperm(experts, generator=gen)] for _ in range(n)])
    x = x.to(torch.bfloat16)
    state16 = {k: v.to(torch.bfloat16) if k != "gate.bias" else v.float() for k, v in state.items()}
    truth_state = {k: v.double() for k, v in state16.items()}
    truth = dense_output(cfg, truth_state, x.double(), Expected(cfg, truth_state, x.double()))
    out = impl.forward(cfg, state16, x)
    assert out.dtype == torch.bfloat16
    low = bf16_dense(cfg, state16, x)
    err, err_low = (out.double() - truth).abs().max().item(), (low.double() - truth).abs().max().item()
    assert err <= 3 * err_low + 2**-9 * truth.abs().max().item(), f"bf16 error {err:.3e} vs reference {err_low:.3e}"


def bf16_dense(cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The formula evaluated plainly in bf16: routing from bf16 scores, each term rounded, summed in bf16."""
    m = cfg.moe
    scores = (x @ state["gate.weight"].T).sigmoid()
    idx = scores.topk(m.num_experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * m.route_scale

    def mlp(name: str, v: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = (state[f"{name}.{p}.weight"] for p in ("w1", "w2", "w3"))
        return (F.silu(v @ w1.T) * (v @ w3.T)) @ w2.T

    y = mlp("shared_experts", x) if m.n_shared_experts else torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(m.num_experts_per_tok):
            y[t] = y[t] + w[t, j] * mlp(f"experts.{int(idx[t, j])}", x[t:t + 1])[0]
    return y
