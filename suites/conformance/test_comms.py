"""Conformance of expert-parallel dispatch/combine (component `ep`) to DeepEP's normal-mode semantics, on a world
of processes on this machine (`ep_world`): 4 ranks on the CPU (gloo), one per GPU under --dsv3-device cuda
(NCCL). Each hypothesis example is a case (ranks per node, experts, top-k, node limit, tokens per rank including
none, hidden sizes across 128-wide FP8 tiles, dropped slots); every rank builds its inputs from the case's seed,
so the expectations here are computed in this process from the same inputs, with the torch layout reference.

Properties: each token reaches each rank holding one of its experts exactly once, in source-rank then token order,
with its local expert ids and weights; combine sums a token's copies (float64: to rounding; BF16 combine within
DeepGEMM's BF16 calc_diff bound of the dispatched values); the EP MoE equals the single-process MoE on the same
tokens (float64: to rounding; BF16 with BF16 or FP8 dispatch: the flash-attention rule); link byte counters equal
the traffic model's count; with node-limited routing and node deduplication a token crosses scale-out at most M
times; bad input raises on every rank.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dsv3ref.comms.dispatch import dispatch_layout
from dsv3ref.comms.ep import payload_bytes
from dsv3ref.fp8.quant import quant_1x128
from harness.analytic.traffic import Routing, pair_rows, routing, scaleout_crossings, sender_bytes
from harness.bench.comms import (
    BAD_INPUTS,
    EPCase,
    bad_input_job,
    case_tokens,
    dispatch_rounded,
    moe_job,
    raw_routing,
    transport_job,
)
from harness.cases import rebuild
from harness.numerics import CALC_DIFF_BF16, F64_IDENTITY_RTOL, calc_diff, max_rel_err, within_low_precision_rule
from harness.pytest_plugin import skip_if_not_applicable
from harness.registry import not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.distributed, pytest.mark.dsv3_component("ep")]

# Each example is a round of collectives on every rank: a third of the profile's examples (5 in CI), and no
# shrinking (a rank that fails mid-collective leaves the others waiting for the world's collective timeout at each
# shrink step): a failure reports the example that failed. `impl_name` is function-scoped but only names the
# parametrised implementation, so sharing it across examples is safe. The world: `ep_world` (suites/conftest.py).
EXAMPLES = max(3, settings.default.max_examples // 3)
distributed = settings(max_examples=EXAMPLES, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                              HealthCheck.data_too_large])
HIDDEN = (8, 24, 136)  # 136: two 1x128 FP8 tiles, the second partial


@st.composite
def cases(draw: st.DrawFn, world: int, dtype: str = "float64", dispatch_fmt: str = "native",
          combine_fmt: str = "native") -> EPCase:
    gpus = draw(st.sampled_from([g for g in (1, 2, 4) if world % g == 0]))
    nodes = world // gpus
    per_rank = draw(st.integers(2 if gpus == 1 else 1, 3))  # >= 2 experts per node (top-2 group score)
    limit = draw(st.integers(1, nodes))
    topk = draw(st.integers(1, min(6, limit * gpus * per_rank)))
    tokens = tuple(draw(st.lists(st.integers(0, 9), min_size=world, max_size=world)))
    return EPCase(gpus, tokens, draw(st.sampled_from(HIDDEN)), world * per_rank, topk, limit,
                  draw(st.integers(0, 2**16)), dtype, dispatch_fmt, combine_fmt, shared=draw(st.integers(0, 1)),
                  drop=draw(st.sampled_from([0.0, 0.3])))


def note_case(case: EPCase, job: str, spec: str, *calls: str) -> None:
    """The lines that rebuild this example on a local world of the same size (printed with a failure): the case,
    then what every rank returned (`results[rank]`), then `calls`."""
    rebuild(f"from harness.bench.comms import EPCase, {job}", "from harness.distributed import LocalWorld",
            f"case = {case!r}", f"with LocalWorld({case.world}, 'gloo') as world:",
            f"    results = world.run({job}, {spec!r}, case)", *calls)


def most(t: torch.Tensor) -> int:
    """The largest entry (0 for an empty tensor)."""
    return int(t.max()) if t.numel() else 0


def node_dedup(impl) -> bool:
    return "node_dedup" not in not_applicable(impl)


def expected_delivery(case: EPCase, rank: int) -> tuple[list[tuple[int, int]], torch.Tensor, torch.Tensor]:
    """(source rank, token) pairs `rank` must receive, in order, with their local expert ids and weights."""
    per_rank = case.experts // case.world
    pairs, ids, weights = [], [], []
    for src in range(case.world):
        idx, w = raw_routing(case, src)
        hit = dispatch_layout(idx, case.experts, case.world, case.gpus_per_node).is_token_in_rank[:, rank]
        for t in hit.nonzero().flatten().tolist():
            pairs.append((src, t))
            mine = (idx[t] // per_rank == rank) & (idx[t] >= 0)
            ids.append(torch.where(mine, idx[t] - rank * per_rank, -1))
            weights.append(w[t])
    k = case.topk
    return (pairs, torch.stack(ids) if ids else torch.empty(0, k, dtype=torch.long),
            torch.stack(weights) if weights else torch.empty(0, k, dtype=case.torch_dtype))


def copies(case: EPCase, rank: int) -> torch.Tensor:
    """[N, 1] ranks each of `rank`'s tokens is dispatched to."""
    idx, _ = raw_routing(case, rank)
    return dispatch_layout(idx, case.experts, case.world, case.gpus_per_node).is_token_in_rank.sum(-1, keepdim=True)


