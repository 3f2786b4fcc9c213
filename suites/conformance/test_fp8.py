"""Conformance of FP8 fine-grained quantization and the block-scaled FP8 GEMM (component `fp8`).

Quantizers are deterministic, so they are checked bit for bit against an oracle written here independently of
dsv3ref (a plain loop over tiles: amax, scale = max(amax, 1e-4) / 448 in fp32, optional power-of-two round-up,
torch's round-to-nearest-even cast of x / scale) on hypothesis-drawn shapes (non-multiples of 128 included),
bf16/fp32 inputs, magnitudes from 1e-6 to 1e6 with a distinct amax per tile, all-zero tiles and exact e4m3
ties. The GEMM follows DeepGEMM's rule (calc_diff < 1e-3 against the unquantized fp64 product, V3 layer
shapes) plus the fp32-summation bound against the fp64 product of the dequantized operands.
Run a user kernel with `pytest suites/conformance/test_fp8.py --dsv3-impl module:factory`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.numerics import CALC_DIFF_FP8, calc_diff
from harness.pytest_plugin import skip_if_not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("fp8")]

FP8 = torch.float8_e4m3fn
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# DeepSeek-V3 GEMMs (N x K, DeepGEMM's test list): wq_a+wkv_a, wkv_a, wq_b, wkv_b, wo, expert w1+w3, expert w2.
V3_SHAPES = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
N_CAP = 128  # output features kept per layer (one block row of B): N is independent columns; K stays whole


# --- oracle -----------------------------------------------------------------------------------------------------
def oracle_tile(tile: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile (any shape): e4m3 data and the fp32 scale, the obvious way."""
    t = tile.float()
    scale = torch.clamp(t.abs().max(), min=1e-4) / 448.0
    if ue8m0 and math.isfinite(scale.item()):  # float64 log2 of an fp32 value is exact enough to ceil
        scale = torch.tensor(2.0 ** math.ceil(math.log2(scale.item())), dtype=torch.float32)
    return (t / scale).to(FP8), scale


