"""Dispatch layout for expert parallelism: how many tokens go to each expert, rank and node.

Experts are placed contiguously, E / R per rank (expert e on rank e // (E / R)), and ranks contiguously,
`ranks_per_node` per node. A token counts once per rank (and once per node) however many of its experts live
there -- the deduplicated counts DeepEP's `get_dispatch_layout` returns. Slots holding -1 are ignored.
With groups = nodes (n_group = nodes, topk_group = M), group-limited routing is node-limited routing: each
token's experts then lie on at most M nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DispatchInputError(ValueError):
    """A bad input to the dispatch layout; the message names the argument and what was expected."""


@dataclass(frozen=True)
class DispatchLayout:
    """Counts for one batch of routed tokens (all int64 except the boolean membership matrix)."""

    tokens_per_expert: torch.Tensor  # [E]
    tokens_per_rank: torch.Tensor  # [R], each token counted once per rank it is sent to
    tokens_per_node: torch.Tensor  # [nodes], each token counted once per node it is sent to
    is_token_in_rank: torch.Tensor  # [N, R] bool
    ranks_per_node: int

    @property
    def is_token_in_node(self) -> torch.Tensor:
        """[N, nodes] bool: whether any of the token's experts lives on the node."""
        n, ranks = self.is_token_in_rank.shape
        return self.is_token_in_rank.view(n, ranks // self.ranks_per_node, self.ranks_per_node).any(dim=-1)


def dispatch_layout(indices: torch.Tensor, n_experts: int, n_ranks: int,
                    ranks_per_node: int | None = None) -> DispatchLayout:
    """The layout of `indices` [N, k] (expert ids or -1) over `n_ranks` ranks, `ranks_per_node` per node
    (default: all ranks on one node)."""
    ranks_per_node = n_ranks if ranks_per_node is None else ranks_per_node
    if n_experts < 1 or n_ranks < 1 or ranks_per_node < 1:
        raise DispatchInputError(f"n_experts, n_ranks, ranks_per_node: expected >= 1, got {n_experts}, {n_ranks}, "
                                 f"{ranks_per_node}")
    if n_experts % n_ranks:
        raise DispatchInputError(f"n_ranks: expected a divisor of n_experts {n_experts}, got {n_ranks}")
    if n_ranks % ranks_per_node:
        raise DispatchInputError(f"ranks_per_node: expected a divisor of n_ranks {n_ranks}, got {ranks_per_node}")
    if indices.ndim != 2 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise DispatchInputError(f"indices: expected an integer tensor [tokens, k], got {indices.dtype} "
                                 f"of shape {list(indices.shape)}")
    if indices.numel() and (indices.min() < -1 or indices.max() >= n_experts):
        raise DispatchInputError(f"indices: expected expert ids in [-1, {n_experts}), got "
                                 f"[{int(indices.min())}, {int(indices.max())}]")
    valid = indices >= 0
    per_expert = torch.bincount(indices[valid], minlength=n_experts)
    rank = torch.where(valid, indices // (n_experts // n_ranks), n_ranks)  # -1 slots go to a spill column
    in_rank = torch.zeros(indices.shape[0], n_ranks + 1, dtype=torch.bool, device=indices.device)
    in_rank.scatter_(1, rank, True)
    in_rank = in_rank[:, :n_ranks]  # [N, R]
    in_node = in_rank.view(indices.shape[0], n_ranks // ranks_per_node, ranks_per_node).any(dim=-1)  # [N, nodes]
    return DispatchLayout(per_expert, in_rank.sum(dim=0), in_node.sum(dim=0), in_rank, ranks_per_node)
