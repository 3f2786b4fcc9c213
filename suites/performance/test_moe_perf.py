"""Performance of the DeepSeekMoE layer and the balancing experiment.

Throughput: the grouped path of a mid-size layer (64 experts, top-6, hidden 1024, expert width 512) in the
machine's working dtype, timed by pytest-benchmark, then side by side with the per-expert loop and transformers'
DeepseekV3MoE (eager, grouped_mm, batched_mm experts where it fits in memory) over the same weights; the ratios
and the achieved fraction of the local matmul throughput (of grouped, and of the layer's per-expert matmuls
alone: the bound of its segments path) go to --dsv3-results. Batches of 1024 and 4096 tokens are `slow`.
Balancing: the auxiliary-loss-free bias update on a skewed stream at DeepSeek-V3's routing (`slow`).
Nothing here asserts a time. Workloads: harness.bench.moe, harness.experiments.balancing.
"""

from __future__ import annotations

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.probe import probe_local
from hardware.timing import time_interleaved
from harness.bench.common import working_dtype
from harness.bench.mla import transformers_installed
from harness.bench.moe import MID_CFG, SpeedBench, reps_for, speed_records
from harness.experiments import balancing

pytestmark = [pytest.mark.perf]


@pytest.fixture(scope="module")
def bench(dsv3_device: str) -> SpeedBench:
    return SpeedBench(MID_CFG, dsv3_device, transformers_installed(), working_dtype(probe_local()))


@pytest.mark.parametrize("tokens", [1, 16, 256, pytest.param(1024, marks=pytest.mark.slow),
                                    pytest.param(4096, marks=pytest.mark.slow)])
def test_moe_forward_throughput(benchmark, bench, dsv3_results, dsv3_device, dsv3_threads, tokens):
    forwards = bench.forwards(tokens)
    benchmark.extra_info.update(tokens=tokens, config=bench.cfg.name, threads=dsv3_threads)
    out = benchmark.pedantic(forwards["grouped"], rounds=reps_for(tokens), iterations=1, warmup_rounds=1)
    assert out.shape == (tokens, bench.cfg.hidden_size) and torch.isfinite(out).all()
    if benchmark.disabled:
        return
    timings = time_interleaved(forwards, device=dsv3_device, warmup=1, reps=reps_for(tokens))
    for record in speed_records(bench, tokens, timings):
        dsv3_results.add(record)


@pytest.mark.slow
def test_balancing_experiment(benchmark, dsv3_results):
    moe = ModelConfig.preset(balancing.MODEL).moe
    runs = benchmark.pedantic(balancing.balancing_runs, args=(moe,), rounds=1, iterations=1)
    for record in balancing.balancing_records(runs, balancing.MODEL, balancing.PARAMS["steps"],
                                              balancing.PARAMS["tokens"]):
        dsv3_results.add(record)
    # Deterministic at the fixed seed: the bias update balances the stream, the same stream without it does not.
    assert runs["bias-update"].final.max_over_mean <= balancing.TARGET
    assert runs["no-balancing"].final.max_over_mean > 2.0
