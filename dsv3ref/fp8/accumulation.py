"""Emulation of a limited-precision tensor-core accumulator, and of the FP32 promotion that repairs it.

Accumulator model (the papers name neither the model nor the inputs; this is ours, built from the published
descriptions of Hopper's FP8 WGMMA, stated so it can be checked):
- Products of FP8 operands are exact (e4m3 x e4m3 has at most 8 significant bits).
- The tensor core adds `group` = 32 products per step (one FP8 WGMMA has K = 32) in fixed point: with
  `align_accumulator` (default) the running accumulator is one of the group + 1 addends. Every addend is aligned
  to the largest exponent among them by a sign-filling (two's complement) right shift that keeps `mantissa_bits`
  fraction bits below it (T1 §3.5.2: "uses the highest bits of each mantissa product after sign-fill right
  shifting, and truncates bits exceeding this range"), i.e. it is rounded toward -inf; the aligned addends are
  summed exactly. Without it the products are aligned among themselves and their sum is added to the
  accumulator exactly.
- The accumulator register holds `mantissa_bits` fraction bits (FP22 = e8m13 for 13): the sum is normalised and
  truncated toward zero (SageAttention2's measurement: the low mantissa bits of C are zeroed).
- Promotion every N_C elements (`promote_every`): the limited accumulator is added to an FP32 accumulator on
  the CUDA cores (round to nearest even) and reset to zero.
- FP32 accumulation (the floor): every product added to an FP32 accumulator in K order, rounding each addition.
The experiment that runs this model on FP8 inputs against the exact product is harness.bench.fp8
(`accumulation_errors`).
"""

from __future__ import annotations

import numpy as np
import torch

from dsv3ref.fp8.quant import FP8Error

WGMMA_K = 32


def _floor_log2(t: np.ndarray) -> np.ndarray:
    """floor(log2 |t|), -2000 for zeros (below every exponent that occurs)."""
    exponent = np.frexp(t)[1] - 1  # |t| = m 2^e with 0.5 <= m < 1
    return np.where(t == 0, -2000, exponent)


def _floor_to(t: np.ndarray, ulp_log2: np.ndarray) -> np.ndarray:
    """t rounded toward -inf to a multiple of 2^ulp_log2: a two's complement right shift (exact in float64)."""
    return np.ldexp(np.floor(np.ldexp(t, -ulp_log2)), ulp_log2)


def _truncate_to(t: np.ndarray, ulp_log2: np.ndarray) -> np.ndarray:
    """t truncated toward zero to a multiple of 2^ulp_log2: zeroing low mantissa bits (exact in float64)."""
    return np.ldexp(np.trunc(np.ldexp(t, -ulp_log2)), ulp_log2)


def _aligned_sum(terms: np.ndarray, mantissa_bits: int) -> np.ndarray:
    """Exact sum over the last axis of the terms, each shifted to `mantissa_bits` fraction bits below the largest
    exponent among them (sign-filling shift: toward -inf)."""
    return _floor_to(terms, _floor_log2(terms).max(-1, keepdims=True) - mantissa_bits).sum(-1)


def _check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise FP8Error(f"{name}: expected a 2-D floating-point tensor, got {getattr(t, 'shape', type(t))}")
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise FP8Error(f"b: expected [N, K] with K = {a.shape[1]} >= 1 (a is {tuple(a.shape)}), "
                       f"got {tuple(b.shape)}")


def emulate_accumulation(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 13,
                         promote_every: int | None = None, group: int = WGMMA_K,
                         align_accumulator: bool = True) -> torch.Tensor:
    """C = A B^T [M, N] (float64) through the limited accumulator described in the module docstring."""
    _check_operands(a, b)
    if not 1 <= mantissa_bits <= 40:
        raise FP8Error(f"mantissa_bits: expected 1..40, got {mantissa_bits}")
    if group < 1:
        raise FP8Error(f"group: expected >= 1, got {group}")
    if promote_every is not None and (promote_every < group or promote_every % group):
        raise FP8Error(f"promote_every: expected a multiple of group {group}, got {promote_every}")
    a, b = a.double().numpy(), b.double().numpy()  # numpy: many tiny sequential steps, no thread start-up
    k = a.shape[1]
    acc = np.zeros((a.shape[0], b.shape[0]))
    promoted = np.zeros_like(acc, dtype=np.float32)
    for start in range(0, k, group):
        products = a[:, None, start:start + group] * b[None, :, start:start + group]  # [M, N, group], exact
        if align_accumulator:
            total = _aligned_sum(np.concatenate([acc[..., None], products], axis=-1), mantissa_bits)
        else:
            total = acc + _aligned_sum(products, mantissa_bits)
        acc = _truncate_to(total, _floor_log2(total) - mantissa_bits)
        end = min(start + group, k)
        if promote_every is not None and (end % promote_every == 0 or end == k):
            promoted += acc.astype(np.float32)
            acc = np.zeros_like(acc)
    return torch.from_numpy(promoted.astype(np.float64) if promote_every is not None else acc)


def fp32_accumulation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C = A B^T [M, N] (float64) with each product added in K order to an FP32 accumulator (FMA chain)."""
    _check_operands(a, b)
    a, b = a.float().numpy(), b.float().numpy()
    acc = np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)
    for i in range(a.shape[1]):
        acc += a[:, i, None] * b[None, :, i]  # each product of two e4m3 values is exact in fp32
    return torch.from_numpy(acc.astype(np.float64))
