"""A small, deterministic training loop shared by the experiments (FP8 vs BF16 here, MTP later).

AdamW on fp32 master weights, linear warm-up then cosine decay, gradient clipping, random windows of the
training tokens drawn from a seeded generator (`data_seed` fixes the data order), and the validation loss on
a fixed set of windows (after the last step, every `eval_every` steps and after the steps in `eval_at`).
Precision: "fp32" (no autocast); "bf16" (autocast to bfloat16: linear layers and attention matmuls in BF16, fp32
master weights and residual stream); "fp8" (the projections of attention and FFN/experts converted to FP8
LowPrecisionLinear: all three GEMMs in FP8, fp32 accumulation and weight gradients; embedding, head, router, norms
and the attention core in `other_ops`: BF16 autocast as DeepSeek-V3, or FP32 where BF16 matmuls are slow);
"bf16-linear" (as fp8 with the operands of those GEMMs in BF16: the baseline that differs from fp8 only in the
operand format). A non-finite training loss (or non-finite activations, which a MoE router refuses) stops the run
with NonFiniteLoss, which names the run and the step and carries the history so far.
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

from dsv3ref import backends
from dsv3ref.balancing import GAMMA, apply_bias_update_, expert_load
from dsv3ref.corpus import Corpus, fixed_batches, random_batch
from dsv3ref.fp8.linear import DEFAULT_INPUT_CACHE, DEFAULT_KEEP, convert_linears
from dsv3ref.moe import MoE, MoEInputError

PRECISIONS = ("fp32", "bf16", "bf16-linear", "fp8")
OTHER_OPS = ("bf16", "fp32")
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
    other_ops: str = "bf16"  # bf16-linear/fp8: autocast dtype of everything but the converted GEMMs
    fp8_keep: tuple[str, ...] = DEFAULT_KEEP
    fp8_input_cache: tuple[str, ...] = DEFAULT_INPUT_CACHE  # modules whose wgrad reads the input, not its FP8 copy
    fp8_backend: str = "torch"
    eval_batches: int = 4
    eval_every: int = 0  # 0: evaluate only after the last step (and after the steps in eval_at)
    eval_at: tuple[int, ...] = ()
    bias_update_speed: float = GAMMA  # gamma of the routing-bias update; 0 keeps the biases fixed
    name: str = "run"  # names the run in errors

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
        if self.other_ops not in OTHER_OPS:
            raise TrainError(f"other_ops: expected one of {', '.join(OTHER_OPS)}, got {self.other_ops!r}")
        if self.precision in ("fp32", "bf16") and self.other_ops != "bf16":
            raise TrainError(f"other_ops: applies to the bf16-linear and fp8 precisions, not {self.precision!r}")
        bad = [s for s in self.eval_at if not 1 <= s <= self.steps]
        if bad:
            raise TrainError(f"eval_at: expected steps in 1..{self.steps}, got {bad[0]!r}")
        known = backends.names("fp8_linear")
        if self.fp8_backend not in known:
            raise TrainError(f"fp8_backend: expected one of {', '.join(known)}, got {self.fp8_backend!r}")

    def autocast(self) -> bool:
        """Whether the run computes under BF16 autocast (everything but fp32 and fp32-other-ops runs)."""
        return self.precision != "fp32" and self.other_ops == "bf16"


class NonFiniteLoss(TrainError):
    """The training loss became NaN or Inf; `result` holds the history up to the step before."""

    def __init__(self, message: str, step: int, result: TrainResult) -> None:
        super().__init__(message)
        self.step, self.result = step, result


@dataclass
class TrainResult:
    """Training loss per step, (step, validation loss) pairs, the last evaluation's loss per validation batch,
    the final validation loss, wall time."""

    losses: list[float]
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    val_batch_losses: list[float] = field(default_factory=list)
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
def precision_context(precision: str, device: str = "cpu", autocast: bool | None = None) -> Iterator[None]:
    """Autocast to bfloat16 for bf16/fp8 runs (nothing for fp32, or when `autocast` is False); hides torch's
    mixed-dtype norm warning."""
    enabled = precision != "fp32" if autocast is None else autocast
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
            yield


def evaluate_batches(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
                     loss_fn: LossFn = next_token_loss, autocast: bool | None = None) -> list[float]:
    """The loss of each fixed batch, without gradients, in the run's precision."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), precision_context(precision, device.type, autocast):
        losses = [float(loss_fn(model, x.to(device), y.to(device))) for x, y in batches]
    model.train(was_training)
    return losses


def evaluate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
             loss_fn: LossFn = next_token_loss, autocast: bool | None = None) -> float:
    """Mean loss over fixed batches, without gradients, in the run's precision."""
    losses = evaluate_batches(model, batches, precision, loss_fn, autocast)
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


