"""harness.analytic.decode: the per-operator decode roofline and the DeepSeek-V3 decode-unit prediction, exact values
from the config and the profiles, and the errors."""

from __future__ import annotations

import pytest

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import load_profile
from harness.analytic.decode import DecodeStep, Deployment, deployment_step, expected_distinct_experts, predict
from harness.analytic.flops import model_fwd_flops
from harness.analytic.tpot import ep_comm_bound

V3 = ModelConfig.preset("deepseek-v3-671b")
H800 = load_profile("h800")


def test_v3_operators_from_the_config():
    step = DecodeStep(V3, batch=1, context=4096, weights="bf16", dense="bf16", kv="bf16")
    ops = {op.name: op for op in step.ops()}
    attention = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 128 * 128 * 7168
    assert ops["attention"].weight_bytes == 61 * (attention + 7168) * 2
    assert ops["attn.cache"].cache_bytes == 61 * 4097 * 1152  # the latent rows of context + 1 tokens, BF16
    assert ops["ffn.dense"].weight_bytes == 3 * (3 * 7168 * 18432 + 7168) * 2
    assert ops["moe.routed"].weight_bytes == 58 * 8 * 3 * 7168 * 2048 * 2  # batch 1: its 8 experts
    assert ops["moe.router"].weight_bytes == 58 * (256 * 7168 + 256 + 7168) * 2
    assert ops["head"].flops == 2 * 129280 * 7168
    assert sum(op.flops for op in ops.values()) == model_fwd_flops(V3, 1, 4096, 1, "absorbed")
    naive = {op.name: op for op in DecodeStep(V3, 1, 4096, mla_mode="naive").ops()}
    assert naive["attn.cache"].cache_bytes == 61 * 4097 * 128 * 320 * 2  # per-head K/V


def test_fp8_weights_count_their_block_scales():
    fp8 = {op.name: op for op in DecodeStep(V3, 1, 0, weights="fp8").ops()}
    bf16 = {op.name: op for op in DecodeStep(V3, 1, 0, weights="bf16").ops()}
    expert = 58 * 8 * 3 * 7168 * 2048
    assert fp8["moe.routed"].weight_bytes == expert * (1 + 4 / 128**2)
    assert fp8["moe.routed"].dtype == "fp8" and bf16["moe.routed"].dtype == "bf16"
    assert fp8["head"].weight_bytes == bf16["head"].weight_bytes  # the head stays BF16


def test_distinct_experts_and_the_roofline_terms():
    assert expected_distinct_experts(V3, 1) == pytest.approx(8)
    assert expected_distinct_experts(V3, 10_000) == pytest.approx(256)
    assert expected_distinct_experts(ModelConfig.preset("qwen2.5-72b"), 4) == 0
    prediction = predict(DecodeStep(V3, 1, 4096), H800)
    # batch 1 reads every weight for one token: memory-bound everywhere
    assert prediction.bound == "memory" and prediction.compute_s == 0
    assert prediction.time_s == pytest.approx(prediction.bytes / 3350e9)


def test_decode_unit_overlaps_the_all_to_all_with_compute():
    u = deployment_step(V3, Deployment(), H800)
    comm = ep_comm_bound(V3, 50, "config-exact", 32, micro_batches=2)
    assert u.deployment.ep == 320 and u.experts_per_gpu == 1 and u.link == "scale-out"
    assert u.comm_s == comm.comm_time_s and u.comm_only_s == 2 * 58 * comm.comm_time_s
    compute = 2 * u.compute.time_s
    assert max(compute, u.comm_only_s) <= u.tpot_s <= u.tpot_serial_s == pytest.approx(compute + u.comm_only_s)
    # each GPU runs 32 x 9 expert-token pairs per micro-batch over its one expert
    routed = next(op for op in u.compute.ops if op.name == "moe.routed")
    assert routed.flops == 58 * 2 * 32 * 9 * 3 * 7168 * 2048
    assert u.tokens_per_s == 1 / u.tpot_s and u.tokens_per_s_per_gpu == 64 / u.tpot_s
    assert u.fits


def test_decode_unit_on_a_rack_and_on_a_single_gpu():
    nvl72 = deployment_step(V3, Deployment(), load_profile("gb200-nvl72"))
    assert (nvl72.deployment.ep, nvl72.experts_per_gpu, nvl72.link) == (72, 4, "scale-up")
    single = deployment_step(V3, Deployment(), load_profile("rtx4090"))
    assert (single.deployment.ep, single.link, single.comm_s) == (1, "none", 0.0)
    assert not single.fits  # 671B parameters in FP8 on 24 GB


def test_errors():
    with pytest.raises(ConfigError, match="^batch: expected an integer >= 1"):
        DecodeStep(V3, 0, 10)
    with pytest.raises(ConfigError, match="^weights: expected one of"):
        DecodeStep(V3, 1, 10, weights="int4")
    with pytest.raises(ConfigError, match="^dense: expected fp32 or bf16"):
        DecodeStep(V3, 1, 10, dense="fp8")
    with pytest.raises(ConfigError, match="attention.kind: the decode predictor models MLA"):
        DecodeStep(ModelConfig.preset("qwen2.5-72b"), 1, 10)
    with pytest.raises(ConfigError, match="^ep: expected a positive integer"):
        Deployment(ep=0)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        deployment_step(V3.replace(moe=None, intermediate_size=18432), Deployment(), H800)
