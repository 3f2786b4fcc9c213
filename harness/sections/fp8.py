"""Sections: FP8 fine-grained mixed precision.

quick  `fp8_formats`: LogFMT-8/10 round trip against E4M3, E5M2 and BF16 on activation-like data.
full   `fp8`: the accumulation-precision table (limited tensor-core accumulator with and without promotion to
       FP32 every 128 elements), the quantizer bandwidth and block-scaled GEMM throughput on this machine, and the
       FP8-vs-BF16 training experiment with its data-order noise floor (DSV3_FP8_THOROUGH=1: longer training).
`KernelBench` is shared with the performance suite.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from dsv3ref.fp8 import logfmt
from dsv3ref.fp8.accumulation import METHODS, WGMMA_K, accumulation_errors
from dsv3ref.fp8.experiment import MODES, experiment_config, experiment_mode, fp8_vs_bf16
from hardware.profile import Profile
from hardware.roofline import achieved_fraction_of_bandwidth
from hardware.timing import time_interleaved
from harness import paper
from harness.analytic.flops import fp8_quant_bytes, gemm_flops, tiled_format_bits
from harness.formatting import num
from harness.registry import implementations
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

ACCUM_KS = (512, 1024, 2048, 4096, 8192)
ACCUM_BITS = (13, 14)
PAPER_K = 4096
SPREAD_SEEDS = (0, 1, 2)
LOGFMT_SHAPE = (256, 1024)  # tokens x hidden of the synthetic activations
FORMAT_BITS = {"logfmt-8": tiled_format_bits(8, 64), "logfmt-10": tiled_format_bits(10, 64),
               "e4m3": tiled_format_bits(8, 32), "e5m2": tiled_format_bits(8, 32), "bf16": 16.0}
QUANT_ROWS = {"cpu": 1024, "cuda": 16384}  # rows of a [rows, 7168] bf16 activation
GEMM_M = {"cpu": 64, "cuda": 4096}
GEMM_SHAPES = {"cpu": ((576, 7168), (7168, 2048)), "cuda": ((2112, 7168), (4096, 7168), (7168, 2048))}
HIDDEN = 7168


# --- quick: LogFMT ---------------------------------------------------------------------------------------------
@section("fp8_formats", "Communication formats: LogFMT-nBit round trip", order=16, quick=True)
def run_formats(ctx: ReportContext) -> list[Table]:
    x = logfmt.activation_like(*LOGFMT_SHAPE, seed=0)
    rows, records = [], []
    for fmt in logfmt.FORMATS:
        err = logfmt.rel_rms_error(logfmt.roundtrip(x, fmt), x)
        records.append(Record("roundtrip_rel_rms_error", fmt, err, "ratio", kind="measured", method="1x128-tiles",
                              extra={"bits_per_element": FORMAT_BITS[fmt], "tokens": LOGFMT_SHAPE[0],
                                     "hidden": LOGFMT_SHAPE[1], "data": "activation_like(seed=0)"}))
        rows.append([fmt, num(FORMAT_BITS[fmt], 3), f"{err:.3e}"])
    notes = ["data: N(0, 1) rows times a log-normal (sigma 1) scale per channel (outlier channels), "
             f"{LOGFMT_SHAPE[0]} tokens x {LOGFMT_SHAPE[1]}; error = ||decode(encode(x)) - x|| / ||x||",
             "LogFMT-n: per 1x128 tile, codes uniform in log space between the tile's min and max |x| (range capped "
             "at 2^32), rounded in linear space; E4M3/E5M2: per-tile scale amax / (448 | 57344)",
             "bits/element include the per-tile metadata (fp32 scale, or fp32 min and step)"]
    return [Table("Communication formats: round-trip error on activation-like data",
                  ["format", "bits/element", "rel. RMS error"], rows, records, notes)]


# --- full: accumulation precision ------------------------------------------------------------------------------
def accumulation_table(ctx: ReportContext) -> Table:
    """Max relative error of the emulated accumulator vs K and mantissa bits, with and without promotion."""
    ref = paper.ref("fp8_accum_max_rel_error", "fp8-gemm", method="no-promotion")
    rows, records = [], []
    spread: dict[int, list[float]] = {}  # no-promotion at PAPER_K per seed in SPREAD_SEEDS (seed 0 from the table)
    for bits in ACCUM_BITS:
        for k in ACCUM_KS:
            ctx.progress(f"fp8 accumulation: K={k}, {bits} mantissa bits")
            errors = accumulation_errors(k, bits)
            if k == PAPER_K:
                spread[bits] = [errors["no-promotion"]]
            for method in METHODS:
                with_paper = ref.value if ref and k == PAPER_K and method == "no-promotion" else None
                records.append(Record("fp8_accum_max_rel_error", "fp8-gemm", errors[method], "ratio",
                                      kind="measured", method=method, paper=with_paper,
                                      extra={"K": k, "mantissa_bits": bits, "M": 32, "N": 32, "seed": 0,
                                             "group": WGMMA_K, "promote_every": 128 if method == "promote-128"
                                             else None, "model": "aligned-with-accumulator",
                                             "inputs": "fp8(N(0,1)) 1x128 x 128x128",
                                             "error": "max|C-exact|/max|exact|"}))
            rows.append([k, bits, f"{errors['no-promotion']:.2e}", f"{errors['promote-128']:.2e}",
                         f"{errors['fp32']:.2e}", num(errors["no-promotion"] / errors["promote-128"], 0) + "x"])
    alt = {bits: accumulation_errors(PAPER_K, bits, align_accumulator=False) for bits in ACCUM_BITS}
    for bits in ACCUM_BITS:
        spread[bits] += [accumulation_errors(PAPER_K, bits, seed=s)["no-promotion"] for s in SPREAD_SEEDS[1:]]
    notes = [
        "accumulator model: exact FP8 products, 32 per step (one WGMMA); each step aligns the 32 products and the "
        "running sum to their largest exponent by a sign-filling right shift that keeps `mantissa bits` fraction "
        "bits (toward -inf); their exact sum is truncated toward zero to that width (FP22 = e8m13 for 13); "
        "promote-128 adds the partial sum to an FP32 accumulator every 128 elements and resets it; fp32 adds every "
        "product in K order with round-to-nearest",
        "inputs: the FP8 data of 32 x K N(0, 1) in 1x128 tiles times 32 x K N(0, 1) in 128x128 blocks (seed 0); "
        "error = max |C - exact| / max |exact| over the 32 x 32 outputs",
        f"K = {PAPER_K}, no-promotion over seeds {', '.join(map(str, SPREAD_SEEDS))}: "
        + "; ".join(f"{b} bits {min(v):.2e} - {max(v):.2e}" for b, v in spread.items()),
        f"products aligned among themselves only (the running sum added exactly afterwards), K = {PAPER_K}: "
        "no-promotion " + ", ".join(f"{b} bits {alt[b]['no-promotion']:.2e}" for b in ACCUM_BITS)
        + "; promote-128 " + ", ".join(f"{b} bits {alt[b]['promote-128']:.2e}" for b in ACCUM_BITS),
    ]
    if ref:
        notes.append(f"paper ({ref.source}): {ref.value:.0%} at K = {PAPER_K} without promotion; it names neither "
                     "the accumulator model nor the input distribution")
    return Table("FP8 GEMM accumulation: max relative error", ["K", "mantissa bits", "no-promotion", "promote-128",
                                                                "fp32", "no-promo / promote"], rows, records, notes)


# --- full: kernel throughput -----------------------------------------------------------------------------------
@dataclass
class KernelBench:
    """Quantizer bandwidth and block-scaled GEMM speed of one `fp8` implementation, timed side by side with a
    BF16 matmul (GEMM) on `device`; raw samples kept."""

    impl: object
    device: str
    reps: int = 7

    def quant(self, rows: int, k: int = HIDDEN) -> dict[str, tuple[float, float, list[float]]]:
        """{layout: (bytes moved, median seconds, samples)} for 1x128 and 128x128 quantization of bf16 [rows, k]."""
        x = torch.randn(rows, k, device=self.device).bfloat16()
        fns = {"1x128": lambda: self.impl.quant_1x128(x), "128x128": lambda: self.impl.quant_128x128(x)}
        scales = {"1x128": rows * math.ceil(k / 128), "128x128": math.ceil(rows / 128) * math.ceil(k / 128)}
        timing = time_interleaved(fns, device=self.device, warmup=1, reps=self.reps)
        return {name: (fp8_quant_bytes(x.numel(), 2, scales[name]), t.median, list(t.samples))
                for name, t in timing.items()}

    def gemm(self, m: int, n: int, k: int) -> dict[str, tuple[float, list[float]]]:
        """{'fp8': (median s, samples), 'bf16': ...} for C = A B^T with A [m, k], B [n, k]."""
        a, b = torch.randn(m, k, device=self.device).bfloat16(), torch.randn(n, k, device=self.device).bfloat16()
        qa, qb = self.impl.quant_1x128(a), self.impl.quant_128x128(b)
        fns = {"fp8": lambda: self.impl.fp8_gemm(*qa, *qb, torch.bfloat16), "bf16": lambda: a @ b.mT}
        timing = time_interleaved(fns, device=self.device, warmup=1, reps=self.reps)
        return {name: (t.median, list(t.samples)) for name, t in timing.items()}


def bench_impls(device: str) -> list[tuple[str, object]]:
    """The registered fp8 implementations worth timing here: all on CUDA; on the CPU only the torch reference
    (the Triton interpreter is a correctness tool, not a performance path)."""
    found = []
    for impl in implementations("fp8"):
        if impl.missing() or (device == "cpu" and impl.name != "reference"):
            continue
        found.append((impl.name, impl.create()))
    return found


def kernel_table(ctx: ReportContext, local: Profile) -> Table:
    n_threads = torch.get_num_threads()
    rows, records = [], []
    for name, impl in bench_impls(ctx.device):
        ctx.progress(f"fp8 kernels: {name}")
        bench = KernelBench(impl, ctx.device)
        for layout, (moved, seconds, samples) in bench.quant(QUANT_ROWS[ctx.device]).items():
            fraction = achieved_fraction_of_bandwidth(local, moved, seconds)
            records.append(Record("achieved_bandwidth_fraction", f"fp8-quant-{layout}/{name}", fraction, "ratio",
                                  kind="measured", profile="local", method="bf16-input",
                                  extra={"rows": QUANT_ROWS[ctx.device], "k": HIDDEN, "bytes": moved,
                                         "samples_s": samples, "threads": n_threads, "device": ctx.device}))
            rows.append([name, f"quant {layout} [{QUANT_ROWS[ctx.device]}, {HIDDEN}] bf16",
                         num(seconds * 1e3, 3), f"{moved / seconds / 1e9:,.1f} GB/s", f"{fraction:.1%}", "—"])
        m = GEMM_M[ctx.device]
        for n, k in GEMM_SHAPES[ctx.device]:
            t = bench.gemm(m, n, k)
            speedup = t["bf16"][0] / t["fp8"][0]
            records.append(Record("fp8_gemm_speedup", f"{name}-vs-bf16-matmul", speedup, "ratio", kind="measured",
                                  profile="local", extra={"M": m, "N": n, "K": k, "samples_fp8_s": t["fp8"][1],
                                                          "samples_bf16_s": t["bf16"][1], "threads": n_threads,
                                                          "device": ctx.device}))
            tflops = gemm_flops(m, n, k) / t["fp8"][0] / 1e12
            rows.append([name, f"gemm {m}x{n}x{k} (bf16 out)", num(t["fp8"][0] * 1e3, 3), f"{tflops:.3f} TFLOPS",
                         "—", f"{speedup:.2f}x"])
    notes = [f"bandwidth fraction: (read bf16 + write FP8 + fp32 scales) / median time over the local profile's "
             f"measured {local.hbm_bandwidth_GBps:,.1f} GB/s; {n_threads} threads",
             "vs bf16: the median of a BF16 matmul of the same operands divided by the FP8 GEMM's, timed side by "
             "side (A B A B ...); on the CPU the reference GEMM runs as fp32 matmuls per 128-wide K block"]
    return Table("FP8 kernels on this machine", ["impl", "operation", "median ms", "throughput", "of bandwidth",
                                                 "vs bf16 matmul"], rows, records, notes)


# --- full: FP8 vs BF16 training --------------------------------------------------------------------------------
def training_table(ctx: ReportContext) -> Table:
    n_threads = torch.get_num_threads()
    mode, cfg = experiment_mode(), experiment_config()
    results = fp8_vs_bf16(mode, cfg, progress=ctx.progress)
    seeds = [r.seed for r in results]
    rows = [[r.seed, f"{r.bf16:.4f}", f"{r.fp8:.4f}", f"{r.bf16_other_order:.4f}", f"{r.fp8_gap:.3%}",
             f"{r.noise_gap:.3%}"] for r in results]
    fp8_gap = statistics.mean(r.fp8_gap for r in results) * 100
    noise = statistics.mean(r.noise_gap for r in results) * 100
    rows.append(["mean", "", "", "", f"{fp8_gap:.3f}%", f"{noise:.3f}%"])
    ref = paper.ref("fp8_rel_loss_gap", "fp8-vs-bf16")
    common = {"seeds": seeds, "mode": mode, "config": cfg.name, "threads": n_threads,
              "seconds": sum(r.seconds for r in results)}
    records = [
        Record("fp8_rel_loss_gap", "fp8-vs-bf16", fp8_gap, "%", kind="measured", paper=ref and ref.value,
               method="mean-over-seeds", extra={**common, "per_seed": [r.fp8_gap * 100 for r in results],
                                                "val_loss_bf16": [r.bf16 for r in results],
                                                "val_loss_fp8": [r.fp8 for r in results]}),
        Record("fp8_rel_loss_gap", "bf16-seed-noise", noise, "%", kind="measured", method="mean-over-seeds",
               extra={**common, "per_seed": [r.noise_gap * 100 for r in results],
                      "val_loss_bf16_other_order": [r.bf16_other_order for r in results]}),
    ]
    a, moe = cfg.attention, cfg.moe
    notes = [f"model {cfg.name}: hidden {cfg.hidden_size}, {cfg.num_layers} layers ({cfg.num_dense_layers} dense, "
             f"{cfg.num_moe_layers} MoE), MLA "
             f"{a.num_heads} heads q/kv rank {a.q_lora_rank}/{a.kv_lora_rank}, {moe.n_routed_experts} routed experts "
             f"top-{moe.num_experts_per_tok} + {moe.n_shared_experts} shared; byte tokens of the Python standard "
             f"library, validation = files by path hash",
             f"mode {mode}: {'; '.join(f'{m} = {s} steps x {len(sd)} seeds' for m, (s, sd) in MODES.items())} "
             "(DSV3_FP8_THOROUGH=1 selects thorough); batch 8 x 128 bytes, AdamW lr 3e-3 cosine, fp32 master "
             "weights; routing biases follow the auxiliary-loss-free update (gamma 0.001)",
             "BF16 and FP8 runs share init and data order and the same projections (attention, FFN, experts) in "
             "fp32-accumulated GEMMs with BF16 resp. FP8 (1x128 / 128x128) operands; embedding, head, router, "
             "norms and the attention core stay in BF16 autocast; the noise floor is BF16 with another data order"]
    if ref:
        notes.append(f"paper ({ref.source}): {ref.note}")
    return Table("FP8 vs BF16 training: final validation loss", ["seed", "bf16", "fp8", "bf16 (other order)",
                                                                  "fp8 gap", "bf16 noise"], rows, records, notes)


@section("fp8", "FP8 fine-grained mixed precision", order=66, quick=False)
def run(ctx: ReportContext) -> list[Table]:
    return [accumulation_table(ctx), kernel_table(ctx, ctx.local), training_table(ctx)]
