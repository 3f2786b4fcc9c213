"""A linear layer holding an FP8 checkpoint's weight as stored, for inference.

DeepSeek-V3's released weights are float8_e4m3fn [out, in] with one fp32 dequantization multiplier per 128x128
block (`weight_scale_inv` in the Hugging Face files, `scale` in the official converted ones: W ~= q * s). The
official inference code runs such a linear in one of two ways (its `gemm_impl`), both available here:

- "dequant" (the official default, "bf16"): W is dequantized to the activation dtype and multiplied as usual;
  activations are never quantized;
- "fp8": the activations are quantized in 1x128 tiles and the block-scaled FP8 GEMM runs with fp32 accumulation
  (`dsv3ref.fp8.gemm.fp8_gemm`), output in the activation dtype (fp32, bf16 or fp16).

State-dict names are the official ones: `weight` (e4m3) and `scale` (fp32). Module conversions (`.to(dtype)`,
`.bfloat16()`) move both tensors between devices but never change their dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref.fp8.gemm import fp8_gemm
from dsv3ref.fp8.quant import BLOCK, FP8, FP8Error, dequant_128x128, quant_1x128

GEMMS = ("dequant", "fp8")


class FP8Linear(nn.Module):
    """y = x W^T for an FP8-stored weight W [out, in] with 128x128 block scales (no bias)."""

    def __init__(self, in_features: int, out_features: int, gemm: str = "dequant",
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if gemm not in GEMMS:
            raise FP8Error(f"gemm: expected one of {', '.join(GEMMS)}, got {gemm!r}")
        self.in_features, self.out_features, self.gemm = in_features, out_features, gemm
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        scales = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
        self.scale = nn.Parameter(torch.ones(scales, dtype=torch.float32, device=device), requires_grad=False)

    def _apply(self, fn: Callable, recurse: bool = True) -> FP8Linear:
        """Follow device moves only: the e4m3 data and the fp32 scales keep their dtypes."""
        saved = {name: t.detach().clone() for name, t in (("weight", self.weight), ("scale", self.scale))
                 if not t.is_meta}
        super()._apply(fn, recurse)
        for name, value in saved.items():
            param = getattr(self, name)
            if param.dtype != value.dtype:
                param.data = value.to(param.device)
        return self

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [out, in] in `dtype` (products in fp32)."""
        return dequant_128x128(self.weight, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise FP8Error(f"x: expected a last dimension of {self.in_features}, got shape {tuple(x.shape)}")
        if self.gemm == "dequant":
            return F.linear(x, self.dense_weight(x.dtype))
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        y = fp8_gemm(*quant_1x128(x2), self.weight, self.scale, x.dtype)  # [T, N]
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gemm={self.gemm}"


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a dense matrix in `dtype`: dequantized for FP8Linear, the parameter otherwise
    (code that reads a weight directly, e.g. MLA's absorbed path, goes through this)."""
    if isinstance(linear, FP8Linear):
        return linear.dense_weight(dtype)
    return linear.weight
