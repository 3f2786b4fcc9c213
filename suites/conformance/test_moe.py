"""Conformance of a DeepSeekMoE router and layer (component `moe`) to the official DeepSeek-V3 semantics.

Every property is checked against an independent float64 routing computed here (sort-based, per token), on random
configs (score function, norm_topk_prob, bias, groups, route scale and shared experts drawn independently, within
what the implementation declares applicable), weights, biases (mostly negative, where masking unselected groups
with 0.0 instead of -inf selects experts from dropped groups) and inputs. Selection must be exact, so examples
whose top-k or top-group cut is closer than MARGIN are skipped (`assume`): that leaves room for routers that
compute in fp32 (relative rounding 2^-24 on scores below 1) and keeps ties out by construction.

A failure says in words which token chose what, with that token's logits and the biases, and prints lines that
rebuild the case with public functions (harness.cases.moe).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from dsv3ref.comms.dispatch import dispatch_layout
from dsv3ref.config import ModelConfig, MoEConfig
from harness.cases import CONFIG_IMPORT, config_line, rebuild
from harness.cases.moe import IMPORTS, bf16_case, moe_state, moe_tokens, tiny_scores
from harness.numerics import F64_IDENTITY_RTOL, max_rel_err
from harness.pytest_plugin import applicable, skip_if_not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("moe")]

BASE = ModelConfig.preset("dsv3-tiny")
MARGIN = 1e-5
FP64_RTOL = F64_IDENTITY_RTOL
# A router that computes in fp32 (as transformers does) sees the fp64 weights and inputs rounded to fp32 (2^-24
# relative), so logits, scores and weights carry ~1e-7 relative error; 1e-5 bounds it with room for the sums.
FP32_ROUTER_RTOL = 1e-5
State = dict[str, torch.Tensor]


def model(moe: MoEConfig, dim: int) -> ModelConfig:
    return BASE.replace(hidden_size=dim, moe=moe)


@st.composite
def moe_cfgs(draw: st.DrawFn, impl: object, bias: bool | None = None, score: str | None = None,
             norm: bool | None = None, groups: tuple[int, ...] = (1, 2, 4, 8), max_topk: int = 8) -> ModelConfig:
    """A small valid config; every flag the property does not fix is drawn independently, within what `impl`
    declares applicable (softmax scoring; the max group score of a config without a bias). Groups hold >= 2
    experts (a top-2 group score needs two)."""
    scores = ["sigmoid", "softmax"] if applicable(impl, "softmax_scoring") else ["sigmoid"]
    n_group = draw(st.sampled_from(groups))
    per_group = draw(st.integers(2, 8))
    topk_group = draw(st.integers(1, n_group))
    topk = draw(st.integers(1, min(max_topk, topk_group * per_group)))
    with_bias = draw(st.booleans()) if bias is None else bias
    if not with_bias and topk_group < n_group and not applicable(impl, "max_group_score_without_bias"):
        assume(bias is None)  # a property without a bias on this implementation: nothing left to draw
        with_bias = True
    moe = MoEConfig(n_routed_experts=n_group * per_group, num_experts_per_tok=topk,
                    moe_intermediate_size=draw(st.sampled_from([4, 8, 16])),
                    n_shared_experts=draw(st.integers(0, 2)), n_group=n_group, topk_group=topk_group,
                    score_func=score or draw(st.sampled_from(scores)),
                    route_scale=draw(st.sampled_from([1.0, 2.5, 16.0])),
                    norm_topk_prob=draw(st.booleans()) if norm is None else norm, bias=with_bias)
    return model(moe, draw(st.sampled_from([8, 16, 32])))


def drawn_case(impl: object, data: st.DataObject, seed: int, n: int,
               **cfg_options: object) -> tuple[ModelConfig, State, torch.Tensor]:
    """A config drawn for `impl` (moe_cfgs options), its weights and n tokens from `seed`, noted for a failure."""
    cfg = data.draw(moe_cfgs(impl, **cfg_options), label="cfg")
    note_case(cfg, seed, n)
    return cfg, moe_state(cfg, seed), moe_tokens(cfg, seed, n)


def note_case(cfg: ModelConfig, seed: int, n: int, call: str = "impl.route(cfg, state, x)", **state_kw: float) -> None:
    """The lines that rebuild this example (printed with a failure)."""
    options = "".join(f", {k}={v}" for k, v in state_kw.items())
    rebuild(*IMPORTS, CONFIG_IMPORT, config_line(cfg),
            f"state, x = moe_state(cfg, seed={seed}{options}), moe_tokens(cfg, seed={seed}, tokens={n})", call)


class Expected:
    """The official routing recomputed in float64 by sorting, token by token."""

    def __init__(self, cfg: ModelConfig, state: State, x: torch.Tensor) -> None:
        m = cfg.moe
        self.cfg, self.state, self.x = cfg, state, x
        self.logits = x.double() @ state["gate.weight"].double().T
        self.scores = self.logits.sigmoid() if m.score_func == "sigmoid" else self.logits.softmax(dim=-1)
        has_bias = "gate.bias" in state
        self.biased = self.scores + state["gate.bias"].double() if has_bias else self.scores
        self.per_group = m.n_routed_experts // m.n_group
        self.groups, self.indices, self.margin = [], [], float("inf")
        for row in self.biased:
            members = row.view(m.n_group, self.per_group).sort(dim=-1, descending=True).values
            group_score = members[:, :2].sum(-1) if has_bias else members[:, 0]
            ranked = group_score.sort(descending=True)
            if m.topk_group < m.n_group:
                self.margin = min(self.margin, (ranked.values[m.topk_group - 1] - ranked.values[m.topk_group]).item())
            kept = set(ranked.indices[: m.topk_group].tolist())
            candidates = sorted((e for e in range(m.n_routed_experts) if e // self.per_group in kept),
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

    def token(self, t: int) -> str:
        """Token t's routing inputs in words: logits, biases, group size and the expected choice."""
        m = self.cfg.moe
        bias = self.state.get("gate.bias")
        return (f"token {t}: logits {_fmt(self.logits[t])}; bias {_fmt(bias) if bias is not None else 'none'}; "
                f"{m.score_func} scores, {m.n_group} groups of {self.per_group}, top {m.topk_group} groups kept "
                f"({sorted(self.groups[t])}), top-{m.num_experts_per_tok} expected {sorted(self.indices[t])}")


