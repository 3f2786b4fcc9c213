"""DeepSeekMoE: the router (`Gate`) and the MoE layer (shared + routed SwiGLU experts).

Semantics follow the official DeepSeek-V3 inference code: sigmoid (V3) or softmax (V2) affinities; an optional
fp32 per-expert bias added only for selection; group-limited top-k (group score = sum of the top-2 biased scores
with a bias, the max without; the other groups masked with -inf), which is node-limited routing when groups are
nodes; gate weights gathered from the unbiased scores, normalised (`norm_topk_prob`) and times `route_scale`.

The routed experts run as the official code's per-expert loop (backend "loop", the reference) or through a fast
path registered in `dsv3ref.backends` (kind "moe_experts": the grouped backends of `dsv3ref.moe_grouped`, and
"auto", which picks one of them for the device, dtype and batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref import backends
from dsv3ref.config import ConfigError, ModelConfig, MoEConfig
from dsv3ref.layers import MLP

PRECISIONS = ("bf16", "fp32")
_BELOW_FP32 = (torch.bfloat16, torch.float16)


class MoEInputError(ValueError):
    """A bad input to the router or the MoE layer; the message names the argument and what was expected."""


def select_experts(scores: torch.Tensor, bias: torch.Tensor | None, moe: MoEConfig) -> torch.Tensor:
    """Indices [N, k] of each token's experts: top-k of the biased scores within its top `topk_group` groups.

    `scores` [N, E] are the unbiased affinities; `bias` [E] (or None) shifts them for selection only.
    """
    biased = scores if bias is None else scores + bias
    if moe.n_group > 1:
        groups = moe.n_group
        grouped = biased.view(biased.shape[0], groups, moe.n_routed_experts // groups)  # [N, G, E/G]
        # group score: the best expert without a bias, the sum of the best two with one
        group_score = grouped.amax(dim=-1) if bias is None else grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_score.topk(moe.topk_group, dim=-1).indices  # [N, topk_group]
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
    return biased.topk(moe.num_experts_per_tok, dim=-1).indices


def gate_weights(scores: torch.Tensor, indices: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """Weights [N, k] from the unbiased scores of the selected experts, normalised, times route_scale."""
    weights = scores.gather(1, indices)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * moe.route_scale


def _check_input(x: torch.Tensor, dim: int, weight_dtype: torch.dtype) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise MoEInputError(f"x: expected shape [tokens, {dim}], got {list(x.shape)}")
    if x.dtype != weight_dtype:
        raise MoEInputError(f"x: expected dtype {weight_dtype} (the gate weight's), got {x.dtype}")


class Gate(nn.Module):
    """The router: (weights [N, k], indices [N, k]) for x [N, D].

    precision "bf16" computes as the official code: logits and sigmoid in the activation dtype (bf16 when the
    model runs in bf16), softmax in fp32. "fp32" computes as Hugging Face: logits and scores in fp32 (fp64 stays
    fp64). The selection bias (when `cfg.moe.bias`) is fp32 and stays fp32 when the module is cast to bf16/fp16.
    """

    def __init__(self, cfg: ModelConfig, precision: str = "bf16") -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError(f"{cfg.name}: moe: a Gate needs a MoE config")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.cfg, self.moe, self.dim, self.precision = cfg, cfg.moe, cfg.hidden_size, precision
        self.weight = nn.Parameter(torch.empty(cfg.moe.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        bias = torch.zeros(cfg.moe.n_routed_experts, dtype=torch.float32)
        # the bias is set by the load-balancing update, never by gradients: it only affects the selection
        self.bias = nn.Parameter(bias, requires_grad=False) if cfg.moe.bias else None
        self.last_scores: torch.Tensor | None = None

    def _apply(self, fn: Callable, recurse: bool = True) -> Gate:
        """Module conversions (.to, .bfloat16, ...) never lower the selection bias below fp32."""
        saved = None if self.bias is None else self.bias.detach().clone()
        super()._apply(fn, recurse)
        if saved is not None and self.bias.dtype in _BELOW_FP32:
            self.bias.data = saved.to(device=self.bias.device, dtype=torch.float32)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased affinities [N, E] in the router's precision."""
        compute = x.dtype if self.precision == "bf16" else torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(compute), self.weight.to(compute))
        if not torch.isfinite(logits).all():  # NaN/Inf in x always reaches the logits of its token
            raise MoEInputError("x: expected finite router logits, got NaN or Inf (non-finite x or gate.weight, "
                                "or overflow)")
        if self.moe.score_func == "softmax":
            return logits.softmax(dim=-1, dtype=torch.promote_types(compute, torch.float32))
        return logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route x [N, D]: weights [N, k] in x's dtype and expert indices [N, k]; keeps `last_scores`."""
        _check_input(x, self.dim, self.weight.dtype)
        scores = self.scores(x)
        self.last_scores = scores
        indices = select_experts(scores, self.bias, self.moe)
        return gate_weights(scores, indices, self.moe).to(x.dtype), indices



@backends.register("moe_experts", "loop")
def loop_experts(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The reference: each expert takes the rows routed to it and adds its weighted output (the official loop).
    x [N, D], weights and indices [N, k] -> the routed sum [N, D]; slots holding -1 (an expert on another rank,
    under expert parallelism) add nothing."""
    y = torch.zeros_like(x)
    counts = torch.bincount(indices[indices >= 0], minlength=moe.n_experts).tolist()
    for i, expert in enumerate(moe.experts):
        if counts[i] == 0:
            continue
        rows, slot = torch.where(indices == i)
        y[rows] += expert(x[rows]) * weights[rows, slot, None]
    return y


class MoE(nn.Module):
    """Shared experts + routed experts, y = shared(x) + sum_k w_k expert_{i_k}(x), for x [..., D].

    `backend` names how the routed experts run (see `dsv3ref.backends.names("moe_experts")`): "loop" (the
    reference) or a fast path; "auto" (default) picks a fast path for the device, dtype and batch. After each
    forward, `last_indices` [N, k] holds the routing (for the bias update) and `gate.last_scores` the affinities.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto", precision: str = "bf16") -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError(f"{cfg.name}: moe: a MoE layer needs a MoE config")
        backends.get("moe_experts", backend)  # fail at construction, naming the known backends
        moe = cfg.moe
        self.cfg, self.dim, self.backend = cfg, cfg.hidden_size, backend
        self.n_experts, self.topk, self.inter = moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size
        self.gate = Gate(cfg, precision)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, moe.moe_intermediate_size) for _ in range(self.n_experts))
        shared = moe.n_shared_experts * moe.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared else None
        self.last_indices: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]; keeps the routing in `last_indices`."""
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise MoEInputError(f"x: expected shape [..., {self.dim}], got {list(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [N, D]
        weights, indices = self.gate(x)
        self.last_indices = indices.detach()
        y = backends.get("moe_experts", self.backend)(self, x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
