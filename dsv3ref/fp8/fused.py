"""CPU fast path of the FP8 recipe (`dsv3ref.backends` kind "fp8_linear", name "fused"), checked bit for bit against
the reference quantizers of `quant.py` by the tests and the conformance suite.

Kernels: compiled with torch.compile (inductor generates C++ that a system compiler builds) over a flat tensor
whose consecutive 128 elements are one tile (the caller lays the tiles out so), reading it once. Flat inputs give
dynamo one symbolic length and no relations between dimensions to specialise on, so one build per input dtype covers
every shape; inductor keeps its builds on disk, so a later process mostly loads them, and
`compile_seconds()` reports what building cost in this process. Inputs under MIN_LENGTH elements run the same code
eagerly. The e4m3 rounding works on the fp32 bits so that it vectorises: round to nearest even at 3 mantissa bits,
a spacing of 2^-9 below 2^-6, |v| >= 464 saturating to 448 and NaN staying NaN, as torch's CPU cast does.

The FP8 linear's operands are fake-quantized fp32 tensors, x^ = e4m3(x / s) * s: the reference's
dequant(quant(x)) value for value (weights, quantized once per weight version, use the reference quantizer), and
its GEMM is one fp32 matmul of x^ and W^. That applies the scales to the operands instead of to each 128-wide
partial sum, which changes only the fp32 rounding of the sum (<= K 2^-24 of sum |products|, four orders of
magnitude below the e4m3 rounding emulated); the reference GEMM converts the FP8 data to fp32 element by element
instead, which on a CPU without FP8 vector instructions costs more than the matmul. `quant_1x128` and
`quant_128x128` are FP8-typed quantizers with the reference's signature (for the conformance suite and the
kernel benchmark).
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3ref import backends
from dsv3ref.fp8.quant import (
    BLOCK,
    FP8,
    FP8Error,
    ceil_pow2,
    check_input,
    dequant_128x128,
    scale_from_amax,
    scale_shape,
)
from dsv3ref.fp8.quant import quant_128x128 as reference_quant_128x128

_SIGN = -(1 << 31)  # the fp32 sign bit as an int32
_MAG = 0x7FFFFFFF
_INF = 0x7F800000
_NAN = 0x7FC00000
_BITS_448 = 0x43E00000  # the largest e4m3 value
_BITS_480 = 0x43F00000  # what |v| in [464, 480) rounds to at 3 mantissa bits: saturates to 448
_BITS_MIN_NORMAL = 121 << 23  # 2^-6, the smallest normal e4m3 value
_SUBNORMAL_SHIFT = 16384.0  # 2^14: its fp32 spacing is 2^-9, the e4m3 subnormal spacing
_BITS_SHIFT = 141 << 23  # the bits of 2^14
MIN_LENGTH = 4 * BLOCK  # shorter inputs run eagerly (the same code)
_COMPILE_SECONDS: dict[str, float] = {}


@functools.cache
def unavailable() -> str | None:
    """Why the compiled kernels cannot be built here (no C++ compiler for inductor), or None when they can."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler {compiler!r} on PATH for torch.compile (set CXX or install g++)"
    return None


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 v -> the fp32 value of v.to(float8_e4m3fn), computed on the bits (vectorisable)."""
    bits = v.view(torch.int32)
    mag = bits & _MAG
    clamped = mag.clamp(max=_BITS_480)  # keeps the rounding add below int32 overflow (Inf, NaN)
    normal = (clamped + (0x7FFFF + ((clamped >> 20) & 1))) & -(1 << 20)  # 3 mantissa bits, ties to even
    normal = torch.where(normal >= _BITS_480, _BITS_448, normal)
    small = ((mag.view(torch.float32) + _SUBNORMAL_SHIFT) - _SUBNORMAL_SHIFT).view(torch.int32)  # k * 2^-9
    out = torch.where(mag < _BITS_MIN_NORMAL, small, normal)
    return (torch.where(mag > _INF, _NAN, out) | (bits & _SIGN)).view(torch.float32)


def e4m3_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 v -> the bytes of v.to(float8_e4m3fn) as uint8, computed on the bits (vectorisable)."""
    bits = v.view(torch.int32)
    mag = bits & _MAG
    grid = round_to_e4m3(v).view(torch.int32) & _MAG
    normal = (grid >> 20) - (120 << 3)  # exponent rebiased from 127 to 7, 3 mantissa bits
    small = (mag.view(torch.float32) + _SUBNORMAL_SHIFT).view(torch.int32) - _BITS_SHIFT  # multiples of 2^-9
    code = torch.where(mag > _INF, 0x7F, torch.where(mag < _BITS_MIN_NORMAL, small, normal))
    return (code | ((bits >> 24) & 0x80)).to(torch.uint8)


