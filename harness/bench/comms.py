"""Expert-parallel workloads and their records: the cases the conformance suite and the benchmarks run on every
rank of a world (started by `harness.distributed.LocalWorld`, or by torchrun: `harness.bench.ep_worker`), the
simulated DeepSeek-V3 routing at real size for the traffic tables, and the record builders.

Rank-side jobs are module-level functions of (implementation spec, case); each rank derives its inputs from the
case's seed and its rank alone, so the parent (and every rank) can rebuild any rank's inputs and the
single-process references without communication.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.distributed as dist

from dsv3ref.comms.ep import EPGroup, LinkBytes, ep_group, payload_bytes
from dsv3ref.comms.ep_moe import EPMoE, node_limited
from dsv3ref.comms.topology import PRICE_MODELS, Topology
from dsv3ref.config import ModelConfig, MoEConfig
from dsv3ref.fp8.quant import dequant_1x128, quant_1x128
from dsv3ref.moe import MoE, loop_experts, select_experts
from hardware.profile import Profile
from harness.analytic.traffic import EPTraffic, Placement, Routing, ep_traffic, routing
from harness.bench.common import conditions
from harness.numerics import CALC_DIFF_BF16, F64_IDENTITY_RTOL, calc_diff, max_rel_err
from harness.registry import not_applicable, resolve
from harness.results import Record

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
WORLD = (2, 2)  # nodes x ranks per node of the local world the suites and the full report start
V3_PLACEMENT = (8, 8)  # DeepSeek-V3's EP64 over 8 nodes of 8 GPUs (4 routed experts per GPU; training)
V3_TOKENS_PER_GPU = 32  # the paper's decode assumption (Insights §2.3.2)
ROUTING_SEED = 0


# --- cases ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EPCase:
    """One EP run: `tokens[r]` tokens on rank r, `gpus_per_node` ranks per node, a MoE of `experts` experts (top-k,
    node limit M, `shared` shared experts, width `inter`) in `dtype`, dispatched in `dispatch_fmt` and combined in
    `combine_fmt`. `drop`: fraction of routing slots set to -1 in `raw_routing`."""

    gpus_per_node: int
    tokens: tuple[int, ...]
    hidden: int
    experts: int
    topk: int
    node_limit: int
    seed: int
    dtype: str = "float64"
    dispatch_fmt: str = "native"
    combine_fmt: str = "native"
    shared: int = 1
    inter: int = 16
    drop: float = 0.0

    @property
    def world(self) -> int:
        return len(self.tokens)

    @property
    def nodes(self) -> int:
        return self.world // self.gpus_per_node

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def placement(self) -> Placement:
        return Placement(self.nodes, self.gpus_per_node, self.experts)


def case_config(case: EPCase) -> ModelConfig:
    """The MoE of a case with node-limited routing over its nodes (sigmoid, selection bias, route scale 2.5)."""
    moe = MoEConfig(n_routed_experts=case.experts, num_experts_per_tok=case.topk, moe_intermediate_size=case.inter,
                    n_shared_experts=case.shared, route_scale=2.5, bias=True)
    base = ModelConfig.preset("dsv3-tiny").replace(name="ep-case", hidden_size=case.hidden, moe=moe)
    return node_limited(base, case.nodes, case.node_limit)


def case_moe(case: EPCase, dtype: torch.dtype | None = None) -> MoE:
    """The case's MoE layer (reference loop), identical on every rank: weights and selection bias from its seed."""
    cfg = case_config(case)
    with torch.random.fork_rng():
        torch.manual_seed(case.seed)
        moe = MoE(cfg, backend="loop")
        with torch.no_grad():
            moe.gate.weight.normal_(0.0, 2.0 / case.hidden ** 0.5)  # spread scores: distinct top-k
            moe.gate.bias.normal_(0.0, 0.1)
    return moe.to(case.torch_dtype if dtype is None else dtype)


