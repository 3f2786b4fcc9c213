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


# --- cached inference (extend), the API the MTP / speculative decoding work builds on --------------------------------


def _tiny(mode: str = "absorbed") -> Transformer:
    torch.manual_seed(2)
    return Transformer(TINY, attn_mode=mode).double().eval()


@pytest.mark.parametrize("mode, paged", [("absorbed", False), ("absorbed", True), ("naive", False)])
def test_extend_returns_prenorm_hidden_and_last_logits(mode, paged):
    model = _tiny(mode)
    tokens = torch.randint(0, 256, (2, 9))
    cache = model.new_cache(2, 16, paged=paged)
    with torch.no_grad():
        step = model.extend(tokens, cache)
        full_hidden = model.hidden(tokens)
    assert torch.allclose(step.hidden, full_hidden, rtol=1e-12, atol=1e-12)  # fp64 identity
    assert torch.allclose(step.logits, model.logits(full_hidden[:, -1]), rtol=1e-12, atol=1e-12)
    assert step.logits.shape == (2, 256) and cache.lengths.tolist() == [9, 9]
    per_token = {"absorbed": (32 + 8) * 8, "naive": 4 * (24 + 16) * 8}[mode]  # fp64 latent, or per-head K/V
    assert cache.nbytes() == TINY.num_layers * per_token * cache.batch * (16 if not paged else 64)


def test_a_rejected_draft_is_rewound_and_replaced():
    # verify 3 draft tokens in one step, keep 1, continue with another token: as if the rejected ones never ran
    model = _tiny()
    prefix, draft, other = torch.randint(0, 256, (1, 6)), torch.randint(0, 256, (1, 3)), torch.randint(0, 256, (1, 2))
    cache = model.new_cache(1, 16, paged=True)
    with torch.no_grad():
        model.extend(prefix, cache)
        verify = model.extend(draft, cache, all_logits=True)
        cache.rewind(7)  # the prefix and the first draft token
        after = model.extend(other, cache, all_logits=True)
        full = model(torch.cat([prefix, draft, other], 1))
        fresh = model(torch.cat([prefix, draft[:, :1], other], 1))
    assert verify.logits.shape == (1, 3, 256)
    assert torch.allclose(verify.logits, full[:, 6:9], rtol=1e-12, atol=1e-12)
    assert torch.allclose(after.logits, fresh[:, 7:], rtol=1e-12, atol=1e-12)
    assert cache.lengths.tolist() == [9]


def test_rows_with_padding_and_empty_rows():
    model = _tiny()
    tokens = torch.randint(0, 256, (3, 5))
    cache = model.new_cache(3, 8)
    with torch.no_grad():
        step = model.extend(tokens, cache, seqlens=torch.tensor([5, 2, 0]), all_logits=True)
        last = model.extend(tokens[:, :1], model.new_cache(3, 8), seqlens=torch.tensor([1, 1, 0]))
    assert cache.lengths.tolist() == [5, 2, 0]
    assert torch.count_nonzero(step.hidden[1, 2:]) == 0 and torch.count_nonzero(step.logits[2]) == 0
    assert torch.count_nonzero(last.logits[2]) == 0 and torch.count_nonzero(last.logits[0]) > 0


def test_extend_errors():
    model = _tiny()
    cache = model.new_cache(2, 8)
    with pytest.raises(ModelInputError, match="^cache: expected a ModelCache of 2 layers"):
        model.extend(torch.zeros(2, 1, dtype=torch.long), [])
    with pytest.raises(ModelInputError, match=r"^tokens: expected 2 rows \(the cache's batch\), got 3"):
        model.extend(torch.zeros(3, 1, dtype=torch.long), cache)
    with pytest.raises(ModelInputError, match=r"^seqlens: expected an integer tensor of shape \(2,\)"):
        model.extend(torch.zeros(2, 1, dtype=torch.long), cache, seqlens=torch.ones(2))
    long = model.new_cache(1, 300)  # capped at max_seq_len 256
    with torch.no_grad():
        model.extend(torch.zeros(1, 255, dtype=torch.long), long)
    with pytest.raises(ModelInputError, match="^tokens: expected cached \\+ new tokens <= max_seq_len 256"):
        model.extend(torch.zeros(1, 2, dtype=torch.long), long)
    with pytest.raises(ValueError, match="capacity 8"):
        model.extend(torch.zeros(2, 9, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="lengths: expected 0 <= length <= the cached length 0"):
        cache.rewind(1)


def test_from_state_dict_shares_tensors_and_builds_fp8_linears():
    from dsv3ref.fp8.inference import FP8Linear
    from dsv3ref.fp8.quant import quant_128x128

    model = _tiny()
    state = model.state_dict()
    shared = Transformer.from_state_dict(TINY, state)
    assert shared.embed.weight.data_ptr() == model.embed.weight.data_ptr() and not shared.training
    q, s = quant_128x128(state["layers.0.attn.wo.weight"].float())
    fp8 = Transformer.from_state_dict(TINY, {**state, "layers.0.attn.wo.weight": q, "layers.0.attn.wo.scale": s},
                                      dtype=torch.float32)
    assert isinstance(fp8.layers[0].attn.wo, FP8Linear) and fp8.layers[0].attn.wo.weight.dtype == q.dtype
    assert fp8.layers[1].ffn.gate.bias.dtype == torch.float32
    with pytest.raises(RuntimeError, match="Missing key"):
        Transformer.from_state_dict(TINY, {k: v for k, v in state.items() if k != "norm.weight"})
