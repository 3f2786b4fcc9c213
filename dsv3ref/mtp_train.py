"""Training a model with its MTP modules (DeepSeek-V3's objective: next-token loss + (λ/D) Σ L_k), with
checkpoints and an exact resume.

The model (absorbed MLA, `init_seed` fixes its weights) and its cfg.mtp_depth MTP modules train as one module
with `dsv3ref.train.Trainer` (AdamW, schedule, clipping, the MoE routing-bias update of every MoE layer, the MTP
block's included) on the standard-library byte corpus. A checkpoint is a directory `step-NNNNNN/` in the run's
output folder, written whole or not at all: `model/` (a safetensors checkpoint in the official layout with the
MTP layer, loadable by `dsv3ref.checkpoint.load_checkpoint`), `trainer.safetensors` (AdamW's moments, the data
generator's state, the steps done) and `history.json` (the losses so far and the run's settings). Resuming
loads the latest checkpoint and continues exactly as the uninterrupted run (same batches, same updates: the
tests compare the losses bit for bit); the settings must be those the run started with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dsv3ref.checkpoint import load_checkpoint, save_checkpoint
from dsv3ref.config import ModelConfig
from dsv3ref.corpus import Corpus
from dsv3ref.model import Transformer
from dsv3ref.mtp import MTP, MTPError, MTPLosses, MTPModel, mtp_losses
from dsv3ref.train import TrainConfig, Trainer, TrainError

LAMBDA = 0.3  # DeepSeek-V3's MTP loss weight for its first 10T tokens (0.1 after)
STEP_DIR = "step-{:06d}"


@dataclass
class History:
    """Per step: the total training loss, the main next-token loss and each depth's L_k; (step, val loss)."""

    total: list[float] = field(default_factory=list)
    main: list[float] = field(default_factory=list)
    depths: list[list[float]] = field(default_factory=list)
    val: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0

    def windows(self, count: int) -> list[tuple[int, int, float, float, list[float]]]:
        """The loss curve in `count` windows of steps: (first step, last step, mean total, mean main, mean L_k per
        depth), steps 1-based."""
        n = len(self.total)
        edges = sorted({round(i * n / count) for i in range(count + 1)})
        out = []
        for lo, hi in zip(edges, edges[1:], strict=False):
            depths = [sum(d[k] for d in self.depths[lo:hi]) / (hi - lo) for k in range(len(self.depths[0]))]
            out.append((lo + 1, hi, sum(self.total[lo:hi]) / (hi - lo), sum(self.main[lo:hi]) / (hi - lo), depths))
        return out


@dataclass(frozen=True)
class MTPTrainResult:
    """The trained model and MTP modules, the history, and the checkpoint directories written (by step)."""

    model: Transformer
    mtp: MTP
    history: History
    checkpoints: dict[int, Path]