def oracle_1x128(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    q, s = torch.empty(rows.shape, dtype=FP8), torch.empty(rows.shape[0], math.ceil(rows.shape[1] / 128))
    for r in range(rows.shape[0]):
        for g in range(s.shape[1]):
            q[r, g * 128:(g + 1) * 128], s[r, g] = oracle_tile(rows[r, g * 128:(g + 1) * 128], ue8m0)
    return q.view(x.shape), s.view(*x.shape[:-1], s.shape[1])


def oracle_128x128(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(w.shape, dtype=FP8)
    s = torch.empty(math.ceil(w.shape[0] / 128), math.ceil(w.shape[1] / 128))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            q[block], s[i, j] = oracle_tile(w[block], ue8m0)
    return q, s


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    view = {FP8: torch.uint8, torch.float32: torch.int32, torch.bfloat16: torch.int16}[actual.dtype]
    diff = (actual.cpu().view(view) != expected.cpu().view(view)).sum().item()
    assert diff == 0, f"{what}: {diff} of {actual.numel()} elements differ bitwise"


# --- inputs -----------------------------------------------------------------------------------------------------
@st.composite
def activations(draw: st.DrawFn, max_rows: int = 24, max_k: int = 400) -> torch.Tensor:
    """[rows, K] in bf16/fp32; every 1x128 tile has its own magnitude (1e-6..1e6); some tiles all zero."""
    rows, k = draw(st.integers(1, max_rows)), draw(st.one_of(st.sampled_from([128, 256, 384]),
                                                             st.integers(1, max_k)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    groups = math.ceil(k / 128)
    exponents = torch.empty(rows, groups).uniform_(-6, 6, generator=gen)
    scale = (10 ** exponents).repeat_interleave(128, dim=1)[:, :k]
    x = torch.randn(rows, k, generator=gen) * scale
    if draw(st.booleans()):
        x[:, :min(k, 128)] = 0  # a column of all-zero tiles
    return x.to(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])


@st.composite
def weights(draw: st.DrawFn, max_dim: int = 300) -> torch.Tensor:
    """[M, N] with a distinct magnitude per 128x128 block, sometimes an all-zero block."""
    m, n = draw(st.integers(1, max_dim)), draw(st.integers(1, max_dim))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    exponents = torch.empty(math.ceil(m / 128), math.ceil(n / 128)).uniform_(-6, 6, generator=gen)
    scale = (10 ** exponents).repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]
    w = torch.randn(m, n, generator=gen) * scale
    if draw(st.booleans()):
        w[:128, :128] = 0
    return w.to(DTYPES[draw(st.sampled_from(sorted(DTYPES)))])


# --- quantizers: bit-exact against the oracle ---------------------------------------------------------------------
@given(activations(), st.booleans())
def test_quant_1x128_bitwise(impl, dsv3_device, x, ue8m0):
    if ue8m0:
        skip_if_not_applicable(impl, "ue8m0")
    if x.shape[-1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_1x128(x.to(dsv3_device), ue8m0=ue8m0)
    eq, es = oracle_1x128(x, ue8m0)
    assert_bitwise(s, es, "scales")
    assert_bitwise(q, eq, "data")


@given(weights(), st.booleans())
def test_quant_128x128_bitwise(impl, dsv3_device, w, ue8m0):
    if ue8m0:
        skip_if_not_applicable(impl, "ue8m0")
    if w.shape[0] % 128 or w.shape[1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_128x128(w.to(dsv3_device), ue8m0=ue8m0)
    eq, es = oracle_128x128(w, ue8m0)
    assert_bitwise(s, es, "scales")
    assert_bitwise(q, eq, "data")


def test_e4m3_ties_round_to_nearest_even(impl, dsv3_device):
    # amax 448 makes the scale exactly 1, so q is the plain cast of each value: ties between e4m3 neighbours
    # (normal 1.0625, 1.1875, 17, 19, 208, 240 and subnormal 2^-10, 3*2^-10, 5*2^-10) must go to the even one
    # (the Triton interpreter rounds them away from zero), and -31.64 must carry to -32 (it dropped the carry).
    ties = [1.0625, 1.1875, 17.0, 19.0, 208.0, 240.0, 2**-10, 3 * 2**-10, 5 * 2**-10, 31.64]
    values = torch.tensor([448.0, -448.0] + ties + [-t for t in ties], dtype=torch.float32)
    x = torch.zeros(2, 128)
    x[:, :values.numel()] = values
    q, s = impl.quant_1x128(x.to(dsv3_device))
    assert s.cpu().eq(1.0).all()
    assert_bitwise(q, x.to(FP8), "ties")
    assert q.cpu().float()[0, :2].tolist() == [448.0, -448.0]


@given(activations())
def test_amax_maps_to_448(impl, dsv3_device, x):
    # fp32 scales: the element of largest magnitude lands on +-448 (amax / (amax / 448) rounds to 448) whenever
    # amax >= 1e-4; below the clamp amax / s < 448 and nothing exceeds 448 (the cast never saturates).
    if x.shape[-1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_1x128(x.to(dsv3_device))
    tiles = torch.nn.functional.pad(x.float(), (0, -x.shape[-1] % 128)).unflatten(-1, (-1, 128))
    qmax = torch.nn.functional.pad(q.cpu().float().abs(), (0, -x.shape[-1] % 128)).unflatten(-1, (-1, 128))
    amax, qmax = tiles.abs().amax(-1), qmax.amax(-1)
    assert (qmax[amax >= 1e-4] == 448).all()
    assert (qmax <= 448).all()


@given(activations())
def test_ue8m0_scales_and_idempotence(impl, dsv3_device, x):
    # UE8M0: scales are powers of two and the largest |q| of a tile above the clamp lies in [224, 448] (224,
    # not (224, 448]: amax / s in (224, 232) rounds down to 224). A second quantization of the dequantized
    # tensor returns the same q and s, except for tiles whose largest |q| is exactly 224 while 224 s stays above
    # the 1e-4 clamp: their scale halves and their data doubles. The dequantized values are the same bitwise.
    skip_if_not_applicable(impl, "ue8m0")
    if x.shape[-1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_1x128(x.to(dsv3_device), ue8m0=True)
    mantissa, _ = torch.frexp(s.cpu())
    assert (mantissa == 0.5).all()
    deq = impl.dequant_1x128(q, s, torch.float32)
    q2, s2 = impl.quant_1x128(deq, ue8m0=True)
    assert_bitwise(impl.dequant_1x128(q2, s2, torch.float32), deq, "dequantized values after a round trip")
    k = x.shape[-1]
    qmax = torch.nn.functional.pad(q.cpu().float().abs(), (0, -k % 128)).unflatten(-1, (-1, 128)).amax(-1)
    amax = torch.nn.functional.pad(x.float().abs(), (0, -k % 128)).unflatten(-1, (-1, 128)).amax(-1)
    assert ((qmax >= 224) & (qmax <= 448))[amax >= 1e-4].all()
    halves = (qmax == 224) & (224 * s.cpu() >= torch.tensor(1e-4))
    halved = halves.repeat_interleave(128, dim=-1)[..., :k]
    expected_s = torch.where(halves, s.cpu() / 2, s.cpu())
    expected_q = torch.where(halved, q.cpu().float() * 2, q.cpu().float()).to(FP8)
    assert_bitwise(s2, expected_s, "scales after a round trip")
    assert_bitwise(q2, expected_q, "data after a round trip")


@given(activations())
def test_zero_padding_of_the_scale_computation(impl, dsv3_device, x):
    # A K that is not a multiple of 128 behaves as if zero-padded: same scales, data sliced back.
    skip_if_not_applicable(impl, "unaligned")
    padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % 128))
    q, s = impl.quant_1x128(x.to(dsv3_device))
    qp, sp = impl.quant_1x128(padded.to(dsv3_device))
    assert_bitwise(s, sp, "scales")
    assert_bitwise(q, qp[..., :x.shape[-1]], "data")


def test_all_zero_tile(impl, dsv3_device):
    # amax clamps at 1e-4: the scale is finite (1e-4 / 448 in fp32) and the data zero; no NaN.
    q, s = impl.quant_1x128(torch.zeros(3, 256, device=dsv3_device))
    assert_bitwise(s, torch.full((3, 2), 1e-4, dtype=torch.float32) / 448.0, "scales")
    assert (q.cpu().float() == 0).all()
    qw, sw = impl.quant_128x128(torch.zeros(130, 5, device=dsv3_device))
    assert (sw.cpu() == torch.tensor(1e-4, dtype=torch.float32) / 448.0).all() and (qw.cpu().float() == 0).all()


# --- dequantization and the error bound -------------------------------------------------------------------------
@given(activations(), st.sampled_from(["fp32", "bf16"]))
def test_dequant_1x128_bitwise_and_error_bound(impl, dsv3_device, x, out):
    # dequant = fp32 product q * s, then the output dtype (round to nearest even). The round trip obeys
    # e4m3's bound |deq - x| <= max(2^-4 |x|, 2^-10 s) (3 mantissa bits; subnormal spacing 2^-9 s), up to the
    # fp32 roundings of x / s and q * s (2^-23 relative, allowed for below).
    if x.shape[-1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_1x128(x.to(dsv3_device))
    deq = impl.dequant_1x128(q, s, DTYPES[out])
    s_full = s.cpu().repeat_interleave(128, dim=-1)[..., :x.shape[-1]]
    assert_bitwise(deq, (q.cpu().float() * s_full).to(DTYPES[out]), "dequantized")
    d32 = impl.dequant_1x128(q, s, torch.float32).cpu().double()
    xd = x.double()
    bound = torch.maximum(2**-4 * xd.abs(), 2**-10 * s_full.double()) * (1 + 2**-20)
    assert ((d32 - xd).abs() <= bound).all()


@given(weights(), st.sampled_from(["fp32", "bf16"]))
def test_dequant_128x128_bitwise_and_error_bound(impl, dsv3_device, w, out):
    if w.shape[0] % 128 or w.shape[1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_128x128(w.to(dsv3_device))
    deq = impl.dequant_128x128(q, s, DTYPES[out])
    s_full = s.cpu().repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    assert_bitwise(deq, (q.cpu().float() * s_full).to(DTYPES[out]), "dequantized")
    d32 = impl.dequant_128x128(q, s, torch.float32).cpu().double()
    bound = torch.maximum(2**-4 * w.double().abs(), 2**-10 * s_full.double()) * (1 + 2**-20)
    assert ((d32 - w.double()).abs() <= bound).all()


@given(weights())
def test_128x128_blocks_are_transpose_invariant(impl, dsv3_device, w):
    # The dgrad GEMM needs W^T in 128x128 blocks: a block's amax does not change under transposition.
    if w.shape[0] % 128 or w.shape[1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    q, s = impl.quant_128x128(w.to(dsv3_device))
    qt, st_ = impl.quant_128x128(w.mT.contiguous().to(dsv3_device))
    assert_bitwise(qt, q.mT.contiguous(), "data of w^T")
    assert_bitwise(st_, s.mT.contiguous(), "scales of w^T")


# --- non-finite input (documented result) --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@given(activations(max_rows=6), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.data())
def test_nonfinite_poisons_only_its_tile(impl, dsv3_device, x, bad, data):
    # A NaN/Inf makes its own tile's scale NaN (NaN) or +Inf (+-Inf) and its dequantized values all NaN;
    # every other tile's data and scale are bitwise those of the clean tensor.
    skip_if_not_applicable(impl, "nonfinite")
    if x.shape[-1] % 128:
        skip_if_not_applicable(impl, "unaligned")
    r, c = data.draw(st.integers(0, x.shape[0] - 1)), data.draw(st.integers(0, x.shape[1] - 1))
    poisoned = x.clone()
    poisoned[r, c] = bad
    q, s = impl.quant_1x128(poisoned.to(dsv3_device))
    q0, s0 = impl.quant_1x128(x.to(dsv3_device))
    g = c // 128
    s, s0 = s.cpu(), s0.cpu()
    assert math.isnan(s[r, g]) if math.isnan(bad) else s[r, g] == math.inf
    other = torch.ones_like(s, dtype=torch.bool)
    other[r, g] = False
    assert_bitwise(s[other], s0[other], "scales of the other tiles")
    cols = torch.arange(x.shape[1]) // 128
    keep = ~((torch.arange(x.shape[0])[:, None] == r) & (cols[None, :] == g))
    assert_bitwise(q.cpu()[keep], q0.cpu()[keep], "data of the other tiles")
    deq = impl.dequant_1x128(q, s.to(dsv3_device), torch.float32).cpu()
    assert deq[r, cols == g].isnan().all()


# --- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [torch.zeros(2, 128, dtype=torch.int32), torch.zeros(2, 128, dtype=torch.float64),
                                 torch.zeros(2, 0), torch.zeros(0, 0)], ids=["int32", "float64", "k0", "empty"])
def test_quant_rejects_bad_input(impl, dsv3_device, bad):
    skip_if_not_applicable(impl, "input_errors")
    with pytest.raises(ValueError):
        impl.quant_1x128(bad.to(dsv3_device))
    with pytest.raises(ValueError):
        impl.quant_128x128(bad.to(dsv3_device))


def test_dequant_and_gemm_reject_mismatched_scales(impl, dsv3_device):
    skip_if_not_applicable(impl, "input_errors")
    x = torch.randn(4, 256, device=dsv3_device)
    q, s = impl.quant_1x128(x)
    w, ws = impl.quant_128x128(torch.randn(256, 256, device=dsv3_device))
    with pytest.raises(ValueError):
        impl.dequant_1x128(q, s[:, :1])
    with pytest.raises(ValueError):
        impl.dequant_1x128(q, s.double())
    with pytest.raises(ValueError):
        impl.dequant_128x128(w, ws[:1])
    with pytest.raises(ValueError):
        impl.fp8_gemm(q, s[:, :1], w, ws)
    with pytest.raises(ValueError):
        impl.fp8_gemm(q, s, w, ws[:, :1])
    with pytest.raises(ValueError):
        impl.fp8_gemm(q[:, :200], s, w, ws)  # K of a differs from K of b
    with pytest.raises(ValueError):
        impl.fp8_gemm(q.float(), s, w, ws)  # a not FP8


# --- block-scaled GEMM ----------------------------------------------------------------------------------------------
def fp32_sum_bound(a: torch.Tensor, b: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """Error bound of an fp32-accumulated product of exact operands: K u sum|a||b| (u = 2^-24 per rounding,
    doubled for the per-block scale products), plus half an ulp of the output dtype."""
    k = a.shape[1]
    out_eps = {torch.float32: 2**-24, torch.bfloat16: 2**-8}[out]
    return 2 * k * 2**-24 * (a.abs() @ b.abs().mT) + out_eps * (a @ b.mT).abs()


@st.composite
def gemm_shapes(draw: st.DrawFn) -> tuple[int, int, int, bool, str, int]:
    return (draw(st.integers(1, 40)), draw(st.integers(1, 300)), draw(st.integers(1, 600)), draw(st.booleans()),
            draw(st.sampled_from(["fp32", "bf16"])), draw(st.integers(0, 2**31 - 1)))


@given(gemm_shapes())
def test_gemm_within_fp32_summation_bound(impl, dsv3_device, case):
    # Against the fp64 product of the dequantized operands, the only error is fp32 accumulation and the output
    # rounding; row_b: B with 1x128 scales (the weight-gradient GEMM).
    m, n, k, row_b, out, seed = case
    if row_b:
        skip_if_not_applicable(impl, "row_scaled_b")
    if k % 128 or (not row_b and n % 128):
        skip_if_not_applicable(impl, "unaligned")
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
    qa, sa = impl.quant_1x128(a.to(dsv3_device))
    qb, sb = impl.quant_1x128(b.to(dsv3_device)) if row_b else impl.quant_128x128(b.to(dsv3_device))
    c = impl.fp8_gemm(qa, sa, qb, sb, DTYPES[out])
    assert c.dtype == DTYPES[out] and c.shape == (m, n)
    da = impl.dequant_1x128(qa, sa, torch.float32).cpu().double()
    db = (impl.dequant_1x128(qb, sb, torch.float32) if row_b else impl.dequant_128x128(qb, sb)).cpu().double()
    assert ((c.cpu().double() - da @ db.mT).abs() <= fp32_sum_bound(da, db, DTYPES[out])).all()


@pytest.mark.parametrize("n,k", V3_SHAPES, ids=[f"{n}x{k}" for n, k in V3_SHAPES])
def test_gemm_v3_shapes_calc_diff(impl, dsv3_device, n, k):
    # DeepGEMM's acceptance: calc_diff(FP8 GEMM, fp64 product of the unquantized bf16 inputs) < 1e-3.

    gen = torch.Generator().manual_seed(n + k)
    m, n = 4, min(n, N_CAP)
    a = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, k, generator=gen).bfloat16()
    qa, sa = impl.quant_1x128(a.to(dsv3_device))
    qb, sb = impl.quant_128x128(b.to(dsv3_device))
    c = impl.fp8_gemm(qa, sa, qb, sb, torch.bfloat16)
    assert calc_diff(c.cpu(), a.double() @ b.double().mT) < CALC_DIFF_FP8
