"""Hugging Face config.json loading: a missing architectural key means what it means to transformers."""

from __future__ import annotations

import inspect

import pytest

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.hf_config import HF_DEFAULTS, HF_MODEL_TYPES

CLASSES = {"deepseek_v3": "DeepseekV3Config", "deepseek_v2": "DeepseekV2Config", "qwen2": "Qwen2Config",
           "llama": "LlamaConfig"}
REQUIRED = {"deepseek_v2": {"num_experts_per_tok": 6}}  # transformers' default is None (unusable)

# deepseek-ai/DeepSeek-V2-Lite config.json, architectural keys (q_lora_rank null: a single full-rank wq)
V2_LITE_HF = {
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
    "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
    "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1,
    "norm_topk_prob": False, "scoring_func": "softmax", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "tie_word_embeddings": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_v3_without_q_lora_rank_has_transformers_rank_not_no_lora():
    preset = ModelConfig.preset("deepseek-v3-671b")
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3"})
    assert cfg.attention.q_lora_rank == 1536
    assert cfg.attention == preset.attention and cfg.moe == preset.moe and cfg.num_layers == 61


def test_null_counts_as_missing_except_q_lora_rank():
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3", "n_group": None, "kv_lora_rank": None,
                               "q_lora_rank": None})
    assert (cfg.moe.n_group, cfg.attention.kv_lora_rank, cfg.attention.q_lora_rank) == (8, 512, 0)


def test_v2_lite_config_equals_the_preset():
    preset = ModelConfig.preset("deepseek-v2-lite-16b")
    cfg = ModelConfig.from_hf(V2_LITE_HF)
    assert cfg.replace(name=preset.name, source=preset.source) == preset


def test_qwen2_without_kv_heads_takes_transformers_32():
    cfg = ModelConfig.from_hf({"model_type": "qwen2", "hidden_size": 8192, "num_attention_heads": 64})
    assert (cfg.attention.kind, cfg.attention.num_kv_heads, cfg.attention.head_dim) == ("gqa", 32, 128)


@pytest.mark.parametrize(("bad", "message"), [
    ({"model_type": "qwen2", "rope_scaling": "yarn"},
     "hf config: rope_scaling: expected an object or null, got 'yarn'"),
    ({"model_type": "deepseek_v3", "routed_scaling_factor": "2.5"},
     "moe.route_scale: expected a finite number, got '2.5'"),
    ({"model_type": "llama", "rms_norm_eps": "1e-5"}, "rms_norm_eps: expected a finite number, got '1e-5'"),
    ({"model_type": "deepseek_v3", "topk_method": "top2"},
     "hf config: topk_method: expected one of greedy, group_limited_greedy, noaux_tc, got 'top2'"),
])
def test_malformed_values_are_config_errors_naming_the_key(bad, message):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf(bad)
    assert str(e.value) == message


def _declared_default(cls: type, key: str) -> object:
    """transformers' default for config.json key `key`: the keyword default of cls.__init__ (through the class's
    attribute_map when the key is an alias), or the class's default_theta for rope_theta."""
    if key == "rope_theta":
        return cls.default_theta
    params = inspect.signature(cls.__init__).parameters
    alias = {real: name for name, real in cls.attribute_map.items()}
    return params[key if key in params else alias[key]].default


@pytest.mark.parametrize("model_type", HF_MODEL_TYPES)
def test_defaults_table_is_transformers_defaults(model_type):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, CLASSES[model_type])
    theirs = {key: _declared_default(cls, key) for key in HF_DEFAULTS[model_type]}
    assert theirs == HF_DEFAULTS[model_type]
    assert {k: type(v) for k, v in theirs.items()} == {k: type(v) for k, v in HF_DEFAULTS[model_type].items()}


@pytest.mark.parametrize("model_type", HF_MODEL_TYPES)
def test_a_bare_config_reads_as_transformers_reads_it(model_type):
    transformers = pytest.importorskip("transformers")
    required = REQUIRED.get(model_type, {})
    ours = ModelConfig.from_hf({"model_type": model_type, **required})
    theirs = transformers.CONFIG_MAPPING[model_type](**required)
    att = ours.attention
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.intermediate_size, ours.max_seq_len,
            ours.rms_norm_eps, ours.tie_word_embeddings, ours.rope.theta, att.num_heads) == (
        theirs.vocab_size, theirs.hidden_size, theirs.num_hidden_layers, theirs.intermediate_size,
        theirs.max_position_embeddings, theirs.rms_norm_eps, theirs.tie_word_embeddings,
        theirs.rope_parameters["rope_theta"], theirs.num_attention_heads)
    assert ours.mtp_depth == getattr(theirs, "num_nextn_predict_layers", 0)
    if ours.moe is None:
        head_dim = getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads
        assert (att.num_kv_heads, att.head_dim) == (theirs.num_key_value_heads, head_dim)
        return
    moe = ours.moe
    assert (att.q_lora_rank, att.kv_lora_rank, att.qk_nope_head_dim, att.qk_rope_head_dim, att.v_head_dim) == (
        theirs.q_lora_rank, theirs.kv_lora_rank, theirs.qk_nope_head_dim, theirs.qk_rope_head_dim,
        theirs.v_head_dim)
    assert (moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size, moe.n_shared_experts,
            moe.first_k_dense_replace, moe.route_scale, moe.norm_topk_prob) == (
        theirs.n_routed_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size, theirs.n_shared_experts,
        theirs.first_k_dense_replace, theirs.routed_scaling_factor, theirs.norm_topk_prob)
    assert (moe.n_group, moe.topk_group) == (theirs.n_group or 1, theirs.topk_group or 1)  # None: no group limit
