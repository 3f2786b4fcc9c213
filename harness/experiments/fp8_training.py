"""FP8 vs BF16 training on the standard-library byte corpus: paired seeds, a BF16 data-order noise floor, 95%
confidence intervals, and the FP8 step's time beside the BF16 step's.

Design (docs/fp8.md#fp8-training): per seed s one model is initialised (torch.manual_seed(s)) and trained three times
from copies of it: BF16 with data order s, FP8 with the same init and data order, and BF16 with data order
s + OTHER_ORDER. BF16 is the trainer's "bf16-linear": the same converted projections as FP8 with BF16 operands,
fp32 accumulation and fp32 weight gradients, so that the first two runs differ only in the GEMM operand format.
Per seed, the signed gap (L_fp8 - L_bf16) / L_bf16 of the final validation losses and the noise gap
(L_bf16' - L_bf16) / L_bf16, which measures how much the sampling of the training windows alone (same init)
moves the final loss. Over seeds: the mean, its 95% interval (Student t, n - 1 degrees of freedom; its
half-width is the experiment's resolution) and the mean |gap|. The learning rate decays (cosine) to
`min_lr_ratio` of its peak; the relative change of the BF16 validation loss over the last 20% of the steps says
how flat the curve ended. The validation loss's own sampling error (the spread of its batches) is kept beside it.

MLA runs in its naive form and the MoE through its per-expert loop, so that wkv_b and the experts' projections go
through their modules (and become FP8/BF16 linears); the absorbed and grouped paths read the weights directly.
Budgets: `report` (`dsv3 report --full`: the CPU-sized model dsv3-tiny-fp8) and `long` (`dsv3 experiment
fp8-training`: dsv3-small-fp8, more steps), each tunable field by field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv3ref.config import ModelConfig
from dsv3ref.corpus import Corpus, stdlib_corpus
from dsv3ref.fp8 import fused
from dsv3ref.fp8.linear import convert_linears
from dsv3ref.fp8.quant import FP8Error
from dsv3ref.model import Transformer
from dsv3ref.train import NonFiniteLoss, TrainConfig, Trainer, train
from hardware.timing import time_interleaved
from harness import paper
from harness.bench.common import conditions, speedup_record
from harness.formatting import num, ratio_cell
from harness.report_sections import Table
from harness.results import Record

OTHER_ORDER = 1000  # the noise floor's data order: seed + 1000, an order no other run uses
PAPER_BOUND = 0.25  # %, the paper's "relative loss error below 0.25%"
LAST_FRACTION = 0.2  # last20_change: the BF16 validation loss's relative change over the last 20% of the steps
RUNS = ("bf16", "fp8", "bf16_other_order")
CURVE_POINTS = 100  # at most this many (step, loss) points per training curve in a record
FP8_PATHS = {"fused": "emulated on the CPU: fused fake-quantization (compiled) and one fp32 GEMM per product",
             "torch": "emulated: reference quantizers and block-scaled GEMM (fp32 matmul per 128-wide K block)",
             "triton": "Triton block-scaled FP8 GEMM (native FP8 on CUDA, interpreted on the CPU)"}


class ExperimentError(ValueError):
    """A bad experiment setting, or a run that stopped; the message names the field or the run and the step."""


@dataclass(frozen=True)
class Budget:
    """What one experiment run trains: model, seeds, steps and batches, evaluation, device and FP8 path."""

    model: str = "dsv3-tiny-fp8"  # the preset trained unless run_experiment is given a config
    seeds: int = 5
    first_seed: int = 0  # seeds first_seed, first_seed + 1, ... (shards of one experiment on several machines)
    steps: int = 120
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.01
    warmup_fraction: float = 0.05
    eval_batches: int = 24  # validation batches (evenly spaced windows); 0: the whole split, windows side by side
    device: str = "cpu"
    fp8_backend: str = "auto"  # fused on the CPU when a C++ compiler is there, else torch; triton on CUDA
    other_ops: str = "auto"  # bf16 on CUDA (as DeepSeek-V3), fp32 on the CPU (no native BF16 matmuls)
    overhead_reps: int = 7  # interleaved step pairs timed for fp8_step_overhead

    def __post_init__(self) -> None:
        if self.seeds < 2:
            raise ExperimentError(f"seeds: expected >= 2 (a confidence interval needs two), got {self.seeds}")
        for name in ("steps", "batch_size", "seq_len", "overhead_reps"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        if self.eval_batches < 0:
            raise ExperimentError(f"eval_batches: expected >= 0 (0: the whole validation split), got "
                                  f"{self.eval_batches!r}")
        if self.first_seed < 0:
            raise ExperimentError(f"first_seed: expected >= 0, got {self.first_seed!r}")
        if self.steps < 5:
            raise ExperimentError(f"steps: expected >= 5 (the last 20% must hold a step), got {self.steps}")
        if self.device not in ("cpu", "cuda"):
            raise ExperimentError(f"device: expected cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ExperimentError("device: cuda requested, but torch.cuda.is_available() is False on this machine")
        if not 0 <= self.warmup_fraction < 1:
            raise ExperimentError(f"warmup_fraction: expected a value in [0, 1), got {self.warmup_fraction!r}")

    def backend(self) -> str:
        """The FP8 backend that runs: as given, or for `auto` triton on CUDA, fused on a CPU with a compiler."""
        if self.fp8_backend != "auto":
            return self.fp8_backend
        if self.device == "cuda":
            return "triton"
        return "torch" if fused.unavailable() else "fused"

    def other(self) -> str:
        """The dtype of every operator outside the converted GEMMs (`auto`: bf16 on CUDA, fp32 on the CPU)."""
        if self.other_ops != "auto":
            return self.other_ops
        return "bf16" if self.device == "cuda" else "fp32"

    def eval_count(self, corpus: Corpus) -> int:
        """Validation batches per evaluation: `eval_batches`, or for 0 as many as tile the validation split."""
        return self.eval_batches or max(1, (corpus.val.numel() - 1) // (self.batch_size * self.seq_len))

    def train_config(self, precision: str, data_seed: int, name: str, eval_batches: int,
                     mid_eval: bool = False) -> TrainConfig:
        """The trainer's settings of one run named `name`; with `mid_eval` it also evaluates after 80% of the
        steps (the BF16 reference run, for last20_change)."""
        mid = round(self.steps * (1 - LAST_FRACTION))
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=self.seq_len, lr=self.lr,
                           min_lr_ratio=self.min_lr_ratio, warmup_steps=round(self.steps * self.warmup_fraction),
                           data_seed=data_seed, precision=precision, other_ops=self.other(),
                           fp8_backend=self.backend(), eval_batches=eval_batches,
                           eval_at=(mid,) if mid_eval else (), name=name)

    @property
    def tokens(self) -> int:
        """Training tokens per run."""
        return self.steps * self.batch_size * self.seq_len


BUDGETS = {
    # dsv3 report --full: sized from the step times of dsv3-tiny-fp8 at 1 and 2 threads to take about 7 minutes on
    # 2 idle cores, a cold kernel build included, and the whole fp8 section about 8 (docs/fp8.md#budgets-and-commands)
    "report": Budget(),
    # dsv3 experiment fp8-training: 8 seeds, 4x the tokens per step, 1.2M tokens per run, the whole validation split;
    # hours on a CPU; scale it with --model dsv3-small-fp8 --steps ... --device cuda
    "long": Budget(seeds=8, steps=300, batch_size=32, eval_batches=0),
}


@dataclass(frozen=True)
class SeedResult:
    """One seed's three runs: final validation losses, per-batch validation losses, the BF16 run's loss at 80% of
    the steps, wall seconds per run, and the training loss of every step per run."""

    seed: int
    loss: dict[str, float]
    batches: dict[str, list[float]]
    bf16_at_80: float
    seconds: dict[str, float]
    curves: dict[str, list[float]] = field(default_factory=dict)

    def gap(self, run: str) -> float:
        """(L_run - L_bf16) / L_bf16, a fraction."""
        return (self.loss[run] - self.loss["bf16"]) / self.loss["bf16"]

    @property
    def last20_change(self) -> float:
        """(L_bf16 at the end - at 80% of the steps) / at 80%, a fraction (negative: still falling)."""
        return (self.loss["bf16"] - self.bf16_at_80) / self.bf16_at_80

    def val_sem(self, run: str) -> float:
        """Standard error of run's validation loss over its batches, relative to the loss: how much another
        validation sample of the same size could move it."""
        b = self.batches[run]
        return statistics.stdev(b) / math.sqrt(len(b)) / self.loss[run]

    def val_gap_sem(self, run: str) -> float:
        """Standard error of the gap of `run` against BF16 from the validation sample alone (paired batches)."""
        diff = [a - b for a, b in zip(self.batches[run], self.batches["bf16"], strict=True)]
        return statistics.stdev(diff) / math.sqrt(len(diff)) / self.loss["bf16"]


@dataclass
class Fp8TrainingResult:
    """The seeds completed, the step-time comparison, and why the experiment stopped early (if it did)."""

    budget: Budget
    config: ModelConfig
    seeds: list[SeedResult] = field(default_factory=list)
    overhead: Record | None = None
    stopped: str | None = None
    seconds: float = 0.0


def gap_summary(gaps: list[float]) -> dict[str, Any]:
    """Mean, 95% interval (Student t) and mean |.| of per-seed gaps given as fractions, all in percent."""
    pct = [g * 100 for g in gaps]
    mean = statistics.mean(pct)
    if len(pct) < 2:
        return {"mean": mean, "ci95": None, "half_width": None, "sd": None, "mean_abs": abs(mean)}
    sd = statistics.stdev(pct)
    from scipy import stats  # here, not at the top: scipy.stats costs ~1 s of every report's start-up

    half = float(stats.t.ppf(0.975, len(pct) - 1)) * sd / math.sqrt(len(pct))
    return {"mean": mean, "ci95": [mean - half, mean + half], "half_width": half, "sd": sd,
            "mean_abs": statistics.mean(abs(p) for p in pct)}


def resolves(summary: dict[str, Any], bound: float = PAPER_BOUND) -> bool:
    """Whether a gap summary settles the paper's claim: mean |gap| <= bound and the 95% interval inside ±bound."""
    ci = summary["ci95"]
    return ci is not None and summary["mean_abs"] <= bound and -bound <= ci[0] and ci[1] <= bound


