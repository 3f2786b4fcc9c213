"""MLA conformance cases: random float64 weights by the official names, inputs, and the float64 ground truth (MLA
written out per head from the weights alone: explicit K = [W_UK c ; RoPE(k_pe)] and V = W_UV c, complex-pair
RoPE, a causal softmax), which can also run in a low-precision dtype as the plain reference of the
flash-attention rule."""

from __future__ import annotations

import math

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.mla import MLA
from dsv3ref.rope import rope_frequencies, softmax_scale

State = dict[str, torch.Tensor]
IMPORTS = ("import torch", "from harness.cases.mla import mla_inputs, mla_truth, mla_weights")


def mla_weights(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float64) -> State:
    """Weights by official names: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2), drawn in float64 and
    rounded to `dtype` (returned in float64, so the ground truth sees exactly what the implementation gets)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MLA(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    weights = {k: (torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(s[-1]) if len(s) == 2
                   else 1 + 0.2 * torch.randn(s, generator=g, dtype=torch.float64)) for k, s in shapes.items()}
    return {k: v.to(dtype).double() for k, v in weights.items()}


def mla_inputs(cfg: ModelConfig, batch: int, length: int, seed: int,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x [batch, length, D], N(0, 1), rounded to `dtype` and returned in float64."""
    x = torch.randn(batch, length, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1),
                    dtype=torch.float64)
    return x.to(dtype).double()


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """Round each token (last dim) to float8 e4m3 with the scale amax / 448, back in v's dtype."""
    scale = v.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    return (v / scale).float().to(torch.float8_e4m3fn).to(v.dtype) * scale


def mla_truth(cfg: ModelConfig, w: State, x: torch.Tensor, start: int = 0, dtype: torch.dtype = torch.float64,
              latent_fp8: bool = False) -> torch.Tensor:
    """MLA over x's tokens at positions start.. (causal among themselves), per head, in `dtype` (softmax in fp32
    or fp64): the fp64 truth, or run in a working dtype, the plain low-precision reference; latent_fp8 rounds
    the latent c per token to e4m3 (what an FP8 latent cache stores). Returns [B, S, D] in `dtype`."""
    a = cfg.attention
    w = {k: v.to(dtype) for k, v in w.items()}
    x = x.to(dtype)
    bsz, seqlen, _ = x.shape

    def rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        vf = v.double()
        return (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(dtype) * weight

    def rope(v: torch.Tensor) -> torch.Tensor:  # v [B, S, ..., d]: adjacent pairs are complex numbers
        angles = torch.outer(torch.arange(start, start + seqlen, dtype=torch.float64), rope_frequencies(cfg))
        turn = torch.polar(torch.ones_like(angles), angles).view(1, seqlen, *([1] * (v.dim() - 3)), -1)
        pairs = torch.view_as_complex(v.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * turn).flatten(-2).to(dtype)

    if a.q_lora_rank == 0:
        q = x @ w["wq.weight"].T
    else:
        q = rms(x @ w["wq_a.weight"].T, w["q_norm.weight"]) @ w["wq_b.weight"].T
    q = q.view(bsz, seqlen, a.num_heads, a.qk_head_dim)
    q = torch.cat([q[..., : a.qk_nope_head_dim], rope(q[..., a.qk_nope_head_dim:])], -1)
    kv = x @ w["wkv_a.weight"].T
    c, k_pe = rms(kv[..., : a.kv_lora_rank], w["kv_norm.weight"]), rope(kv[..., a.kv_lora_rank:])
    if latent_fp8:
        c = fp8_round(c)
    kvb = (c @ w["wkv_b.weight"].T).view(bsz, seqlen, a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
    k = torch.cat([kvb[..., : a.qk_nope_head_dim], k_pe[:, :, None].expand(-1, -1, a.num_heads, -1)], -1)
    v = kvb[..., a.qk_nope_head_dim:]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale(cfg)
    scores = scores.masked_fill(~torch.ones(seqlen, seqlen, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
    return torch.einsum("bhst,bthd->bshd", probs, v).flatten(2) @ w["wo.weight"].T
