"""KV-cache bytes per token: what one token leaves in the cache of every layer."""

from __future__ import annotations

from dsv3ref.config import MLA_MODES, AttentionConfig, ConfigError, ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
FP8_SCALE_BYTES = 4  # one fp32 dequantisation scale per token of an FP8 latent cache
FP8_ROPE_KEY_DTYPE = "bf16"  # the FP8 latent cache keeps the small roped key in BF16


def dtype_bytes(dtype: str, what: str = "cache dtype") -> int:
    """Bytes per element of a dtype name (fp32, bf16, fp16, fp8); `what` names the argument in the error."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{what}: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def kv_cache_bytes_per_token_layer(att: AttentionConfig, dtype: str = "bf16", mla_mode: str = "absorbed") -> int:
    """One layer's cache bytes per token.

    MHA/GQA/MQA: K and V of every KV head, 2 * kv_heads * head_dim elements.
    MLA absorbed: the normalised latent c^KV plus the shared roped key k^R, kv_lora_rank + qk_rope_head_dim; in
      "fp8" the latent is e4m3 with one fp32 scale per token and k^R stays BF16 (dsv3ref.kv_cache.LatentCache).
    MLA naive: per-head K (nope + rope) and V, num_heads * (qk_head_dim + v_head_dim) -- the MHA-sized cache.
    """
    width = dtype_bytes(dtype)
    if att.kind != "mla":
        return 2 * att.num_kv_heads * att.head_dim * width
    if mla_mode == "absorbed" and dtype == "fp8":
        return att.kv_lora_rank * width + FP8_SCALE_BYTES + att.qk_rope_head_dim * DTYPE_BYTES[FP8_ROPE_KEY_DTYPE]
    if mla_mode == "absorbed":
        return (att.kv_lora_rank + att.qk_rope_head_dim) * width
    if mla_mode == "naive":
        return att.num_heads * (att.qk_head_dim + att.v_dim) * width
    raise ConfigError(f"mla_mode: expected one of {', '.join(MLA_MODES)}, got {mla_mode!r}")


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bf16", mla_mode: str = "absorbed") -> int:
    """All layers' cache bytes per token (MTP modules excluded: they are not run when serving without MTP)."""
    return cfg.num_layers * kv_cache_bytes_per_token_layer(cfg.attention, dtype, mla_mode)


def kv_cache_bytes_per_sequence(cfg: ModelConfig, context: int, dtype: str = "bf16", mla_mode: str = "absorbed") -> int:
    """The cache of one sequence of `context` tokens, all layers: bytes per token x context."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise ConfigError(f"context: expected an integer >= 0, got {context!r}")
    return context * kv_cache_bytes_per_token(cfg, dtype, mla_mode)
