"""Component `mla` (protocol `harness.protocols.MLAImpl`): the built-in implementations, `reference` (dsv3ref's
MLA in its naive mode: per-head K/V, the paper's formula), `absorbed` (W_UK folded into the query, W_UV after
attention, a latent cache) and `transformers` (DeepseekV3Attention over the same weights, the `hf` extra).

Properties an implementation may declare not applicable: fp64_exact (matches the float64 truth to 1e-10: every
step in float64, RoPE tables included), varlen (per-row start positions and lengths in one batch),
chunked_prefill (prefill at start_pos > 0 on a filled cache), paged_cache (which needs `paged_pool`), fp8_cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.layers import check_hidden
from dsv3ref.mla import MLA
from harness.protocols import MLAImpl
from harness.registry import register_component, register_impl

PROPERTIES = ("fp64_exact", "varlen", "chunked_prefill", "paged_cache", "fp8_cache")

register_component("mla", "one Multi-head Latent Attention layer (DeepSeek-V3): weights by official names, "
                   "prefill/decode over a cache", MLAImpl, PROPERTIES, {"paged_cache": ("paged_pool",)})
NAIVE_CACHE = "the naive mode caches per-head K and V, contiguous and in the layer's dtype"


def build_reference(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], mode: str, dtype: torch.dtype,
                    device: torch.device | str) -> MLA:
    """dsv3ref.mla.MLA in `mode`, holding `state_dict` in `dtype` on `device` (built on the meta device first, so
    real-dimension layers cost no random initialisation)."""
    with torch.device("meta"):
        layer = MLA(cfg, mode)
    layer.load_state_dict(state_dict, assign=True)
    return layer.to(device=device, dtype=dtype)


class ReferenceMLA:
    """dsv3ref.mla.MLA in one of its modes."""

    component = "mla"

    def __init__(self, mode: str) -> None:
        self.mode = self.cache_mode = mode
        self.not_applicable = {"paged_cache": NAIVE_CACHE, "fp8_cache": NAIVE_CACHE} if mode == "naive" else {}

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> MLA:
        return build_reference(cfg, state_dict, self.mode, dtype, device)

    def new_cache(self, layer: MLA, batch: int, max_len: int, **options: Any) -> Any:
        return layer.new_cache(batch, max_len, **options)

    def cache_bytes_per_token(self, cache: Any) -> float:
        return cache.bytes_per_token()

    def paged_pool(self, cache: Any) -> tuple[torch.Tensor, ...]:
        """The PagedLatentCache's storage: latent [num_blocks, block_size, rank], k_pe [..., rope] (and the fp8
        latent's scales [num_blocks, block_size])."""
        return (cache.kv, cache.pe) + ((cache.scale,) if cache.fp8 else ())


# --- transformers' DeepseekV3Attention -----------------------------------------------------------------------

HF_NAMES = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
            "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}


def hf_config(cfg: ModelConfig, attn_implementation: str = "sdpa") -> Any:
    """A DeepseekV3Config with `cfg`'s attention and RoPE (MoE fields irrelevant to one attention layer).

    rope_interleave=True makes transformers rotate the official interleaved layout in place, so the official
    weights load unpermuted. transformers applies YaRN (frequencies and mscale) whenever rope_scaling says yarn,
    while the official code does so only when max_seq_len exceeds the original length: a config with YaRN
    inactive (cfg.yarn_active False) is mapped to plain RoPE (`hf_rope_parameters`).
    """
    from transformers import DeepseekV3Config

    a = cfg.attention
    return DeepseekV3Config(
        hidden_size=cfg.hidden_size, num_attention_heads=a.num_heads, num_key_value_heads=a.num_heads,
        q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=hf_rope_parameters(cfg), rope_interleave=True,
        attention_bias=False, num_hidden_layers=1, attn_implementation=attn_implementation)


def hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """transformers' `rope_parameters` for `cfg`: YaRN only when the official code applies it (cfg.yarn_active),
    plain RoPE otherwise (transformers would apply YaRN whenever it is configured)."""
    r = cfg.rope
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": r.theta}
    if cfg.yarn_active:
        rope.update(rope_type="yarn", factor=r.factor, beta_fast=r.beta_fast, beta_slow=r.beta_slow,
                    original_max_position_embeddings=r.original_max_position_embeddings, mscale=r.mscale,
                    mscale_all_dim=r.mscale_all_dim)
    return rope


