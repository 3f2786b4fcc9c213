"""Hypothesis strategies for valid model configs, shared by the conformance suites and the unit tests."""

from __future__ import annotations

from hypothesis import strategies as st

from dsv3ref.config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig


@st.composite
def attention_configs(draw: st.DrawFn, kinds: tuple[str, ...] = ("mha", "gqa", "mqa", "mla")) -> AttentionConfig:
    """A valid attention section of a random kind with small dims."""
    kind = draw(st.sampled_from(kinds))
    heads = draw(st.sampled_from([1, 2, 4, 8, 16]))
    if kind == "mla":
        return AttentionConfig(kind="mla", num_heads=heads, q_lora_rank=draw(st.sampled_from([0, 16, 48])),
                               kv_lora_rank=draw(st.sampled_from([8, 32, 64])),
                               qk_nope_head_dim=draw(st.sampled_from([8, 16, 32])),
                               qk_rope_head_dim=draw(st.sampled_from([2, 8, 16])),
                               v_head_dim=draw(st.sampled_from([8, 16, 32])))
    kv = {"mha": heads, "mqa": 1}.get(kind) or draw(st.sampled_from([d for d in (1, 2, 4, 8) if heads % d == 0]))
    return AttentionConfig(kind=kind, num_heads=heads, num_kv_heads=kv, head_dim=draw(st.sampled_from([8, 16, 64])),
                           qkv_bias=draw(st.booleans()))


@st.composite
def moe_configs(draw: st.DrawFn, num_layers: int) -> MoEConfig:
    """A valid DeepSeekMoE section."""
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 8))
    topk_group = draw(st.integers(1, groups))
    topk = draw(st.integers(1, topk_group * per_group))
    return MoEConfig(n_routed_experts=groups * per_group, num_experts_per_tok=topk,
                     moe_intermediate_size=draw(st.sampled_from([16, 32, 64])),
                     n_shared_experts=draw(st.integers(0, 2)), n_group=groups, topk_group=topk_group,
                     first_k_dense_replace=draw(st.integers(0, num_layers)),
                     score_func=draw(st.sampled_from(["sigmoid", "softmax"])), bias=draw(st.booleans()))


@st.composite
def model_configs(draw: st.DrawFn, kinds: tuple[str, ...] = ("mha", "gqa", "mqa", "mla"),
                  moe: bool | None = None) -> ModelConfig:
    """A valid small ModelConfig; `moe` forces (True), forbids (False) or randomises (None) the MoE section."""
    layers = draw(st.integers(1, 6))
    with_moe = draw(st.booleans()) if moe is None else moe
    return ModelConfig(name="hypothesis", vocab_size=draw(st.integers(16, 512)),
                       hidden_size=draw(st.sampled_from([32, 64, 128])), num_layers=layers,
                       attention=draw(attention_configs(kinds)),
                       intermediate_size=draw(st.sampled_from([64, 128, 256])),
                       moe=draw(moe_configs(layers)) if with_moe else None,
                       tie_word_embeddings=draw(st.booleans()), mtp_depth=draw(st.integers(0, 2)))


@st.composite
def mla_configs(draw: st.DrawFn) -> ModelConfig:
    """A small random MLA model: q LoRA or a single wq, any head dims, plain RoPE or YaRN (active or not)."""
    att = AttentionConfig(kind="mla", num_heads=draw(st.integers(1, 4)), q_lora_rank=draw(st.sampled_from([0, 8, 12])),
                          kv_lora_rank=draw(st.sampled_from([4, 8, 16])),
                          qk_nope_head_dim=draw(st.sampled_from([2, 4, 8])),
                          qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])),
                          v_head_dim=draw(st.sampled_from([2, 4, 8])))
    return ModelConfig(name="hypothesis-mla", vocab_size=16, hidden_size=draw(st.sampled_from([8, 16, 24])),
                       intermediate_size=16, num_layers=1, attention=att, rope=draw(rope_configs()),
                       max_seq_len=draw(st.sampled_from([24, 48])))


@st.composite
def rope_configs(draw: st.DrawFn) -> RopeConfig:
    """Plain RoPE, or YaRN whose original length (8-64) may lie below a small model's context (active) or not."""
    theta = draw(st.sampled_from([100.0, 10000.0]))
    if not draw(st.booleans()):
        return RopeConfig(kind="default", theta=theta)
    mscale = draw(st.sampled_from([0.707, 1.0]))
    return RopeConfig(kind="yarn", theta=theta, factor=draw(st.sampled_from([1.0, 4.0, 40.0])),
                      original_max_position_embeddings=draw(st.sampled_from([8, 16, 64])), mscale=mscale,
                      mscale_all_dim=mscale)


@st.composite
def v3_width_mla_configs(draw: st.DrawFn) -> ModelConfig:
    """MLA at DeepSeek-V3's head widths (qk_nope 128, rope 64, v 128, kv_lora 512: contractions of 192 and 576
    wide), with few heads and a small hidden size, so that a working-dtype check sees V3's accumulation lengths."""
    att = AttentionConfig(kind="mla", num_heads=draw(st.integers(1, 2)), q_lora_rank=draw(st.sampled_from([0, 64])),
                          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)
    return ModelConfig(name="hypothesis-mla-v3-widths", vocab_size=16, hidden_size=draw(st.sampled_from([64, 128])),
                       intermediate_size=16, num_layers=1, attention=att, rope=draw(rope_configs()),
                       max_seq_len=64)
