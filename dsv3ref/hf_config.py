"""Checkpoint configs <-> ModelConfig: a Hugging Face `config.json` (DeepSeek-V3/V2, Qwen2, Llama), the official
DeepSeek-V3 inference code's ModelArgs JSON (`inference/configs/config_671B.json`), and the Hugging Face
`config.json` of a DeepSeek model written back (`hf_config_dict`, what a saved Hugging Face layout carries).

Only architectural keys are read; the rest of an HF config (token ids, dtypes, quantization, ...) does not
change the architecture and is ignored.

A missing architectural key takes the default that transformers gives it for that `model_type`, so that a
config.json means here what it means to transformers (e.g. a deepseek_v3 config without `q_lora_rank` has
q-LoRA rank 1536, not "no q-LoRA"). Those defaults are the table `HF_DEFAULTS`, copied as data from the keyword
defaults of DeepseekV3Config, DeepseekV2Config, Qwen2Config and LlamaConfig (tests/test_hf_config.py compares
them with the installed transformers). Keys transformers does not declare, or declares as None, follow what
transformers' model code does instead: `num_key_value_heads` = `num_attention_heads`, `head_dim` = hidden / heads,
sigmoid scores with a selection bias for deepseek_v3 and softmax for deepseek_v2, Qwen2's q/k/v biases, no
group limit without `n_group`/`topk_group`, no MTP module outside deepseek_v3. A key with no default at all
(deepseek_v2's `num_experts_per_tok`) is a `ConfigError` naming it. A key present as null counts as missing,
except `q_lora_rank: null`, which means a single full-rank wq in transformers and in DeepSeek-V2-Lite's
config.json.

ModelArgs JSON is read as the official code reads it: unknown keys are errors, absent ones take ModelArgs'
defaults.
"""

from __future__ import annotations

from typing import Any

from dsv3ref.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig

HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen2", "llama")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")  # DeepSeek's routers; noaux_tc has the bias

# transformers 5.24.0: the keyword defaults of the config classes for the keys read below (None defaults left out);
# num_nextn_predict_layers is DeepseekV3Config's num_mtp_layers (its attribute_map), rope_theta the classes'
# default_theta.
_COMMON = {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0}
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        **_COMMON, "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "max_position_embeddings": 4096, "num_nextn_predict_layers": 1,
    },
    "deepseek_v2": {
        **_COMMON, "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "max_position_embeddings": 2048, "first_k_dense_replace": 0, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "routed_scaling_factor": 1.0, "topk_method": "greedy", "norm_topk_prob": False,
        "v_head_dim": 128, "moe_intermediate_size": 1407,
    },
    "qwen2": {
        **_COMMON, "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 32768,
    },
    "llama": {
        **_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "max_position_embeddings": 2048, "attention_bias": False,
    },
}


def _get(hf: dict[str, Any], key: str, default: Any = ...) -> Any:
    """hf[key]; if missing or null, transformers' default for the model_type, else `default` (what transformers'
    model code does for a key its config does not declare), else a ConfigError naming the key."""
    if hf.get(key) is not None:
        return hf[key]
    declared = HF_DEFAULTS[hf["model_type"]]
    if key in declared:
        return declared[key]
    if default is ...:
        raise ConfigError(f"hf config: missing {key!r} (model_type {hf['model_type']!r} has no default for it)")
    return default


def _rope(hf: dict[str, Any]) -> RopeConfig:
    """RoPE from `rope_scaling` (older HF) or `rope_parameters` (newer HF), plus `rope_theta`."""
    scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"hf config: rope_scaling: expected an object or null, got {scaling!r}")
    theta = scaling["rope_theta"] if scaling.get("rope_theta") is not None else _get(hf, "rope_theta")
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
    topk_method = _get(hf, "topk_method", "noaux_tc")  # V3's model code always has the bias
    if topk_method not in TOPK_METHODS:
        raise ConfigError(f"hf config: topk_method: expected one of {', '.join(TOPK_METHODS)}, got {topk_method!r}")
    return MoEConfig(
        n_routed_experts=_get(hf, "n_routed_experts"),
        num_experts_per_tok=_get(hf, "num_experts_per_tok"),
        moe_intermediate_size=_get(hf, "moe_intermediate_size"),
        n_shared_experts=_get(hf, "n_shared_experts"),
        n_group=_get(hf, "n_group", 1),
        topk_group=_get(hf, "topk_group", 1),
        first_k_dense_replace=_get(hf, "first_k_dense_replace"),
        score_func=_get(hf, "scoring_func", "sigmoid" if v3 else "softmax"),
        route_scale=_get(hf, "routed_scaling_factor"),
        norm_topk_prob=_get(hf, "norm_topk_prob"),
        bias=topk_method == "noaux_tc",
    )


