"""Expert-parallel traffic from a routing decision: how many rows each rank sends each rank in every all-to-all
stage of a dispatch (and back in the combine), the bytes that puts on every link, a flow-level estimate of the
all-to-all's time, and the TPOT bound of `harness.analytic.tpot` fed with these bytes.

Placement as in `dsv3ref.comms.ep`: R = nodes x G ranks, E / R contiguous experts per rank, NIC i of every node on
plane i. Paths: "flat" (one message per token and destination rank) and "hierarchical" (one per destination node
over the sender's plane, then NVLink forwarding inside that node). Fabrics for a flat message between nodes:
- "mpft" (multi-plane): the planes are disjoint, so a message to a GPU of another local index first crosses
  NVLink to the sender-node GPU on the destination's plane (PXN) and leaves by that GPU's NIC;
- "mrft" (multi-rail): the rails meet at the spines, so it leaves by the sender's own NIC.
Either fat-tree is non-blocking, so the flow-level time is the most-loaded NIC or NVLink port (egress or ingress)
over its bandwidth: the all-to-all ends when its busiest link has drained. Latency is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3ref.comms.dispatch import DispatchLayout, dispatch_layout
from harness.analytic.tpot import tpot_from_comm_time

PATHS = ("flat", "hierarchical")
FABRICS = ("mpft", "mrft")


class TrafficError(ValueError):
    """Bad input to the traffic model; the message names the argument and what was expected."""


@dataclass(frozen=True)
class Placement:
    """nodes x gpus_per_node ranks, n_experts placed contiguously."""

    nodes: int
    gpus_per_node: int
    n_experts: int

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "n_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrafficError(f"{name}: expected a positive integer, got {value!r}")
        if self.n_experts % self.ranks:
            raise TrafficError(f"n_experts: expected a multiple of the {self.ranks} ranks, got {self.n_experts}")

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    def node(self) -> torch.Tensor:
        """[R] node of each rank."""
        return torch.arange(self.ranks) // self.gpus_per_node

    def local(self) -> torch.Tensor:
        """[R] local index (plane) of each rank."""
        return torch.arange(self.ranks) % self.gpus_per_node


@dataclass(frozen=True)
class Routing:
    """Where tokens go: `indices` [N, k] expert ids (-1: none), `src_rank` [N] each token's rank, the placement, and
    the dispatch layout (deduplicated per rank and node), computed once."""

    indices: torch.Tensor
    src_rank: torch.Tensor
    placement: Placement
    layout: DispatchLayout

    @property
    def tokens(self) -> int:
        return self.indices.shape[0]


def routing(indices: torch.Tensor, src_rank: torch.Tensor, placement: Placement) -> Routing:
    """Validate a routing decision and compute its layout."""
    if src_rank.shape != (indices.shape[0],):
        raise TrafficError(f"src_rank: expected shape [{indices.shape[0]}] (one rank per token), got "
                           f"{list(src_rank.shape)}")
    if src_rank.numel() and (src_rank.min() < 0 or src_rank.max() >= placement.ranks):
        raise TrafficError(f"src_rank: expected ranks in [0, {placement.ranks}), got [{int(src_rank.min())}, "
                           f"{int(src_rank.max())}]")
    layout = dispatch_layout(indices, placement.n_experts, placement.ranks, placement.gpus_per_node)
    return Routing(indices, src_rank, placement, layout)


def _path(path: str) -> None:
    if path not in PATHS:
        raise TrafficError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")


def _count(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b for 0/1 matrices a [N, X], b [N, Y]: exact integer counts [X, Y]."""
    return (a.double().T @ b.double()).round().long()


def pair_rows(r: Routing, path: str) -> tuple[torch.Tensor, ...]:
    """Rows each rank sends each rank, [R, R] int64 (sender, receiver), for every all-to-all stage of the
    dispatch. Flat: one stage; hierarchical: the scale-out stage (sender -> same-plane GPU of each destination
    node, itself on its own node) and the forwarding stage inside each node."""
    _path(path)
    place = r.placement
    ranks, g = place.ranks, place.gpus_per_node
    source = torch.nn.functional.one_hot(r.src_rank, ranks)  # [N, R]
    if path == "flat":
        return (_count(source, r.layout.is_token_in_rank),)
    to_node = _count(source, r.layout.is_token_in_node)  # [R, nodes]: rows from each rank to each node
    first = torch.zeros(ranks, ranks, dtype=torch.long)
    columns = torch.arange(place.nodes)[None, :] * g + place.local()[:, None]  # [R, nodes]
    first.scatter_(1, columns, to_node)
    plane = torch.nn.functional.one_hot(r.src_rank % g, g)  # [N, G]
    by_plane = _count(plane, r.layout.is_token_in_rank)  # [G, R]: rows from plane i's senders to each rank
    second = torch.zeros(ranks, ranks, dtype=torch.long)
    forwarder = place.node()[None, :] * g + torch.arange(g)[:, None]  # [G, R]: the GPU forwarding to a rank
    second.index_put_((forwarder.flatten(), torch.arange(ranks).repeat(g)), by_plane.flatten(), accumulate=True)
    return first, second


def scaleout_crossings(r: Routing, path: str) -> torch.Tensor:
    """[N] scale-out messages each token's dispatch sends: distinct destination ranks (flat) or nodes
    (hierarchical) outside its own node."""
    _path(path)
    place = r.placement
    own = r.src_rank // place.gpus_per_node
    if path == "flat":
        remote = place.node()[None, :] != own[:, None]  # [N, R]
        return (r.layout.is_token_in_rank & remote).sum(-1)
    remote = torch.arange(place.nodes)[None, :] != own[:, None]  # [N, nodes]
    return (r.layout.is_token_in_node & remote).sum(-1)


