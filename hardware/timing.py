"""Wall-clock timing with warm-up, repetitions and raw samples; CUDA work is timed with events and synchronised.

`time_interleaved` runs the candidates side by side (A B A B ...) so that a speed ratio is measured in one run
under the same machine state, as the measurement policy requires.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Raw samples in seconds and their summary."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def iqr(self) -> float:
        """Inter-quartile range (0 for one sample)."""
        q1, q3 = quartiles(self.samples)
        return q3 - q1


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method: within the values' range); the value twice for one value."""
    if not values:
        raise ValueError("quartiles: expected at least one value, got none")
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 1, min_reps: int = 5,
            min_time_s: float = 0.2, max_reps: int = 1000) -> Timing:
    """Time `fn` after `warmup` calls: at least `min_reps` samples and at least `min_time_s` in total."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[float] = []
    while len(samples) < max_reps and (len(samples) < min_reps or sum(samples) < min_time_s):
        samples.append(_once(fn, device))
    return Timing(tuple(samples))


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: str = "cpu", warmup: int = 1,
                     reps: int = 7, seed: int = 0) -> dict[str, Timing]:
    """Time several candidates side by side: each round calls every candidate once, in an order shuffled per
    round (seeded), so that no candidate always runs right after the same other one, whose cache footprint it
    would inherit. Sample i of every candidate comes from round i (see `paired_ratio`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rng = random.Random(seed)
    for _ in range(reps):
        for name in rng.sample(list(fns), len(fns)):
            samples[name].append(_once(fns[name], device))
    return {name: Timing(tuple(s)) for name, s in samples.items()}


def round_ratios(a: Timing, b: Timing) -> list[float]:
    """a's sample / b's sample, round by round, for timings from the same rounds of `time_interleaved`."""
    if len(a.samples) != len(b.samples) or not a.samples:
        raise ValueError(f"timings: expected samples from the same rounds, got {len(a.samples)} and "
                         f"{len(b.samples)}")
    return [x / y for x, y in zip(a.samples, b.samples, strict=True)]


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's sample / b's sample from the same round of `time_interleaved`: a machine whose
    speed drifts between rounds (shared hosts, clock changes) moves both samples of a round alike."""
    return statistics.median(round_ratios(a, b))