def all_routing(case: EPCase, indices: list[torch.Tensor]) -> Routing:
    """Every rank's routing as one decision (tokens of rank 0, then rank 1, ...)."""
    src = torch.cat([torch.full((i.shape[0],), r) for r, i in enumerate(indices)])
    return routing(torch.cat(indices), src, case.placement)


# --- dispatch ----------------------------------------------------------------------------------------------------
@distributed
@given(data=st.data())
def test_dispatch_delivers_each_token_once_per_destination_rank_in_order(impl, impl_name, ep_world, data):
    case = data.draw(cases(ep_world.world_size))
    skip_if_not_applicable(impl, "fp64")
    note_case(case, "transport_job", impl_name, "# rank r received results[r]['src_rank'], ['src_token'], ['x']")
    results = ep_world.run(transport_job, impl_name, case)
    per_rank = case.experts // case.world
    for rank, got in enumerate(results):
        pairs, ids, weights = expected_delivery(case, rank)
        arrived = list(zip(got["src_rank"].tolist(), got["src_token"].tolist(), strict=True))
        assert arrived == pairs, (f"rank {rank} received (source rank, token) {_first_difference(arrived, pairs)}")
        rows = [case_tokens(case, s)[t] for s, t in pairs]
        assert torch.equal(got["x"], torch.stack(rows) if rows else torch.empty(0, case.hidden, dtype=torch.float64)), \
            f"rank {rank}: the received rows are not the sent tokens bit for bit"
        assert torch.equal(got["topk_idx"], ids), f"rank {rank}: local expert ids {got['topk_idx'].tolist()}, " \
            f"expected {ids.tolist()} (-1 where the expert lives elsewhere)"
        assert torch.equal(got["topk_weights"], weights), f"rank {rank}: the routing weights changed in transit"
        # tokens per local expert: the all-reduced per-expert counts of the layout, this rank's slice
        total = sum(dispatch_layout(raw_routing(case, s)[0], case.experts, case.world,
                                    case.gpus_per_node).tokens_per_expert for s in range(case.world))
        local = torch.bincount(got["topk_idx"][got["topk_idx"] >= 0], minlength=per_rank)
        expected = total[rank * per_rank:(rank + 1) * per_rank]
        assert torch.equal(local, expected), (f"rank {rank}: tokens per local expert {local.tolist()}, the layout "
                                              f"counts {expected.tolist()}")


def _first_difference(got: list[tuple[int, int]], expected: list[tuple[int, int]]) -> str:
    """Where two delivery lists first differ, in words."""
    i = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    got_i, expected_i = (str(p[i]) if i < len(p) else "nothing" for p in (got, expected))
    return f"{len(got)} pairs, expected {len(expected)}; at position {i} {got_i}, expected {expected_i}"


@distributed
@given(data=st.data())
def test_combine_sums_each_tokens_copies(impl, impl_name, ep_world, data):
    # Identity experts: a token comes back once from every rank it reached, so the sum is x times that count
    # (DeepEP's check: combined / sum(is_token_in_rank) == x). Float64: only the summation rounds.
    case = data.draw(cases(ep_world.world_size))
    skip_if_not_applicable(impl, "fp64")
    note_case(case, "transport_job", impl_name, "# rank r's combined tokens: results[r]['combined']")
    results = ep_world.run(transport_job, impl_name, case)
    for rank, got in enumerate(results):
        n = copies(case, rank)
        expected = case_tokens(case, rank) * n
        assert got["combined"].shape == expected.shape, (f"rank {rank}: combine returned {tuple(got['combined'].shape)}"
                                                         f", expected {tuple(expected.shape)}")
        err = max_rel_err(got["combined"], expected)
        assert err <= F64_IDENTITY_RTOL, (f"rank {rank}: combined tokens are not each token x its copy count "
                                          f"{n.flatten().tolist()} (identity experts): max relative error {err:.2e}")
    sent = sum(int(c.sum()) for c in (copies(case, r) for r in range(case.world)))
    arrived = sum(got["x"].shape[0] for got in results)
    assert arrived == sent, f"{arrived} token copies arrived over all ranks, {sent} were sent"


