"""Unit tests of dsv3ref.rope: argument errors, config errors, and the Rotary module's dtype/device handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dsv3ref.config import ConfigError, ModelConfig, RopeConfig
from dsv3ref.rope import (
    Rotary,
    apply_rope,
    half_layout_index,
    rope_dim,
    rope_frequencies,
    softmax_scale,
    yarn_mscale,
)

TINY = ModelConfig.preset("dsv3-tiny")
QWEN = ModelConfig.preset("qwen2.5-72b")


def test_rope_dim_is_the_rotary_part_for_mla_and_the_head_otherwise():
    assert rope_dim(TINY) == TINY.attention.qk_rope_head_dim == 8
    assert rope_dim(QWEN) == QWEN.attention.head_dim == 128


def test_yarn_mscale_formula():
    assert yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40) + 1, rel=1e-15)
    assert yarn_mscale(1.0, 0.707) == 1.0


def test_apply_rope_rejects_bad_layout_and_widths():
    cos = sin = torch.ones(3, 4)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(torch.ones(3, 8), cos, sin, "complex")
    with pytest.raises(ValueError, match="x: expected an even last dim"):
        apply_rope(torch.ones(3, 6), cos, sin)
    with pytest.raises(ValueError, match="rotary dim"):
        half_layout_index(5)


def test_apply_rope_keeps_the_input_dtype_and_rotates_in_fp32():
    x = torch.randn(5, 8).bfloat16()
    angles = torch.arange(5, dtype=torch.float64)[:, None] * torch.rand(4, dtype=torch.float64)
    y = apply_rope(x, angles.cos(), angles.sin())
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, apply_rope(x.float(), angles.cos(), angles.sin()).bfloat16())


def test_mscale_mismatch_is_a_config_error():
    bad = TINY.replace(rope=dataclasses.replace(TINY.rope, mscale=0.5))
    for fn in (softmax_scale, rope_frequencies, Rotary):
        with pytest.raises(ConfigError, match="rope.mscale"):
            fn(bad)


def test_llama3_factors_must_be_ordered():
    bad = QWEN.replace(rope=RopeConfig(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0))
    with pytest.raises(ConfigError, match="rope.high_freq_factor"):
        rope_frequencies(bad)


def test_rotary_rejects_unknown_layout_and_positions_out_of_range():
    with pytest.raises(ValueError, match="layout"):
        Rotary(TINY, "complex")
    rotary = Rotary(TINY)
    x = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="max_seq_len 256"):
        rotary(x, TINY.max_seq_len - 3)
    with pytest.raises(ValueError, match="positions"):
        rotary(x, -1)


def test_rotary_keeps_float64_frequencies_when_the_module_is_cast():
    rotary = Rotary(TINY)
    exact = rotary.freqs.clone()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        cast(rotary)
        assert rotary.freqs.dtype == torch.float64 and torch.equal(rotary.freqs, exact)
    assert rotary.state_dict() == {}  # not part of checkpoints


def test_rotary_survives_meta_construction_and_to_empty():
    with torch.device("meta"):
        rotary = Rotary(TINY)
    assert rotary.freqs.device.type == "cpu"  # built on the CPU: nothing to recompute later
    rotary.to("meta")
    assert rotary.freqs.is_meta
    rotary.to_empty(device="cpu")
    assert torch.equal(rotary.freqs, rope_frequencies(TINY))


def test_rotary_int_and_tensor_positions_agree():
    rotary = Rotary(TINY)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    positions = torch.arange(7, 12).expand(2, -1)
    assert torch.equal(rotary(x, 7), rotary(x, positions))
