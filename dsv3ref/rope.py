"""Rotary position embedding: base frequencies, YaRN and Llama-3 scaling, the softmax-scale correction, both layouts.

Frequencies follow the official DeepSeek-V3 code: f_i = theta^(-2i/d); YaRN (only when the context exceeds the
original length, `ModelConfig.yarn_active`) divides the low frequencies by `factor` with a linear ramp between the
beta_fast and beta_slow correction dimensions, and multiplies the softmax scale by mscale^2. Angles are computed in
float64 (the official code and Hugging Face use float32, which is off by up to ~1e-2 rad at position 1e5).

Layouts of a rotated d-vector:
- "interleaved": adjacent pairs (x[2j], x[2j+1]) are complex numbers (official code, checkpoint layout);
- "half": the pairs are (x[j], x[j + d/2]), rotated with rotate_half (Hugging Face's usual layout).
`to_half_layout` / `to_interleaved_layout` convert vectors (or weight rows) between them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig

LAYOUTS = ("interleaved", "half")


def rope_dim(cfg: ModelConfig) -> int:
    """How many dimensions of a query/key head are rotated: qk_rope_head_dim for MLA, head_dim otherwise."""
    a = cfg.attention
    return a.qk_rope_head_dim if a.kind == "mla" else a.head_dim


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (as the official code, no clamp)."""
    return 0.1 * mscale * math.log(factor) + 1.0


def _check_mscale(cfg: ModelConfig) -> None:
    r = cfg.rope
    if r.kind == "yarn" and r.mscale != r.mscale_all_dim:
        raise ConfigError(f"rope.mscale: the reference follows the official code, which has one mscale; expected "
                          f"rope.mscale == rope.mscale_all_dim, got {r.mscale} and {r.mscale_all_dim}")


def _correction_dim(num_rotations: float, dim: int, theta: float, original_len: int) -> float:
    """The (fractional) rotary index whose wavelength fits `num_rotations` times into the original context."""
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_range(cfg: ModelConfig) -> tuple[int, int]:
    """YaRN's ramp bounds (low, high) over rotary pair indices: 10 and 23 for DeepSeek-V3."""
    r, d = cfg.rope, rope_dim(cfg)
    low = math.floor(_correction_dim(r.beta_fast, d, r.theta, r.original_max_position_embeddings))
    high = math.ceil(_correction_dim(r.beta_slow, d, r.theta, r.original_max_position_embeddings))
    return max(low, 0), min(high, d - 1)


