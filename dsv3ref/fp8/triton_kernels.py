"""Triton kernels for the FP8 quantizers, the dequantizer and the block-scaled GEMM; bit-exact with `quant.py`.

They run natively on CUDA and, on a machine without CUDA, through the Triton interpreter. Triton decides this
when it is imported (its standard-library functions are built then), so TRITON_INTERPRET=1 must be set before
the first `import triton`: this module sets it itself when it is that first import on a machine without CUDA.
If something imported triton earlier without it, `unavailable()` says so and the kernels refuse to run; set
TRITON_INTERPRET=1 in the environment (or import this module first).

FP8 downcast trap: the interpreter's fp32 -> e4m3 cast rounds ties away from zero and can drop a mantissa carry,
and sm_89 double-rounds through fp16. The kernels therefore round onto the e4m3 grid in fp32 first (round to
nearest even, subnormal spacing 2^-9), after which every cast is exact. Divisions use `div_rn` (IEEE), because
Triton's `/` on fp32 is an approximate division on CUDA.
"""

from __future__ import annotations

import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv3ref.fp8.gemm import check_gemm_args  # noqa: E402
from dsv3ref.fp8.quant import BLOCK, FP8, FP8Error, check_input, check_quantized, scale_shape  # noqa: E402

INTERPRETED = bool(triton.knobs.runtime.interpret)


class TritonUnavailable(RuntimeError):
    """The Triton kernels cannot run in this process; the message says why and what to do."""


def unavailable() -> str | None:
    """Why the Triton kernels cannot run here, or None when they can."""
    if INTERPRETED or torch.cuda.is_available():
        return None
    return ("triton was imported without TRITON_INTERPRET=1 and there is no CUDA device; set TRITON_INTERPRET=1 "
            "in the environment to run the Triton kernels on the CPU through the interpreter")


def _check_device(*tensors: torch.Tensor) -> None:
    reason = unavailable()
    if reason:
        raise TritonUnavailable(reason)
    if not INTERPRETED and any(t.device.type != "cuda" for t in tensors):
        raise FP8Error("x: expected CUDA tensors for the native Triton kernels (set TRITON_INTERPRET=1 to run "
                       "them on CPU tensors through the interpreter)")


@triton.jit
def _round_to_e4m3_grid(v):
    """Round fp32 to the nearest e4m3 value (ties to even): add and subtract 2^(q+23), q = log2 of the spacing."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    exponent = (mag >> 23).to(tl.int32) - 127
    spacing_log2 = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2^-6 are spaced 2^-9
    magic = ((spacing_log2 + 150).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    a = mag.to(tl.float32, bitcast=True)
    rounded = (a + magic) - magic
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_bf16_grid(v):
    """Round fp32 to the nearest bf16 value (ties to even) on the bits; the interpreter's own cast does not."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(v != v, v, rounded)


