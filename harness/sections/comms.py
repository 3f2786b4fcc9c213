"""Sections: multi-plane communication. Quick (analytic): the scale-out topologies of the paper's Table 3 with
their cost, the EP traffic of DeepSeek-V3's routing simulated at real size (flat vs hierarchical), and the TPOT
bound fed with that traffic per profile. Full: EP dispatch/combine run on a local world of processes (gloo; NCCL
on GPUs), checked against the single-process MoE and timed beside the model's prediction. Workloads:
harness.bench.comms, harness.analytic.traffic.
"""

from __future__ import annotations

import torch

from dsv3ref.comms.ep import backend_for
from dsv3ref.comms.topology import DEFAULT_PRICES, PRICE_MODELS, table3_topologies
from dsv3ref.config import ModelConfig
from harness import paper
from harness.analytic import ep_comm_bound
from harness.analytic.traffic import EPTraffic, Placement, Routing
from harness.bench import comms as bench
from harness.bench.common import torch_threads
from harness.distributed import LocalWorld
from harness.formatting import count, deviation, num
from harness.report_sections import ReportContext, Table, section

EP_RANKS = bench.V3_PLACEMENT[0] * bench.V3_PLACEMENT[1]


@section("comms", "Multi-plane network: topologies, EP traffic and TPOT", order=42)
def run_quick(ctx: ReportContext) -> list[Table]:
    models = ctx.measured_models(lambda m: m.moe is not None and m.moe.n_routed_experts % EP_RANKS == 0,
                                 ModelConfig.preset("deepseek-v3-671b"))
    with torch_threads(1):  # small tensors: one thread beats a contended pool
        return [_topology_table(), *(t for m in models for t in _traffic_tables(ctx, m))]


def _topology_table() -> Table:
    rows, records = [], []
    other = next(name for name in PRICE_MODELS if name != DEFAULT_PRICES)
    for topo in table3_topologies():
        refs = {m: paper.ref(m, topo.name) for m in ("topology_endpoints", "topology_switches", "topology_links",
                                                      "topology_cost_per_endpoint", "topology_cost_musd")}
        values = {m: r.value if r else None for m, r in refs.items()}
        records += bench.topology_records(topo, values)
        per_endpoint = {name: topo.cost_per_endpoint_usd(prices) / 1e3 for name, prices in PRICE_MODELS.items()}
        paper_k = values["topology_cost_per_endpoint"]
        rows.append([topo.name, ", ".join(f"{k}={v}" for k, v in topo.params),
                     *(f"{count(getattr(topo, a))} ({count(values[m])})" for m, a in
                       (("topology_endpoints", "endpoints"), ("topology_switches", "switches"),
                        ("topology_links", "links"))),
                     num(topo.cost_usd(PRICE_MODELS[DEFAULT_PRICES]) / 1e6, 1), num(values["topology_cost_musd"], 0),
                     num(per_endpoint[DEFAULT_PRICES], 2), num(paper_k), deviation(per_endpoint[DEFAULT_PRICES],
                                                                                   paper_k),
                     num(per_endpoint[other], 2), deviation(per_endpoint[other], paper_k)])
    two, five = PRICE_MODELS[DEFAULT_PRICES], PRICE_MODELS[other]
    notes = ["counts from the switch radix (64 ports, 400G): computed (paper); links are switch-to-switch links only, "
             "as in the paper; MRFT (8 rails) is not in Table 3: a rail-aligned FT2, same equipment",
             f"{DEFAULT_PRICES} prices: switch ${two.switch_usd:,.0f}, link ${two.link_usd:,.2f} ({two.source}); "
             "SF and DF are then predictions",
             f"{other} prices: switch ${five.switch_usd:,.0f}, link ${five.link_usd:,.0f}, endpoint link "
             f"${five.endpoint_link_usd:,.0f} ({five.source}); no non-negative switch/link/endpoint-link price "
             "triple reproduces all five totals within their rounding (+-0.5 M$), so the paper's cost method is not "
             "a linear price model of these counts",
             "the paper publishes no unit prices; its totals follow the Slim Fly NSDI'24 cost method",
             *(f"{ref.subject}: {ref.note}" for ref in (paper.ref("topology_switches", "SF"),
                                                        paper.ref("topology_switches", "DF")) if ref and ref.note)]
    headers = ["topology", "parameters", "endpoints (paper)", "switches (paper)", "links (paper)",
               f"cost M$ ({DEFAULT_PRICES})", "paper M$", "k$/endpoint", "paper", "dev", f"k$/endpoint ({other})",
               "dev"]
    return Table("Scale-out topologies and cost (Insights Table 3)", headers, rows, records, notes)


