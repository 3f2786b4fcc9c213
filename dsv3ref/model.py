"""The assembled DeepSeek-V3-style Transformer: embed, blocks of (attn_norm, MLA, ffn_norm, FFN), norm, head.

State-dict names follow the official checkpoint (`embed`, `layers.{i}.attn_norm`, `.attn`, `.ffn_norm`, `.ffn`,
`norm`, `head`). Layers below `moe.first_k_dense_replace` (all layers without a MoE config) use the dense SwiGLU
MLP, the others DeepSeekMoE. Unlike the official inference code, `forward` returns the logits of every position
(training needs them); `hidden` returns the last block's output before the final norm (what MTP modules read).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.layers import MLP, RMSNorm
from dsv3ref.mla import MLA
from dsv3ref.moe import MoE


class ModelInputError(ValueError):
    """Bad token input to the model; the message names the argument and what was expected."""


class Block(nn.Module):
    """Pre-norm residual block: h + attn(attn_norm(h)), then + ffn(ffn_norm(h))."""

    def __init__(self, layer_id: int, cfg: ModelConfig, attn_mode: str = "absorbed",
                 moe_backend: str = "auto") -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, mode=attn_mode)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg, backend=moe_backend) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size,
                                                                                   cfg.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h))
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens [B, S] (int) -> logits [B, S, vocab], one causal pass (no cache; training and scoring).

    `attn_mode` is MLA's "absorbed" (default) or "naive"; `moe_backend` is how MoE layers run their routed
    experts ("auto", default; "loop", the reference; see `dsv3ref.backends`). Weights are initialised
    N(0, init_std) (linear, embedding, router), norms to one.
    """

    def __init__(self, cfg: ModelConfig, attn_mode: str = "absorbed", moe_backend: str = "auto",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if cfg.attention.kind != "mla":
            raise ConfigError(f"attention.kind: the DeepSeek-V3 model needs 'mla', got {cfg.attention.kind!r}")
        if not init_std > 0:
            raise ConfigError(f"init_std: expected a positive value, got {init_std!r}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(i, cfg, attn_mode, moe_backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=init_std)

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ModelInputError(f"tokens: expected an integer tensor [batch, seq_len], got {got}")
        if tokens.numel() == 0:
            raise ModelInputError(f"tokens: expected at least one token, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ModelInputError(f"tokens: expected seq_len <= max_seq_len {self.cfg.max_seq_len}, "
                                  f"got {tokens.shape[1]}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.cfg.vocab_size:
            raise ModelInputError(f"tokens: expected ids in [0, {self.cfg.vocab_size}), got [{low}, {high}]")

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, S, D] (before the final norm)."""
        self._check_tokens(tokens)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.hidden(tokens)))

    def moe_layers(self) -> list[MoE]:
        """The model's MoE FFNs (for the routing bias update)."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]
