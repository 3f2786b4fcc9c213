"""The auxiliary-loss-free balancing experiment: a stream of batches whose router logits carry a fixed per-expert
skew, routed with a model's DeepSeekMoE routing, with and without the bias update after every batch.

Load = tokens per expert summed over the last `window` batches (one batch's sampling noise alone gives max/mean
~1.25 at 256 experts and 4096 tokens); records `moe_load_max_over_mean` per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dsv3ref.balancing import BalancingInputError, LoadStats, apply_bias_update_, expert_load, load_stats
from dsv3ref.config import MoEConfig
from dsv3ref.moe import select_experts
from harness.results import Record

MODEL = "deepseek-v3-671b"
PARAMS = {"steps": 300, "tokens": 4096, "gamma": 0.001, "skew_std": 0.5, "window": 10, "seed": 0}
CURVE_STEPS = (1, 10, 25, 50, 75, 100, 125, 150, 200, 250, 300)
TARGET = 1.2  # the max/mean load the bias update should reach


@dataclass(frozen=True)
class BalancingRun:
    """One run of the balancing experiment: the load statistic after each step, and the final window's load."""

    gamma: float
    max_over_mean: tuple[float, ...]  # per step, of the load summed over the last `window` batches
    final_load: torch.Tensor
    window: int

    @property
    def final(self) -> LoadStats:
        return load_stats(self.final_load)

    def first_step_at_or_below(self, threshold: float) -> int | None:
        """The first step (1-based) whose windowed max/mean is <= threshold, or None."""
        return next((i + 1 for i, v in enumerate(self.max_over_mean) if v <= threshold), None)


def skewed_logits(generator: torch.Generator, tokens: int, skew: torch.Tensor) -> torch.Tensor:
    """Router logits [tokens, E] for one batch: N(0, 1) per token and expert plus a fixed per-expert skew."""
    return torch.randn(tokens, skew.numel(), generator=generator) + skew


def run_balancing(moe: MoEConfig, steps: int, tokens: int, gamma: float, skew_std: float = 1.0, window: int = 10,
                  seed: int = 0) -> BalancingRun:
    """Route a stream of `steps` batches of skewed logits (skew ~ N(0, skew_std) per expert, fixed per seed) with
    `moe`'s routing and a bias updated after each batch by `gamma` (0: no balancing); the same seed gives the
    same stream for every gamma."""
    if steps < 1 or tokens < 1 or window < 1:
        raise BalancingInputError(f"steps, tokens, window: expected >= 1, got {steps}, {tokens}, {window}")
    if gamma and not moe.bias:
        raise BalancingInputError("moe.bias: the bias update needs a config with a selection bias (bias = true)")
    e = moe.n_routed_experts
    gen = torch.Generator().manual_seed(seed)
    skew = torch.randn(e, generator=gen) * skew_std
    bias = torch.zeros(e) if moe.bias else None  # fp32, as the official selection bias
    score = torch.sigmoid if moe.score_func == "sigmoid" else lambda z: z.softmax(dim=-1)
    loads: list[torch.Tensor] = []
    curve: list[float] = []
    for _ in range(steps):
        indices = select_experts(score(skewed_logits(gen, tokens, skew)), bias, moe)
        load = expert_load(indices, e)
        if bias is not None:
            apply_bias_update_(bias, load, gamma)
        loads = (loads + [load])[-window:]
        curve.append(load_stats(torch.stack(loads).sum(dim=0)).max_over_mean)
    return BalancingRun(gamma, tuple(curve), torch.stack(loads).sum(dim=0), window)


def balancing_runs(moe: MoEConfig, **overrides: Any) -> dict[str, BalancingRun]:
    """The bias-update run and the same stream with no balancing (PARAMS, with `overrides`)."""
    params = dict(PARAMS, **overrides)
    gamma = params.pop("gamma")
    return {"bias-update": run_balancing(moe, gamma=gamma, **params),
            "no-balancing": run_balancing(moe, gamma=0.0, **params)}


def balancing_records(runs: dict[str, BalancingRun], config: str, steps: int, tokens: int) -> list[Record]:
    """`moe_load_max_over_mean` of each run after its last batch, with the curve, steps and final CV."""
    records = []
    for subject, run in runs.items():
        final = run.final
        curve = {str(s): run.max_over_mean[s - 1] for s in CURVE_STEPS if s <= steps}
        records.append(Record("moe_load_max_over_mean", subject, final.max_over_mean, "ratio", kind="measured",
                              method=f"tokens per expert summed over the last {run.window} batches",
                              extra={"config": config, "steps": steps, "tokens_per_batch": tokens,
                                     "gamma": run.gamma, "final_cv": final.cv,
                                     f"first_step_at_or_below_{TARGET}": run.first_step_at_or_below(TARGET),
                                     "curve": curve}))
    return records
