"""Unit tests of dsv3ref.moe: the two execution paths agree, gradients, state-dict layout, precisions, the bias
dtype, the stacked-weight cache, FLOP counts and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from dsv3ref.config import ConfigError, ModelConfig, MoEConfig
from dsv3ref.layers import MLP
from dsv3ref.moe import Gate, MoE, MoEInputError, select_experts
from dsv3ref.moe_grouped import GroupedInputError, default_gemm, grouped_mm_supported
from harness.analytic.flops import moe_layer_fwd_flops_per_token
from harness.numerics import max_rel_err

TINY = ModelConfig.preset("dsv3-tiny")


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    groups = draw(st.sampled_from([1, 2, 4]))
    per_group = draw(st.integers(2, 6))
    topk_group = draw(st.integers(1, groups))
    topk = draw(st.integers(1, topk_group * per_group))
    moe = MoEConfig(n_routed_experts=groups * per_group, num_experts_per_tok=topk,
                    moe_intermediate_size=draw(st.sampled_from([8, 16])), n_shared_experts=draw(st.integers(0, 2)),
                    n_group=groups, topk_group=topk_group, score_func=draw(st.sampled_from(["sigmoid", "softmax"])),
                    route_scale=2.5, bias=draw(st.booleans()))
    return TINY.replace(hidden_size=draw(st.sampled_from([16, 32])), moe=moe)


def layer(cfg: ModelConfig, seed: int, dtype: torch.dtype = torch.float64, **kwargs: str) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg, **kwargs).to(dtype)
    if moe.gate.bias is not None:
        with torch.no_grad():
            moe.gate.bias.uniform_(-1.0, 0.5)
    return moe


def copy_of(moe: MoE, **kwargs: str) -> MoE:
    other = MoE(moe.cfg, **kwargs).to(moe.gate.weight.dtype)
    other.load_state_dict(moe.state_dict())
    return other


@given(configs(), st.integers(0, 2**31 - 1), st.integers(0, 40))
def test_auto_equals_loop_in_float64(cfg, seed, n):
    # auto (grouped) == looped is an algebraic identity: float64 to 1e-12 relative (only summation order differs).
    grouped = layer(cfg, seed)
    loop = copy_of(grouped, backend="loop")
    x = torch.randn(n, cfg.hidden_size, dtype=torch.float64)
    y = grouped(x)
    assert y.shape == x.shape
    if n:
        assert max_rel_err(y, loop(x)) <= 1e-12
        assert torch.equal(grouped.last_indices, loop.last_indices)


@given(configs(), st.integers(0, 2**31 - 1), st.integers(1, 40),
       st.sampled_from(["grouped_mm", "grouped_mm_t", "padded"]))
def test_stacked_weight_backends_equal_segments_in_float32(cfg, seed, n, gemm):
    # Same products, different kernels: fp32 matmul rounding (2^-24 per add over <= 64 terms) stays below 1e-5.
    segments = layer(cfg, seed, torch.float32, backend="segments")
    other = copy_of(segments, backend=gemm)
    x = torch.randn(n, cfg.hidden_size)
    assert max_rel_err(other(x), segments(x)) <= 1e-5


@given(configs(), st.integers(0, 2**31 - 1), st.integers(1, 24))
def test_padded_backend_equals_loop_in_float64(cfg, seed, n):
    # bmm runs in fp64 too: the zero padding adds exact zeros, so padded == loop to 1e-12 like the other paths.
    padded = layer(cfg, seed, backend="padded")
    loop = copy_of(padded, backend="loop")
    x = torch.randn(n, cfg.hidden_size, dtype=torch.float64)
    assert max_rel_err(padded(x), loop(x)) <= 1e-12


@given(st.integers(0, 2**31 - 1), st.integers(1, 32))
def test_grouped_bf16_error_within_the_loop_error(seed, n):
    # Flash-attention rule: against a float64 truth of the same weights and routing, the grouped path's bf16 error
    # stays within 2x the loop's (both accumulate in bf16; only the order and the folding of the routing weight
    # into the expert activation differ). The router is fp32 so bf16 and fp64 select the same experts. The slack
    # of 1e-3 x max|truth| (a quarter of a bf16 ulp at the largest output) covers batches where the loop's error
    # happens to be tiny (one token, few terms).
    cfg = TINY
    grouped = layer(cfg, seed, torch.bfloat16, precision="fp32")
    loop = copy_of(grouped, backend="loop", precision="fp32")
    truth_layer = copy_of(grouped, backend="loop", precision="fp32").double()
    x = torch.randn(n, cfg.hidden_size, dtype=torch.bfloat16)
    truth = truth_layer(x.double())
    y, y_loop = grouped(x), loop(x)
    assume(torch.equal(grouped.last_indices, truth_layer.last_indices))  # fp32 and fp64 routers tie-break alike
    err, err_loop = (y.double() - truth).abs().max().item(), (y_loop.double() - truth).abs().max().item()
    assert err <= 2 * err_loop + 1e-3 * truth.abs().max().item()


@pytest.mark.parametrize("gemm", ["segments", "grouped_mm", "grouped_mm_t", "padded"])
def test_grouped_gradients_equal_the_loop(gemm):
    # Gradients reach every expert that got tokens (through the weight stack for grouped_mm) and the router through
    # the gate weights; experts without tokens get none or zeros. fp32, different summation orders: 1e-5 relative.
    cfg = ModelConfig.preset("dsv3-small")
    grouped = layer(cfg, 0, torch.float32, backend=gemm)
    loop = copy_of(grouped, backend="loop")
    x = torch.randn(2, 30, cfg.hidden_size)
    for m in (grouped, loop):
        m(x).square().sum().backward()
    assert grouped.gate.bias.grad is None and not grouped.gate.bias.requires_grad
    assert grouped.gate.weight.grad.abs().max() > 0
    for (name, p), q in zip(grouped.named_parameters(), loop.parameters(), strict=True):
        if p.requires_grad:
            zero = torch.zeros_like(p)
            got, expected = zero if p.grad is None else p.grad, zero if q.grad is None else q.grad
            assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), name


def test_state_dict_uses_the_official_names():
    moe = MoE(TINY)
    names = set(moe.state_dict())
    assert {"gate.weight", "gate.bias", "shared_experts.w1.weight", "shared_experts.w2.weight",
            "shared_experts.w3.weight"} <= names
    assert {f"experts.{i}.w{j}.weight" for i in range(8) for j in (1, 2, 3)} <= names
    assert len(names) == 2 + 3 + 8 * 3
    assert moe.gate.weight.shape == (8, 64) and moe.gate.bias.shape == (8,)
    assert isinstance(moe.experts[0], MLP) and moe.shared_experts.w1.weight.shape == (32, 64)


def test_shared_experts_absent_without_shared_and_bias_absent_without_bias():
    cfg = TINY.replace(moe=MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16))
    moe = MoE(cfg)
    assert moe.shared_experts is None and moe.gate.bias is None
    assert not any(k.startswith(("shared_experts", "gate.bias")) for k in moe.state_dict())


def test_bias_stays_fp32_in_a_bf16_module_and_follows_fp64():
    moe = MoE(TINY)
    with torch.no_grad():
        moe.gate.bias.fill_(1.0 + 2**-20)  # not representable in bf16
    moe.bfloat16()
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.bias.dtype == torch.float32 and moe.gate.bias[0].item() == 1.0 + 2**-20
    moe.half()
    assert moe.gate.bias.dtype == torch.float32
    moe.double()
    assert moe.gate.bias.dtype == torch.float64 and moe.gate.bias[0].item() == 1.0 + 2**-20
    assert not moe.gate.bias.requires_grad


def test_router_precision_sets_the_score_dtype():
    x = torch.randn(5, 64).bfloat16()
    official = Gate(TINY, "bf16").bfloat16()
    hf = Gate(TINY, "fp32").bfloat16()
    hf.load_state_dict(official.state_dict())
    assert official.scores(x).dtype == torch.bfloat16
    assert hf.scores(x).dtype == torch.float32
    assert official(x)[0].dtype == hf(x)[0].dtype == torch.bfloat16
    softmax = TINY.replace(moe=MoEConfig(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                         score_func="softmax"))
    assert Gate(softmax, "bf16").bfloat16().scores(x).dtype == torch.float32  # softmax is fp32 in the official code


@given(st.integers(0, 2**31 - 1))
def test_bf16_and_fp32_routers_agree_away_from_ties(seed):
    # bf16 logits and scores round at 2^-8 relative; tokens whose top-k cut is wider than 0.05 route identically.
    cfg = TINY.replace(moe=dataclasses.replace(TINY.moe, n_group=1, topk_group=1))
    gen = torch.Generator().manual_seed(seed)
    gate16 = Gate(cfg, "bf16").bfloat16()
    gate32 = Gate(cfg, "fp32").bfloat16()
    gate32.load_state_dict(gate16.state_dict())
    x = torch.randn(64, 64, generator=gen).bfloat16()
    top = (gate32.scores(x).double() + gate32.bias.double()).sort(dim=-1, descending=True).values
    clear = (top[:, 1] - top[:, 2]) > 0.05  # k = 2
    a, b = gate16(x)[1], gate32(x)[1]
    assert torch.equal(a[clear].sort(-1).values, b[clear].sort(-1).values)


def test_last_routing_is_kept_for_the_bias_update():
    moe = MoE(TINY)
    x = torch.randn(3, 7, 64)
    moe(x)
    assert moe.last_indices.shape == (21, 2) and not moe.last_indices.requires_grad
    assert moe.gate.last_scores.shape == (21, 8)


def test_grouped_mm_weight_stack_follows_in_place_updates():
    moe = layer(ModelConfig.preset("dsv3-tiny"), 0, torch.float32, backend="grouped_mm").eval()
    loop = copy_of(moe, backend="loop")
    x = torch.randn(16, 64)
    with torch.no_grad():
        moe(x)
        for m in (moe, loop):
            m.experts[3].w2.weight.mul_(3.0)
            m.experts[5].w1.weight.add_(0.5)
        assert max_rel_err(moe(x), loop(x)) <= 1e-6
        moe.load_state_dict(copy_of(moe).state_dict())
        loop.load_state_dict(moe.state_dict())
        assert max_rel_err(moe(x), loop(x)) <= 1e-6


@pytest.mark.parametrize("backend", ["loop", "segments"])
def test_flop_counter_matches_the_analytic_formula(backend):
    cfg = ModelConfig.preset("dsv3-small")
    moe = MoE(cfg, backend=backend)
    x = torch.randn(37, cfg.hidden_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        moe(x)
    assert counter.get_total_flops() == 37 * moe_layer_fwd_flops_per_token(cfg)
    assert moe_layer_fwd_flops_per_token(cfg) == 2 * 256 * 16 + 6 * 256 * 128 * (4 + 1)


def test_moe_flops_formula_needs_a_moe_config():
    with pytest.raises(ConfigError, match="moe"):
        moe_layer_fwd_flops_per_token(ModelConfig.preset("qwen2.5-72b"))


def test_default_gemm():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_gemm(cpu, torch.bfloat16, (1024, 512), 0.5) == "grouped_mm_t"  # few experts hit
    assert default_gemm(cpu, torch.bfloat16, (1024, 512), 9.0) == "padded"  # most hit by a few tokens each
    assert default_gemm(cpu, torch.bfloat16, (1024, 512), 9.0, padding=20.0) == "grouped_mm"  # one hot expert
    assert default_gemm(cpu, torch.bfloat16, (1024, 512), 96.0) == "grouped_mm"
    assert default_gemm(cpu, torch.bfloat16, (1024, 512), 384.0) == "segments"  # large batch
    assert default_gemm(cpu, torch.float64, (1024, 512), 1.0) == "segments"  # grouped_mm has no fp64
    assert default_gemm(cuda, torch.bfloat16, (1024, 512), 384.0) == "grouped_mm"
    assert default_gemm(cuda, torch.float32, (1024, 512), 384.0) == "segments"
    assert default_gemm(cuda, torch.bfloat16, (1020, 512), 384.0) == "segments"  # rows not 16-byte aligned
    assert default_gemm(cpu, torch.bfloat16, (1024, 20), 1.0) == "segments"
    assert grouped_mm_supported(torch.float32, (4, 8)) and not grouped_mm_supported(torch.bfloat16, (4, 8))


def test_auto_runs_converted_experts_and_training_as_segments():
    # grouped_mm multiplies raw weights: with swapped linears (as FP8 conversion does) auto must call the modules.
    class Doubled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    cfg = ModelConfig.preset("dsv3-small")
    moe = layer(cfg, 0, torch.float32)
    reference = copy_of(moe, backend="loop")
    for m in (moe, reference):
        for e in m.experts:
            doubled = Doubled(e.w2.in_features, e.w2.out_features, bias=False)
            doubled.weight = e.w2.weight
            e.w2 = doubled
    x = torch.randn(3, cfg.hidden_size)  # 3 * 4 / 16 rows per expert: auto would pick grouped_mm on the CPU
    with torch.no_grad():
        assert max_rel_err(moe(x), reference(x)) <= 1e-6
    assert max_rel_err(moe(x), reference(x)) <= 1e-6
    moe.backend = "grouped_mm"
    with pytest.raises(ConfigError, match="not plain nn.Linear"):
        moe(x)


def test_select_experts_masks_dropped_groups_with_minus_inf():
    # All biased scores are negative: a 0.0 fill would pick the dropped group's experts.
    moe = MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, n_group=2, topk_group=1,
                    bias=True)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.full((4,), -2.0)
    assert sorted(select_experts(scores, bias, moe)[0].tolist()) == [0, 1]
    assert sorted(select_experts(scores, bias + torch.tensor([0.0, 0.0, 5.0, 0.0]), moe)[0].tolist()) == [2, 3]


# --- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "match"), [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # top-k > experts
    ({"topk_group": 5}, "topk_group"),  # more groups kept than exist
    ({"n_routed_experts": 10}, "n_group"),  # 10 experts in 4 groups
    ({"n_routed_experts": 4, "num_experts_per_tok": 1}, "n_group"),  # 1 expert per group: no top-2 group score
])
def test_invalid_routing_configs(fields, match):
    base = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_group=4, topk_group=2,
                bias=True)
    with pytest.raises(ConfigError, match=match):
        MoEConfig(**dict(base, **fields))


def test_invalid_constructor_arguments():
    with pytest.raises(ConfigError, match="backend: expected one of auto, grouped_mm, grouped_mm_t, loop, padded"):
        MoE(TINY, backend="cublas")
    with pytest.raises(ConfigError, match="precision"):
        Gate(TINY, precision="fp8")
    with pytest.raises(ConfigError, match="moe"):
        MoE(ModelConfig.preset("qwen2.5-72b"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_non_finite_input_is_rejected(bad, backend):
    moe = MoE(TINY, backend=backend)
    x = torch.randn(4, 64)
    x[2, 7] = bad
    with pytest.raises(MoEInputError, match="x: expected finite router logits"):
        moe(x)


def test_nan_gate_weight_is_rejected():
    moe = MoE(TINY)
    with torch.no_grad():
        moe.gate.weight[0, 0] = float("nan")
    with pytest.raises(MoEInputError, match="gate.weight"):
        moe(torch.randn(2, 64))


def test_wrong_shapes_and_dtypes_are_rejected():
    moe = MoE(TINY)
    with pytest.raises(MoEInputError, match=r"x: expected shape \[\.\.\., 64\]"):
        moe(torch.randn(4, 63))
    with pytest.raises(MoEInputError, match="x: expected shape"):
        moe(torch.tensor(1.0))
    with pytest.raises(MoEInputError, match="x: expected dtype torch.float32"):
        moe(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(MoEInputError, match=r"x: expected shape \[tokens, 64\]"):
        moe.gate(torch.randn(2, 3, 64))
    with pytest.raises(GroupedInputError, match="grouped_mm"):
        MoE(TINY, backend="grouped_mm").double()(torch.randn(4, 64, dtype=torch.float64))
    odd = TINY.replace(hidden_size=60)
    with pytest.raises(GroupedInputError, match="hidden 60"):
        MoE(odd, backend="grouped_mm").bfloat16()(torch.randn(4, 60, dtype=torch.bfloat16))


def test_empty_input_gives_empty_output():
    for backend in ("loop", "auto"):
        moe = MoE(TINY, backend=backend)
        assert moe(torch.randn(0, 64)).shape == (0, 64)
        assert moe(torch.randn(2, 0, 64)).shape == (2, 0, 64)
        assert moe.last_indices.shape == (0, 2)


@pytest.mark.parametrize("variant", ["eager", "grouped_mm", "batched_mm"])
def test_transformers_layer_built_from_our_weights_matches(variant):
    # The benchmark compares against transformers over the same weights; each experts implementation must compute
    # the same layer. fp32 with our fp32 router (as transformers'): products of 256 terms, 1e-5 relative.
    pytest.importorskip("transformers")
    from harness.adapters.moe import build_hf_moe

    cfg = ModelConfig.preset("dsv3-small")
    ours = layer(cfg, 0, torch.float32, precision="fp32")
    hf = build_hf_moe(cfg, ours.state_dict(), torch.float32, "cpu", variant)
    x = torch.randn(40, cfg.hidden_size)
    with torch.no_grad():
        assert max_rel_err(hf(x), ours(x)) <= 1e-5
    bf16 = build_hf_moe(cfg, ours.state_dict(), torch.bfloat16, "cpu", variant)
    assert bf16.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(bf16.gate.e_score_correction_bias, ours.gate.bias)
    with pytest.raises(ValueError, match="experts_implementation"):
        build_hf_moe(cfg, ours.state_dict(), torch.float32, "cpu", "sonic")


@pytest.mark.parametrize("backend", ["segments", "grouped_mm", "grouped_mm_t", "padded", "auto"])
def test_a_layer_built_under_inference_mode_runs_every_backend(backend):
    # Inference tensors keep no version counter; the weight stack must not ask for one.
    with torch.inference_mode():
        moe = layer(TINY, 0, torch.float32, backend=backend)
        loop = copy_of(moe, backend="loop")
        x = torch.randn(9, 64)
        assert max_rel_err(moe(x), loop(x)) <= 1e-6
        assert max_rel_err(moe(x), loop(x)) <= 1e-6  # a second call reuses the kept stack
