"""MoE conformance cases: random float64 weights by the official names and token batches, from a seed."""

from __future__ import annotations

import torch

from dsv3ref.config import ModelConfig

State = dict[str, torch.Tensor]
IMPORTS = ("import torch", "from harness.cases.moe import moe_state, moe_tokens, tiny_scores, bf16_case")


def moe_state(cfg: ModelConfig, seed: int, bias_low: float = -3.0, bias_high: float = 1.0,
              logit_scale: float = 2.0) -> State:
    """Random float64 weights in the official names: the gate N(0, logit_scale^2 / D), experts N(0, 1/fan_in),
    the selection bias (when cfg.moe.bias) uniform in [bias_low, bias_high] and rounded to fp32 values (mostly
    negative by default: masking dropped groups with 0.0 instead of -inf then selects experts from them)."""
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


def moe_tokens(cfg: ModelConfig, seed: int, tokens: int) -> torch.Tensor:
    """x [tokens, D], float64 N(0, 1)."""
    return torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)


def tiny_scores(cfg: ModelConfig, seed: int, tokens: int) -> tuple[State, torch.Tensor]:
    """A case whose router logits are all near -60 (sigmoid scores ~1e-26): `tokens` copies of one token, the gate
    shifted along it. A normaliser with an epsilon (sum + 1e-20) no longer sums to route_scale."""
    state = moe_state(cfg, seed, logit_scale=0.1)
    x = moe_tokens(cfg, seed, tokens).sum(0)
    state["gate.weight"] = state["gate.weight"] - 60.0 * x / x.square().sum()
    return state, x.expand(tokens, -1).contiguous()


def bf16_case(cfg: ModelConfig, seed: int, tokens: int) -> tuple[State, torch.Tensor]:
    """bf16 weights (the bias fp32) and tokens whose router logits are the first E input features, a permutation
    of well-spaced levels per token (so bf16 routing equals float64 routing); cfg needs E <= D and no groups."""
    experts = cfg.moe.n_routed_experts
    state = moe_state(cfg, seed)
    state["gate.weight"] = torch.eye(experts, cfg.hidden_size, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    levels = torch.linspace(-3, 3, experts, dtype=torch.float64)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen, dtype=torch.float64)
    x[:, :experts] = torch.stack([levels[torch.randperm(experts, generator=gen)] for _ in range(tokens)])
    state16 = {k: v.float() if k == "gate.bias" else v.to(torch.bfloat16) for k, v in state.items()}
    return state16, x.to(torch.bfloat16)
