"""FLOPs per token: training (forward + backward) and inference forward at a given context length.

A matmul of an m x k by k x n costs 2mkn FLOP; the backward pass costs twice the forward (6 x params per token
for training). Attention adds the score and value products, which depend on how many keys a query sees.
"""

from __future__ import annotations

from dsv3ref.config import ConfigError, ModelConfig
from harness.analytic.params import param_counts

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
