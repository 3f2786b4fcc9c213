"""Broken expert-parallel dispatch/combine: dsv3ref.comms.ep (harness.adapters.comms) with one mistake."""

from __future__ import annotations

from typing import Any

import torch

from dsv3ref.comms.ep import Dispatched, EPGroup
from harness.adapters.comms import DsAllToAll


class AveragingCombine(DsAllToAll):
    """Combine averages a token's copies (one per destination rank) instead of summing them."""

    def dispatch(self, ep: EPGroup, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 n_experts: int, fmt: str = "native", counter: Any = None) -> Dispatched:
        dest = torch.where(topk_idx >= 0, topk_idx // (n_experts // ep.world_size) + 1, 0)  # [N, k], 0: no expert
        hit = torch.zeros(topk_idx.shape[0], ep.world_size + 1, dtype=torch.bool, device=topk_idx.device)
        self.copies = hit.scatter_(1, dest, True)[:, 1:].sum(-1, keepdim=True).clamp(min=1)  # [N, 1] ranks reached
        return super().dispatch(ep, x, topk_idx, topk_weights, n_experts, fmt, counter)

    def combine(self, ep: EPGroup, y: torch.Tensor, handle: Any, fmt: str = "native",
                counter: Any = None) -> torch.Tensor:
        out = super().combine(ep, y, handle, fmt, counter)
        return out / self.copies.to(out.dtype)


def averaging_combine() -> AveragingCombine:
    return AveragingCombine("flat")
