"""Mutants as proof: `dsv3 conform` catches each deliberately broken implementation (tests/dsv3_mutants) on the
property written for its bug. Each runs only that property (`-k`), hypothesis profile ci, in this process."""

from __future__ import annotations

import json

import pytest

from harness.cli import main

MUTANTS = [  # (factory, -k expression, the property that must fail, variants that must fail; None: the cell)
    ("moe:zero_filled_groups", "test_all_negative_biases_never_select_dropped_groups",
     "moe/test_all_negative_biases_never_select_dropped_groups", None),
    ("moe:unbiased_selection", "test_selection_uses_biased_scores", "moe/test_selection_uses_biased_scores", None),
    ("moe:biased_weights", "test_weights_are_normalised_unbiased_scores",
     "moe/test_weights_are_normalised_unbiased_scores", None),
    ("moe:epsilon_normaliser", "test_weights_sum_to_route_scale_for_tiny_scores",
     "moe/test_weights_sum_to_route_scale_for_tiny_scores", None),
    ("moe:ignores_norm_topk_prob", "test_weights_are_normalised_unbiased_scores",
     "moe/test_weights_are_normalised_unbiased_scores", None),
    ("fp8:no_promotion", "test_gemm_within_fp32_summation_bound", "fp8/test_gemm_within_fp32_summation_bound", None),
    ("fp8:ties_away_from_zero", "test_e4m3_ties_round_to_nearest_even", "fp8/test_e4m3_ties_round_to_nearest_even",
     None),
    ("fp8:transposed_scale_grid", "test_gemm_within_fp32_summation_bound",
     "fp8/test_gemm_within_fp32_summation_bound", None),
    ("mla:wrong_softmax_scale", "test_full_pass_matches_fp64_truth", "mla/test_full_pass_matches_fp64_truth", None),
    ("mla:half_rope_layout", "test_full_pass_matches_fp64_truth", "mla/test_full_pass_matches_fp64_truth", None),
    ("mla:paged_ignores_block_table", "test_paged_cache_equals_contiguous_for_any_block_placement and working",
     "mla/test_paged_cache_equals_contiguous_for_any_block_placement", {"working": "fail"}),
    ("mla:bf16_score_accumulation", "test_working_dtype_error_at_v3_head_widths",
     "mla/test_working_dtype_error_at_v3_head_widths", None),
    ("mla:bf16_only_forgetful_cache", "test_prefill_then_decode_equals_full_pass",
     "mla/test_prefill_then_decode_equals_full_pass", {"fp64": "n/a", "working": "fail"}),
    ("model:cache_never_read", "test_prefill_then_decode_equals_full_pass",
     "model/test_prefill_then_decode_equals_full_pass", None),
    ("ep:averaging_combine", "test_combine_sums_each_tokens_copies", "ep/test_combine_sums_each_tokens_copies", None),
]


def conform_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    """Run `dsv3 conform ... --format json` in this process: (exit code, the matrix document)."""
    code = main(["conform", *args, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("factory", "select", "prop", "variants"), MUTANTS, ids=[m[0] for m in MUTANTS])
def test_conform_catches_the_mutant(capsys, factory, select, prop, variants):
    spec = f"dsv3_mutants.{factory}"
    code, doc = conform_json(capsys, "--impl", spec, "-k", select)
    assert code == 1, f"{spec} passed {select}"
    cell = next(c for c in doc["cells"] if c["property"] == prop and c["implementation"] == spec)
    assert cell["status"] == "fail" and cell["message"], cell
    assert cell["rebuild"].startswith("Rebuild this case:") or not cell["example"], cell
    if variants:
        assert {v["variant"]: v["status"] for v in cell["variants"]} == variants
