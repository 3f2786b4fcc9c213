"""Multi-head Latent Attention (DeepSeek-V2/V3) with the official checkpoint's module names.

The query goes through a low-rank bottleneck (wq_a -> q_norm -> wq_b; a single wq when q_lora_rank == 0). Keys
and values come from one compressed latent c = kv_norm(wkv_a(x)[:kv_lora_rank]) plus a shared RoPE key k_pe,
decompressed per head by wkv_b = [W_UK; W_UV] (per head: qk_nope_head_dim rows of keys, v_head_dim of values).
Two execution modes over the same weights:

- "naive": decompress c into per-head K = [W_UK c ; k_pe] and V = W_UV c, cache those (the MHA-sized cache);
- "absorbed": fold W_UK into the query (q~ = q_nope W_UK) and W_UV into the output, so that attention runs over
  the latent itself; the cache holds only c and k_pe ((kv_lora_rank + rope) elements per token).

Batches of sequences of different lengths: pass `start_pos` as a [B] tensor (each row's first position, e.g.
`cache.lengths` for the next decode step) and `seqlens` [B] (valid tokens of each row of x; the rest is right
padding). Padding tokens are not cached and their output rows are zero. NaN/Inf in one row's input stays in that
row (its output and cache slots); other rows are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3ref.config import MLA_MODES, ConfigError, ModelConfig
from dsv3ref.fp8.inference import dense_weight
from dsv3ref.kv_cache import BLOCK_SIZE, KVCache, LatentCache, PagedLatentCache, Span, attend_heads, masked_softmax
from dsv3ref.layers import RMSNorm, check_hidden
from dsv3ref.rope import Rotary, softmax_scale


class MLA(nn.Module):
    """One MLA layer: forward(x [B, S, D], start_pos, cache, seqlens) -> [B, S, D]."""

    def __init__(self, cfg: ModelConfig, mode: str = "absorbed") -> None:
        super().__init__()
        a = cfg.attention
        if a.kind != "mla":
            raise ConfigError(f"attention.kind: MLA needs kind 'mla', got {a.kind!r}")
        if mode not in MLA_MODES:
            raise ValueError(f"mode: expected one of {', '.join(MLA_MODES)}, got {mode!r}")
        self.cfg, self.mode = cfg, mode
        self.dim, self.n_heads = cfg.hidden_size, a.num_heads
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = a.qk_nope_head_dim, a.qk_rope_head_dim
        self.qk_head_dim, self.v_head_dim = a.qk_head_dim, a.v_head_dim
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(self.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(self.dim, self.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim),
                               bias=False)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, self.dim, bias=False)
        self.softmax_scale = softmax_scale(cfg)
        self.rotary = Rotary(cfg)
        self._absorbed_key: tuple | None = None  # what _absorbed_cache was made from
        self._absorbed_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, paged: bool = False, fp8: bool = False,
                  block_size: int = BLOCK_SIZE, num_blocks: int | None = None,
                  block_table: torch.Tensor | None = None, poison: bool = True) -> KVCache | LatentCache:
        """An empty cache for this layer's mode: per-head KVCache (naive) or the latent cache (absorbed; paged and
        fp8 options). dtype and device default to those of kv_norm's weight."""
        dtype = self.kv_norm.weight.dtype if dtype is None else dtype
        device = self.kv_norm.weight.device if device is None else device
        if self.mode == "naive":
            if paged or fp8:
                raise ValueError("paged/fp8: these are latent-cache options; mode 'naive' caches per-head K/V")
            return KVCache(batch, max_len, self.n_heads, self.qk_head_dim, self.v_head_dim, dtype, device)
        if paged:
            return PagedLatentCache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype, device, fp8,
                                    block_size, num_blocks, block_table, poison)
        return LatentCache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, dtype, device, fp8)

    def forward(self, x: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: KVCache | LatentCache | None = None, seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Attend x's tokens at positions start_pos.. to themselves (cache=None: one causal pass, nothing stored,
        differentiable) or to everything cached before them (the tokens are appended first)."""
        span = self._span(x, start_pos, cache, seqlens)
        bsz, seqlen, _ = x.shape
        pos = span.uniform if span.uniform is not None else span.positions()
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = self.rotary(q_pe, pos)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_norm(kv)
        k_pe = self.rotary(k_pe.unsqueeze(2), pos).squeeze(2)  # one shared key head: [B, S, rope]
        attend = self._naive if self.mode == "naive" else self._absorbed
        out = self.wo(attend(q_nope, q_pe, kv, k_pe, span, cache).flatten(2))
        if span.uniform is None:
            out = torch.where(span.query_valid()[..., None], out, 0)
        return out

    def _span(self, x: torch.Tensor, start_pos: int | torch.Tensor, cache: KVCache | LatentCache | None,
              seqlens: torch.Tensor | None) -> Span:
        check_hidden(x, self.dim, self.kv_norm.weight.dtype)
        wanted = KVCache if self.mode == "naive" else LatentCache
        if cache is not None and not isinstance(cache, wanted):
            raise ValueError(f"cache: mode {self.mode!r} needs a {wanted.__name__} (see new_cache), "
                             f"got {type(cache).__name__}")
        return Span.make(x.shape[0], x.shape[1], start_pos, seqlens, self.cfg.max_seq_len, x.device)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor, span: Span,
               cache: KVCache | None) -> torch.Tensor:
        """Per-head attention over decompressed K/V; returns [B, S, H, v_head_dim]."""
        bsz, seqlen, heads, _ = q_nope.shape
        k_nope, v = self.wkv_b(kv).view(bsz, seqlen, heads, -1).split([self.qk_nope_head_dim, self.v_head_dim],
                                                                       dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, heads, -1)], dim=-1)  # [B, S, H, qk_head_dim]
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, qk_head_dim]
        if cache is not None:
            cache.append(span, k, v)
        outs = []
        for b, keys in enumerate(span.keys(cached=cache is not None)):
            if cache is None:
                k_b, v_b = k[b, :keys].transpose(0, 1), v[b, :keys].transpose(0, 1)  # [H, T, *]
            else:
                k_b, v_b = (t.to(q.dtype) for t in cache.row(b, keys))
            mask = span.causal_mask(b, keys, cached=cache is not None)
            outs.append(attend_heads(q[b], k_b, v_b, mask, self.softmax_scale))  # [H, S, v_head_dim]
        return torch.stack(outs).transpose(1, 2)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                  span: Span, cache: LatentCache | None) -> torch.Tensor:
        """Attention over the latent with W_UK folded into the query and W_UV applied after; [B, S, H, v_dim]."""
        bsz, seqlen, heads, _ = q_nope.shape
        w_uk, w_uv = self._absorbed_weights()  # [H, nope, rank], [H, v_head_dim, rank]
        q_nope = q_nope.permute(2, 0, 1, 3).reshape(heads, bsz * seqlen, -1)
        q_lat = torch.bmm(q_nope, w_uk).view(heads, bsz, seqlen, -1).permute(1, 2, 0, 3)  # [B, S, H, rank]
        if cache is not None:
            cache.append(span, kv, k_pe)
        outs = []
        for b, keys in enumerate(span.keys(cached=cache is not None)):
            if cache is None:
                kv_b, pe_b = kv[b, :keys], k_pe[b, :keys]  # [T, rank], [T, rope]
            else:
                kv_b, pe_b = (t.to(q_lat.dtype) for t in cache.row(b, keys))
            scores = (q_lat[b].reshape(seqlen * heads, -1) @ kv_b.T
                      + q_pe[b].reshape(seqlen * heads, -1) @ pe_b.T) * self.softmax_scale  # [S*H, T]
            mask = span.causal_mask(b, keys, cached=cache is not None)
            probs = masked_softmax(scores.view(seqlen, heads, keys), None if mask is None else mask[:, None],
                                   q_lat.dtype)
            outs.append(probs.view(seqlen * heads, keys) @ kv_b)  # [S*H, rank]
        o_lat = torch.stack(outs).view(bsz * seqlen, heads, -1).transpose(0, 1)  # [H, B*S, rank]
        out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # [H, B*S, v_head_dim]
        return out.transpose(0, 1).reshape(bsz, seqlen, heads, self.v_head_dim)

    def _absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, rank] and W_UV [H, v_head_dim, rank] from wkv_b.weight.

        Under autograd these are views of the weight. Otherwise they are contiguous copies, made once and redone
        whenever the weight changes (its storage or version; an inference-mode weight is taken as unchanged while
        its storage is), because CPU BLAS copies a strided slice on every batched matmul. An FP8-stored wkv_b
        (`dsv3ref.fp8.inference.FP8Linear`) is dequantized into the layer's dtype, as the official code does.
        """
        w = self.wkv_b.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return self._split_wkv_b(w)
        version = -1 if w.is_inference() else w._version  # inference tensors keep no version counter
        key = (w.data_ptr(), version, w.dtype, w.device)
        if self._absorbed_key != key:
            w_uk, w_uv = self._split_wkv_b(dense_weight(self.wkv_b, self.kv_norm.weight.dtype))
            self._absorbed_cache = (w_uk.detach().contiguous(), w_uv.detach().contiguous())
            self._absorbed_key = key
        return self._absorbed_cache

    def _split_wkv_b(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        view = w.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return view[:, : self.qk_nope_head_dim], view[:, self.qk_nope_head_dim:]
