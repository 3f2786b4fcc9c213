"""Parameter counts, split by part, total and activated per token.

Convention (the paper's): embedding and output head count in full toward the activated parameters; routed
experts count only the top-k a token is sent to; shared experts, router and attention always count. MTP
modules are counted separately and are not part of the total (671B excludes them; 685B on the hub includes).
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3ref.config import ModelConfig


def attention_params(cfg: ModelConfig) -> int:
    """One attention block's weights (projections, biases and, for MLA, the q/kv latent norms)."""
    a, d = cfg.attention, cfg.hidden_size
    if a.kind == "mla":
        q_out = a.num_heads * a.qk_head_dim
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * q_out if a.q_lora_rank else d * q_out
        kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
        kv += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + a.num_heads * a.v_head_dim * d
    q_out, kv_out = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    bias = q_out + 2 * kv_out if a.qkv_bias else 0
    return d * q_out + 2 * d * kv_out + bias + q_out * d


def swiglu_params(cfg: ModelConfig, intermediate: int) -> int:
    """A SwiGLU MLP w2(silu(w1 x) * w3 x): three d x intermediate matrices."""
    return 3 * cfg.hidden_size * intermediate


def router_params(cfg: ModelConfig) -> int:
    """The gate weight [E, d] plus the selection bias [E] when present (0 for dense models)."""
    if cfg.moe is None:
        return 0
    return cfg.moe.n_routed_experts * cfg.hidden_size + (cfg.moe.n_routed_experts if cfg.moe.bias else 0)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a whole model, by part (all layers)."""

    embedding: int
    head: int  # 0 when tied to the embedding
    attention: int
    dense_ffn: int
    routed_experts: int
    shared_experts: int
    router: int
    norms: int
    activated_routed_experts: int
    mtp: int

    @property
    def total(self) -> int:
        return (self.embedding + self.head + self.attention + self.dense_ffn + self.routed_experts
                + self.shared_experts + self.router + self.norms)

    @property
    def activated(self) -> int:
        """Parameters a token touches (embedding and head counted in full, as the paper does)."""
        return self.total - self.routed_experts + self.activated_routed_experts

    @property
    def activated_non_embedding(self) -> int:
        """Activated parameters less the embedding table (the head stays: it is a matmul)."""
        return self.activated - self.embedding


def _layer_norms(cfg: ModelConfig) -> int:
    return 2 * cfg.hidden_size  # attn_norm + ffn_norm


def mtp_module_params(cfg: ModelConfig) -> int:
    """One MTP module: enorm, hnorm, eh_proj [d, 2d], one MoE block, its final norm (embedding/head shared)."""
    d = cfg.hidden_size
    if cfg.moe is None:
        ffn = swiglu_params(cfg, cfg.intermediate_size)
    else:
        experts = cfg.moe.n_routed_experts + cfg.moe.n_shared_experts
        ffn = experts * swiglu_params(cfg, cfg.moe.moe_intermediate_size) + router_params(cfg)
    return 2 * d + 2 * d * d + attention_params(cfg) + ffn + _layer_norms(cfg) + d


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count every parameter of `cfg`, by part."""
    d, vocab = cfg.hidden_size, cfg.vocab_size
    moe, n_moe = cfg.moe, cfg.num_moe_layers
    expert = swiglu_params(cfg, moe.moe_intermediate_size) if moe else 0
    return ParamCounts(
        embedding=vocab * d,
        head=0 if cfg.tie_word_embeddings else vocab * d,
        attention=cfg.num_layers * attention_params(cfg),
        dense_ffn=cfg.num_dense_layers * swiglu_params(cfg, cfg.intermediate_size),
        routed_experts=n_moe * moe.n_routed_experts * expert if moe else 0,
        shared_experts=n_moe * moe.n_shared_experts * expert if moe else 0,
        router=n_moe * router_params(cfg),
        norms=cfg.num_layers * _layer_norms(cfg) + d,
        activated_routed_experts=n_moe * moe.num_experts_per_tok * expert if moe else 0,
        mtp=cfg.mtp_depth * mtp_module_params(cfg),
    )