@triton.jit
def _to_e4m3_bits(v):
    """e4m3fn bytes of fp32 `v`: round onto the grid, cast (now exact), and write NaN as 0x7F | sign, as torch
    does (the interpreter's cast turns NaN into +-384)."""
    rounded = _round_to_e4m3_grid(v)
    bits = rounded.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    sign = ((v.to(tl.uint32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
    return tl.where(v != v, sign | 0x7F, bits)


@triton.jit
def _from_e4m3_bits(b):
    """fp32 value of e4m3fn bytes, with 0x7F/0xFF as NaN (the interpreter's cast decodes them as +-480)."""
    v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _amax(x, axis):
    """max |x| over `axis`, NaN if any element is NaN (tl.max alone may drop NaN on GPUs)."""
    a = tl.max(tl.abs(x), axis=axis)
    has_nan = tl.max((x != x).to(tl.int32), axis=axis) > 0
    return tl.where(has_nan, float("nan"), a)


@triton.jit
def _scale(amax, UE8M0: tl.constexpr):
    """max(amax, 1e-4) / 448, optionally rounded up to a power of two on the bits; NaN and Inf pass through."""
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)
    s = tl.where(amax != amax, amax, s)
    if UE8M0:
        bits = s.to(tl.uint32, bitcast=True)
        up = tl.where((bits & 0x7FFFFF) != 0, (bits & 0x7F800000) + 0x800000, bits)
        s = tl.where((bits & 0x7F800000) != 0x7F800000, up.to(tl.float32, bitcast=True), s)
    return s


@triton.jit
def _quant_1x128_kernel(x_ptr, q_ptr, s_ptr, rows, k, groups, UE8M0: tl.constexpr, BLOCK_M: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (r[:, None] < rows) & (c[None, :] < k)
    offs = r[:, None].to(tl.int64) * k + c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(x, 1), UE8M0)
    tl.store(q_ptr + offs, _to_e4m3_bits(tl.math.div_rn(x, s[:, None])), mask=mask)
    tl.store(s_ptr + r.to(tl.int64) * groups + tl.program_id(1), s, mask=r < rows)


@triton.jit
def _quant_128x128_kernel(w_ptr, q_ptr, s_ptr, m, n, col_blocks, UE8M0: tl.constexpr):
    r = tl.program_id(0) * 128 + tl.arange(0, 128)
    c = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (r[:, None] < m) & (c[None, :] < n)
    offs = r[:, None].to(tl.int64) * n + c[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _scale(_amax(w, None), UE8M0)
    tl.store(q_ptr + offs, _to_e4m3_bits(tl.math.div_rn(w, s)), mask=mask)
    tl.store(s_ptr + tl.program_id(0) * col_blocks + tl.program_id(1), s)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, y_ptr, rows, k, groups, ROWS_PER_SCALE: tl.constexpr, ROUND_BF16: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * 128 + tl.arange(0, 128)
    mask = (r[:, None] < rows) & (c[None, :] < k)
    offs = r[:, None].to(tl.int64) * k + c[None, :]
    q = _from_e4m3_bits(tl.load(q_ptr + offs, mask=mask, other=0))
    s = tl.load(s_ptr + (r // ROWS_PER_SCALE).to(tl.int64) * groups + tl.program_id(1), mask=r < rows, other=1.0)
    y = q * s[:, None]
    if ROUND_BF16:
        y = _round_to_bf16_grid(y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, m, n, k, k_blocks, B_ROW_SCALES: tl.constexpr,
                 UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 128)
    b_scale_rows = rn if B_ROW_SCALES else rn // 128
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, k_blocks):
        ck = kb * 128 + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * k + ck[None, :],
                    mask=(rm[:, None] < m) & (ck[None, :] < k), other=0.0)
        b = tl.load(b_ptr + rn[:, None].to(tl.int64) * k + ck[None, :],
                    mask=(rn[:, None] < n) & (ck[None, :] < k), other=0.0)
        if UPCAST:  # GPUs without FP8 tensor cores: e4m3 is exact in bf16
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        partial = tl.dot(a, tl.trans(b), out_dtype=tl.float32)
        a_s = tl.load(as_ptr + rm.to(tl.int64) * k_blocks + kb, mask=rm < m, other=0.0)
        b_s = tl.load(bs_ptr + b_scale_rows.to(tl.int64) * k_blocks + kb, mask=rn < n, other=0.0)
        acc += partial * a_s[:, None] * b_s[None, :]
    if ROUND_BF16:
        acc = _round_to_bf16_grid(acc)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * n + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < m) & (rn[None, :] < n))


def _rows_per_program(rows: int) -> int:
    """Rows per program: small tiles on GPUs (many programs), large ones in the interpreter (few numpy calls)."""
    cap = 128 if INTERPRETED else 32
    return max(16, min(cap, triton.next_power_of_2(max(rows, 1))))


def quant_1x128(x: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quant.quant_1x128`: data [..., K] e4m3, scales [..., ceil(K/128)] fp32."""
    check_input(x, "x")
    _check_device(x)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [rows, K]
    rows, groups = x2.shape[0], triton.cdiv(k, BLOCK)
    q = torch.empty(rows, k, dtype=FP8, device=x.device)
    s = torch.empty(rows, groups, dtype=torch.float32, device=x.device)
    if rows:
        block_m = _rows_per_program(rows)
        grid = (triton.cdiv(rows, block_m), groups)
        _quant_1x128_kernel[grid](x2, q.view(torch.uint8), s, rows, k, groups, UE8M0=ue8m0, BLOCK_M=block_m)
    return q.view(x.shape), s.view(scale_shape(x.shape, "1x128"))


def quant_128x128(w: torch.Tensor, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quant.quant_128x128`: data [M, N] e4m3, scales [ceil(M/128), ceil(N/128)] fp32."""
    check_input(w, "w", ndim=2)
    _check_device(w)
    w = w.contiguous()
    m, n = w.shape
    mb, nb = scale_shape(w.shape, "128x128")
    q = torch.empty(m, n, dtype=FP8, device=w.device)
    s = torch.empty(mb, nb, dtype=torch.float32, device=w.device)
    if m:
        _quant_128x128_kernel[(mb, nb)](w, q.view(torch.uint8), s, m, n, nb, UE8M0=ue8m0)
    return q, s


def _dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, rows_per_scale: int) -> torch.Tensor:
    _check_device(q, s)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise FP8Error(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    k = q.shape[-1]
    q2, s2 = q.reshape(-1, k).contiguous(), s.reshape(-1, s.shape[-1]).contiguous()
    rows, groups = q2.shape[0], s2.shape[-1]
    y = torch.empty(rows, k, dtype=dtype, device=q.device)
    if rows:
        block_m = _rows_per_program(rows)  # scales are loaded per row, so any tile height works
        grid = (triton.cdiv(rows, block_m), groups)
        _dequant_kernel[grid](q2.view(torch.uint8), s2, y, rows, k, groups, ROWS_PER_SCALE=rows_per_scale,
                              ROUND_BF16=dtype == torch.bfloat16, BLOCK_M=block_m)
    return y.view(q.shape)


def dequant_1x128(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton version of `quant.dequant_1x128`."""
    check_quantized(q, s, "1x128")
    return _dequant(q, s, dtype, 1)


def dequant_128x128(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton version of `quant.dequant_128x128`."""
    check_quantized(q, s, "128x128")
    return _dequant(q, s, dtype, BLOCK)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Triton version of `gemm.fp8_gemm`: C = A B^T with fp32 accumulation and per-128-K-block scales."""
    row_scales = check_gemm_args(a, a_s, b, b_s, out_dtype)
    _check_device(a, a_s, b, b_s)
    (m, k), n = a.shape, b.shape[0]
    a, b, a_s, b_s = a.contiguous(), b.contiguous(), a_s.contiguous(), b_s.contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    upcast = not INTERPRETED and torch.cuda.get_device_capability(a.device) < (8, 9)
    block_m, block_n = max(16, min(64, triton.next_power_of_2(m))), 128 if INTERPRETED else 64
    if m and n:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _gemm_kernel[grid](a, a_s, b, b_s, c, m, n, k, triton.cdiv(k, BLOCK), B_ROW_SCALES=row_scales,
                           UPCAST=upcast, ROUND_BF16=out_dtype == torch.bfloat16, BLOCK_M=block_m,
                           BLOCK_N=block_n)
    return c
