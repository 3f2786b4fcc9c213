"""Conformance of FP8 fine-grained quantization and the block-scaled FP8 GEMM (component `fp8`).

Quantizers are deterministic, so they are checked bit for bit against an oracle written here independently of
dsv3ref (a plain loop over tiles: amax, scale = max(amax, 1e-4) / 448 in fp32, optional power-of-two round-up,
torch's round-to-nearest-even cast of x / scale) on hypothesis-drawn shapes (non-multiples of 128 included),
bf16/fp32 inputs, magnitudes from 1e-6 to 1e6 with a distinct amax per tile, all-zero tiles and exact e4m3
ties. The GEMM is held to the exact fp32 error bound of its documented computation (fp32 partial sums per
128-wide K block, scales applied per block) against the exact product of its quantized operands, with a
different magnitude in every block (a scale applied to the wrong block shows), and to DeepGEMM's rule
(calc_diff < 1e-3 against the unquantized fp64 product) at V3 layer shapes. Inputs are built from a few drawn
values (harness.cases.fp8), so a failure prints the lines that rebuild it. Properties an implementation declares
not applicable (ue8m0, unaligned, row_scaled_b) leave the draws that need them out of the other tests.
Run a user kernel with `pytest suites/conformance/test_fp8.py --dsv3-impl module:factory`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.cases import rebuild
from harness.cases.fp8 import DTYPES, IMPORTS, Activation, GemmOperands, Weight
from harness.numerics import CALC_DIFF_FP8, calc_diff
from harness.pytest_plugin import applicable, skip_if_not_applicable

pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("fp8")]

FP8 = torch.float8_e4m3fn
# DeepSeek-V3 GEMMs (N x K, DeepGEMM's test list): wq_a+wkv_a, wkv_a, wq_b, wkv_b, wo, expert w1+w3, expert w2.
V3_SHAPES = [(2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
N_CAP = 256  # output features kept per layer (two block rows of B, so B's scale grid has two rows); K stays whole
U32 = 2.0**-24  # unit roundoff of fp32
OUT_ROUNDOFF = {torch.float32: U32, torch.bfloat16: 2.0**-8}
TORCH_NAMES = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
seeds = st.integers(0, 2**31 - 1)


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


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str, source: torch.Tensor | None = None) -> None:
    """Equal dtype, shape and bits; the message names the first differing element (and its input, if given)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    view = {FP8: torch.uint8, torch.float32: torch.int32, torch.bfloat16: torch.int16}[actual.dtype]
    differ = actual.cpu().view(view) != expected.cpu().view(view)
    if bool(differ.any()):
        at = tuple(differ.nonzero()[0].tolist())
        got, want = actual.cpu()[at].float().item(), expected.cpu()[at].float().item()
        given_value = f" (input {source[at].item():.9g})" if source is not None and source.shape == actual.shape else ""
        raise AssertionError(f"{what}: {int(differ.sum())} of {actual.numel()} elements differ bitwise; first at "
                             f"{list(at)}: {got:.9g}, expected {want:.9g}{given_value}")


# --- inputs -----------------------------------------------------------------------------------------------------
@st.composite
def activations(draw: st.DrawFn, aligned: bool = False, max_rows: int = 24, max_k: int = 400) -> Activation:
    """[rows, K] in bf16/fp32; every 1x128 tile has its own magnitude (1e-6..1e6); some tiles all zero; K a
    multiple of 128 when `aligned`."""
    multiples = st.sampled_from([128, 256, 384])
    k = draw(multiples if aligned else st.one_of(multiples, st.integers(1, max_k)))
    return Activation(draw(st.integers(1, max_rows)), k, draw(seeds), draw(st.sampled_from(sorted(DTYPES))),
                      draw(st.booleans()))


@st.composite
def weights(draw: st.DrawFn, aligned: bool = False, max_dim: int = 300) -> Weight:
    """[M, N] with a distinct magnitude per 128x128 block, sometimes an all-zero block; multiples of 128 when
    `aligned`."""
    dim = st.sampled_from([128, 256]) if aligned else st.integers(1, max_dim)
    return Weight(draw(dim), draw(dim), draw(seeds), draw(st.sampled_from(sorted(DTYPES))), draw(st.booleans()))


