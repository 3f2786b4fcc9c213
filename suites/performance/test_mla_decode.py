"""Performance of one attention layer's decode step: absorbed MLA vs naive MLA vs transformers' DeepseekV3Attention
(same weights, same cached state) vs a GQA baseline layer, across context lengths and batch sizes.

Each step is benchmarked with pytest-benchmark (bytes read per step in extra_info); the speed ratios are measured
side by side in one run and recorded as `mla_decode_speedup`, with the absorbed step's
`achieved_bandwidth_fraction` of the local memory bandwidth, to --dsv3-results. No time is asserted.
The small dsv3-small cases run in CI (`-m perf --benchmark-disable`); real V3 dimensions are `slow`.
Workload: harness.bench.mla.DecodeBench, in the machine's working dtype (harness.bench.common.working_dtype).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.probe import probe_local
from harness.bench.common import GATED_ROUNDS, working_dtype
from harness.bench.mla import HF_MAX_CONTEXT, DecodeBench, run_decode, transformers_installed
from harness.numerics import CALC_DIFF_FP8

pytestmark = [pytest.mark.perf, pytest.mark.dsv3_component("mla")]

SMALL = ModelConfig.preset("dsv3-small")
SMALL_GQA = ModelConfig.preset("qwen2.5-72b").replace(
    hidden_size=256, max_seq_len=1024,
    attention=dataclasses.replace(ModelConfig.preset("qwen2.5-72b").attention, num_heads=8, num_kv_heads=2,
                                  head_dim=32))
V3 = ModelConfig.preset("deepseek-v3-671b")
QWEN = ModelConfig.preset("qwen2.5-72b")
CASES = [
    pytest.param(SMALL, SMALL_GQA, 64, 1, id="dsv3-small-ctx64-b1"),
    pytest.param(SMALL, SMALL_GQA, 512, 4, id="dsv3-small-ctx512-b4"),
    *(pytest.param(V3, QWEN, context, batch, id=f"v3-ctx{context}-b{batch}", marks=pytest.mark.slow)
      for context, batch in ((512, 1), (4096, 1), (16384, 1), (4096, 4))),
]
STEPS = ("absorbed", "naive", "transformers", "gqa")


@pytest.fixture(scope="module")
def benches(dsv3_device):  # noqa: ANN001, ANN201
    """DecodeBench per case, built once per module (real-dimension layers take seconds to set up)."""
    built: dict[tuple, DecodeBench] = {}
    dtype = working_dtype(probe_local())

    def get(cfg: ModelConfig, baseline: ModelConfig, context: int, batch: int) -> DecodeBench:
        key = (cfg.name, context, batch)
        if key not in built:
            built.clear()  # one case at a time: V3 caches at 16k take gigabytes
            hf = batch == 1 and context <= HF_MAX_CONTEXT and transformers_installed()
            built[key] = DecodeBench(cfg, context, batch, dsv3_device, hf, baseline, dtype)
        return built[key]

    return get


@pytest.mark.parametrize("cfg, baseline, context, batch", CASES)
@pytest.mark.parametrize("step", STEPS)
def test_decode_step(benchmark, benches, dsv3_threads, step, cfg, baseline, context, batch):
    bench = benches(cfg, baseline, context, batch)
    if step not in bench.steps:
        pytest.skip(f"{step}: not run here (transformers only at batch 1 up to context {HF_MAX_CONTEXT}, if installed)")
    benchmark.extra_info.update(context=context, batch=batch, threads=dsv3_threads,
                                bytes_per_step=bench.bytes_per_step(step),
                                model=baseline.name if step == "gqa" else cfg.name)
    out = benchmark.pedantic(bench.steps[step], rounds=5 if context <= 4096 else 3, warmup_rounds=1)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("cfg, baseline, context, batch", CASES)
def test_decode_ratios_side_by_side(benches, dsv3_results, dsv3_threads, cfg, baseline, context, batch):
    bench = benches(cfg, baseline, context, batch)
    agreement = bench.agreement()
    assert max(agreement.values()) < CALC_DIFF_FP8  # same state: the MLA steps compute the same attention
    _, records = run_decode(bench, probe_local(), reps=GATED_ROUNDS)
    for record in records:
        dsv3_results.add(record)