def check_model(cfg: ModelConfig) -> None:
    """ExperimentError unless the FP8 recipe can convert `cfg`'s projections (built on the meta device: no memory,
    no compute), so that a model the recipe cannot tile fails before anything is trained."""
    with torch.device("meta"):
        model = Transformer(cfg, attn_mode="naive", moe_backend="loop")
    try:
        convert_linears(model, "fp8")
    except FP8Error as e:
        raise ExperimentError(f"model {cfg.name}: {e}") from None


def _model(cfg: ModelConfig, seed: int, device: str) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, attn_mode="naive", moe_backend="loop").to(device)


def _every_tenth(progress: Callable[[str], None] | None, label: str, steps: int,
                 fraction: Callable[[float], None] | None = None) -> Callable[[int, float], None]:
    """train's step callback: a message every tenth of the run, and the run's share done after every step."""
    def report(step: int, loss: float) -> None:
        if fraction is not None:
            fraction((step + 1) / steps)
        if progress is not None and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            progress(f"{label}: step {step + 1}/{steps}, loss {loss:.3f}")

    return report


def run_seed(budget: Budget, cfg: ModelConfig, seed: int, corpus: Corpus,
             progress: Callable[[str], None] | None = None, label: str = "",
             fraction: Callable[[float], None] | None = None) -> SeedResult:
    """The three runs of one seed from one initialisation; ExperimentError naming the run when one diverges.
    `fraction(f)` gets the share (0..1) of the seed's training steps done."""
    init = _model(cfg, seed, budget.device)
    runs = {"bf16": ("bf16-linear", seed), "fp8": ("fp8", seed), "bf16_other_order": ("bf16-linear",
                                                                                        seed + OTHER_ORDER)}
    loss, batches, seconds, curves, mid = {}, {}, {}, {}, math.nan
    for i, (name, (precision, data_seed)) in enumerate(runs.items()):
        run_name = f"seed {seed} {name}"
        within = None if fraction is None else lambda f, i=i: fraction((i + f) / len(runs))
        try:
            cfg_run = budget.train_config(precision, data_seed, run_name, budget.eval_count(corpus), name == "bf16")
            result = train(copy.deepcopy(init), corpus, cfg_run,
                           progress=_every_tenth(progress, f"{label}{run_name}", budget.steps, within))
        except NonFiniteLoss as e:
            raise ExperimentError(str(e)) from None
        loss[name], batches[name], seconds[name] = result.final_val_loss, result.val_batch_losses, result.seconds
        curves[name] = result.losses
        if name == "bf16":
            mid = result.val_losses[0][1]
    return SeedResult(seed, loss, batches, mid, seconds, curves)