def _traffic_tables(ctx: ReportContext, cfg: ModelConfig) -> list[Table]:
    place = bench.v3_placement(cfg)
    routed = bench.simulated_routing(cfg, place, bench.V3_TOKENS_PER_GPU)
    traffic = {path: bench.v3_traffic(cfg, routed, path) for path in ("flat", "hierarchical")}
    records = [bench.traffic_record(cfg, place, t) for t in traffic.values()]
    rows = [[path, num(float(t.crossings.float().mean()), 2), int(t.crossings.max()),
             num(r.extra["dispatch_bytes_per_token"], 0), num(r.extra["combine_bytes_per_token"], 0),
             num(r.value, 0), num(t.dispatch.scaleup_total / t.tokens, 0)]
            for (path, t), r in zip(traffic.items(), records, strict=True)]
    m = cfg.moe
    limited = (f"one group per node: node-limited routing, M = {m.topk_group}" if m.n_group == place.nodes else
               "groups are not nodes: no node limit")
    notes = [f"{cfg.name}: {m.n_routed_experts} experts, top-{m.num_experts_per_tok}, {m.n_group} groups / "
             f"{m.topk_group} per token ({limited}); EP{EP_RANKS} over {place.nodes} nodes x {place.gpus_per_node} "
             f"GPUs, experts placed contiguously; {bench.V3_TOKENS_PER_GPU} tokens per GPU; simulated routing: "
             f"sigmoid of N(0, 1) logits, zero bias (seed {bench.ROUTING_SEED})",
             f"bytes per token per MoE layer: FP8 dispatch {cfg.hidden_size} B + fp32 1x128 scales, BF16 combine "
             f"{2 * cfg.hidden_size} B, per scale-out message; flat: one message per remote destination rank (up to "
             "k), hierarchical: one per remote destination node over the sender's plane (at most M), then NVLink "
             "forwarding",
             "NVLink B/token (dispatch), multi-plane fabric: flat messages to another plane first cross NVLink to the "
             "sender-node GPU on the destination's plane (PXN); the two paths put the same bytes on NVLink (both "
             "skip exactly the copies to same-plane GPUs of other nodes), the hierarchical one halves the scale-out"]
    headers = ["path", "scale-out msgs/token", "max", "dispatch B/token", "combine B/token", "scale-out B/token",
               "NVLink B/token (dispatch)"]
    return [Table(f"EP traffic of {cfg.name}'s routing at real size: flat vs hierarchical", headers, rows, records,
                  notes), _tpot_table(ctx, cfg, {place: routed})]


def _tpot_table(ctx: ReportContext, cfg: ModelConfig, routings: dict[Placement, Routing]) -> Table:
    rows, records, skipped = [], [], []
    cache: dict[tuple[Placement, str, str], EPTraffic] = {}
    for profile in ctx.profiles:
        place = bench.v3_placement(cfg, profile)
        if place is None:
            skipped.append(profile.name)
            continue
        if place not in routings:
            routings[place] = bench.simulated_routing(cfg, place, bench.V3_TOKENS_PER_GPU)
        paper_ms = paper.ref("tpot_ms", cfg.name, profile.name)
        bound = ep_comm_bound(cfg, profile.scaleout_GBps_per_gpu, "config-exact")
        cells = [profile.name, f"{place.nodes} x {place.gpus_per_node}", num(profile.scaleout_GBps_per_gpu, 0),
                 num(profile.scaleup_GBps_per_gpu, 0), num(bound.tpot_s * 1e3, 3)]
        for path, fabric in (("flat", "mrft"), ("flat", "mpft"), ("hierarchical", "mpft")):
            key = (place, path, fabric)
            if key not in cache:
                cache[key] = bench.v3_traffic(cfg, routings[place], path, fabric)
            rec = bench.tpot_traffic_record(cfg, profile, place, cache[key], paper_ms and paper_ms.value)
            records.append(rec)
            cells += [num(rec.value, 3), num(rec.extra["tokens_per_s"], 0)]
        rows.append(cells)
    notes = ["TPOT = MoE layers x 2 micro-batches x (dispatch + combine time), each the flow-level time of the "
             "all-to-all: its busiest NIC or NVLink port's bytes over that port's bandwidth (non-blocking fat-tree, "
             f"latency and compute hidden), simulated routing, {bench.V3_TOKENS_PER_GPU} tokens per GPU",
             f"{cfg.num_moe_layers} MoE layers (the paper's bound counts all {cfg.num_layers} layers, including the "
             "dense ones without EP traffic); the shared expert runs where the token is and sends nothing",
             "paper bound (config-exact): every token's (top-k + shared) copies cross the scale-out link, one expert "
             "per GPU (harness.analytic.tpot)",
             "flat/MRFT: each message leaves by the sender's own NIC (rails meet at the spines); flat/MPFT: messages "
             "to another plane first cross NVLink (PXN) and leave by another GPU's NIC; hierarchical: one scale-out "
             "message per remote node on the sender's own plane, then NVLink forwarding (the same on MPFT and MRFT)",
             "nodes: the profile's NVLink domain (NVL72: the whole EP group in one domain, no scale-out traffic)"]
    if skipped:
        notes.append(f"not applicable (no scale-up or scale-out link, or a domain not dividing {EP_RANKS}): "
                     f"{', '.join(skipped)}")
    headers = ["profile", "nodes x GPUs", "NIC GB/s", "NVLink GB/s", "paper bound ms", "flat MRFT ms", "tok/s",
               "flat MPFT ms", "tok/s", "hierarchical ms", "tok/s"]
    return Table(f"TPOT bound fed with {cfg.name}'s routed EP traffic (EP{EP_RANKS}, FP8 dispatch, BF16 combine)",
                 headers, rows, records, notes)