@pytest.mark.parametrize(("dtype", "dispatch_fmt"), [("bfloat16", "bf16"), ("float32", "fp8")])
@distributed
@given(data=st.data())
def test_low_precision_dispatch_and_bf16_combine(impl, impl_name, ep_world, data, dtype, dispatch_fmt):
    # BF16 dispatch carries the bf16 rows bit-exactly; FP8 carries exactly quant_1x128's e4m3 bytes and fp32
    # scales. The BF16 combine of the received activations (identity experts) must then equal the dispatched
    # values times the copy count up to BF16 rounding of the partial sums (at most two roundings of 2^-9:
    # calc_diff < 8e-6): DeepGEMM's BF16 bound 1e-5. A lost or doubled copy is ~0.1 or more.
    if dispatch_fmt == "fp8":
        skip_if_not_applicable(impl, "fp8_dispatch")
    case = data.draw(cases(ep_world.world_size, dtype, dispatch_fmt, "bf16"))
    note_case(case, "transport_job", impl_name)
    results = ep_world.run(transport_job, impl_name, case)
    for rank, got in enumerate(results):
        pairs, _, _ = expected_delivery(case, rank)
        rows = torch.stack([case_tokens(case, s)[t] for s, t in pairs]) if pairs else \
            torch.empty(0, case.hidden, dtype=case.torch_dtype)
        if dispatch_fmt == "fp8":
            q, s = quant_1x128(rows)
            assert torch.equal(got["x"], q.view(torch.uint8)), f"rank {rank}: e4m3 bytes are not quant_1x128's"
            assert torch.equal(got["scales"], s), f"rank {rank}: the 1x128 scales are not quant_1x128's"
        else:
            assert torch.equal(got["x"], rows), f"rank {rank}: the bf16 rows changed in transit"
        expected = dispatch_rounded(case_tokens(case, rank), dispatch_fmt).double() * copies(case, rank)
        if expected.any():
            diff = calc_diff(got["combined"], expected)
            assert diff < CALC_DIFF_BF16, (f"rank {rank}: bf16 combine calc_diff {diff:.2e} >= {CALC_DIFF_BF16:.0e} "
                                           "against the dispatched values x their copy counts")


# --- the EP MoE --------------------------------------------------------------------------------------------------
@distributed
@given(data=st.data())
def test_ep_moe_equals_the_single_process_moe(impl, impl_name, ep_world, data):
    # Float64: the EP layer computes the same terms as the single-process MoE, summed in another order.
    skip_if_not_applicable(impl, "fp64")
    case = data.draw(cases(ep_world.world_size))
    note_case(case, "moe_job", impl_name, "# rank r: results[r]['out'] against results[r]['reference']")
    results = ep_world.run(moe_job, impl_name, case)
    for rank, got in enumerate(results):
        assert got["out"].shape == got["reference"].shape, f"rank {rank}: EP MoE output {tuple(got['out'].shape)}"
        err = max_rel_err(got["out"], got["reference"])
        assert err <= F64_IDENTITY_RTOL, (f"rank {rank}: the EP MoE differs from the single-process MoE by {err:.2e} "
                                          f"(max relative) > {F64_IDENTITY_RTOL:.0e} (float64)")
    routed = all_routing(case, [got["indices"] for got in results])
    reached = most(routed.layout.is_token_in_node.sum(-1))
    assert reached <= case.node_limit, f"a token reached {reached} nodes, the node limit is {case.node_limit}"


@pytest.mark.parametrize("dispatch_fmt", ["bf16", "fp8"])
@distributed
@given(data=st.data())
def test_ep_moe_in_bf16_within_the_error_of_a_single_process_bf16_moe(impl, impl_name, ep_world, data,
                                                                      dispatch_fmt):
    # BF16 activations and weights, BF16 combine; references for the same routing whose routed experts see x
    # after the dispatch format's rounding (FP8: quant_1x128 then dequant). Flash-attention rule, as the MoE suite
    # applies it: the EP output's error against the float64 truth (max over outputs, relative to the largest) within
    # 3x the error of the single-process BF16 MoE plus half a BF16 ulp: the two round differently (EP rounds each
    # rank's partial sum to BF16, the hierarchical path once more at the forwarding GPU, the reference each
    # accumulation step), so 2-3x is ordinary; a lost or doubled expert term is orders of magnitude larger.
    if dispatch_fmt == "fp8":
        skip_if_not_applicable(impl, "fp8_dispatch")
    case = data.draw(cases(ep_world.world_size, "bfloat16", dispatch_fmt, "bf16"))
    note_case(case, "moe_job", impl_name)
    for rank, got in enumerate(ep_world.run(moe_job, impl_name, case)):
        if got["out"].numel():
            check = within_low_precision_rule(got["out"], got["reference"], got["truth"], factor=3.0,
                                              floor=2.0 ** -9, metric=max_rel_err)
            assert check.ok, f"rank {rank}: bf16 EP MoE against the float64 truth: {check}"


