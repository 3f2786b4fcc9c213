"""The analytic cost model against hand-derived arithmetic: the paper's Table 1 (KV cache), Table 2 (training
FLOPs) and §2.3.2 (TPOT bound), from the model configs (DeepSeek-V3: technical report §4.2, config_671B.json)."""

from __future__ import annotations

import pytest
from hypothesis import given

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import load_profile
from harness.analytic import (
    ep_comm_bound,
    ep_link,
    fwd_flops_per_token,
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token,
    kv_cache_bytes_per_token_layer,
    param_counts,
    train_flops_per_token,
)
from harness.analytic.flops import moe_layer_fwd_bytes
from harness.analytic.params import attention_params
from harness.analytic.tpot import TPOT_METHODS, tpot_methods
from harness.strategies import model_configs

V3 = ModelConfig.preset("deepseek-v3-671b")
V2 = ModelConfig.preset("deepseek-v2-236b")
QWEN = ModelConfig.preset("qwen2.5-72b")
LLAMA = ModelConfig.preset("llama3.1-405b")


def test_kv_bytes():
    assert kv_cache_bytes_per_token(V3) == 70_272
    assert kv_cache_bytes_per_token(QWEN) == 327_680
    assert kv_cache_bytes_per_token(LLAMA) == 516_096
    assert kv_cache_bytes_per_token(V2) == 69_120
    assert kv_cache_bytes_per_token_layer(V3.attention, mla_mode="naive") == 128 * (192 + 128) * 2  # 81,920
    assert kv_cache_bytes_per_token(V3, "fp8") == 61 * (512 + 4 + 64 * 2)  # e4m3 latent, fp32 scale, BF16 k_pe
    assert kv_cache_bytes_per_token(LLAMA, "fp8") == 516_096 // 2
    with pytest.raises(ConfigError, match="cache dtype: expected one of fp32, bf16, fp16, fp8"):
        kv_cache_bytes_per_token(V3, "int4")


def test_kv_bytes_per_sequence_and_moe_layer_bytes():
    assert kv_cache_bytes_per_sequence(V3, 131_072) == 70_272 * 131_072  # 9.21 GB at 128k
    assert kv_cache_bytes_per_sequence(LLAMA, 0) == 0
    with pytest.raises(ConfigError, match="context: expected an integer >= 0"):
        kv_cache_bytes_per_sequence(V3, -1)
    # V3: router 7168 x 256, 8 routed + 1 shared experts of 3 x 7168 x 2048, one token in and out, BF16
    assert moe_layer_fwd_bytes(V3, 1, 8) == 2 * (7168 * 256 + 3 * 7168 * 2048 * 9 + 2 * 7168)
    with pytest.raises(ConfigError, match="experts_hit: expected 0..256"):
        moe_layer_fwd_bytes(V3, 1, 257)


def test_v3_mla_layer_params():
    # wq_a + q_norm + wq_b + wkv_a + kv_norm + wkv_b + wo at V3's dimensions: 187.1M per layer
    expected = (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168)
    assert attention_params(V3) == expected == 187_107_328


def test_v3_param_totals():
    p = param_counts(V3)
    expert = 3 * 7168 * 2048
    assert p.routed_experts == 58 * 256 * expert
    assert p.activated_routed_experts == 58 * 8 * expert
    assert p.dense_ffn == 3 * 3 * 7168 * 18432
    assert p.router == 58 * (256 * 7168 + 256)
    assert p.total == pytest.approx(671.03e9, rel=1e-4)
    assert p.activated_non_embedding - p.head == pytest.approx(35.698e9, rel=1e-4)


def test_training_flops_both_methods():
    assert train_flops_per_token(V3) / 1e9 == pytest.approx(250.45, abs=0.02)
    assert train_flops_per_token(V2) / 1e9 == pytest.approx(155.30, abs=0.02)
    assert train_flops_per_token(QWEN, "paper-table2") == 72 * 80 * 8192**2 + 6 * 152064 * 8192
    assert train_flops_per_token(LLAMA, "paper-table2") == 72 * 126 * 16384**2 + 6 * 128256 * 16384
    assert train_flops_per_token(V3, "paper-table2") == train_flops_per_token(V3, "exact")
    with pytest.raises(ConfigError, match="method: expected one of exact, paper-table2"):
        train_flops_per_token(V3, "guess")


def test_forward_flops():
    p = param_counts(V3)
    assert fwd_flops_per_token(V3, 0) == 2 * p.activated_non_embedding
    assert fwd_flops_per_token(V3, 1000) - fwd_flops_per_token(V3, 0) == 61 * 2 * 1000 * 128 * (192 + 128)


def test_tpot_bound_reproduces_the_paper():
    h800, nvl = load_profile("h800"), load_profile("gb200-nvl72")
    assert ep_link(h800) == ("scale-out", 50.0)
    assert ep_link(nvl) == ("scale-up", 900.0)
    assert ep_link(load_profile("rtx4090")) is None
    b = ep_comm_bound(V3, 50.0)
    assert b.comm_time_s == pytest.approx(120.96e-6, rel=1e-12)
    assert b.tpot_s == pytest.approx(14.75712e-3, rel=1e-12)
    assert ep_comm_bound(V3, 900.0).tpot_s == pytest.approx(0.81984e-3, rel=1e-12)
    assert ep_comm_bound(V3, 50.0, "config-exact").hidden == 7168
    with pytest.raises(ConfigError, match="moe: the EP-communication bound needs a MoE model"):
        ep_comm_bound(QWEN, 50.0)
    with pytest.raises(ConfigError, match="bandwidth_GBps: expected a positive number"):
        ep_comm_bound(V3, 0.0)


def test_paper_7k_is_undefined_where_hidden_rounds_to_zero():
    tiny = ModelConfig.preset("dsv3-tiny")  # hidden_size 64: "0K"
    with pytest.raises(ConfigError, match="dsv3-tiny: hidden_size: method paper-7k rounds it to thousands, which "
                                          "gives 0 for 64; use method config-exact") as e:
        ep_comm_bound(tiny, 50.0, "paper-7k")
    assert "\n" not in str(e.value)
    exact = 2 * 2 * 3 * 32 * 3 * 64 / 50e9  # layers x micro-batches x (1 + 2) B x tokens x (2 + 1) experts x hidden
    assert ep_comm_bound(tiny, 50.0, "config-exact").tpot_s == pytest.approx(exact, rel=1e-12)
    assert tpot_methods(tiny) == ("config-exact",)
    assert tpot_methods(tiny.replace(hidden_size=500)) == ("config-exact",)  # round(500, -3) == 0
    assert tpot_methods(tiny.replace(hidden_size=501)) == tpot_methods(V3) == TPOT_METHODS


@given(model_configs())
def test_parts_sum_to_total(cfg):
    p = param_counts(cfg)
    assert p.total == sum([p.embedding, p.head, p.attention, p.dense_ffn, p.routed_experts, p.shared_experts,
                           p.router, p.norms])
    assert p.head == (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)


def test_fp8_latent_formula_matches_the_live_cache():
    import torch

    from dsv3ref.kv_cache import LatentCache

    cache = LatentCache(1, 4, 512, 64, torch.bfloat16, "cpu", True)
    assert cache.bytes_per_token() == kv_cache_bytes_per_token_layer(V3.attention, "fp8")
