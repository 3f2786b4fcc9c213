"""Sections: FP8 fine-grained mixed precision.

quick  `fp8_formats`: LogFMT-8/10 round trip against E4M3, E5M2 and BF16 on activation-like data.
full   `fp8`: the accumulation-precision table (limited tensor-core accumulator with and without promotion to
       FP32 every 128 elements), the quantizer bandwidth and block-scaled GEMM throughput on this machine (the
       reference and the compiled CPU quantizers), and the FP8-vs-BF16 training experiment (signed gap, 95%
       interval, data-order noise floor, step-time ratio; its `report` budget). Workloads: harness.bench.fp8 and
       harness.experiments.fp8_training.
"""

from __future__ import annotations

import torch

from dsv3ref.fp8 import fused
from harness import paper
from harness.bench import fp8 as bench
from harness.experiments import fp8_training
from harness.formatting import num, ratio_cell
from harness.report_sections import ReportContext, Table, section


@section("fp8_formats", "Communication formats: LogFMT-nBit round trip", order=16, quick=True)
def run_formats(ctx: ReportContext) -> list[Table]:
    records = bench.logfmt_records()
    rows = [[r.subject, num(r.extra["bits_per_element"], 3), f"{r.value:.3e}"] for r in records]
    notes = ["data: N(0, 1) rows times a log-normal (sigma 1) scale per channel (outlier channels), "
             f"{bench.LOGFMT_SHAPE[0]} tokens x {bench.LOGFMT_SHAPE[1]}; error = ||decode(encode(x)) - x|| / ||x||",
             "LogFMT-n: per 1x128 tile, codes uniform in log space between the tile's min and max |x| (range capped "
             "at 2^32), rounded in linear space; E4M3/E5M2: per-tile scale amax / (448 | 57344)",
             "bits/element include the per-tile metadata (fp32 scale, or fp32 min and step)"]
    return [Table("Communication formats: round-trip error on activation-like data",
                  ["format", "bits/element", "rel. RMS error"], rows, records, notes)]


def accumulation_table(ctx: ReportContext) -> Table:
    """Max relative error of the emulated accumulator vs K and mantissa bits, with and without promotion."""
    rows, records = [], []
    for bits in bench.ACCUM_BITS:
        for k in bench.ACCUM_KS:
            ctx.progress(f"fp8 accumulation: K={k}, {bits} mantissa bits")
            recs = bench.accumulation_records(k, bits)
            records += recs
            e = {r.method: r.value for r in recs}
            rows.append([k, bits, f"{e['no-promotion']:.2e}", f"{e['promote-128']:.2e}", f"{e['fp32']:.2e}",
                         num(e["no-promotion"] / e["promote-128"], 0) + "x"])
    spread = {bits: bench.accumulation_spread(bits) for bits in bench.ACCUM_BITS}
    alt = {bits: bench.accumulation_errors(bench.PAPER_K, bits, align_accumulator=False) for bits in bench.ACCUM_BITS}
    notes = [
        "accumulator model: exact FP8 products, 32 per step (one WGMMA); each step aligns the 32 products and the "
        "running sum to their largest exponent by a sign-filling right shift that keeps `mantissa bits` fraction "
        "bits (toward -inf); their exact sum is truncated toward zero to that width (FP22 = e8m13 for 13); "
        "promote-128 adds the partial sum to an FP32 accumulator every 128 elements and resets it; fp32 adds every "
        "product in K order with round-to-nearest",
        "inputs: the FP8 data of 32 x K N(0, 1) in 1x128 tiles times 32 x K N(0, 1) in 128x128 blocks (seed 0); "
        "error = max |C - exact| / max |exact| over the 32 x 32 outputs",
        f"K = {bench.PAPER_K}, no-promotion over seeds {', '.join(map(str, bench.SPREAD_SEEDS))}: "
        + "; ".join(f"{b} bits {min(v):.2e} - {max(v):.2e}" for b, v in spread.items()),
        f"products aligned among themselves only (the running sum added exactly afterwards), K = {bench.PAPER_K}: "
        "no-promotion " + ", ".join(f"{b} bits {alt[b]['no-promotion']:.2e}" for b in bench.ACCUM_BITS)
        + "; promote-128 " + ", ".join(f"{b} bits {alt[b]['promote-128']:.2e}" for b in bench.ACCUM_BITS),
    ]
    ref = paper.ref("fp8_accum_max_rel_error", "fp8-gemm", method="no-promotion")
    if ref:
        notes.append(f"paper ({ref.source}): {ref.value:.0%} at K = {bench.PAPER_K} without promotion; it names "
                     "neither the accumulator model nor the input distribution")
    return Table("FP8 GEMM accumulation: max relative error", ["K", "mantissa bits", "no-promotion", "promote-128",
                                                                "fp32", "no-promo / promote"], rows, records, notes)


def kernel_table(ctx: ReportContext) -> Table:
    rows, records = [], []
    rows_q = bench.QUANT_ROWS[ctx.device]
    impls, skipped = bench.bench_impls(ctx.device)
    for name, impl in impls:
        ctx.progress(f"fp8 kernels: {name}")
        kernels = bench.KernelBench(impl, ctx.device)
        for layout, (moved, timing) in kernels.quant(rows_q).items():
            r = bench.quant_record(name, layout, rows_q, moved, timing, ctx.local, ctx.device)
            records.append(r)
            rows.append([name, f"quant {layout} [{rows_q}, {bench.HIDDEN}] bf16", num(timing.median * 1e3, 3),
                         f"{moved / timing.median / 1e9:,.1f} GB/s", f"{r.value:.1%}", "—"])
        m = bench.GEMM_M[ctx.device]
        for n, k in bench.GEMM_SHAPES[ctx.device]:
            timings = kernels.gemm(m, n, k)
            r = bench.gemm_record(name, m, n, k, timings, ctx.device)
            records.append(r)
            rows.append([name, f"gemm {m}x{n}x{k} (bf16 out)", num(timings["fp8"].median * 1e3, 3),
                         f"{r.extra['fp8_TFLOPS']:.3f} TFLOPS", "—", ratio_cell(r)])
    notes = [f"bandwidth fraction: (read bf16 + write FP8 + fp32 scales) / median time over the local profile's "
             f"measured {ctx.local.hbm_bandwidth_GBps:,.1f} GB/s; {torch.get_num_threads()} threads",
             "vs bf16: median over rounds of a BF16 matmul of the same operands over the FP8 GEMM, timed side by "
             "side; on the CPU the reference GEMM runs as fp32 matmuls per 128-wide K block (fused shares it)",
             "fused: the quantizers compiled by torch.compile (dsv3ref.fp8.fused), one pass per tile; "
             + ", ".join(f"{k} built in {v:.1f} s" for k, v in fused.compile_seconds().items()), *skipped]
    return Table("FP8 kernels on this machine", ["impl", "operation", "median ms", "throughput", "of bandwidth",
                                                 "vs bf16 matmul"], rows, records, notes)


def training_tables(ctx: ReportContext) -> list[Table]:
    """The FP8-vs-BF16 training experiment at the `report` budget, on the report's device."""
    budget = fp8_training.with_overrides(fp8_training.BUDGETS["report"], device=ctx.device)
    result = fp8_training.run_experiment(budget, progress=ctx.progress, fraction=ctx.fraction)
    return fp8_training.tables(result)


@section("fp8", "FP8 fine-grained mixed precision", order=66, quick=False)
def run(ctx: ReportContext) -> list[Table]:
    return [accumulation_table(ctx), kernel_table(ctx), *training_tables(ctx)]
