"""LogFMT-nBit (Insights §3.2): a logarithmic n-bit codec for communication, per 1x128 tile.

Per tile: lo = min ln|x| and hi = max ln|x| over the nonzero elements, with lo raised to hi - ln(2^32) so the
range stays that of a 5-bit exponent. A code is a sign bit and an (n-1)-bit index K: K = 0 is zero, K = 1 is
exp(lo), K = 2^(n-1) - 1 is exp(hi), and K decodes to sign * exp(lo + step (K - 1)) with
step = (hi - lo) / (2^(n-1) - 2). Encoding picks, of the two codes around |x|, the one nearer in linear space
(the paper rounds in linear space, not in log space, to stay unbiased); below exp(lo) the choice is 0 or K = 1;
a tile with a single nonzero magnitude (lo = hi) codes it as the top index.
lo and step are kept per tile in fp32 (the metadata sent with the codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsv3ref.fp8.quant import BLOCK, FP8Error, check_input, dequant_1x128, quant_1x128

RANGE_LOG = 32 * math.log(2.0)
E5M2_MAX = 57344.0
FORMATS = ("logfmt-8", "logfmt-10", "e4m3", "e5m2", "bf16")


@dataclass(frozen=True)
class LogFMTTiles:
    """Encoded tensor: codes [..., K] (int16: sign bit n-1, index below), lo and step [..., ceil(K/128)] fp32."""

    codes: torch.Tensor
    lo: torch.Tensor
    step: torch.Tensor
    n_bits: int


def _check_bits(n_bits: int) -> None:
    if not isinstance(n_bits, int) or not 3 <= n_bits <= 16:
        raise FP8Error(f"n_bits: expected an integer in 3..16, got {n_bits!r}")


def logfmt_encode(x: torch.Tensor, n_bits: int = 8) -> LogFMTTiles:
    """Encode x [..., K] (finite) into n-bit LogFMT codes with per-1x128-tile lo/step."""
    check_input(x, "x")
    _check_bits(n_bits)
    if not torch.isfinite(x).all():
        raise FP8Error("x: expected finite values (LogFMT has no NaN/Inf codes)")
    k, top = x.shape[-1], 2 ** (n_bits - 1) - 1
    tiles = F.pad(x.double(), (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))  # [..., G, 128]
    mag = tiles.abs()
    logs = torch.where(mag > 0, mag.log(), torch.full_like(mag, math.inf))
    hi = torch.where(mag > 0, logs, -math.inf).amax(-1)
    lo = torch.maximum(logs.amin(-1), hi - RANGE_LOG)
    empty = ~torch.isfinite(hi)  # all-zero tile
    lo, hi = lo.masked_fill(empty, 0.0).float(), hi.masked_fill(empty, 0.0).float()
    step = ((hi.double() - lo.double()) / (top - 1)).float()
    lo64, step64 = lo.double()[..., None], step.double()[..., None]
    position = torch.where(step64 > 0, (logs - lo64) / step64.clamp_min(1e-300), torch.zeros_like(logs))
    j = position.floor().clamp(0, top - 2)  # candidates K = j + 1 and j + 2
    below, above = torch.exp(lo64 + step64 * j), torch.exp(lo64 + step64 * (j + 1))
    index = torch.where(mag - below > above - mag, j + 2, j + 1)
    index = torch.where(mag < lo64.exp(), (mag >= lo64.exp() / 2).double(), index)  # below exp(lo): 0 or 1
    index = torch.where(step64 == 0, torch.full_like(index, top), index)  # one magnitude: min = max code
    index = torch.where(mag == 0, torch.zeros_like(index), index)
    codes = (index.long() | ((tiles < 0).long() << (n_bits - 1))).flatten(-2)[..., :k].to(torch.int16)
    return LogFMTTiles(codes, lo, step, n_bits)


def logfmt_decode(t: LogFMTTiles, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode LogFMT tiles back to values of `dtype`."""
    k, sign_bit = t.codes.shape[-1], 1 << (t.n_bits - 1)
    codes = t.codes.long()
    index = (codes & (sign_bit - 1)).double()
    lo = t.lo.double().repeat_interleave(BLOCK, dim=-1)[..., :k]
    step = t.step.double().repeat_interleave(BLOCK, dim=-1)[..., :k]
    value = torch.where(index > 0, torch.exp(lo + step * (index - 1)), torch.zeros_like(index))
    return torch.where(codes & sign_bit != 0, -value, value).to(dtype)


def _e5m2_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """1x128 tiles in float8_e5m2 with scale amax / 57344 (the same recipe as E4M3 with E5M2's max)."""
    k = x.shape[-1]
    tiles = F.pad(x.float(), (0, -k % BLOCK)).unflatten(-1, (-1, BLOCK))
    s = tiles.abs().amax(-1, keepdim=True).clamp_min(1e-4) / E5M2_MAX
    return ((tiles / s).to(torch.float8_e5m2).float() * s).flatten(-2)[..., :k]


def roundtrip(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x encoded and decoded in `fmt` (one of FORMATS), as float32."""
    check_input(x, "x")
    if fmt.startswith("logfmt-") and fmt in FORMATS:
        return logfmt_decode(logfmt_encode(x, int(fmt.split("-")[1])))
    if fmt == "e4m3":
        return dequant_1x128(*quant_1x128(x))
    if fmt == "e5m2":
        return _e5m2_roundtrip(x)
    if fmt == "bf16":
        return x.to(torch.bfloat16).float()
    raise FP8Error(f"fmt: expected one of {', '.join(FORMATS)}, got {fmt!r}")


def activation_like(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Synthetic residual-branch activations: N(0, 1) rows times a log-normal (sigma 1) scale per channel,
    which gives the few large outlier channels seen in LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    channel_scale = torch.exp(torch.randn(dim, generator=gen))
    return torch.randn(tokens, dim, generator=gen) * channel_scale


def rel_rms_error(approx: torch.Tensor, x: torch.Tensor) -> float:
    """||approx - x|| / ||x|| in float64."""
    x = x.double()
    return float((approx.double() - x).norm() / x.norm())
