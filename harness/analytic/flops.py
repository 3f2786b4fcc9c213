"""FLOPs per token: training (forward + backward) and inference forward at a given context length.

A matmul of an m x k by k x n costs 2mkn FLOP; the backward pass costs twice the forward (6 x params per token
for training). Attention adds the score and value products, which depend on how many keys a query sees.
"""

from __future__ import annotations

from dsv3ref.config import MLA_MODES, ConfigError, ModelConfig
from harness.analytic.kv_cache import dtype_bytes, kv_cache_bytes_per_token_layer
from harness.analytic.params import attention_params, param_counts, swiglu_params

TRAIN_METHODS = ("exact", "paper-table2")


def attention_core_flops(cfg: ModelConfig, context: float) -> float:
    """Forward FLOPs of Q.K^T and P.V for one query over `context` keys, all heads, one layer."""
    a = cfg.attention
    return 2 * context * a.num_heads * (a.qk_head_dim + a.v_dim)


def train_flops_per_token(cfg: ModelConfig, method: str = "exact", seq_len: int = 4096) -> float:
    """Training FLOPs per token.

    exact: 6 x activated non-embedding parameters (head included) + causal attention at `seq_len` (a query sees
      seq_len / 2 keys on average), times 3 for forward + backward.
    paper-table2: the convention that reproduces the paper's Table 2, which mixes two: its MoE rows follow
      `exact`; its dense rows follow 72 L d^2 + 6 V d (12 L d^2 parameters, the LM head, no attention term).
    """
    if seq_len <= 0:
        raise ConfigError(f"seq_len: expected a positive integer, got {seq_len!r}")
    if method == "paper-table2" and cfg.moe is None:
        return 72.0 * cfg.num_layers * cfg.hidden_size**2 + 6.0 * cfg.vocab_size * cfg.hidden_size
    if method not in TRAIN_METHODS:
        raise ConfigError(f"method: expected one of {', '.join(TRAIN_METHODS)}, got {method!r}")
    dense = 6.0 * param_counts(cfg).activated_non_embedding
    return dense + 3.0 * cfg.num_layers * attention_core_flops(cfg, seq_len / 2)


def fwd_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Inference forward FLOPs for one token that attends `context` cached keys (MLA in its naive per-head form)."""
    if context < 0:
        raise ConfigError(f"context: expected an integer >= 0, got {context!r}")
    return 2.0 * param_counts(cfg).activated_non_embedding + cfg.num_layers * attention_core_flops(cfg, context)


# --- One attention layer as executed: forward FLOPs (what FlopCounterMode counts) and decode bytes -------------


def attention_matrix_params(cfg: ModelConfig) -> int:
    """One attention layer's projection-matrix parameters (attention_params less norm weights and biases)."""
    a = cfg.attention
    if a.kind == "mla":
        return attention_params(cfg) - a.q_lora_rank - a.kv_lora_rank
    bias = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim if a.qkv_bias else 0
    return attention_params(cfg) - bias


def _check_counts(**counts: tuple[int, int]) -> None:
    for name, (value, low) in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")


