"""Expert-parallel dispatch and combine over torch.distributed (gloo on CPU, NCCL on GPUs, the same code).

Placement: ranks = nodes x gpus_per_node, rank r on node r // G with local index r % G; E experts placed
contiguously, E / R per rank. Each GPU has its own NIC, and NIC i of every node is on plane i (multi-plane
fat-tree): the network joins only GPUs of the same local index.

dispatch sends each token once to every rank holding at least one of its experts, with its top-k ids (local to
the receiving rank, -1 elsewhere) and weights; combine returns each rank's output for the tokens it received and
sums a token's copies at its source (DeepEP's normal-mode semantics). Two paths over the same inputs:

- "flat": one all-to-all over the world. A message to another node goes out on the destination's plane; when that
  is not the sender's own plane it first crosses NVLink to the sender-node GPU on that plane (PXN forwarding).
- "hierarchical": a token goes once to each destination node, over the sender's own plane, to the GPU of the same
  local index there, which forwards it over NVLink to the destination ranks in its node (node-limited routing then
  bounds its scale-out crossings by the node limit M instead of the number of ranks, up to k). Combine reduces a
  token's copies at that forwarding GPU before sending one message back.

Both deliver the same tokens in the same order: by source rank, then by token index. Activations travel in the
dispatch format: "native" (x's dtype), "bf16", or "fp8" (e4m3 with fp32 1x128 scales, DeepSeek-V3's dispatch);
combine in "native" or "bf16". Every call can add the payload bytes it puts on each link class (scale-out per
plane, scale-up) to a `LinkBytes` counter. Every rank checks its inputs and all ranks compare their views (one
small all-gather) before any data moves, so bad input or a disagreement between ranks raises `EPInputError` on
every rank; a collective that fails (a peer died or stalled past the group's timeout) raises `EPCommError`.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dsv3ref.comms.dispatch import dispatch_layout
from dsv3ref.fp8.quant import BLOCK, dequant_1x128, quant_1x128

PATHS = ("flat", "hierarchical")
DISPATCH_FORMATS = ("native", "bf16", "fp8")
COMBINE_FORMATS = ("native", "bf16")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SCALE_BYTES = 4  # one fp32 scale per 1x128 tile


class EPInputError(ValueError):
    """Bad input to expert-parallel dispatch/combine (on any rank); the message names the rank and the argument."""


class EPCommError(RuntimeError):
    """A collective failed: a peer rank died, stalled past the process group's timeout, or called another one."""


def backend_for(device: str | torch.device) -> str:
    """The torch.distributed backend for a device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def payload_bytes(hidden: int, dtype: torch.dtype, fmt: str) -> int:
    """Bytes of one token's activations in a dispatch/combine format: native = hidden x x's element size,
    bf16 = 2 hidden, fp8 = hidden (e4m3) + 4 ceil(hidden / 128) (fp32 1x128 scales)."""
    if fmt == "fp8":
        return hidden + SCALE_BYTES * -(-hidden // BLOCK)
    if fmt == "bf16":
        return 2 * hidden
    if fmt == "native":
        return hidden * dtype.itemsize
    raise EPInputError(f"fmt: expected one of {', '.join(DISPATCH_FORMATS)}, got {fmt!r}")


@dataclass
class LinkBytes:
    """Bytes a rank's calls put on each link class: activation payload per scale-out plane (the plane of the NIC
    that sends it) and over scale-up (NVLink), and routing metadata (expert ids, weights, source ids) on any link,
    which the paper's traffic figures leave out. Local copies (a rank to itself) count nothing."""

    scaleout: list[int]
    scaleup: int = 0
    metadata: int = 0

    @classmethod
    def zeros(cls, planes: int) -> LinkBytes:
        return cls([0] * planes)

    @property
    def scaleout_total(self) -> int:
        return sum(self.scaleout)

    def add(self, other: LinkBytes) -> None:
        self.scaleout = [a + b for a, b in zip(self.scaleout, other.scaleout, strict=True)]
        self.scaleup += other.scaleup
        self.metadata += other.metadata


