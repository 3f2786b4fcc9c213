"""Unit tests of dsv3ref.mla.MLA: checkpoint names, bad input, NaN isolation, gradients, cache contents."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.kv_cache import CacheError, KVCache, LatentCache
from dsv3ref.mla import MLA
from dsv3ref.rope import apply_rope, rope_frequencies

TINY = ModelConfig.preset("dsv3-tiny")  # q LoRA, YaRN active
LITE = TINY.replace(attention=dataclasses.replace(TINY.attention, q_lora_rank=0))  # a single wq, as V2-Lite
F64_TOL = 1e-10  # float64 identity (numerics policy)


def pair(cfg: ModelConfig = TINY, seed: int = 0) -> tuple[MLA, MLA]:
    """A naive and an absorbed layer over the same float64 weights (norm weights randomised too)."""
    torch.manual_seed(seed)
    naive = MLA(cfg, "naive").double()
    with torch.no_grad():
        for p in naive.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    absorbed = MLA(cfg, "absorbed").double()
    absorbed.load_state_dict(naive.state_dict())
    return naive, absorbed


def x_for(cfg: ModelConfig, batch: int = 2, length: int = 6, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, length, cfg.hidden_size, dtype=dtype)


def test_state_dict_uses_the_official_checkpoint_names():
    assert list(MLA(TINY).state_dict()) == ["wq_a.weight", "q_norm.weight", "wq_b.weight", "wkv_a.weight",
                                            "kv_norm.weight", "wkv_b.weight", "wo.weight"]
    assert list(MLA(LITE).state_dict()) == ["wq.weight", "wkv_a.weight", "kv_norm.weight", "wkv_b.weight",
                                            "wo.weight"]
    assert all(m.bias is None for m in MLA(TINY).modules() if isinstance(m, torch.nn.Linear))


def test_constructor_errors():
    with pytest.raises(ConfigError, match="attention.kind"):
        MLA(ModelConfig.preset("qwen2.5-72b"))
    with pytest.raises(ValueError, match="mode"):
        MLA(TINY, "flash")


@pytest.mark.parametrize("cfg", [TINY, LITE], ids=["q-lora", "single-wq"])
def test_absorbed_equals_naive_for_both_query_paths(cfg):
    naive, absorbed = pair(cfg)
    x = x_for(cfg)
    y = naive(x, 3)
    assert ((absorbed(x, 3) - y).norm() / y.norm()).item() <= F64_TOL


def test_bad_input_gives_one_line_errors():
    layer = MLA(TINY)
    cache = layer.new_cache(1, 8)
    cases = [
        (lambda: layer(torch.randn(1, 3, 65)), r"x: expected a tensor of shape \[batch, seq_len, 64\]"),
        (lambda: layer(torch.randn(3, 64)), r"x: expected a tensor of shape"),
        (lambda: layer(torch.randn(1, 0, 64)), "at least one sequence and one token"),
        (lambda: layer(torch.randn(1, 3, 64).double()), "x: expected dtype torch.float32"),
        (lambda: layer(torch.randn(1, 3, 64), TINY.max_seq_len - 2), "expected <= max_seq_len 256, got 257"),
        (lambda: layer(torch.randn(1, 1, 64), 2, cache), "start_pos: expected <= the cached length 0 of row 0"),
        (lambda: layer(torch.randn(1, 9, 64), 0, cache), "cache capacity 8"),
        (lambda: layer(torch.randn(1, 2, 64), 0, KVCache(1, 8, 4, 24, 16)), "mode 'absorbed' needs a LatentCache"),
        (lambda: layer(torch.randn(2, 2, 64), 0, cache), r"kv: expected shape \(1, 2, 32\)"),
        (lambda: MLA(TINY, "naive").new_cache(1, 8, paged=True), "latent-cache options"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert issubclass(CacheError, ValueError)


def test_nan_in_one_row_stays_in_that_row():
    naive, absorbed = pair()
    x = x_for(TINY, batch=3, length=6)
    x[1, 2, 5] = float("nan")
    for layer in (naive, absorbed):
        with torch.no_grad():
            cache = layer.new_cache(3, 7)
            out = torch.cat([layer(x, 0, cache), layer(x[:, :1], 6, cache)], 1)
            assert bool(torch.isfinite(out[[0, 2]]).all())
            assert bool(torch.isnan(out[1, 2:]).all())  # (earlier positions may see it too: 0 x NaN in P @ V)
            # the same row alone: a float64 identity (BLAS may block a batch of 3 differently from 1 row)
            alone = layer(x[:1])[0]
            assert float((out[0, :6] - alone).norm() / alone.norm()) <= 1e-12


def test_padding_rows_return_zeros_and_are_not_cached():
    _, absorbed = pair()
    with torch.no_grad():
        cache = absorbed.new_cache(2, 8)
        out = absorbed(x_for(TINY, 2, 5), 0, cache, seqlens=torch.tensor([5, 2]))
    assert torch.count_nonzero(out[1, 2:]) == 0
    assert cache.lengths.tolist() == [5, 2] and torch.count_nonzero(cache.kv[1, 2:]) == 0


def test_latent_cache_holds_the_normalised_latent_and_the_roped_shared_key():
    _, absorbed = pair()
    x = x_for(TINY, 1, 5)
    with torch.no_grad():
        cache = absorbed.new_cache(1, 5)
        absorbed(x, 0, cache)
        kv, pe = absorbed.wkv_a(x).split([TINY.attention.kv_lora_rank, TINY.attention.qk_rope_head_dim], -1)
        angles = torch.arange(5, dtype=torch.float64)[:, None] * rope_frequencies(TINY)
        assert torch.allclose(cache.kv, absorbed.kv_norm(kv), rtol=0, atol=1e-14)
        assert torch.allclose(cache.pe, apply_rope(pe, angles.cos(), angles.sin()), rtol=0, atol=1e-14)


def test_gradients_of_both_modes_agree():
    naive, absorbed = pair()
    x = x_for(TINY, 2, 5)
    grads = []
    for layer in (naive, absorbed):
        xg = x.clone().requires_grad_()
        layer(xg, 4).square().sum().backward()
        grads.append([xg.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads, strict=True):
        assert ((a - b).norm() / b.norm()).item() <= F64_TOL


def test_absorbed_weight_copies_follow_weight_updates():
    naive, absorbed = pair()
    x = x_for(TINY)
    with torch.no_grad():
        absorbed(x)  # makes the contiguous W_UK / W_UV copies
        for layer in (naive, absorbed):
            layer.wkv_b.weight.mul_(1.5)
        y = naive(x)
        assert ((absorbed(x) - y).norm() / y.norm()).item() <= F64_TOL


def test_meta_construction_then_assign_and_cast():
    naive, _ = pair()
    with torch.device("meta"):
        layer = MLA(TINY, "absorbed")
    layer.load_state_dict(naive.state_dict(), assign=True)
    layer = layer.to(torch.bfloat16)
    assert layer.rotary.freqs.dtype == torch.float64
    out = layer(x_for(TINY, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_new_cache_follows_the_mode_and_options():
    naive, absorbed = pair()
    assert isinstance(naive.new_cache(2, 4), KVCache)
    assert type(absorbed.new_cache(2, 4)) is LatentCache
    assert absorbed.new_cache(2, 4, fp8=True).kv.dtype == torch.float8_e4m3fn
    assert absorbed.new_cache(2, 100, paged=True).block_table.shape == (2, 2)  # 64-token blocks
    assert absorbed.new_cache(1, 4).dtype == torch.float64  # follows the layer


def test_analytic_layer_flops_and_decode_bytes_for_v3():
    from harness.analytic.flops import attention_decode_bytes, attention_layer_fwd_flops

    v3 = ModelConfig.preset("deepseek-v3-671b")
    # wq_a 7168x1536, wq_b 1536x(128x192), wkv_a 7168x576, wkv_b 512x(128x256), wo (128x128)x7168
    matrices = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    keys = 4096 + 1
    assert attention_layer_fwd_flops(v3, 1, 4096, 1, "naive") == 2 * matrices + 2 * keys * 128 * (192 + 128)
    assert attention_layer_fwd_flops(v3, 1, 4096, 1, "absorbed") == 2 * matrices + 2 * keys * 128 * (512 + 64 + 512)
    assert attention_layer_fwd_flops(v3, 16, 0, 3, "naive") == 3 * 16 * (2 * matrices + 2 * 16 * 128 * 320)
    weights = (matrices + 1536 + 512) * 2  # + q_norm and kv_norm weights, BF16
    assert attention_decode_bytes(v3, 4096, 1, "absorbed") == weights + keys * (512 + 64) * 2
    assert attention_decode_bytes(v3, 4096, 2, "naive") == weights + 2 * keys * 128 * (192 + 128) * 2


def test_analytic_layer_flops_argument_errors():
    from harness.analytic.flops import attention_decode_bytes, attention_layer_fwd_flops

    with pytest.raises(ConfigError, match="new_tokens"):
        attention_layer_fwd_flops(TINY, 0)
    with pytest.raises(ConfigError, match="cached_tokens"):
        attention_layer_fwd_flops(TINY, 1, -1)
    with pytest.raises(ConfigError, match="mla_mode"):
        attention_layer_fwd_flops(TINY, 1, 0, 1, "flash")
    with pytest.raises(ConfigError, match="context"):
        attention_decode_bytes(TINY, -1)


def test_transformers_adapter_rejects_what_a_dynamic_cache_cannot_do():
    pytest.importorskip("transformers")
    from harness.adapters.mla import TransformersMLA

    naive, _ = pair()
    impl = TransformersMLA()
    layer = impl.build(TINY, naive.state_dict(), torch.float64)
    cache = impl.new_cache(layer, 1, 8)
    with pytest.raises(ValueError, match="per-row lengths"):
        layer(x_for(TINY, 1, 2), 0, cache, seqlens=torch.tensor([1]))
    with pytest.raises(ValueError, match="the DynamicCache holds 0 tokens"):
        layer(x_for(TINY, 1, 2), 3, cache)
    with pytest.raises(ValueError, match="paged"):
        impl.new_cache(layer, 1, 8, paged=True)
    assert layer.rotary.inv_freq.dtype == torch.float32  # kept fp32 whatever the layer's dtype


def test_layer_built_or_run_under_inference_mode():
    naive, absorbed = pair()
    x = x_for(TINY)
    with torch.inference_mode():
        y = absorbed(x)
        built = MLA(TINY).double()
        built.load_state_dict(naive.state_dict())
        assert ((built(x) - y).norm() / y.norm()).item() <= F64_TOL
