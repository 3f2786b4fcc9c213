"""The working dtype of measured benchmarks: from the probed throughputs, or pinned by DSV3_WORKING_DTYPE."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dsv3ref.config import ConfigError
from hardware.profile import load_profile
from harness.bench.common import PIN_VARIABLE, working_dtype

H800 = load_profile("h800")


@pytest.mark.parametrize(("bf16", "fp32", "dtype"), [(0.4, 1.0, torch.float32), (0.5, 1.0, torch.bfloat16),
                                                     (0.1, None, torch.bfloat16)])
def test_the_probe_decides_unless_pinned(monkeypatch, bf16, fp32, dtype):
    local = dataclasses.replace(H800, bf16_dense_TFLOPS=bf16, fp32_dense_TFLOPS=fp32)
    monkeypatch.delenv(PIN_VARIABLE, raising=False)
    assert working_dtype(local) == dtype
    for name, pinned in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        monkeypatch.setenv(PIN_VARIABLE, name)
        assert working_dtype(local) == pinned


def test_a_bad_pin_is_named(monkeypatch):
    monkeypatch.setenv(PIN_VARIABLE, "fp16")
    with pytest.raises(ConfigError, match="DSV3_WORKING_DTYPE: expected one of bf16, fp32, got 'fp16'"):
        working_dtype(H800)
