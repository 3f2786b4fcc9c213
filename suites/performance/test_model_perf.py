"""Performance of the assembled model's greedy decoding: the decode step (pytest-benchmark), time per output token
measured beside the per-operator roofline prediction on the local profile, and cached generation against
recomputation of the prefix, side by side. Records (tpot_ms, tokens_per_s measured and predicted with matching
subject/context/batch; decode_speedup) go to --dsv3-results. No time is asserted.

CI runs the dsv3-tiny cases once (`-m perf --benchmark-disable`); dsv3-small and the memory-bound tpot-mid are
`slow`. On a GPU (`gpu`): TPOT on CUDA beside the H200 profile's prediction. Workload: harness.bench.model, in the
machine's working dtype (harness.bench.common.working_dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.probe import probe_local
from hardware.profile import load_profile
from harness.analytic.decode import DecodeStep, predict
from harness.bench import model as bench
from harness.bench.common import dtype_name, working_dtype

pytestmark = [pytest.mark.perf, pytest.mark.dsv3_component("model")]

TINY = ModelConfig.preset("dsv3-tiny")
SMALL = ModelConfig.preset(bench.TPOT_MODEL)
SMOKE_STEPS = 4  # timed steps of the CI cases (run once, as smoke tests)
CASES = [
    pytest.param(TINY, 1, 16, SMOKE_STEPS, id="tiny-b1-ctx16"),
    pytest.param(TINY, 2, 64, SMOKE_STEPS, id="tiny-b2-ctx64"),
    *(pytest.param(SMALL, b, c, bench.TPOT_STEPS, id=f"small-b{b}-ctx{c}", marks=pytest.mark.slow)
      for b in bench.TPOT_BATCHES for c in bench.TPOT_CONTEXTS),
    *(pytest.param(bench.MID_CFG, b, c, bench.TPOT_STEPS, id=f"mid-b{b}-ctx{c}", marks=pytest.mark.slow)
      for b in bench.TPOT_BATCHES for c in bench.MID_CONTEXTS),
]


@pytest.fixture(scope="module")
def models(dsv3_device):  # noqa: ANN001, ANN201
    """The measured model per config, materialised once per module (one at a time: tpot-mid takes 2 GB in fp32)."""
    built: dict[str, torch.nn.Module] = {}
    dtype = working_dtype(probe_local())

    def get(cfg: ModelConfig) -> torch.nn.Module:
        if cfg.name not in built:
            built.clear()
            built[cfg.name] = bench.bench_model(cfg, dtype, dsv3_device)
        return built[cfg.name]

    return get


@pytest.mark.parametrize("cfg, batch, context, steps", CASES)
def test_decode_step(benchmark, models, dsv3_device, dsv3_threads, cfg, batch, context, steps):
    model = models(cfg)
    cache = model.new_cache(batch, context + 1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context + 1), device=dsv3_device)
    with torch.no_grad():
        model.extend(tokens[:, :context], cache)

    def step() -> torch.Tensor:  # one greedy token per row at position `context`, rewound for the next round
        with torch.no_grad():
            out = model.extend(tokens[:, context:], cache).logits.argmax(dim=-1)
        cache.rewind(context)
        return out

    dtype = dtype_name(model.embed.weight.dtype)
    prediction = predict(DecodeStep(cfg, batch, context, weights=dtype, dense=dtype, kv=dtype), probe_local())
    benchmark.extra_info.update(model=cfg.name, batch=batch, context=context, threads=dsv3_threads,
                                predicted_ms=prediction.time_s * 1e3, bytes_per_step=prediction.bytes)
    out = benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert out.shape == (batch,)


@pytest.mark.parametrize("cfg, batch, context, steps", CASES)
def test_tpot_measured_beside_prediction(models, dsv3_device, dsv3_results, dsv3_threads, cfg, batch, context,
                                         steps):
    point = bench.measure_tpot(models(cfg), batch, context, dsv3_device, probe_local(), steps)
    records = bench.tpot_records(point)
    for record in records:
        dsv3_results.add(record)
    measured, _, predicted, _ = records
    assert (measured.subject, measured.extra["context"], measured.extra["batch"]) == \
        (predicted.subject, predicted.extra["context"], predicted.extra["batch"])
    assert math.isfinite(point.ratio) and point.prediction.time_s > 0


def test_cached_generation_vs_recomputation(models, dsv3_device, dsv3_results, dsv3_threads):
    times, record = bench.recompute_speedup(models(TINY), 8, dsv3_device, reps=2)
    dsv3_results.add(record)
    assert set(times) == {"cached", "recompute"} and len(record.extra["per_round"]) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("batch, context", [(1, 256), (4, 896)])
def test_cuda_tpot_beside_the_h200_prediction(dsv3_device, dsv3_results, batch, context):
    # The local profile is the probed GPU; the H200 profile's datasheet prediction is recorded beside it (on an
    # H200 the two differ by what the probe measures against the datasheet).
    model = bench.bench_model(SMALL, torch.bfloat16, "cuda")
    point = bench.measure_tpot(model, batch, context, "cuda", probe_local())
    records = [*bench.tpot_records(point), bench.profile_record(point, load_profile("h200"))]
    for record in records:
        dsv3_results.add(record)
    assert point.timing.median > 0 and records[-1].value > 0 and records[-1].profile == "h200"
