"""harness.bench.model and the model report sections: TPOT points and their records (measured and predicted share
subject, context and batch), what a prediction misses, and the full section's tables on a tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3ref.config import ModelConfig
from hardware.profile import Profile, load_profile
from hardware.timing import Timing
from harness.bench import model as bench
from harness.report_sections import ReportContext, sections

TINY = ModelConfig.preset("dsv3-tiny")
LOCAL = Profile(name="local", description="a test CPU", kind="cpu", bf16_dense_TFLOPS=0.01, fp32_dense_TFLOPS=0.05,
                hbm_capacity_GB=16, hbm_bandwidth_GBps=10, gpus_per_node=1)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tpot_point_and_its_records(one_thread):
    model = bench.bench_model(TINY, torch.float32, "cpu")
    point = bench.measure_tpot(model, 2, 8, "cpu", LOCAL, steps=3)
    assert len(point.timing.samples) == 3 and point.op_calls > 0 and 1 <= point.routed_experts <= 4
    assert point.small_m_slowdown > 0 and bench.measure_tpot(model, 1, 8, "cpu", LOCAL, 2).small_m_slowdown == 1
    records = bench.tpot_records(point)
    assert [(r.metric, r.kind, r.profile) for r in records] == [
        ("tpot_ms", "measured", "local"), ("tokens_per_s", "measured", "local"),
        ("tpot_ms", "analytic", "local"), ("tokens_per_s", "analytic", "local")]
    assert {(r.subject, r.extra["context"], r.extra["batch"]) for r in records} == {("dsv3-tiny", 8, 2)}
    assert records[2].method == "roofline" and records[0].extra["p90_ms"] >= min(point.timing.samples) * 1e3
    assert records[1].value == pytest.approx(1 / point.timing.median)
    assert records[0].extra["roofline"] == {"flops": records[2].extra["flops"], "bytes": records[2].extra["bytes"],
                                            "seconds": point.timing.median, "dtype": "fp32"}
    assert len(point.per_round) == 3 and point.bandwidth_GBps > 0 and point.ratio > 0
    bf16 = dataclasses.replace(point.step, weights="bf16", dense="bf16", kv="bf16")  # as on a GPU
    h200 = bench.profile_record(dataclasses.replace(point, step=bf16), load_profile("h200"))
    assert (h200.profile, h200.extra["context"], h200.extra["batch"], h200.method) == ("h200", 8, 2, "roofline")
    assert h200.value < records[2].value  # half the bytes at 4.8 TB/s instead of 10 GB/s


def test_what_a_prediction_misses(one_thread):
    model = bench.bench_model(TINY, torch.float32, "cpu")
    point = bench.measure_tpot(model, 2, 8, "cpu", LOCAL, steps=2)
    predicted = point.prediction.time_s

    def at(seconds: float) -> bench.TPOTPoint:
        return dataclasses.replace(point, timing=Timing((seconds,) * 3), per_round=(seconds / predicted,) * 3,
                                   small_m_slowdown=3.0)

    assert at(predicted).missing_term() == ""
    slow = at(10 * predicted).missing_term()
    assert f"over {point.op_calls} aten calls" in slow and "in matmuls of 2 rows (3.0x their 1-row time)" in slow
    assert at(predicted / 10).missing_term().startswith("reuse")


def test_full_section_tables(monkeypatch, one_thread):
    for name, value in (("TPOT_CONTEXTS", (8,)), ("TPOT_BATCHES", (1, 2)), ("TPOT_STEPS", 2),
                        ("RECOMPUTE_NEW_TOKENS", (4,))):
        monkeypatch.setattr(bench, name, value)
    full = next(s for s in sections(True) if s.name == "model_tpot")
    ctx = ReportContext(models=(TINY,), profiles=(LOCAL,), local=LOCAL, device="cpu", full=True, chosen=(TINY,),
                        progress=lambda message: None)
    tpot, recompute = full.run(ctx)
    assert [row[:3] for row in tpot.rows] == [["dsv3-tiny", 1, 8], ["dsv3-tiny", 2, 8]]
    assert len(tpot.records) == 8 and all(len(row) == len(tpot.headers) for row in tpot.rows)
    assert recompute.rows[0][2] == 4 and recompute.records[0].metric == "decode_speedup"
    assert recompute.records[0].subject == "dsv3-tiny/cached-vs-recompute"


def test_only_mla_models_that_fit_are_measured():
    assert bench.fits_here(TINY) and not bench.fits_here(ModelConfig.preset("deepseek-v3-671b"))
    assert not bench.fits_here(ModelConfig.preset("qwen2.5-72b"))
