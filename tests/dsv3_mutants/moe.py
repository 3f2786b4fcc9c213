"""Broken DeepSeekMoE routers: the reference layer (per-expert loop) with one mistake in its gate."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3ref.config import ModelConfig, MoEConfig
from dsv3ref.moe import MoE, gate_weights, select_experts
from harness.adapters.moe import build_moe

Select = Callable[[torch.Tensor, torch.Tensor | None, MoEConfig], torch.Tensor]
Weigh = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, MoEConfig], torch.Tensor]


def _weigh(scores: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None, moe: MoEConfig) -> torch.Tensor:
    return gate_weights(scores, indices, moe)


class MutantMoE:
    """The reference MoE whose gate selects with `select` and weighs with `weigh`."""

    component = "moe"

    def __init__(self, select: Select = select_experts, weigh: Weigh = _weigh) -> None:
        self.select, self.weigh = select, weigh

    def _layer(self, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> MoE:
        layer = build_moe(cfg, state, x, "loop")
        gate = layer.gate

        def route(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scores = gate.scores(v)
            indices = self.select(scores, gate.bias, cfg.moe)
            return self.weigh(scores, indices, gate.bias, cfg.moe).to(v.dtype), indices

        gate.forward = route
        return layer

    def route(self, cfg: ModelConfig, state: dict[str, torch.Tensor],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self._layer(cfg, state, x).gate(x)

    def forward(self, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._layer(cfg, state, x)(x)


def _zero_fill_select(scores: torch.Tensor, bias: torch.Tensor | None, moe: MoEConfig) -> torch.Tensor:
    """Dropped groups masked with 0.0 instead of -inf: with negative biases they win."""
    biased = scores if bias is None else scores + bias
    if moe.n_group > 1:
        grouped = biased.view(biased.shape[0], moe.n_group, -1)
        group_score = grouped.amax(-1) if bias is None else grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_score.topk(moe.topk_group, dim=-1).indices
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(dropped.unsqueeze(-1), 0.0).flatten(1)
    return biased.topk(moe.num_experts_per_tok, dim=-1).indices


def zero_filled_groups() -> MutantMoE:
    return MutantMoE(select=_zero_fill_select)


def unbiased_selection() -> MutantMoE:
    """Selects with the scores alone (the bias ignored), group scores still the top-2 sums."""
    return MutantMoE(select=lambda s, b, m: select_experts(s, None if b is None else torch.zeros_like(b), m))


def biased_weights() -> MutantMoE:
    """Gate weights gathered from the biased scores."""
    return MutantMoE(weigh=lambda s, i, b, m: gate_weights(s if b is None else s + b, i, m))


def _epsilon_weights(scores: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                     moe: MoEConfig) -> torch.Tensor:
    weights = scores.gather(1, indices)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.route_scale


def epsilon_normaliser() -> MutantMoE:
    """Weights divided by (sum + 1e-20)."""
    return MutantMoE(weigh=_epsilon_weights)


def _sigmoid_normalised(scores: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None,
                        moe: MoEConfig) -> torch.Tensor:
    weights = scores.gather(1, indices)
    if moe.score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * moe.route_scale


def ignores_norm_topk_prob() -> MutantMoE:
    """Normalises the weights when the scores are sigmoids, whatever norm_topk_prob says."""
    return MutantMoE(weigh=_sigmoid_normalised)
