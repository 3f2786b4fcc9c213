"""The assembled Transformer: checkpoint names, causality, mode equivalence, token validation."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.model import ModelInputError, Transformer

TINY = ModelConfig.preset("dsv3-tiny")


def test_official_state_dict_names():
    names = set(Transformer(TINY).state_dict())
    for name in ("embed.weight", "layers.0.attn_norm.weight", "layers.0.attn.wq_a.weight",
                 "layers.0.attn.wkv_b.weight", "layers.0.ffn_norm.weight", "layers.0.ffn.w1.weight",
                 "layers.1.ffn.gate.weight", "layers.1.ffn.gate.bias", "layers.1.ffn.experts.7.w3.weight",
                 "layers.1.ffn.shared_experts.w2.weight", "norm.weight", "head.weight"):
        assert name in names
    assert not any(n.startswith("layers.2") for n in names)


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = Transformer(TINY).double()
    tokens = torch.randint(0, 256, (2, 12))
    logits = model(tokens)
    assert logits.shape == (2, 12, 256) and logits.dtype == torch.float64
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256
    # positions before the change see the same prefix (float64; routing is per token, so exact equality)
    assert torch.allclose(model(changed)[:, :7], logits[:, :7], rtol=1e-10, atol=1e-12)
    assert model.hidden(tokens).shape == (2, 12, TINY.hidden_size)


def test_modes_and_moe_impls_agree():
    # absorbed vs naive MLA and grouped vs per-expert MoE are algebraic identities: float64 to ~1e-10.
    torch.manual_seed(1)
    base = Transformer(TINY).double()
    other = Transformer(TINY, attn_mode="naive", moe_backend="loop").double()
    other.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 256, (2, 10))
    assert torch.allclose(base(tokens), other(tokens), rtol=1e-10, atol=1e-10)
    assert len(base.moe_layers()) == TINY.num_moe_layers


def test_bad_tokens_and_configs():
    model = Transformer(TINY)
    with pytest.raises(ModelInputError, match="^tokens: expected an integer tensor"):
        model(torch.zeros(2, 3))
    with pytest.raises(ModelInputError, match=r"^tokens: expected ids in \[0, 256\)"):
        model(torch.tensor([[1, 256]]))
    with pytest.raises(ModelInputError, match="^tokens: expected seq_len <= max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ModelInputError, match="^tokens: expected at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ConfigError, match="^attention.kind"):
        Transformer(ModelConfig.preset("qwen2.5-72b").replace(num_layers=1, hidden_size=64, vocab_size=16,
                                                              intermediate_size=32))
