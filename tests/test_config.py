"""ModelConfig: presets, loading (ours and Hugging Face), and one clear error per invalid field."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given

from dsv3ref.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig, RopeConfig, preset_names
from harness.strategies import model_configs

V3_HF = {
    "model_type": "deepseek_v3", "_name_or_path": "deepseek-ai/DeepSeek-V3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def test_every_preset_loads_and_round_trips():
    for name in preset_names():
        cfg = ModelConfig.preset(name)
        assert cfg.name == name
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_v3_preset_layout():
    cfg = ModelConfig.preset("deepseek-v3-671b")
    assert (cfg.num_dense_layers, cfg.num_moe_layers) == (3, 58)
    assert not cfg.is_moe_layer(2) and cfg.is_moe_layer(3)
    assert cfg.yarn_active and cfg.attention.qk_head_dim == 192


def test_hf_v3_config_equals_preset_architecture():
    cfg = ModelConfig.from_hf(V3_HF)
    preset = ModelConfig.preset("deepseek-v3-671b")
    assert cfg.replace(name=preset.name, source=preset.source) == preset


def test_hf_qwen2_and_llama(tmp_path):
    qwen = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
            "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
            "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(qwen))
    cfg = ModelConfig.load(path)
    preset = ModelConfig.preset("qwen2.5-72b")
    assert cfg.attention == preset.attention and cfg.num_layers == 80 and cfg.moe is None
    llama = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 16384, "intermediate_size": 53248,
             "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
             "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
             "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    cfg = ModelConfig.from_hf(llama)
    assert cfg.replace(name="llama3.1-405b", source="") == ModelConfig.preset("llama3.1-405b").replace(source="")


def test_our_toml_schema_loads(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('vocab_size = 100\nhidden_size = 64\nnum_layers = 2\nintermediate_size = 128\n'
                    '[attention]\nkind = "gqa"\nnum_heads = 8\nnum_kv_heads = 2\n')
    cfg = ModelConfig.load(path)
    assert cfg.name == "mine" and cfg.attention.head_dim == 8


@pytest.mark.parametrize(("change", "message"), [
    (dict(hidden_size=0), "hidden_size: expected a positive value"),
    (dict(num_layers=-1), "num_layers: expected a positive value"),
    (dict(vocab_size=1.5), "vocab_size: expected an integer"),
    (dict(mtp_depth=-1), "mtp_depth: expected a value >= 0"),
    (dict(intermediate_size=0), "intermediate_size: expected a positive value"),
])
def test_invalid_top_level_fields(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.preset("dsv3-tiny").replace(**change)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(kind="gqa", num_heads=8, num_kv_heads=3, head_dim=8), "attention.num_kv_heads: expected a divisor"),
    (dict(kind="gqa", num_heads=8, head_dim=8), "attention.num_kv_heads: required"),
    (dict(kind="mha", num_heads=8, num_kv_heads=2), "attention.num_kv_heads: kind 'mha' implies 8"),
    (dict(kind="mqa", num_heads=8, num_kv_heads=2), "attention.num_kv_heads: kind 'mqa' implies 1"),
    (dict(kind="flash", num_heads=8), "attention.kind: expected one of mha, gqa, mqa, mla"),
    (dict(kind="mla", num_heads=8, kv_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
     "attention.kv_lora_rank: expected a positive value"),
    (dict(kind="mla", num_heads=8, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=7, v_head_dim=8),
     "attention.qk_rope_head_dim: expected an even number"),
    (dict(kind="gqa", num_heads=8, num_kv_heads=2, head_dim=8, kv_lora_rank=4), "attention.kv_lora_rank: only"),
])
def test_invalid_attention(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttentionConfig(**kwargs)


def test_heads_must_divide_hidden_without_head_dim():
    with pytest.raises(ConfigError, match="attention.num_heads: expected a divisor of hidden_size 100"):
        ModelConfig(name="x", vocab_size=10, hidden_size=100, num_layers=1, intermediate_size=8,
                    attention=AttentionConfig(kind="mha", num_heads=8))


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(n_routed_experts=10, n_group=4), "moe.n_group: expected a divisor of n_routed_experts 10"),
    (dict(num_experts_per_tok=5), "moe.num_experts_per_tok: expected <= 4 \\(experts in the topk_group"),
    (dict(num_experts_per_tok=9, n_group=1, topk_group=1), "moe.num_experts_per_tok: expected <= 8"),
    (dict(topk_group=5), "moe.topk_group: expected <= n_group 4"),
    (dict(n_routed_experts=4, n_group=4, topk_group=2, num_experts_per_tok=2, bias=True),
     "moe.n_group: with a selection bias the group score is a top-2 sum"),
    (dict(score_func="relu"), "moe.score_func: expected one of sigmoid, softmax"),
    (dict(route_scale=0.0), "moe.route_scale: expected a positive value"),
])
def test_invalid_moe(kwargs, message):
    base = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2)
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{**base, **kwargs})


def test_invalid_rope_and_first_k_dense():
    with pytest.raises(ConfigError, match="rope.beta_fast: expected > beta_slow"):
        RopeConfig(kind="yarn", beta_fast=1.0, beta_slow=2.0)
    tiny = ModelConfig.preset("dsv3-tiny")
    with pytest.raises(ConfigError, match="moe.first_k_dense_replace: expected <= num_layers 2"):
        tiny.replace(moe=dataclasses.replace(tiny.moe, first_k_dense_replace=3))


def test_unknown_and_missing_keys_are_named():
    data = ModelConfig.preset("dsv3-tiny").to_dict()
    with pytest.raises(ConfigError, match="moe.n_experts: unknown key"):
        ModelConfig.from_dict({**data, "moe": {**data["moe"], "n_experts": 3}})
    with pytest.raises(ConfigError, match="colour: unknown key"):
        ModelConfig.from_dict({**data, "colour": "red"})
    del data["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size: missing required key"):
        ModelConfig.from_dict(data)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="preset: unknown model 'nope'; known: deepseek-v2-236b"):
        ModelConfig.preset("nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: malformed json"):
        ModelConfig.load(bad)
    with pytest.raises(ConfigError, match="cannot read model config"):
        ModelConfig.load(tmp_path / "missing.json")
    hf = tmp_path / "hf.json"
    hf.write_text(json.dumps({"model_type": "deepseek_v2"}))  # transformers has no default top-k for V2
    with pytest.raises(ConfigError, match="hf.json: hf config: missing 'num_experts_per_tok' \\(model_type "
                                          "'deepseek_v2' has no default for it\\)"):
        ModelConfig.load(hf)
    with pytest.raises(ConfigError, match="model_type: expected one of"):
        ModelConfig.from_hf({"model_type": "gpt2"})


@given(model_configs())
def test_generated_configs_round_trip(cfg):
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
