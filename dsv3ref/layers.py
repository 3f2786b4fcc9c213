"""Shared building blocks: RMSNorm and the SwiGLU MLP (state-dict names as in the official checkpoint)."""

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