def _fake_tiles(flat: torch.Tensor) -> torch.Tensor:
    """flat [L] (L a multiple of 128; tiles of 128 consecutive elements) -> e4m3(x / s) * s [L] fp32 per tile."""
    tiles = flat.float().view(-1, BLOCK)
    s = scale_from_amax(tiles.abs().amax(-1, keepdim=True))
    return (round_to_e4m3(tiles / s) * s).view(-1)


def _fake_columns(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] (T a multiple of 128) -> x fake-quantized in tiles of 128 consecutive rows of a column [T, K] fp32."""
    tiles = x.float().view(-1, BLOCK, x.shape[1])  # [T/128, 128, K]
    s = scale_from_amax(tiles.abs().amax(1, keepdim=True))
    return (round_to_e4m3(tiles / s) * s).view(x.shape)


def _quant_tiles(flat: torch.Tensor, ue8m0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """flat [L] -> e4m3 bytes [L] uint8 and scales [L/128] fp32 per tile; `ue8m0` a 0-d bool tensor (a tensor, not
    a Python flag, so that one build serves both scale formats)."""
    tiles = flat.float().view(-1, BLOCK)
    s = scale_from_amax(tiles.abs().amax(-1, keepdim=True))
    s = torch.where(ue8m0, ceil_pow2(s), s)
    return e4m3_bytes(tiles / s).view(-1), s.view(-1)


def _tile_amax(flat: torch.Tensor) -> torch.Tensor:
    """flat [L] -> amax per tile [L/128] fp32."""
    return flat.float().view(-1, BLOCK).abs().amax(-1)


def _quant_scaled(flat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """flat [L] and one scale per tile s [L/128] -> e4m3 bytes [L] uint8."""
    return e4m3_bytes(flat.float().view(-1, BLOCK) / s.unsqueeze(-1)).view(-1)


def _compiled(fn: Callable) -> Callable:
    """fn compiled (dynamic length, once per input dtype) on first use, for inputs of at least MIN_LENGTH elements
    (shorter ones run fn eagerly: dynamo would specialise a single tile, and a build costs far more than such an
    input takes); the first compiled call per dtype is timed into compile_seconds() (it includes one run, small
    beside the build)."""
    compiled: Callable | None = None

    def run(flat: torch.Tensor, *args: torch.Tensor):
        nonlocal compiled
        if flat.numel() < MIN_LENGTH:
            return fn(flat, *args)
        # detached: a view's base would add its own sizes (and their 0/1 specialisations) to the guards
        flat, args = flat.detach(), tuple(a.detach() for a in args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        key = f"{fn.__name__.lstrip('_')}/{str(flat.dtype).removeprefix('torch.')}"
        if key in _COMPILE_SECONDS:
            return compiled(flat, *args)
        start = time.perf_counter()
        out = compiled(flat, *args)
        _COMPILE_SECONDS[key] = time.perf_counter() - start
        return out

    return run


_fake_tiles_c = _compiled(_fake_tiles)
_fake_columns_c = _compiled(_fake_columns)
_quant_tiles_c = _compiled(_quant_tiles)
_tile_amax_c = _compiled(_tile_amax)
_quant_scaled_c = _compiled(_quant_scaled)


def compile_seconds() -> dict[str, float]:
    """Wall seconds of each kernel's first compiled call in this process (kernel/input dtype), i.e. its build."""
    return dict(_COMPILE_SECONDS)


