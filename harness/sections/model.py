"""Sections: the assembled model. Quick: DeepSeek-V3's decode TPOT predicted on every declared profile (per-operator
roofline plus the EP all-to-all, pure arithmetic), its operator breakdown, and the whole model's forward FLOPs
counted against the analytic total. Full: time per output token measured on the local device beside its
prediction, and cached decoding against recomputation. Workloads: harness.bench.model, harness.analytic.decode.
"""

from __future__ import annotations

import torch

from dsv3ref.config import ModelConfig
from hardware.profile import Profile
from harness.analytic.decode import deployment_step
from harness.bench import model as bench
from harness.bench.common import dtype_name, working_dtype
from harness.formatting import num, ratio_cell, with_quartiles
from harness.report_sections import ReportContext, Table, section

V3 = "deepseek-v3-671b"
BREAKDOWN_PROFILE = "h800"  # the operator breakdown's profile (the paper's hardware), else the first declared
GPU_PROFILE = "h200"  # on a GPU, measured TPOT is also shown beside this profile's prediction


def _predicted_models(ctx: ReportContext) -> list[ModelConfig]:
    """DeepSeek-V3 and any MLA + MoE model named with --model."""
    return [m for m in ctx.models if m.attention.kind == "mla" and m.moe is not None
            and (m.name == V3 or m in ctx.chosen)]


@section("model", "DeepSeek-V3 decode TPOT predicted on the declared profiles", order=41, quick=True)
def run_quick(ctx: ReportContext) -> list[Table]:
    declared = [p for p in ctx.profiles if p.name != "local"]
    tables = [_unit_table(cfg, declared) for cfg in _predicted_models(ctx)]
    if declared and tables:
        shown = next((p for p in declared if p.name == BREAKDOWN_PROFILE), declared[0])
        tables.append(_breakdown_table(_predicted_models(ctx)[0], shown))
    measured = ctx.measured_models(bench.fits_here, ModelConfig.preset(bench.FLOP_MODEL))
    ctx.progress(f"model: counting the forward FLOPs of {', '.join(m.name for m in measured)} (FlopCounterMode)")
    tables.append(_flops_table(ctx, measured))
    return tables


def _unit_table(cfg: ModelConfig, profiles: list[Profile]) -> Table:
    deployment = bench.DEFAULT_DEPLOYMENT
    rows, records = [], []
    for p in profiles:
        u = deployment_step(cfg, deployment, p)
        recs = bench.unit_records(u)
        records += recs
        ms, tps = recs
        e = ms.extra
        rows.append([p.name, f"EP{u.deployment.ep} {u.link}", u.experts_per_gpu, num(e["compute_ms"], 2),
                     num(e["all_to_all_ms"], 2), num(ms.value, 2), num(e["serial_ms"], 2),
                     num(ms.paper) if ms.paper else "—", num(tps.value, 1), num(e["tokens_per_s_per_gpu"], 0),
                     u.bound, e["dominant_op"], f"{e['memory_per_gpu_GB']:.0f} / {p.hbm_capacity_GB:.0f}"
                     + ("" if u.fits else " (does not fit)")])
    d = deployment
    notes = [f"deployment: {d.batch_per_gpu} sequences per GPU per micro-batch x {d.micro_batches} micro-batches, "
             f"context {d.context}, {d.weights.upper()} weights (e4m3 with 128x128 scales; embedding, head, router, "
             f"norms BF16), {d.kv.upper()} latent cache (absorbed MLA); attention, dense layers, router and head "
             "data-parallel (replicated, each GPU runs its own sequences); experts spread over the EP GPUs with "
             "the shared expert as a 9th always-selected one (k + 1 expert-token pairs per token), each GPU "
             "holding ceil(257 / EP) experts, all of them hit",
             f"EP: DeepSeek-V3's decode unit (EP{d.ep}, one expert per GPU, the extra GPUs holding redundant "
             "experts) over the scale-out network; inside one rack-scale NVLink domain when the profile has one "
             "(GB200 NVL72: EP72, 4 experts per GPU); a single GPU without a declared link",
             "compute: the per-operator roofline of one micro-batch (weights, cache rows, FLOPs at the profile's "
             "FP8 rate for FP8 weights and BF16 otherwise), times the micro-batches; all-to-all: dispatch (FP8) + "
             "combine (BF16) of one micro-batch per MoE layer (harness.analytic.tpot, hidden 7168, 58 MoE layers; "
             "the paper counts all 61 layers) times the micro-batches",
             "TPOT: dual micro-batch overlap (the paper's assumption): per MoE layer max(compute of a micro-batch, "
             "its all-to-all), per micro-batch; serial: compute + all-to-all without overlap; paper: the paper's "
             "EP-communication bound (all-to-all only, hidden rounded to 7K); tok/s: per sequence (1 / TPOT) and "
             "per GPU (sequences in flight / TPOT)",
             "left out: kernel launch and dispatch, activation traffic, overlap between operators, routing "
             "imbalance and redundant-expert placement, network latency, local (same-GPU) expert traffic"]
    headers = ["profile", "EP / link", "experts/GPU", "compute ms", "all-to-all ms", "TPOT ms", "serial ms",
               "paper bound ms", "tok/s/seq", "tok/s/GPU", "bound", "largest op", "GB/GPU / HBM"]
    return Table(f"{cfg.name} decode TPOT predicted (roofline + EP all-to-all)", headers, rows, records, notes)