def step_overhead(budget: Budget, cfg: ModelConfig, corpus: Corpus) -> Record:
    """fp8_step_overhead: an FP8 training step's time over a BF16 step's (same init and data), timed side by side
    after two warm-up steps each (the warm-up builds the compiled kernels; their build time is kept apart)."""
    init = _model(cfg, 0, budget.device)
    trainers = {p: Trainer(copy.deepcopy(init), corpus, budget.train_config(p, 0, f"overhead {p}", 1))
                for p in ("fp8", "bf16-linear")}
    timings = time_interleaved({p: t.step for p, t in trainers.items()}, device=budget.device, warmup=2,
                               reps=budget.overhead_reps)
    extra = {"model": cfg.name, "batch_size": budget.batch_size, "seq_len": budget.seq_len,
             "fp8_backend": budget.backend(), "fp8_path": FP8_PATHS[budget.backend()], "other_ops": budget.other(),
             "compile_seconds": fused.compile_seconds(), **conditions(budget.device)}
    return speedup_record("fp8_step_overhead", "fp8-vs-bf16", timings["fp8"], timings["bf16-linear"], extra,
                          unit="ratio")


def run_experiment(budget: Budget, cfg: ModelConfig | None = None, corpus: Corpus | None = None,
                   progress: Callable[[str], None] | None = None,
                   on_seed: Callable[[Fp8TrainingResult], None] | None = None,
                   fraction: Callable[[float], None] | None = None) -> Fp8TrainingResult:
    """The step-time comparison, then the seeds in order (`cfg` defaults to the preset `budget.model`);
    `on_seed(result)` after each completed seed (e.g. to write the records so far), `fraction(f)` the share of all
    training steps done (the step-time comparison counts its steps too). A diverged run stops the experiment:
    `stopped` names it and its step, and the seeds completed before stay."""
    cfg = cfg or ModelConfig.preset(budget.model)
    check_model(cfg)
    corpus = corpus or stdlib_corpus()
    result, start = Fp8TrainingResult(budget, cfg), time.perf_counter()
    if progress is not None:
        progress(f"fp8 training: {cfg.name}, step time fp8 vs bf16 ({budget.overhead_reps} rounds)")
    result.overhead = step_overhead(budget, cfg, corpus)
    overhead_steps, seed_steps = 2 * (2 + budget.overhead_reps), len(RUNS) * budget.steps
    total = overhead_steps + budget.seeds * seed_steps
    if fraction is not None:
        fraction(overhead_steps / total)
    for i in range(budget.seeds):
        label = f"fp8 training [{i + 1}/{budget.seeds}] "
        within = None if fraction is None else lambda f, i=i: fraction((overhead_steps + (i + f) * seed_steps) / total)
        try:
            result.seeds.append(run_seed(budget, cfg, budget.first_seed + i, corpus, progress, label, within))
        except ExperimentError as e:
            result.stopped = f"{e}; {len(result.seeds)} of {budget.seeds} seeds completed"
            break
        result.seconds = time.perf_counter() - start
        if on_seed is not None:
            on_seed(result)
    result.seconds = time.perf_counter() - start
    return result


