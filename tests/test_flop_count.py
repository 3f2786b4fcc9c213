"""harness.bench.common.FlopCount counts exactly what torch's FlopCounterMode counts (it uses the same formulas
without FlopCounterMode's module tracking), on the layers the report counts and on ops that decompose."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from baselines.attention import Attention
from dsv3ref.config import ModelConfig
from dsv3ref.mla import MLA
from dsv3ref.model import Transformer
from dsv3ref.moe import MoE
from harness.bench.common import FlopCount

TINY = ModelConfig.preset("dsv3-tiny")


def both(fn) -> tuple[int, int]:  # noqa: ANN001
    with torch.no_grad(), FlopCounterMode(display=False) as reference:
        fn()
    with torch.no_grad(), FlopCount() as ours:
        fn()
    return ours.total, reference.get_total_flops()


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
def test_mla_prefill_and_decode(mode):
    layer = MLA(TINY, mode)
    x = torch.randn(2, 7, TINY.hidden_size)
    cache = layer.new_cache(2, 8)
    ours, reference = both(lambda: layer(x, 0, cache))
    assert ours == reference > 0
    ours, reference = both(lambda: layer(x[:, :1], 7, cache))
    assert ours == reference > 0


@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_moe_and_the_whole_model(backend):
    moe = MoE(TINY, backend=backend)
    x = torch.randn(9, TINY.hidden_size)
    assert both(lambda: moe(x))[0] == both(lambda: moe(x))[1] > 0
    model = Transformer(TINY, moe_backend=backend)
    tokens = torch.randint(0, TINY.vocab_size, (2, 5))
    ours, reference = both(lambda: model(tokens))
    assert ours == reference > 0


def test_baseline_attention_and_decomposed_ops():
    cfg = ModelConfig.preset("qwen2.5-72b").replace(hidden_size=64, max_seq_len=16)
    cfg = cfg.replace(attention=cfg.attention.__class__(kind="gqa", num_heads=4, num_kv_heads=2, head_dim=16,
                                                        qkv_bias=True))
    layer = Attention(cfg)
    x = torch.randn(1, 5, 64)
    assert both(lambda: layer(x))[0] == both(lambda: layer(x))[1] > 0
    a, b = torch.randn(3, 6, 8), torch.randn(3, 8, 5)
    ours, reference = both(lambda: torch.einsum("hik,hkj->hij", a, b))  # decomposes into a bmm
    assert ours == reference == 2 * 3 * 6 * 8 * 5