# --- link bytes and node deduplication ---------------------------------------------------------------------------
@distributed
@given(data=st.data())
def test_link_bytes_equal_the_traffic_models_count(impl, impl_name, ep_world, data):
    # The counters of every rank equal the analytic count of the same routing: messages per destination from the
    # torch layout, on the multi-plane fabric (node deduplication: the hierarchical path, else flat).
    skip_if_not_applicable(impl, "link_bytes")
    fmt = data.draw(st.sampled_from(["native", "fp8"] if "fp8_dispatch" not in not_applicable(impl) else
                                    ["native"]))
    case = data.draw(cases(ep_world.world_size, "float32", fmt, "bf16"))
    note_case(case, "transport_job", impl_name, "# rank r's counters: results[r]['dispatch_bytes'], ['combine_bytes']")
    results = ep_world.run(transport_job, impl_name, case)
    routed = all_routing(case, [raw_routing(case, r)[0] for r in range(case.world)])
    stages = pair_rows(routed, "hierarchical" if node_dedup(impl) else "flat")
    for direction, key, row in (("dispatch", "dispatch_bytes", payload_bytes(case.hidden, torch.float32, fmt)),
                                ("combine", "combine_bytes", payload_bytes(case.hidden, torch.float32, "bf16"))):
        scaleout, scaleup = sender_bytes(stages, case.placement, row, reverse=direction == "combine")
        for rank, got in enumerate(results):
            assert got[key].scaleout == scaleout[rank].tolist(), (
                f"{direction}: rank {rank} counted {got[key].scaleout} scale-out bytes per plane, the traffic model "
                f"{scaleout[rank].tolist()}")
            assert got[key].scaleup == int(scaleup[rank]), (
                f"{direction}: rank {rank} counted {got[key].scaleup} scale-up bytes, the traffic model "
                f"{int(scaleup[rank])}")


@distributed
@given(data=st.data())
def test_node_dedup_crosses_scale_out_at_most_node_limit_times(impl, impl_name, ep_world, data):
    # With node-limited routing (M nodes) a deduplicating path sends one scale-out message per token and remote
    # destination node: the counted messages equal that sum, each token's at most M; flat sends one per remote
    # destination rank, up to k.
    skip_if_not_applicable(impl, "node_dedup")
    skip_if_not_applicable(impl, "link_bytes")
    case = data.draw(cases(ep_world.world_size, "float32", "native", "native"))
    note_case(case, "moe_job", impl_name)
    results = ep_world.run(moe_job, impl_name, case)
    routed = all_routing(case, [got["indices"] for got in results])
    hierarchical, flat = (scaleout_crossings(routed, path) for path in ("hierarchical", "flat"))
    messages = sum(got["dispatch_bytes"].scaleout_total for got in results) // payload_bytes(case.hidden,
                                                                                             torch.float32, "native")
    assert messages == int(hierarchical.sum()), (f"{messages} scale-out messages, expected one per token and remote "
                                                 f"destination node: {int(hierarchical.sum())}")
    assert int(hierarchical.sum()) <= int(flat.sum()) and most(hierarchical) <= case.node_limit
    assert most(flat) <= case.topk


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kind", "names"), [("experts", "n_experts"), ("hidden", "hidden"), ("dtype", "dtype"),
                                             ("topk", "k"), ("fmt", "fmt")])
def test_bad_input_raises_on_every_rank(impl, impl_name, ep_world, kind, names):
    skip_if_not_applicable(impl, "input_checks")
    if ep_world.world_size < 2:
        pytest.skip("a disagreement between ranks needs two ranks")
    assert kind in BAD_INPUTS
    case = EPCase(1, (3,) * ep_world.world_size, 16, 2 * ep_world.world_size, 2, 1, 7)
    messages = ep_world.run(bad_input_job, impl_name, case, kind)
    wrong = [(rank, m) for rank, m in enumerate(messages) if m is None or names not in m]
    assert not wrong, (f"bad {kind}: rank {wrong[0][0]} " + ("raised no ValueError" if wrong[0][1] is None else
                                                             f"raised {wrong[0][1]!r}, which does not name {names!r}"))
