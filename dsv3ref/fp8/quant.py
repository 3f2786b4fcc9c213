"""Fine-grained FP8 quantization (torch reference): 1x128 activation tiles and 128x128 weight blocks.

DeepSeek-V3 stores every GEMM operand as float8_e4m3fn with one fp32 scale per tile: scale = amax / 448, with
amax clamped at 1e-4 so an all-zero tile gets a finite scale; with `ue8m0` the scale is rounded up to a power of
two. Shapes that are not multiples of 128 are zero-padded for the scale computation and the data is sliced back.

Non-finite input (documented result, not an error): a NaN or +-Inf poisons exactly its own tile. That tile's
scale becomes NaN (a NaN inside) or +Inf (an Inf inside) and its dequantized values are all NaN; no other tile's
data or scale changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 128
E4M3_MAX = 448.0
AMAX_EPS = 1e-4
FP8 = torch.float8_e4m3fn
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FP8Error(ValueError):
    """Bad input to an FP8 routine; the message names the argument and what was expected."""


def check_input(x: torch.Tensor, name: str, ndim: int | None = None) -> None:
    """Raise FP8Error unless `x` is a float32/bf16/fp16 tensor (of `ndim` dims) with a non-empty last dim."""
    if not isinstance(x, torch.Tensor):
        raise FP8Error(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise FP8Error(f"{name}: expected a float32, bfloat16 or float16 tensor, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise FP8Error(f"{name}: expected a {ndim}-D tensor, got shape {tuple(x.shape)}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise FP8Error(f"{name}: expected a last dimension >= 1, got shape {tuple(x.shape)}")


def check_quantized(q: torch.Tensor, s: torch.Tensor, layout: str) -> None:
    """Raise FP8Error unless `q` is float8_e4m3fn and `s` is fp32 with the scale shape of `layout` (1x128, 128x128)."""
    if not isinstance(q, torch.Tensor) or q.dtype != FP8:
        raise FP8Error(f"q: expected a torch.float8_e4m3fn tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        raise FP8Error(f"s: expected a torch.float32 scale tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    if layout == "128x128" and q.dim() != 2:
        raise FP8Error(f"q: expected a 2-D tensor for 128x128 blocks, got shape {tuple(q.shape)}")
    if q.dim() == 0 or q.shape[-1] == 0:
        raise FP8Error(f"q: expected a last dimension >= 1, got shape {tuple(q.shape)}")
    expected = scale_shape(q.shape, layout)
    if tuple(s.shape) != expected:
        raise FP8Error(f"s: expected shape {expected} for q of shape {tuple(q.shape)} ({layout} tiles), "
                       f"got {tuple(s.shape)}")
    if q.device != s.device:
        raise FP8Error(f"s: expected the device of q ({q.device}), got {s.device}")


def scale_shape(shape: torch.Size | tuple[int, ...], layout: str) -> tuple[int, ...]:
    """Scale shape of a tensor of `shape` quantized in `layout` tiles: 1x128 [..., ceil(K/128)] or 128x128."""
    if layout == "1x128":
        return (*shape[:-1], math.ceil(shape[-1] / BLOCK))
    if layout == "128x128":
        return (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
    raise FP8Error(f"layout: expected '1x128' or '128x128', got {layout!r}")


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Round positive finite fp32 values up to the next power of two (exact, on the bits; UE8M0 scales).

    Bit arithmetic, not 2**ceil(log2 s): fp32 log2 of a value just above a power of two can round onto the
    integer and give a scale that is too small. Non-finite values pass through unchanged.
    """
    bits = s.view(torch.int32)
    up = torch.where(bits & 0x7FFFFF != 0, (bits & 0x7F800000) + 0x800000, bits).view(torch.float32)
    return torch.where(torch.isfinite(s), up, s)


def scale_from_amax(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """fp32 scale per tile: max(amax, 1e-4) / 448, rounded up to a power of two with `ue8m0`; NaN stays NaN."""
    s = amax.float().clamp_min(AMAX_EPS) / E4M3_MAX
    return ceil_pow2(s) if ue8m0 else s


def _pad_last(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of BLOCK (no copy when it already is one)."""
    pad = -x.shape[-1] % BLOCK
    return F.pad(x, (0, pad)) if pad else x


def quant_1x128(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization of x [..., K]: data [..., K] e4m3 and scales [..., ceil(K/128)] fp32."""
    check_input(x, "x")
    k = x.shape[-1]
    groups = _pad_last(x.float()).unflatten(-1, (-1, BLOCK))  # [..., G, 128]
    s = scale_from_amax(groups.abs().amax(-1), ue8m0)
    q = (groups / s.unsqueeze(-1)).to(FP8).flatten(-2)[..., :k]
    return q, s


def quant_128x128(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block quantization of w [M, N]: data [M, N] e4m3 and scales [ceil(M/128), ceil(N/128)] fp32."""
    check_input(w, "w", ndim=2)
    m, n = w.shape
    padded = _pad_last(_pad_last(w.float()).mT).mT
    blocks = padded.unflatten(0, (-1, BLOCK)).unflatten(-1, (-1, BLOCK))  # [Mb, 128, Nb, 128]
    s = scale_from_amax(blocks.abs().amax(dim=(1, 3)), ue8m0)
    q = (blocks / s[:, None, :, None]).to(FP8).flatten(2).flatten(0, 1)[:m, :n]
    return q, s


def quant_1x128_of_transpose(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """1x128 tiles of x^T for x [M, K] (128x1 tiles of x, along tokens): data [K, M], scales [K, ceil(M/128)].

    The weight-gradient GEMM reduces over tokens, so both of its operands are quantized along that dim; the
    rowwise and columnwise quantizations of a tensor differ, so this one is computed from the high-precision x.
    """
    check_input(x, "x", ndim=2)
    return quant_1x128(x.mT.contiguous(), ue8m0)


def transpose_128x128(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 128x128-block quantization of w^T from that of w: blocks are transpose-invariant (same amax)."""
    check_quantized(q, s, "128x128")
    return q.mT.contiguous(), s.mT.contiguous()


def dequant_1x128(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x ~= q * s for 1x128 tiles: q [..., K] e4m3, s [..., ceil(K/128)] fp32; the product in fp32, then `dtype`."""
    check_quantized(q, s, "1x128")
    k = q.shape[-1]
    return (q.float() * s.repeat_interleave(BLOCK, dim=-1)[..., :k]).to(dtype)


def dequant_128x128(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w ~= q * s for 128x128 blocks: q [M, N] e4m3, s [ceil(M/128), ceil(N/128)] fp32."""
    check_quantized(q, s, "128x128")
    m, n = q.shape
    full = s.repeat_interleave(BLOCK, dim=0)[:m].repeat_interleave(BLOCK, dim=1)[:, :n]
    return (q.float() * full).to(dtype)