@dataclass(frozen=True, eq=False)
class EPGroup:
    """An expert-parallel world: this rank, the placement, and the process groups of its node and of its plane."""

    rank: int
    world_size: int
    gpus_per_node: int
    device: torch.device
    node_group: Any
    plane_group: Any
    world: Any = None  # the process group of the whole world (None: the default group)

    @property
    def nodes(self) -> int:
        return self.world_size // self.gpus_per_node

    @property
    def node(self) -> int:
        return self.rank // self.gpus_per_node

    @property
    def local(self) -> int:
        return self.rank % self.gpus_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def local_of(self, rank: int) -> int:
        return rank % self.gpus_per_node

    def node_ranks(self, node: int) -> list[int]:
        return [node * self.gpus_per_node + j for j in range(self.gpus_per_node)]

    def plane_ranks(self, local: int) -> list[int]:
        return [n * self.gpus_per_node + local for n in range(self.nodes)]


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _collective(what: str, rank: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one torch.distributed collective; its failure becomes an EPCommError naming the call and the rank."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # gloo and NCCL report a dead, stalled or diverged peer as RuntimeError
        raise EPCommError(f"{what}: rank {rank}: collective failed ({_first_line(e)}): a peer rank died, stalled "
                          "past the process group's timeout, or called a different collective") from e


def _agree(what: str, rank: int, world: Any, error: str | None, **views: Any) -> None:
    """Every rank shares its input error (or None) and its `views`; all raise EPInputError when any rank has an
    error or the ranks disagree on a view."""
    mine = {"error": error, **{k: str(v) for k, v in views.items()}}
    gathered: list[Any] = [None] * dist.get_world_size(world)
    _collective(what, rank, dist.all_gather_object, gathered, mine, group=world)
    bad = [f"rank {r}: {v['error']}" for r, v in enumerate(gathered) if v["error"]]
    if bad:
        raise EPInputError(f"{what}: {'; '.join(bad)}")
    for key in views:
        if len({v[key] for v in gathered}) > 1:
            seen = ", ".join(f"rank {r} {v[key]}" for r, v in enumerate(gathered))
            raise EPInputError(f"{what}: {key}: expected the same on every rank, got {seen}")


def ep_group(gpus_per_node: int, device: str | torch.device | None = None, group: Any = None,
             timeout: datetime.timedelta | None = None) -> EPGroup:
    """The EP group over `group` (default: the initialised default process group), `gpus_per_node` ranks per node.
    Collective: every rank calls it with the same arguments (it creates a process group per node and per plane).
    `device` defaults to cuda:<rank mod the visible GPUs> under NCCL (made the current device), cpu otherwise."""
    if not dist.is_initialized():
        raise EPInputError("ep_group: torch.distributed is not initialised (call init_process_group first)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device is None:
        device = f"cuda:{rank % torch.cuda.device_count()}" if dist.get_backend(group) == "nccl" else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives run on the current device
    error = None
    if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        error = f"gpus_per_node: expected a positive integer, got {gpus_per_node!r}"
    elif world % gpus_per_node:
        error = f"gpus_per_node: expected a divisor of the world size {world}, got {gpus_per_node}"
    _agree("ep_group", rank, group, error, gpus_per_node=gpus_per_node)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    nodes = world // gpus_per_node
    node_group = plane_group = None
    for n in range(nodes):  # every rank creates every subgroup, in the same order
        g = dist.new_group([ranks[n * gpus_per_node + j] for j in range(gpus_per_node)], timeout=timeout)
        node_group = g if n == rank // gpus_per_node else node_group
    for i in range(gpus_per_node):
        g = dist.new_group([ranks[n * gpus_per_node + i] for n in range(nodes)], timeout=timeout)
        plane_group = g if i == rank % gpus_per_node else plane_group
    return EPGroup(rank, world, gpus_per_node, device, node_group, plane_group, group)


# --- packed messages ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rows:
    """The byte layout of one token's message: named fields (dtype, elements), the first `payload` of them the
    activations, the rest metadata. Packing all fields into one uint8 row per token makes each stage one
    all-to-all whatever the dtypes (FP8 included, which gloo cannot send as such)."""

    fields: tuple[tuple[str, torch.dtype, int], ...]
    payload: int

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, bytes] uint8 from tensors [N, elements] (or [N])."""
        n = next(iter(tensors.values())).shape[0]
        if n == 0:  # views between dtypes need a unit stride, which empty tensors need not have
            return torch.empty(0, self.nbytes(self.names), dtype=torch.uint8, device=tensors["topk_idx"].device)
        parts = [tensors[name].reshape(tensors[name].shape[0], elements).contiguous().view(torch.uint8)
                 for name, _, elements in self.fields]
        return torch.cat(parts, dim=1)

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if rows.shape[0] == 0:
            return {name: torch.empty(0, elements, dtype=dtype, device=rows.device)
                    for name, dtype, elements in self.fields}
        out, start = {}, 0
        for name, dtype, elements in self.fields:
            width = elements * dtype.itemsize
            field = rows[:, start:start + width].clone(memory_format=torch.contiguous_format)  # [T, width] bytes
            out[name] = field.view(dtype)  # [T, elements]
            start += width
        return out

    def nbytes(self, names: tuple[str, ...]) -> int:
        return sum(e * d.itemsize for n, d, e in self.fields if n in names)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.fields)

    @property
    def payload_names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.fields[:self.payload])

    @property
    def metadata_names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.fields[self.payload:])


def _account(counter: LinkBytes | None, ep: EPGroup, peers: list[int], counts: list[int], payload: int,
             metadata: int) -> None:
    """Add messages of `counts[i]` rows from this rank to global rank `peers[i]`: same node -> scale-up; another
    node -> scale-out on the destination's plane, plus an NVLink hop first when that is not this rank's plane."""
    if counter is None:
        return
    for peer, rows in zip(peers, counts, strict=True):
        if rows == 0 or peer == ep.rank:
            continue
        hops = 1
        if ep.node_of(peer) == ep.node:
            counter.scaleup += rows * payload
        else:
            counter.scaleout[ep.local_of(peer)] += rows * payload
            if ep.local_of(peer) != ep.local:
                counter.scaleup += rows * payload
                hops = 2
        counter.metadata += hops * rows * metadata


@dataclass(frozen=True, eq=False)
class _Stage:
    """One all-to-all of a dispatch: which input rows went to which group member, and the counts both ways."""

    what: str
    group: Any
    peers: list[int]  # global rank of each member of `group`, in group order
    inputs: int  # rows of this stage's input
    send_index: torch.Tensor  # [S] input row of each sent row, in send order
    send_counts: list[int]
    recv_counts: list[int]


def _exchange(what: str, ep: EPGroup, group: Any, rows: torch.Tensor, send: list[int],
              recv: list[int]) -> torch.Tensor:
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    _collective(what, ep.rank, dist.all_to_all_single, out, rows.contiguous(), recv, send, group=group)
    return out


def _stage(what: str, ep: EPGroup, group: Any, peers: list[int], rows: torch.Tensor, member: torch.Tensor,
           counter: LinkBytes | None, layout: _Rows) -> tuple[torch.Tensor, _Stage]:
    """Send row t to every group member m with member[t, m] (rows in member order, then row order); returns the
    rows received (by sender, then the sender's order) and the stage's bookkeeping."""
    dest, index = member.T.nonzero(as_tuple=True)  # sorted by destination, then row
    send_counts = torch.bincount(dest, minlength=len(peers)).to(ep.device)
    recv_counts = torch.empty_like(send_counts)
    _collective(what, ep.rank, dist.all_to_all_single, recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    _account(counter, ep, peers, send, layout.nbytes(layout.payload_names), layout.nbytes(layout.metadata_names))
    received = _exchange(what, ep, group, rows[index], send, recv)
    return received, _Stage(what, group, peers, rows.shape[0], index, send, recv)


def _wire(x: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """x in the dispatch format: {"x": data} plus {"scales": fp32 [N, ceil(D/128)]} for fp8."""
    if fmt == "fp8":
        q, s = quant_1x128(x)
        return {"x": q, "scales": s}
    return {"x": x.to(torch.bfloat16) if fmt == "bf16" else x}


def _layout(x: torch.Tensor, wire: dict[str, torch.Tensor], k: int, weights_dtype: torch.dtype,
            hierarchical: bool) -> _Rows:
    payload = [(name, t.dtype, t.shape[1]) for name, t in wire.items()]
    meta = [("topk_idx", torch.int64, k), ("topk_weights", weights_dtype, k), ("src_token", torch.int64, 1)]
    if hierarchical:
        meta.append(("src_rank", torch.int64, 1))
    return _Rows(tuple(payload + meta), len(payload))


# --- dispatch ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Handle:
    """What combine needs to send a dispatch's outputs back: the stages and the order of the delivered rows."""

    path: str
    hidden: int
    received: int
    stages: tuple[_Stage, ...]
    order: torch.Tensor | None  # hierarchical: delivered row i is the order[i]-th row received by the last stage


@dataclass(frozen=True)
class Dispatched:
    """The tokens a rank received, ordered by source rank, then token index at the source.

    x [T, D] in the wire dtype (e4m3 for fp8, bf16, or the sender's dtype), scales [T, ceil(D/128)] fp32 for fp8
    (else None), topk_idx [T, k] int64 = this rank's local expert ids (0 .. E/R - 1) or -1 for slots elsewhere,
    topk_weights [T, k] (the sender's gate weights), src_rank and src_token [T] int64.
    """

    x: torch.Tensor
    scales: torch.Tensor | None
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    src_rank: torch.Tensor
    src_token: torch.Tensor
    handle: Handle

    def activations(self, dtype: torch.dtype) -> torch.Tensor:
        """x in `dtype` (dequantized from its 1x128 scales for fp8)."""
        if self.scales is not None:
            return dequant_1x128(self.x, self.scales, dtype)
        return self.x.to(dtype)


def _dispatch_error(ep: EPGroup, x: Any, topk_idx: Any, topk_weights: Any, n_experts: int, fmt: str,
                    path: str) -> str | None:
    """The first problem with this rank's dispatch inputs, or None."""
    if path not in PATHS:
        return f"path: expected one of {', '.join(PATHS)}, got {path!r}"
    if fmt not in DISPATCH_FORMATS:
        return f"fmt: expected one of {', '.join(DISPATCH_FORMATS)}, got {fmt!r}"
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        return f"x: expected a float tensor [tokens, hidden], got {getattr(x, 'dtype', type(x).__name__)} " \
               f"of shape {list(getattr(x, 'shape', []))}"
    if x.shape[1] == 0:
        return "x: expected hidden >= 1, got 0"
    if fmt == "fp8" and x.dtype == torch.float64:
        return "x: fmt 'fp8' quantizes fp32, bf16 or fp16 activations, got float64"
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype != torch.int64 or topk_idx.ndim != 2 \
            or topk_idx.shape[0] != x.shape[0] or topk_idx.shape[1] == 0:
        return f"topk_idx: expected an int64 tensor [{x.shape[0]}, k >= 1], got " \
               f"{getattr(topk_idx, 'dtype', type(topk_idx).__name__)} of shape {list(getattr(topk_idx, 'shape', []))}"
    if not isinstance(topk_weights, torch.Tensor) or topk_weights.shape != topk_idx.shape \
            or topk_weights.dtype not in FLOAT_DTYPES:
        return f"topk_weights: expected a float tensor of shape {list(topk_idx.shape)}, got " \
               f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)} of shape " \
               f"{list(getattr(topk_weights, 'shape', []))}"
    for name, t in (("x", x), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
        if t.device != ep.device:
            return f"{name}: expected device {ep.device}, got {t.device}"
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1 or n_experts % ep.world_size:
        return f"n_experts: expected a positive multiple of the world size {ep.world_size}, got {n_experts!r}"
    if topk_idx.numel() and (topk_idx.min() < -1 or topk_idx.max() >= n_experts):
        return f"topk_idx: expected expert ids in [-1, {n_experts}), got [{int(topk_idx.min())}, " \
               f"{int(topk_idx.max())}]"
    if not (torch.isfinite(x).all() and torch.isfinite(topk_weights).all()):
        return "x, topk_weights: expected finite values, got NaN or Inf"
    return None


@torch.no_grad()
def dispatch(ep: EPGroup, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, n_experts: int,
             fmt: str = "native", path: str = "flat", counter: LinkBytes | None = None) -> Dispatched:
    """Send each token x [N, D] of this rank to the ranks holding its experts topk_idx [N, k] (-1: none), with
    topk_weights [N, k]; collective over the EP group. Returns what this rank received (see `Dispatched`).
    Forward only: no gradient flows through the all-to-all."""
    error = _dispatch_error(ep, x, topk_idx, topk_weights, n_experts, fmt, path)
    ok = error is None
    _agree("dispatch", ep.rank, ep.world, error, hidden=x.shape[1] if ok else None,
           k=topk_idx.shape[1] if ok else None, x_dtype=x.dtype if ok else None,
           weights_dtype=topk_weights.dtype if ok else None, n_experts=n_experts, fmt=fmt, path=path)
    wire = _wire(x, fmt)
    layout = _layout(x, wire, topk_idx.shape[1], topk_weights.dtype, path == "hierarchical")
    n = x.shape[0]
    tensors = {**wire, "topk_idx": topk_idx, "topk_weights": topk_weights,
               "src_token": torch.arange(n, device=ep.device), "src_rank": torch.full((n,), ep.rank, device=ep.device)}
    rows = layout.pack(tensors)
    in_rank = dispatch_layout(topk_idx, n_experts, ep.world_size, ep.gpus_per_node).is_token_in_rank  # [N, R]
    if path == "flat":
        received, stage = _stage("dispatch (flat all-to-all)", ep, ep.world, list(range(ep.world_size)), rows,
                                 in_rank, counter, layout)
        stages, order = (stage,), None
        got = layout.unpack(received)
        got["src_rank"] = torch.repeat_interleave(torch.arange(ep.world_size, device=ep.device),
                                                  torch.tensor(stage.recv_counts, device=ep.device))
    else:
        in_node = in_rank.view(n, ep.nodes, ep.gpus_per_node).any(dim=-1)  # [N, nodes]
        first, s1 = _stage("dispatch (scale-out, own plane)", ep, ep.plane_group, ep.plane_ranks(ep.local), rows,
                           in_node, counter, layout)
        forwarded = layout.unpack(first)["topk_idx"]
        in_node_rank = dispatch_layout(forwarded, n_experts, ep.world_size, ep.gpus_per_node).is_token_in_rank
        mine = in_node_rank[:, ep.node * ep.gpus_per_node:(ep.node + 1) * ep.gpus_per_node]  # [T1, G]
        second, s2 = _stage("dispatch (scale-up forwarding)", ep, ep.node_group, ep.node_ranks(ep.node), first,
                            mine, counter, layout)
        got = layout.unpack(second)
        by_token = torch.sort(got["src_token"][:, 0], stable=True).indices
        order = by_token[torch.sort(got["src_rank"][by_token, 0], stable=True).indices]
        got = {name: t[order] for name, t in got.items()}
        stages = (s1, s2)
    per_rank = n_experts // ep.world_size
    base = ep.rank * per_rank
    idx = got["topk_idx"]
    local = torch.where((idx >= base) & (idx < base + per_rank), idx - base, torch.full_like(idx, -1))
    handle = Handle(path, x.shape[1], idx.shape[0], stages, order)
    return Dispatched(got["x"], got.get("scales"), local, got["topk_weights"],
                      got["src_rank"].reshape(-1), got["src_token"].reshape(-1), handle)


# --- combine -----------------------------------------------------------------------------------------------------
def _combine_error(ep: EPGroup, y: Any, handle: Any, fmt: str) -> str | None:
    if not isinstance(handle, Handle):
        return f"handle: expected the Handle of a dispatch, got {type(handle).__name__}"
    if fmt not in COMBINE_FORMATS:
        return f"fmt: expected one of {', '.join(COMBINE_FORMATS)}, got {fmt!r}"
    if not isinstance(y, torch.Tensor) or y.dtype not in FLOAT_DTYPES \
            or tuple(y.shape) != (handle.received, handle.hidden):
        return f"y: expected a float tensor [{handle.received}, {handle.hidden}] (the tokens received), got " \
               f"{getattr(y, 'dtype', type(y).__name__)} of shape {list(getattr(y, 'shape', []))}"
    if y.device != ep.device:
        return f"y: expected device {ep.device}, got {y.device}"
    if not torch.isfinite(y).all():
        return "y: expected finite values, got NaN or Inf"
    return None


def _send_back(ep: EPGroup, stage: _Stage, values: torch.Tensor, wire_dtype: torch.dtype, acc: torch.dtype,
               counter: LinkBytes | None) -> torch.Tensor:
    """Reverse one stage: send each received row's value back (in `wire_dtype`) to its sender, who sums the values
    of each of its input rows (in `acc`); returns [stage.inputs, D]."""
    wire = values.to(wire_dtype)
    _account(counter, ep, stage.peers, stage.recv_counts, wire.shape[1] * wire.dtype.itemsize, 0)
    back = _exchange(stage.what.replace("dispatch", "combine"), ep, stage.group, wire, stage.recv_counts,
                     stage.send_counts)
    out = torch.zeros(stage.inputs, values.shape[1], dtype=acc, device=values.device)
    return out.index_add_(0, stage.send_index, back.to(acc))


@torch.no_grad()
def combine(ep: EPGroup, y: torch.Tensor, handle: Handle, fmt: str = "native",
            counter: LinkBytes | None = None) -> torch.Tensor:
    """Send y [T, D] (this rank's output for each token it received, in `Dispatched` order) back to the sources and
    sum each token's copies: returns [N, D] in y's dtype, accumulated in fp32 (fp64 for fp64 y). Collective."""
    error = _combine_error(ep, y, handle, fmt)
    ok = error is None
    _agree("combine", ep.rank, ep.world, error, hidden=y.shape[1] if ok else None, y_dtype=y.dtype if ok else None,
           fmt=fmt, path=handle.path if ok else None)
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    wire_dtype = torch.bfloat16 if fmt == "bf16" else y.dtype
    values = y
    if handle.order is not None:  # back to the order the last stage received them in
        values = torch.empty_like(y).index_copy_(0, handle.order, y)
    for stage in reversed(handle.stages):
        values = _send_back(ep, stage, values, wire_dtype, acc, counter)
    return values.to(y.dtype)


class AllToAll:
    """dispatch and combine bound to one path: the object `EPMoE` and the conformance suites call (an
    implementation under test provides the same two methods)."""

    def __init__(self, path: str = "flat") -> None:
        if path not in PATHS:
            raise EPInputError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")
        self.path = path

    def dispatch(self, ep: EPGroup, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                 n_experts: int, fmt: str = "native", counter: LinkBytes | None = None) -> Dispatched:
        return dispatch(ep, x, topk_idx, topk_weights, n_experts, fmt, self.path, counter)

    def combine(self, ep: EPGroup, y: torch.Tensor, handle: Handle, fmt: str = "native",
                counter: LinkBytes | None = None) -> torch.Tensor:
        return combine(ep, y, handle, fmt, counter)
