"""How the gate compares each metric, as data: one row per metric id (DESIGN.md's metric table), and the extra keys
that identify a record. A new component adds rows here and nothing else.

Checks:
- `exact`: any change fails. Every analytic record (a formula of configs and profiles) is compared this way.
- `tolerance`: a deterministic measurement (bytes, FLOPs, counts, errors at fixed seeds) fails when it moves by
  more than abs_tol + rel_tol x |baseline|, in either direction (a deterministic value that moves means the code
  changed; re-record the baseline if that was meant).
- `statistical`: a timing. Mann-Whitney U on the raw samples (one-sided, towards worse) with p < alpha and a
  change of the medians of at least the minimum effect (harness.gate.stats); only a change for the worse fails.
- `info`: shown, never fails (a measured value without raw samples, such as the local probe's bandwidth).

`direction` says which way is better for the record's value ("lower", "higher", or None: unknown, so a change
either way counts). Machine-dependent metrics are compared only between documents from the same machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from harness.results import Record

CHECKS = ("exact", "tolerance", "statistical", "info")
DIRECTIONS = ("lower", "higher", None)


@dataclass(frozen=True)
class Rule:
    """How one metric is compared; `why` justifies a tolerance (docs/gate.md lists them)."""

    check: str
    direction: str | None = None
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    machine_dependent: bool = False
    why: str = ""

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise ValueError(f"rule check: expected one of {CHECKS}, got {self.check!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"rule direction: expected one of {DIRECTIONS}, got {self.direction!r}")


def _timing(direction: str) -> Rule:
    return Rule("statistical", direction, machine_dependent=True)


_PROBE = Rule("info", "higher", machine_dependent=True, why="the local probe keeps no raw samples")

# Measured metrics. Analytic records are always `exact` (ANALYTIC); their direction comes from this table.
RULES: dict[str, Rule] = {
    "kv_cache_bytes_per_token": Rule("tolerance", "lower", why="bytes of a live cache: integers"),
    "ep_scaleout_bytes_per_token": Rule("tolerance", "lower", why="bytes counted: integers"),
    "params_activated": Rule("tolerance", None, why="parameters counted: integers"),
    "fwd_gflops_per_token": Rule("tolerance", "lower", why="FlopCounterMode counts integers"),
    "fp8_accum_max_rel_error": Rule("tolerance", "lower", rel_tol=1e-9,
                                    why="element-wise numpy float64/float32 arithmetic at a fixed seed: "
                                        "reproducible to the last bit; 1e-9 is far below any real change"),
    "roundtrip_rel_rms_error": Rule("tolerance", "lower", rel_tol=1e-3,
                                    why="float32 log/exp differ by an ulp between SIMD paths (AVX2, AVX-512), "
                                        "which can move a borderline element to the next code"),
    "moe_load_max_over_mean": Rule("tolerance", "lower", rel_tol=1e-2,
                                   why="a routing score tie broken the other way moves one token; 1% of the "
                                       "maximum load allows a few such flips"),
    "fp8_rel_loss_gap": Rule("tolerance", None, abs_tol=0.05, machine_dependent=True,
                             why="training at fixed seeds repeats on one machine and thread count (the trainer "
                                 "is deterministic there), not across CPUs; 0.05 percentage points is a fifth of "
                                 "the paper's 0.25% bound; a signed gap, so a move either way counts"),
    "mtp_acceptance_rate": Rule("tolerance", "higher", abs_tol=0.01, machine_dependent=True,
                                why="greedy decoding at a fixed seed; 1 point allows a few argmax ties flipped"),
    "tpot_ms": _timing("lower"),
    "tokens_per_s": _timing("higher"),
    "achieved_bandwidth_fraction": _timing("higher"),
    "achieved_compute_fraction": _timing("higher"),
    "fp8_step_overhead": _timing("lower"),
    "ep_throughput_GBps_per_rank": _timing("higher"),
    "pytest_benchmark_time": _timing("lower"),
    "train_loss": Rule("info", "lower", machine_dependent=True,
                       why="one run's training curve, drawn in the loss figure; fp8_rel_loss_gap gates training"),
    "hbm_bandwidth_GBps": _PROBE,
    "bf16_dense_TFLOPS": _PROBE,
    "fp32_dense_TFLOPS": _PROBE,
    "fp8_dense_TFLOPS": _PROBE,
}
PATTERNS: tuple[tuple[str, Rule], ...] = (  # metric-id patterns (fnmatch) for families of metrics
    ("*_speedup", _timing("higher")),
)
# Metrics only ever computed (kind analytic): compared exactly, no row needed; listed so that a measured metric
# without a row is known to be new (the gate notes it) rather than taken for one of these.
ANALYTIC_ONLY = ("params_total", "train_gflops_per_token", "kv_cache_ratio", "kv_cache_bytes_per_sequence",
                 "topology_endpoints", "topology_switches", "topology_links", "topology_cost_per_endpoint")
ANALYTIC = Rule("exact", why="a formula of configs and profiles: any change is a change of the model")
LOCAL_ANALYTIC = Rule("info", machine_dependent=True,
                      why="an analytic value from the local profile's probed (noisy) numbers")
UNKNOWN_TIMING = Rule("statistical", None, machine_dependent=True,
                      why="no rule for this metric: its samples are compared, a change either way fails")
UNKNOWN = Rule("info", None, machine_dependent=True, why="no rule for this metric and no raw samples: shown only")

# The extra keys that, with metric, subject, profile, kind and method, identify a record: the parameters of a
# measurement (context length, batch, tokens, GEMM shape, dtype, device, ...), not its results or conditions.
KEY_EXTRAS = ("context", "batch", "tokens", "phase", "M", "N", "K", "k", "rows", "mantissa_bits", "seq_len",
              "dtype", "device", "model", "config", "mode", "seed", "seeds", "steps", "batch_size", "tokens_per_batch",
              "link_GBps")


def measured_rule(metric: str) -> Rule | None:
    """The rule of a measured metric from RULES or PATTERNS; None when there is no row for it."""
    if metric in RULES:
        return RULES[metric]
    return next((rule for pattern, rule in PATTERNS if fnmatchcase(metric, pattern)), None)


def has_rule(metric: str) -> bool:
    """Whether the table decides this metric (a row, a pattern, or analytic only); others get UNKNOWN_TIMING or
    UNKNOWN, and the gate names them in its notes."""
    return metric in ANALYTIC_ONLY or measured_rule(metric) is not None


def rule_for(record: Record, has_samples: bool) -> Rule:
    """The rule a record is compared by: analytic records exactly (`info` when computed from the probed local
    profile), measured ones by their metric's row; unknown measured metrics statistically when they keep raw
    samples, else shown only."""
    row = measured_rule(record.metric)
    if record.kind == "analytic":
        rule = LOCAL_ANALYTIC if record.profile == "local" else ANALYTIC
        return Rule(rule.check, row.direction if row else None, machine_dependent=rule.machine_dependent,
                    why=rule.why)
    if row is not None:
        return row
    return UNKNOWN_TIMING if has_samples else UNKNOWN
