"""Sections: DeepSeekMoE's activated parameters and layer FLOPs counted from a real forward (quick); the layer's
speed, grouped vs loop vs transformers, and the auxiliary-loss-free balancing experiment (full). Workloads:
harness.bench.moe and harness.experiments.balancing.
"""

from __future__ import annotations

import math

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.moe_grouped import CPU_GEMM_ROWS
from hardware.timing import time_interleaved
from harness import paper
from harness.analytic.params import param_counts
from harness.bench import moe as bench
from harness.bench.common import dtype_name, working_dtype
from harness.bench.mla import transformers_installed
from harness.experiments import balancing
from harness.formatting import billions, deviation, num, ratio_cell, with_quartiles
from harness.report_sections import ReportContext, Table, section


@section("moe", "DeepSeekMoE: activated parameters and layer FLOPs", order=14, quick=True)
def run_quick(ctx: ReportContext) -> list[Table]:
    """Count one MoE layer's forward of every model that has a MoE layer (a MoE section with first_k_dense_replace
    = num_layers has none: noted, not counted)."""
    rows, records = [], []
    no_moe_layer = [m.name for m in ctx.models if m.moe is not None and m.num_moe_layers == 0]
    for cfg in (m for m in ctx.models if m.num_moe_layers):
        ctx.progress(f"moe: counting one {cfg.name} MoE layer's forward ...")
        layer = bench.count_moe_layer(cfg)
        ref = paper.ref("params_activated", cfg.name)
        recs = bench.count_records(cfg, layer, ref and ref.value)
        records += recs
        activated, flops, analytic_flops = recs
        c = param_counts(cfg)
        analytic_layer = (c.router + c.shared_experts + c.activated_routed_experts) // cfg.num_moe_layers
        rows.append([cfg.name, f"{layer.params:,}", f"{analytic_layer:,}", billions(activated.value),
                     billions(c.activated), billions(ref.value, 1) if ref else "—",
                     deviation(activated.value, ref and ref.value), num(flops.value, 4), num(analytic_flops.value, 4)])
    headers = ["model", "MoE layer params/token (measured)", "analytic", "activated (measured)", "analytic",
               "paper", "dev", "MoE layer GFLOP/token (counted)", "analytic"]
    notes = [f"measured: one real-dimension BF16 MoE layer, {bench.COUNT_TOKENS} tokens forwarded one at a time; the "
             "parameters passed to torch functions during the forward (router weight and bias, the k selected "
             "experts, the shared experts) are counted; only the selected experts are materialised, the others "
             "stay on the meta device, so a forward touching them would fail",
             "activated (measured) = MoE layers x measured layer count + embedding, head, attention, dense FFN and "
             "norms from harness.analytic.params (the formula, not measured)",
             "GFLOP/token: counted over the same forward with torch.utils.flop_counter's formulas (matmuls, 2mnk); "
             "analytic: 2 D E (router) + 6 D I (k + shared)"]
    if no_moe_layer:
        notes.append(f"no MoE layer (moe.first_k_dense_replace = num_layers), nothing to count: "
                     f"{', '.join(no_moe_layer)}")
    return [Table("DeepSeekMoE: activated parameters and layer FLOPs counted from a forward", headers, rows,
                  records, notes)]