def gap_records(result: Fp8TrainingResult) -> list[Record]:
    """fp8_rel_loss_gap of FP8 against BF16 and of BF16 against BF16 with another data order (the noise floor):
    mean signed gap over seeds in percent, with its 95% interval, mean |gap| and the per-seed values."""
    budget, seeds = result.budget, result.seeds
    if len(seeds) < 1:
        return []
    ref = paper.ref("fp8_rel_loss_gap", "fp8-vs-bf16")
    common = {"seeds": [s.seed for s in seeds], "steps": budget.steps, "tokens": budget.tokens,
              "model": result.config.name, "batch_size": budget.batch_size, "seq_len": budget.seq_len,
              "lr": budget.lr, "min_lr_ratio": budget.min_lr_ratio,
              "eval_tokens": len(seeds[0].batches["bf16"]) * budget.batch_size * budget.seq_len,
              "val_loss_bf16": [s.loss["bf16"] for s in seeds],
              "last20_change": statistics.mean(s.last20_change * 100 for s in seeds),
              "last20_change_per_seed": [s.last20_change * 100 for s in seeds],
              "val_sem_rel": statistics.mean(s.val_sem("bf16") * 100 for s in seeds),
              "fp8_backend": budget.backend(), "fp8_path": FP8_PATHS[budget.backend()], "other_ops": budget.other(),
              "bound": PAPER_BOUND, "seconds": result.seconds, "stopped": result.stopped,
              **conditions(budget.device)}
    records = []
    for subject, run, method in (("fp8-vs-bf16", "fp8", "paired seeds: same init and data order"),
                                 ("bf16-seed-noise", "bf16_other_order",
                                  f"paired seeds: same init, data order seed + {OTHER_ORDER}")):
        summary = gap_summary([s.gap(run) for s in seeds])
        extra = {**common, "ci95": summary["ci95"], "half_width": summary["half_width"], "sd": summary["sd"],
                 "mean_abs": summary["mean_abs"], "per_seed": [s.gap(run) * 100 for s in seeds],
                 f"val_loss_{run}": [s.loss[run] for s in seeds], "resolved": resolves(summary),
                 "val_gap_sem": statistics.mean(s.val_gap_sem(run) * 100 for s in seeds)}
        records.append(Record("fp8_rel_loss_gap", subject, summary["mean"], "%", kind="measured",
                              paper=ref.value if ref and run == "fp8" else None, method=method, extra=extra))
    return records


