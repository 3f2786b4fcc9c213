"""Conformance of an MLA layer (component `mla`) to DeepSeek-V3's semantics, plus the attention baselines.

The ground truth is MLA written out per head in float64 from the weights alone: explicit per-head K = [W_UK c ;
RoPE(k_pe)] and V = W_UV c, complex-pair RoPE, a causal softmax. Every implementation is checked against it, and
against itself (decode == full pass, chunked prefill, batched rows == separate rows, paged == contiguous).

Tolerances (the numerics policy, docs/contributing.md): float64 identities to 1e-10 relative (norm of the
difference over the norm of the truth); working dtypes by the flash-attention rule: the implementation's error
against the fp64 truth is at most FA_FACTOR times the error of a plain low-precision reference (the truth's own
formula run in that dtype); the FP8 latent cache by the same rule against the fp64 formula with a per-token e4m3
latent.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from baselines.attention import Attention
from dsv3ref.config import AttentionConfig, ModelConfig, RopeConfig
from dsv3ref.mla import MLA
from dsv3ref.rope import rope_frequencies, softmax_scale
from harness.analytic.flops import attention_layer_fwd_flops
from harness.analytic.kv_cache import kv_cache_bytes_per_token_layer
from harness.numerics import F64_IDENTITY_RTOL, rel_err
from harness.pytest_plugin import skip_if_not_applicable
from harness.strategies import attention_configs

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("mla")]

F64_TOL = F64_IDENTITY_RTOL
FA_FACTOR = 2.0  # flash-attention rule: FlashAttention's own tests allow twice the error of a plain reference
LOW_PRECISION = (torch.float32, torch.bfloat16)


@st.composite
def mla_configs(draw: st.DrawFn) -> ModelConfig:
    """A small random MLA model: q LoRA or a single wq, any head dims, plain RoPE or YaRN (active or not)."""
    att = AttentionConfig(kind="mla", num_heads=draw(st.integers(1, 4)), q_lora_rank=draw(st.sampled_from([0, 8, 12])),
                          kv_lora_rank=draw(st.sampled_from([4, 8, 16])),
                          qk_nope_head_dim=draw(st.sampled_from([2, 4, 8])),
                          qk_rope_head_dim=draw(st.sampled_from([2, 4, 8])),
                          v_head_dim=draw(st.sampled_from([2, 4, 8])))
    mscale = draw(st.sampled_from([0.707, 1.0]))
    if draw(st.booleans()):
        rope = RopeConfig(kind="yarn", theta=draw(st.sampled_from([100.0, 10000.0])),
                          factor=draw(st.sampled_from([1.0, 4.0, 40.0])),
                          original_max_position_embeddings=draw(st.sampled_from([8, 16, 64])), mscale=mscale,
                          mscale_all_dim=mscale)
    else:
        rope = RopeConfig(kind="default", theta=draw(st.sampled_from([100.0, 10000.0])))
    return ModelConfig(name="hypothesis-mla", vocab_size=16, hidden_size=draw(st.sampled_from([8, 16, 24])),
                       intermediate_size=16, num_layers=1, attention=att, rope=rope,
                       max_seq_len=draw(st.sampled_from([24, 48])))


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """float64 weights by official names: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.2^2)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MLA(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(s[-1]) if len(s) == 2
                else 1 + 0.2 * torch.randn(s, generator=g, dtype=torch.float64)) for k, s in shapes.items()}


def inputs(cfg: ModelConfig, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, cfg.hidden_size, generator=torch.Generator().manual_seed(seed + 1),
                       dtype=torch.float64)


def fp8_round(v: torch.Tensor) -> torch.Tensor:
    """Round each token (last dim) to float8 e4m3 with the scale amax / 448, back in v's dtype."""
    scale = v.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448
    return (v / scale).float().to(torch.float8_e4m3fn).to(v.dtype) * scale