@section("moe_full", "DeepSeekMoE: layer speed and load balancing", order=64, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    dtype = working_dtype(ctx.local)
    speed = [_speed_table(ctx, cfg, dtype)
             for cfg in ctx.measured_models(lambda m: m.num_moe_layers > 0, bench.MID_CFG)]
    biased = ctx.measured_models(lambda m: m.moe is not None and m.moe.bias, ModelConfig.preset(balancing.MODEL))
    return speed + [_balancing_table(ctx, cfg) for cfg in biased]


def _speed_table(ctx: ReportContext, cfg: ModelConfig, dtype: torch.dtype) -> Table:
    m = cfg.moe
    ctx.progress(f"moe: building the {cfg.name} layer ({m.n_routed_experts} experts, top-{m.num_experts_per_tok}, "
                 f"hidden {cfg.hidden_size}, expert {m.moe_intermediate_size}) in {dtype_name(dtype)} ...")
    speed = bench.SpeedBench(cfg, ctx.device, transformers_installed(), dtype)
    others = [n for n in speed.modules if n != "grouped"]
    rows, records, peaks = [], [], []
    for tokens in bench.SPEED_TOKENS:
        ctx.progress(f"moe: timing {tokens} tokens ...")
        timings = time_interleaved(speed.forwards(tokens), device=ctx.device, warmup=1, reps=bench.reps_for(tokens))
        recs = bench.speed_records(speed, tokens, timings)
        records += recs
        ratio = {r.subject.removeprefix("grouped-vs-"): r for r in recs if r.metric == "moe_speedup"}
        fraction, bound = (next(r for r in recs if r.metric == "achieved_compute_fraction" and r.subject == s)
                           for s in ("grouped", bench.BOUND))
        peaks.append(fraction.extra["matmul_TFLOPS"])
        g = timings["grouped"]
        rows.append([tokens, num(g.median * 1e3, 2), num(g.iqr * 1e3, 2), num(tokens / g.median, 0),
                     *(ratio_cell(ratio.get(n)) for n in others), num(fraction.extra["matmul_TFLOPS"], 3),
                     *(with_quartiles(r.value, r.extra["per_round"], percent=True) for r in (fraction, bound))])
    segments_from = math.ceil(CPU_GEMM_ROWS[-1] * m.n_routed_experts / m.num_experts_per_tok)
    load = [r.extra["loadavg_1min"] for r in records]
    notes = [f"{cfg.name}: hidden {cfg.hidden_size}, {m.n_routed_experts} experts (top-{m.num_experts_per_tok}, "
             f"{m.n_group} groups / {m.topk_group}), expert width {m.moe_intermediate_size}, {m.n_shared_experts} "
             f"shared; {dtype_name(dtype)} with fp32 routers in every module (transformers' precision, so all select "
             f"the same experts), {ctx.device}, {torch.get_num_threads()} threads, load average "
             f"{min(load):.2f}-{max(load):.2f}; random weights, bias N(0, 0.01)",
             "ratios: median over rounds of the other's time / grouped's time in the same round (inter-quartile "
             "range over rounds in brackets), all modules timed side by side (each round runs every module once, "
             "in a shuffled order) over the same input; > 1x means grouped is faster",
             f"roofline: analytic FLOPs (router + experts) / grouped's time over the throughput of the local "
             f"probe's {speed.matmul[2]} in the same round, median over rounds ({num(min(peaks), 3)}-"
             f"{num(max(peaks), 3)} TFLOP/s across the batch sizes); where the machine's speed drifts (a shared VM), "
             "the matmul and the layer drift by different factors, so a round's fraction depends on the phase it ran "
             "in (records keep every round in per_round)",
             "expert matmuls alone: the same fraction for the layer's matmuls by themselves, one call per expert "
             "(router, each hit expert's three over its rows, the shared expert's), timed in the same rounds: the "
             f"bound of the per-expert segments path, which auto runs from {num(CPU_GEMM_ROWS[-1], 0)} rows per "
             f"expert on a CPU ({segments_from} tokens here); the gap to it is gather, SwiGLU, weighting, scatter "
             "and routing"]
    notes += [f"not run: {name}: {why}" for name, why in speed.skipped.items()]
    headers = ["tokens", "grouped ms", "IQR ms", "tokens/s", *(f"vs {n}" for n in others), "matmul TFLOP/s",
               "of matmul peak", "expert matmuls alone"]
    return Table(f"DeepSeekMoE layer forward ({cfg.name}, {dtype_name(dtype).upper()}): grouped vs loop vs "
                 "transformers", headers, rows, records, notes)


def _balancing_table(ctx: ReportContext, cfg: ModelConfig) -> Table:
    steps, tokens = balancing.PARAMS["steps"], balancing.PARAMS["tokens"]
    ctx.progress(f"moe: balancing experiment on {cfg.name}'s routing, {steps} batches x 2 runs ...")
    runs = balancing.balancing_runs(cfg.moe)
    rows = [[s, num(runs["bias-update"].max_over_mean[s - 1], 3), num(runs["no-balancing"].max_over_mean[s - 1], 3)]
            for s in balancing.CURVE_STEPS if s <= steps]
    rows.append(["final CV", num(runs["bias-update"].final.cv, 3), num(runs["no-balancing"].final.cv, 3)])
    reached = runs["bias-update"].first_step_at_or_below(balancing.TARGET)
    m, p = cfg.moe, balancing.PARAMS
    notes = [f"routing of {cfg.name}: {m.n_routed_experts} experts, top-{m.num_experts_per_tok}, {m.n_group} groups "
             f"/ {m.topk_group}, {m.score_func}; {tokens} tokens per batch, {steps} batches; logits N(0, 1) per token "
             f"plus a fixed per-expert skew N(0, {p['skew_std']}) (seed {p['seed']})",
             f"load = tokens per expert summed over the last {p['window']} batches (one batch's sampling noise alone "
             "gives max/mean ~1.25 at 256 experts); CV = std / mean of that load",
             f"bias update: gamma {p['gamma']}, bias -= gamma if over-loaded, += gamma if under-loaded, mean-centred; "
             f"max/mean first <= {balancing.TARGET} at batch {reached if reached else 'never'}"]
    return Table(f"Auxiliary-loss-free balancing ({cfg.name} routing): max/mean expert load per batch",
                 ["batch", "bias update", "no balancing"], rows,
                 balancing.balancing_records(runs, cfg.name, steps, tokens), notes)