class _Loss:
    """main + (λ/D) Σ L_k of an MTPModel; keeps the last call's parts for the history."""

    def __init__(self, lam: float) -> None:
        if not lam >= 0:
            raise MTPError(f"mtp_lambda: expected a value >= 0, got {lam!r}")
        self.lam = lam
        self.last: MTPLosses | None = None

    def __call__(self, m: MTPModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.last = mtp_losses(m.model, m.mtp, inputs, targets, self.lam)
        return self.last.total


def build(cfg: ModelConfig, init_seed: int, device: str = "cpu") -> MTPModel:
    """A fresh model and its MTP modules (fp32, weights from `init_seed`)."""
    if cfg.mtp_depth < 1:
        raise MTPError(f"mtp_depth: expected >= 1 to train MTP modules, got {cfg.mtp_depth} ({cfg.name})")
    torch.manual_seed(init_seed)
    model = Transformer(cfg)
    return MTPModel(model, MTP(cfg)).to(device)


def run_settings(cfg: ModelConfig, tcfg: TrainConfig, lam: float, init_seed: int) -> dict:
    """What defines a run (and must match on resume): the model, the training settings but the run's name, λ, the
    initial-weights seed; JSON values."""
    train = {k: v for k, v in dataclasses.asdict(tcfg).items() if k != "name"}
    return {"model": cfg.to_dict(), "train": json.loads(json.dumps(train)), "mtp_lambda": lam, "init_seed": init_seed}


def checkpoints(out: Path) -> dict[int, Path]:
    """The complete checkpoint directories under `out`, by step."""
    found = {}
    for d in sorted(out.glob("step-*")) if out.is_dir() else []:
        if d.name[5:].isdigit() and (d / "trainer.safetensors").exists():
            found[int(d.name[5:])] = d
    return found


def _save(out: Path, step: int, trainer: Trainer, net: MTPModel, history: History, settings: dict) -> Path:
    final = out / STEP_DIR.format(step)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=out))
    try:
        save_checkpoint(net.model, work / "model", mtp=net.mtp.checkpoint_state(net.model))
        save_file(trainer.state_tensors(), str(work / "trainer.safetensors"))
        (work / "history.json").write_text(json.dumps({"settings": settings, **dataclasses.asdict(history)}))
        os.replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def _resume(directory: Path, trainer: Trainer, net: MTPModel, settings: dict) -> History:
    saved = json.loads((directory / "history.json").read_text())
    differ = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
    if differ:
        raise TrainError(f"{directory}: resume: the run was started with other settings ({', '.join(differ)}); "
                         "expected the same model, training settings, mtp_lambda and init_seed")
    ck = load_checkpoint(directory / "model", mtp=True, device=next(net.parameters()).device)
    net.model.load_state_dict(ck.model.state_dict())
    net.mtp.load_state_dict(MTP.from_state_dict(ck.model, ck.mtp).state_dict())
    trainer.load_state_tensors(load_file(str(directory / "trainer.safetensors")))
    return History(saved["total"], saved["main"], saved["depths"], [tuple(v) for v in saved["val"]],
                   saved["seconds"])


def train_mtp(cfg: ModelConfig, corpus: Corpus, tcfg: TrainConfig, out: str | Path | None = None, *,
              lam: float = LAMBDA, init_seed: int = 0, checkpoint_every: int = 0, resume: bool = False,
              device: str = "cpu", progress: Callable[[int, History], None] | None = None) -> MTPTrainResult:
    """Train `cfg`'s model with its MTP modules for tcfg.steps steps; checkpoints in `out` every
    `checkpoint_every` steps and after the last (none without `out`); `resume` continues from the latest
    checkpoint in `out`. `progress(step, history)` after every step."""
    if checkpoint_every < 0:
        raise TrainError(f"checkpoint_every: expected >= 0, got {checkpoint_every!r}")
    loss = _Loss(lam)
    net = build(cfg, init_seed, device)
    trainer = Trainer(net, corpus, tcfg, loss)
    settings = run_settings(cfg, tcfg, lam, init_seed)
    history, written = History(), {}
    if out is not None:
        out = Path(out)
        written = checkpoints(out)
        if written and not resume:
            raise TrainError(f"{out}: holds checkpoints of a run; expected a new folder (or resume it)")
        if resume and written:
            history = _resume(written[max(written)], trainer, net, settings)
        out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter() - history.seconds
    net.train()
    while trainer.steps_done < tcfg.steps:
        history.total.append(trainer.step())
        history.main.append(loss.last.main.item())
        history.depths.append([d.item() for d in loss.last.depths])
        done = trainer.steps_done
        if trainer.evaluates_now():
            val = trainer.evaluate()
            history.val.append((done, sum(val) / len(val)))
        history.seconds = time.perf_counter() - start
        if out is not None and (done == tcfg.steps or (checkpoint_every and done % checkpoint_every == 0)):
            written[done] = _save(out, done, trainer, net, history, settings)
        if progress is not None:
            progress(done, history)
    net.eval()
    return MTPTrainResult(net.model, net.mtp, history, written)
