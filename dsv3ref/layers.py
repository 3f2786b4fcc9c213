"""Shared building blocks: RMSNorm, the SwiGLU MLP (state-dict names as in the official checkpoint) and the input
check of every attention layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, normalised in fp32 inside `F.rms_norm` (eps 1e-6 as in DeepSeek-V3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up (* scale), in place on `gate` when no gradient is recorded (saves a pass per product)."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        out = F.silu(gate) * up
        return out if scale is None else out * scale
    out = F.silu(gate, inplace=True).mul_(up)
    return out if scale is None else out.mul_(scale)


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x); dense layers, each expert and the shared experts use it."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


def check_hidden(x: torch.Tensor, dim: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless x is a [batch >= 1, seq_len >= 1, dim] tensor of `dtype` (the layer's)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor of shape [batch, seq_len, {dim}], got {got}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x: expected at least one sequence and one token, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"x: expected dtype {dtype} (the layer's), got {x.dtype}")