class HFLayer(nn.Module):
    """transformers' DeepseekV3Attention (layer 0) plus its rotary embedding, called with our layer signature."""

    def __init__(self, cfg: ModelConfig, attention: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.cfg, self.attention, self.rotary = cfg, attention, rotary

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: Any = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """One causal pass (cache=None) or a DynamicCache step; start_pos must equal the cached length."""
        check_hidden(x, self.cfg.hidden_size, self.attention.kv_b_proj.weight.dtype)
        if seqlens is not None or not isinstance(start_pos, int):
            raise ValueError("seqlens/start_pos: per-row lengths are not supported by this adapter "
                             "(a DynamicCache keeps one length for the whole batch)")
        bsz, seqlen, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and start_pos != past:
            raise ValueError(f"start_pos: the DynamicCache holds {past} tokens; expected start_pos == {past}, "
                             f"got {start_pos}")
        if start_pos < 0 or start_pos + seqlen > self.cfg.max_seq_len:
            raise ValueError(f"start_pos + sequence length: expected within max_seq_len {self.cfg.max_seq_len}, "
                             f"got {start_pos}..{start_pos + seqlen}")
        positions = torch.arange(start_pos, start_pos + seqlen, device=x.device)[None].expand(bsz, -1)
        cos_sin = self.rotary(x, positions)
        out, _ = self.attention(x, cos_sin, self._mask(x, past, seqlen), cache=cache)
        return out

    @staticmethod
    def _mask(x: torch.Tensor, past: int, seqlen: int) -> torch.Tensor | None:
        """Additive causal mask [1, 1, S, past + S] (query i sees keys <= past + i); None for one new token."""
        if seqlen == 1:
            return None
        keys = torch.arange(past + seqlen, device=x.device)
        hidden = keys[None, :] > past + torch.arange(seqlen, device=x.device)[:, None]
        return torch.zeros(hidden.shape, dtype=x.dtype, device=x.device).masked_fill(
            hidden, torch.finfo(x.dtype).min)[None, None]


class TransformersMLA:
    """transformers.models.deepseek_v3 DeepseekV3Attention over the same weights (the `hf` extra)."""

    component = "mla"
    cache_mode = "absorbed"  # transformers 5.x caches kv_a_layernorm(c) and the roped k_pe, not per-head K/V
    not_applicable = {
        "fp64_exact": "its RMSNorm and RoPE tables compute in float32 (hidden_states.to(float32); "
                      "position_ids.float() * inv_freq) and only then cast",
        "varlen": "a DynamicCache keeps one length for the whole batch",
        "paged_cache": "DynamicCache is contiguous",
        "fp8_cache": "DynamicCache stores the activation dtype",
    }

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: torch.device | str = "cpu") -> HFLayer:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_model

        hf = hf_config(cfg)
        with torch.device("meta"):
            attention = hf_model.DeepseekV3Attention(hf, layer_idx=0)
        renamed = {f"{HF_NAMES[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state_dict.items()}
        attention.load_state_dict(renamed, assign=True)
        # the rotary's inv_freq stays fp32 as from_pretrained leaves it: .to(bfloat16) would round it, and the angle
        # error (position x inv_freq x 2^-9) reaches radians within a few hundred positions
        rotary = hf_model.DeepseekV3RotaryEmbedding(hf).to(device=device)
        return HFLayer(cfg, attention.to(device=device, dtype=dtype), rotary)

    def new_cache(self, layer: HFLayer, batch: int, max_len: int, **options: Any) -> Any:
        from transformers import DynamicCache

        unsupported = [k for k in ("paged", "fp8") if options.get(k)]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: not supported by transformers' DynamicCache")
        return DynamicCache()

    def cache_bytes_per_token(self, cache: Any) -> float:
        layer = cache.layers[0]
        tokens = layer.keys.shape[0] * layer.keys.shape[2]  # [B, 1, T, kv_lora_rank] and [B, 1, T, rope]
        return (layer.keys.nbytes + layer.values.nbytes) / tokens


register_impl("mla", "reference", lambda: ReferenceMLA("naive"),
              "dsv3ref.mla.MLA, naive mode (per-head K/V cache, as the official code's naive attn_impl)")
register_impl("mla", "absorbed", lambda: ReferenceMLA("absorbed"),
              "dsv3ref.mla.MLA, absorbed mode (latent cache; W_UK folded into q, W_UV after attention)")
register_impl("mla", "transformers", TransformersMLA,
              "transformers DeepseekV3Attention over the same weights (decompresses the cached latent each step)",
              requires=("transformers",))
