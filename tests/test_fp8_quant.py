"""dsv3ref.fp8 internals: power-of-two rounding, scale shapes, transposes and the reference GEMM."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.fp8 import gemm, quant
from dsv3ref.fp8.quant import FP8, FP8Error


def test_ceil_pow2_on_the_bits():
    # 2^-20 (1 + 2^-23) must go up to 2^-19: fp32 log2 of it rounds onto -20 and a log-based ceil would not.
    s = torch.tensor([2.0**-20 * (1 + 2**-23), 2.0**-20, 3.0, 0.75, float("inf"), float("nan")])
    out = quant.ceil_pow2(s)
    assert out[:4].tolist() == [2.0**-19, 2.0**-20, 4.0, 1.0]
    assert out[4] == float("inf") and out[5].isnan()


def test_scale_from_amax_clamps_and_keeps_nan():
    amax = torch.tensor([0.0, 1e-5, 448.0, float("nan")])
    s = quant.scale_from_amax(amax)
    clamped = (torch.tensor(1e-4) / 448.0).item()  # the fp32 division
    assert s[:3].tolist() == [clamped, clamped, 1.0]
    assert s[3].isnan()


def test_leading_dims_and_empty_rows():
    x = torch.randn(2, 3, 300)
    q, s = quant.quant_1x128(x)
    assert q.shape == (2, 3, 300) and s.shape == (2, 3, 3) and q.dtype == FP8 and s.dtype == torch.float32
    q0, s0 = quant.quant_1x128(torch.zeros(0, 300))
    assert q0.shape == (0, 300) and s0.shape == (0, 3)
    assert quant.dequant_1x128(q0, s0).shape == (0, 300)


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_transpose_helpers(m, n, seed):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    q, s = quant.quant_128x128(w)
    qt, st_ = quant.transpose_128x128(q, s)
    eq, es = quant.quant_128x128(w.mT.contiguous())
    assert torch.equal(qt.view(torch.uint8), eq.view(torch.uint8)) and torch.equal(st_, es)
    qc, sc = quant.quant_1x128_of_transpose(w)
    er, esr = quant.quant_1x128(w.mT.contiguous())
    assert torch.equal(qc.view(torch.uint8), er.view(torch.uint8)) and torch.equal(sc, esr)
    assert qc.shape == (n, m) and sc.shape == (n, (m + 127) // 128)


def test_bad_arguments_name_themselves():
    with pytest.raises(FP8Error, match="^x: expected a float32, bfloat16 or float16 tensor"):
        quant.quant_1x128(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(FP8Error, match="^w: expected a 2-D tensor"):
        quant.quant_128x128(torch.zeros(2, 3, 4))
    with pytest.raises(FP8Error, match="^x: expected a last dimension >= 1"):
        quant.quant_1x128(torch.zeros(3, 0))
    q, s = quant.quant_1x128(torch.randn(2, 200))
    with pytest.raises(FP8Error, match=r"^s: expected shape \(2, 2\)"):
        quant.dequant_1x128(q, s[:, :1])
    with pytest.raises(FP8Error, match="^q: expected a torch.float8_e4m3fn tensor"):
        quant.dequant_1x128(q.float(), s)
    with pytest.raises(FP8Error, match="^layout"):
        quant.scale_shape((2, 3), "2x2")


def test_gemm_is_exact_when_every_sum_is():
    # Power-of-two scales (UE8M0) and small integers: every product and partial sum is exact in fp32, so the
    # reference equals the fp64 product of the dequantized operands bit for bit.
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 9, (5, 300), generator=gen).float()
    b = torch.randint(-8, 9, (7, 300), generator=gen).float()
    qa, sa = quant.quant_1x128(a, ue8m0=True)
    for qb, sb in (quant.quant_128x128(b, ue8m0=True), quant.quant_1x128(b, ue8m0=True)):
        c = gemm.fp8_gemm(qa, sa, qb, sb, torch.float32)
        exact = quant.dequant_1x128(qa, sa).double() @ (
            quant.dequant_1x128(qb, sb) if sb.shape[0] == 7 else quant.dequant_128x128(qb, sb)).double().mT
        assert torch.equal(c.double(), exact)


def test_gemm_argument_errors():
    qa, sa = quant.quant_1x128(torch.randn(4, 256))
    qb, sb = quant.quant_128x128(torch.randn(130, 256))
    assert gemm.fp8_gemm(qa, sa, qb, sb).shape == (4, 130)
    with pytest.raises(FP8Error, match="^b_s: expected shape"):
        gemm.fp8_gemm(qa, sa, qb, sb[:1])
    with pytest.raises(FP8Error, match="^out_dtype"):
        gemm.fp8_gemm(qa, sa, qb, sb, torch.int32)
    with pytest.raises(FP8Error, match="^b: expected 256 columns"):
        gemm.fp8_gemm(qa, sa, qb[:, :100], sb)