def _aligned(impl: object) -> bool:
    return not applicable(impl, "unaligned")


def _ue8m0(impl: object) -> st.SearchStrategy[bool]:
    return st.booleans() if applicable(impl, "ue8m0") else st.just(False)


def note_case(*lines: str) -> None:
    rebuild(*IMPORTS, *lines)


# --- quantizers: bit-exact against the oracle ---------------------------------------------------------------------
@given(st.data())
def test_quant_1x128_bitwise(impl, dsv3_device, data):
    spec = data.draw(activations(_aligned(impl)), label="x")
    ue8m0 = data.draw(_ue8m0(impl), label="ue8m0")
    note_case(f"x = {spec!r}.build()", f"q, s = impl.quant_1x128(x, ue8m0={ue8m0})")
    x = spec.build()
    q, s = impl.quant_1x128(x.to(dsv3_device), ue8m0=ue8m0)
    eq, es = oracle_1x128(x, ue8m0)
    assert_bitwise(s, es, "scales (max(amax, 1e-4) / 448 per 1x128 tile" + (", rounded up to 2^n)" if ue8m0 else ")"))
    assert_bitwise(q, eq, "data (x / scale, cast to e4m3 round-to-nearest-even)", x)


@given(st.data())
def test_quant_128x128_bitwise(impl, dsv3_device, data):
    spec = data.draw(weights(_aligned(impl)), label="w")
    ue8m0 = data.draw(_ue8m0(impl), label="ue8m0")
    note_case(f"w = {spec!r}.build()", f"q, s = impl.quant_128x128(w, ue8m0={ue8m0})")
    w = spec.build()
    q, s = impl.quant_128x128(w.to(dsv3_device), ue8m0=ue8m0)
    eq, es = oracle_128x128(w, ue8m0)
    rule = "max(amax, 1e-4) / 448 per 128x128 block" + (", rounded up to 2^n" if ue8m0 else "")
    assert_bitwise(s, es, f"scales ({rule})")
    assert_bitwise(q, eq, "data (w / scale, cast to e4m3 round-to-nearest-even)", w)


def test_e4m3_ties_round_to_nearest_even(impl, dsv3_device):
    # amax 448 makes the scale exactly 1, so q is the plain cast of each value: ties between e4m3 neighbours
    # (normal 1.0625, 1.1875, 17, 19, 208, 240 and subnormal 2^-10, 3*2^-10, 5*2^-10) must go to the even one
    # (the Triton interpreter rounds them away from zero), and -31.64 must carry to -32 (it dropped the carry).
    ties = [1.0625, 1.1875, 17.0, 19.0, 208.0, 240.0, 2**-10, 3 * 2**-10, 5 * 2**-10, 31.64]
    values = torch.tensor([448.0, -448.0] + ties + [-t for t in ties], dtype=torch.float32)
    x = torch.zeros(2, 128)
    x[:, :values.numel()] = values
    q, s = impl.quant_1x128(x.to(dsv3_device))
    assert s.cpu().eq(1.0).all(), f"a tile of amax 448 must have scale 1.0, got {s.cpu().unique().tolist()}"
    assert_bitwise(q, x.to(FP8), "e4m3 ties (round half to even)", x)
    assert q.cpu().float()[0, :2].tolist() == [448.0, -448.0], "+-448 must stay +-448 (the largest e4m3 value)"


