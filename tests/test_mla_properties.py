"""Properties of the reference MLA and the attention baselines themselves (no implementation under test): the two
MLA modes agree in float64, GQA is MHA with repeated KV heads, the baselines' cache bytes and every layer's counted
FLOPs equal the analytic formulas."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from baselines.attention import Attention
from dsv3ref.config import AttentionConfig, ModelConfig
from dsv3ref.mla import MLA
from harness.analytic.flops import attention_layer_fwd_flops
from harness.analytic.kv_cache import kv_cache_bytes_per_token_layer
from harness.cases.mla import mla_inputs, mla_weights
from harness.numerics import F64_IDENTITY_RTOL, rel_err
from harness.strategies import attention_configs, mla_configs


def _run(layer, x: torch.Tensor, *args) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return layer(x, *args)


@given(mla_configs(), st.integers(0, 2**16), st.integers(1, 3), st.data())
def test_absorbed_equals_naive_in_float64(cfg, seed, batch, data):
    total = data.draw(st.integers(2, min(cfg.max_seq_len, 16)), label="total")
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    sd, x = mla_weights(cfg, seed), mla_inputs(cfg, batch, total, seed)
    outs = {}
    for mode in ("naive", "absorbed"):
        layer = MLA(cfg, mode).double()
        layer.load_state_dict(sd)
        cache = layer.new_cache(batch, total)
        outs[mode] = torch.cat([_run(layer, x[:, :prefill], 0, cache)]
                               + [_run(layer, x[:, t: t + 1], t, cache) for t in range(prefill, total)], 1)
    assert rel_err(outs["absorbed"], outs["naive"]) <= F64_IDENTITY_RTOL


def _baseline_cfg(att: AttentionConfig, hidden: int) -> ModelConfig:
    return ModelConfig(name="hypothesis-attn", vocab_size=16, hidden_size=hidden, intermediate_size=16,
                       num_layers=1, attention=att, max_seq_len=32)


@given(attention_configs(kinds=("gqa",)), st.sampled_from([16, 32]), st.integers(0, 2**16), st.integers(1, 12))
def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_group(att, hidden, seed, length):
    # kv_heads == heads is MHA and kv_heads == 1 is MQA: both are instances of this identity.
    gqa_cfg = _baseline_cfg(att, hidden)
    mha_cfg = _baseline_cfg(dataclasses.replace(att, kind="mha", num_kv_heads=att.num_heads), hidden)
    torch.manual_seed(seed)
    gqa = Attention(gqa_cfg).double()
    mha = Attention(mha_cfg).double()
    group, hd = att.num_heads // att.num_kv_heads, gqa.head_dim
    state = {}
    for name, tensor in gqa.state_dict().items():
        if name.split(".")[0] in ("wk", "wv"):  # rows [kv_head, head_dim, ...] -> each KV head `group` times
            tensor = tensor.unflatten(0, (att.num_kv_heads, hd)).repeat_interleave(group, 0).flatten(0, 1)
        state[name] = tensor
    mha.load_state_dict(state)
    x = torch.randn(2, length, hidden, dtype=torch.float64)
    assert rel_err(_run(gqa, x), _run(mha, x)) <= F64_IDENTITY_RTOL


@given(attention_configs(kinds=("mha", "gqa", "mqa")), st.integers(1, 3), st.integers(1, 6))
def test_baseline_cache_bytes_per_token_equal_the_analytic_formula(att, batch, tokens):
    cfg = _baseline_cfg(att, 32)
    layer = Attention(cfg).to(torch.bfloat16)
    cache = layer.new_cache(batch, tokens)
    _run(layer, torch.randn(batch, tokens, 32, dtype=torch.bfloat16), 0, cache)
    assert cache.bytes_per_token() == kv_cache_bytes_per_token_layer(att, "bf16")


@given(st.one_of(mla_configs(), attention_configs(kinds=("mha", "gqa", "mqa")).map(lambda a: _baseline_cfg(a, 32))),
       st.sampled_from(["naive", "absorbed"]), st.integers(1, 3), st.integers(1, 6), st.integers(0, 8))
def test_counted_flops_equal_the_analytic_layer_formula(cfg, mode, batch, new, cached):
    layer = MLA(cfg, mode) if cfg.attention.kind == "mla" else Attention(cfg)
    cache = layer.new_cache(batch, cached + new)
    x = torch.randn(batch, cached + new, cfg.hidden_size)
    if cached:
        _run(layer, x[:, :cached], 0, cache)
    with FlopCounterMode(display=False) as counter:
        _run(layer, x[:, cached:], cached, cache)
    assert counter.get_total_flops() == attention_layer_fwd_flops(cfg, new, cached, batch, mode)