@section("comms_full", "EP dispatch/combine on a local world: measured vs model", order=68, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    ranks = bench.WORLD[0] * bench.WORLD[1]
    if ctx.device == "cuda" and torch.cuda.device_count() < ranks:
        ranks = torch.cuda.device_count()
    case = bench.bench_case()
    if ranks != bench.WORLD[0] * bench.WORLD[1]:
        case = bench.EPCase(1, (case.tokens[0],) * ranks, case.hidden, 4 * ranks, case.topk, 1, case.seed,
                            case.dtype, case.dispatch_fmt, case.combine_fmt, inter=case.inter)
    ctx.progress(f"comms: starting {ranks} ranks ({backend_for(ctx.device)}) and running EP dispatch/combine ...")
    specs, runs = ("reference", "hierarchical"), []
    with LocalWorld(ranks, backend_for(ctx.device)) as world:
        for spec in specs:
            ctx.progress(f"comms: EP dispatch/combine, {spec}, {ranks} ranks ...")
            runs.append(bench.run_ep(world.run, spec, case, reps=7))
            ctx.fraction(len(runs) / len(specs))
    rows, records = [], []
    for run in runs:
        scaleout, dispatch, combine = run.records
        records += run.records
        rows.append([run.spec, run.path, f"{run.error:.2e} (< {run.bound:g})", num(scaleout.value, 1),
                     num(scaleout.extra["analytic"], 1), "yes" if run.bytes_match else "NO",
                     *(cell for r in (dispatch, combine) for cell in
                       (num(r.value, 3), num(r.extra["time_s"] * 1e3, 2), num(r.extra["predicted_time_s"] * 1e3, 2)))])
    first = runs[0].records[1].extra
    notes = [f"{case.nodes} nodes x {case.gpus_per_node} ranks on this machine ({first['device']}, "
             f"{backend_for(ctx.device)}, {first['threads']} thread(s) per rank, load average "
             f"{min(r.extra['loadavg_1min'] for r in records):.2f}-{max(r.extra['loadavg_1min'] for r in records):.2f})"
             f"; {case.tokens[0]} tokens per rank, hidden {case.hidden}, {case.experts} experts top-{case.topk}, node "
             f"limit {case.node_limit}, {case.dtype} activations, {case.dispatch_fmt} dispatch, {case.combine_fmt} "
             "combine",
             f"EP MoE error: worst rank, against the single-process MoE on the same tokens ({runs[0].rule})",
             "scale-out B/token: dispatch + combine payload bytes the ranks' counters put on the scale-out planes, "
             "against the traffic model's count for the same routing",
             "GB/s per rank: the slowest rank's bytes (all links) / the median time over repetitions (each after a "
             "barrier); predicted: those bytes over the bandwidth of a plain uniform all-to-all measured in the same "
             "run (on one machine every link is loopback: the model's topology does not apply)"]
    headers = ["impl", "path", "EP MoE error", "scale-out B/token", "model", "counters = model", "dispatch GB/s/rank",
               "ms", "predicted ms", "combine GB/s/rank", "ms", "predicted ms"]
    return [Table("EP dispatch/combine on a local world (gloo on CPU): measured vs model", headers, rows, records,
                  notes)]