@given(st.data())
def test_amax_maps_to_448(impl, dsv3_device, data):
    # fp32 scales: the element of largest magnitude lands on +-448 (amax / (amax / 448) rounds to 448) whenever
    # amax >= 1e-4; below the clamp amax / s < 448 and nothing exceeds 448 (the cast never saturates).
    spec = data.draw(activations(_aligned(impl)), label="x")
    note_case(f"x = {spec!r}.build()", "q, s = impl.quant_1x128(x)")
    x = spec.build()
    q, s = impl.quant_1x128(x.to(dsv3_device))
    tiles = torch.nn.functional.pad(x.float(), (0, -x.shape[-1] % 128)).unflatten(-1, (-1, 128))
    qmax = torch.nn.functional.pad(q.cpu().float().abs(), (0, -x.shape[-1] % 128)).unflatten(-1, (-1, 128))
    amax, qmax = tiles.abs().amax(-1), qmax.amax(-1)
    short = ((qmax != 448) & (amax >= 1e-4)).nonzero()
    assert short.numel() == 0, (f"tile {short[0].tolist()} has amax {amax[tuple(short[0])].item():.6g} >= 1e-4 but "
                                f"its largest |q| is {qmax[tuple(short[0])].item()}, expected 448")
    assert (qmax <= 448).all(), f"a quantized value exceeds 448: {qmax.max().item()}"


@given(st.data())
def test_ue8m0_scales_and_idempotence(impl, dsv3_device, data):
    # UE8M0: scales are powers of two and the largest |q| of a tile above the clamp lies in [224, 448] (224,
    # not (224, 448]: amax / s in (224, 232) rounds down to 224). A second quantization of the dequantized
    # tensor returns the same q and s, except for tiles whose largest |q| is exactly 224 while 224 s stays above
    # the 1e-4 clamp: their scale halves and their data doubles. The dequantized values are the same bitwise.
    skip_if_not_applicable(impl, "ue8m0")
    spec = data.draw(activations(_aligned(impl)), label="x")
    note_case(f"x = {spec!r}.build()", "q, s = impl.quant_1x128(x, ue8m0=True)",
              "q2, s2 = impl.quant_1x128(impl.dequant_1x128(q, s, torch.float32), ue8m0=True)")
    x = spec.build()
    q, s = impl.quant_1x128(x.to(dsv3_device), ue8m0=True)
    mantissa, _ = torch.frexp(s.cpu())
    assert (mantissa == 0.5).all(), f"UE8M0 scales must be powers of two, got {s.cpu()[mantissa != 0.5][:4].tolist()}"
    deq = impl.dequant_1x128(q, s, torch.float32)
    q2, s2 = impl.quant_1x128(deq, ue8m0=True)
    assert_bitwise(impl.dequant_1x128(q2, s2, torch.float32), deq, "dequantized values after a round trip")
    k = x.shape[-1]
    qmax = torch.nn.functional.pad(q.cpu().float().abs(), (0, -k % 128)).unflatten(-1, (-1, 128)).amax(-1)
    amax = torch.nn.functional.pad(x.float().abs(), (0, -k % 128)).unflatten(-1, (-1, 128)).amax(-1)
    assert ((qmax >= 224) & (qmax <= 448))[amax >= 1e-4].all(), "a tile's largest |q| must lie in [224, 448]"
    halves = (qmax == 224) & (224 * s.cpu() >= torch.tensor(1e-4))
    halved = halves.repeat_interleave(128, dim=-1)[..., :k]
    expected_s = torch.where(halves, s.cpu() / 2, s.cpu())
    expected_q = torch.where(halved, q.cpu().float() * 2, q.cpu().float()).to(FP8)
    assert_bitwise(s2, expected_s, "scales after a round trip")
    assert_bitwise(q2, expected_q, "data after a round trip")


@given(st.data())
def test_zero_padding_of_the_scale_computation(impl, dsv3_device, data):
    # A K that is not a multiple of 128 behaves as if zero-padded: same scales, data sliced back.
    skip_if_not_applicable(impl, "unaligned")
    spec = data.draw(activations(), label="x")
    note_case(f"x = {spec!r}.build()", "q, s = impl.quant_1x128(x)",
              "qp, sp = impl.quant_1x128(torch.nn.functional.pad(x, (0, -x.shape[-1] % 128)))")
    x = spec.build()
    padded = torch.nn.functional.pad(x, (0, -x.shape[-1] % 128))
    q, s = impl.quant_1x128(x.to(dsv3_device))
    qp, sp = impl.quant_1x128(padded.to(dsv3_device))
    assert_bitwise(s, sp, "scales of x and of x zero-padded to a multiple of 128")
    assert_bitwise(q, qp[..., :x.shape[-1]], "data of x and of x zero-padded")