def attention_projection_flops(cfg: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one attention layer's projections for `tokens` tokens: 2 x attention_matrix_params each (in
    absorbed MLA the W_UK / W_UV absorption costs per token exactly what the naive decompression through wkv_b
    does)."""
    _check_counts(tokens=(tokens, 0))
    return 2.0 * attention_matrix_params(cfg) * tokens


def attention_score_flops(cfg: ModelConfig, new_tokens: int, cached_tokens: int = 0, batch: int = 1,
                          mla_mode: str = "absorbed") -> float:
    """Matmul FLOPs of the scores and the weighted sum of one attention layer: each of `new_tokens` per sequence
    scores every key, keys = cached_tokens + new_tokens (entries hidden by the causal mask are computed too):
      MHA/GQA/MQA and naive MLA: attention_core_flops = 2 x keys x heads x (qk_head_dim + v_head_dim);
      absorbed MLA: 2 x keys x heads x (kv_lora_rank + qk_rope_head_dim + kv_lora_rank) (scores over [c; k_pe],
      values are c itself)."""
    _check_counts(new_tokens=(new_tokens, 1), cached_tokens=(cached_tokens, 0), batch=(batch, 1))
    if mla_mode not in MLA_MODES:
        raise ConfigError(f"mla_mode: expected one of {', '.join(MLA_MODES)}, got {mla_mode!r}")
    a, keys = cfg.attention, cached_tokens + new_tokens
    if a.kind == "mla" and mla_mode == "absorbed":
        per_token = 2.0 * keys * a.num_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
    else:
        per_token = attention_core_flops(cfg, keys)
    return batch * new_tokens * per_token


def attention_layer_fwd_flops(cfg: ModelConfig, new_tokens: int, cached_tokens: int = 0, batch: int = 1,
                              mla_mode: str = "absorbed") -> float:
    """Matmul FLOPs (2mnk per product, what FlopCounterMode counts) of one attention layer's forward over
    `new_tokens` per sequence appended after `cached_tokens`, for `batch` sequences: the projections
    (attention_projection_flops) plus the scores and weighted sum (attention_score_flops). Norms, RoPE, softmax
    and bias adds are not matmuls and are not counted."""
    scores = attention_score_flops(cfg, new_tokens, cached_tokens, batch, mla_mode)
    return attention_projection_flops(cfg, batch * new_tokens) + scores


def attention_weight_bytes(cfg: ModelConfig, dtype: str = "bf16") -> float:
    """Bytes of one attention layer's weights (attention_params, every one at `dtype`'s width)."""
    return attention_params(cfg) * dtype_bytes(dtype, "weight dtype")


def attention_cache_read_bytes(cfg: ModelConfig, context: int, batch: int = 1, mla_mode: str = "absorbed",
                               dtype: str = "bf16") -> float:
    """Cache bytes one decode step of one attention layer reads: per sequence, the rows of its context + 1 tokens
    (kv_cache_bytes_per_token_layer; the new token's row is written, then read)."""
    _check_counts(context=(context, 0), batch=(batch, 1))
    return batch * (context + 1) * kv_cache_bytes_per_token_layer(cfg.attention, dtype, mla_mode)


def attention_decode_bytes(cfg: ModelConfig, context: int, batch: int = 1, mla_mode: str = "absorbed",
                           dtype: str = "bf16") -> float:
    """Bytes one decode step of one attention layer reads at least: every weight once plus the cache rows."""
    return attention_weight_bytes(cfg, dtype) + attention_cache_read_bytes(cfg, context, batch, mla_mode, dtype)


# --- One DeepSeekMoE layer -------------------------------------------------------------------------------------
def moe_layer_fwd_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one DeepSeekMoE layer, matmuls only (what FlopCounterMode counts): the router
    logits (2 D E) plus three D x I matmuls for each of the k routed and the shared experts."""
    if cfg.moe is None:
        raise ConfigError(f"{cfg.name}: moe: a MoE layer needs a MoE config")
    m, d = cfg.moe, cfg.hidden_size
    return 2.0 * d * m.n_routed_experts + 6.0 * d * m.moe_intermediate_size * (m.num_experts_per_tok
                                                                               + m.n_shared_experts)


def moe_layer_fwd_bytes(cfg: ModelConfig, tokens: int, experts_hit: int, dtype: str = "bf16") -> float:
    """Bytes one forward of `tokens` tokens through a DeepSeekMoE layer moves at least: the router's weights, the
    three matrices of each of the `experts_hit` routed experts the batch selects and of the shared experts, once
    each, and the tokens' hidden vectors in and out."""
    if cfg.moe is None:
        raise ConfigError(f"{cfg.name}: moe: a MoE layer needs a MoE config")
    m, d = cfg.moe, cfg.hidden_size
    if not 0 <= experts_hit <= m.n_routed_experts:
        raise ConfigError(f"experts_hit: expected 0..{m.n_routed_experts}, got {experts_hit!r}")
    weights = d * m.n_routed_experts + 3 * d * m.moe_intermediate_size * (experts_hit + m.n_shared_experts)
    return float(dtype_bytes(dtype, "dtype") * (weights + 2 * tokens * d))


# --- the assembled model -------------------------------------------------------------------------------------
def model_fwd_flops(cfg: ModelConfig, new_tokens: int, cached_tokens: int = 0, batch: int = 1,
                    mla_mode: str = "absorbed", logits: str = "last") -> float:
    """Matmul FLOPs of one forward of the whole model (what FlopCounterMode counts): `new_tokens` per sequence
    after `cached_tokens`, for `batch` sequences. Every layer's attention (attention_layer_fwd_flops), the dense
    SwiGLU FFN of the first layers (2 x swiglu_params per token), the MoE layers (moe_layer_fwd_flops_per_token)
    and the head (2 V D) at each sequence's last position (`logits="last"`, cached decoding) or at every
    position ("all", a scoring pass)."""
    if logits not in ("last", "all"):
        raise ConfigError(f"logits: expected 'last' or 'all', got {logits!r}")
    tokens = batch * new_tokens
    total = cfg.num_layers * attention_layer_fwd_flops(cfg, new_tokens, cached_tokens, batch, mla_mode)
    total += cfg.num_dense_layers * 2.0 * swiglu_params(cfg, cfg.intermediate_size) * tokens
    if cfg.num_moe_layers:
        total += cfg.num_moe_layers * moe_layer_fwd_flops_per_token(cfg) * tokens
    return total + 2.0 * cfg.vocab_size * cfg.hidden_size * (tokens if logits == "all" else batch)


# --- GEMMs, quantizers and tiled number formats ----------------------------------------------------------------
def gemm_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an [M, K] x [K, N] matmul: 2 M N K (a multiply and an add per product)."""
    return 2.0 * m * n * k


def fp8_quant_bytes(numel: int, input_bytes: int, scales: int) -> float:
    """Bytes a quantizer moves at least: the input read once (input_bytes per element), one FP8 byte written per
    element and one fp32 scale per tile."""
    return float(numel * (input_bytes + 1) + 4 * scales)


def tiled_format_bits(element_bits: int, metadata_bits_per_tile: int, tile: int = 128) -> float:
    """Bits per element of a per-tile format: the element's bits plus its share of the tile's metadata (E4M3:
    8 + 32/128 for one fp32 scale; LogFMT-n: n + 64/128 for the tile's fp32 min and step)."""
    return element_bits + metadata_bits_per_tile / tile
