"""dsv3ref.fp8.inference.FP8Linear: an FP8-stored weight with its 128x128 block scales, run dequantized or through
the block-scaled FP8 GEMM, kept in FP8 across module conversions."""

from __future__ import annotations

import pytest
import torch

from dsv3ref.fp8.gemm import fp8_gemm
from dsv3ref.fp8.inference import FP8Linear, dense_weight
from dsv3ref.fp8.quant import FP8, FP8Error, dequant_128x128, quant_1x128, quant_128x128


def _linear(gemm: str, w: torch.Tensor) -> FP8Linear:
    layer = FP8Linear(w.shape[1], w.shape[0], gemm)
    q, s = quant_128x128(w)
    layer.load_state_dict({"weight": q, "scale": s})
    return layer


def test_both_gemms_are_the_official_ones():
    w, x = torch.randn(200, 300), torch.randn(2, 5, 300)
    dequant, fp8 = _linear("dequant", w), _linear("fp8", w)
    assert torch.equal(dequant(x), torch.nn.functional.linear(x, dequant_128x128(dequant.weight, dequant.scale)))
    expected = fp8_gemm(*quant_1x128(x.reshape(10, 300)), fp8.weight, fp8.scale, torch.float32).view(2, 5, 200)
    assert torch.equal(fp8(x), expected)
    assert fp8.scale.shape == (2, 3) and dense_weight(dequant, torch.float64).dtype == torch.float64
    assert dense_weight(torch.nn.Linear(3, 2), torch.float64).dtype == torch.float32  # a plain weight as it is


def test_conversions_keep_fp8_and_fp32_scales():
    layer = _linear("dequant", torch.randn(130, 140))
    scale = layer.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert layer(torch.randn(3, 140, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_errors():
    with pytest.raises(FP8Error, match="^gemm: expected one of dequant, fp8"):
        FP8Linear(4, 4, "int8")
    with pytest.raises(FP8Error, match="^x: expected a last dimension of 4"):
        FP8Linear(4, 4)(torch.randn(2, 5))
    with pytest.raises(FP8Error, match="^x: expected a float32, bfloat16 or float16 tensor"):
        _linear("fp8", torch.randn(4, 4))(torch.randn(2, 4, dtype=torch.float64))
