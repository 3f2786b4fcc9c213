"""FP8 conformance cases: activations, weights and GEMM operands whose tiles (1x128) or blocks (128x128) each have
their own magnitude, built from a few drawn values (a frozen spec prints as the call that rebuilds it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPORTS = ("import torch", "from harness.cases.fp8 import Activation, GemmOperands, Weight")


def _magnitudes(gen: torch.Generator, rows: int, cols: int, tile_rows: int, low: float, high: float) -> torch.Tensor:
    """[rows, cols] of 10^U(low, high), one value per tile_rows x 128 tile."""
    exponents = torch.empty(math.ceil(rows / tile_rows), math.ceil(cols / 128)).uniform_(low, high, generator=gen)
    return (10 ** exponents).repeat_interleave(tile_rows, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


@dataclass(frozen=True)
class Activation:
    """x [rows, k] in `dtype`: every 1x128 tile N(0, 1) times its own magnitude 10^U(-6, 6); zero_tiles zeroes the
    first column of tiles (all-zero tiles)."""

    rows: int
    k: int
    seed: int
    dtype: str = "fp32"
    zero_tiles: bool = False

    def build(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        scale = _magnitudes(gen, self.rows, self.k, 1, -6, 6)
        x = torch.randn(self.rows, self.k, generator=gen) * scale
        if self.zero_tiles:
            x[:, : min(self.k, 128)] = 0
        return x.to(DTYPES[self.dtype])


@dataclass(frozen=True)
class Weight:
    """w [m, n] in `dtype`: every 128x128 block N(0, 1) times its own magnitude 10^U(-6, 6); zero_block zeroes the
    first block."""

    m: int
    n: int
    seed: int
    dtype: str = "fp32"
    zero_block: bool = False

    def build(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        w = torch.randn(self.m, self.n, generator=gen) * _magnitudes(gen, self.m, self.n, 128, -6, 6)
        if self.zero_block:
            w[:128, :128] = 0
        return w.to(DTYPES[self.dtype])


@dataclass(frozen=True)
class GemmOperands:
    """A [m, k] with a magnitude 10^U(-3, 3) per 1x128 tile and B [n, k] with one per 128x128 block (per 1x128
    tile when row_b, the weight-gradient layout), fp32: a scale applied to the wrong block is seen."""

    m: int
    n: int
    k: int
    seed: int
    row_b: bool = False

    def build(self) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        a = torch.randn(self.m, self.k, generator=gen) * _magnitudes(gen, self.m, self.k, 1, -3, 3)
        b_tiles = 1 if self.row_b else 128
        b = torch.randn(self.n, self.k, generator=gen) * _magnitudes(gen, self.n, self.k, b_tiles, -3, 3)
        return a, b