def case_tokens(case: EPCase, rank: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rank `rank`'s tokens [tokens[rank], hidden]: N(0, 1) from (seed, rank), rounded to the case's dtype."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank)
    x = torch.randn(case.tokens[rank], case.hidden, generator=gen, dtype=torch.float64)
    return x.to(case.torch_dtype if dtype is None else dtype)


def raw_routing(case: EPCase, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing without a router (for the transport properties): k distinct random experts per token, each slot
    -1 with probability `drop`; weights uniform in [0.5, 1.5), in the case's dtype."""
    gen = torch.Generator().manual_seed(case.seed * 1000 + rank + 500)
    n = case.tokens[rank]
    idx = torch.stack([torch.randperm(case.experts, generator=gen)[:case.topk] for _ in range(n)]) if n else \
        torch.empty(0, case.topk, dtype=torch.long)
    idx = torch.where(torch.rand(idx.shape, generator=gen) < case.drop, torch.full_like(idx, -1), idx)
    weights = (0.5 + torch.rand(idx.shape, generator=gen, dtype=torch.float64)).to(case.torch_dtype)
    return idx, weights


# --- rank side -----------------------------------------------------------------------------------------------------
@cache
def ep_impl(spec: str) -> Any:
    """The `ep` implementation named `spec` (a registered name or module:factory), built once per process."""
    return next(i for i in resolve(spec) if i.component == "ep").create()


_GROUPS: dict[int, EPGroup] = {}


def rank_group(gpus_per_node: int) -> EPGroup:
    """This rank's EP group with `gpus_per_node` ranks per node (created once per process; collective)."""
    if gpus_per_node not in _GROUPS:
        _GROUPS[gpus_per_node] = ep_group(gpus_per_node)
    return _GROUPS[gpus_per_node]


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    """A tensor safe to send to the parent: on the CPU, FP8 viewed as its bytes."""
    if t is None:
        return None
    t = t.detach().cpu()
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def transport_job(spec: str, case: EPCase) -> dict[str, Any]:
    """Dispatch this rank's tokens (raw routing) through `spec`, then combine the received activations unchanged
    (identity experts); the inputs, what arrived, the combined tokens and the link bytes of both calls."""
    ep, impl = rank_group(case.gpus_per_node), ep_impl(spec)
    x = case_tokens(case, ep.rank).to(ep.device)
    idx, weights = (t.to(ep.device) for t in raw_routing(case, ep.rank))
    sent, back = LinkBytes.zeros(ep.gpus_per_node), LinkBytes.zeros(ep.gpus_per_node)
    got = impl.dispatch(ep, x, idx, weights, case.experts, case.dispatch_fmt, sent)
    combined = impl.combine(ep, got.activations(x.dtype), got.handle, case.combine_fmt, back)
    return {"x": _cpu(got.x), "scales": _cpu(got.scales), "topk_idx": _cpu(got.topk_idx),
            "topk_weights": _cpu(got.topk_weights), "src_rank": _cpu(got.src_rank), "src_token": _cpu(got.src_token),
            "combined": _cpu(combined), "dispatch_bytes": sent, "combine_bytes": back}


def dispatch_rounded(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x as the experts see it after a dispatch in `fmt`: FP8 quantized and dequantized (1x128), else x in BF16
    for "bf16" and x itself for "native", back in x's dtype."""
    if fmt == "fp8":
        return dequant_1x128(*quant_1x128(x), x.dtype)
    return x.to(torch.bfloat16).to(x.dtype) if fmt == "bf16" else x


def _single_process(moe: MoE, x: torch.Tensor, routed_x: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
    """The MoE layer's output in one process for a given routing: routed experts on `routed_x`, shared on x."""
    y = loop_experts(moe, routed_x, weights, indices)
    return y if moe.shared_experts is None else y + moe.shared_experts(x)


def moe_job(spec: str, case: EPCase) -> dict[str, Any]:
    """The case's EP MoE over `spec` on this rank's tokens; with the routing, the link bytes of its dispatch and
    combine, and two single-process references for the same routing, whose routed experts see x after the dispatch
    format's rounding: `reference` in the case's dtype, `truth` in float64 (from the same weights and inputs)."""
    ep, impl = rank_group(case.gpus_per_node), ep_impl(spec)
    moe = case_moe(case).to(ep.device)
    x = case_tokens(case, ep.rank).to(ep.device)
    layer = EPMoE(moe, ep, impl, case.dispatch_fmt, case.combine_fmt)
    with torch.no_grad():
        out = layer(x)
        weights, indices = moe.gate(x)
        routed_x = dispatch_rounded(x, case.dispatch_fmt)
        reference = _single_process(moe, x, routed_x, weights, indices)
        exact = copy.deepcopy(moe).double()
        truth = _single_process(exact, x.double(), routed_x.double(), weights.double(), indices)
    return {"out": _cpu(out), "reference": _cpu(reference), "truth": _cpu(truth), "indices": _cpu(indices),
            "dispatch_bytes": layer.dispatch_bytes, "combine_bytes": layer.combine_bytes}


BAD_INPUTS = ("experts", "hidden", "dtype", "topk", "fmt")  # dispatch inputs (any implementation)
BAD_SETUPS = ("gpus_per_node", "node_limit")  # the EP group and the routing (dsv3ref's)


def bad_input_job(spec: str, case: EPCase, kind: str) -> str | None:
    """One bad input, and the error message this rank raised (None if it raised none). Dispatch inputs: experts
    not divisible by the ranks, or rank 1's hidden size, dtype, k or format differing from the others'. Setups:
    an EP group whose ranks per node do not divide the world, a node limit above the number of nodes."""
    try:
        if kind == "gpus_per_node":
            ep_group(case.world + 1)
        elif kind == "node_limit":
            case_config(dataclasses.replace(case, node_limit=case.nodes + 1))
        else:
            _bad_dispatch(spec, case, kind)
    except ValueError as e:
        return str(e)
    return None


def _bad_dispatch(spec: str, case: EPCase, kind: str) -> None:
    ep, impl = rank_group(case.gpus_per_node), ep_impl(spec)
    odd = ep.rank == 1
    x = case_tokens(case, ep.rank, torch.float32 if kind == "dtype" and odd else None)
    if kind == "hidden" and odd:
        x = torch.cat([x, x[:, :1]], dim=1)
    idx, weights = raw_routing(case, ep.rank)
    if kind == "topk" and odd:
        idx, weights = idx[:, :-1], weights[:, :-1]
    experts = case.experts + 1 if kind == "experts" else case.experts
    fmt = "bf16" if kind == "fmt" and odd else case.dispatch_fmt
    impl.dispatch(ep, x.to(ep.device), idx.to(ep.device), weights.to(ep.device), experts, fmt)


FAULTS = ("die", "stall")


def fault_job(spec: str, case: EPCase, kind: str, seconds: float = 0.0) -> None:
    """Rank 1 dies (exit code 3) or stalls for `seconds` right before a dispatch the other ranks enter: the
    never-hang tests (the others must fail with a clear error, the parent must report every rank's fate)."""
    ep, impl = rank_group(case.gpus_per_node), ep_impl(spec)
    if ep.rank == 1:
        if kind == "die":
            os._exit(3)
        time.sleep(seconds)
    idx, weights = raw_routing(case, ep.rank)
    impl.dispatch(ep, case_tokens(case, ep.rank), idx, weights, case.experts)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn(*args) after a barrier, and this rank's seconds until it returned (CUDA synchronised)."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def timing_job(spec: str, case: EPCase, reps: int) -> dict[str, Any]:
    """Time the case's dispatch and combine (the routed activations, identity experts) `reps` times after one
    warm-up, each after a barrier, beside a plain uniform all-to-all of as many bytes (the loopback or fabric
    bandwidth the model is fed with). Per-rank seconds and the bytes this rank sent."""
    ep, impl = rank_group(case.gpus_per_node), ep_impl(spec)
    moe = case_moe(case).to(ep.device)
    x = case_tokens(case, ep.rank).to(ep.device)
    with torch.no_grad():
        weights, idx = moe.gate(x)
    times: dict[str, list[float]] = {"dispatch": [], "combine": [], "all_to_all": []}
    sent, back = LinkBytes.zeros(ep.gpus_per_node), LinkBytes.zeros(ep.gpus_per_node)
    for rep in range(reps + 1):  # rep 0: warm-up, counted once
        got, t_d = _timed(impl.dispatch, ep, x, idx, weights, case.experts, case.dispatch_fmt,
                          sent if rep == 0 else None)
        _, t_c = _timed(impl.combine, ep, got.activations(x.dtype), got.handle, case.combine_fmt,
                        back if rep == 0 else None)
        if rep:
            times["dispatch"].append(t_d)
            times["combine"].append(t_c)
    per_peer = torch.tensor([max(1, (sent.scaleout_total + sent.scaleup) // ep.world_size)], device=ep.device)
    dist.all_reduce(per_peer, op=dist.ReduceOp.MAX)  # every rank sends as much as the busiest one's dispatch
    buffer = torch.zeros(int(per_peer) * ep.world_size, dtype=torch.uint8, device=ep.device)
    out = torch.empty_like(buffer)
    for rep in range(reps + 1):
        _, t = _timed(dist.all_to_all_single, out, buffer)
        if rep:
            times["all_to_all"].append(t)
    return {"times": times, "dispatch_bytes": sent, "combine_bytes": back, "all_to_all_bytes": buffer.numel(),
            "tokens": x.shape[0], **conditions(ep.device.type)}


# --- parent side: the measured EP benchmark ----------------------------------------------------------------------
def bench_case(seed: int = 0, tokens: int = 256, hidden: int = 512) -> EPCase:
    """The benchmark's case on the local world (2 nodes x 2 ranks): 16 experts (4 per rank), top-4, node limit
    M = 1 (of 2 nodes), FP8 dispatch and BF16 combine of fp32 activations."""
    nodes, gpus = WORLD
    return EPCase(gpus, (tokens,) * (nodes * gpus), hidden, 16, 4, 1, seed, "float32", "fp8", "bf16", inter=64)


def _rank_sent(counters: list[LinkBytes]) -> list[int]:
    return [c.scaleout_total + c.scaleup for c in counters]


def measured_records(spec: str, path: str, case: EPCase, results: list[dict[str, Any]]) -> list[Record]:
    """Records of one timing run: ep_scaleout_bytes_per_token (measured, from the counters; the traffic model's
    count for the same routing in `analytic`) and the dispatch/combine throughput per rank with the model's
    prediction (each rank's bytes over the plain all-to-all's bandwidth, slowest rank)."""
    tokens = sum(r["tokens"] for r in results)
    disp = [r["dispatch_bytes"] for r in results]
    comb = [r["combine_bytes"] for r in results]
    scaleout = sum(c.scaleout_total for c in disp + comb)
    moe = case_moe(case, torch.float32)
    indices = torch.cat([moe.gate(case_tokens(case, r, torch.float32))[1] for r in range(case.world)])
    src = torch.cat([torch.full((n,), r) for r, n in enumerate(case.tokens)])
    dispatch_row = payload_bytes(case.hidden, case.torch_dtype, case.dispatch_fmt)
    combine_row = payload_bytes(case.hidden, case.torch_dtype, case.combine_fmt)
    model = ep_traffic(routing(indices, src, case.placement), path, dispatch_row, combine_row)
    common = {"impl": spec, "path": path, "nodes": case.nodes, "gpus_per_node": case.gpus_per_node,
              "tokens_per_rank": case.tokens[0], "hidden": case.hidden, "experts": case.experts, "topk": case.topk,
              "node_limit": case.node_limit, "dispatch_fmt": case.dispatch_fmt, "combine_fmt": case.combine_fmt,
              "dtype": case.dtype, **{k: results[0][k] for k in ("device", "threads", "loadavg_1min")}}
    records = [Record("ep_scaleout_bytes_per_token", path, scaleout / tokens, "B", kind="measured",
                      method="link-byte-counters",
                      extra={**common, "analytic": model.scaleout_bytes_per_token,
                             "crossings_max": int(model.crossings.max())})]
    a2a = statistics.median(max(ts) for ts in zip(*(r["times"]["all_to_all"] for r in results), strict=True))
    bandwidth = results[0]["all_to_all_bytes"] * (case.world - 1) / case.world / a2a  # B/s each rank sends
    for op, counters in (("dispatch", disp), ("combine", comb)):
        per_rep = [max(ts) for ts in zip(*(r["times"][op] for r in results), strict=True)]
        sent = _rank_sent(counters)
        median = statistics.median(per_rep)
        records.append(Record("ep_throughput_GBps_per_rank", f"{path}/{op}", max(sent) / median / 1e9, "GB/s",
                              kind="measured", method="slowest rank's bytes / median time",
                              extra={**common, "time_s": median, "samples_s": per_rep, "bytes_per_rank": sent,
                                     "predicted_time_s": max(sent) / bandwidth,
                                     "all_to_all_GBps_per_rank": bandwidth / 1e9}))
    return records


def impl_path(spec: str) -> str:
    """The traffic-model path of an implementation: hierarchical when it deduplicates per node, else flat."""
    return "flat" if "node_dedup" in not_applicable(ep_impl(spec)) else "hierarchical"


@dataclass(frozen=True)
class EPRun:
    """One implementation's EP run on a world: the EP MoE against the single-process reference (`error` by
    `rule`, which must stay below `bound`) and the timing records (measured bytes beside the model's)."""

    spec: str
    path: str
    error: float
    rule: str
    bound: float
    records: list[Record]

    @property
    def bytes_match(self) -> bool:
        """The link byte counters equal the traffic model's count."""
        scaleout = self.records[0]
        return scaleout.value == scaleout.extra["analytic"]

    @property
    def ok(self) -> bool:
        return self.error <= self.bound and self.bytes_match


def run_ep(run: Callable[..., list[Any]], spec: str, case: EPCase, reps: int) -> EPRun:
    """Check and time `spec` on a world: `run(job, *args)` runs a rank-side job on every rank and returns the
    per-rank results (`LocalWorld.run`, or `gathered` under torchrun)."""
    outputs = [(r["out"], r["reference"]) for r in run(moe_job, spec, case) if r["out"].numel()]
    if case.dtype == "float64":
        rule, bound = "max_rel_err (float64 identity)", F64_IDENTITY_RTOL
        error = max((max_rel_err(o, ref) for o, ref in outputs), default=0.0)
    else:
        rule, bound = "calc_diff (DeepGEMM's BF16 bound)", CALC_DIFF_BF16
        error = max((calc_diff(o, ref) for o, ref in outputs), default=0.0)
    path = impl_path(spec)
    return EPRun(spec, path, error, rule, bound, measured_records(spec, path, case, run(timing_job, spec, case, reps)))


def gathered(job: Callable[..., Any], *args: Any) -> list[Any]:
    """Run a rank-side job on this rank and gather every rank's result (for worlds launched by torchrun)."""
    results: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(results, job(*args))
    return results


# --- simulated DeepSeek-V3 routing at real size (analytic tables) --------------------------------------------------
def simulated_routing(cfg: ModelConfig, placement: Placement, tokens_per_rank: int,
                      seed: int = ROUTING_SEED) -> Routing:
    """Routing of `tokens_per_rank` tokens on every rank through the config's router rule (sigmoid affinities of
    N(0, 1) logits, zero bias, group-limited top-k)."""
    gen = torch.Generator().manual_seed(seed)
    n = placement.ranks * tokens_per_rank
    scores = torch.randn(n, cfg.moe.n_routed_experts, generator=gen).sigmoid()
    indices = select_experts(scores, torch.zeros(cfg.moe.n_routed_experts), cfg.moe)
    return routing(indices, torch.arange(placement.ranks).repeat_interleave(tokens_per_rank), placement)


def v3_placement(cfg: ModelConfig, profile: Profile | None = None) -> Placement | None:
    """EP64 of `cfg` placed on a profile: nodes of its scale-up domain (the whole domain when it spans nodes, as on
    NVL72), or DeepSeek-V3's 8 x 8 without a profile; None when the profile cannot host it (no scale-up or
    scale-out link, or a domain that does not divide 64 ranks)."""
    nodes, gpus = V3_PLACEMENT
    ranks = nodes * gpus
    if profile is not None:
        if not profile.scaleup_GBps_per_gpu or not profile.scaleout_GBps_per_gpu:
            return None
        gpus = min(max(profile.scaleup_domain_gpus, profile.gpus_per_node), ranks)
        if ranks % gpus:
            return None
    return Placement(ranks // gpus, gpus, cfg.moe.n_routed_experts)


def v3_traffic(cfg: ModelConfig, r: Routing, path: str, fabric: str = "mpft") -> EPTraffic:
    """Traffic of a routing of `cfg`'s tokens with FP8 dispatch (with its scales) and BF16 combine."""
    return ep_traffic(r, path, payload_bytes(cfg.hidden_size, torch.bfloat16, "fp8"),
                      payload_bytes(cfg.hidden_size, torch.bfloat16, "bf16"), fabric)


def traffic_record(cfg: ModelConfig, placement: Placement, traffic: EPTraffic) -> Record:
    """ep_scaleout_bytes_per_token (analytic) of simulated routing."""
    return Record("ep_scaleout_bytes_per_token", traffic.path, traffic.scaleout_bytes_per_token, "B",
                  method="simulated-routing",
                  extra={"model": cfg.name, "nodes": placement.nodes, "gpus_per_node": placement.gpus_per_node,
                         "tokens_per_gpu": V3_TOKENS_PER_GPU, "dispatch_fmt": "fp8", "combine_fmt": "bf16",
                         "dispatch_bytes_per_token": traffic.dispatch.scaleout_total / traffic.tokens,
                         "combine_bytes_per_token": traffic.combine.scaleout_total / traffic.tokens,
                         "crossings_mean": float(traffic.crossings.float().mean()),
                         "crossings_max": int(traffic.crossings.max()), "seed": ROUTING_SEED})


def tpot_traffic_record(cfg: ModelConfig, profile: Profile, placement: Placement, traffic: EPTraffic,
                        paper_ms: float | None) -> Record:
    """tpot_ms of the paper's bound fed with simulated traffic: every MoE layer pays the flow-level dispatch +
    combine time of its busiest port per micro-batch (2 micro-batches), on the profile's links."""
    up, out = profile.scaleup_GBps_per_gpu, profile.scaleout_GBps_per_gpu
    t = traffic.time_s(out, up)
    return Record("tpot_ms", cfg.name, traffic.tpot_s(out, up, cfg.num_moe_layers) * 1e3, "ms", profile=profile.name,
                  paper=paper_ms, method=f"ep-traffic-{traffic.path}-{traffic.fabric}",
                  extra={"comm_time_us": t * 1e6, "layers": cfg.num_moe_layers, "micro_batches": 2,
                         "nodes": placement.nodes, "gpus_per_node": placement.gpus_per_node,
                         "tokens_per_gpu": V3_TOKENS_PER_GPU, "scaleout_GBps": out, "scaleup_GBps": up,
                         "tokens_per_s": 1.0 / traffic.tpot_s(out, up, cfg.num_moe_layers)})


# --- topology records ---------------------------------------------------------------------------------------------
TOPOLOGY_METRICS = (("topology_endpoints", "endpoints", "count"), ("topology_switches", "switches", "count"),
                    ("topology_links", "links", "count"))


def topology_records(topo: Topology, paper: dict[str, float | None]) -> list[Record]:
    """Counts (exact) and cost per endpoint under every price model; `paper` maps metric -> the paper's value."""
    params = dict(topo.params)
    records = [Record(metric, topo.name, getattr(topo, attr), unit, paper=paper.get(metric), method="formula",
                      extra=params) for metric, attr, unit in TOPOLOGY_METRICS]
    for prices in PRICE_MODELS.values():
        records.append(Record("topology_cost_per_endpoint", topo.name, topo.cost_per_endpoint_usd(prices) / 1e3,
                              "k$", paper=paper.get("topology_cost_per_endpoint"), method=prices.name,
                              extra={**params, "cost_musd": topo.cost_usd(prices) / 1e6,
                                     **{k: v for k, v in dataclasses.asdict(prices).items() if k != "name"}}))
    return records