def _yarn(freqs: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    low, high = yarn_range(cfg)
    span = high - low if high != low else 0.001
    ramp = ((torch.arange(freqs.numel(), dtype=torch.float64, device=freqs.device) - low) / span).clamp(0, 1)
    return freqs / cfg.rope.factor * ramp + freqs * (1 - ramp)


def _llama3(freqs: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama-3.1 scaling: long wavelengths divided by factor, short kept, a smooth blend in between."""
    r = cfg.rope
    wavelen = 2 * math.pi / freqs
    low_wavelen = r.original_max_position_embeddings / r.low_freq_factor
    high_wavelen = r.original_max_position_embeddings / r.high_freq_factor
    smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor) / (
        r.high_freq_factor - r.low_freq_factor)
    blended = (1 - smooth) * freqs / r.factor + smooth * freqs
    scaled = torch.where(wavelen > low_wavelen, freqs / r.factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, scaled)


def rope_frequencies(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-pair angular frequencies [rope_dim / 2] in float64, with YaRN (when active) or Llama-3 scaling."""
    _check_mscale(cfg)
    d = rope_dim(cfg)
    if cfg.rope.kind == "llama3" and cfg.rope.high_freq_factor <= cfg.rope.low_freq_factor:
        raise ConfigError(f"rope.high_freq_factor: expected > rope.low_freq_factor {cfg.rope.low_freq_factor}, "
                          f"got {cfg.rope.high_freq_factor}")
    freqs = cfg.rope.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    if cfg.yarn_active:
        return _yarn(freqs, cfg)
    if cfg.rope.kind == "llama3":
        return _llama3(freqs, cfg)
    return freqs


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 when YaRN is active (0.1352338 for deepseek-v3-671b).

    The official code's single `mscale` is Hugging Face's `mscale_all_dim` (equal to `mscale` in every DeepSeek
    config; configs where they differ are rejected).
    """
    _check_mscale(cfg)
    scale = cfg.attention.qk_head_dim ** -0.5
    if cfg.yarn_active:
        scale *= yarn_mscale(cfg.rope.factor, cfg.rope.mscale_all_dim) ** 2
    return scale


def rope_table(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of t * f_i for t < max_seq_len: two float64 tensors [max_seq_len, rope_dim / 2]."""
    freqs = rope_frequencies(cfg, device)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64, device=device), freqs)
    return angles.cos(), angles.sin()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Rotations run in fp32 (fp64 for fp64 inputs), as the official code's complex64 product."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """Rotate the last dim of `x` [..., d] by angles whose cos/sin [..., d/2] broadcast against x's leading dims."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    d = x.shape[-1]
    if d % 2 or cos.shape[-1] != d // 2:
        raise ValueError(f"x: expected an even last dim equal to 2 * {cos.shape[-1]} (the table), got {d}")
    dtype = _compute_dtype(x)
    xf, cos, sin = x.to(dtype), cos.to(dtype), sin.to(dtype)
    if layout == "interleaved":
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)
    x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def half_layout_index(d: int) -> torch.Tensor:
    """Index that reorders an interleaved d-vector into the half layout: [0, 2, 4, ..., 1, 3, 5, ...]."""
    if d <= 0 or d % 2:
        raise ValueError(f"d: expected a positive even rotary dim, got {d}")
    return torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))


def to_half_layout(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Interleaved -> half layout along `dim` (use on weight rows to load official weights into a half-layout model)."""
    return x.index_select(dim, half_layout_index(x.shape[dim]).to(x.device))


def to_interleaved_layout(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Half -> interleaved layout along `dim` (the inverse of `to_half_layout`)."""
    inverse = torch.argsort(half_layout_index(x.shape[dim]))
    return x.index_select(dim, inverse.to(x.device))


class Rotary(nn.Module):
    """RoPE of one model: the per-pair frequencies as a float64 buffer; cos/sin for a call's positions are computed
    from them in float64 (a [max_seq_len, rope_dim / 2] table per layer would take 84 MB at V3's 163840 positions).

    The buffer keeps float64 when the module is cast (`.to(torch.bfloat16)` would round the frequencies); only its
    device follows the module. It is built on the CPU under a meta default device, and it is not in the state dict.
    """

    def __init__(self, cfg: ModelConfig, layout: str = "interleaved") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.cfg, self.layout = cfg, layout
        device = "cpu" if torch.get_default_device().type == "meta" else None
        self.register_buffer("freqs", rope_frequencies(cfg, device), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Rotary:
        """Follow the module's device, keep float64 (rebuilt when leaving the meta device)."""
        device = fn(torch.empty(0, device="cpu" if self.freqs.is_meta else self.freqs.device)).device
        if self.freqs.is_meta and device.type != "meta":
            self.freqs = rope_frequencies(self.cfg, device)
        else:
            self.freqs = self.freqs.to(device)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor | int) -> torch.Tensor:
        """Rotate x [B, S, H, d] at `positions`: an int start (positions start..start+S-1 for every row) or [B, S]."""
        if isinstance(positions, int):
            if positions < 0 or positions + x.shape[1] > self.cfg.max_seq_len:
                raise ValueError(f"positions: expected {positions}..{positions + x.shape[1] - 1} within "
                                 f"max_seq_len {self.cfg.max_seq_len}")
            pos = torch.arange(positions, positions + x.shape[1], dtype=torch.float64, device=self.freqs.device)
            angles = torch.outer(pos, self.freqs)[:, None, :]  # [S, 1, d/2]
        else:
            angles = (positions.to(torch.float64)[..., None] * self.freqs)[:, :, None, :]  # [B, S, 1, d/2]
        return apply_rope(x, angles.cos(), angles.sin(), self.layout)