def curve_records(result: Fp8TrainingResult) -> list[Record]:
    """train_loss of every run (subject the run: bf16, fp8, bf16_other_order): the last step's training loss, and
    the curve (every step, or every k-th and the last when there are more than CURVE_POINTS) for the figure."""
    out = []
    for s in result.seeds:
        for run, losses in s.curves.items():
            steps = list(range(0, len(losses), math.ceil(len(losses) / CURVE_POINTS)))
            steps += [] if steps[-1] == len(losses) - 1 else [len(losses) - 1]
            out.append(Record("train_loss", run, losses[-1], "nats/byte", kind="measured",
                              method="training loss per step", extra={
                                  "seed": s.seed, "steps": len(losses), "model": result.config.name,
                                  "batch_size": result.budget.batch_size, "seq_len": result.budget.seq_len,
                                  "curve_steps": [i + 1 for i in steps], "curve_loss": [losses[i] for i in steps]}))
    return out


def records(result: Fp8TrainingResult) -> list[Record]:
    """Every record of a run of the experiment: the two gaps, the training curves, then the step-time ratio."""
    return gap_records(result) + curve_records(result) + ([result.overhead] if result.overhead is not None else [])


def with_overrides(budget: Budget, **changes: Any) -> Budget:
    """`budget` with the fields given (not None) replaced, validated again."""
    return dataclasses.replace(budget, **{k: v for k, v in changes.items() if v is not None})


def _pct(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:+.{digits}f}%"


def verdict(record: Record) -> str:
    """In words: whether the FP8 gap record settles the paper's bound, and at what resolution."""
    ci, bound = record.extra["ci95"], record.extra["bound"]
    if ci is None:
        return "not resolved: one seed gives no confidence interval"
    where = (f"mean |gap| {record.extra['mean_abs']:.3f}%, 95% interval [{ci[0]:+.3f}%, {ci[1]:+.3f}%] "
             f"(resolution ±{record.extra['half_width']:.3f}%)")
    if record.extra["resolved"]:
        return f"resolved: FP8 stays within {bound}% of BF16 here: {where} lies within ±{bound}%"
    if ci[0] > bound or ci[1] < -bound:
        return f"resolved against the bound: {where} lies entirely beyond ±{bound}%: FP8's loss differs by more here"
    return (f"not resolved at this budget: {where} does not lie within ±{bound}%, so this budget cannot decide "
            f"the claim; a longer run (more seeds or steps: `dsv3 experiment fp8-training`) narrows the interval")


