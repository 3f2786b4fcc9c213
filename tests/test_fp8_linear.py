"""The low-precision linear layer (the recipe's conformance): its three GEMMs against a float64 emulation written
here, which modules a model converts and keeps, dtypes under autocast, the per-version weight cache, the backends,
and bad input.

The float64 emulation quantizes as DeepSeek-V3 describes (amax per 1x128 tile or 128x128 block, s = max(amax,
1e-4) / 448 rounded to fp32, e4m3 round-to-nearest-even of x / s rounded to fp32, saturating at 448 as torch's CPU
cast does) and multiplies exactly. Quantization is deterministic, so every operand a backend makes must equal it
bit for bit; GEMM outputs are fp32 sums whose order the BLAS picks, so they must lie within the fp32 summation
bound (K + 4 Kb + 4) 2^-24 sum |a b| of the exact product (Higham's gamma_n), and on inputs whose every partial
sum is exact in fp32 (integers on the e4m3 grid, power-of-two scales) they must equal it bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import fp8_gemm, quant
from dsv3ref.fp8.fused import FusedFP8
from dsv3ref.fp8.linear import (
    BF16Ops,
    LowPrecisionLinear,
    TorchFP8,
    convert_linears,
    fp8_linear,
    low_precision_linear,
)
from dsv3ref.fp8.quant import FP8Error
from dsv3ref.layers import RMSNorm
from dsv3ref.model import Transformer
from dsv3ref.moe import Gate
from dsv3ref.train import precision_context
from harness.numerics import CALC_DIFF_BF16, CALC_DIFF_FP8, calc_diff

U32 = 2.0**-24  # fp32 unit roundoff
BACKENDS = ["torch", "fused"]


# --- float64 emulation --------------------------------------------------------------------------------------------
def e4m3(v: np.ndarray) -> np.ndarray:
    """Round to the e4m3 grid (ties to even), saturating at +-448 as torch's CPU cast; float64 in, float64 out."""
    mag = np.abs(v)
    exponent = np.floor(np.log2(np.where(mag > 0, mag, 1.0)))
    spacing = np.exp2(np.maximum(exponent, -6.0) - 3)  # 3 mantissa bits; 2^-9 below 2^-6
    q = np.round(v / spacing) * spacing  # np.round: half to even; v / spacing is exact (a power of two)
    return np.clip(q, -448.0, 448.0)


def to_f32(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float32).astype(np.float64)


