"""Properties of RoPE / YaRN (dsv3ref.rope) against the official DeepSeek-V3 semantics (the reference itself: no
implementation under test; the MLA suite checks an implementation's RoPE through its outputs).

Rotations are norm-preserving, the identity at position 0, and make q.k depend only on the relative position; the
interleaved (official) and half (rotate_half) layouts give the same scores once vectors are permuted; YaRN's ramp
bounds, gate and softmax scale follow the official inference code (deepseek-ai/DeepSeek-V3, inference/model.py:
`precompute_freqs_cis` and the softmax scale of `MLA`). Exact float64 identities are checked to 1e-12 (a handful
of operations per element); transformers cross-checks to float32 precision (its tables are fp32).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.config import AttentionConfig, ModelConfig, RopeConfig
from dsv3ref.rope import (
    apply_rope,
    rope_frequencies,
    rope_table,
    softmax_scale,
    to_half_layout,
    to_interleaved_layout,
    yarn_range,
)

EXACT = 1e-12  # float64, a few operations per element
V3 = ModelConfig.preset("deepseek-v3-671b")
V2_LITE = ModelConfig.preset("deepseek-v2-lite-16b")
LAYOUTS = ("interleaved", "half")


@st.composite
def rope_configs(draw: st.DrawFn, kinds: tuple[str, ...] = ("default", "yarn", "llama3")) -> ModelConfig:
    """An MLA config whose rotary part varies: dim, theta, YaRN (active or not) or Llama-3 scaling."""
    kind = draw(st.sampled_from(kinds))
    original = draw(st.sampled_from([64, 256, 4096]))
    extra = {"factor": draw(st.sampled_from([1.0, 4.0, 40.0]))} if kind != "default" else {}
    rope = RopeConfig(kind=kind, theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])),
                      original_max_position_embeddings=original, **extra)
    att = AttentionConfig(kind="mla", num_heads=1, kv_lora_rank=8, qk_nope_head_dim=4, v_head_dim=4,
                          qk_rope_head_dim=draw(st.sampled_from([2, 8, 32, 64])))
    return ModelConfig(name="hypothesis-rope", vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1,
                       attention=att, rope=rope, max_seq_len=draw(st.sampled_from([128, 1024, 8192])))


def _rotate(x: torch.Tensor, cfg: ModelConfig, positions: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    angles = positions.double()[:, None] * rope_frequencies(cfg)
    return apply_rope(x, angles.cos(), angles.sin(), layout)


@given(rope_configs(), st.sampled_from(LAYOUTS), st.integers(0, 2**16))
def test_rotation_preserves_each_pair_norm(cfg, layout, seed):
    d = cfg.attention.qk_rope_head_dim
    x = torch.randn(32, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = _rotate(x, cfg, torch.randint(0, cfg.max_seq_len, (32,)), layout)
    pairs = (lambda v: v.unflatten(-1, (-1, 2))) if layout == "interleaved" else (lambda v: v.unflatten(-1, (2, -1))
                                                                                    .transpose(-1, -2))
    assert torch.allclose(pairs(y).norm(dim=-1), pairs(x).norm(dim=-1), rtol=EXACT, atol=0)


@given(rope_configs(), st.sampled_from(LAYOUTS))
def test_position_zero_is_the_identity(cfg, layout):
    x = torch.randn(4, cfg.attention.qk_rope_head_dim, dtype=torch.float64)
    assert torch.equal(_rotate(x, cfg, torch.zeros(4, dtype=torch.long), layout), x)


@given(rope_configs(kinds=("default",)), st.integers(0, 2**16))
def test_table_is_exp_of_position_times_frequency(cfg, seed):
    cos, sin = rope_table(cfg)
    t = torch.randint(0, cfg.max_seq_len, (16,), generator=torch.Generator().manual_seed(seed))
    d = cfg.attention.qk_rope_head_dim
    angles = t.double()[:, None] * cfg.rope.theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    assert torch.allclose(cos[t], angles.cos(), rtol=0, atol=EXACT)
    assert torch.allclose(sin[t], angles.sin(), rtol=0, atol=EXACT)


@given(rope_configs(), st.sampled_from(LAYOUTS), st.integers(0, 2**16), st.integers(1, 100))
def test_scores_depend_only_on_relative_position(cfg, layout, seed, shift):
    # Holds for any frequencies (YaRN or not): each pair turns by t * f_i, so q_m . k_n sees only (m - n) f_i.
    g = torch.Generator().manual_seed(seed)
    d = cfg.attention.qk_rope_head_dim
    q, k = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(8, d, generator=g, dtype=torch.float64)
    m = torch.randint(0, cfg.max_seq_len - shift, (8,), generator=g)
    n = torch.randint(0, cfg.max_seq_len - shift, (8,), generator=g)
    before = (_rotate(q, cfg, m, layout) * _rotate(k, cfg, n, layout)).sum(-1)
    after = (_rotate(q, cfg, m + shift, layout) * _rotate(k, cfg, n + shift, layout)).sum(-1)
    scale = q.norm(dim=-1) * k.norm(dim=-1)
    assert torch.all((before - after).abs() <= 1e-9 * scale)  # angles up to ~1e4 rad: 1e-12 each, summed


@given(rope_configs(), st.integers(0, 2**16))
def test_layouts_agree_once_vectors_are_permuted(cfg, seed):
    # Official weights loaded into a half-layout (rotate_half) model need their rotary rows permuted: then the
    # rotated vectors are the same permutation of each other and every score is the same.
    g = torch.Generator().manual_seed(seed)
    d = cfg.attention.qk_rope_head_dim
    q, k = torch.randn(8, d, generator=g, dtype=torch.float64), torch.randn(8, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, cfg.max_seq_len, (8,), generator=g)
    qi, ki = _rotate(q, cfg, pos), _rotate(k, cfg, pos)
    qh, kh = _rotate(to_half_layout(q), cfg, pos, "half"), _rotate(to_half_layout(k), cfg, pos, "half")
    assert torch.allclose(to_half_layout(qi), qh, rtol=0, atol=EXACT)
    assert torch.allclose(qi @ ki.T, qh @ kh.T, rtol=0, atol=1e-10)
    assert torch.equal(to_interleaved_layout(to_half_layout(q)), q)


def test_v3_yarn_ramp_bounds_and_scaled_frequencies():
    low, high = yarn_range(V3)
    assert (low, high) == (10, 23)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ratio = rope_frequencies(V3) / base
    assert torch.all(ratio[: low + 1] == 1.0)  # high frequencies untouched
    assert torch.allclose(ratio[high:], torch.full((32 - high,), 1 / 40, dtype=torch.float64), rtol=EXACT)
    assert ratio[16].item() == pytest.approx(1 - (16 - 10) / 13 * (1 - 1 / 40), rel=EXACT)  # = 0.55
    assert torch.all(ratio[1:] <= ratio[:-1] + EXACT)  # a monotone blend


def test_v3_softmax_scale():
    mscale = 0.1 * math.log(40) + 1
    assert softmax_scale(V3) == pytest.approx(192**-0.5 * mscale**2, rel=1e-15)
    assert softmax_scale(V3) == pytest.approx(0.1352338, abs=5e-8)  # the 671B config's value
    assert softmax_scale(V2_LITE) == pytest.approx(192**-0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2, rel=1e-15)


@given(rope_configs(kinds=("yarn",)))
def test_yarn_gate_follows_max_seq_len(cfg):
    # The official gate: YaRN (frequencies and mscale) only when the context exceeds the original length.
    plain = cfg.replace(rope=RopeConfig(kind="default", theta=cfg.rope.theta))
    off = cfg.replace(max_seq_len=cfg.rope.original_max_position_embeddings)
    assert torch.equal(rope_frequencies(off), rope_frequencies(plain))
    assert softmax_scale(off) == cfg.attention.qk_head_dim ** -0.5
    on = cfg.replace(max_seq_len=cfg.rope.original_max_position_embeddings + 1)
    expected = cfg.attention.qk_head_dim ** -0.5 * (0.1 * math.log(cfg.rope.factor) + 1) ** 2
    assert softmax_scale(on) == pytest.approx(expected, rel=1e-15)


@given(rope_configs(kinds=("llama3",)))
def test_llama3_scaling_keeps_short_and_divides_long_wavelengths(cfg):
    r = cfg.rope
    base = r.theta ** (-torch.arange(0, cfg.attention.qk_rope_head_dim, 2, dtype=torch.float64)
                       / cfg.attention.qk_rope_head_dim)
    wavelen = 2 * math.pi / base
    scaled = rope_frequencies(cfg)
    short = wavelen < r.original_max_position_embeddings / r.high_freq_factor
    long = wavelen > r.original_max_position_embeddings / r.low_freq_factor
    assert torch.equal(scaled[short], base[short])
    assert torch.allclose(scaled[long], base[long] / r.factor, rtol=EXACT)
    assert torch.all((scaled <= base * (1 + EXACT)) & (scaled >= base / r.factor * (1 - EXACT)))  # a blend


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite-16b", "llama3.1-405b"])
def test_frequencies_and_scale_match_transformers(name):
    # Cross-implementation check of the frequency formulas and the softmax scale (transformers keeps fp32).
    modeling_rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    cfg = ModelConfig.preset(name)
    if cfg.attention.kind == "mla":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

        from harness.adapters.mla import hf_config

        hf = hf_config(cfg)
        with torch.device("meta"):
            assert DeepseekV3Attention(hf, 0).scaling == pytest.approx(softmax_scale(cfg), rel=1e-12)
    else:
        from transformers import LlamaConfig

        hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.attention.num_heads,
                         head_dim=cfg.attention.head_dim, max_position_embeddings=cfg.max_seq_len,
                         rope_parameters={"rope_type": "llama3", "rope_theta": cfg.rope.theta,
                                          "factor": cfg.rope.factor,
                                          "original_max_position_embeddings": cfg.rope.original_max_position_embeddings,
                                          "low_freq_factor": cfg.rope.low_freq_factor,
                                          "high_freq_factor": cfg.rope.high_freq_factor})
    kind = hf.rope_parameters["rope_type"]
    inv_freq, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    assert torch.allclose(inv_freq.double(), rope_frequencies(cfg), rtol=4e-7, atol=0)  # fp32: 2^-23 per op