def _attention(hf: dict[str, Any]) -> AttentionConfig:
    heads = _get(hf, "num_attention_heads")
    if hf["model_type"].startswith("deepseek"):
        q_lora_rank = 0 if "q_lora_rank" in hf and hf["q_lora_rank"] is None else _get(hf, "q_lora_rank")
        return AttentionConfig(
            kind="mla", num_heads=heads, q_lora_rank=q_lora_rank,
            kv_lora_rank=_get(hf, "kv_lora_rank"), qk_nope_head_dim=_get(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=_get(hf, "qk_rope_head_dim"), v_head_dim=_get(hf, "v_head_dim"))
    kv_heads = _get(hf, "num_key_value_heads", heads)
    kind = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    qkv_bias = True if hf["model_type"] == "qwen2" else _get(hf, "attention_bias")
    return AttentionConfig(kind=kind, num_heads=heads, num_kv_heads=kv_heads, head_dim=_get(hf, "head_dim", 0),
                           qkv_bias=qkv_bias)


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map an HF config dict to a ModelConfig (see the module docstring for what is read and the defaults)."""
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
        tie_word_embeddings=_get(hf, "tie_word_embeddings"),
        rms_norm_eps=_get(hf, "rms_norm_eps"),
        source=f"Hugging Face config.json (model_type {model_type})",
    )


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` (model_type deepseek_v3) of an MLA + DeepSeekMoE model; `model_config_from_hf`
    reads it back to `cfg` (name and source aside). RoPE is written as configured, YaRN included."""
    a, m, r = cfg.attention, cfg.moe, cfg.rope
    if a.kind != "mla" or m is None:
        raise ConfigError(f"{cfg.name}: a deepseek_v3 config.json needs MLA attention and a MoE section, got "
                          f"attention {a.kind!r} and moe {m!r}")
    rope: dict[str, Any] | None = None
    if r.kind == "yarn":
        rope = {"type": "yarn", "rope_type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast,
                "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
                "original_max_position_embeddings": r.original_max_position_embeddings}
    elif r.kind != "default":
        raise ConfigError(f"rope.kind: a deepseek_v3 config.json has default or yarn RoPE, got {r.kind!r}")
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": m.moe_intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_depth, "num_attention_heads": a.num_heads,
        "num_key_value_heads": a.num_heads, "n_shared_experts": m.n_shared_experts,
        "n_routed_experts": m.n_routed_experts, "routed_scaling_factor": m.route_scale,
        "kv_lora_rank": a.kv_lora_rank, "q_lora_rank": a.q_lora_rank or None,
        "qk_rope_head_dim": a.qk_rope_head_dim, "qk_nope_head_dim": a.qk_nope_head_dim, "v_head_dim": a.v_head_dim,
        "topk_method": "noaux_tc" if m.bias else "greedy", "n_group": m.n_group, "topk_group": m.topk_group,
        "num_experts_per_tok": m.num_experts_per_tok, "moe_layer_freq": 1,
        "first_k_dense_replace": m.first_k_dense_replace, "norm_topk_prob": m.norm_topk_prob,
        "scoring_func": m.score_func, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": r.theta, "rope_scaling": rope, "rope_interleave": True, "attention_bias": False,
        "hidden_act": "silu", "tie_word_embeddings": cfg.tie_word_embeddings,
    }


# The official inference code's ModelArgs (inference/model.py) and its defaults, those of DeepSeek-V2-Lite
OFFICIAL_ARGS: dict[str, Any] = {
    "max_batch_size": 8, "max_seq_len": 4096 * 4, "dtype": "bf16", "scale_fmt": None, "vocab_size": 102400,
    "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27, "n_dense_layers": 1, "n_heads": 16,
    "n_routed_experts": 64, "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "original_seq_len": 4096,
    "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
}


def is_official_args(data: dict[str, Any]) -> bool:
    """Whether a config dict is the official ModelArgs JSON (it names the model width `dim` and `n_layers`)."""
    return "dim" in data and "n_layers" in data


def model_config_from_official(args: dict[str, Any], name: str = "deepseek-official") -> ModelConfig:
    """Map the official ModelArgs JSON onto ModelConfig, as the official code interprets it: YaRN with its single
    mscale, the selection bias only when dim == 7168 (its Gate's rule), sigmoid weights normalised, softmax not."""
    unknown = sorted(set(args) - set(OFFICIAL_ARGS))
    if unknown:
        raise ConfigError(f"official config: {unknown[0]}: unknown key; expected one of {', '.join(OFFICIAL_ARGS)}")
    a = {**OFFICIAL_ARGS, **args}
    return ModelConfig(
        name=name, vocab_size=a["vocab_size"], hidden_size=a["dim"], num_layers=a["n_layers"],
        intermediate_size=a["inter_dim"],
        attention=AttentionConfig(kind="mla", num_heads=a["n_heads"], q_lora_rank=a["q_lora_rank"],
                                  kv_lora_rank=a["kv_lora_rank"], qk_nope_head_dim=a["qk_nope_head_dim"],
                                  qk_rope_head_dim=a["qk_rope_head_dim"], v_head_dim=a["v_head_dim"]),
        moe=MoEConfig(n_routed_experts=a["n_routed_experts"], num_experts_per_tok=a["n_activated_experts"],
                      moe_intermediate_size=a["moe_inter_dim"], n_shared_experts=a["n_shared_experts"],
                      n_group=a["n_expert_groups"], topk_group=a["n_limited_groups"],
                      first_k_dense_replace=a["n_dense_layers"], score_func=a["score_func"],
                      route_scale=float(a["route_scale"]), norm_topk_prob=a["score_func"] == "sigmoid",
                      bias=a["dim"] == 7168),
        rope=RopeConfig(kind="yarn", theta=float(a["rope_theta"]), factor=float(a["rope_factor"]),
                        original_max_position_embeddings=a["original_seq_len"], beta_fast=float(a["beta_fast"]),
                        beta_slow=float(a["beta_slow"]), mscale=float(a["mscale"]),
                        mscale_all_dim=float(a["mscale"])),
        max_seq_len=a["max_seq_len"], rms_norm_eps=1e-6,
        source="official DeepSeek-V3 inference ModelArgs JSON",
    )
