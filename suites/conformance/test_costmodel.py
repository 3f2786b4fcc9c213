"""Conformance of an analytic cost model: exact values hand-derived from the configs, and scaling properties."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.config import ModelConfig
from harness.strategies import model_configs

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("costmodel")]

V3 = ModelConfig.preset("deepseek-v3-671b")
QWEN = ModelConfig.preset("qwen2.5-72b")
LLAMA = ModelConfig.preset("llama3.1-405b")


def test_kv_bytes_of_the_papers_models(impl):
    # Insights Table 1: MLA caches (kv_lora_rank + rope) per layer; GQA caches K and V of each KV head (BF16).
    assert impl.kv_cache_bytes_per_token(V3) == 61 * (512 + 64) * 2
    assert impl.kv_cache_bytes_per_token(QWEN) == 80 * 2 * 8 * 128 * 2
    assert impl.kv_cache_bytes_per_token(LLAMA) == 126 * 2 * 8 * 128 * 2


def test_v3_parameter_counts(impl):
    # 671B total; 37B activated is the paper's rounding of the config's count (36.5-38.0B accepted).
    assert impl.params_total(V3) == pytest.approx(671e9, rel=5e-3)
    assert 36.5e9 <= impl.params_activated(V3) <= 38.0e9


def test_v3_training_flops(impl):
    # 6 x activated non-embedding params (with head) + causal attention at 4096: 3 s n_h (d_qk + d_v) L.
    attention = 3 * 4096 * 128 * (192 + 128) * 61
    assert impl.train_flops_per_token(V3) == pytest.approx(6 * (impl.params_activated(V3) - 129280 * 7168)
                                                           + attention, rel=1e-12)


def test_v3_tpot_bound(impl):
    # (1 + 2) B x 32 tokens x 9 experts x 7000 / 50 GB/s, twice per layer, 61 layers.
    assert impl.ep_tpot_s(V3, 50.0) == pytest.approx(61 * 2 * 3 * 32 * 9 * 7000 / 50e9, rel=1e-12)
    assert impl.ep_tpot_s(V3, 50.0, hidden_rounding=False) == pytest.approx(61 * 2 * 3 * 32 * 9 * 7168 / 50e9,
                                                                            rel=1e-12)


@given(model_configs(), st.integers(1, 4))
def test_kv_bytes_linear_in_layers(impl, cfg, k):
    deeper = cfg.replace(num_layers=cfg.num_layers * k, moe=None)
    shallow = cfg.replace(moe=None)
    assert impl.kv_cache_bytes_per_token(deeper) == k * impl.kv_cache_bytes_per_token(shallow)


@given(model_configs())
def test_kv_bytes_linear_in_dtype_width(impl, cfg):
    # (FP8 is not a plain width for MLA: its latent cache adds a per-token scale and keeps k_pe in BF16.)
    half = impl.kv_cache_bytes_per_token(cfg, "bf16")
    assert impl.kv_cache_bytes_per_token(cfg, "fp16") == half
    assert impl.kv_cache_bytes_per_token(cfg, "fp32") == 2 * half


@given(model_configs(kinds=("mla",)), st.sampled_from([1, 2, 4, 8, 16, 128]))
def test_mla_bytes_independent_of_heads(impl, cfg, heads):
    other = cfg.replace(attention=dataclasses.replace(cfg.attention, num_heads=heads))
    assert impl.kv_cache_bytes_per_token(other) == impl.kv_cache_bytes_per_token(cfg)


@given(model_configs(kinds=("gqa",)))
def test_gqa_extremes_equal_mha_and_mqa(impl, cfg):
    att = cfg.attention
    as_mha = cfg.replace(attention=dataclasses.replace(att, kind="mha", num_kv_heads=att.num_heads))
    full = cfg.replace(attention=dataclasses.replace(att, num_kv_heads=att.num_heads))
    assert impl.kv_cache_bytes_per_token(full) == impl.kv_cache_bytes_per_token(as_mha)
    as_mqa = cfg.replace(attention=dataclasses.replace(att, kind="mqa", num_kv_heads=1))
    single = cfg.replace(attention=dataclasses.replace(att, num_kv_heads=1))
    assert impl.kv_cache_bytes_per_token(single) == impl.kv_cache_bytes_per_token(as_mqa)


@given(model_configs())
def test_activated_at_most_total(impl, cfg):
    assert 0 < impl.params_activated(cfg) <= impl.params_total(cfg)
    if cfg.moe is None or cfg.moe.num_experts_per_tok == cfg.moe.n_routed_experts:
        assert impl.params_activated(cfg) == impl.params_total(cfg)


@given(model_configs(), st.integers(1, 8192), st.integers(1, 8192))
def test_training_flops_grow_with_sequence(impl, cfg, s1, s2):
    lo, hi = sorted((s1, s2))
    assert impl.train_flops_per_token(cfg, lo) <= impl.train_flops_per_token(cfg, hi)
