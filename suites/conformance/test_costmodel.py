"""Conformance of an analytic cost model: exact values hand-derived from the configs, and scaling properties."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.config import ModelConfig
from harness.cases import CONFIG_IMPORT, config_line, rebuild
from harness.strategies import model_configs

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("costmodel")]

V3 = ModelConfig.preset("deepseek-v3-671b")
QWEN = ModelConfig.preset("qwen2.5-72b")
LLAMA = ModelConfig.preset("llama3.1-405b")


def test_kv_bytes_of_the_papers_models(impl):
    # Insights Table 1: MLA caches (kv_lora_rank + rope) per layer; GQA caches K and V of each KV head (BF16).
    for cfg, expected, formula in ((V3, 61 * (512 + 64) * 2, "61 layers x (512 + 64) x 2 B"),
                                   (QWEN, 80 * 2 * 8 * 128 * 2, "80 layers x K and V x 8 heads x 128 x 2 B"),
                                   (LLAMA, 126 * 2 * 8 * 128 * 2, "126 layers x K and V x 8 heads x 128 x 2 B")):
        got = impl.kv_cache_bytes_per_token(cfg)
        assert got == expected, f"{cfg.name}: kv_cache_bytes_per_token = {got}, expected {expected} ({formula})"


def test_v3_parameter_counts(impl):
    # 671B total; 37B activated is the paper's rounding of the config's count (36.5-38.0B accepted).
    total, activated = impl.params_total(V3), impl.params_activated(V3)
    assert total == pytest.approx(671e9, rel=5e-3), f"params_total(V3) = {total:,}, expected 671B within 0.5%"
    assert 36.5e9 <= activated <= 38.0e9, f"params_activated(V3) = {activated:,}, expected 36.5B to 38.0B"


def test_v3_training_flops(impl):
    # 6 x activated non-embedding params (with head) + causal attention at 4096: 3 s n_h (d_qk + d_v) L.
    attention = 3 * 4096 * 128 * (192 + 128) * 61
    expected = 6 * (impl.params_activated(V3) - 129280 * 7168) + attention
    got = impl.train_flops_per_token(V3)
    assert got == pytest.approx(expected, rel=1e-12), (
        f"train_flops_per_token(V3) = {got:.6g}, expected 6 x activated non-embedding parameters + causal attention "
        f"3 x 4096 x 128 x (192 + 128) x 61 = {expected:.6g}")


def test_v3_tpot_bound(impl):
    # (1 + 2) B x 32 tokens x 9 experts x 7000 / 50 GB/s, twice per layer, 61 layers.
    for rounding, hidden in ((True, 7000), (False, 7168)):
        got, expected = impl.ep_tpot_s(V3, 50.0, hidden_rounding=rounding), 61 * 2 * 3 * 32 * 9 * hidden / 50e9
        assert got == pytest.approx(expected, rel=1e-12), (
            f"ep_tpot_s(V3, 50 GB/s, hidden_rounding={rounding}) = {got:.6g} s, expected 61 layers x 2 x 3 B x 32 "
            f"tokens x 9 experts x {hidden} / 50 GB/s = {expected:.6g} s")


def note_case(cfg: ModelConfig, *calls: str) -> None:
    rebuild("import dataclasses", CONFIG_IMPORT, config_line(cfg), *calls)


@given(model_configs(), st.integers(1, 4))
def test_kv_bytes_linear_in_layers(impl, cfg, k):
    note_case(cfg, f"impl.kv_cache_bytes_per_token(cfg.replace(num_layers=cfg.num_layers * {k}, moe=None))",
              "impl.kv_cache_bytes_per_token(cfg.replace(moe=None))")
    deeper = cfg.replace(num_layers=cfg.num_layers * k, moe=None)
    shallow = cfg.replace(moe=None)
    got, one = impl.kv_cache_bytes_per_token(deeper), impl.kv_cache_bytes_per_token(shallow)
    assert got == k * one, f"{k}x the layers gives {got} cache bytes per token, expected {k} x {one}"


@given(model_configs())
def test_kv_bytes_linear_in_dtype_width(impl, cfg):
    # (FP8 is not a plain width for MLA: its latent cache adds a per-token scale and keeps k_pe in BF16.)
    note_case(cfg, "[impl.kv_cache_bytes_per_token(cfg, d) for d in ('bf16', 'fp16', 'fp32')]")
    half = impl.kv_cache_bytes_per_token(cfg, "bf16")
    fp16, fp32 = impl.kv_cache_bytes_per_token(cfg, "fp16"), impl.kv_cache_bytes_per_token(cfg, "fp32")
    assert fp16 == half, f"fp16 cache: {fp16} bytes per token, expected the bf16 cache's {half}"
    assert fp32 == 2 * half, f"fp32 cache: {fp32} bytes per token, expected twice the bf16 cache's {half}"


@given(model_configs(kinds=("mla",)), st.sampled_from([1, 2, 4, 8, 16, 128]))
def test_mla_bytes_independent_of_heads(impl, cfg, heads):
    note_case(cfg, f"impl.kv_cache_bytes_per_token(cfg.replace(attention=dataclasses.replace(cfg.attention, "
                   f"num_heads={heads})))")
    other = cfg.replace(attention=dataclasses.replace(cfg.attention, num_heads=heads))
    got, base = impl.kv_cache_bytes_per_token(other), impl.kv_cache_bytes_per_token(cfg)
    assert got == base, (f"MLA with {heads} heads caches {got} bytes per token, with {cfg.attention.num_heads} heads "
                         f"{base}: the latent cache does not depend on the head count")


@given(model_configs(kinds=("gqa",)))
def test_gqa_extremes_equal_mha_and_mqa(impl, cfg):
    note_case(cfg, "impl.kv_cache_bytes_per_token(cfg)")
    att = cfg.attention
    as_mha = cfg.replace(attention=dataclasses.replace(att, kind="mha", num_kv_heads=att.num_heads))
    full = cfg.replace(attention=dataclasses.replace(att, num_kv_heads=att.num_heads))
    got, mha = impl.kv_cache_bytes_per_token(full), impl.kv_cache_bytes_per_token(as_mha)
    assert got == mha, f"GQA with kv_heads = heads caches {got} bytes per token, MHA {mha}: expected equal"
    as_mqa = cfg.replace(attention=dataclasses.replace(att, kind="mqa", num_kv_heads=1))
    single = cfg.replace(attention=dataclasses.replace(att, num_kv_heads=1))
    got, mqa = impl.kv_cache_bytes_per_token(single), impl.kv_cache_bytes_per_token(as_mqa)
    assert got == mqa, f"GQA with one KV head caches {got} bytes per token, MQA {mqa}: expected equal"


@given(model_configs())
def test_activated_at_most_total(impl, cfg):
    note_case(cfg, "impl.params_activated(cfg), impl.params_total(cfg)")
    activated, total = impl.params_activated(cfg), impl.params_total(cfg)
    assert 0 < activated <= total, f"params_activated {activated:,} must lie in (0, params_total {total:,}]"
    if cfg.moe is None or cfg.moe.num_experts_per_tok == cfg.moe.n_routed_experts:
        assert activated == total, (f"every parameter is active (no MoE, or every expert chosen), yet "
                                    f"params_activated {activated:,} != params_total {total:,}")


@given(model_configs(), st.integers(1, 8192), st.integers(1, 8192))
def test_training_flops_grow_with_sequence(impl, cfg, s1, s2):
    lo, hi = sorted((s1, s2))
    note_case(cfg, f"impl.train_flops_per_token(cfg, {lo}), impl.train_flops_per_token(cfg, {hi})")
    short, long = impl.train_flops_per_token(cfg, lo), impl.train_flops_per_token(cfg, hi)
    assert short <= long, f"training FLOPs per token fall from {short:.6g} at sequence {lo} to {long:.6g} at {hi}"