@dataclass(frozen=True)
class LinkLoads:
    """Bytes on every port in one collective, [R] each (float64): each GPU's NIC out/in (its plane's port) and
    NVLink out/in."""

    nic_out: torch.Tensor
    nic_in: torch.Tensor
    nvl_out: torch.Tensor
    nvl_in: torch.Tensor

    def time_s(self, scaleout_GBps: float, scaleup_GBps: float) -> float:
        """Flow-level time: the most-loaded port's bytes over its bandwidth (GB/s = 1e9 B/s)."""
        nic = float(torch.maximum(self.nic_out, self.nic_in).max()) / (scaleout_GBps * 1e9)
        nvl = float(torch.maximum(self.nvl_out, self.nvl_in).max()) / (scaleup_GBps * 1e9)
        return max(nic, nvl)

    @property
    def scaleout_total(self) -> float:
        return float(self.nic_out.sum())

    @property
    def scaleup_total(self) -> float:
        return float(self.nvl_out.sum())


def link_loads(stages: tuple[torch.Tensor, ...], placement: Placement, row_bytes: int, fabric: str = "mpft",
               reverse: bool = False) -> LinkLoads:
    """Port loads of the stages' messages (`pair_rows`), `row_bytes` each; `reverse`: the combine, which sends
    every message back from receiver to sender."""
    if fabric not in FABRICS:
        raise TrafficError(f"fabric: expected one of {', '.join(FABRICS)}, got {fabric!r}")
    r, g = placement.ranks, placement.gpus_per_node
    node, local = placement.node(), placement.local()
    loads = [torch.zeros(r, dtype=torch.float64) for _ in range(4)]
    nic_out, nic_in, nvl_out, nvl_in = loads
    for rows in stages:
        b = (rows.T if reverse else rows).double() * row_bytes  # [sender, receiver] bytes
        b.fill_diagonal_(0)  # a rank's copy to itself crosses no link
        same = node[:, None] == node[None, :]
        nvl_out += (b * same).sum(1)
        nvl_in += (b * same).sum(0)
        cross = b * ~same
        nic_in += cross.sum(0)
        if fabric == "mrft":
            nic_out += cross.sum(1)
            continue
        # mpft: leaves by the sender-node GPU on the receiver's plane, after an NVLink hop when that is another GPU
        exit_gpu = node[:, None] * g + local[None, :]  # [sender, receiver]
        nic_out.index_add_(0, exit_gpu.flatten(), cross.flatten())
        hop = cross * (local[:, None] != local[None, :])
        nvl_out += hop.sum(1)
        nvl_in.index_add_(0, exit_gpu.flatten(), hop.flatten())
    return LinkLoads(nic_out, nic_in, nvl_out, nvl_in)


def sender_bytes(stages: tuple[torch.Tensor, ...], placement: Placement, row_bytes: int,
                 reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What each rank's own counters should show on the multi-plane fabric (as `dsv3ref.comms.ep.LinkBytes`):
    scale-out bytes per rank and plane [R, G] and scale-up bytes per rank [R], for messages it sends."""
    r, g = placement.ranks, placement.gpus_per_node
    node, local = placement.node(), placement.local()
    scaleout = torch.zeros(r, g, dtype=torch.long)
    scaleup = torch.zeros(r, dtype=torch.long)
    for rows in stages:
        b = (rows.T if reverse else rows) * row_bytes
        b.fill_diagonal_(0)
        same = node[:, None] == node[None, :]
        scaleup += (b * same).sum(1) + (b * ~same * (local[:, None] != local[None, :])).sum(1)
        scaleout.index_add_(1, local, b * ~same)  # column = the receiver's plane
    return scaleout, scaleup


@dataclass(frozen=True)
class EPTraffic:
    """One MoE layer's dispatch + combine of `tokens` tokens: port loads of both and scale-out messages per token."""

    path: str
    fabric: str
    tokens: int
    dispatch: LinkLoads
    combine: LinkLoads
    crossings: torch.Tensor  # [N] scale-out messages per token in the dispatch

    @property
    def scaleout_bytes_per_token(self) -> float:
        """Dispatch + combine bytes on the scale-out network per token."""
        return (self.dispatch.scaleout_total + self.combine.scaleout_total) / self.tokens

    def time_s(self, scaleout_GBps: float, scaleup_GBps: float) -> float:
        """Flow-level dispatch time plus combine time (one after the other)."""
        return self.dispatch.time_s(scaleout_GBps, scaleup_GBps) + self.combine.time_s(scaleout_GBps, scaleup_GBps)

    def tpot_s(self, scaleout_GBps: float, scaleup_GBps: float, layers: int, micro_batches: int = 2) -> float:
        """The TPOT bound (harness.analytic.tpot) with this traffic's time per layer and micro-batch."""
        return tpot_from_comm_time(self.time_s(scaleout_GBps, scaleup_GBps), layers, micro_batches)


def ep_traffic(r: Routing, path: str, dispatch_row_bytes: int, combine_row_bytes: int,
               fabric: str = "mpft") -> EPTraffic:
    """Traffic of one dispatch (rows of `dispatch_row_bytes`) and its combine (`combine_row_bytes`)."""
    if r.tokens == 0:
        raise TrafficError("indices: expected at least one token, got none")
    stages = pair_rows(r, path)
    return EPTraffic(path, fabric, r.tokens, link_loads(stages, r.placement, dispatch_row_bytes, fabric),
                     link_loads(stages, r.placement, combine_row_bytes, fabric, reverse=True),
                     scaleout_crossings(r, path))
