"""Model conformance cases: random float64 weights of a whole DeepSeek-V3 model by the official names, token ids,
and the float64 ground truth (the model written out from its weights alone: explicit per-head MLA, DeepSeekMoE with
every expert run on every token and weighted by a dense routing matrix, RMSNorm and the head), which can also run in
a low-precision dtype as the plain reference of the flash-attention rule."""

from __future__ import annotations

import math

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.model import Transformer
from dsv3ref.rope import rope_frequencies, softmax_scale

State = dict[str, torch.Tensor]
IMPORTS = ("import torch", "from harness.cases.model import ModelTruth, model_state, model_tokens, model_weights")


def model_weights(cfg: ModelConfig, seed: int) -> State:
    """float64 weights by official names: matrices N(0, 1/fan_in) (the embedding N(0, 1)), norms 1 + N(0, 0.2^2),
    routing biases N(0, 0.1^2) rounded to fp32 (the bias is an fp32 tensor in every implementation)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if name.endswith("gate.bias"):
            out[name] = (0.1 * t).float().double()
        elif len(shape) == 1:
            out[name] = 1 + 0.2 * t
        else:
            out[name] = t if name == "embed.weight" else t / math.sqrt(shape[-1])
    return out


def model_tokens(cfg: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids [batch, length] in [0, vocab), from `seed`."""
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed + 1))


class ModelTruth:
    """The model's logits from its weights, written out (see the module docstring), in `dtype` (softmax in fp32 or
    fp64, RoPE angles in fp64); `margin` is the smallest routing gap met (top-k and group choices)."""

    def __init__(self, cfg: ModelConfig, w: State, dtype: torch.dtype = torch.float64) -> None:
        self.cfg, self.dtype = cfg, dtype
        self.w = {k: v.to(dtype) for k, v in w.items()}
        self.margin = math.inf

    def rms(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        vf = v.double()
        return (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)).to(self.dtype) * weight

    def rope(self, v: torch.Tensor) -> torch.Tensor:  # v [B, S, ..., d], adjacent pairs are complex numbers
        seqlen = v.shape[1]
        angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), rope_frequencies(self.cfg))
        turn = torch.polar(torch.ones_like(angles), angles).view(1, seqlen, *([1] * (v.dim() - 3)), -1)
        pairs = torch.view_as_complex(v.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * turn).flatten(-2).to(self.dtype)

    def attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        a, w = self.cfg.attention, self.w
        bsz, seqlen, _ = x.shape
        q = x @ w[p + "wq.weight"].T if a.q_lora_rank == 0 else \
            self.rms(x @ w[p + "wq_a.weight"].T, w[p + "q_norm.weight"]) @ w[p + "wq_b.weight"].T
        q = q.view(bsz, seqlen, a.num_heads, a.qk_head_dim)
        q = torch.cat([q[..., : a.qk_nope_head_dim], self.rope(q[..., a.qk_nope_head_dim:])], -1)
        kv = x @ w[p + "wkv_a.weight"].T
        c, k_pe = self.rms(kv[..., : a.kv_lora_rank], w[p + "kv_norm.weight"]), self.rope(kv[..., a.kv_lora_rank:])
        kvb = (c @ w[p + "wkv_b.weight"].T).view(bsz, seqlen, a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
        k = torch.cat([kvb[..., : a.qk_nope_head_dim], k_pe[:, :, None].expand(-1, -1, a.num_heads, -1)], -1)
        scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale(self.cfg)
        scores = scores.masked_fill(~torch.ones(seqlen, seqlen, dtype=torch.bool).tril(), float("-inf"))
        probs = scores.softmax(-1, dtype=torch.promote_types(self.dtype, torch.float32)).to(self.dtype)
        out = torch.einsum("bhst,bthd->bshd", probs, kvb[..., a.qk_nope_head_dim:]).flatten(2)
        return out @ w[p + "wo.weight"].T

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        w = self.w
        gate, up = x @ w[p + "w1.weight"].T, x @ w[p + "w3.weight"].T
        return (torch.nn.functional.silu(gate) * up) @ w[p + "w2.weight"].T

    def _gap(self, sorted_desc: torch.Tensor, k: int) -> None:
        """Record the smallest gap between the k-th and (k+1)-th values of rows sorted in descending order."""
        if k < sorted_desc.shape[-1]:
            gap = sorted_desc[:, k - 1] - sorted_desc[:, k]
            gap = gap[torch.isfinite(gap)]  # the (k+1)-th of a row may be a masked -inf: no tie there
            if gap.numel():
                self.margin = min(self.margin, float(gap.min()))

    def moe(self, x: torch.Tensor, p: str) -> torch.Tensor:
        m, w = self.cfg.moe, self.w
        flat = x.reshape(-1, x.shape[-1])
        scores = (flat @ w[p + "gate.weight"].T).sigmoid()
        biased = scores + w[p + "gate.bias"]
        per = m.n_routed_experts // m.n_group
        group_score = biased.view(-1, m.n_group, per).topk(min(2, per), dim=-1).values.sum(-1)
        self._gap(group_score.sort(-1, descending=True).values, m.topk_group)
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, group_score.topk(m.topk_group).indices,
                                                                          False)
        biased = biased.masked_fill(dropped.repeat_interleave(per, dim=1), float("-inf"))
        self._gap(biased.sort(-1, descending=True).values, m.num_experts_per_tok)
        chosen = biased.topk(m.num_experts_per_tok).indices
        weights = scores.gather(1, chosen)
        weights = weights / weights.sum(-1, keepdim=True) * m.route_scale
        routing = torch.zeros_like(scores).scatter(1, chosen, weights)  # [N, E], zero for experts not chosen
        y = self.mlp(flat, p + "shared_experts.")
        for e in range(m.n_routed_experts):
            y = y + routing[:, e: e + 1] * self.mlp(flat, f"{p}experts.{e}.")
        return y.view_as(x)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, w = self.cfg, self.w
        h = w["embed.weight"][tokens]
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            h = h + self.attention(self.rms(h, w[p + "attn_norm.weight"]), p + "attn.")
            ffn = self.moe if cfg.is_moe_layer(i) else self.mlp
            h = h + ffn(self.rms(h, w[p + "ffn_norm.weight"]), p + "ffn.")
        return self.rms(h, w["norm.weight"]) @ w["head.weight"].T


def model_state(w: State, dtype: torch.dtype) -> State:
    """Weights as an implementation receives them in `dtype` (the routing biases stay fp32 below float64)."""
    return {k: v.float() if k.endswith("gate.bias") and dtype != torch.float64 else v.to(dtype) for k, v in w.items()}
