"""The MoE speed benchmark's bookkeeping: what its matmul bound runs, and the records made from side-by-side timings
(exact values from synthetic samples; nothing here times anything)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hardware.timing import Timing
from harness.analytic.flops import moe_layer_fwd_flops_per_token
from harness.bench.moe import BOUND, MID_CFG, PEAK, SpeedBench, speed_records
from harness.formatting import with_quartiles
from harness.results import Record

# MID_CFG's routing (64 experts, top-6, 8 groups / 4, bias, one shared expert) at a small width
SMALL = MID_CFG.replace(name="moe-small", hidden_size=64,
                        moe=dataclasses.replace(MID_CFG.moe, moe_intermediate_size=32))


@pytest.fixture(scope="module")
def bench() -> SpeedBench:
    return SpeedBench(SMALL, with_transformers=False, dtype=torch.float32)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_expert_matmuls_run_exactly_the_layers_analytic_flops(bench, tokens):
    bound = bench.forwards(tokens)[BOUND]
    with FlopCounterMode(display=False) as counter:
        bound()
    assert counter.get_total_flops() == moe_layer_fwd_flops_per_token(SMALL) * tokens


def test_expert_matmuls_follow_the_batchs_routing(bench):
    """Only hit experts are multiplied: at 1 token, top-6 of 64 experts plus the shared expert and the router."""
    bound = bench.forwards(1)[BOUND]
    calls = []
    original = torch.nn.functional.linear

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "linear", counting)
        bound()
    assert calls == [1] * (1 + 3 * (SMALL.moe.num_experts_per_tok + SMALL.moe.n_shared_experts))


def test_speed_records_are_per_round_ratios(bench):
    tokens = 8
    grouped = Timing((1.0, 2.0, 4.0))
    timings = {"grouped": grouped, "loop": Timing((3.0, 4.0, 4.0)), PEAK: Timing((0.5, 1.0, 1.0)),
               BOUND: Timing((0.5, 1.0, 2.0))}
    records = {(r.metric, r.subject): r for r in speed_records(bench, tokens, timings)}
    assert set(records) == {("moe_speedup", "grouped-vs-loop"), ("achieved_compute_fraction", "grouped"),
                            ("achieved_compute_fraction", BOUND)}
    assert records["moe_speedup", "grouped-vs-loop"].value == 2.0  # median of 3, 2, 1
    assert records["moe_speedup", "grouped-vs-loop"].extra["per_round"] == [3.0, 2.0, 1.0]
    _, matmul_flops, _ = bench.matmul
    flops = moe_layer_fwd_flops_per_token(SMALL) * tokens
    # per round (F / t) / (F_mm / t_mm): median of t_mm / t = 0.5, 0.5, 0.25 -> 0.5 (grouped); 1, 1, 0.5 -> 1
    assert records["achieved_compute_fraction", "grouped"].value == pytest.approx(flops / matmul_flops * 0.5)
    assert records["achieved_compute_fraction", BOUND].value == pytest.approx(flops / matmul_flops * 1.0)
    assert records["achieved_compute_fraction", BOUND].extra["samples_s"] == [0.5, 1.0, 2.0]
    scale = flops / matmul_flops
    assert records["achieved_compute_fraction", "grouped"].extra["per_round"] == pytest.approx(
        [scale * 0.5, scale * 0.5, scale * 0.25])


def test_fraction_cell_shows_the_median_and_the_quartiles_over_rounds():
    record = Record("achieved_compute_fraction", "grouped", 0.62, "ratio", kind="measured",
                    extra={"per_round": [0.5, 0.6, 0.62, 0.7, 1.4]})
    # a phase-crossing round (140%) stays out of the quartiles
    assert with_quartiles(record.value, record.extra["per_round"], percent=True) == "62% (60%-70%)"
