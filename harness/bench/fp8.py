"""FP8 workloads: LogFMT round trips (quick), the emulated tensor-core accumulation error, and the quantizer
bandwidth and block-scaled GEMM speed of an `fp8` implementation timed side by side with a BF16 matmul (full)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dsv3ref.fp8 import logfmt
from dsv3ref.fp8.accumulation import WGMMA_K, emulate_accumulation, fp32_accumulation
from dsv3ref.fp8.quant import quant_1x128, quant_128x128
from hardware.profile import Profile
from hardware.roofline import achieved_fraction_of_bandwidth
from hardware.timing import Timing, time_interleaved
from harness import paper
from harness.analytic.flops import fp8_quant_bytes, gemm_flops, tiled_format_bits
from harness.bench.common import conditions, speedup_record
from harness.numerics import max_rel_err
from harness.registry import UsageError, implementations
from harness.results import Record

LOGFMT_SHAPE = (256, 1024)  # tokens x hidden of the synthetic activations
FORMAT_BITS = {"logfmt-8": tiled_format_bits(8, 64), "logfmt-10": tiled_format_bits(10, 64),
               "e4m3": tiled_format_bits(8, 32), "e5m2": tiled_format_bits(8, 32), "bf16": 16.0}
ACCUM_KS = (512, 1024, 2048, 4096, 8192)
ACCUM_BITS = (13, 14)
PAPER_K = 4096
SPREAD_SEEDS = (0, 1, 2)
METHODS = ("no-promotion", "promote-128", "fp32")
HIDDEN = 7168
QUANT_ROWS = {"cpu": 1024, "cuda": 16384}  # rows of a [rows, 7168] bf16 activation
GEMM_M = {"cpu": 64, "cuda": 4096}
GEMM_SHAPES = {"cpu": ((576, 7168), (7168, 2048)), "cuda": ((2112, 7168), (4096, 7168), (7168, 2048))}


def logfmt_records() -> list[Record]:
    """roundtrip_rel_rms_error of every format on activation-like data (one record per format)."""
    x = logfmt.activation_like(*LOGFMT_SHAPE, seed=0)
    return [Record("roundtrip_rel_rms_error", fmt, logfmt.rel_rms_error(logfmt.roundtrip(x, fmt), x), "ratio",
                   kind="measured", method="1x128-tiles",
                   extra={"bits_per_element": FORMAT_BITS[fmt], "tokens": LOGFMT_SHAPE[0], "hidden": LOGFMT_SHAPE[1],
                          "data": "activation_like(seed=0)"})
            for fmt in logfmt.FORMATS]


def accumulation_inputs(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [M, K], B [N, K] as float64: the FP8 data of N(0, 1) matrices quantized in 1x128 tiles (A) and 128x128
    blocks (B): a random GEMM as DeepGEMM's tests build it (the papers name no input distribution)."""
    gen = torch.Generator().manual_seed(seed)
    a = quant_1x128(torch.randn(m, k, generator=gen))[0].double()
    b = quant_128x128(torch.randn(n, k, generator=gen))[0].double()
    return a, b


def accumulation_errors(k: int, mantissa_bits: int = 13, m: int = 32, n: int = 32, seed: int = 0,
                        align_accumulator: bool = True) -> dict[str, float]:
    """max_rel_err (max |C - exact| / max |exact|: outputs of zero-mean operands pass near zero, where an
    elementwise relative error is unbounded) of each method in METHODS against the exact product, at inner dim k."""
    a, b = accumulation_inputs(m, n, k, seed)
    exact = a @ b.mT  # every partial sum is an integer multiple of 2^-18 below 2^53: exact in float64
    return {
        "no-promotion": max_rel_err(emulate_accumulation(a, b, mantissa_bits, None,
                                                         align_accumulator=align_accumulator), exact),
        "promote-128": max_rel_err(emulate_accumulation(a, b, mantissa_bits, 128,
                                                        align_accumulator=align_accumulator), exact),
        "fp32": max_rel_err(fp32_accumulation(a, b), exact),
    }


