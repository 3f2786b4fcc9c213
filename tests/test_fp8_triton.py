"""The Triton kernels (the interpreter on the CPU) against the torch reference, bit for bit.

Importing dsv3ref.fp8.triton_kernels first in a process without CUDA selects the Triton interpreter; the tests
skip with the module's reason when that is impossible (triton imported earlier without TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3ref.fp8 import gemm, quant

triton_kernels = pytest.importorskip("dsv3ref.fp8.triton_kernels", reason="triton is not installed")
pytestmark = pytest.mark.skipif(triton_kernels.unavailable() is not None,
                                reason=triton_kernels.unavailable() or "")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float8_e4m3fn: torch.uint8, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


def test_grid_rounding_matches_torch_cast_on_every_e4m3_boundary():
    # amax 448 fixes the scale at 1, so q is the cast of each value. Every midpoint between neighbouring e4m3
    # values (ties: to even), and the fp32 values one ulp either side of it, must cast as torch casts.
    grid = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (grid[:-1] + grid[1:]) / 2
    values = torch.cat([mid, torch.nextafter(mid, torch.zeros(1)), torch.nextafter(mid, torch.full((1,), 1e9))])
    values = torch.cat([values, -values])
    x = torch.zeros(values.numel() // 127 + 1, 128)
    x.view(-1)[:values.numel()] = values
    x[:, 127] = 448.0
    q, s = triton_kernels.quant_1x128(x)
    assert (s == 1).all()
    assert torch.equal(bits(q), bits(x.to(torch.float8_e4m3fn)))


@settings(max_examples=10)  # the interpreter: about a second per example
@given(st.integers(1, 70), st.integers(1, 300), st.booleans(), st.sampled_from([torch.float32, torch.bfloat16,
                                                                                 torch.float16]),
       st.integers(0, 2**31 - 1))
def test_quantizers_and_dequantizers_bitwise(rows, k, ue8m0, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=gen) * 10 ** torch.empty(rows, 1).uniform_(-4, 4, generator=gen)).to(dtype)
    for torch_quant, triton_quant in ((quant.quant_1x128, triton_kernels.quant_1x128),
                                      (quant.quant_128x128, triton_kernels.quant_128x128)):
        q0, s0 = torch_quant(x, ue8m0)
        q1, s1 = triton_quant(x, ue8m0)
        assert torch.equal(bits(q0), bits(q1)) and torch.equal(bits(s0), bits(s1))
    q, s = quant.quant_1x128(x, ue8m0)
    qb, sb = quant.quant_128x128(x, ue8m0)
    for out in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(bits(quant.dequant_1x128(q, s, out)), bits(triton_kernels.dequant_1x128(q, s, out)))
        assert torch.equal(bits(quant.dequant_128x128(qb, sb, out)),
                           bits(triton_kernels.dequant_128x128(qb, sb, out)))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy in the interpreter
def test_three_dimensional_input_and_nonfinite_tiles():
    x = torch.randn(2, 3, 300)
    x[0, 1, 5], x[1, 2, 260] = float("nan"), float("inf")
    q0, s0 = quant.quant_1x128(x)
    q1, s1 = triton_kernels.quant_1x128(x)
    assert q1.shape == x.shape and s1.shape == (2, 3, 3)
    assert torch.equal(s0.isnan(), s1.isnan()) and torch.equal(s0.nan_to_num(), s1.nan_to_num())
    assert torch.equal(q0.float().isnan(), q1.float().isnan())
    assert torch.equal(q0.float().nan_to_num(), q1.float().nan_to_num())
    d0, d1 = quant.dequant_1x128(q0, s0), triton_kernels.dequant_1x128(q1, s1)
    assert torch.equal(d0.isnan(), d1.isnan()) and torch.equal(d0.nan_to_num(), d1.nan_to_num())


@pytest.mark.parametrize("row_scaled_b", [False, True])
def test_gemm_against_the_reference(row_scaled_b):
    # Accumulation order may differ, so the flash-attention rule: the kernel's error against the fp64 product of
    # the dequantized operands is at most 2x the reference's (plus one fp32 ulp of the output).
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, 700, generator=gen), torch.randn(150, 700, generator=gen)
    qa, sa = quant.quant_1x128(a)
    qb, sb = quant.quant_1x128(b) if row_scaled_b else quant.quant_128x128(b)
    db = quant.dequant_1x128(qb, sb) if row_scaled_b else quant.dequant_128x128(qb, sb)
    truth = quant.dequant_1x128(qa, sa).double() @ db.double().mT
    ref = gemm.fp8_gemm(qa, sa, qb, sb, torch.float32).double()
    out = triton_kernels.fp8_gemm(qa, sa, qb, sb, torch.float32).double()
    assert (out - truth).abs().max() <= 2 * (ref - truth).abs().max() + 2**-23 * truth.abs().max()
    out_bf16 = triton_kernels.fp8_gemm(qa, sa, qb, sb, torch.bfloat16)
    assert torch.equal(bits(out_bf16), bits(out.float().bfloat16()))  # round to nearest even, as on a GPU


def test_errors_are_the_reference_errors():
    with pytest.raises(quant.FP8Error, match="^x: expected a float32"):
        triton_kernels.quant_1x128(torch.zeros(2, 4, dtype=torch.int32))
    q, s = quant.quant_1x128(torch.randn(2, 200))
    with pytest.raises(quant.FP8Error, match="^s: expected shape"):
        triton_kernels.dequant_1x128(q, s[:, :1])
    with pytest.raises(quant.FP8Error, match="^dtype"):
        triton_kernels.dequant_1x128(q, s, torch.int32)
