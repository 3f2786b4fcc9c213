"""Sections: MLA's KV-cache bytes and layer FLOPs measured on real-dimension layers (quick), and the decode step of
absorbed vs naive MLA vs transformers' DeepseekV3Attention timed side by side (full). Workloads: harness.bench.mla.
"""

from __future__ import annotations

import torch

from dsv3ref.config import ModelConfig
from harness.bench import mla as bench
from harness.bench.common import dtype_name, working_dtype
from harness.formatting import count, deviation, num, ratio_cell
from harness.report_sections import ReportContext, Table, section


@section("mla", "MLA: measured KV cache and layer FLOPs", order=12, quick=True)
def run_quick(ctx: ReportContext) -> list[Table]:
    measured = []
    for cfg in ctx.models:
        ctx.progress(f"mla: one real-dimension {cfg.name} attention layer (live cache, FLOP count)")
        measured += bench.measure_layers(cfg, ctx.device)
    return [_cache_table(measured), _flops_table(measured)]


def _cache_table(measured: list[bench.LayerMeasurement]) -> Table:
    rows, records = [], []
    for m in measured:
        (r,) = bench.cache_records(m)
        records.append(r)
        rows.append([m.cfg.name, m.method, count(m.cache_bytes_per_token), count(r.value), count(r.extra["analytic"]),
                     "yes" if r.value == r.extra["analytic"] else "NO", count(r.paper), deviation(r.value, r.paper)])
    headers = ["model", "cache", "B/token/layer (live)", "x layers", "analytic", "equal", "paper", "dev"]
    notes = [f"measured: nbytes / slots of the BF16 cache after {bench.FLOP_PREFILL} tokens (or max_seq_len) ran "
             "through one real-dimension layer, times the layer count",
             "absorbed: the latent cache (kv_norm(c) + roped k_pe); naive: the per-head K/V the naive mode caches; "
             "gqa: the baseline layer's K/V cache"]
    return Table("MLA: KV cache per token, measured from a live cache (BF16)", headers, rows, records, notes)


def _flops_table(measured: list[bench.LayerMeasurement]) -> Table:
    rows, records = [], []
    for m in measured:
        recs = bench.flop_records(m)
        records += recs
        for counted, analytic in zip(recs[::2], recs[1::2], strict=True):
            rows.append([m.cfg.name, m.method, counted.extra["phase"], counted.extra["context"],
                         num(counted.value, 4), num(analytic.value, 4),
                         "yes" if counted.value == analytic.value else "NO"])
    headers = ["model", "layer", "phase", "context", "GFLOP/token (counted)", "analytic", "equal"]
    notes = [f"one attention layer (zero weights, fp32 compute, BF16 cache: a count depends on neither); prefill of "
             f"{bench.FLOP_PREFILL} tokens from position 0, decode of one token after {bench.FLOP_CONTEXT} cached "
             "(fewer when max_seq_len is shorter); counted with torch.utils.flop_counter's formulas "
             "(harness.bench.common.FlopCount, equal to FlopCounterMode); analytic: "
             "harness.analytic.flops.attention_layer_fwd_flops",
             "absorbed MLA scores [c; k_pe] and sums c (2 x kv_lora_rank + rope FLOPs per key and head) instead of "
             "per-head K/V (qk_head_dim + v_head_dim): more FLOPs per cached token, 1/71 of the cache bytes"]
    return Table("Attention layer forward FLOPs, counted vs analytic", headers, rows, records, notes)


@section("mla_decode", "MLA decode step: absorbed vs naive vs transformers", order=62, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    dtype = working_dtype(ctx.local)
    default = ModelConfig.preset(bench.DECODE_REFERENCE)
    return [_decode_table(ctx, cfg, dtype)
            for cfg in ctx.measured_models(lambda m: m.attention.kind == "mla", default)]


def _decode_table(ctx: ReportContext, cfg: ModelConfig, dtype: torch.dtype) -> Table:
    rows, records = [], []
    for context, batch, hf in bench.decode_cases(bench.transformers_installed()):
        if context >= cfg.max_seq_len:
            continue
        ctx.progress(f"mla: {cfg.name} decode step, context {context}, batch {batch}"
                     + (" (absorbed, naive, transformers)" if hf else " (absorbed, naive)"))
        decode = bench.DecodeBench(cfg, context, batch, ctx.device, hf, dtype=dtype)
        times, recs = bench.run_decode(decode, ctx.local, reps=9 if context <= 4096 else 5)
        agree = decode.agreement()
        records += recs
        ratio = {r.subject.removeprefix("absorbed-vs-"): r for r in recs if r.metric == "mla_decode_speedup"}
        fraction = next(r for r in recs if r.metric == "achieved_bandwidth_fraction")
        t = {k: v.median * 1e3 for k, v in times.items()}
        rows.append([context, batch, num(t["absorbed"]), num(t["naive"]), num(t.get("transformers")),
                     *(ratio_cell(ratio.get(peer)) for peer in ("naive", "transformers")),
                     num(decode.bytes_per_step("absorbed") / 1e6, 1), num(decode.bytes_per_step("naive") / 1e6, 1),
                     f"{max(agree.values()):.1e}", f"{fraction.value:.2f}"])
        del decode
    load = [r.extra["loadavg_1min"] for r in records]
    notes = [f"{cfg.name} ({cfg.attention.num_heads} heads, kv_lora_rank {cfg.attention.kv_lora_rank}), one "
             f"real-dimension layer in {dtype_name(dtype)} on {ctx.device}, {torch.get_num_threads()} threads, load "
             f"average {min(load):.2f}-{max(load):.2f}; local bandwidth {ctx.local.hbm_bandwidth_GBps:.1f} GB/s"
             + ("" if dtype == torch.bfloat16 else " (fp32: this machine runs BF16 matmuls at under half its FP32 "
                "rate, emulated)"),
             "steps timed side by side (each round runs every step once, shuffled); ratios: median over rounds of "
             "naive / absorbed and transformers / absorbed, with the inter-quartile range over rounds",
             f"transformers runs at batch 1 up to context {bench.HF_MAX_CONTEXT}: it pushes the whole cached latent "
             "through kv_b_proj every step (context x kv_lora_rank x heads x 256 x 2 FLOP)",
             "bytes/step: weights once + the cache rows read (context + 1 per sequence); bw fraction: absorbed "
             "bytes / median step time over the local profile's measured memory bandwidth",
             "calc_diff: each mode's decode output against absorbed's on the same state (1 - 2 sum xy / "
             "sum(x^2 + y^2))"]
    headers = ["context", "batch", "absorbed ms", "naive ms", "transformers ms", "naive/absorbed",
               "transformers/absorbed", "absorbed MB/step", "naive MB/step", "max calc_diff", "absorbed bw fraction"]
    return Table(f"MLA decode step, one {cfg.name} layer, {dtype_name(dtype).upper()} (side by side)", headers,
                 rows, records, notes)
