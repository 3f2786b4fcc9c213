"""FP8 vs BF16 training on the standard-library byte corpus, with a BF16 data-order noise floor.

Per seed: one model is initialised (torch.manual_seed(seed)) and copied three times: BF16 with data order
`seed`, FP8 with the same init and data order, and BF16 with another data order (seed + 1000). BF16 here is
the trainer's "bf16-linear": the same converted projections as FP8, with BF16 operands, fp32 accumulation and
fp32 weight gradients, so the two runs differ only in the GEMM operand format. The relative gap
|L_fp8 - L_bf16| / L_bf16 of the final validation losses is set beside |L_bf16' - L_bf16| / L_bf16, the gap that
data order alone produces. MLA runs in its naive (decompressed) form and the MoE through its per-expert loop in
all three runs, so that wkv_b and the experts' projections go through their modules (and become LowPrecisionLinear);
the absorbed and grouped paths read the weights directly and would stay in BF16.

Sizes: `report` trains a custom config smaller than dsv3-small (`experiment_config`: hidden 128, 2 layers,
8 routed experts) for 100 steps of 8 x 128 bytes over 3 seeds (a few minutes on 2 CPU cores); `thorough`
(env DSV3_FP8_THOROUGH=1 or `mode="thorough"`) trains 400 steps over 5 seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv3ref.config import ConfigError, ModelConfig
from dsv3ref.corpus import Corpus, stdlib_corpus
from dsv3ref.model import Transformer
from dsv3ref.train import TrainConfig, train
from harness import paper
from harness.bench.common import conditions
from harness.results import Record

BUDGETS = {"report": (100, (0, 1, 2)), "thorough": (400, (0, 1, 2, 3, 4))}  # steps, seeds
OTHER_ORDER = 1000


def experiment_config() -> ModelConfig:
    """dsv3-small shrunk to train in seconds per hundred steps on a CPU: every V3 feature, 128-wide tiles."""
    base = ModelConfig.preset("dsv3-small")
    return base.replace(
        name="dsv3-fp8-experiment", hidden_size=128, num_layers=2, intermediate_size=256, max_seq_len=256,
        mtp_depth=0,
        attention=dataclasses.replace(base.attention, num_heads=4, q_lora_rank=64, kv_lora_rank=64,
                                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
        moe=dataclasses.replace(base.moe, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128),
        rope=dataclasses.replace(base.rope, original_max_position_embeddings=256))


def experiment_mode() -> str:
    """'thorough' when the environment sets DSV3_FP8_THOROUGH=1, else 'report'."""
    return "thorough" if os.environ.get("DSV3_FP8_THOROUGH") == "1" else "report"


@dataclass(frozen=True)
class SeedResult:
    """Final validation losses of one seed's three runs and the two relative gaps (fractions, not %)."""

    seed: int
    bf16: float
    fp8: float
    bf16_other_order: float
    seconds: float

    @property
    def fp8_gap(self) -> float:
        return abs(self.fp8 - self.bf16) / self.bf16

    @property
    def noise_gap(self) -> float:
        return abs(self.bf16_other_order - self.bf16) / self.bf16


RUNS_PER_SEED = 3


def run_seed(cfg: ModelConfig, seed: int, train_cfg: TrainConfig, corpus: Corpus,
             on_step: Callable[[int, int], None] | None = None) -> SeedResult:
    """The three runs of one seed from one initialisation; `on_step(run, step)` after every training step."""
    torch.manual_seed(seed)
    init = Transformer(cfg, attn_mode="naive", moe_backend="loop")
    runs = {"bf16": ("bf16-linear", seed), "fp8": ("fp8", seed),
            "bf16_other_order": ("bf16-linear", seed + OTHER_ORDER)}
    losses, seconds = {}, 0.0
    for i, (name, (precision, data_seed)) in enumerate(runs.items()):
        step_done = None if on_step is None else lambda step, _loss, run=i: on_step(run, step)
        result = train(copy.deepcopy(init), corpus,
                       dataclasses.replace(train_cfg, precision=precision, data_seed=data_seed), progress=step_done)
        losses[name], seconds = result.final_val_loss, seconds + result.seconds
    return SeedResult(seed, losses["bf16"], losses["fp8"], losses["bf16_other_order"], seconds)


def fp8_vs_bf16(mode: str | None = None, cfg: ModelConfig | None = None, corpus: Corpus | None = None,
                progress: Callable[[str], None] | None = None,
                fraction: Callable[[float], None] | None = None) -> list[SeedResult]:
    """Run the experiment in `mode` ('report' or 'thorough'; default from DSV3_FP8_THOROUGH); `progress` gets a
    message per seed, `fraction` the share of all training steps done after each step."""
    mode = mode or experiment_mode()
    if mode not in BUDGETS:
        raise ConfigError(f"mode: expected one of {', '.join(BUDGETS)}, got {mode!r}")
    steps, seeds = BUDGETS[mode]
    cfg = cfg or experiment_config()
    corpus = corpus or stdlib_corpus()
    train_cfg = TrainConfig(steps=steps, batch_size=8, seq_len=128, warmup_steps=steps // 10, eval_batches=16)
    results: list[SeedResult] = []
    runs = RUNS_PER_SEED * len(seeds)

    def on_step(run: int, step: int) -> None:
        fraction((RUNS_PER_SEED * len(results) + run + (step + 1) / steps) / runs)

    for seed in seeds:
        if progress is not None:
            progress(f"fp8 vs bf16: seed {seed} ({len(results) + 1}/{len(seeds)}, {RUNS_PER_SEED} runs of {steps} "
                     "steps)")
        results.append(run_seed(cfg, seed, train_cfg, corpus, on_step if fraction is not None else None))
    return results


def gap_records(results: list[SeedResult], mode: str, cfg: ModelConfig) -> list[Record]:
    """fp8_rel_loss_gap of FP8 against BF16 and of BF16 against BF16 with another data order (the noise floor),
    means over seeds in percent with the per-seed values."""
    ref = paper.ref("fp8_rel_loss_gap", "fp8-vs-bf16")
    common = {"seeds": [r.seed for r in results], "mode": mode, "config": cfg.name,
              "seconds": sum(r.seconds for r in results), **conditions("cpu")}
    fp8_gap = statistics.mean(r.fp8_gap for r in results) * 100
    noise = statistics.mean(r.noise_gap for r in results) * 100
    return [Record("fp8_rel_loss_gap", "fp8-vs-bf16", fp8_gap, "%", kind="measured", paper=ref and ref.value,
                   method="mean-over-seeds", extra={**common, "per_seed": [r.fp8_gap * 100 for r in results],
                                                    "val_loss_bf16": [r.bf16 for r in results],
                                                    "val_loss_fp8": [r.fp8 for r in results]}),
            Record("fp8_rel_loss_gap", "bf16-seed-noise", noise, "%", kind="measured", method="mean-over-seeds",
                   extra={**common, "per_seed": [r.noise_gap * 100 for r in results],
                          "val_loss_bf16_other_order": [r.bf16_other_order for r in results]})]
