"""Hugging Face `config.json` -> ModelConfig, for DeepSeek-V3/V2, Qwen2 and Llama checkpoints.

Only architectural keys are read; the rest of an HF config (token ids, dtypes, quantization, ...) does not
change the architecture and is ignored. A missing architectural key is a `ConfigError` naming it.
"""

from __future__ import annotations

from typing import Any

from dsv3ref.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig

HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")


def _get(hf: dict[str, Any], key: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ConfigError(f"hf config: missing {key!r} (needed for model_type {hf.get('model_type')!r})")
    return default


def _rope(hf: dict[str, Any]) -> RopeConfig:
    """RoPE from `rope_scaling` (older HF) or `rope_parameters` (newer HF), plus `rope_theta`."""
    scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return RopeConfig(kind="default", theta=theta)
    if kind not in ("yarn", "llama3"):
        raise ConfigError(f"hf config: rope_scaling.type: expected default, yarn or llama3, got {kind!r}")
    keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
            "low_freq_factor", "high_freq_factor")
    known = {k: scaling[k] for k in keys if scaling.get(k) is not None}
    return RopeConfig(kind=kind, theta=theta, **known)


def _moe(hf: dict[str, Any]) -> MoEConfig:
    if _get(hf, "moe_layer_freq", 1) != 1:
        raise ConfigError(f"hf config: moe_layer_freq: expected 1, got {hf['moe_layer_freq']!r}")
    v3 = hf["model_type"] == "deepseek_v3"
    return MoEConfig(
        n_routed_experts=_get(hf, "n_routed_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "moe_intermediate_size"),
        n_shared_experts=_get(hf, "n_shared_experts", 0),
        n_group=_get(hf, "n_group", 1),
        topk_group=_get(hf, "topk_group", 1),
        first_k_dense_replace=_get(hf, "first_k_dense_replace", 0),
        score_func=_get(hf, "scoring_func", "sigmoid" if v3 else "softmax"),
        route_scale=float(_get(hf, "routed_scaling_factor", 1.0)),
        norm_topk_prob=_get(hf, "norm_topk_prob", v3),
        bias=_get(hf, "topk_method", "noaux_tc" if v3 else "greedy") == "noaux_tc",
    )


def _attention(hf: dict[str, Any]) -> AttentionConfig:
    heads = _get(hf, "num_attention_heads")
    if hf["model_type"].startswith("deepseek"):
        return AttentionConfig(
            kind="mla", num_heads=heads, q_lora_rank=_get(hf, "q_lora_rank", 0),
            kv_lora_rank=_get(hf, "kv_lora_rank"), qk_nope_head_dim=_get(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=_get(hf, "qk_rope_head_dim"), v_head_dim=_get(hf, "v_head_dim"))
    kv_heads = _get(hf, "num_key_value_heads", heads)
    kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    qkv_bias = True if hf["model_type"] == "qwen2" else _get(hf, "attention_bias", False)
    return AttentionConfig(kind=kind, num_heads=heads, num_kv_heads=kv_heads, head_dim=_get(hf, "head_dim", 0),
                           qkv_bias=qkv_bias)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF config dict to a ModelConfig (see module docstring for what is read)."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"hf config: model_type: expected one of {', '.join(HF_MODEL_TYPES)}, got {model_type!r}")
    deepseek = model_type.startswith("deepseek")
    return ModelConfig(
        name=str(hf.get("_name_or_path") or model_type).rstrip("/").split("/")[-1],
        vocab_size=_get(hf, "vocab_size"),
        hidden_size=_get(hf, "hidden_size"),
        num_layers=_get(hf, "num_hidden_layers"),
        intermediate_size=_get(hf, "intermediate_size"),
        attention=_attention(hf),
        moe=_moe(hf) if deepseek else None,
        rope=_rope(hf),
        max_seq_len=_get(hf, "max_position_embeddings"),
        mtp_depth=_get(hf, "num_nextn_predict_layers", 0),
        tie_word_embeddings=_get(hf, "tie_word_embeddings", False),
        rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
        source=f"Hugging Face config.json (model_type {model_type})",
    )