def tables(result: Fp8TrainingResult) -> list[Table]:
    """The per-seed losses and gaps beside the noise floor and the paper's bound, and the step-time ratio."""
    budget, cfg, out = result.budget, result.config, []
    recs = gap_records(result)
    rows = [[s.seed, f"{s.loss['bf16']:.4f}", f"{s.loss['fp8']:.4f}", f"{s.loss['bf16_other_order']:.4f}",
             _pct(s.gap("fp8") * 100), _pct(s.gap("bf16_other_order") * 100)] for s in result.seeds]
    notes = []
    if recs:
        fp8, noise = recs
        ci = [f"[{r.extra['ci95'][0]:+.3f}, {r.extra['ci95'][1]:+.3f}]%" if r.extra["ci95"] else "—"
              for r in recs]
        rows += [["mean", "", "", "", _pct(fp8.value), _pct(noise.value)],
                 ["95% interval", "", "", "", ci[0], ci[1]],
                 ["mean |gap|", "", "", "", f"{fp8.extra['mean_abs']:.3f}%", f"{noise.extra['mean_abs']:.3f}%"],
                 ["paper", "", "", "", f"< {PAPER_BOUND}%", "—"]]
        notes += [verdict(fp8),
                  f"bf16 noise: BF16 from the same init with data order seed + {OTHER_ORDER}: how far the sampling "
                  "of the training windows alone moves the final loss (the floor an operand-format effect is "
                  "read against)",
                  f"curve: the BF16 validation loss changed by {fp8.extra['last20_change']:+.3f}% over the last "
                  f"{LAST_FRACTION:.0%} of the steps (mean over seeds); validation sample: {fp8.extra['eval_tokens']:,}"
                  f" tokens, standard error of one model's loss {fp8.extra['val_sem_rel']:.3f}%, of a paired gap "
                  f"{fp8.extra['val_gap_sem']:.4f}%"]
    if result.stopped:
        notes.append(f"stopped early: {result.stopped}")
    a, moe = cfg.attention, cfg.moe
    experts = (f"{moe.n_routed_experts} routed experts top-{moe.num_experts_per_tok} + {moe.n_shared_experts} "
               "shared" if moe else "dense")
    notes += [f"model {cfg.name}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, MLA {a.num_heads} heads q/kv "
              f"rank {a.q_lora_rank}/{a.kv_lora_rank}, {experts}; byte tokens of the Python standard library, "
              "validation = whole files (by path hash)",
              f"{len(result.seeds)} seeds x 3 runs of {budget.steps} steps of {budget.batch_size} x {budget.seq_len} "
              f"bytes ({budget.tokens:,} tokens per run), AdamW lr {budget.lr:g} with {budget.warmup_fraction:.0%} "
              f"warm-up and cosine decay to {budget.min_lr_ratio:g} x lr; {result.seconds / 60:.1f} min",
              f"FP8: {FP8_PATHS[budget.backend()]}; BF16: the same projections with BF16 operands; embedding, head, "
              f"router, norms and the attention core in {budget.other()} in both",
              f"device {budget.device}, {torch.get_num_threads()} threads"]
    ref = paper.ref("fp8_rel_loss_gap", "fp8-vs-bf16")
    if ref:
        notes.append(f"paper ({ref.source}): {ref.note}")
    out.append(Table("FP8 vs BF16 training: final validation loss (nats/byte) and signed relative gap",
                     ["seed", "bf16", "fp8", "bf16 other order", "fp8 gap", "bf16 noise"], rows,
                     recs + curve_records(result), notes))
    if result.overhead is not None:
        r = result.overhead
        samples = r.extra["samples_s"]
        compiled = sum(r.extra["compile_seconds"].values())
        out.append(Table("FP8 vs BF16 training step time (side by side)",
                         ["model", "fp8 step ms", "bf16 step ms", "fp8 / bf16", "fp8 path"],
                         [[r.extra["model"], num(statistics.median(samples["slower"]) * 1e3, 1),
                           num(statistics.median(samples["faster"]) * 1e3, 1), ratio_cell(r), r.extra["fp8_backend"]]],
                         [r], [f"{len(samples['slower'])} interleaved rounds of one step each after 2 warm-up steps; "
                               f"kernels compiled in this process in {compiled:.1f} s (not in the ratio); "
                               f"{r.extra['threads']} threads, load average {r.extra['loadavg_1min']:.1f}",
                               "aim: at most 1.5x"]))
    return out