def _check_cpu(x: torch.Tensor) -> None:
    if x.device.type != "cpu":
        raise FP8Error(f"x: the fused backend runs on the CPU, got a tensor on {x.device}")
    reason = unavailable()
    if reason:
        raise FP8Error(f"backend 'fused': {reason}")


def _rows_of_tiles(x: torch.Tensor) -> torch.Tensor:
    """x [R, K] -> [R * ceil(K/128) * 128] contiguous: its rows zero-padded to whole tiles (a view when aligned
    and contiguous)."""
    pad = -x.shape[-1] % BLOCK
    return (F.pad(x, (0, pad)) if pad else x).contiguous().view(-1)


def fake_quant_1x128(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> dequant_1x128(*quant_1x128(x)) [T, K] fp32, in one pass."""
    _check_cpu(x)
    t, k = x.shape
    return _fake_tiles_c(_rows_of_tiles(x)).view(t, -1)[:, :k]


def fake_quant_128x1(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> x^T [K, T] fake-quantized in 1x128 tiles along T, i.e.
    dequant_1x128(*quant_1x128_of_transpose(x)) fp32, as a transposed view of a [T, K] result. T is zero-padded to
    whole tiles, and to at least 2 of them, so that dynamo never sees a single tile (it would specialise)."""
    _check_cpu(x)
    t = x.shape[0]
    pad = max(t + -t % BLOCK, 2 * BLOCK) - t
    return _fake_columns_c((F.pad(x, (0, 0, 0, pad)) if pad else x).contiguous())[:t].mT


def fake_quant_128x128(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> dequant_128x128(*quant_128x128(w)) [N, K] fp32 (the reference's: once per weight version)."""
    return dequant_128x128(*reference_quant_128x128(w))


def quant_1x128(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled version of `quant.quant_1x128`: data [..., K] e4m3, scales [..., ceil(K/128)] fp32."""
    check_input(x, "x")
    _check_cpu(x)
    x2 = x.reshape(-1, x.shape[-1])  # [rows, K]
    q, s = _quant_tiles_c(_rows_of_tiles(x2), torch.tensor(ue8m0))
    q = q.view(x2.shape[0], -1)[:, : x.shape[-1]]
    return q.view(FP8).reshape(x.shape), s.view(scale_shape(x.shape, "1x128"))


def quant_128x128(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Compiled version of `quant.quant_128x128`: data [M, N] e4m3, scales [ceil(M/128), ceil(N/128)] fp32.
    Two passes over w: the amax of each 1x128 row tile, then (after the block maxima, a tiny tensor) the bytes."""
    check_input(w, "w", ndim=2)
    _check_cpu(w)
    m, n = w.shape
    flat = _rows_of_tiles(w)
    row_amax = _tile_amax_c(flat).view(m, -1)  # [M, Nb]
    block_amax = F.pad(row_amax, (0, 0, 0, -m % BLOCK)).view(-1, BLOCK, row_amax.shape[1]).amax(1)  # [Mb, Nb]
    s = scale_from_amax(block_amax, ue8m0)
    q = _quant_scaled_c(flat, s.repeat_interleave(BLOCK, dim=0)[:m].reshape(-1))
    return q.view(m, -1)[:, :n].view(FP8), s


@backends.register("fp8_linear", "fused")
class FusedFP8:
    """Operands are fake-quantized fp32 tensors (one compiled pass each); the GEMM is one fp32 matmul."""

    @staticmethod
    def act(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (fake_quant_1x128(x),)

    @staticmethod
    def act_t(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (fake_quant_128x1(x),)

    @staticmethod
    def weight(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (fake_quant_128x128(w),)

    @staticmethod
    def weight_t(w: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (w[0].mT,)

    @staticmethod
    def cached(a: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return a[0]

    @staticmethod
    def gemm(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], out_dtype: torch.dtype) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return (a[0] @ b[0].mT).to(out_dtype)
