"""LogFMT-nBit: code layout, the linear-space rounding bound, the range cap, and the comparison formats."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsv3ref.fp8 import logfmt
from dsv3ref.fp8.quant import FP8Error


@given(st.integers(1, 6), st.integers(1, 300), st.sampled_from([8, 10]), st.integers(0, 2**31 - 1))
def test_codes_and_rounding_bound(rows, k, n_bits, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen) * torch.exp(2 * torch.randn(rows, k, generator=gen))
    t = logfmt.logfmt_encode(x, n_bits)
    top = 2 ** (n_bits - 1) - 1
    index, sign = t.codes.long() & top, t.codes.long() >> (n_bits - 1)
    assert t.codes.shape == x.shape and t.lo.shape == (rows, math.ceil(k / 128))
    assert ((index >= 1) & (index <= top))[x != 0].all() and (sign == (x < 0).long()).all()
    tiles = torch.nn.functional.pad(x.abs(), (0, -k % 128)).unflatten(-1, (-1, 128))
    argmax = tiles.argmax(-1) + torch.arange(tiles.shape[-2]) * 128  # each tile's largest element maps to the top
    assert (index.gather(1, argmax) == top).all()
    # nearest of the two neighbouring codes in linear space: error <= half their gap <= |x| (e^step - 1) / 2,
    # a bound valid while the range is not capped (|x| spans far less than 2^32 here); fp32 slack 1e-6
    y = logfmt.logfmt_decode(t, torch.float64)
    step = t.step.double().repeat_interleave(128, dim=-1)[:, :k]
    assert ((y - x.double()).abs() <= x.double().abs() * (torch.expm1(step) / 2 + 1e-6)).all()


def test_zero_min_and_max_codes():
    x = torch.zeros(2, 130)
    x[0, :4] = torch.tensor([0.5, -2.0, 8.0, 0.0])
    t = logfmt.logfmt_encode(x, 8)
    assert t.codes[0, :4].tolist() == [1, 128 | 64, 127, 0]  # min -> 1, max -> 127, zero -> 0, sign bit 128
    assert (t.codes[1] == 0).all() and (logfmt.logfmt_decode(t)[1] == 0).all()
    y = logfmt.logfmt_decode(t, torch.float64)
    assert y[0, 0].item() == pytest.approx(0.5, rel=1e-6) and y[0, 2].item() == pytest.approx(8.0, rel=1e-6)


def test_range_is_capped_at_2_to_the_32():
    x = torch.tensor([[1.0, 2.0**-40, 0.9 * 2.0**-33, 0.75 * 2.0**-32]])
    t = logfmt.logfmt_encode(x, 8)
    assert t.lo.item() == pytest.approx(-32 * math.log(2), rel=1e-6)
    assert t.codes[0].tolist()[:3] == [127, 0, 0]  # below half of exp(lo) = 2^-32: zero
    assert t.codes[0, 3].item() == 1  # above half of exp(lo): the smallest code


def test_logfmt8_beats_e4m3_and_e5m2_on_activation_like_data():
    # The paper's validation claim (Insights §3.2), on our synthetic activations at a fixed seed.
    x = logfmt.activation_like(256, 1024, seed=0)
    err = {f: logfmt.rel_rms_error(logfmt.roundtrip(x, f), x) for f in logfmt.FORMATS}
    assert err["logfmt-8"] < err["e4m3"] < err["e5m2"]
    assert err["bf16"] < err["logfmt-10"] < err["logfmt-8"]


def test_bad_arguments():
    with pytest.raises(FP8Error, match="^n_bits"):
        logfmt.logfmt_encode(torch.ones(2, 4), 2)
    with pytest.raises(FP8Error, match="^x: expected finite values"):
        logfmt.logfmt_encode(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(FP8Error, match="^fmt"):
        logfmt.roundtrip(torch.ones(2, 4), "logfmt-9")