def quant_tiles(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of 128 along `axis` of x (float64 holding fp32 values): e4m3 data and fp32 scales broadcast back."""
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -n % 128)
    xp = np.pad(x, pad)
    shape = list(xp.shape)
    shape[axis: axis + 1] = [shape[axis] // 128, 128]
    tiles = xp.reshape(shape)
    s = to_f32(np.maximum(np.abs(tiles).max(axis=axis + 1, keepdims=True), 1e-4) / 448.0)
    q = e4m3(to_f32(tiles / s))
    full = [slice(None)] * x.ndim
    full[axis] = slice(0, n)
    return q.reshape(xp.shape)[tuple(full)], np.broadcast_to(s, tiles.shape).reshape(xp.shape)[tuple(full)]


def quant_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m, n = w.shape
    wp = np.pad(w, ((0, -m % 128), (0, -n % 128)))
    blocks = wp.reshape(wp.shape[0] // 128, 128, wp.shape[1] // 128, 128)
    s = to_f32(np.maximum(np.abs(blocks).max(axis=(1, 3), keepdims=True), 1e-4) / 448.0)
    q = e4m3(to_f32(blocks / s))
    return q.reshape(wp.shape)[:m, :n], np.broadcast_to(s, blocks.shape).reshape(wp.shape)[:m, :n]


def exact_gemm(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """sum_k q_a s_a q_b s_b over K (A [M, K], B [N, K]) and the sum of |terms|, in float64 (exact up to 2^-53)."""
    da, db = a[0] * a[1], b[0] * b[1]
    return da @ db.T, np.abs(da) @ np.abs(db).T


def emulate(x: np.ndarray, w: np.ndarray, g: np.ndarray, cache: str = "fp8") -> dict[str, tuple]:
    """The three GEMMs of the FP8 recipe: name -> (exact product, sum |terms|)."""
    xq, wq = quant_tiles(x, 1), quant_blocks(w)
    x_for_wgrad = xq[0] * xq[1] if cache == "fp8" else x
    return {"y": exact_gemm(xq, wq),
            "dx": exact_gemm(quant_tiles(g, 1), (wq[0].T, wq[1].T)),
            "dw": exact_gemm(tuple(t.T for t in quant_tiles(g, 0)), tuple(t.T for t in quant_tiles(x_for_wgrad, 0)))}


def run_linear(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, recipe: str, backend: str,
               cache: str = "fp8") -> dict[str, torch.Tensor]:
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = low_precision_linear(x, w, recipe, backend, cache)
    y.backward(g)
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad}


def exact_case(seed: int, t: int = 256, k: int = 256, n: int = 256) -> tuple[torch.Tensor, ...]:
    """x [T, K], W [N, K], dy [T, N] whose quantization and fp32 sums are exact: integers in [-16, 16] (e4m3
    integers), 448 on every diagonal n - k = 0 mod 128 (each 1x128 tile, 128-token tile and 128x128 block has amax
    448), times a power of two per 128x128 block (so every scale is that power of two)."""
    gen = torch.Generator().manual_seed(seed)

    def make(rows: int, cols: int) -> torch.Tensor:
        v = torch.randint(-16, 17, (rows, cols), generator=gen).float()
        i, j = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        v[(i - j) % 128 == 0] = 448.0
        powers = 2.0 ** torch.randint(-1, 2, (math.ceil(rows / 128), math.ceil(cols / 128)), generator=gen)
        return v * powers.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]

    return make(t, k), make(n, k), make(t, n)


# --- the recipe against the emulation -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["fp8", "input"])
def test_three_gemms_equal_the_emulation_bit_for_bit_on_exact_inputs(backend, cache):
    x, w, g = exact_case(0)
    got = run_linear(x, w, g, "fp8", backend, cache)
    expected = emulate(x.double().numpy(), w.double().numpy(), g.double().numpy(), cache)
    for name, (exact, _) in expected.items():
        assert np.array_equal(got[name].double().numpy(), exact), name


def test_bf16_recipe_is_exact_on_bf16_representable_inputs():
    x, w, g = exact_case(1)  # integers <= 448 times powers of two: exact in bf16, sums exact in fp32
    got = run_linear(x, w, g, "bf16", "torch")
    xd, wd, gd = x.double(), w.double(), g.double()
    assert torch.equal(got["y"].double(), xd @ wd.T) and torch.equal(got["dx"].double(), gd @ wd)
    assert torch.equal(got["dw"].double(), gd.T @ xd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache", ["fp8", "input"])
def test_three_gemms_within_the_fp32_summation_bound_of_the_emulation(backend, cache):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(200, 384, generator=gen) * 10 ** torch.empty(200, 3).uniform_(-3, 3, generator=gen) \
        .repeat_interleave(128, 1)
    w, g = torch.randn(320, 384, generator=gen) * 0.05, torch.randn(200, 320, generator=gen)
    got = run_linear(x, w, g, "fp8", backend, cache)
    for name, (exact, terms) in emulate(x.double().numpy(), w.double().numpy(), g.double().numpy(), cache).items():
        k = {"y": 384, "dx": 320, "dw": 200}[name]
        bound = (k + 4 * math.ceil(k / 128) + 4) * U32 * terms
        assert (np.abs(got[name].double().numpy() - exact) <= bound).all(), name


@pytest.mark.parametrize("ops", [TorchFP8, FusedFP8], ids=["torch", "fused"])
def test_operands_equal_the_emulated_quantization_bit_for_bit(ops):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 256, generator=gen) * 10 ** torch.empty(300, 2).uniform_(-4, 4, generator=gen) \
        .repeat_interleave(128, 1)
    w = torch.randn(200, 256, generator=gen)
    xn, wn = x.double().numpy(), w.double().numpy()

    def values(operand) -> np.ndarray:  # the fp32 value of each operand element (dequantized)
        return (quant.dequant_1x128(*operand) if len(operand) == 2 else operand[0]).double().numpy()

    def blocks(operand) -> np.ndarray:
        return (quant.dequant_128x128(*operand) if len(operand) == 2 else operand[0]).double().numpy()

    for got, (q, s) in ((values(ops.act(x)), quant_tiles(xn, 1)), (values(ops.act_t(x)), quant_tiles(xn.T, 1)),
                        (blocks(ops.weight(w)), quant_blocks(wn))):
        assert np.array_equal(got, to_f32(q * s))
    assert np.array_equal(blocks(ops.weight_t(ops.weight(w))), blocks(ops.weight(w)).T)
    assert np.array_equal(ops.cached(ops.act(x)).double().numpy(), values(ops.act(x)))


def test_fp8_gemms_are_the_documented_compositions():
    # the reference backend runs exactly these quantizers and GEMMs (torch.equal: same ops, same order)
    gen = torch.Generator().manual_seed(0)
    x, w, g = torch.randn(3, 50, 256, generator=gen), torch.randn(200, 256, generator=gen) * 0.05, \
        torch.randn(3, 50, 200, generator=gen)
    for cache in ("fp8", "input"):
        got = run_linear(x, w, g, "fp8", "torch", cache)
        x2, g2 = x.view(-1, 256), g.view(-1, 200)
        wq, ws = quant.quant_128x128(w)
        xq = quant.quant_1x128(x2)
        assert torch.equal(got["y"].view(-1, 200), fp8_gemm(*xq, wq, ws, torch.float32))
        dx = fp8_gemm(*quant.quant_1x128(g2), *quant.transpose_128x128(wq, ws), torch.float32)
        assert torch.equal(got["dx"].view(-1, 256), dx)
        held = quant.dequant_1x128(*xq) if cache == "fp8" else x2
        dw = fp8_gemm(*quant.quant_1x128_of_transpose(g2), *quant.quant_1x128_of_transpose(held), torch.float32)
        assert torch.equal(got["dw"], dw)


@pytest.mark.parametrize("recipe,limit", [("fp8", CALC_DIFF_FP8), ("bf16", CALC_DIFF_BF16)])
def test_gemms_against_fp64(recipe, limit):
    # DeepGEMM's thresholds: calc_diff < 1e-3 for FP8 GEMMs, < 1e-5 for BF16, against fp64 of the same inputs.
    gen = torch.Generator().manual_seed(1)
    x, w, g = torch.randn(3, 50, 300, generator=gen), torch.randn(200, 300, generator=gen) * 0.05, \
        torch.randn(3, 50, 200, generator=gen)
    got = run_linear(x, w, g, recipe, "torch")
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    (x64 @ w64.mT).backward(g.double())
    assert calc_diff(got["y"], x64.detach() @ w64.detach().mT) < limit
    assert calc_diff(got["dx"], x64.grad) < limit and calc_diff(got["dw"], w64.grad) < limit


def test_dtypes_under_autocast():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(200, 256, generator=gen).requires_grad_()
    x = torch.randn(4, 256, generator=gen).bfloat16().requires_grad_()
    for backend in BACKENDS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fp8_linear(x, w, backend)
        assert y.dtype == torch.bfloat16
        y.backward(torch.ones_like(y))
        assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        assert fp8_linear(torch.randn(4, 256), w, backend).dtype == torch.float32
        x.grad = w.grad = None


# --- modules ------------------------------------------------------------------------------------------------------
FP8_TINY = ModelConfig.preset("dsv3-tiny-fp8")


def test_convert_a_model_converts_the_projections_and_keeps_the_rest():
    torch.manual_seed(0)
    model = Transformer(FP8_TINY, attn_mode="naive", moe_backend="loop")
    names, weights = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    projections = {n for n, m in model.named_modules() if type(m) is nn.Linear and n != "head"}
    swapped = convert_linears(model, "fp8")
    assert set(swapped) == projections  # every projection of MLA, the dense MLP, the experts and shared experts
    assert {n.rsplit(".", 1)[-1] for n in swapped} == {"wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3"}
    assert any(".experts." in n for n in swapped) and any(".shared_experts." in n for n in swapped)
    assert list(model.state_dict()) == names
    assert all(p is weights[n] for n, p in model.named_parameters())  # the same fp32 master parameters
    kept = {n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, RMSNorm, Gate))
            or type(m) is nn.Linear}
    assert kept >= {"embed", "head", "norm", "layers.1.ffn.gate", "layers.0.attn_norm", "layers.0.attn.kv_norm"}
    assert not any(isinstance(m, LowPrecisionLinear) for n, m in model.named_modules() if n in kept)
    caches = {n: m.cache for n, m in model.named_modules() if isinstance(m, LowPrecisionLinear)}
    assert {n for n, c in caches.items() if c == "input"} == {"layers.0.attn.wo", "layers.1.attn.wo"}
    tokens = torch.randint(0, 256, (2, 16))
    with precision_context("fp8"):  # bf16 autocast
        loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if "wkv_b" in n)


def test_weight_is_quantized_once_per_version():
    layer = LowPrecisionLinear(256, 128, "fp8", "torch")
    nn.init.normal_(layer.weight)
    first = layer.quantized_weight()
    layer(torch.randn(3, 256))
    with torch.no_grad():
        layer(torch.randn(5, 256))
    assert layer.quantized_weight() is first  # two calls, one quantization
    torch.optim.SGD(layer.parameters(), lr=0.1).zero_grad()
    layer(torch.randn(3, 256)).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=0.1).step()  # an in-place update bumps the version
    again = layer.quantized_weight()
    assert again is not first and not torch.equal(again.op[0].view(torch.uint8), first.op[0].view(torch.uint8))


def test_module_equals_the_function():
    layer = LowPrecisionLinear(256, 96, "fp8", "torch")
    x = torch.randn(7, 256)
    assert torch.equal(layer(x), fp8_linear(x, layer.weight))


@pytest.mark.parametrize("ops", [TorchFP8, FusedFP8, BF16Ops], ids=["torch", "fused", "bf16"])
def test_wgrad_operands_are_transposed(ops):
    x = torch.randn(130, 256)
    a = ops.act_t(x)
    assert a[0].shape == (256, 130)


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_arguments():
    w = torch.randn(8, 128)
    with pytest.raises(FP8Error, match="^recipe: expected one of fp8, bf16, got 'fp4'"):
        low_precision_linear(torch.randn(2, 128), w, "fp4")
    with pytest.raises(FP8Error, match="^backend: expected one of fused, torch, triton"):
        LowPrecisionLinear(128, 8, backend="cuda")
    with pytest.raises(FP8Error, match="^cache"):
        LowPrecisionLinear(128, 8, cache="fp16")
    with pytest.raises(FP8Error, match=r"^x: expected a float tensor \[\.\.\., 128\]"):
        fp8_linear(torch.randn(2, 15), w)
    with pytest.raises(FP8Error, match="^in_features: expected a multiple of 128 for the FP8 recipe"):
        LowPrecisionLinear(96, 128, "fp8")
    LowPrecisionLinear(96, 128, "bf16")  # BF16 has no tiles


def test_a_model_the_recipe_cannot_tile_is_refused_before_any_change():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("dsv3-small"), attn_mode="naive", moe_backend="loop")
    with pytest.raises(FP8Error, match=r"^layers\.0\.attn\.wq_b: in_features 96 is not a multiple of 128"):
        convert_linears(model, "fp8")
    assert not any(isinstance(m, LowPrecisionLinear) for m in model.modules())
    kept = convert_linears(model, "fp8", keep=("embed", "head", "gate", "wq_b", "wkv_b"))  # keep them instead
    assert kept and not any(n.endswith(("wq_b", "wkv_b")) for n in kept)


def test_fused_backend_runs_on_the_cpu_only():
    with pytest.raises(FP8Error, match="^x: the fused backend runs on the CPU, got a tensor on meta"):
        FusedFP8.act(torch.empty(4, 128, device="meta"))