def test_all_zero_tile(impl, dsv3_device):
    # amax clamps at 1e-4: the scale is finite (1e-4 / 448 in fp32) and the data zero; no NaN.
    q, s = impl.quant_1x128(torch.zeros(3, 256, device=dsv3_device))
    assert_bitwise(s, torch.full((3, 2), 1e-4, dtype=torch.float32) / 448.0, "scales of all-zero tiles")
    assert (q.cpu().float() == 0).all(), "all-zero tiles must quantize to zeros"
    qw, sw = impl.quant_128x128(torch.zeros(130, 5, device=dsv3_device))
    assert (sw.cpu() == torch.tensor(1e-4, dtype=torch.float32) / 448.0).all() and (qw.cpu().float() == 0).all(), \
        f"all-zero 128x128 blocks must give scale 1e-4 / 448 and zero data, got scales {sw.cpu().tolist()}"


# --- dequantization and the error bound -------------------------------------------------------------------------
def assert_e4m3_round_trip(deq32: torch.Tensor, x: torch.Tensor, s_full: torch.Tensor) -> None:
    """e4m3's bound |deq - x| <= max(2^-4 |x|, 2^-10 s) (3 mantissa bits; subnormal spacing 2^-9 s), up to the fp32
    roundings of x / s and q * s (2^-23 relative, allowed for); s_full is each element's scale."""
    d, xd = deq32.cpu().double(), x.double()
    bound = torch.maximum(2**-4 * xd.abs(), 2**-10 * s_full.double()) * (1 + 2**-20)
    over = ((d - xd).abs() > bound).nonzero()
    assert over.numel() == 0, (f"element {over[0].tolist()}: {xd[tuple(over[0])].item():.9g} came back as "
                               f"{d[tuple(over[0])].item():.9g}, beyond e4m3's rounding bound")


@given(st.data(), st.sampled_from(["fp32", "bf16"]))
def test_dequant_1x128_bitwise_and_error_bound(impl, dsv3_device, data, out):
    # dequant = fp32 product q * s, then the output dtype (round to nearest even); the round trip within e4m3's
    # rounding bound.
    spec = data.draw(activations(_aligned(impl)), label="x")
    note_case(f"x = {spec!r}.build()", "q, s = impl.quant_1x128(x)",
              f"deq = impl.dequant_1x128(q, s, {TORCH_NAMES[out]})")
    x = spec.build()
    q, s = impl.quant_1x128(x.to(dsv3_device))
    deq = impl.dequant_1x128(q, s, DTYPES[out])
    s_full = s.cpu().repeat_interleave(128, dim=-1)[..., :x.shape[-1]]
    assert_bitwise(deq, (q.cpu().float() * s_full).to(DTYPES[out]), "dequantized (fp32 q * s, then the dtype)")
    assert_e4m3_round_trip(impl.dequant_1x128(q, s, torch.float32), x, s_full)


@given(st.data(), st.sampled_from(["fp32", "bf16"]))
def test_dequant_128x128_bitwise_and_error_bound(impl, dsv3_device, data, out):
    spec = data.draw(weights(_aligned(impl)), label="w")
    note_case(f"w = {spec!r}.build()", "q, s = impl.quant_128x128(w)",
              f"deq = impl.dequant_128x128(q, s, {TORCH_NAMES[out]})")
    w = spec.build()
    q, s = impl.quant_128x128(w.to(dsv3_device))
    deq = impl.dequant_128x128(q, s, DTYPES[out])
    s_full = s.cpu().repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    assert_bitwise(deq, (q.cpu().float() * s_full).to(DTYPES[out]), "dequantized (fp32 q * s, then the dtype)")
    assert_e4m3_round_trip(impl.dequant_128x128(q, s, torch.float32), w, s_full)


