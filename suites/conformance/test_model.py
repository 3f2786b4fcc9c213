"""Conformance of an assembled DeepSeek-V3 model (component `model`), its checkpoints and its cost model.

The ground truth is the whole model written out in float64 from the weights alone (harness.cases.model): explicit
per-head MLA (K = [W_UK c ; RoPE(k_pe)], V = W_UV c, complex-pair RoPE, a causal softmax), DeepSeekMoE with every
expert run on every token and weighted by a dense routing matrix (sigmoid scores, selection bias, group-limited
top-k), RMSNorm and the head. Every implementation is checked against it and against itself (cached decoding == one
full pass, rows of different lengths == rows alone, paged == contiguous caches). The checkpoint and cost-model
properties run on dsv3ref's model: round trips in both layouts, a transformers checkpoint giving transformers'
logits and greedy tokens, generation with caches == recomputation, counted FLOPs == the analytic total, and the
decode predictor's bytes and FLOPs per operator == what the modules hold and run.

Tolerances (the numerics policy, docs/contributing.md): float64 identities to 1e-10 relative; the working dtype
(fp32) by the flash-attention rule (error against the fp64 truth at most FA_FACTOR x that of the truth's own formula
run in fp32). Routing is discrete: configs whose top-k or group choice is within ROUTING_MARGIN of a tie in the fp64
truth are skipped (`assume`), as a low-precision run may legitimately pick the other expert there.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from dsv3ref.checkpoint import expected_tensors, load_checkpoint, save_checkpoint
from dsv3ref.config import AttentionConfig, ModelConfig, MoEConfig, RopeConfig
from dsv3ref.fp8.quant import quant_128x128
from dsv3ref.generate import Sampling, generate
from dsv3ref.model import Transformer
from harness.analytic.decode import DecodeStep
from harness.analytic.flops import model_fwd_flops
from harness.bench.mla import transformers_installed
from harness.bench.moe import TouchedParameters
from harness.cases import CONFIG_IMPORT, config_line, rebuild
from harness.cases.model import IMPORTS, ModelTruth, model_state, model_tokens, model_weights
from harness.numerics import F64_IDENTITY_RTOL, rel_err
from harness.pytest_plugin import skip_if_not_applicable
from harness.registry import not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("model")]

F64_TOL = F64_IDENTITY_RTOL
FA_FACTOR = 2.0  # flash-attention rule: FlashAttention's own tests allow twice the error of a plain reference
ROUTING_MARGIN = 1e-4  # fp32 routing scores err by ~1e-6 here: gaps below 1e-4 may flip in a working dtype


@st.composite
def model_configs(draw: st.DrawFn) -> ModelConfig:
    """A tiny DeepSeek-V3-shaped model: MLA (q LoRA or a single wq), sigmoid routing with a bias and shared
    experts, dense first layers or none, plain RoPE or YaRN (active or not)."""
    att = AttentionConfig(kind="mla", num_heads=draw(st.integers(1, 4)), q_lora_rank=draw(st.sampled_from([0, 12])),
                          kv_lora_rank=draw(st.sampled_from([8, 16])), qk_nope_head_dim=draw(st.sampled_from([4, 8])),
                          qk_rope_head_dim=draw(st.sampled_from([2, 4])), v_head_dim=draw(st.sampled_from([4, 8])))
    groups = draw(st.sampled_from([1, 2]))
    experts = groups * draw(st.sampled_from([2, 4]))
    topk_group = draw(st.integers(1, groups))
    layers = draw(st.integers(1, 3))
    moe = MoEConfig(n_routed_experts=experts, num_experts_per_tok=draw(st.integers(1, topk_group * experts // groups)),
                    moe_intermediate_size=draw(st.sampled_from([8, 16])), n_shared_experts=1, n_group=groups,
                    topk_group=topk_group, first_k_dense_replace=draw(st.integers(0, min(1, layers))),
                    score_func="sigmoid", route_scale=draw(st.sampled_from([1.0, 2.5])), bias=True)
    if draw(st.booleans()):
        rope = RopeConfig(kind="yarn", factor=4.0, original_max_position_embeddings=draw(st.sampled_from([16, 64])))
    else:
        rope = RopeConfig(kind="default", theta=draw(st.sampled_from([100.0, 10000.0])))
    return ModelConfig(name="hypothesis-model", vocab_size=draw(st.sampled_from([32, 48])),
                       hidden_size=draw(st.sampled_from([16, 24])), num_layers=layers, intermediate_size=24,
                       attention=att, moe=moe, rope=rope, max_seq_len=32)


def note_case(cfg: ModelConfig, seed: int, batch: int, length: int, dtype: torch.dtype, *calls: str) -> None:
    """The lines that rebuild this example: weights, tokens, the model, then `calls` (printed with a failure)."""
    name = f"torch.{str(dtype).removeprefix('torch.')}"
    rebuild(*IMPORTS, CONFIG_IMPORT, config_line(cfg),
            f"w, tokens = model_weights(cfg, {seed}), model_tokens(cfg, {batch}, {length}, {seed})",
            f"model = impl.build(cfg, model_state(w, {name}), {name}, 'cpu')", *calls)


def _build(impl, cfg: ModelConfig, w: dict[str, torch.Tensor], dtype: torch.dtype, device: str):  # noqa: ANN001, ANN202
    return impl.build(cfg, model_state(w, dtype), dtype, device)


def check_self(got: torch.Tensor, full: torch.Tensor, bound: float, what: str) -> None:
    """`got` (a cached path's logits) equals the implementation's own full pass within `bound`, said in words."""
    err = rel_err(got, full)
    assert err <= bound, (f"{what}: logits differ from the implementation's own full pass by {err:.2e} "
                          f"(relative) > {bound:.1e} (float64)")


# --- every implementation against the fp64 truth ------------------------------------------------------------------


@given(model_configs(), st.integers(0, 2**16), st.integers(1, 3), st.integers(1, 12))
def test_full_pass_matches_fp64_truth(impl, dsv3_device, cfg, seed, batch, length):
    skip_if_not_applicable(impl, "fp64_exact")
    note_case(cfg, seed, batch, length, torch.float64, "out = impl.forward(model, tokens)",
              "expected = ModelTruth(cfg, w).logits(tokens)")
    w, tokens = model_weights(cfg, seed), model_tokens(cfg, batch, length, seed)
    model = _build(impl, cfg, w, torch.float64, dsv3_device)
    err = rel_err(impl.forward(model, tokens.to(dsv3_device)).cpu(), ModelTruth(cfg, w).logits(tokens))
    assert err <= F64_TOL, (f"one full pass of {batch} x {length} tokens: logits' relative error {err:.2e} against "
                            f"the float64 truth > {F64_TOL:.0e}")


@given(model_configs(), st.integers(0, 2**16), st.integers(6, 16))
def test_fp32_error_within_flash_attention_rule(impl, dsv3_device, cfg, seed, length):
    # Weights are rounded to fp32 first, so the fp64 truth of those values measures only the arithmetic error;
    # the plain reference is the truth's formula computed in fp32. Three rows give >= 18 positions of logits.
    note_case(cfg, seed, 3, length, torch.float32, "w = {k: v.float().double() for k, v in w.items()}",
              "out = impl.forward(model, tokens)", "exact = ModelTruth(cfg, w).logits(tokens)",
              "plain = ModelTruth(cfg, w, torch.float32).logits(tokens)")
    w = {k: v.float().double() for k, v in model_weights(cfg, seed).items()}
    tokens = model_tokens(cfg, 3, length, seed)
    truth = ModelTruth(cfg, w)
    exact = truth.logits(tokens)
    assume(truth.margin > ROUTING_MARGIN)
    plain = rel_err(ModelTruth(cfg, w, torch.float32).logits(tokens), exact)
    model = _build(impl, cfg, w, torch.float32, dsv3_device)
    err = rel_err(impl.forward(model, tokens.to(dsv3_device)).cpu(), exact)
    assert err <= FA_FACTOR * plain, (f"fp32 full pass: logits' error {err:.3e} against the float64 truth > "
                                      f"{FA_FACTOR} x the {plain:.3e} of a plain fp32 reference")


# --- every implementation against itself ----------------------------------------------------------------------


@given(model_configs(), st.integers(0, 2**16), st.integers(1, 3), st.data())
def test_prefill_then_decode_equals_full_pass(impl, dsv3_device, cfg, seed, batch, data):
    total = data.draw(st.integers(2, 16), label="total")
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), min_size=1, max_size=4), label="cuts"))
    bounds = [0, *cuts, total]  # a prefill, then decode steps of one or more tokens (a verified draft)
    note_case(cfg, seed, batch, total, torch.float64, f"cache = impl.new_cache(model, {batch}, {total})",
              f"steps = [impl.forward(model, tokens[:, s:e], cache) for s, e in zip({bounds}, {bounds[1:]})]",
              "out, full = torch.cat(steps, 1), impl.forward(model, tokens)")
    w, tokens = model_weights(cfg, seed), model_tokens(cfg, batch, total, seed).to(dsv3_device)
    model = _build(impl, cfg, w, torch.float64, dsv3_device)
    cache = impl.new_cache(model, batch, total)
    steps = [impl.forward(model, tokens[:, s:e], cache) for s, e in zip(bounds, bounds[1:], strict=False)]
    check_self(torch.cat(steps, 1), impl.forward(model, tokens), _self_consistency(impl, cfg, w, tokens.cpu()),
               f"a prefill of {cuts[0]} token(s), then decode steps ending at positions {cuts[1:] + [total]}")


def _self_consistency(impl, cfg: ModelConfig, w: dict[str, torch.Tensor], tokens: torch.Tensor) -> float:  # noqa: ANN001
    """How far two float64 runs of one implementation may differ: F64_TOL, or for an implementation with fp32
    steps inside (it declares fp64_exact not applicable: transformers' router and RoPE angles are fp32) the
    flash-attention rule's bound on fp32 arithmetic, FA_FACTOR x the error of the truth's formula in fp32 (on
    configs without near-tie routing, where fp32 may pick another expert)."""
    if "fp64_exact" not in not_applicable(impl):
        return F64_TOL
    truth = ModelTruth(cfg, w)
    exact = truth.logits(tokens)
    assume(truth.margin > ROUTING_MARGIN)
    return FA_FACTOR * rel_err(ModelTruth(cfg, w, torch.float32).logits(tokens), exact)


@given(model_configs(), st.integers(0, 2**16), st.lists(st.integers(0, 8), min_size=2, max_size=3))
def test_rows_of_different_lengths_equal_separate_rows(impl, dsv3_device, cfg, seed, lengths):
    skip_if_not_applicable(impl, "varlen")
    assume(max(lengths) > 0)
    batch, width, steps = len(lengths), max(lengths), 2
    note_case(cfg, seed, batch, width + steps, torch.float64,
              f"cache = impl.new_cache(model, {batch}, {width + steps})",
              f"prefill = impl.forward(model, tokens[:, :{width}], cache, torch.tensor({lengths}))",
              f"decoded = [impl.forward(model, tokens[:, {width} + i:{width + 1} + i], cache) for i in range({steps})]",
              f"alone = [impl.forward(model, torch.cat([tokens[b:b + 1, :n], tokens[b:b + 1, {width}:]], 1)) "
              f"for b, n in enumerate({lengths})]")
    w, tokens = model_weights(cfg, seed), model_tokens(cfg, batch, width + steps, seed).to(dsv3_device)
    model = _build(impl, cfg, w, torch.float64, dsv3_device)
    cache = impl.new_cache(model, batch, width + steps)
    prefill = impl.forward(model, tokens[:, :width], cache, torch.tensor(lengths, device=dsv3_device))
    decoded = [impl.forward(model, tokens[:, width + i: width + i + 1], cache) for i in range(steps)]
    for b, n in enumerate(lengths):  # row b continues at its own position n with tokens[b, width:]
        alone = torch.cat([tokens[b: b + 1, :n], tokens[b: b + 1, width:]], 1)
        got = torch.cat([prefill[b: b + 1, :n], *(d[b: b + 1] for d in decoded)], 1)
        check_self(got, impl.forward(model, alone), _self_consistency(impl, cfg, w, alone.cpu()),
                   f"row {b} of {batch} ({n} real tokens of {width}, then {steps} decode steps)")


@given(model_configs(), st.integers(0, 2**16), st.sampled_from([2, 8]), st.data())
def test_paged_cache_equals_contiguous(impl, dsv3_device, cfg, seed, block, data):
    skip_if_not_applicable(impl, "paged_cache")
    total = data.draw(st.integers(2, 16), label="total")
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    note_case(cfg, seed, 2, total, torch.float64,
              f"caches = impl.new_cache(model, 2, {total}), impl.new_cache(model, 2, {total}, paged=True, "
              f"block_size={block})",
              f"outs = [torch.cat([impl.forward(model, tokens[:, :{prefill}], c)] + [impl.forward(model, "
              f"tokens[:, t:t + 1], c) for t in range({prefill}, {total})], 1) for c in caches]")
    w, tokens = model_weights(cfg, seed), model_tokens(cfg, 2, total, seed).to(dsv3_device)
    model = _build(impl, cfg, w, torch.float64, dsv3_device)
    outs = []
    for options in ({}, {"paged": True, "block_size": block}):
        cache = impl.new_cache(model, 2, total, **options)  # paged: unused slots are NaN-poisoned
        steps = [impl.forward(model, tokens[:, :prefill], cache)]
        steps += [impl.forward(model, tokens[:, t: t + 1], cache) for t in range(prefill, total)]
        outs.append(torch.cat(steps, 1))
    bad = (~torch.isfinite(outs[1])).nonzero()
    assert not bad.numel(), (f"paged cache (blocks of {block}): logits of row {int(bad[0, 0])} position "
                             f"{int(bad[0, 1])} are not finite (a read of an unwritten, NaN-poisoned slot)")
    check_self(outs[1], outs[0], _self_consistency(impl, cfg, w, tokens.cpu()),
               f"paged cache (blocks of {block}), prefill {prefill} then decode to {total}")


# --- dsv3ref's model: generation, checkpoints, FLOPs and the decode predictor --------------------------------------


def _model(cfg: ModelConfig, seed: int, mode: str = "absorbed", backend: str = "auto") -> Transformer:
    return Transformer.from_state_dict(cfg, model_weights(cfg, seed), attn_mode=mode, moe_backend=backend)


@given(model_configs(), st.integers(0, 2**16), st.sampled_from(["absorbed", "naive"]), st.booleans(),
       st.lists(st.integers(1, 8), min_size=1, max_size=3), st.integers(1, 10), st.booleans())
def test_generation_with_caches_equals_recomputation(cfg, seed, mode, paged, lengths, new_tokens, greedy):
    paged = paged and mode == "absorbed"  # the paged cache is the latent cache
    model = _model(cfg, seed, mode)
    prompts = [model_tokens(cfg, 1, n, seed + i)[0].tolist() for i, n in enumerate(lengths)]
    sampling = Sampling() if greedy else Sampling(temperature=1.0, top_p=0.9, seed=seed)
    cached = generate(model, prompts, new_tokens, sampling=sampling, paged=paged, eos_id=0)
    recomputed = generate(model, prompts, new_tokens, sampling=sampling, use_cache=False, eos_id=0)
    assert cached == recomputed  # fp64: the same logits to ~1e-15, hence the same tokens and stops


@given(model_configs(), st.integers(0, 2**16), st.sampled_from([("official", 1), ("official", 2), ("hf", 1)]),
       st.booleans(), st.booleans())
def test_checkpoint_round_trip(tmp_path_factory, cfg, seed, layout, fp8, with_mtp):
    # Saved and loaded back: every tensor bitwise identical (FP8 weights kept as stored, with their scales), in
    # the same kind of module, the MTP tensors kept.
    layout, mp = layout
    cfg = cfg.replace(mtp_depth=1 if with_mtp else 0)
    assume(not (fp8 and mp > 1))  # FP8 scales of blocks narrower than 128 x mp do not split (convert.py asserts)
    if mp > 1:
        assume(cfg.moe.n_routed_experts % mp == 0 and all(
            d % mp == 0 for d in (cfg.vocab_size, cfg.intermediate_size, cfg.moe.moe_intermediate_size,
                                  cfg.attention.num_heads * cfg.attention.qk_head_dim, cfg.hidden_size)))
    state = {k: v.float() for k, v in model_weights(cfg, seed).items()}
    if fp8:
        for name in [n for n in state if n.endswith(("wkv_b.weight", "w1.weight"))]:
            state[name], state[name.removesuffix(".weight") + ".scale"] = quant_128x128(state[name])
    model = Transformer.from_state_dict(cfg, state)
    mtp = {n: torch.randn(s) for n, s in expected_tensors(cfg).shapes.items() if n.startswith("mtp.")}
    path = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model", layout, mtp=mtp, mp=mp,
                           max_shard_bytes=20_000)
    loaded = load_checkpoint(path, fp8="keep")
    assert loaded.layout == layout and loaded.config.replace(name=cfg.name, source=cfg.source) == cfg
    got = loaded.model.state_dict()
    assert set(got) == set(model.state_dict())
    assert all(torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)) for k, v in model.state_dict().items())
    assert set(loaded.mtp) == set(mtp) and all(torch.equal(loaded.mtp[k], v) for k, v in mtp.items())
    assert all(type(loaded.model.get_submodule(n.removesuffix(".weight"))) is type(model.get_submodule(
        n.removesuffix(".weight"))) for n in state if n.endswith(".weight"))  # FP8Linear where stored in FP8


def _hf_tiny(seed: int):  # noqa: ANN202
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                           n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                           first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                           qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises the selection bias to zero: give it values
        for layer in model.model.layers[cfg.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    return model


@pytest.mark.skipif(not transformers_installed(), reason="needs transformers (the hf extra)")
@pytest.mark.parametrize("seed", [0, 1])
def test_transformers_checkpoint_loads_with_its_logits_and_greedy_tokens(tmp_path, seed):
    # A random DeepseekV3ForCausalLM saved with save_pretrained (sharded, with an index) loads with strict checks.
    # Its logits (fp32) are within the flash-attention rule of our fp64 model from the same files, the plain
    # reference being our model in fp32; greedy generation gives transformers' tokens; saved back in the Hugging
    # Face layout, transformers loads it to the same logits.
    hf = _hf_tiny(seed)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_checkpoint(tmp_path)
    ours = loaded.model
    assert ours.cfg.mtp_depth == 1 and not loaded.mtp  # transformers saves no MTP layer
    tokens = model_tokens(ours.cfg, 2, 12, seed)
    with torch.no_grad():
        theirs = hf(tokens).logits
        mine = ours(tokens)
        exact = Transformer.from_state_dict(ours.cfg, {k: v.double() for k, v in ours.state_dict().items()})(tokens)
    assert rel_err(theirs, exact) <= FA_FACTOR * rel_err(mine, exact)
    # and the other way: our Hugging Face layout is what transformers' from_pretrained reads, unchanged
    again = type(hf).from_pretrained(save_checkpoint(ours, tmp_path / "ours", "hf")).eval()
    with torch.no_grad():
        assert torch.equal(again(tokens).logits, theirs)
    prompt = tokens[:, :4]
    hf.generation_config.eos_token_id = None  # 16 tokens whatever they are (min_new_tokens would mask EOS)
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert generate(ours, prompt, 16).tokens == expected[:, 4:].tolist()


@given(model_configs(), st.sampled_from(["absorbed", "naive"]), st.integers(1, 3), st.integers(1, 4),
       st.integers(0, 8))
def test_counted_forward_flops_equal_the_analytic_total(cfg, mode, batch, new, cached):
    model = _model(cfg, 0, mode, "loop")  # the loop runs exactly the selected experts
    cache = model.new_cache(batch, cached + new)
    tokens = model_tokens(cfg, batch, cached + new, 0)
    with torch.no_grad():
        if cached:
            model.extend(tokens[:, :cached], cache)
        with FlopCounterMode(display=False) as counter:
            model.extend(tokens[:, cached:], cache)
        with FlopCounterMode(display=False) as full:
            model(tokens)
    assert counter.get_total_flops() == model_fwd_flops(cfg, new, cached, batch, mode)
    assert full.get_total_flops() == model_fwd_flops(cfg, cached + new, 0, batch, mode, logits="all")


def _bytes(params: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@given(model_configs(), st.sampled_from(["absorbed", "naive"]), st.integers(1, 4), st.integers(0, 12))
def test_predictor_bytes_and_flops_per_operator_equal_the_modules(cfg, mode, batch, context):
    # fp32 model and cache: every predicted byte is a parameter or a cache row the step reads; per-operator FLOPs
    # are FlopCounterMode's per-module counts of the same decode step.
    model = _model(cfg, 1, mode, "loop").float()
    cache = model.new_cache(batch, context + 1)
    tokens = model_tokens(cfg, batch, context + 1, 1)
    with torch.no_grad():
        if context:
            model.extend(tokens[:, :context], cache)
        with TouchedParameters() as touched, FlopCounterMode(display=False) as counter:
            model.extend(tokens[:, context:], cache)
    seen = {id(p) for p in touched.seen.values()}
    layers = list(model.layers)
    moe = [b for i, b in enumerate(layers) if cfg.is_moe_layer(i)]
    experts = [e for b in moe for e in b.ffn.experts if any(id(p) in seen for p in e.parameters())]
    distinct = len(experts) / len(moe) if moe else 0.0
    step = DecodeStep(cfg, batch, context, weights="fp32", dense="fp32", kv="fp32", mla_mode=mode,
                      routed_experts=distinct)
    ops = {op.name: op for op in step.ops()}
    flops = counter.get_flop_counts()
    module = {"attention": [p for b in layers for p in [*b.attn_norm.parameters(), *b.attn.parameters()]],
              "ffn.dense": [p for b in layers if b not in moe for p in [*b.ffn_norm.parameters(), *b.ffn.parameters()]],
              "moe.router": [p for b in moe for p in [*b.ffn_norm.parameters(), *b.ffn.gate.parameters()]],
              "moe.shared": [p for b in moe for p in b.ffn.shared_experts.parameters()],
              "moe.routed": [p for e in experts for p in e.parameters()],
              "head": [*model.norm.parameters(), *model.head.parameters()]}
    for name, params in module.items():
        if name in ops:
            assert ops[name].weight_bytes == _bytes(params), name
    assert ops["attn.cache"].cache_bytes == batch * (context + 1) * sum(c.bytes_per_token() for c in cache.layers)
    assert ops["embed"].weight_bytes == batch * cfg.hidden_size * 4
    total = {name: sum(counts.values()) for name, counts in flops.items()}  # FlopCounterMode names modules by
    assert ops["attention"].flops + ops["attn.cache"].flops == total["Block.attn"]  # class path: all layers
    assert sum(ops[n].flops for n in ops if n.startswith(("moe.", "ffn."))) == total["Block.ffn"]
    assert ops["head"].flops == total["Global"] - total["Block"]
