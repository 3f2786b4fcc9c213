"""Performance of the DeepSeekMoE layer and the balancing experiment.

Throughput: the grouped path of a mid-size BF16 layer (64 experts, top-6, hidden 1024, expert width 512) timed by
pytest-benchmark, then side by side (A B A B ...) with the per-expert loop and transformers' DeepseekV3MoE
(eager, grouped_mm, batched_mm experts where it fits in memory) over the same weights; the ratios and the
achieved fraction of the local matmul throughput (of grouped, and of the layer's per-expert matmuls alone: the
bound of its segments path) go to --dsv3-results. Batches of 1024 and 4096 tokens are
`slow`. Balancing: the auxiliary-loss-free bias update on a skewed stream at DeepSeek-V3's routing (`slow`).
Nothing here asserts a time.
"""

from __future__ import annotations

import os

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.timing import time_interleaved
from harness.sections.moe import (
    BALANCING,
    BALANCING_MODEL,
    SpeedBench,
    balancing_records,
    balancing_runs,
    reps_for,
    speed_records,
)

pytestmark = [pytest.mark.perf]


@pytest.fixture(scope="module")
def bench(dsv3_device: str) -> SpeedBench:
    torch.set_num_threads(os.cpu_count() or 1)
    return SpeedBench(device=dsv3_device)


@pytest.mark.parametrize("tokens", [1, 16, 256, pytest.param(1024, marks=pytest.mark.slow),
                                    pytest.param(4096, marks=pytest.mark.slow)])
def test_moe_forward_throughput(benchmark, bench, dsv3_results, dsv3_device, tokens):
    forwards = bench.forwards(tokens)
    benchmark.extra_info.update(tokens=tokens, config=bench.cfg.name, threads=torch.get_num_threads())
    out = benchmark.pedantic(forwards["grouped"], rounds=reps_for(tokens), iterations=1, warmup_rounds=1)
    assert out.shape == (tokens, bench.cfg.hidden_size) and torch.isfinite(out).all()
    if benchmark.disabled:
        return
    timings = time_interleaved(forwards, device=dsv3_device, warmup=1, reps=reps_for(tokens))
    for record in speed_records(bench, tokens, timings, torch.get_num_threads()):
        dsv3_results.add(record)


@pytest.mark.slow
def test_balancing_experiment(benchmark, dsv3_results):
    moe = ModelConfig.preset(BALANCING_MODEL).moe
    runs = benchmark.pedantic(balancing_runs, args=(moe,), rounds=1, iterations=1)
    for record in balancing_records(runs, BALANCING_MODEL, BALANCING["steps"], BALANCING["tokens"]):
        dsv3_results.add(record)
    # Deterministic at the fixed seed: the bias update balances the stream, the same stream without it does not.
    assert runs["bias-update"].final.max_over_mean <= 1.2
    assert runs["no-balancing"].final.max_over_mean > 2.0