@given(st.data())
def test_128x128_blocks_are_transpose_invariant(impl, dsv3_device, data):
    # The dgrad GEMM needs W^T in 128x128 blocks: a block's amax does not change under transposition.
    spec = data.draw(weights(_aligned(impl)), label="w")
    note_case(f"w = {spec!r}.build()", "q, s = impl.quant_128x128(w)",
              "qt, st = impl.quant_128x128(w.mT.contiguous())")
    w = spec.build()
    q, s = impl.quant_128x128(w.to(dsv3_device))
    qt, st_ = impl.quant_128x128(w.mT.contiguous().to(dsv3_device))
    assert_bitwise(qt, q.mT.contiguous(), "data of w^T against the transposed data of w")
    assert_bitwise(st_, s.mT.contiguous(), "scales of w^T against the transposed scales of w")


# --- non-finite input (documented result) --------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
@given(st.data(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_nonfinite_poisons_only_its_tile(impl, dsv3_device, data, bad):
    # A NaN/Inf makes its own tile's scale NaN (NaN) or +Inf (+-Inf) and its dequantized values all NaN;
    # every other tile's data and scale are bitwise those of the clean tensor.
    skip_if_not_applicable(impl, "nonfinite")
    spec = data.draw(activations(_aligned(impl), max_rows=6), label="x")
    x = spec.build()
    r, c = data.draw(st.integers(0, x.shape[0] - 1), label="row"), data.draw(st.integers(0, x.shape[1] - 1),
                                                                             label="column")
    note_case(f"x = {spec!r}.build()", f"x[{r}, {c}] = float({str(bad)!r})", "q, s = impl.quant_1x128(x)")
    poisoned = x.clone()
    poisoned[r, c] = bad
    q, s = impl.quant_1x128(poisoned.to(dsv3_device))
    q0, s0 = impl.quant_1x128(x.to(dsv3_device))
    g = c // 128
    s, s0 = s.cpu(), s0.cpu()
    want = "NaN" if math.isnan(bad) else "+inf"
    assert (math.isnan(s[r, g]) if math.isnan(bad) else s[r, g] == math.inf), (
        f"x[{r}, {c}] = {bad}: the scale of its tile ({r}, {g}) must be {want}, got {s[r, g].item()}")
    other = torch.ones_like(s, dtype=torch.bool)
    other[r, g] = False
    assert_bitwise(s[other], s0[other], "scales of the other tiles")
    cols = torch.arange(x.shape[1]) // 128
    keep = ~((torch.arange(x.shape[0])[:, None] == r) & (cols[None, :] == g))
    assert_bitwise(q.cpu()[keep], q0.cpu()[keep], "data of the other tiles")
    deq = impl.dequant_1x128(q, s.to(dsv3_device), torch.float32).cpu()
    assert deq[r, cols == g].isnan().all(), f"the dequantized tile ({r}, {g}) holding {bad} must be all NaN"


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
def exact_gemm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exact product of the quantized operands, sum_j (qa_j qb_j^T) sa_j sb_j over 128-wide K blocks j, and the
    magnitude sum_j (|qa_j| |qb_j|^T) |sa_j sb_j| that bounds its rounding errors ([M, N] float64 each). In float64
    the block sums of e4m3 products are exact (< 2^43 units of 2^-18) and the rest is rounded at 2^-53."""
    qa, qb = qa.cpu().double(), qb.cpu().double()
    n, k = qb.shape
    sb_rows = sb.cpu() if sb.shape[0] == n else sb.cpu().repeat_interleave(128, 0)[:n]  # [N, Kb]
    exact = torch.zeros(qa.shape[0], n, dtype=torch.float64)
    magnitude = torch.zeros_like(exact)
    for j in range(math.ceil(k / 128)):
        cols = slice(j * 128, min(k, (j + 1) * 128))
        scale = sa.cpu()[:, j, None].double() * sb_rows[None, :, j].double()
        exact += (qa[:, cols] @ qb[:, cols].mT) * scale
        magnitude += (qa[:, cols].abs() @ qb[:, cols].abs().mT) * scale.abs()
    return exact, magnitude


def fp32_gemm_bound(k: int, magnitude: torch.Tensor, exact: torch.Tensor, out: torch.dtype) -> torch.Tensor:
    """The rigorous error bound of the documented computation in fp32: partial sums of min(K, 128) exact products
    (any order), two roundings to apply the scales, the sum over ceil(K / 128) blocks, one more for the float64
    reference: gamma_n x magnitude with n = min(K, 128) + ceil(K / 128) + 2 and gamma_n = n u / (1 - n u),
    u = 2^-24; then the rounding to the output dtype."""
    n = min(k, 128) + math.ceil(k / 128) + 2
    accumulated = n * U32 / (1 - n * U32) * magnitude
    return accumulated + OUT_ROUNDOFF[out] * (exact.abs() + accumulated)


@st.composite
def gemm_cases(draw: st.DrawFn, aligned: bool, row_b: bool) -> tuple[GemmOperands, str]:
    """Operands with a different magnitude per tile/block, and the output dtype; multiples of 128 when `aligned`."""
    with_rows = draw(st.booleans()) if row_b else False
    multiples = st.sampled_from([128, 256, 384])
    n = draw(multiples if aligned and not with_rows else st.integers(1, 300))
    k = draw(st.sampled_from([128, 256, 384, 512]) if aligned else st.integers(1, 600))
    spec = GemmOperands(draw(st.integers(1, 40)), n, k, draw(seeds), with_rows)
    return spec, draw(st.sampled_from(["fp32", "bf16"]))


@given(st.data())
def test_gemm_within_fp32_summation_bound(impl, dsv3_device, data):
    # Against the exact product of the quantized operands (not of their fp32 dequantization, which rounds them),
    # the only errors are the fp32 partial sums, the scale products and the output rounding: the bound is exact
    # and holds for every element. row_b: B with 1x128 scales (the weight-gradient GEMM). Every tile and block
    # has its own magnitude (1e-3..1e3), so a scale applied to the wrong block, or a transposed scale grid, is
    # far outside; an accumulator without fp32 promotion (~14 bits) is outside from K ~ 64.
    spec, out = data.draw(gemm_cases(_aligned(impl), applicable(impl, "row_scaled_b")), label="case")
    quant_b = "quant_1x128" if spec.row_b else "quant_128x128"
    note_case(f"a, b = {spec!r}.build()", "qa, sa = impl.quant_1x128(a)", f"qb, sb = impl.{quant_b}(b)",
              f"c = impl.fp8_gemm(qa, sa, qb, sb, {TORCH_NAMES[out]})")
    a, b = spec.build()
    qa, sa = impl.quant_1x128(a.to(dsv3_device))
    qb, sb = impl.quant_1x128(b.to(dsv3_device)) if spec.row_b else impl.quant_128x128(b.to(dsv3_device))
    c = impl.fp8_gemm(qa, sa, qb, sb, DTYPES[out])
    assert c.dtype == DTYPES[out] and tuple(c.shape) == (spec.m, spec.n), (
        f"fp8_gemm returned {c.dtype} {tuple(c.shape)}, expected {DTYPES[out]} {(spec.m, spec.n)}")
    exact, magnitude = exact_gemm(qa, sa, qb, sb)
    bound = fp32_gemm_bound(spec.k, magnitude, exact, DTYPES[out])
    err = (c.cpu().double() - exact).abs()
    worst = divmod(int((err / bound.clamp_min(1e-300)).argmax()), spec.n)
    assert bool((err <= bound).all()), (
        f"C{list(worst)} = {c.cpu().double()[worst].item():.9g}, exact product of the quantized operands "
        f"{exact[worst].item():.9g}: error {err[worst].item():.3e} > bound {bound[worst].item():.3e} (fp32 sums of "
        f"<= 128 products per K block, scales per block, {math.ceil(spec.k / 128)} blocks, {out} output)")


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
    diff = calc_diff(c.cpu(), a.double() @ b.double().mT)
    assert diff < CALC_DIFF_FP8, (f"calc_diff = {diff:.3e} >= {CALC_DIFF_FP8:.0e} for a [{m}, {k}] x [{n}, {k}]^T "
                                  "GEMM against the fp64 product of its bf16 inputs")
