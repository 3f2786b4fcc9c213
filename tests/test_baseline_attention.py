"""Unit tests of baselines.attention.Attention (MHA/GQA/MQA with a K/V cache)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from baselines.attention import Attention
from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.kv_cache import KVCache, LatentCache

QWEN = ModelConfig.preset("qwen2.5-72b")
SMALL = QWEN.replace(hidden_size=64, max_seq_len=64,
                     attention=dataclasses.replace(QWEN.attention, num_heads=8, num_kv_heads=2, head_dim=16))
LLAMA = ModelConfig.preset("llama3.1-405b")
LLAMA_SMALL = LLAMA.replace(hidden_size=64, max_seq_len=64,
                            attention=dataclasses.replace(LLAMA.attention, num_heads=4, num_kv_heads=1, head_dim=16))
F64_TOL = 1e-10  # float64 identity (numerics policy)


def layer(cfg: ModelConfig = SMALL) -> Attention:
    torch.manual_seed(0)
    return Attention(cfg).double()


def test_projection_names_and_biases():
    qwen = Attention(SMALL)
    assert sorted(qwen.state_dict()) == ["wk.bias", "wk.weight", "wo.weight", "wq.bias", "wq.weight", "wv.bias",
                                         "wv.weight"]
    assert qwen.wk.weight.shape == (2 * 16, 64)
    assert Attention(LLAMA_SMALL).wq.bias is None


def test_mla_config_is_rejected():
    with pytest.raises(ConfigError, match="attention.kind"):
        Attention(ModelConfig.preset("dsv3-tiny"))


@pytest.mark.parametrize("cfg", [SMALL, LLAMA_SMALL], ids=["gqa-bias", "mqa-llama3-rope"])
def test_prefill_then_decode_equals_full_pass(cfg):
    attn = layer(cfg)
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        full = attn(x)
        cache = attn.new_cache(2, 7)
        steps = torch.cat([attn(x[:, :4], 0, cache)] + [attn(x[:, t: t + 1], t, cache) for t in range(4, 7)], 1)
    assert ((steps - full).norm() / full.norm()).item() <= F64_TOL


def test_rows_of_different_lengths_equal_separate_rows():
    attn = layer()
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    with torch.no_grad():
        cache = attn.new_cache(2, 6)
        out = attn(x, 0, cache, seqlens=torch.tensor([5, 3]))
        step = attn(x[:, 4:5], cache.lengths.clone(), cache)
        alone = attn(torch.cat([x[1:, :3], x[1:, 4:5]], 1))
    assert torch.count_nonzero(out[1, 3:]) == 0
    assert ((torch.cat([out[1, :3], step[1]]) - alone[0]).norm() / alone.norm()).item() <= F64_TOL


def test_cache_is_a_kv_cache_of_the_kv_heads():
    cache = Attention(SMALL).to(torch.bfloat16).new_cache(3, 10)
    assert isinstance(cache, KVCache) and cache.k.shape == (3, 2, 10, 16)
    assert cache.bytes_per_token() == 2 * 2 * 16 * 2


def test_bad_input():
    attn = layer()
    with pytest.raises(ValueError, match=r"x: expected a tensor of shape \[batch, seq_len, 64\]"):
        attn(torch.randn(1, 2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache: expected a KVCache"):
        attn(torch.randn(1, 2, 64, dtype=torch.float64), 0, LatentCache(1, 4, 4, 2))
    with pytest.raises(ValueError, match="max_seq_len 64"):
        attn(torch.randn(1, 2, 64, dtype=torch.float64), 63)
