"""Broken MLA layers: the reference (dsv3ref.mla.MLA, naive or absorbed mode) with one mistake."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dsv3ref.config import ModelConfig
from dsv3ref.kv_cache import LatentCache
from dsv3ref.mla import MLA
from dsv3ref.rope import Rotary
from harness.adapters.mla import ReferenceMLA


class WrongSoftmaxScale(ReferenceMLA):
    """Scores scaled by qk_head_dim^-0.5 alone: YaRN's mscale^2 forgotten."""

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: str = "cpu") -> MLA:
        layer = super().build(cfg, state_dict, dtype, device)
        layer.softmax_scale = cfg.attention.qk_head_dim ** -0.5
        return layer


def wrong_softmax_scale() -> WrongSoftmaxScale:
    return WrongSoftmaxScale("absorbed")


class HalfRopeLayout(ReferenceMLA):
    """RoPE applied in the rotate_half layout to the official interleaved weights."""

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: str = "cpu") -> MLA:
        layer = super().build(cfg, state_dict, dtype, device)
        layer.rotary = Rotary(cfg, "half").to(device)
        return layer


def half_rope_layout() -> HalfRopeLayout:
    return HalfRopeLayout("absorbed")


class IgnoresBlockTable(ReferenceMLA):
    """A paged cache that places blocks consecutively, whatever block table it is given (on write and read)."""

    def new_cache(self, layer: MLA, batch: int, max_len: int, **options: Any) -> Any:
        if options.get("paged"):
            options = dict(options, block_table=None)
        return layer.new_cache(batch, max_len, **options)


def paged_ignores_block_table() -> IgnoresBlockTable:
    return IgnoresBlockTable("absorbed")


class _Bf16Accumulation(TorchFunctionMode):
    """Every bf16 matmul contracting `width` elements accumulates in bf16 (fp32 products, bf16 running sum)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("matmul", "__matmul__") and len(args) == 2:
            a, b = args
            if a.dtype == torch.bfloat16 and a.dim() == 2 and b.dim() == 2 and a.shape[1] == self.width:
                acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
                for k in range(self.width):
                    acc = (acc.float() + a[:, k, None].float() * b[None, k, :].float()).bfloat16()
                return acc
        return func(*args, **kwargs)


class _Accumulating(nn.Module):
    def __init__(self, layer: MLA, width: int) -> None:
        super().__init__()
        self.layer, self.width = layer, width

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with _Bf16Accumulation(self.width):
            return self.layer(*args, **kwargs)


class Bf16ScoreAccumulation(ReferenceMLA):
    """The naive layer whose q.k scores accumulate in bf16 (in bf16 runs)."""

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: str = "cpu") -> nn.Module:
        return _Accumulating(super().build(cfg, state_dict, dtype, device), cfg.attention.qk_head_dim)

    def new_cache(self, layer: nn.Module, batch: int, max_len: int, **options: Any) -> Any:
        return super().new_cache(layer.layer, batch, max_len, **options)


def bf16_score_accumulation() -> Bf16ScoreAccumulation:
    return Bf16ScoreAccumulation("naive")


class _ForgetsFirstToken(LatentCache):
    """A latent cache whose reads return the row's first token zeroed (an evicted slot read as empty)."""

    def row(self, b: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv, pe = (t.clone() for t in super().row(b, keys))
        if keys > 1:
            kv[0], pe[0] = 0, 0
        return kv, pe


class Bf16OnlyForgetfulCache(ReferenceMLA):
    """A bf16-only layer (float64 rejected, `fp64_exact` declared not applicable) whose cache loses each row's
    first token: only a cache test run in the working dtype can see it."""

    def __init__(self) -> None:
        super().__init__("absorbed")
        self.not_applicable = {"fp64_exact": "bf16 only", "paged_cache": "no paged cache", "fp8_cache": "none"}

    def build(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
              device: str = "cpu") -> MLA:
        if dtype != torch.bfloat16:
            raise ValueError(f"dtype: this kernel runs bfloat16 only, got {dtype}")
        return super().build(cfg, state_dict, dtype, device)

    def new_cache(self, layer: MLA, batch: int, max_len: int, **options: Any) -> Any:
        a = layer.cfg.attention
        return _ForgetsFirstToken(batch, max_len, a.kv_lora_rank, a.qk_rope_head_dim, torch.bfloat16,
                                  layer.kv_norm.weight.device)


def bf16_only_forgetful_cache() -> Bf16OnlyForgetfulCache:
    return Bf16OnlyForgetfulCache()
