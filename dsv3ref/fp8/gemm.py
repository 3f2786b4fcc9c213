"""Block-scaled FP8 GEMM (torch reference).

C = A B^T with A [M, K] in 1x128 tiles and B [N, K] in 128x128 blocks (forward and dgrad) or in 1x128 tiles
(wgrad, both operands quantized along the reduced token dim). Per 128-wide K block the FP8 product is
accumulated in fp32 and multiplied by both scales, then added to an fp32 accumulator: the "promotion to CUDA
cores every 128 elements" of DeepSeek-V3, where the scales are applied.
"""

from __future__ import annotations

import math

import torch

from dsv3ref.fp8.quant import BLOCK, FP8, FP8Error

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_gemm_args(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                    out_dtype: torch.dtype) -> bool:
    """Validate a block-scaled GEMM's operands; returns True when B has per-row (1x128) scales [N, Kb]."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype != FP8:
            raise FP8Error(f"{name}: expected a torch.float8_e4m3fn tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() != 2:
            raise FP8Error(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    (m, k), n = a.shape, b.shape[0]
    if k == 0:
        raise FP8Error(f"a: expected a last dimension >= 1, got shape {tuple(a.shape)}")
    if b.shape[1] != k:
        raise FP8Error(f"b: expected {k} columns to match a [M, K] = {tuple(a.shape)}, got shape {tuple(b.shape)}")
    kb = math.ceil(k / BLOCK)
    for name, t in (("a_s", a_s), ("b_s", b_s)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise FP8Error(f"{name}: expected a torch.float32 scale tensor, got {getattr(t, 'dtype', type(t))}")
    if tuple(a_s.shape) != (m, kb):
        raise FP8Error(f"a_s: expected shape {(m, kb)} (1x128 tiles of a), got {tuple(a_s.shape)}")
    block_shape, row_shape = (math.ceil(n / BLOCK), kb), (n, kb)
    if tuple(b_s.shape) not in (block_shape, row_shape):
        raise FP8Error(f"b_s: expected shape {block_shape} (128x128 blocks of b) or {row_shape} (1x128 tiles), "
                       f"got {tuple(b_s.shape)}")
    if len({a.device, a_s.device, b.device, b_s.device}) != 1:
        raise FP8Error(f"b, a_s, b_s: expected all on {a.device}, got {b.device}, {a_s.device}, {b_s.device}")
    if out_dtype not in OUT_DTYPES:
        raise FP8Error(f"out_dtype: expected one of float32, bfloat16, float16, got {out_dtype}")
    return tuple(b_s.shape) == row_shape


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """C [M, N] = A B^T from FP8 operands and fp32 scales, fp32 accumulation, scales applied per 128-K block."""
    row_scales = check_gemm_args(a, a_s, b, b_s, out_dtype)
    (m, k), n = a.shape, b.shape[0]
    b_s_rows = b_s if row_scales else b_s.repeat_interleave(BLOCK, dim=0)[:n]  # [N, Kb]
    with torch.autocast(a.device.type, enabled=False):
        af, bf = a.float(), b.float()
        acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
        for kb in range(math.ceil(k / BLOCK)):
            cols = slice(kb * BLOCK, min(k, (kb + 1) * BLOCK))
            partial = af[:, cols] @ bf[:, cols].mT  # [M, N], exact products, fp32 sums
            acc += partial.mul_(a_s[:, kb, None]).mul_(b_s_rows[None, :, kb])
    return acc.to(out_dtype)
