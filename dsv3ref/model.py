"""The assembled DeepSeek-V3-style Transformer: embed, blocks of (attn_norm, MLA, ffn_norm, FFN), norm, head.

State-dict names follow the official checkpoint (`embed`, `layers.{i}.attn_norm`, `.attn`, `.ffn_norm`, `.ffn`,
`norm`, `head`). Layers below `moe.first_k_dense_replace` (all layers without a MoE config) use the dense SwiGLU
MLP, the others DeepSeekMoE. Two ways to run it:

- `forward(tokens)`: one causal pass without a cache, the logits of every position (training and scoring);
  `hidden(tokens)` is the last block's output before the final norm.
- `extend(tokens, cache)`: cached inference. `new_cache` makes one cache per layer (MLA's latent cache in the
  absorbed mode, contiguous or paged, BF16 or FP8; per-head K/V in the naive mode); `extend` appends each row's
  tokens at that row's cached length and returns a `Step`: the hidden state before the final norm at every
  position (what MTP modules read) and the logits at each row's last token (or at every position). Prefill is
  `extend` on an empty cache, decode `extend` with one token per row, draft verification `extend` with several
  and `all_logits=True`; `ModelCache.rewind` drops rejected tokens. Rows may have different lengths: `seqlens`
  says how many of a row's tokens are real (right padding), and each row continues at its own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.fp8.inference import FP8Linear
from dsv3ref.fp8.quant import FP8
from dsv3ref.kv_cache import BLOCK_SIZE, CacheError, KVCache, LatentCache
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

    def forward(self, h: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | LatentCache | None = None,
                seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """h [B, S, D] at positions start_pos.. (MLA's arguments: see `dsv3ref.mla.MLA.forward`) -> [B, S, D]."""
        h = h + self.attn(self.attn_norm(h), start_pos, cache, seqlens)
        return h + self.ffn(self.ffn_norm(h))


class ModelCache:
    """The caches of every layer of one model (same rows and capacity); `lengths` [B] are the tokens each row holds.

    `rewind(lengths)` shortens rows in every layer (rejected draft tokens): attention reads a row's first `length`
    slots only, so the dropped tokens are never read again and the next `extend` overwrites them.
    """

    def __init__(self, layers: list[KVCache | LatentCache]) -> None:
        if not layers:
            raise CacheError("layers: expected one cache per layer, got none")
        self.layers = layers
        self.batch, self.max_len = layers[0].batch, layers[0].max_len

    @property
    def lengths(self) -> torch.Tensor:
        """[B] int64: tokens held per row."""
        return self.layers[0].lengths

    def rewind(self, lengths: int | torch.Tensor) -> None:
        """Shorten every row to `lengths` (an int or [B]); each must be <= the row's length."""
        for layer in self.layers:
            layer.rewind(lengths)

    def nbytes(self) -> int:
        """Payload bytes of every layer's cache."""
        return sum(c.nbytes() for c in self.layers)


@dataclass(frozen=True)
class Step:
    """What `Transformer.extend` returns.

    hidden: [B, S, D] the last block's output before the final norm, at every position (zero at padding).
    logits: [B, V] at each row's last real token (zero for a row without tokens), or [B, S, V] with all_logits
      (zero at padding).
    """

    hidden: torch.Tensor
    logits: torch.Tensor


class Transformer(nn.Module):
    """tokens [B, S] (int) -> logits [B, S, vocab], one causal pass (no cache; training and scoring).

    `attn_mode` is MLA's "absorbed" (default) or "naive"; `moe_backend` is how MoE layers run their routed
    experts ("auto", default; "loop", the reference; see `dsv3ref.backends`). Weights are initialised
    N(0, init_std) (linear, embedding, router), norms to one (built on the meta device: left uninitialised).
    """

    def __init__(self, cfg: ModelConfig, attn_mode: str = "absorbed", moe_backend: str = "auto",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if cfg.attention.kind != "mla":
            raise ConfigError(f"attention.kind: the DeepSeek-V3 model needs 'mla', got {cfg.attention.kind!r}")
        if not init_std > 0:
            raise ConfigError(f"init_std: expected a positive value, got {init_std!r}")
        self.cfg = cfg
        # an explicit (empty) weight skips nn.Embedding's own N(0, 1) init, replaced below anyway: on the meta
        # device that init imports torch._dynamo (seconds)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                  _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(i, cfg, attn_mode, moe_backend) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight
        for p in self.parameters():
            if p.dim() >= 2 and not p.is_meta:  # a meta model holds no values (and meta normal_ imports dynamo)
                nn.init.normal_(p, std=init_std)

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], *, attn_mode: str = "absorbed",
                        moe_backend: str = "auto", fp8_gemm: str = "dequant", dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> Transformer:
        """A model (eval mode) holding `state` by the official names, built on the meta device (no random
        initialisation; tensors are shared, not copied, unless `dtype` or `device` moves them). A linear weight
        stored in FP8 (float8_e4m3fn, with its 128x128 block scales as `{module}.scale`) makes that module an
        FP8Linear running `fp8_gemm`; with tied embeddings `head.weight` may be absent. Strict: torch's
        load_state_dict names missing and unexpected tensors."""
        with torch.device("meta"):
            model = cls(cfg, attn_mode=attn_mode, moe_backend=moe_backend)
            for name, t in state.items():
                if t.dtype == FP8 and name.endswith(".weight"):
                    parent, _, child = name.removesuffix(".weight").rpartition(".")
                    old = model.get_submodule(name.removesuffix(".weight"))
                    setattr(model.get_submodule(parent), child, FP8Linear(old.in_features, old.out_features, fp8_gemm))
        state = dict(state)
        if cfg.tie_word_embeddings and "embed.weight" in state:
            state.setdefault("head.weight", state["embed.weight"])
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.head.weight = model.embed.weight
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval()

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
        """The last block's output [B, S, D] (before the final norm), one causal pass without a cache."""
        self._check_tokens(tokens)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab] of every position (one causal pass, no cache)."""
        return self.logits(self.hidden(tokens))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """head(norm(hidden)): [..., D] -> [..., vocab]."""
        return self.head(self.norm(hidden))

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, paged: bool = False, fp8: bool = False,
                  block_size: int = BLOCK_SIZE) -> ModelCache:
        """Empty caches for every layer (see `MLA.new_cache`; paged and fp8 need the absorbed mode). max_len is
        capped at max_seq_len; dtype and device default to the model's."""
        if isinstance(max_len, int) and not isinstance(max_len, bool):
            max_len = min(max_len, self.cfg.max_seq_len)
        return ModelCache([layer.attn.new_cache(batch, max_len, dtype=dtype, device=device, paged=paged, fp8=fp8,
                                                block_size=block_size) for layer in self.layers])

    def extend(self, tokens: torch.Tensor, cache: ModelCache, seqlens: torch.Tensor | None = None,
               all_logits: bool = False) -> Step:
        """Append tokens [B, S] after each row's cached tokens and run them through every layer.

        seqlens [B] (optional): real tokens per row, the rest right padding (not cached); a row with 0 is left
        unchanged. Returns the hidden states and the logits (see `Step`).
        """
        start = self._check_extend(tokens, cache, seqlens)
        uniform = seqlens is None and bool((start == start[0]).all())
        pos: int | torch.Tensor = int(start[0]) if uniform else start
        h = self.embed(tokens)
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            h = layer(h, pos, layer_cache, seqlens)
        if seqlens is not None:
            valid = torch.arange(tokens.shape[1], device=h.device) < seqlens.to(h.device)[:, None]  # [B, S]
            h = torch.where(valid[..., None], h, 0)
        if all_logits:
            return Step(h, self.logits(h))
        last = (tokens.shape[1] if seqlens is None else seqlens.to(h.device)) - 1
        rows = torch.arange(tokens.shape[0], device=h.device)
        h_last = h[rows, torch.as_tensor(last, device=h.device).clamp(min=0)]  # [B, D]
        logits = self.logits(h_last)
        if seqlens is not None:
            logits = torch.where((seqlens.to(h.device) > 0)[:, None], logits, 0)
        return Step(h, logits)

    def _check_extend(self, tokens: torch.Tensor, cache: ModelCache, seqlens: torch.Tensor | None) -> torch.Tensor:
        """Validate an extend call; returns each row's start position [B] (a copy of the cached lengths)."""
        self._check_tokens(tokens)
        if not isinstance(cache, ModelCache) or len(cache.layers) != len(self.layers):
            raise ModelInputError(f"cache: expected a ModelCache of {len(self.layers)} layers (see new_cache), got "
                                  f"{type(cache).__name__}")
        if cache.batch != tokens.shape[0]:
            raise ModelInputError(f"tokens: expected {cache.batch} rows (the cache's batch), got {tokens.shape[0]}")
        start = cache.lengths.clone()
        lens = torch.full_like(start, tokens.shape[1]) if seqlens is None else seqlens.to(start.device)
        if seqlens is not None and (seqlens.dtype.is_floating_point or tuple(seqlens.shape) != (tokens.shape[0],)):
            raise ModelInputError(f"seqlens: expected an integer tensor of shape ({tokens.shape[0]},), got "
                                  f"{seqlens.dtype} {tuple(seqlens.shape)}")
        end = int((start + lens.clamp(min=0)).max())
        if end > self.cfg.max_seq_len:
            raise ModelInputError(f"tokens: expected cached + new tokens <= max_seq_len {self.cfg.max_seq_len} per "
                                  f"row, got {end}")
        return start

    def moe_layers(self) -> list[MoE]:
        """The model's MoE FFNs (for the routing bias update)."""
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]
