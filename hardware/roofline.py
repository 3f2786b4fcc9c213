"""Roofline: the time a kernel needs at least, from its FLOPs and bytes and a profile's peaks."""

from __future__ import annotations

from dataclasses import dataclass

from hardware.profile import Profile, ProfileError

_TFLOPS_FIELD = {"bf16": "bf16_dense_TFLOPS", "fp8": "fp8_dense_TFLOPS", "fp32": "fp32_dense_TFLOPS"}


@dataclass(frozen=True)
class Roofline:
    compute_s: float
    memory_s: float

    @property
    def time_s(self) -> float:
        """The lower bound: whichever of compute and memory takes longer."""
        return max(self.compute_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def peak_flops(profile: Profile, dtype: str) -> float:
    """The profile's dense matmul FLOP/s in `dtype` (bf16, fp8, fp32)."""
    if dtype not in _TFLOPS_FIELD:
        raise ProfileError(f"dtype: expected one of {', '.join(_TFLOPS_FIELD)}, got {dtype!r}")
    tflops = profile.get(_TFLOPS_FIELD[dtype])
    if tflops is None:
        raise ProfileError(f"{profile.name}: field {_TFLOPS_FIELD[dtype]!r}: not given by this profile")
    return tflops * 1e12


def roofline(profile: Profile, flops: float, bytes_moved: float, dtype: str = "bf16") -> Roofline:
    """Compute and memory time lower bounds for `flops` FLOP and `bytes_moved` B of device-memory traffic."""
    return Roofline(flops / peak_flops(profile, dtype), bytes_moved / (profile.hbm_bandwidth_GBps * 1e9))


def achieved_fraction_of_bandwidth(profile: Profile, bytes_moved: float, seconds: float) -> float:
    """Bytes / time over the profile's memory bandwidth."""
    return bytes_moved / seconds / (profile.hbm_bandwidth_GBps * 1e9)