def _breakdown_table(cfg: ModelConfig, profile: Profile) -> Table:
    u = deployment_step(cfg, bench.DEFAULT_DEPLOYMENT, profile)
    rows = []
    for op, r in zip(u.compute.ops, u.compute.rooflines, strict=True):
        rows.append([op.name, op.layers, num(op.weight_bytes / 1e6, 1), num(op.cache_bytes / 1e6, 1),
                     num(op.flops / 1e9, 1), op.dtype, num(r.memory_s * 1e6, 1), num(r.compute_s * 1e6, 1), r.bound])
    c = u.compute
    rows.append(["step", "", num(sum(o.weight_bytes for o in c.ops) / 1e6, 1),
                 num(sum(o.cache_bytes for o in c.ops) / 1e6, 1), num(c.flops / 1e9, 1), "",
                 num(c.memory_s * 1e6, 1), num(c.compute_s * 1e6, 1), c.bound])
    notes = [f"one micro-batch of {u.deployment.batch_per_gpu} sequences at context {u.deployment.context} on one "
             f"{profile.name} GPU of EP{u.deployment.ep} ({profile.hbm_bandwidth_GBps:,.0f} GB/s, "
             f"{profile.bf16_dense_TFLOPS:,.0f} BF16 / {profile.fp8_dense_TFLOPS or 0:,.0f} FP8 TFLOP/s); bytes "
             "and FLOPs summed over the layers each operator occurs in",
             "memory / compute us: each operator's bytes over the memory bandwidth and FLOPs over the matmul rate "
             "in its dtype; the step row sums the larger term of every operator (memory column: operators bound "
             "by memory, compute column: those bound by compute)",
             "attention: norms and projections (W_UK / W_UV absorption included); attn.cache: the cached latent "
             "rows (context + 1 per sequence) and the score / weighted-sum FLOPs; moe.routed: this GPU's experts "
             "over its k + 1 expert-token pairs per sequence"]
    headers = ["operator", "layers", "weights MB", "cache MB", "GFLOP", "dtype", "memory us", "compute us", "bound"]
    return Table(f"{cfg.name} decode step by operator on {profile.name} (one micro-batch)", headers, rows, [], notes)


