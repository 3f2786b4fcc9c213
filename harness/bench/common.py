"""What every benchmark shares: real-dimension weights without a random initialisation, the conditions a
measurement ran under, and the one way a side-by-side speed ratio is computed (the median of per-round ratios).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from dsv3ref.config import ConfigError
from hardware.profile import Profile
from hardware.timing import Timing, paired_ratio, round_ratios
from harness.results import Record

_POOL = 1 << 22  # random block tiled over every weight
SPEEDUP_METHOD = "median of per-round time ratios, interleaved"
# Rounds of a side-by-side measurement that `dsv3 gate` can judge: Mann-Whitney U needs 6 or more samples a side to
# reach p < 0.002 at all (harness.gate.stats.min_p_value); 10 detects a 25% change in 5%-noisy samples every time.
GATED_ROUNDS = 10
PIN_VARIABLE = "DSV3_WORKING_DTYPE"
PINNABLE = {"bf16": torch.bfloat16, "fp32": torch.float32}  # what the variable may pin the working dtype to


def pseudo_random_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill t in place with a tiled random block (standard normal / sqrt(fan_in)); norm weights (1-D) with ones.
    Cheap at real dimensions (one 4M-element draw), and the outputs are non-trivial."""
    if t.dim() == 1:
        return t.fill_(1.0)
    pool = (torch.randn(min(_POOL, t.numel()), generator=generator) / math.sqrt(t.shape[-1])).to(t.device, t.dtype)
    flat = t.view(-1)
    for i in range(0, flat.numel(), pool.numel()):
        chunk = flat[i: i + pool.numel()]
        chunk.copy_(pool[: chunk.numel()])
    return t


def materialise_(module: nn.Module, device: str, dtype: torch.dtype, seed: int | None = 0) -> nn.Module:
    """A module built on the meta device, allocated on `device` in `dtype` and filled: pseudo-random from `seed`
    (norm weights one), or with zeros for seed None (for counts that do not depend on the values: FLOPs, bytes)."""
    module = module.to(dtype).to_empty(device=device)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict().values():
            if generator is not None:
                pseudo_random_(t, generator)
            else:
                t.fill_(1.0) if t.dim() == 1 else t.zero_()
    return module


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of what runs inside by torch.utils.flop_counter's registered formulas, as FlopCounterMode
    does (tests check they agree), without its module tracking and its first-use import of torch._dynamo (seconds
    on a CPU: the quick report's budget). `total` after the block."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # TorchDispatchMode's hook: True wraps __torch_dispatch__ in a dynamo-disable that imports torch._dynamo on
        # the first counted op (2.5 s here). The mode never runs under torch.compile, so there is nothing to skip.
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        if func is not torch.ops.prim.device.default:  # as FlopCounterMode: count what an op decomposes into
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def conditions(device: str) -> dict[str, Any]:
    """The conditions a measurement ran under, kept in every measured record: device, torch threads and the
    1-minute load average (other jobs on the machine slow a measurement; compare runs by it)."""
    return {"device": device, "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0]}


def speedup_record(metric: str, subject: str, slower: Timing, faster: Timing, extra: dict[str, Any],
                   unit: str = "x") -> Record:
    """A speed ratio measured side by side: the median over rounds of slower / faster from the same round of
    `hardware.timing.time_interleaved` (> 1 when `faster` is faster); per-round ratios and raw samples kept."""
    return Record(metric, subject, paired_ratio(slower, faster), unit, kind="measured", method=SPEEDUP_METHOD,
                  extra={**extra, "per_round": round_ratios(slower, faster),
                         "samples_s": {"slower": list(slower.samples), "faster": list(faster.samples)}})


def working_dtype(local: Profile) -> torch.dtype:
    """The dtype the measured benchmarks run in here: BF16 where the device runs BF16 matmuls at least half as fast
    as FP32 (GPUs, AMX or AVX512-BF16 CPUs), else FP32 (a CPU without native BF16 emulates it, ~6x slower than FP32
    on an AVX2 EPYC, and would time the emulation rather than the workload). Tables and records name it.

    The environment variable DSV3_WORKING_DTYPE (bf16 or fp32) pins it, for runs that must pair with a baseline
    (`tox -e perf`): the probe's timings, and so its choice, move with the other jobs on a shared machine."""
    pinned = os.environ.get(PIN_VARIABLE)
    if pinned:
        if pinned not in PINNABLE:
            raise ConfigError(f"{PIN_VARIABLE}: expected one of {', '.join(PINNABLE)}, got {pinned!r}")
        return PINNABLE[pinned]
    if local.fp32_dense_TFLOPS is None or local.bf16_dense_TFLOPS >= 0.5 * local.fp32_dense_TFLOPS:
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """bf16, fp32, ... as the records write a dtype."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a block, then restored: arithmetic on small tensors (the analytic
    tables' routing and traffic) runs ~10x faster on one thread than through a pool contended by other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
