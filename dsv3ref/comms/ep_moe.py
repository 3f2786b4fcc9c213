"""DeepSeekMoE over an expert-parallel group: node-limited routing, and the MoE layer whose routed experts are
spread over the ranks (E / R contiguous experts each) while every rank routes its own tokens.

Forward of `EPMoE` on each rank: the router (replicated) picks each token's experts; dispatch sends the token to
the ranks holding them; each rank runs its local experts on what it received (sum of w_k expert_k(x) over its
slots, the reference loop); combine sums the copies back at the source; the shared experts run locally. The
result equals the single-process `MoE` on the same tokens (float64: to rounding; the dispatch format's error
otherwise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from dsv3ref.comms.ep import AllToAll, EPGroup, EPInputError, LinkBytes
from dsv3ref.config import ModelConfig
from dsv3ref.moe import MoE, loop_experts


def node_limited(cfg: ModelConfig, nodes: int, node_limit: int) -> ModelConfig:
    """`cfg` with node-limited routing over `nodes` nodes: one expert group per node (n_group = nodes, experts
    placed contiguously) and each token's experts on at most `node_limit` nodes (topk_group = M)."""
    if cfg.moe is None:
        raise EPInputError(f"{cfg.name}: moe: node-limited routing needs a MoE config")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise EPInputError(f"nodes: expected a positive integer, got {nodes!r}")
    if isinstance(node_limit, bool) or not isinstance(node_limit, int) or not 1 <= node_limit <= nodes:
        raise EPInputError(f"node_limit: expected 1 <= M <= the number of nodes {nodes}, got {node_limit!r}")
    if cfg.moe.n_routed_experts % nodes:
        raise EPInputError(f"nodes: expected a divisor of n_routed_experts {cfg.moe.n_routed_experts}, got {nodes}")
    return cfg.replace(moe=dataclasses.replace(cfg.moe, n_group=nodes, topk_group=node_limit))


class EPMoE(nn.Module):
    """`moe` (a dsv3ref MoE holding every expert's weights; this rank runs only its own) over the EP group `ep`.

    `comm` provides dispatch/combine (default: `AllToAll("flat")`); activations are dispatched in `dispatch_fmt`
    and combined in `combine_fmt`. After each forward, `dispatch_bytes` and `combine_bytes` hold the link bytes of
    its two collectives. Forward only (the all-to-all carries no gradient).
    """

    def __init__(self, moe: MoE, ep: EPGroup, comm: Any = None, dispatch_fmt: str = "native",
                 combine_fmt: str = "native") -> None:
        super().__init__()
        experts = moe.n_experts
        if experts % ep.world_size:
            raise EPInputError(f"n_routed_experts: expected a multiple of the world size {ep.world_size} (experts "
                               f"placed contiguously), got {experts}")
        self.moe, self.ep = moe, ep
        self.comm = AllToAll() if comm is None else comm
        self.dispatch_fmt, self.combine_fmt = dispatch_fmt, combine_fmt
        self.first_expert = ep.rank * (experts // ep.world_size)
        self.dispatch_bytes = LinkBytes.zeros(ep.gpus_per_node)
        self.combine_bytes = LinkBytes.zeros(ep.gpus_per_node)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] (this rank's tokens) -> [..., D]; collective over the EP group."""
        shape = x.shape
        x = x.reshape(-1, self.moe.dim)  # [N, D]
        weights, indices = self.moe.gate(x)
        self.dispatch_bytes = LinkBytes.zeros(self.ep.gpus_per_node)
        self.combine_bytes = LinkBytes.zeros(self.ep.gpus_per_node)
        got = self.comm.dispatch(self.ep, x, indices, weights, self.moe.n_experts, self.dispatch_fmt,
                                 self.dispatch_bytes)
        local = got.topk_idx
        experts = torch.where(local >= 0, local + self.first_expert, local)  # global ids, -1 kept
        y = loop_experts(self.moe, got.activations(x.dtype), got.topk_weights.to(x.dtype), experts)
        out = self.comm.combine(self.ep, y, got.handle, self.combine_fmt, self.combine_bytes)
        if self.moe.shared_experts is not None:
            out = out + self.moe.shared_experts(x)
        return out.view(shape)
