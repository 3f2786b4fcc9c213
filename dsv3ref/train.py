"""A small, deterministic training loop shared by the experiments (FP8 vs BF16 here, MTP later).

AdamW on fp32 master weights, linear warm-up then cosine decay, gradient clipping, random windows of the
training tokens drawn from a seeded generator (`data_seed` fixes the data order), and the validation loss on
a fixed set of windows. Precision: "fp32" (no autocast); "bf16" (autocast to bfloat16: linear layers and
attention matmuls in BF16, fp32 master weights and residual stream); "fp8" (as bf16, with the projections of
attention and FFN/experts converted to FP8 LowPrecisionLinear: all three GEMMs in FP8, fp32 accumulation and
weight gradients; embedding, head and router stay in BF16 per `fp8_keep`); "bf16-linear" (as fp8 with the
operands of those GEMMs in BF16: the baseline that differs from fp8 only in the operand format).
After every step the MoE layers' routing biases get DeepSeek-V3's auxiliary-loss-free update
(dsv3ref.balancing: -gamma for over-loaded experts, +gamma for under-loaded ones, from that step's routing);
`bias_update_speed` = 0 keeps them fixed.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref.balancing import GAMMA, apply_bias_update_, expert_load
from dsv3ref.corpus import Corpus, fixed_batches, random_batch
from dsv3ref.fp8.linear import DEFAULT_KEEP, convert_linears
from dsv3ref.moe import MoE

PRECISIONS = ("fp32", "bf16", "bf16-linear", "fp8")
RECIPE = {"fp8": "fp8", "bf16-linear": "bf16"}
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class TrainError(ValueError):
    """An invalid training setting; the message names the field and what was expected."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (defaults: a CPU-sized run of the byte-level corpus)."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    data_seed: int = 0
    precision: str = "bf16"
    fp8_keep: tuple[str, ...] = DEFAULT_KEEP
    fp8_backend: str = "torch"
    eval_batches: int = 4
    eval_every: int = 0  # 0: evaluate only after the last step
    bias_update_speed: float = GAMMA  # gamma of the routing-bias update; 0 keeps the biases fixed

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name}: expected >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise TrainError(f"{name}: expected >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise TrainError(f"lr: expected a positive value, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainError(f"min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.bias_update_speed < math.inf:
            raise TrainError(f"bias_update_speed: expected a finite value >= 0, got {self.bias_update_speed!r}")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class TrainResult:
    """Training loss per step, (step, validation loss) pairs, the final validation loss, wall time."""

    losses: list[float]
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.val_losses[-1][1]


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits [B, S, V] against the next tokens [B, S]."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to min_lr_ratio * lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def precision_context(precision: str, device: str = "cpu") -> Iterator[None]:
    """Autocast to bfloat16 for bf16/fp8 runs (nothing for fp32); hides torch's mixed-dtype norm warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision != "fp32"):
            yield


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
             loss_fn: LossFn = next_token_loss) -> float:
    """Mean loss over fixed batches, without gradients, in the run's precision."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), precision_context(precision, device.type):
        losses = [float(loss_fn(model, x.to(device), y.to(device))) for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def update_routing_biases(model: nn.Module, gamma: float) -> None:
    """The auxiliary-loss-free update of every biased MoE layer from the routing of its last forward."""
    for moe in model.modules():
        if isinstance(moe, MoE) and moe.gate.bias is not None and moe.last_indices is not None:
            apply_bias_update_(moe.gate.bias, expert_load(moe.last_indices, moe.n_experts), gamma)


def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, loss_fn: LossFn = next_token_loss,
          progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model` in place (fp8, bf16-linear: its projections are converted first); return the history."""
    if cfg.precision in RECIPE:
        convert_linears(model, RECIPE[cfg.precision], cfg.fp8_keep, cfg.fp8_backend)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.data_seed)
    val = fixed_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    opt = _optimizer(model, cfg)
    result, start = TrainResult(losses=[]), time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step)
        x, y = random_batch(corpus.train, cfg.batch_size, cfg.seq_len, generator)
        with precision_context(cfg.precision, device.type):
            loss = loss_fn(model, x.to(device), y.to(device))
        if not torch.isfinite(loss):
            raise TrainError(f"loss: not finite at step {step} ({float(loss)}); lower lr or check the data")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if cfg.bias_update_speed:
            update_routing_biases(model, cfg.bias_update_speed)
        result.losses.append(loss.item())
        if progress is not None:
            progress(step, result.losses[-1])
        last = step == cfg.steps - 1
        if last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0):
            result.val_losses.append((step + 1, evaluate(model, val, cfg.precision, loss_fn)))
    result.seconds = time.perf_counter() - start
    return result