def truth(cfg: ModelConfig, w: dict[str, torch.Tensor], x: torch.Tensor, start: int = 0,
          dtype: torch.dtype = torch.float64, latent_fp8: bool = False) -> torch.Tensor:
    """MLA over x's tokens at positions start.. (causal among themselves), per head, in `dtype` (softmax in fp32
    or fp64): the fp64 truth, or run in a working dtype, the plain low-precision reference; latent_fp8 rounds
    the latent c per token to e4m3 (what an FP8 latent cache stores)."""
    a = cfg.attention
    w = {k: v.to(dtype) for k, v in w.items()}
    x = x.to(dtype)
    bsz, seqlen, _ = x.shape

    def rms(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        vf = v.double()
        return (vf * torch.rsqrt(vf.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)).to(dtype) * weight

    def rope(v: torch.Tensor) -> torch.Tensor:  # v [B, S, ..., d]: adjacent pairs are complex numbers
        angles = torch.outer(torch.arange(start, start + seqlen, dtype=torch.float64), rope_frequencies(cfg))
        turn = torch.polar(torch.ones_like(angles), angles).view(1, seqlen, *([1] * (v.dim() - 3)), -1)
        pairs = torch.view_as_complex(v.double().unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(pairs * turn).flatten(-2).to(dtype)

    if a.q_lora_rank == 0:
        q = x @ w["wq.weight"].T
    else:
        q = rms(x @ w["wq_a.weight"].T, w["q_norm.weight"]) @ w["wq_b.weight"].T
    q = q.view(bsz, seqlen, a.num_heads, a.qk_head_dim)
    q = torch.cat([q[..., : a.qk_nope_head_dim], rope(q[..., a.qk_nope_head_dim:])], -1)
    kv = x @ w["wkv_a.weight"].T
    c, k_pe = rms(kv[..., : a.kv_lora_rank], w["kv_norm.weight"]), rope(kv[..., a.kv_lora_rank:])
    if latent_fp8:
        c = fp8_round(c)
    kvb = (c @ w["wkv_b.weight"].T).view(bsz, seqlen, a.num_heads, a.qk_nope_head_dim + a.v_head_dim)
    k = torch.cat([kvb[..., : a.qk_nope_head_dim], k_pe[:, :, None].expand(-1, -1, a.num_heads, -1)], -1)
    v = kvb[..., a.qk_nope_head_dim:]
    scores = torch.einsum("bshd,bthd->bhst", q, k) * softmax_scale(cfg)
    scores = scores.masked_fill(~torch.ones(seqlen, seqlen, dtype=torch.bool).tril(), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
    return torch.einsum("bhst,bthd->bshd", probs, v).flatten(2) @ w["wo.weight"].T


def _build(impl, cfg: ModelConfig, w: dict[str, torch.Tensor], dtype: torch.dtype, device: str):  # noqa: ANN001, ANN202
    return impl.build(cfg, {k: v.to(dtype) for k, v in w.items()}, dtype, device)


def _run(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return layer(x, *args, **kwargs)


# --- every implementation against the fp64 truth ------------------------------------------------------------------


@given(mla_configs(), st.integers(0, 2**16), st.integers(1, 3), st.data())
def test_full_pass_matches_fp64_truth(impl, dsv3_device, cfg, seed, batch, data):
    skip_if_not_applicable(impl, "fp64_exact")
    length = data.draw(st.integers(1, 12), label="length")
    start = data.draw(st.integers(0, cfg.max_seq_len - length), label="start")
    w, x = random_weights(cfg, seed), inputs(cfg, batch, length, seed)
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    assert rel_err(_run(layer, x.to(dsv3_device), start).cpu(), truth(cfg, w, x, start)) <= F64_TOL


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["fp32", "bf16"])
@given(mla_configs(), st.integers(0, 2**16), st.integers(8, 24))
def test_working_dtype_error_within_flash_attention_rule(impl, dsv3_device, dtype, cfg, seed, length):
    # Weights and inputs are rounded to `dtype` first, so the fp64 truth of those rounded values measures only
    # the arithmetic error; the plain reference is the truth's formula computed in `dtype`. Four rows of 8-24
    # tokens give >= 256 outputs, enough for the norm-wise ratio to be stable (1.6 at most over 1800 draws).
    w = {k: v.to(dtype).double() for k, v in random_weights(cfg, seed).items()}
    x = inputs(cfg, 4, length, seed).to(dtype).double()
    exact = truth(cfg, w, x)
    plain = rel_err(truth(cfg, w, x, dtype=dtype), exact)
    layer = _build(impl, cfg, w, dtype, dsv3_device)
    assert rel_err(_run(layer, x.to(dsv3_device, dtype)).cpu(), exact) <= FA_FACTOR * plain


# --- every implementation against itself --------------------------------------------------------------------------


@given(mla_configs(), st.integers(0, 2**16), st.integers(1, 3), st.data())
def test_prefill_then_decode_equals_full_pass(impl, dsv3_device, cfg, seed, batch, data):
    total = data.draw(st.integers(2, min(cfg.max_seq_len, 16)), label="total")
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    w, x = random_weights(cfg, seed), inputs(cfg, batch, total, seed).to(dsv3_device)
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    full = _run(layer, x)
    cache = impl.new_cache(layer, batch, total)
    steps = [_run(layer, x[:, :prefill], 0, cache)]
    steps += [_run(layer, x[:, t: t + 1], t, cache) for t in range(prefill, total)]
    assert rel_err(torch.cat(steps, 1), full) <= F64_TOL


@given(mla_configs(), st.integers(0, 2**16), st.data())
def test_chunked_prefill_equals_full_pass(impl, dsv3_device, cfg, seed, data):
    skip_if_not_applicable(impl, "chunked_prefill")
    total = data.draw(st.integers(3, min(cfg.max_seq_len, 20)), label="total")
    cuts = sorted(data.draw(st.sets(st.integers(1, total - 1), min_size=1, max_size=3), label="cuts"))
    w, x = random_weights(cfg, seed), inputs(cfg, 2, total, seed).to(dsv3_device)
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    cache = impl.new_cache(layer, 2, total)
    bounds = [0, *cuts, total]
    chunks = [_run(layer, x[:, s:e], s, cache) for s, e in zip(bounds, bounds[1:], strict=False)]
    assert rel_err(torch.cat(chunks, 1), _run(layer, x)) <= F64_TOL


@given(mla_configs(), st.integers(0, 2**16), st.lists(st.integers(0, 10), min_size=2, max_size=4))
def test_batched_rows_of_different_lengths_equal_separate_rows(impl, dsv3_device, cfg, seed, lengths):
    skip_if_not_applicable(impl, "varlen")
    batch, width, steps = len(lengths), max(max(lengths), 1), 2
    w, x = random_weights(cfg, seed), inputs(cfg, batch, width + steps, seed).to(dsv3_device)
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    cache = impl.new_cache(layer, batch, width + steps)
    seqlens = torch.tensor(lengths, device=dsv3_device)
    prefill = _run(layer, x[:, :width], 0, cache, seqlens=seqlens)
    decoded = []
    for i in range(steps):  # the decode token of row b is x[b, width + i], placed at position lengths[b] + i
        decoded.append(_run(layer, x[:, width + i: width + i + 1], cache.lengths.clone(), cache))
    for b, n in enumerate(lengths):
        alone = torch.cat([x[b: b + 1, :n], x[b: b + 1, width:]], 1)
        expected = _run(layer, alone)
        got = torch.cat([prefill[b: b + 1, :n], *(d[b: b + 1] for d in decoded)], 1)
        assert rel_err(got, expected) <= F64_TOL
        assert torch.count_nonzero(prefill[b, n:]) == 0  # padding positions return zeros


@given(mla_configs(), st.integers(0, 2**16), st.sampled_from([4, 16, 64]), st.integers(0, 3), st.data())
def test_paged_cache_equals_contiguous_for_any_block_placement(impl, dsv3_device, cfg, seed, block, spare, data):
    skip_if_not_applicable(impl, "paged_cache")
    batch, total = 2, data.draw(st.integers(2, cfg.max_seq_len), label="total")
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    per_row = math.ceil(cfg.max_seq_len / block)
    num_blocks = batch * per_row + spare
    order = data.draw(st.permutations(range(num_blocks)), label="physical blocks")
    table = torch.tensor(order[: batch * per_row]).view(batch, per_row)
    w, x = random_weights(cfg, seed), inputs(cfg, batch, total, seed).to(dsv3_device)
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    outs = []
    for options in ({}, {"paged": True, "block_size": block, "num_blocks": num_blocks, "block_table": table}):
        cache = impl.new_cache(layer, batch, cfg.max_seq_len, **options)  # paged: unused slots are NaN
        steps = [_run(layer, x[:, :prefill], 0, cache)]
        steps += [_run(layer, x[:, t: t + 1], t, cache) for t in range(prefill, total)]
        outs.append(torch.cat(steps, 1))
    assert bool(torch.isfinite(outs[1]).all())  # no NaN from unused (poisoned) slots
    assert rel_err(outs[1], outs[0]) <= F64_TOL


@given(mla_configs(), st.integers(0, 2**16), st.integers(8, 24))
def test_fp8_latent_cache_error_within_flash_attention_rule(impl, dsv3_device, cfg, seed, total):
    # BF16 layer, FP8 latent cache, one token at a time. Low-precision reference: the fp64 formula with the latent
    # rounded per token to e4m3 (scale amax / 448); both errors against the unquantised fp64 truth. (DeepGEMM's
    # calc_diff < 1e-3 for FP8 GEMMs is exceeded by small random models: per-token e4m3 errors of ~3% do not
    # average out over a 4-64 wide latent.)
    skip_if_not_applicable(impl, "fp8_cache")
    total = min(cfg.max_seq_len, total)
    w = {k: v.to(torch.bfloat16).double() for k, v in random_weights(cfg, seed).items()}
    x = inputs(cfg, 4, total, seed).to(torch.bfloat16).double()
    exact = truth(cfg, w, x)
    plain = rel_err(truth(cfg, w, x, latent_fp8=True), exact)
    layer = _build(impl, cfg, w, torch.bfloat16, dsv3_device)
    cache = impl.new_cache(layer, 4, total, fp8=True)
    xb = x.to(dsv3_device, torch.bfloat16)
    steps = [_run(layer, xb[:, :1], 0, cache)] + [_run(layer, xb[:, t: t + 1], t, cache) for t in range(1, total)]
    assert rel_err(torch.cat(steps, 1).cpu(), exact) <= FA_FACTOR * plain


@given(mla_configs(), st.integers(1, 3), st.integers(1, 8))
def test_cache_bytes_per_token_equal_the_analytic_formula(impl, dsv3_device, cfg, batch, tokens):
    layer = _build(impl, cfg, random_weights(cfg, 0), torch.bfloat16, dsv3_device)
    cache = impl.new_cache(layer, batch, tokens)
    _run(layer, torch.randn(batch, tokens, cfg.hidden_size, dtype=torch.bfloat16, device=dsv3_device), 0, cache)
    expected = kv_cache_bytes_per_token_layer(cfg.attention, "bf16", impl.cache_mode)
    assert impl.cache_bytes_per_token(cache) == expected


@given(mla_configs(), st.integers(0, 2**16), st.integers(2, 3), st.data())
def test_nan_in_one_sequence_stays_in_that_sequence(impl, dsv3_device, cfg, seed, batch, data):
    total = data.draw(st.integers(2, min(cfg.max_seq_len, 12)), label="total")
    bad_row, bad_token = data.draw(st.integers(0, batch - 1)), data.draw(st.integers(0, total - 2))
    w, x = random_weights(cfg, seed), inputs(cfg, batch, total, seed).to(dsv3_device)
    x[bad_row, bad_token, 0] = float("nan")
    layer = _build(impl, cfg, w, torch.float64, dsv3_device)
    cache = impl.new_cache(layer, batch, total)
    out = torch.cat([_run(layer, x[:, :-1], 0, cache), _run(layer, x[:, -1:], total - 1, cache)], 1)
    for b in range(batch):
        if b == bad_row:  # every later token of that row attends the NaN key (earlier ones may: additive masks)
            assert bool(torch.isnan(out[b, bad_token:]).all())
        else:
            assert rel_err(out[b], _run(layer, x[b: b + 1])[0]) <= F64_TOL


# --- the reference's two modes, the baselines, FLOPs ---------------------------------------------------------------


@given(mla_configs(), st.integers(0, 2**16), st.integers(1, 3), st.data())
def test_absorbed_equals_naive_in_float64(cfg, seed, batch, data):
    total = data.draw(st.integers(2, min(cfg.max_seq_len, 16)), label="total")
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    sd = {k: v.double() for k, v in random_weights(cfg, seed).items()}
    x = inputs(cfg, batch, total, seed)
    outs = {}
    for mode in ("naive", "absorbed"):
        layer = MLA(cfg, mode).double()
        layer.load_state_dict(sd)
        cache = layer.new_cache(batch, total)
        outs[mode] = torch.cat([_run(layer, x[:, :prefill], 0, cache)]
                               + [_run(layer, x[:, t: t + 1], t, cache) for t in range(prefill, total)], 1)
    assert rel_err(outs["absorbed"], outs["naive"]) <= F64_TOL


def _baseline_cfg(att: AttentionConfig, hidden: int) -> ModelConfig:
    return ModelConfig(name="hypothesis-attn", vocab_size=16, hidden_size=hidden, intermediate_size=16,
                       num_layers=1, attention=att, max_seq_len=32)


@given(attention_configs(kinds=("gqa",)), st.sampled_from([16, 32]), st.integers(0, 2**16), st.integers(1, 12))
def test_gqa_equals_mha_with_each_kv_head_repeated_for_its_group(att, hidden, seed, length):
    # kv_heads == heads is MHA and kv_heads == 1 is MQA: both are instances of this identity.
    gqa_cfg = _baseline_cfg(att, hidden)
    mha_cfg = _baseline_cfg(dataclasses.replace(att, kind="mha", num_kv_heads=att.num_heads), hidden)
    torch.manual_seed(seed)
    gqa = Attention(gqa_cfg).double()
    mha = Attention(mha_cfg).double()
    group, hd = att.num_heads // att.num_kv_heads, gqa.head_dim
    state = {}
    for name, tensor in gqa.state_dict().items():
        if name.split(".")[0] in ("wk", "wv"):  # rows [kv_head, head_dim, ...] -> each KV head `group` times
            tensor = tensor.unflatten(0, (att.num_kv_heads, hd)).repeat_interleave(group, 0).flatten(0, 1)
        state[name] = tensor
    mha.load_state_dict(state)
    x = torch.randn(2, length, hidden, dtype=torch.float64)
    assert rel_err(_run(gqa, x), _run(mha, x)) <= F64_TOL


@given(attention_configs(kinds=("mha", "gqa", "mqa")), st.integers(1, 3), st.integers(1, 6))
def test_baseline_cache_bytes_per_token_equal_the_analytic_formula(att, batch, tokens):
    cfg = _baseline_cfg(att, 32)
    layer = Attention(cfg).to(torch.bfloat16)
    cache = layer.new_cache(batch, tokens)
    _run(layer, torch.randn(batch, tokens, 32, dtype=torch.bfloat16), 0, cache)
    assert cache.bytes_per_token() == kv_cache_bytes_per_token_layer(att, "bf16")


@given(st.one_of(mla_configs(), attention_configs(kinds=("mha", "gqa", "mqa")).map(lambda a: _baseline_cfg(a, 32))),
       st.sampled_from(["naive", "absorbed"]), st.integers(1, 3), st.integers(1, 6), st.integers(0, 8))
def test_counted_flops_equal_the_analytic_layer_formula(cfg, mode, batch, new, cached):
    layer = MLA(cfg, mode) if cfg.attention.kind == "mla" else Attention(cfg)
    cache = layer.new_cache(batch, cached + new)
    x = torch.randn(batch, cached + new, cfg.hidden_size)
    if cached:
        _run(layer, x[:, :cached], 0, cache)
    with FlopCounterMode(display=False) as counter:
        _run(layer, x[:, cached:], cached, cache)
    assert counter.get_total_flops() == attention_layer_fwd_flops(cfg, new, cached, batch, mode)
