"""Broken FP8 kernels: the torch reference (dsv3ref.fp8) with one function replaced."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from dsv3ref.fp8 import BLOCK, dequant_1x128, dequant_128x128, fp8_gemm, quant_1x128, quant_128x128
from dsv3ref.fp8.accumulation import emulate_accumulation
from dsv3ref.fp8.gemm import check_gemm_args
from dsv3ref.fp8.quant import FP8
from harness.adapters.fp8 import reference

_CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
E4M3 = _CODES[torch.isfinite(_CODES) & (_CODES >= 0)].unique()  # every finite non-negative e4m3 value, sorted


def _with(**functions: object) -> SimpleNamespace:
    ns = reference()
    for name, fn in functions.items():
        setattr(ns, name, fn)
    return ns


def round_ties_away(v: torch.Tensor) -> torch.Tensor:
    """fp32 values (|v| <= 448) to e4m3, round to nearest with ties away from zero (the Triton interpreter's bug)."""
    a = v.abs()
    idx = torch.searchsorted(E4M3, a).clamp(1, E4M3.numel() - 1)
    lo, hi = E4M3[idx - 1], E4M3[idx]
    tie = (a > lo) & (a < hi) & (a - lo == hi - a)
    return torch.where(tie, hi.copysign(v), v).to(FP8)


def _ties_away_1x128(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _, s = quant_1x128(x, ue8m0)
    return round_ties_away(x.float() / s.repeat_interleave(BLOCK, dim=-1)[..., : x.shape[-1]]), s


def _ties_away_128x128(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    _, s = quant_128x128(w, ue8m0)
    full = s.repeat_interleave(BLOCK, 0)[: w.shape[0]].repeat_interleave(BLOCK, 1)[:, : w.shape[1]]
    return round_ties_away(w.float() / full), s


def ties_away_from_zero() -> SimpleNamespace:
    """Quantizers whose e4m3 cast rounds ties away from zero instead of to even."""
    return _with(quant_1x128=_ties_away_1x128, quant_128x128=_ties_away_128x128)


def _no_promotion_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    row_scales = check_gemm_args(a, a_s, b, b_s, out_dtype)
    da = dequant_1x128(a, a_s).double()
    db = (dequant_1x128(b, b_s) if row_scales else dequant_128x128(b, b_s)).double()
    return emulate_accumulation(da, db, mantissa_bits=13, promote_every=None).to(out_dtype)


def no_promotion() -> SimpleNamespace:
    """A GEMM that accumulates the whole K in the tensor core's ~14-bit accumulator (no fp32 promotion)."""
    return _with(fp8_gemm=_no_promotion_gemm)


def _transposed_grid_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                          out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    if b_s.shape[0] != b.shape[0]:  # 128x128 blocks: the grid read with its strides swapped
        b_s = b_s.mT.contiguous().reshape(b_s.shape)
    return fp8_gemm(a, a_s, b, b_s, out_dtype)


def transposed_scale_grid() -> SimpleNamespace:
    """A GEMM that reads B's [N/128, K/128] scale grid with swapped strides (invisible while N <= 128)."""
    return _with(fp8_gemm=_transposed_grid_gemm)
