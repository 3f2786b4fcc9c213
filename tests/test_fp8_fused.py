"""The compiled CPU fast path (dsv3ref.fp8.fused) against the reference quantizers, bit for bit.

The e4m3 rounding on the bits is checked against torch's cast on a sweep of every region (subnormal spacing, the
normal binades, ties, the saturation boundary 464, 480 and beyond, Inf, NaN); the compiled kernels against the
reference quantizers on aligned and unaligned shapes, fp32 and bf16, UE8M0, all-zero and non-finite tiles (the
sign of a NaN is not compared: the compiled kernel and the eager division make different NaNs, both NaN).
The conformance suite (suites/conformance/test_fp8.py) runs the FP8-typed quantizers as implementation `fused`.
"""

from __future__ import annotations

import pytest
import torch

from dsv3ref.fp8 import fused, quant

FP8 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bits with every NaN made the same (NaN signs differ between kernels and are not semantics)."""
    return torch.where(t.isnan(), torch.nan, t).view(torch.int32)


def _bytes(q: torch.Tensor) -> torch.Tensor:
    b = q.view(torch.uint8)
    return torch.where(b & 0x7F == 0x7F, 0x7F, b)  # NaN without its sign


def _sweep() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()].sort().values
    ties = (grid[1:] + grid[:-1]) / 2  # halfway between neighbours, and one fp32 step either side
    inf = torch.tensor(torch.inf)
    near = torch.cat([ties, torch.nextafter(ties, inf), torch.nextafter(ties, -inf)])
    wide = torch.randn(200_000, generator=gen) * 10 ** torch.empty(200_000).uniform_(-12, 6, generator=gen)
    special = torch.tensor([0.0, -0.0, 464.0, 464.00003, 479.99997, 480.0, 1e30, -1e30, torch.inf, -torch.inf,
                            torch.nan, 2.0**-6, 2.0**-10, 2.0**-10 * 1.0001, 1e-45, 3e-39])
    return torch.cat([grid, near, wide, special, torch.linspace(-500, 500, 100_001)])


def test_rounding_on_the_bits_equals_torchs_cast():
    v = _sweep()
    cast = v.to(FP8)
    assert torch.equal(_bits(fused.round_to_e4m3(v)), _bits(cast.float()))
    assert torch.equal(_bytes(fused.e4m3_bytes(v).view(FP8)), _bytes(cast))
    assert fused.e4m3_bytes(torch.tensor([-torch.inf, -500.0]))[0] == 0xFE  # -448: saturation keeps the sign


def _activations(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Tiles of magnitudes from 1e-6 to 1e6, one all-zero tile, one NaN and one Inf in their own tiles."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // 128)
    scale = (10 ** torch.empty(rows, groups).uniform_(-6, 6, generator=gen)).repeat_interleave(128, 1)[:, :k]
    x = torch.randn(rows, k, generator=gen) * scale
    x[1, :128] = 0.0
    x[2, 3], x[3, k - 1] = torch.nan, torch.inf
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,k", [(40, 384), (9, 300)])
def test_compiled_fake_quantization_equals_the_reference(dtype, rows, k):
    x = _activations(rows, k, dtype)
    assert torch.equal(_bits(fused.fake_quant_1x128(x)), _bits(quant.dequant_1x128(*quant.quant_1x128(x))))
    expected = quant.dequant_1x128(*quant.quant_1x128_of_transpose(x))
    assert torch.equal(_bits(fused.fake_quant_128x1(x)), _bits(expected))


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scales", "ue8m0"])
@pytest.mark.parametrize("rows,k", [(40, 384), (9, 300)])
def test_compiled_quantizers_equal_the_reference(ue8m0, rows, k):
    x = _activations(rows, k, torch.bfloat16)
    q, s = fused.quant_1x128(x, ue8m0)
    rq, rs = quant.quant_1x128(x, ue8m0)
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(_bits(s), _bits(rs))
    w = _activations(k, rows * 8, torch.bfloat16, seed=1)  # [K, N]: partial blocks both ways
    q, s = fused.quant_128x128(w, ue8m0)
    rq, rs = quant.quant_128x128(w, ue8m0)
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(_bits(s), _bits(rs))
    x3 = x[:8].reshape(2, 4, k)  # leading dimensions are kept
    assert fused.quant_1x128(x3)[0].shape == x3.shape and fused.quant_1x128(x3)[1].shape == (2, 4, 3)


def test_small_inputs_run_eagerly_with_the_same_result():
    x = torch.randn(2, 128)  # under MIN_LENGTH: the eager path
    assert x.numel() < fused.MIN_LENGTH
    assert torch.equal(_bits(fused.fake_quant_1x128(x)), _bits(quant.dequant_1x128(*quant.quant_1x128(x))))


def test_builds_are_timed_once_per_kernel_and_dtype():
    fused.fake_quant_1x128(torch.randn(64, 256))
    fused.fake_quant_1x128(torch.randn(65, 384))  # another shape: no new build
    seconds = fused.compile_seconds()
    assert "fake_tiles/float32" in seconds and seconds["fake_tiles/float32"] > 0
    assert len([k for k in seconds if k.startswith("fake_tiles/float32")]) == 1


def test_bad_input():
    with pytest.raises(quant.FP8Error, match="^x: expected a float32, bfloat16 or float16 tensor"):
        fused.quant_1x128(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(quant.FP8Error, match="^w: expected a 2-D tensor"):
        fused.quant_128x128(torch.ones(4, 4, 4))
    with pytest.raises(quant.FP8Error, match="^x: the fused backend runs on the CPU"):
        fused.quant_1x128(torch.ones(4, 128, device="meta"))
