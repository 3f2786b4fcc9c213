"""The low-precision linear layer: its three GEMMs, dtypes under autocast, and model conversion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import fp8_gemm, quant
from dsv3ref.fp8.linear import LowPrecisionLinear, convert_linears, fp8_linear, low_precision_linear
from dsv3ref.fp8.quant import FP8Error
from dsv3ref.model import Transformer
from dsv3ref.train import precision_context
from harness.numerics import CALC_DIFF_BF16, CALC_DIFF_FP8, calc_diff


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 50, 300, generator=gen)
    w = torch.randn(200, 300, generator=gen) * 0.05
    return x, w, torch.randn(3, 50, 200, generator=gen)


def test_fp8_gemms_are_the_documented_compositions():
    x, w, g = _case()
    x.requires_grad_(), w.requires_grad_()
    y = fp8_linear(x, w)
    y.backward(g)
    x2, g2 = x.detach().view(-1, 300), g.view(-1, 200)
    wq, ws = quant.quant_128x128(w.detach())
    assert torch.equal(y.detach().view(-1, 200), fp8_gemm(*quant.quant_1x128(x2), wq, ws, torch.float32))
    dx = fp8_gemm(*quant.quant_1x128(g2), *quant.transpose_128x128(wq, ws), torch.float32)
    assert torch.equal(x.grad.view(-1, 300), dx)
    dw = fp8_gemm(*quant.quant_1x128_of_transpose(g2), *quant.quant_1x128_of_transpose(x2), torch.float32)
    assert torch.equal(w.grad, dw)


@pytest.mark.parametrize("recipe,limit", [("fp8", CALC_DIFF_FP8), ("bf16", CALC_DIFF_BF16)])
def test_gemms_against_fp64(recipe, limit):
    # DeepGEMM's thresholds: calc_diff < 1e-3 for FP8 GEMMs, < 1e-5 for BF16, against fp64 of the same inputs.
    x, w, g = _case(1)
    x.requires_grad_(), w.requires_grad_()
    low_precision_linear(x, w, recipe).backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (x64 @ w64.mT).backward(g.double())
    y = low_precision_linear(x, w, recipe)
    assert calc_diff(y, x64.detach() @ w64.detach().mT) < limit
    assert calc_diff(x.grad, x64.grad) < limit and calc_diff(w.grad, w64.grad) < limit


def test_dtypes_under_autocast():
    x, w, g = _case()
    x, w = x.bfloat16().requires_grad_(), w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16
    y.backward(g.bfloat16())
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert fp8_linear(torch.randn(4, 300), w).dtype == torch.float32


def test_convert_a_model():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("dsv3-tiny"), attn_mode="naive", moe_backend="loop")
    names, weights = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    swapped = convert_linears(model, "fp8")
    assert list(model.state_dict()) == names
    assert all(p is weights[n] for n, p in model.named_parameters())  # the same master parameters
    assert "layers.0.attn.wkv_b" in swapped and "layers.1.ffn.experts.0.w2" in swapped
    assert not any(s.endswith(("head", "gate", "embed")) for s in swapped)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, LowPrecisionLinear)
    tokens = torch.randint(0, 256, (2, 16))
    with precision_context("fp8"):  # bf16 autocast
        loss = model(tokens).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if "wkv_b" in n)


def test_bad_arguments():
    w = torch.randn(8, 16)
    with pytest.raises(FP8Error, match="^recipe"):
        low_precision_linear(torch.randn(2, 16), w, "fp4")
    with pytest.raises(FP8Error, match="^backend"):
        LowPrecisionLinear(16, 8, backend="cuda")
    with pytest.raises(FP8Error, match=r"^x: expected a float tensor \[\.\.\., 16\]"):
        fp8_linear(torch.randn(2, 15), w)
