"""Component `model` (protocol `harness.protocols.ModelImpl`): an assembled DeepSeek-V3 model with cached decoding.
Built-in implementations: `reference` (dsv3ref's Transformer with naive MLA, per-head K/V caches, and the
per-expert MoE loop: the literal formulas), `absorbed` (absorbed MLA over the latent cache, contiguous or paged,
BF16 or FP8, MoE backend auto) and `transformers` (DeepseekV3ForCausalLM over the same weights with a
DynamicCache; the `hf` extra).

Properties an implementation may declare not applicable: fp64_exact (matches the float64 truth to 1e-10), varlen
(rows of different lengths in one batch: per-row positions and `seqlens`), paged_cache. (The FP8 latent cache
is the MLA layer's; the `mla` suite checks it.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsv3ref.checkpoint import ours_to_hf
from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.hf_config import hf_config_dict
from dsv3ref.model import ModelCache, Transformer
from harness.adapters.mla import NAIVE_CACHE, hf_rope_parameters
from harness.adapters.moe import hf_state_dict as hf_moe_state
from harness.protocols import ModelImpl
from harness.registry import register_component, register_impl

PROPERTIES = ("fp64_exact", "varlen", "paged_cache")

register_component("model", "the assembled DeepSeek-V3 model: weights by official names, prefill and cached decode, "
                   "logits", ModelImpl, PROPERTIES)


class ReferenceModel:
    """dsv3ref.model.Transformer with MLA in `attn_mode` and the routed experts run by `moe_backend`."""

    component = "model"

    def __init__(self, attn_mode: str, moe_backend: str) -> None:
        self.attn_mode, self.moe_backend = attn_mode, moe_backend
        self.not_applicable = {"paged_cache": NAIVE_CACHE} if attn_mode == "naive" else {}

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> Transformer:
        return Transformer.from_state_dict(cfg, state_dict, attn_mode=self.attn_mode, moe_backend=self.moe_backend,
                                           dtype=dtype, device=device)

    def new_cache(self, model: Transformer, batch: int, max_len: int, **options: Any) -> ModelCache:
        return model.new_cache(batch, max_len, **options)

    def forward(self, model: Transformer, tokens: torch.Tensor, cache: ModelCache | None = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            if cache is None:
                if seqlens is not None:
                    raise ValueError("seqlens: only with a cache (a full pass has no padding)")
                return model(tokens)
            return model.extend(tokens, cache, seqlens, all_logits=True).logits


# --- transformers' DeepseekV3ForCausalLM ------------------------------------------------------------------------


def hf_model_config(cfg: ModelConfig) -> Any:
    """A DeepseekV3Config for `cfg` (see dsv3ref.hf_config.hf_config_dict; RoPE as `hf_rope_parameters`).

    transformers' DeepSeek-V3 always routes with sigmoid scores, a selection bias and shared experts: configs
    without them are rejected rather than silently run with other semantics.
    """
    from transformers import DeepseekV3Config

    m = cfg.moe
    if m is None or m.score_func != "sigmoid" or not m.bias or not m.n_shared_experts:
        raise ConfigError(f"{cfg.name}: moe: transformers' DeepseekV3 needs sigmoid scoring, a selection bias and "
                          "shared experts")
    keys = hf_config_dict(cfg)
    for key in ("architectures", "model_type", "rope_scaling", "rope_theta", "moe_layer_freq", "scoring_func",
                "topk_method"):
        keys.pop(key)
    return DeepseekV3Config(**keys, rope_parameters=hf_rope_parameters(cfg))


def hf_model_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the names of transformers' in-memory DeepseekV3ForCausalLM: as in its checkpoint files
    (dsv3ref.checkpoint.ours_to_hf), except each MoE layer's experts, stacked (harness.adapters.moe)."""
    out: dict[str, torch.Tensor] = {}
    moe_prefixes = [f"layers.{i}.ffn." for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    for prefix in moe_prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        hf_prefix = ours_to_hf(prefix + "x", cfg.num_layers).removesuffix("x")
        out.update({hf_prefix + k: v for k, v in hf_moe_state(cfg, sub).items()})
    out.update({ours_to_hf(k, cfg.num_layers): v for k, v in state.items()
                if not k.startswith(tuple(moe_prefixes))})
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


class TransformersModel:
    """transformers.DeepseekV3ForCausalLM built from the same weights (eager experts); a DynamicCache per call of
    new_cache."""

    component = "model"
    not_applicable = {
        "fp64_exact": "its RoPE angles (position_ids.float() * inv_freq), RMSNorm and router compute in float32 "
                      "whatever the model's dtype",
        "varlen": "a DynamicCache keeps one length for the whole batch",
        "paged_cache": "DynamicCache is contiguous",
    }

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> nn.Module:
        from transformers import DeepseekV3ForCausalLM
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

        hf_cfg = hf_model_config(cfg)
        hf_cfg._experts_implementation = "eager"  # the loop over hit experts; grouped_mm has no fp64
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(hf_cfg)
        model.load_state_dict(hf_model_state(cfg, state_dict), strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        model.model.rotary_emb = DeepseekV3RotaryEmbedding(hf_cfg)  # its fp32 inv_freq, not a meta tensor
        model = model.to(device=device, dtype=dtype)
        model.model.rotary_emb.to(dtype=torch.float32)
        for layer in model.model.layers:  # transformers keeps the selection bias in fp32 when it loads weights
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and dtype in (torch.bfloat16, torch.float16):
                gate.e_score_correction_bias = gate.e_score_correction_bias.float()
        return model.eval()

    def new_cache(self, model: nn.Module, batch: int, max_len: int, **options: Any) -> Any:
        from transformers import DynamicCache

        unsupported = sorted(k for k, v in options.items() if v)
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported by transformers' DynamicCache")
        return DynamicCache(config=model.config)

    def forward(self, model: nn.Module, tokens: torch.Tensor, cache: Any = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if seqlens is not None:
            raise ValueError("seqlens: per-row lengths are not supported by this adapter (one DynamicCache length)")
        with torch.no_grad():
            return model(input_ids=tokens, cache=cache, use_cache=cache is not None).logits


register_impl("model", "reference", lambda: ReferenceModel("naive", "loop"),
              "dsv3ref Transformer: naive MLA (per-head K/V cache), per-expert MoE loop")
register_impl("model", "absorbed", lambda: ReferenceModel("absorbed", "auto"),
              "dsv3ref Transformer: absorbed MLA (latent cache, paged/FP8 options), MoE backend auto")
register_impl("model", "transformers", TransformersModel,
              "transformers DeepseekV3ForCausalLM over the same weights, DynamicCache", requires=("transformers",))