class Trainer:
    """One run's state: the model (its projections converted for fp8 and bf16-linear), optimizer, data order and
    validation batches; `step()` trains on the next batch, `evaluate()` scores the validation batches."""

    def __init__(self, model: nn.Module, corpus: Corpus, cfg: TrainConfig, loss_fn: LossFn = next_token_loss) -> None:
        if cfg.precision in RECIPE:
            convert_linears(model, RECIPE[cfg.precision], cfg.fp8_keep, cfg.fp8_backend, cfg.fp8_input_cache)
        self.model, self.corpus, self.cfg, self.loss_fn = model, corpus, cfg, loss_fn
        self.device = next(model.parameters()).device
        self.generator = torch.Generator().manual_seed(cfg.data_seed)
        self.val = fixed_batches(corpus.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
        self.opt = _optimizer(model, cfg)
        self.steps_done = 0

    def step(self) -> float:
        """One optimizer step (learning rate of this step, next batch, clipping, routing-bias update); the loss.
        NonFiniteLoss (with an empty history) when the loss is NaN or Inf; nothing is updated then."""
        cfg, model = self.cfg, self.model
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(cfg, self.steps_done)
        x, y = random_batch(self.corpus.train, cfg.batch_size, cfg.seq_len, self.generator)
        step = self.steps_done + 1
        try:
            with precision_context(cfg.precision, self.device.type, cfg.autocast()):
                loss = self.loss_fn(model, x.to(self.device), y.to(self.device))
        except MoEInputError as e:  # a MoE router refuses non-finite activations: the run diverged in the forward
            raise NonFiniteLoss(f"{cfg.name}: non-finite activations at step {step} of {cfg.steps} ({e}); lower lr "
                                "or check the data", step, TrainResult(losses=[])) from None
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{cfg.name}: training loss not finite at step {step} of {cfg.steps} "
                                f"({loss.item()}); lower lr or check the data", step, TrainResult(losses=[]))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        if cfg.bias_update_speed:
            update_routing_biases(model, cfg.bias_update_speed)
        self.steps_done += 1
        return loss.item()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a resumed run needs besides the model's weights: AdamW's moments and step per parameter (by the
        model's parameter names), the data generator's state, the steps done."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {"trainer.steps_done": torch.tensor(self.steps_done), "trainer.data_rng": self.generator.get_state()}
        for p, st in self.opt.state.items():
            out.update({f"optim.{names[id(p)]}.{k}": v.detach().cpu() for k, v in st.items()})
        return out

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_tensors()` of a run of the same model and settings (the weights are loaded apart)."""
        params = dict(self.model.named_parameters())
        optim = {k: v for k, v in state.items() if k.startswith("optim.")}
        unknown = sorted({k[len("optim."):].rpartition(".")[0] for k in optim} - set(params))
        if unknown or "trainer.steps_done" not in state or "trainer.data_rng" not in state:
            raise TrainError(f"{self.cfg.name}: resume state: expected the optimizer state of this model and the "
                             f"trainer's steps and data generator, got unknown parameters {unknown[:3]}")
        for key, value in optim.items():
            name, _, slot = key[len("optim."):].rpartition(".")
            p = params[name]
            target = value.to(p.device) if slot != "step" else value
            self.opt.state[p][slot] = target
        self.generator.set_state(state["trainer.data_rng"])
        self.steps_done = int(state["trainer.steps_done"])
        if not 0 <= self.steps_done <= self.cfg.steps:
            raise TrainError(f"{self.cfg.name}: resume state: steps_done {self.steps_done} outside 0..{self.cfg.steps}")

    def evaluate(self) -> list[float]:
        """The loss of each validation batch, in the run's precision."""
        return evaluate_batches(self.model, self.val, self.cfg.precision, self.loss_fn, self.cfg.autocast())

    def evaluates_now(self) -> bool:
        """Whether the schedule evaluates after the step just done (the last, eval_at, every eval_every)."""
        done, cfg = self.steps_done, self.cfg
        return done == cfg.steps or done in cfg.eval_at or bool(cfg.eval_every and done % cfg.eval_every == 0)


def train(model: nn.Module, corpus: Corpus, cfg: TrainConfig, loss_fn: LossFn = next_token_loss,
          progress: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train `model` in place (fp8, bf16-linear: its projections are converted first); return the history.
    `progress(step, loss)` is called after every step; NonFiniteLoss carries the history up to the failing step."""
    trainer = Trainer(model, corpus, cfg, loss_fn)
    result, start = TrainResult(losses=[]), time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        try:
            result.losses.append(trainer.step())
        except NonFiniteLoss as e:
            result.seconds = time.perf_counter() - start
            raise NonFiniteLoss(str(e), e.step, result) from None
        if progress is not None:
            progress(step, result.losses[-1])
        if trainer.evaluates_now():
            result.val_batch_losses = trainer.evaluate()
            result.val_losses.append((step + 1, sum(result.val_batch_losses) / len(result.val_batch_losses)))
    result.seconds = time.perf_counter() - start
    return result