def accumulation_records(k: int, bits: int) -> list[Record]:
    """fp8_accum_max_rel_error at K and mantissa bits, one record per accumulation method (seed 0)."""
    ref = paper.ref("fp8_accum_max_rel_error", "fp8-gemm", method="no-promotion")
    errors = accumulation_errors(k, bits)
    return [Record("fp8_accum_max_rel_error", "fp8-gemm", errors[method], "ratio", kind="measured", method=method,
                   paper=ref.value if ref and k == PAPER_K and method == "no-promotion" else None,
                   extra={"K": k, "mantissa_bits": bits, "M": 32, "N": 32, "seed": 0, "group": WGMMA_K,
                          "promote_every": 128 if method == "promote-128" else None,
                          "model": "aligned-with-accumulator", "inputs": "fp8(N(0,1)) 1x128 x 128x128",
                          "error": "max|C-exact|/max|exact|"})
            for method in METHODS]


def accumulation_spread(bits: int) -> list[float]:
    """No-promotion error at PAPER_K over SPREAD_SEEDS."""
    return [accumulation_errors(PAPER_K, bits, seed=s)["no-promotion"] for s in SPREAD_SEEDS]


@dataclass
class KernelBench:
    """Quantizer bandwidth and block-scaled GEMM speed of one `fp8` implementation, timed side by side with a
    BF16 matmul (GEMM) on `device`; raw samples kept."""

    impl: Any
    device: str
    reps: int = 7

    def quant(self, rows: int, k: int = HIDDEN) -> dict[str, tuple[float, Timing]]:
        """{layout: (bytes moved, timing)} for 1x128 and 128x128 quantization of bf16 [rows, k]."""
        x = torch.randn(rows, k, device=self.device).bfloat16()
        fns = {"1x128": lambda: self.impl.quant_1x128(x), "128x128": lambda: self.impl.quant_128x128(x)}
        scales = {"1x128": rows * math.ceil(k / 128), "128x128": math.ceil(rows / 128) * math.ceil(k / 128)}
        timing = time_interleaved(fns, device=self.device, warmup=1, reps=self.reps)
        return {name: (fp8_quant_bytes(x.numel(), 2, scales[name]), t) for name, t in timing.items()}

    def gemm(self, m: int, n: int, k: int) -> dict[str, Timing]:
        """{'fp8': timing, 'bf16': timing} for C = A B^T with A [m, k], B [n, k], side by side."""
        a, b = torch.randn(m, k, device=self.device).bfloat16(), torch.randn(n, k, device=self.device).bfloat16()
        qa, qb = self.impl.quant_1x128(a), self.impl.quant_128x128(b)
        fns = {"fp8": lambda: self.impl.fp8_gemm(*qa, *qb, torch.bfloat16), "bf16": lambda: a @ b.mT}
        return time_interleaved(fns, device=self.device, warmup=1, reps=self.reps)


def quant_record(name: str, layout: str, rows: int, moved: float, timing: Timing, local: Profile,
                 device: str) -> Record:
    """achieved_bandwidth_fraction of one quantizer: bytes moved / median time over the local bandwidth."""
    return Record("achieved_bandwidth_fraction", f"fp8-quant-{layout}/{name}",
                  achieved_fraction_of_bandwidth(local, moved, timing.median), "ratio", kind="measured",
                  profile="local", method="bf16-input",
                  extra={"rows": rows, "k": HIDDEN, "bytes": moved, "samples_s": list(timing.samples),
                         **conditions(device)})


def gemm_record(name: str, m: int, n: int, k: int, timings: dict[str, Timing], device: str) -> Record:
    """fp8_gemm_speedup: the BF16 matmul's time over the FP8 GEMM's, side by side, with the FP8 TFLOP/s."""
    extra = {"M": m, "N": n, "K": k, "fp8_TFLOPS": gemm_flops(m, n, k) / timings["fp8"].median / 1e12,
             **conditions(device)}
    return speedup_record("fp8_gemm_speedup", f"{name}-vs-bf16-matmul", timings["bf16"], timings["fp8"], extra,
                          unit="ratio")


def bench_impls(device: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """The registered fp8 implementations worth timing here (those for the device; on the CPU without the Triton
    interpreter, a correctness tool, not a performance path), and why others that could be could not run."""
    ready, skipped = [], []
    for impl in implementations("fp8"):
        if impl.missing() or device not in impl.devices or (device == "cpu" and impl.name == "triton"):
            continue
        try:
            ready.append((impl.name, impl.create()))
        except UsageError as e:
            skipped.append(str(e))
    return ready, skipped
