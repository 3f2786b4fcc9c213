"""The attention the paper compares MLA against: MHA, GQA and MQA with a standard per-head K/V cache.

Same interface as `dsv3ref.mla.MLA`: forward(x [B, S, D], start_pos, cache, seqlens) -> [B, S, D], with
`new_cache` giving a `KVCache` of K and V for each of the num_kv_heads heads. Projections wq, wk, wv (with bias when
attention.qkv_bias, as Qwen2.5) and wo (no bias). RoPE rotates the whole head in the half (rotate_half) layout of
Llama/Qwen checkpoints in Hugging Face format, with the config's default, Llama-3 or YaRN frequencies.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.kv_cache import KVCache, Span, attend_heads
from dsv3ref.layers import check_hidden
from dsv3ref.rope import Rotary, softmax_scale


class Attention(nn.Module):
    """One MHA/GQA/MQA layer: query head h shares K/V head h // (num_heads / num_kv_heads)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        if a.kind == "mla":
            raise ConfigError("attention.kind: the baseline attention takes mha, gqa or mqa; use dsv3ref.mla.MLA "
                              "for 'mla'")
        self.cfg = cfg
        self.dim, self.head_dim = cfg.hidden_size, a.head_dim
        self.n_heads, self.n_kv_heads = a.num_heads, a.num_kv_heads
        self.wq = nn.Linear(self.dim, self.n_heads * self.head_dim, bias=a.qkv_bias)
        self.wk = nn.Linear(self.dim, self.n_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.wv = nn.Linear(self.dim, self.n_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, self.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        self.rotary = Rotary(cfg, layout="half")

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty K/V cache for this layer (dtype and device default to wq's weight)."""
        dtype = self.wq.weight.dtype if dtype is None else dtype
        device = self.wq.weight.device if device is None else device
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """As MLA.forward: one causal pass (cache=None) or append to the cache and attend over it."""
        check_hidden(x, self.dim, self.wq.weight.dtype)
        if cache is not None and not isinstance(cache, KVCache):
            raise ValueError(f"cache: expected a KVCache (see new_cache), got {type(cache).__name__}")
        bsz, seqlen, _ = x.shape
        span = Span.make(bsz, seqlen, start_pos, seqlens, self.cfg.max_seq_len, x.device)
        pos = span.uniform if span.uniform is not None else span.positions()
        q = self.rotary(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), pos)
        k = self.rotary(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim), pos)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        if cache is not None:
            cache.append(span, k, v)
        q = q.transpose(1, 2)  # [B, H, S, head_dim]
        outs = []
        for b, keys in enumerate(span.keys(cached=cache is not None)):
            if cache is None:
                k_b, v_b = k[b, :keys].transpose(0, 1), v[b, :keys].transpose(0, 1)  # [H_kv, T, head_dim]
            else:
                k_b, v_b = (t.to(q.dtype) for t in cache.row(b, keys))
            mask = span.causal_mask(b, keys, cached=cache is not None)
            outs.append(attend_heads(q[b], k_b, v_b, mask, self.softmax_scale))  # [H, S, head_dim]
        out = self.wo(torch.stack(outs).transpose(1, 2).flatten(2))
        if span.uniform is None:
            out = torch.where(span.query_valid()[..., None], out, 0)
        return out
