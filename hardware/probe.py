"""The `local` profile: this machine's CPU (or CUDA GPU) described and measured now.

Memory bandwidth is measured as a large tensor copy (read + write bytes / time); matmul throughput as square
matmuls (2n^3 FLOP / time) in BF16 and FP32. Medians of repeated runs; the thread count is recorded.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from functools import cache

import torch

from hardware.profile import Profile
from hardware.timing import time_fn

COPY_BYTES = 256 * 2**20
# Square matmul sizes: doubled from MATMUL_MIN_N while one call stays under MATMUL_CALL_S, up to MATMUL_MAX_N. AMX
# CPUs reach their BF16 peak only from 2048 (1024 reads about half); a CPU without native BF16 takes ~1 s per 2048^3
# BF16 call, which a fixed size would pay seven times per probe.
MATMUL_MIN_N = 256
MATMUL_MAX_N = {"cpu": 2048, "cuda": 4096}
MATMUL_CALL_S = 0.15


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_case(device: str) -> tuple[Callable[[], torch.Tensor], float, str]:
    """The probe's copy: (a callable running it, the bytes it moves, read + write, a description). Shared with
    benchmarks that time it side by side with their workload, so both see the same machine state."""
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src), 2.0 * COPY_BYTES, f"copy of {COPY_BYTES >> 20} MiB fp32"


def measure_copy_GBps(device: str) -> tuple[float, str]:
    """Memory bandwidth from a copy of COPY_BYTES (counted twice: read and write)."""
    fn, moved, what = copy_case(device)
    t = time_fn(fn, device=device, warmup=2, min_reps=5, min_time_s=0.3)
    return moved / t.median / 1e9, f"measured: {what}, median of {len(t.samples)}"


def _square(n: int, device: str, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """n x n matmul in the layout of a linear layer, A B^T with both operands row-major (torch 2.13's CPU BF16
    kernel for A B, without native BF16, runs ~70x slower than for A B^T: a layout no layer of the model uses)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return lambda: a @ b.mT


@cache
def matmul_size(device: str, dtype: torch.dtype) -> int:
    """The probe's matmul size on this machine: doubled from MATMUL_MIN_N while one call takes under
    MATMUL_CALL_S / 8 (the next size costs 8x), capped at MATMUL_MAX_N."""
    kind = "cuda" if device == "cuda" else "cpu"
    n = MATMUL_MIN_N
    while n < MATMUL_MAX_N[kind]:
        fn = _square(n, device, dtype)
        fn()  # first call: allocation and kernel selection
        if time_fn(fn, device=device, warmup=0, min_reps=1, min_time_s=0.0).minimum > MATMUL_CALL_S / 8:
            break
        n *= 2
    return n


def matmul_case(device: str, dtype: torch.dtype) -> tuple[Callable[[], torch.Tensor], float, str]:
    """The probe's dense matmul: (a callable running it, its FLOPs 2n^3, a description). Shared with benchmarks
    that time it side by side with their workload, so both see the same machine state."""
    n = matmul_size(device, dtype)
    return _square(n, device, dtype), 2.0 * n**3, f"{n}^3 {str(dtype).removeprefix('torch.')} matmul (A B^T)"


def measure_matmul_TFLOPS(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """Dense matmul throughput of `matmul_case` in `dtype`."""
    fn, flops, what = matmul_case(device, dtype)
    t = time_fn(fn, device=device, warmup=1, min_reps=5, min_time_s=0.3)
    return flops / t.median / 1e12, f"measured: {what}, median of {len(t.samples)}"


@cache
def probe_local() -> Profile:
    """Describe and measure this machine (the GPU when torch sees one, else the CPU). Cached per process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    sources: dict[str, str] = {}
    bw, sources["hbm_bandwidth_GBps"] = measure_copy_GBps(device)
    bf16, sources["bf16_dense_TFLOPS"] = measure_matmul_TFLOPS(device, torch.bfloat16)
    fp32, sources["fp32_dense_TFLOPS"] = measure_matmul_TFLOPS(device, torch.float32)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        description = f"{props.name} (CUDA, {props.multi_processor_count} SMs) on {cpu_model()}"
        capacity = props.total_memory / 1e9
        sources["hbm_capacity_GB"] = "torch.cuda.get_device_properties(0).total_memory"
        gpus = torch.cuda.device_count()
        sources["gpus_per_node"] = "torch.cuda.device_count()"
    else:
        description = f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {threads})"
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        sources["hbm_capacity_GB"] = "os.sysconf: physical pages x page size (system DRAM)"
        gpus = 1
        sources["gpus_per_node"] = "no GPU: the CPU counts as one device"
    sources["scaleup_domain_gpus"] = "one device: no scale-up domain is probed"
    return Profile(name="local", description=description, kind="gpu" if device == "cuda" else "cpu",
                   bf16_dense_TFLOPS=bf16, fp32_dense_TFLOPS=fp32, hbm_capacity_GB=capacity,
                   hbm_bandwidth_GBps=bw, gpus_per_node=gpus, sources=sources,
                   notes=f"probed now with torch {torch.__version__}, {threads} threads", path="probed")
