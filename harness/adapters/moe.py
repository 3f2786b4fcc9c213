"""Component `moe` (protocol `harness.protocols.MoEImpl`): the built-in implementations, `reference` (dsv3ref's
MoE with the per-expert loop), `grouped` (the same layer through the grouped fast paths, backend "auto") and,
with the `hf` extra, `transformers` (DeepseekV3MoE built from the same weights; eager experts).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.moe import MoE
from harness.protocols import MoEImpl
from harness.registry import register_component, register_impl

PROPERTIES = (
    "softmax_scoring",  # V2 softmax affinities
    "max_group_score_without_bias",  # without a bias the group score is the max, not the top-2 sum
    "fp64_router",  # the router computes in the input dtype when it is fp64 (else at most fp32)
    "exact_normaliser",  # sigmoid weights divided by their plain sum, without an epsilon
)
HF_EXPERTS = ("eager", "grouped_mm", "batched_mm")  # transformers' experts implementations


def build_moe(cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor, backend: str) -> MoE:
    """A dsv3ref MoE in x's dtype and device holding `state` (the bias stays fp32 below fp32)."""
    moe = MoE(cfg, backend=backend).to(device=x.device, dtype=x.dtype)
    moe.load_state_dict(state)
    return moe


class DsMoE:
    """dsv3ref.moe.MoE with its routed experts run by `backend` ("loop", the reference, or "auto")."""

    component = "moe"

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def route(self, cfg: ModelConfig, state: dict[str, torch.Tensor],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return build_moe(cfg, state, x, self.backend).gate(x)

    def forward(self, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return build_moe(cfg, state, x, self.backend)(x)


def hf_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in transformers' DeepseekV3MoE names: w1|w3 fused into gate_up_proj [E, 2I, D], w2 stacked
    into down_proj [E, D, I], the bias as e_score_correction_bias (zeros when the config has none)."""
    n = cfg.moe.n_routed_experts
    experts = range(n)
    out = {
        "gate.weight": state["gate.weight"],
        "gate.e_score_correction_bias": state.get("gate.bias", torch.zeros(n, dtype=torch.float32)),
        "experts.gate_up_proj": torch.stack([torch.cat([state[f"experts.{i}.w1.weight"],
                                                        state[f"experts.{i}.w3.weight"]]) for i in experts]),
        "experts.down_proj": torch.stack([state[f"experts.{i}.w2.weight"] for i in experts]),
    }
    if cfg.moe.n_shared_experts:
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[f"shared_experts.{theirs}.weight"] = state[f"shared_experts.{ours}.weight"]
    return out


def build_hf_moe(cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, device: str | torch.device,
                 experts_implementation: str = "eager") -> nn.Module:
    """transformers' DeepseekV3MoE for `cfg` holding `state`, in `dtype` (its bias buffer kept fp32, as
    transformers keeps it when loading a checkpoint)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    if experts_implementation not in HF_EXPERTS:
        raise ValueError(f"experts_implementation: expected one of {', '.join(HF_EXPERTS)}, "
                         f"got {experts_implementation!r}")
    m = cfg.moe
    hf_cfg = DeepseekV3Config(
        hidden_size=cfg.hidden_size, moe_intermediate_size=m.moe_intermediate_size, n_routed_experts=m.n_routed_experts,
        n_shared_experts=max(m.n_shared_experts, 1), num_experts_per_tok=m.num_experts_per_tok, n_group=m.n_group,
        topk_group=m.topk_group, routed_scaling_factor=m.route_scale, norm_topk_prob=m.norm_topk_prob,
        num_hidden_layers=1, vocab_size=16)
    hf_cfg._experts_implementation = experts_implementation
    module = DeepseekV3MoE(hf_cfg)
    if not m.n_shared_experts:
        module.shared_experts = _Zero()
    module.to(device=device, dtype=dtype)
    module.load_state_dict(hf_state_dict(cfg, state))
    if dtype in (torch.bfloat16, torch.float16):
        bias = state.get("gate.bias", torch.zeros(m.n_routed_experts))
        module.gate.e_score_correction_bias = bias.to(device=device, dtype=torch.float32)
    return module


class _Zero(nn.Module):
    """Stands in for the shared experts when a config has none (transformers' layer always has them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class TransformersMoE:
    """transformers' DeepseekV3MoE (router DeepseekV3TopkRouter, eager experts) built from the same weights."""

    component = "moe"
    not_applicable = {
        "softmax_scoring": "DeepseekV3TopkRouter always scores with a sigmoid",
        "max_group_score_without_bias": "the group score is always the top-2 sum (a config without a bias gets a "
                                        "zero e_score_correction_bias)",
        "fp64_router": "the router casts x and gate.weight to float32 (outputs compared at 1e-5, not 1e-10)",
        "exact_normaliser": "the weights are divided by (sum + 1e-20)",
    }

    def route(self, cfg: ModelConfig, state: dict[str, torch.Tensor],
              x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            _, weights, indices = build_hf_moe(cfg, state, x.dtype, x.device).gate(x)
        return weights.to(x.dtype), indices

    def forward(self, cfg: ModelConfig, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return build_hf_moe(cfg, state, x.dtype, x.device)(x)


register_component("moe", "DeepSeekMoE: group-limited sigmoid/softmax router with selection bias, shared + "
                   "routed SwiGLU experts", MoEImpl, PROPERTIES)
register_impl("moe", "reference", lambda: DsMoE("loop"), "dsv3ref.moe.MoE, per-expert loop")
register_impl("moe", "grouped", lambda: DsMoE("auto"), "dsv3ref.moe.MoE, tokens sorted by expert, grouped GEMMs "
              "(backend auto)")
register_impl("moe", "transformers", TransformersMoE, "transformers DeepseekV3MoE (eager experts), same weights",
              requires=("transformers",))
