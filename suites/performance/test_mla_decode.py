"""Performance of one attention layer's decode step: absorbed MLA vs naive MLA vs transformers' DeepseekV3Attention
(same weights, same cached state) vs a GQA baseline layer, across context lengths and batch sizes, in BF16.

Each step is benchmarked with pytest-benchmark (bytes read per step in extra_info); the speed ratios are measured
side by side in one run (A B C A B C ...) and recorded as `mla_decode_speedup`, with the absorbed step's
`achieved_bandwidth_fraction` of the local memory bandwidth, to --dsv3-results. No time is asserted.
The small dsv3-small cases run in CI (`-m perf --benchmark-disable`); real V3 dimensions are `slow`.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.probe import probe_local
from hardware.roofline import achieved_fraction_of_bandwidth
from hardware.timing import time_interleaved
from harness.results import Record
from harness.sections.mla import HF_MAX_CONTEXT, DecodeBench

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
MODES = ("absorbed", "naive", "transformers", "gqa")


@pytest.fixture(scope="module")
def benches(dsv3_device):  # noqa: ANN001, ANN201
    """DecodeBench per case, built once per module (real-dimension layers take seconds to set up); CPU threads
    pinned to every core, the count recorded with each result."""
    torch.set_num_threads(os.cpu_count() or 1)
    built: dict[tuple, DecodeBench] = {}

    def get(cfg: ModelConfig, baseline: ModelConfig, context: int, batch: int) -> DecodeBench:
        key = (cfg.name, context, batch)
        if key not in built:
            built.clear()  # one case at a time: V3 caches at 16k take gigabytes
            hf = batch == 1 and context <= HF_MAX_CONTEXT and _has_transformers()
            built[key] = DecodeBench(cfg, context, batch, dsv3_device, hf, baseline)
        return built[key]

    return get


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


@pytest.mark.parametrize("cfg, baseline, context, batch", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_decode_step(benchmark, benches, mode, cfg, baseline, context, batch):
    bench = benches(cfg, baseline, context, batch)
    if mode not in bench.steps:
        pytest.skip(f"{mode}: not run here (transformers only at batch 1 up to context {HF_MAX_CONTEXT}, if installed)")
    benchmark.extra_info.update(context=context, batch=batch, threads=torch.get_num_threads(),
                                bytes_per_step=bench.bytes_per_step(mode),
                                model=baseline.name if mode == "gqa" else cfg.name)
    out = benchmark.pedantic(bench.steps[mode], rounds=5 if context <= 4096 else 3, warmup_rounds=1)
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("cfg, baseline, context, batch", CASES)
def test_decode_ratios_side_by_side(benches, dsv3_results, dsv3_device, cfg, baseline, context, batch):
    bench = benches(cfg, baseline, context, batch)
    agreement = bench.agreement()
    assert max(agreement.values()) < 1e-3  # same state: the MLA steps compute the same attention (BF16)
    times = time_interleaved(bench.steps, device=dsv3_device, warmup=1, reps=5)
    median = {name: t.median for name, t in times.items()}
    extra = {"context": context, "batch": batch, "threads": torch.get_num_threads(), "dtype": "bf16",
             "model": cfg.name, "loadavg_1min": os.getloadavg()[0]}
    for peer in ("naive", "transformers"):
        if peer in median:
            dsv3_results.add(Record("mla_decode_speedup", f"absorbed-vs-{peer}", median[peer] / median["absorbed"],
                                    "x", kind="measured", method="bf16-one-layer",
                                    extra={**extra, "samples_s": {k: list(times[k].samples)
                                                                  for k in ("absorbed", peer)}}))
    fraction = achieved_fraction_of_bandwidth(probe_local(), bench.bytes_per_step("absorbed"), median["absorbed"])
    dsv3_results.add(Record("achieved_bandwidth_fraction", f"{cfg.name}/mla-absorbed-decode", fraction, "ratio",
                            kind="measured", profile="local", method="bf16-one-layer",
                            extra={**extra, "bytes_per_step": bench.bytes_per_step("absorbed")}))