def _fmt(v: torch.Tensor) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in v.tolist()) + "]"


def decided(cfg: ModelConfig, state: State, x: torch.Tensor) -> Expected:
    """The exact routing, for inputs whose selection no rounding can flip: a draw within MARGIN of a tie is
    rejected (which of two tied experts wins is not a conformance question)."""
    ex = Expected(cfg, state, x)
    assume(ex.margin > MARGIN)
    return ex


def swiglu(state: State, name: str, x: torch.Tensor) -> torch.Tensor:
    w1, w2, w3 = (state[f"{name}.{w}.weight"].double() for w in ("w1", "w2", "w3"))
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def dense_output(cfg: ModelConfig, state: State, x: torch.Tensor, ex: Expected) -> torch.Tensor:
    """sum_k w_k Expert_{i_k}(x) + Shared(x), every expert applied to the whole token, in float64."""
    x = x.double()
    y = swiglu(state, "shared_experts", x) if cfg.moe.n_shared_experts else torch.zeros_like(x)
    for t, experts in enumerate(ex.indices):
        for e in experts:
            y[t] += ex.weight_of(t, e) * swiglu(state, f"experts.{e}", x[t:t + 1])[0]
    return y


def rtol(impl: object) -> float:
    return FP64_RTOL if applicable(impl, "fp64_router") else FP32_ROUTER_RTOL


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    err = max_rel_err(actual, expected)
    worst = int((actual.double() - expected.double()).abs().flatten().argmax())
    assert err <= rel, (f"{what}: max |error| / max |expected| = {err:.3e} > {rel:.1e} (worst element {worst}: "
                        f"{actual.flatten()[worst].item():.6g}, expected {expected.flatten()[worst].item():.6g})")


