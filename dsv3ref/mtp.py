"""Multi-Token Prediction (DeepSeek-V3 §2.2): D sequential modules after the main model, each predicting one more
token ahead, sharing the main model's embedding and output head.

Module k (1-based) at position i reads the previous depth's hidden state h^{k-1}_i (h^0: the main model's last
block output, before the final norm) and the embedding of token t_{i+k}:
    h'^k_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])      (embedding first, as the released weights)
    h^k_i  = TRM_k(h'^k_i)                                         (one pre-norm block: MLA + the last layer's FFN)
    P^k    = softmax(head(norm_k(h^k_i)))                          predicts t_{i+k+1}
Over a window of T inputs t_0..t_{T-1} and targets t_1..t_T, depth k has inputs at positions 0..T-k-1 only (the
last k positions have no token t_{i+k} inside the window: masked), labels t_{k+1}..t_T, and
    L_k = -(1/T) Σ_{i=0}^{T-k-1} log P^k_i[t_{i+k+1}],   L_MTP = (λ/D) Σ_k L_k
(the paper's normalisation by T; Megatron divides by the T-k unmasked positions instead). Attention is causal,
so running the T-k positions alone equals running all T and masking the last k.

State-dict names are those of `dsv3ref.checkpoint` (`mtp.{k}.enorm`, `.hnorm`, `.eh_proj`, the block's
`attn_norm`, `attn.*`, `ffn_norm`, `ffn.*`, `norm`; the checkpoint also stores copies of the shared `embed` and
`head`, which must equal the main model's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.kv_cache import BLOCK_SIZE
from dsv3ref.layers import RMSNorm
from dsv3ref.model import Block, ModelCache, Transformer

SHARED = ("embed.weight", "head.weight")  # stored per MTP module in a checkpoint, shared with the main model


class MTPError(ValueError):
    """A bad MTP argument or state; the message names it and what was expected."""


class MTPLayer(Block):
    """One MTP module: enorm, hnorm, eh_proj [D, 2D], a Block (MLA + the main model's last-layer FFN), norm."""

    def __init__(self, cfg: ModelConfig, attn_mode: str = "absorbed", moe_backend: str = "auto") -> None:
        super().__init__(cfg.num_layers - 1, cfg, attn_mode, moe_backend)
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, start_pos: int | torch.Tensor = 0,
                cache: object = None, seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """h_prev, emb [B, S, D] at positions start_pos.. -> h^k [B, S, D] (before `norm`)."""
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return super().forward(h, start_pos, cache, seqlens)


class MTP(nn.Module):
    """The D = cfg.mtp_depth modules; the shared embedding and head are the main model's (passed to each call)."""

    def __init__(self, cfg: ModelConfig, attn_mode: str = "absorbed", moe_backend: str = "auto",
                 init_std: float = 0.02) -> None:
        super().__init__()
        if cfg.mtp_depth < 1:
            raise MTPError(f"mtp_depth: expected >= 1 for MTP modules, got {cfg.mtp_depth} ({cfg.name})")
        self.cfg = cfg
        self.layers = nn.ModuleList(MTPLayer(cfg, attn_mode, moe_backend) for _ in range(cfg.mtp_depth))
        for p in self.parameters():
            if p.dim() >= 2 and not p.is_meta:
                nn.init.normal_(p, std=init_std)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def logits(self, model: Transformer, k: int, h: torch.Tensor) -> torch.Tensor:
        """Module k's (0-based) logits: the shared head of its own final norm, [..., D] -> [..., vocab]."""
        return model.head(self.layers[k].norm(h))

    def hidden_states(self, model: Transformer, h0: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each depth's hidden states, one causal pass without a cache.

        h0 [B, T, D]: the main model's hidden states of `tokens` [B, T]. Depth k (1-based) returns [B, T - k, D]:
        positions 0..T-k-1, fed the tokens t_{i+k} (the last k positions have none: masked)."""
        t = h0.shape[1]
        check_depth(self.depth, t)
        out, h = [], h0
        for k, layer in enumerate(self.layers, start=1):
            h = layer(h[:, : t - k], model.embed(tokens[:, k: t]))
            out.append(h)
        return out

    @classmethod
    def from_state_dict(cls, model: Transformer, state: dict[str, torch.Tensor], *, attn_mode: str = "absorbed",
                        moe_backend: str = "auto") -> MTP:
        """The modules (eval mode, on the main model's device and dtype) from tensors by checkpoint names
        (`mtp.{k}.…`, as `load_checkpoint(...).mtp`); the stored embed/head copies must equal the main model's."""
        cfg = model.cfg
        if not state:
            raise MTPError(f"mtp: the checkpoint of {cfg.name} holds no MTP weights (mtp.{{k}}.*); speculative "
                           "decoding and the MTP loss need them")
        ref = {"embed.weight": model.embed.weight, "head.weight": model.head.weight}
        own: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            parts = name.split(".")
            if parts[0] != "mtp" or len(parts) < 3 or not parts[1].isdigit():
                raise MTPError(f"mtp: expected tensor names mtp.{{k}}.…, got {name!r}")
            rest = ".".join(parts[2:])
            if rest in SHARED:
                if t.shape != ref[rest].shape or not torch.equal(t.to(ref[rest]), ref[rest].detach()):
                    raise MTPError(f"{name}: expected the main model's shared {rest} (MTP shares it), got a "
                                   "different tensor")
                continue
            own[f"layers.{parts[1]}.{rest}"] = t
        with torch.device("meta"):
            mtp = cls(cfg, attn_mode, moe_backend)
        try:
            mtp.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as e:
            raise MTPError(f"mtp: the tensors do not match {cfg.name}'s {cfg.mtp_depth} MTP module(s): "
                           f"{str(e).splitlines()[0]} {', '.join(str(e).splitlines()[1:3])}") from None
        w = model.embed.weight
        return mtp.to(device=w.device, dtype=w.dtype).eval()

    def checkpoint_state(self, model: Transformer) -> dict[str, torch.Tensor]:
        """Tensors by checkpoint names (`save_checkpoint(model, path, mtp=...)`), with the shared embed/head."""
        out = {}
        for name, t in self.state_dict().items():
            _, k, rest = name.split(".", 2)
            out[f"mtp.{k}.{rest}"] = t.detach()
        for k in range(self.depth):
            out[f"mtp.{k}.embed.weight"] = model.embed.weight.detach()
            out[f"mtp.{k}.head.weight"] = model.head.weight.detach()
        return out

    def new_caches(self, batch: int, max_len: int, *, paged: bool = False,
                   block_size: int = BLOCK_SIZE) -> list[ModelCache]:
        """One single-layer cache per module (MLA's, as the main model's; see Transformer.new_cache)."""
        max_len = min(max_len, self.cfg.max_seq_len)
        return [ModelCache([layer.attn.new_cache(batch, max_len, paged=paged, block_size=block_size)])
                for layer in self.layers]


def check_depth(depth: int, seq_len: int) -> None:
    """MTP depth D needs windows of more than D inputs (depth k keeps T - k positions)."""
    if depth >= seq_len:
        raise MTPError(f"mtp_depth: expected < the sequence length {seq_len} (depth k predicts from T - k "
                       f"positions), got {depth}")


def mtp_labels(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Depth k's (1-based) labels [B, T - k] from next-token targets [B, T] (t_1..t_T): t_{i+k+1} at position i."""
    return targets[:, k:]


@dataclass(frozen=True)
class MTPLosses:
    """The main next-token loss, each depth's L_k, and the total main + (λ/D) Σ L_k."""

    main: torch.Tensor
    depths: list[torch.Tensor]
    total: torch.Tensor


def mtp_losses(model: Transformer, mtp: MTP, inputs: torch.Tensor, targets: torch.Tensor,
               lam: float) -> MTPLosses:
    """The training loss of a window: inputs [B, T] (t_0..t_{T-1}), targets [B, T] (t_1..t_T)."""
    if inputs.shape != targets.shape or inputs.dim() != 2:
        raise MTPError(f"targets: expected the shape of inputs {tuple(inputs.shape)}, got {tuple(targets.shape)}")
    b, t = inputs.shape
    check_depth(mtp.depth, t)
    h0 = model.hidden(inputs)
    main = F.cross_entropy(_at_least_fp32(model.logits(h0)).flatten(0, 1), targets.flatten())
    depths = []
    for k, h in enumerate(mtp.hidden_states(model, h0, inputs), start=1):
        logits = _at_least_fp32(mtp.logits(model, k - 1, h))  # [B, T - k, V]
        nll = F.cross_entropy(logits.flatten(0, 1), mtp_labels(targets, k).flatten(), reduction="sum")
        depths.append(nll / (b * t))  # the paper's 1/T (per sequence), averaged over the batch
    return MTPLosses(main, depths, main + lam / mtp.depth * torch.stack(depths).sum())


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in fp32 for BF16 logits, in float64 for float64 ones."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MTPModel(nn.Module):
    """The main model and its MTP modules as one module for training (one optimizer, every MoE's bias update)."""

    def __init__(self, model: Transformer, mtp: MTP) -> None:
        super().__init__()
        self.model, self.mtp = model, mtp

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The main model's logits [B, S, V] (scoring as a plain model)."""
        return self.model(tokens)


def mtp_loss_fn(lam: float) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `dsv3ref.train` loss function for an MTPModel: main + (λ/D) Σ L_k."""
    if not lam >= 0:
        raise MTPError(f"mtp_lambda: expected a value >= 0, got {lam!r}")

    def loss(m: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(m, MTPModel):
            raise MTPError(f"model: expected an MTPModel for the MTP loss, got {type(m).__name__}")
        return mtp_losses(m.model, m.mtp, inputs, targets, lam).total

    return loss
