"""harness.analytic.traffic: messages per stage, port loads on MPFT and MRFT, scale-out crossings, the flow-level
time and the TPOT bound fed with traffic (which reproduces the paper's bound when fed the paper's assumptions)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.comms.dispatch import dispatch_layout
from dsv3ref.config import ModelConfig
from harness.analytic.tpot import ep_comm_bound, tpot_from_comm_time
from harness.analytic.traffic import (
    LinkLoads,
    Placement,
    TrafficError,
    ep_traffic,
    link_loads,
    pair_rows,
    routing,
    scaleout_crossings,
    sender_bytes,
)
from harness.bench.comms import V3_TOKENS_PER_GPU, simulated_routing, v3_placement, v3_traffic

PLACE = Placement(2, 2, 8)  # ranks 0, 1 on node 0 (planes 0, 1), ranks 2, 3 on node 1; experts 2r, 2r + 1 on rank r
# token 0 on rank 0 -> experts 2 (rank 1, same node), 6 and 7 (rank 3: other node, other plane)
# token 1 on rank 3 -> experts 0 (rank 0: other node, other plane) and 4 (rank 2, same node); one slot dropped
INDICES = torch.tensor([[2, 6, 7], [0, 4, -1]])
SRC = torch.tensor([0, 3])
ROUTED = routing(INDICES, SRC, PLACE)


def pairs(rows: torch.Tensor) -> dict[tuple[int, int], int]:
    return {(a, b): int(rows[a, b]) for a, b in rows.nonzero().tolist()}


def test_messages_of_both_paths_by_hand():
    (flat,) = pair_rows(ROUTED, "flat")
    assert pairs(flat) == {(0, 1): 1, (0, 3): 1, (3, 0): 1, (3, 2): 1}
    first, second = pair_rows(ROUTED, "hierarchical")
    # scale-out stage: once per destination node, to the same-plane GPU there (or itself on its own node)
    assert pairs(first) == {(0, 0): 1, (0, 2): 1, (3, 1): 1, (3, 3): 1}
    # forwarding stage: the plane-0 GPUs forward token 0, the plane-1 GPUs token 1, inside their node
    assert pairs(second) == {(0, 1): 1, (2, 3): 1, (1, 0): 1, (3, 2): 1}
    assert scaleout_crossings(ROUTED, "flat").tolist() == [1, 1]
    assert scaleout_crossings(ROUTED, "hierarchical").tolist() == [1, 1]


def test_port_loads_on_multi_plane_and_multi_rail_by_hand():
    stages = pair_rows(ROUTED, "flat")
    b = 100.0
    mpft = link_loads(stages, PLACE, 100, "mpft")
    # 0 -> 3 leaves by rank 1's NIC (plane 1) after an NVLink hop 0 -> 1; 3 -> 0 by rank 2's NIC after 3 -> 2
    assert mpft.nic_out.tolist() == [0, b, b, 0] and mpft.nic_in.tolist() == [b, 0, 0, b]
    assert mpft.nvl_out.tolist() == [2 * b, 0, 0, 2 * b] and mpft.nvl_in.tolist() == [0, 2 * b, 2 * b, 0]
    mrft = link_loads(stages, PLACE, 100, "mrft")  # rails meet at the spines: each leaves by its own NIC
    assert mrft.nic_out.tolist() == [b, 0, 0, b] and mrft.nic_in.tolist() == [b, 0, 0, b]
    assert mrft.nvl_out.tolist() == [b, 0, 0, b] and mrft.nvl_in.tolist() == [0, b, b, 0]
    scaleout, scaleup = sender_bytes(stages, PLACE, 100)
    assert scaleout.tolist() == [[0, 100], [0, 0], [0, 0], [100, 0]] and scaleup.tolist() == [200, 0, 0, 200]
    # combine: each copy goes back; 3 -> 0 leaves by rank 2 (plane 0) after 3 -> 2, 0 -> 3 by rank 1 after 0 -> 1
    back = link_loads(stages, PLACE, 100, "mpft", reverse=True)
    assert back.nic_out.tolist() == [0, b, b, 0] and back.nic_in.tolist() == [b, 0, 0, b]
    assert back.nvl_out.tolist() == [b] * 4 and back.nvl_in.tolist() == [b] * 4


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, Placement]:
    nodes, gpus = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    place = Placement(nodes, gpus, nodes * gpus * draw(st.integers(1, 3)))
    k = draw(st.integers(1, min(6, place.n_experts)))
    n = draw(st.integers(1, 20))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    idx = torch.stack([torch.randperm(place.n_experts, generator=gen)[:k] for _ in range(n)])
    idx = torch.where(torch.rand(idx.shape, generator=gen) < 0.2, -1, idx)
    return idx, torch.randint(0, place.ranks, (n,), generator=gen), place


@given(routings(), st.sampled_from(["flat", "hierarchical"]))
def test_every_copy_is_sent_once_and_the_byte_views_agree(case, path):
    idx, src, place = case
    routed = routing(idx, src, place)
    stages = pair_rows(routed, path)
    copies = int(dispatch_layout(idx, place.n_experts, place.ranks, place.gpus_per_node).is_token_in_rank.sum())
    assert int(stages[-1].sum()) == copies  # the last stage delivers each (token, destination rank) once
    loads = link_loads(stages, place, 7, "mpft")
    scaleout, scaleup = sender_bytes(stages, place, 7)
    assert int(scaleout.sum()) == loads.scaleout_total and int(scaleup.sum()) == loads.scaleup_total
    assert torch.equal(loads.nic_out.sum(), loads.nic_in.sum())
    crossings = scaleout_crossings(routed, path)
    assert int(crossings.sum()) * 7 == loads.scaleout_total


def test_v3_routing_node_limited_crossings():
    # DeepSeek-V3's routing (8 groups = 8 nodes, 4 per token, top-8) on EP64: a token crosses scale-out at most
    # M = 4 times with forwarding, against up to 8 (one per remote rank) flat.
    cfg = ModelConfig.preset("deepseek-v3-671b")
    routed = simulated_routing(cfg, v3_placement(cfg), V3_TOKENS_PER_GPU)
    assert int(routed.layout.is_token_in_node.sum(-1).max()) <= 4
    flat = scaleout_crossings(routed, "flat")
    hierarchical = scaleout_crossings(routed, "hierarchical")
    assert int(hierarchical.max()) == 4 and int(flat.max()) > 4 and int(flat.max()) <= 8
    assert float(hierarchical.float().mean()) < float(flat.float().mean())
    hier, flat_t = v3_traffic(cfg, routed, "hierarchical"), v3_traffic(cfg, routed, "flat")
    assert hier.scaleout_bytes_per_token < flat_t.scaleout_bytes_per_token


def test_traffic_tpot_reproduces_the_papers_bound_on_its_assumptions():
    # One GPU per node (all traffic scale-out), 32 tokens per GPU, each sent to 9 experts on 9 other GPUs, 1 B x
    # 7000 dispatched and 2 B x 7000 combined: the flow-level time is the paper's 120.96 us, TPOT 14.757 ms.
    place = Placement(10, 1, 10)
    src = torch.arange(10).repeat_interleave(32)
    idx = torch.stack([torch.tensor([e for e in range(10) if e != s]) for s in src.tolist()])
    traffic = ep_traffic(routing(idx, src, place), "flat", 7000, 14000)
    assert traffic.time_s(50, 200) == pytest.approx(120.96e-6, rel=1e-12)
    paper = ep_comm_bound(ModelConfig.preset("deepseek-v3-671b"), 50)
    assert traffic.tpot_s(50, 200, 61) == pytest.approx(paper.tpot_s, rel=1e-12)
    assert tpot_from_comm_time(1.0, 61, 2) == 122.0


def test_flow_time_is_the_most_loaded_port():
    z = torch.zeros(2, dtype=torch.float64)
    loads = LinkLoads(torch.tensor([1e9, 0.0]), torch.tensor([0.0, 3e9]), z, torch.tensor([0.0, 8e9]))
    assert loads.time_s(50, 200) == pytest.approx(max(3e9 / 50e9, 8e9 / 200e9))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: Placement(2, 2, 6), "n_experts: expected a multiple of the 4 ranks, got 6"),
    (lambda: Placement(0, 2, 8), "nodes: expected a positive integer"),
    (lambda: pair_rows(ROUTED, "ring"), "path: expected one of flat, hierarchical"),
    (lambda: routing(INDICES, SRC[:1], PLACE), r"src_rank: expected shape \[2\]"),
    (lambda: routing(INDICES, torch.tensor([0, 4]), PLACE), r"src_rank: expected ranks in \[0, 4\)"),
    (lambda: link_loads(pair_rows(ROUTED, "flat"), PLACE, 1, "torus"), "fabric: expected one of"),
    (lambda: ep_traffic(routing(INDICES[:0], SRC[:0], PLACE), "flat", 1, 1), "at least one token"),
])
def test_bad_input(call, match):
    with pytest.raises(TrafficError, match=match):
        call()