def routed(impl: object, cfg: ModelConfig, state: State, x: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    weights, indices = impl.route(cfg, state, x)
    k, n = cfg.moe.num_experts_per_tok, x.shape[0]
    assert tuple(indices.shape) == (n, k), f"route returned indices of shape {tuple(indices.shape)}, expected {(n, k)}"
    assert tuple(weights.shape) == (n, k), f"route returned weights of shape {tuple(weights.shape)}, expected {(n, k)}"
    return weights, indices.tolist()


def assert_selection(got: list[list[int]], ex: Expected, why: str) -> None:
    """Every token's selected experts (as sets) equal the expected ones; the message names the first that does not."""
    for t, (row, want) in enumerate(zip(got, ex.indices, strict=True)):
        assert sorted(row) == sorted(want), (f"token {t} selected experts {sorted(row)}, expected {sorted(want)} "
                                             f"({why})\n{ex.token(t)}")


def assert_weights(impl: object, cfg: ModelConfig, state: State, x: torch.Tensor, ex: Expected, why: str,
                   rule: str) -> None:
    """The selection first (so that every weight has an expected value), then each selected expert's weight."""
    weights, indices = routed(impl, cfg, state, x)
    assert_selection(indices, ex, why)
    expected = torch.tensor([[ex.weight_of(t, e) for e in row] for t, row in enumerate(indices)], dtype=torch.float64)
    assert_close(weights, expected, rtol(impl), f"weights != {rule}")


seeds = st.integers(0, 2**31 - 1)
tokens = st.integers(1, 16)


# --- routing -----------------------------------------------------------------------------------------------------
@given(st.data(), seeds, tokens)
def test_exactly_k_distinct_experts_in_range(impl, data, seed, n):
    cfg = data.draw(moe_cfgs(impl), label="cfg")
    note_case(cfg, seed, n)
    _, indices = routed(impl, cfg, moe_state(cfg, seed), moe_tokens(cfg, seed, n))
    k, experts = cfg.moe.num_experts_per_tok, cfg.moe.n_routed_experts
    for t, row in enumerate(indices):
        assert len(set(row)) == k, f"token {t} got experts {row}: expected {k} distinct ones"
        assert all(0 <= e < experts for e in row), f"token {t} got experts {row}: expected each in [0, {experts})"


@given(st.data(), seeds, tokens)
def test_selected_experts_lie_in_the_top_groups(impl, data, seed, n):
    # Group score = sum of the top-2 biased scores; with negative biases a 0.0 fill of dropped groups would win.
    cfg, state, x = drawn_case(impl, data, seed, n, groups=(2, 4, 8))
    ex = decided(cfg, state, x)
    for t, row in enumerate(routed(impl, cfg, state, x)[1]):
        for e in row:
            group = e // ex.per_group
            assert group in ex.groups[t], (f"token {t} selected expert {e} in group {group}; kept groups "
                                           f"{sorted(ex.groups[t])}\n{ex.token(t)}")


@given(st.data(), seeds, tokens)
def test_all_negative_biases_never_select_dropped_groups(impl, data, seed, n):
    # Every biased score is below 0, so masking with 0.0 instead of -inf would always pick dropped experts.
    cfg = data.draw(moe_cfgs(impl, bias=True, groups=(2, 4, 8)), label="cfg")
    assume(cfg.moe.topk_group < cfg.moe.n_group)
    note_case(cfg, seed, n, bias_low=-3.0, bias_high=-1.5)
    state, x = moe_state(cfg, seed, bias_low=-3.0, bias_high=-1.5), moe_tokens(cfg, seed, n)
    ex = decided(cfg, state, x)  # first: no tie
    assert_selection(routed(impl, cfg, state, x)[1], ex, "all biases negative: dropped groups must stay out")


@given(st.data(), seeds, tokens)
def test_selection_uses_biased_scores(impl, data, seed, n):
    cfg, state, x = drawn_case(impl, data, seed, n, bias=True)
    ex = decided(cfg, state, x)  # first: no tie
    assert_selection(routed(impl, cfg, state, x)[1], ex, "top-k of the scores plus the bias")


@given(st.data(), seeds, tokens)
def test_weights_are_normalised_unbiased_scores(impl, data, seed, n):
    cfg, state, x = drawn_case(impl, data, seed, n)
    ex = decided(cfg, state, x)
    m = cfg.moe
    rule = (f"unbiased {m.score_func} scores{' / their sum' if m.norm_topk_prob else ' (not renormalised)'} "
            f"x route_scale {m.route_scale}")
    assert_weights(impl, cfg, state, x, ex, "the weights are checked on the expected experts", rule)


@given(st.data(), seeds, tokens)
def test_sigmoid_weights_sum_to_route_scale(impl, data, seed, n):
    cfg = data.draw(moe_cfgs(impl, score="sigmoid", norm=True), label="cfg")
    note_case(cfg, seed, n)
    weights, _ = routed(impl, cfg, moe_state(cfg, seed), moe_tokens(cfg, seed, n))
    assert_close(weights.double().sum(-1), torch.full((n,), cfg.moe.route_scale, dtype=torch.float64), rtol(impl),
                 f"each token's weights must sum to route_scale {cfg.moe.route_scale} (norm_topk_prob)")


@given(st.data(), seeds, tokens)
def test_weights_sum_to_route_scale_for_tiny_scores(impl, data, seed, n):
    # Logits near -60 give sigmoid scores ~1e-26: a normaliser with an epsilon (e.g. + 1e-20) breaks the sum.
    skip_if_not_applicable(impl, "exact_normaliser")
    cfg = data.draw(moe_cfgs(impl, score="sigmoid", norm=True), label="cfg")
    rebuild(*IMPORTS, CONFIG_IMPORT, config_line(cfg), f"state, x = tiny_scores(cfg, seed={seed}, tokens={n})",
            "impl.route(cfg, state, x)")
    state, x = tiny_scores(cfg, seed, n)
    weights, _ = routed(impl, cfg, state, x)
    assert_close(weights.double().sum(-1), torch.full((n,), cfg.moe.route_scale, dtype=torch.float64), rtol(impl),
                 f"with scores ~1e-26 the weights must still sum to route_scale {cfg.moe.route_scale} (a plain "
                 "sum as normaliser, no epsilon)")


@given(st.data(), seeds, tokens, st.floats(-5.0, 5.0))
def test_selection_invariant_to_a_uniform_bias_shift(impl, data, seed, n, shift):
    cfg, state, x = drawn_case(impl, data, seed, n, bias=True)
    decided(cfg, state, x)
    shifted = dict(state, **{"gate.bias": (state["gate.bias"] + shift).float().double()})
    decided(cfg, shifted, x)  # the fp32 rounding of the shift may not create a tie
    before, after = routed(impl, cfg, state, x)[1], routed(impl, cfg, shifted, x)[1]
    for t, (a, b) in enumerate(zip(before, after, strict=True)):
        assert sorted(a) == sorted(b), (f"token {t} selected {sorted(a)}, and {sorted(b)} once every bias was "
                                        f"shifted by {shift:.4g} (a uniform shift changes no ranking)")


@given(st.data(), seeds, st.integers(2, 16), st.randoms(use_true_random=False))
def test_routing_equivariant_to_token_permutation(impl, data, seed, n, rnd):
    cfg, state, x = drawn_case(impl, data, seed, n)
    decided(cfg, state, x)
    perm = list(range(n))
    rnd.shuffle(perm)
    w, idx = routed(impl, cfg, state, x)
    wp, idxp = routed(impl, cfg, state, x[perm])
    for i, p in enumerate(perm):
        assert sorted(idxp[i]) == sorted(idx[p]), (f"token {p} selected {sorted(idx[p])} in place, and "
                                                   f"{sorted(idxp[i])} when moved to position {i} (permutation "
                                                   f"{perm})")
    assert_close(wp.double().sort(-1).values, w.double()[perm].sort(-1).values, rtol(impl),
                 "a token's weights changed when the tokens were permuted")


@given(st.data(), seeds, tokens)
def test_one_group_without_bias_selects_topk_of_logits(impl, data, seed, n):
    cfg, state, x = drawn_case(impl, data, seed, n, bias=False, groups=(1,))
    ex = decided(cfg, state, x)
    assert_selection(routed(impl, cfg, state, x)[1], ex, "one group, no bias: the top-k logits")


@given(st.data(), seeds, tokens)
def test_group_score_is_the_max_without_bias(impl, data, seed, n):
    skip_if_not_applicable(impl, "max_group_score_without_bias")
    cfg, state, x = drawn_case(impl, data, seed, n, bias=False, groups=(2, 4, 8))
    ex = decided(cfg, state, x)  # first: no tie
    assert_selection(routed(impl, cfg, state, x)[1], ex, "without a bias a group scores its best expert")


@given(st.data(), seeds, tokens)
def test_softmax_weights_are_unnormalised_probabilities(impl, data, seed, n):
    # DeepSeek-V2: softmax over all experts, top-k probabilities times route_scale, not renormalised.
    skip_if_not_applicable(impl, "softmax_scoring")
    cfg, state, x = drawn_case(impl, data, seed, n, bias=False, score="softmax", norm=False)
    ex = decided(cfg, state, x)
    assert_weights(impl, cfg, state, x, ex, "top-k softmax probabilities",
                   f"top-k softmax probabilities x route_scale {cfg.moe.route_scale}, not renormalised")


@given(st.sampled_from([2, 4, 8]), st.integers(1, 4), st.integers(2, 4), seeds, tokens, st.data())
def test_node_limited_routing_reaches_at_most_m_nodes(impl, nodes, gpus_per_node, experts_per_gpu, seed, n, data):
    # Node-limited routing as group-limited routing with one group per node (n_group = nodes, topk_group = M).
    limit = data.draw(st.integers(1, nodes), label="node limit M")
    per_node = gpus_per_node * experts_per_gpu
    topk = data.draw(st.integers(1, min(8, limit * per_node)), label="top-k")
    moe = MoEConfig(n_routed_experts=nodes * per_node, num_experts_per_tok=topk, moe_intermediate_size=4,
                    n_group=nodes, topk_group=limit, route_scale=2.5, bias=True,
                    norm_topk_prob=data.draw(st.booleans(), label="norm_topk_prob"))
    cfg = model(moe, 16)
    note_case(cfg, seed, n)
    state, x = moe_state(cfg, seed), moe_tokens(cfg, seed, n)
    ex = decided(cfg, state, x)
    _, indices = impl.route(cfg, state, x)
    layout = dispatch_layout(indices, moe.n_routed_experts, nodes * gpus_per_node, gpus_per_node)
    reached = layout.is_token_in_node.sum(-1)
    worst = int(reached.argmax())
    assert int(reached[worst]) <= limit, (f"token {worst} reaches {int(reached[worst])} nodes with experts "
                                          f"{sorted(indices[worst].tolist())} ({per_node} experts per node); the "
                                          f"node limit M is {limit}\n{ex.token(worst)}")


# --- the layer ---------------------------------------------------------------------------------------------------
@given(st.data(), seeds, tokens)
def test_output_is_the_dense_weighted_sum_of_experts(impl, data, seed, n):
    cfg = data.draw(moe_cfgs(impl), label="cfg")
    note_case(cfg, seed, n, call="impl.forward(cfg, state, x)")
    state, x = moe_state(cfg, seed), moe_tokens(cfg, seed, n)
    ex = decided(cfg, state, x)
    assert_close(impl.forward(cfg, state, x), dense_output(cfg, state, x, ex), rtol(impl),
                 "the layer output differs from shared(x) + sum_k w_k expert_k(x) (float64)")


@given(st.data(), seeds, st.integers(1, 3), st.integers(1, 6))
def test_output_keeps_the_leading_shape(impl, data, seed, batch, seq):
    cfg = data.draw(moe_cfgs(impl), label="cfg")
    note_case(cfg, seed, batch * seq, call=f"impl.forward(cfg, state, x.view({batch}, {seq}, -1))")
    state, x = moe_state(cfg, seed), moe_tokens(cfg, seed, batch * seq)
    decided(cfg, state, x)
    flat = impl.forward(cfg, state, x)
    shaped = impl.forward(cfg, state, x.view(batch, seq, -1))
    assert tuple(shaped.shape) == (batch, seq, cfg.hidden_size), (
        f"forward of x [{batch}, {seq}, {cfg.hidden_size}] returned shape {tuple(shaped.shape)}; x [..., D] keeps "
        "its leading dims")
    assert_close(shaped.reshape(batch * seq, -1), flat, FP64_RTOL, "x [B, S, D] and x [B*S, D] give different tokens")


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
    cfg = model(moe, 64)
    rebuild(*IMPORTS, CONFIG_IMPORT, config_line(cfg), f"state, x = bf16_case(cfg, seed={seed}, tokens={n})",
            "impl.forward(cfg, state, x)")
    state16, x = bf16_case(cfg, seed, n)
    truth_state = {k: v.double() for k, v in state16.items()}
    truth = dense_output(cfg, truth_state, x.double(), Expected(cfg, truth_state, x.double()))
    out = impl.forward(cfg, state16, x)
    assert out.dtype == torch.bfloat16, f"forward of bf16 x returned {out.dtype}; expected x's dtype"
    low = bf16_dense(cfg, state16, x)
    err, err_low = (out.double() - truth).abs().max().item(), (low.double() - truth).abs().max().item()
    bound = 3 * err_low + 2**-9 * truth.abs().max().item()
    assert err <= bound, (f"bf16 output error {err:.3e} exceeds 3x a plain bf16 evaluation's {err_low:.3e} plus "
                          f"half an ulp ({bound:.3e})")


def bf16_dense(cfg: ModelConfig, state: State, x: torch.Tensor) -> torch.Tensor:
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