def _flops_table(ctx: ReportContext, models: list[ModelConfig]) -> Table:
    rows, records = [], []
    for cfg in models:
        recs = bench.flop_records(bench.count_flops(cfg, ctx.device))
        records += recs
        for counted, analytic in zip(recs[::2], recs[1::2], strict=True):
            e = counted.extra
            rows.append([cfg.name, e["phase"], e["batch"], e["cached_tokens"], num(counted.value, 6),
                         num(analytic.value, 6), "yes" if counted.value == analytic.value else "NO"])
    notes = [f"the whole model (absorbed MLA, zero weights, fp32, per-expert MoE loop) under FlopCounterMode: a "
             f"prefill of {bench.FLOP_CONTEXT} tokens per row from position 0, then one decode step; logits at each "
             "row's last token; analytic: harness.analytic.flops.model_fwd_flops (attention per layer, dense FFN, "
             "router + k routed + shared experts, head); the naive mode is checked by the conformance suite"]
    headers = ["model", "phase", "batch", "cached", "GFLOP/token (counted)", "analytic", "equal"]
    return Table("Whole-model forward FLOPs, counted vs analytic", headers, rows, records, notes)


# --- full: measured on the local device ------------------------------------------------------------------------------


@section("model_tpot", "Decode TPOT measured vs predicted on the local device", order=68, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    dtype = working_dtype(ctx.local)
    chosen = [m for m in ctx.chosen if bench.fits_here(m)]
    # the --model ones that fit, else the small preset (overhead-bound here) and tpot-mid (memory-bound)
    plan = [(m, bench.TPOT_CONTEXTS) for m in chosen] or [(ModelConfig.preset(bench.TPOT_MODEL), bench.TPOT_CONTEXTS),
                                                          (bench.MID_CFG, bench.MID_CONTEXTS)]
    points, ratios = [], []
    total = len(bench.TPOT_BATCHES) * sum(_fits(cfg, c) for cfg, contexts in plan for c in contexts) \
        + len(bench.RECOMPUTE_NEW_TOKENS)  # measurements, for the progress bar
    for cfg, contexts in plan:
        ctx.progress(f"model: materialising {cfg.name} in {dtype_name(dtype)} on {ctx.device} ...")
        model = bench.bench_model(cfg, dtype, ctx.device)
        for batch in bench.TPOT_BATCHES:
            for context in (c for c in contexts if _fits(cfg, c)):
                ctx.progress(f"model: {cfg.name} greedy decode, batch {batch}, context {context} ...")
                points.append(bench.measure_tpot(model, batch, context, ctx.device, ctx.local))
                ctx.fraction((len(points) + len(ratios)) / total)
        if cfg is plan[0][0]:  # cached vs recomputed generation: the first model only (minutes otherwise)
            for n in bench.RECOMPUTE_NEW_TOKENS:
                ctx.progress(f"model: {cfg.name} generating {n} tokens, cached vs recomputed ...")
                ratios.append(bench.recompute_speedup(model, n, ctx.device))
                ctx.fraction((len(points) + len(ratios)) / total)
        del model
    return [_tpot_table(ctx, points, dtype), _recompute_table(ctx, ratios, dtype)]


def _fits(cfg: ModelConfig, context: int) -> bool:
    """Whether `context` cached tokens and the timed steps fit in the model's maximum sequence length."""
    return context + bench.TPOT_STEPS + 2 <= cfg.max_seq_len


def _tpot_table(ctx: ReportContext, points: list[bench.TPOTPoint], dtype: torch.dtype) -> Table:
    rows, records = [], []
    # on a GPU, each point is also predicted from the H200 datasheet profile (the project's GPU machine)
    gpu = next((p for p in ctx.profiles if p.name == GPU_PROFILE), None) if ctx.device == "cuda" else None
    for p in points:
        records += bench.tpot_records(p)
        pr = p.prediction
        row = [p.cfg.name, p.batch, p.context, num(p.timing.median * 1e3, 2), num(p.p90 * 1e3, 2),
               num(pr.time_s * 1e3, 3), with_quartiles(p.ratio, p.per_round), num(p.bandwidth_GBps, 1), pr.bound,
               pr.dominant_op(), num(pr.bytes / 1e6, 1), num(p.routed_experts, 1), p.op_calls,
               p.missing_term() or "—"]
        if gpu is not None:
            records.append(bench.profile_record(p, gpu))
            row.insert(6, num(records[-1].value, 3))
        rows.append(row)
    load = [r.extra["loadavg_1min"] for r in records if "loadavg_1min" in r.extra]
    notes = [f"measured: {dtype_name(dtype)} on {ctx.device} ({ctx.local.description}), {torch.get_num_threads()} "
             f"threads, load average {min(load, default=0):.2f}-{max(load, default=0):.2f}; {bench.TPOT_STEPS} "
             "greedy steps (one token per row, argmax fed back) after the cache holds `context` tokens, each step "
             "timed alone (CUDA events on a GPU); median and p90 over the steps",
             f"predicted: harness.analytic.decode on the local profile ({(ctx.local.fp32_dense_TFLOPS or 0) * 1e3:.1f} "
             f"FP32 / {ctx.local.bf16_dense_TFLOPS * 1e3:.1f} BF16 GFLOP/s probed) with the memory bandwidth of the "
             f"probe's copy timed in the same rounds as the steps (copy GB/s, median; the probe alone measured "
             f"{ctx.local.hbm_bandwidth_GBps:.1f}), same model, batch and dtype at the middle context of the timed "
             "steps, with the distinct routed experts the steps touched; measured / predicted: median over rounds of "
             "the step's time over the prediction at that round's bandwidth (inter-quartile range in brackets)",
             f"misses: where the ratio is outside [1/{bench.PREDICTION_TOLERANCE}, {bench.PREDICTION_TOLERANCE}], "
             "the terms the roofline leaves out, from measurements: above one row, the matmul operators' predicted "
             "time times how much slower than one row a matmul over the model's largest weight ran with that many "
             "rows (timed side by side; the roofline takes them as equal); then the rest of the gap per aten call "
             "of the step (kernel launch and dispatch, counted with a TorchDispatchMode)",
             f"{bench.TPOT_MODEL} reads ~10 MB per step: its step is dispatch overhead on a CPU; "
             f"{bench.MID_CFG.name} (hidden {bench.MID_CFG.hidden_size}, expert width "
             f"{bench.MID_CFG.moe.moe_intermediate_size}) reads ~1.4 GB, where the memory term dominates"]
    headers = ["model", "batch", "context", "TPOT ms", "p90 ms", "predicted ms", "measured / predicted", "copy GB/s",
               "bound", "largest op", "MB/step", "experts/layer", "aten calls", "misses"]
    if gpu is not None:
        headers.insert(6, f"{GPU_PROFILE} profile ms")
        notes.append(f"{GPU_PROFILE} profile ms: the same step predicted from the {GPU_PROFILE} datasheet profile "
                     "(the probed local profile measures this GPU's copy bandwidth and matmul rate)")
    return Table(f"Decode TPOT measured vs predicted, local {ctx.device} ({dtype_name(dtype).upper()})", headers,
                 rows, records, notes)


def _recompute_table(ctx: ReportContext, ratios: list, dtype: torch.dtype) -> Table:
    rows, records = [], []
    for times, record in ratios:
        records.append(record)
        e = record.extra
        rows.append([e["model"], e["prompt"], e["new_tokens"], num(times["cached"].median * 1e3, 1),
                     num(times["recompute"].median * 1e3, 1), ratio_cell(record)])
    notes = [f"generate(n) greedy from a {bench.RECOMPUTE_PROMPT}-token prompt, batch 1, {dtype_name(dtype)}: with "
             "the latent caches (one prefill, then one token per step) vs one causal pass over the whole sequence "
             "per generated token; timed side by side (each round runs both, shuffled); ratio = recompute / "
             "cached, median over rounds (inter-quartile range in brackets)"]
    headers = ["model", "prompt", "new tokens", "cached ms", "recompute ms", "recompute / cached"]
    return Table("Cached decoding vs recomputation", headers, rows, records, notes)
