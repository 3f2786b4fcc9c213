"""Performance of the `fp8` implementations: quantizer bandwidth as a fraction of the local memory bandwidth,
block-scaled GEMM speed against a BF16 matmul timed side by side, and on a GPU against torch._scaled_mm.

Records go to `--dsv3-results`; nothing here asserts a time. On the CPU the Triton interpreter is skipped (it is a
correctness tool); `slow` marks the large shapes.
"""

from __future__ import annotations

import pytest
import torch

from hardware.probe import probe_local
from hardware.timing import time_interleaved
from harness.analytic.flops import gemm_flops
from harness.bench.common import GATED_ROUNDS, conditions, speedup_record
from harness.bench.fp8 import KernelBench, gemm_record, quant_record

pytestmark = [pytest.mark.perf, pytest.mark.dsv3_component("fp8")]

QUANT_ROWS = [pytest.param(64, id="64x7168"), pytest.param(4096, id="4096x7168", marks=pytest.mark.slow)]
GEMMS = [pytest.param(16, 576, 2048, id="16x576x2048"),
         pytest.param(128, 2112, 7168, id="128x2112x7168", marks=pytest.mark.slow)]
V3_GPU_GEMMS = [(4096, 2112, 7168), (4096, 4096, 7168), (4096, 7168, 2048), (4096, 24576, 1536)]


def _skip_interpreter(impl) -> None:
    if impl.quant_1x128.__module__ == "dsv3ref.fp8.triton_kernels":
        from dsv3ref.fp8 import triton_kernels

        if triton_kernels.INTERPRETED:
            pytest.skip("the Triton interpreter is a correctness tool, not a performance path")


@pytest.mark.parametrize("rows", QUANT_ROWS)
@pytest.mark.parametrize("layout", ["1x128", "128x128"])
def test_quantizer_bandwidth(impl, impl_name, dsv3_device, dsv3_results, dsv3_threads, benchmark, rows, layout):
    _skip_interpreter(impl)
    x = torch.randn(rows, 7168, device=dsv3_device).bfloat16()
    quantize = impl.quant_1x128 if layout == "1x128" else impl.quant_128x128
    benchmark.pedantic(quantize, args=(x,), rounds=3, iterations=1, warmup_rounds=1)
    moved, timing = KernelBench(impl, dsv3_device, reps=GATED_ROUNDS).quant(rows)[layout]
    dsv3_results.add(quant_record(impl_name, layout, rows, moved, timing, probe_local(), dsv3_device))


@pytest.mark.parametrize("m,n,k", GEMMS)
def test_gemm_vs_bf16_matmul(impl, impl_name, dsv3_device, dsv3_results, dsv3_threads, benchmark, m, n, k):
    _skip_interpreter(impl)
    a, b = torch.randn(m, k, device=dsv3_device).bfloat16(), torch.randn(n, k, device=dsv3_device).bfloat16()
    qa, qb = impl.quant_1x128(a), impl.quant_128x128(b)
    benchmark.pedantic(impl.fp8_gemm, args=(*qa, *qb), rounds=3, iterations=1, warmup_rounds=1)
    timings = KernelBench(impl, dsv3_device, reps=GATED_ROUNDS).gemm(m, n, k)
    dsv3_results.add(gemm_record(impl_name, m, n, k, timings, dsv3_device))


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", V3_GPU_GEMMS, ids=[f"{m}x{n}x{k}" for m, n, k in V3_GPU_GEMMS])
def test_gemm_vs_scaled_mm(impl, dsv3_device, dsv3_results, benchmark, m, n, k):
    # torch._scaled_mm with one scale per tensor: the cuBLAS FP8 GEMM without fine-grained scaling, the ceiling
    # a block-scaled kernel is measured against.
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9 or newer")
    a, b = torch.randn(m, k, device="cuda").bfloat16(), torch.randn(n, k, device="cuda").bfloat16()
    qa, qb = impl.quant_1x128(a), impl.quant_128x128(b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    fns = {"fp8": lambda: impl.fp8_gemm(*qa, *qb, torch.bfloat16),
           "scaled_mm": lambda: torch._scaled_mm(a8, b8.t(), one, one, out_dtype=torch.bfloat16)}
    benchmark.pedantic(fns["fp8"], rounds=3, iterations=1, warmup_rounds=1)
    t = time_interleaved(fns, device="cuda", warmup=3, reps=20)
    flops = gemm_flops(m, n, k)
    extra = {"M": m, "N": n, "K": k, "fp8_TFLOPS": flops / t["fp8"].median / 1e12,
             "scaled_mm_TFLOPS": flops / t["scaled_mm"].median / 1e12, **conditions("cuda")}
    dsv3_results.add(speedup_record("fp8_gemm_speedup", "fp8-gemm-vs-scaled-mm", t["scaled_mm"], t["fp8"], extra,
                                    unit="ratio"))
