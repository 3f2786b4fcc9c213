"""Workloads of Multi-Token Prediction measured on a model the trainer trained: second-token acceptance of
speculative decoding with the MTP module as drafter, and generation speed with and without speculation, side by
side.

The run: `PLAN` (a small preset, the standard-library byte corpus, DeepSeek-V3's λ = 0.3), trained once and cached
under `cache_root()/<preset>-<hash of the run's settings>/` (the layout of `dsv3 train --out`; an interrupted
training resumes), with checkpoints along the way for acceptance against training steps. Acceptance: greedy
(and sampled, temperature 1) speculative decoding of `NEW_TOKENS` bytes from `PROMPTS` validation-split prompts of
`PROMPT_LEN` bytes, one draft per step: accepted / drafted, mean accepted length (tokens emitted per verify step,
the bonus or corrected token included), tokens per main-model forward. Speed: `generate` vs
`speculative_generate` of the same prompt (batch 1, greedy), timed interleaved; the ratio plain / speculative.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dsv3ref.checkpoint import load_checkpoint
from dsv3ref.config import ModelConfig
from dsv3ref.corpus import fixed_batches, stdlib_corpus
from dsv3ref.generate import Sampling, generate
from dsv3ref.model import Transformer
from dsv3ref.mtp import MTP
from dsv3ref.mtp_train import LAMBDA, History, checkpoints, run_settings, train_mtp
from dsv3ref.speculative import SpeculativeGeneration, speculative_generate
from dsv3ref.train import TrainConfig
from hardware.timing import Timing, time_interleaved
from harness import paper
from harness.analytic.params import param_counts
from harness.bench.common import conditions, dtype_name, speedup_record
from harness.results import Record

MODEL = "dsv3-tiny"  # the trained preset when --model names none that fits
PLAN = TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=20, data_seed=0, eval_every=100,
                   precision="fp32")
CHECKPOINT_EVERY = 50
ACCEPT_STEPS = (50, 100, 200, 400)  # acceptance measured at these checkpoints
MAX_PARAMS = 5_000_000  # a --model is trained here only up to this size (CPU minutes)
PROMPTS, PROMPT_LEN, NEW_TOKENS = 8, 32, 64
SPEED_NEW_TOKENS = 64
V3 = "deepseek-v3-671b"


def fits_here(cfg: ModelConfig) -> bool:
    """A model with MTP modules small enough to train in minutes on a CPU."""
    return cfg.attention.kind == "mla" and cfg.mtp_depth >= 1 and param_counts(cfg).total <= MAX_PARAMS


def cache_root() -> Path:
    """$DSV3_CACHE_DIR, else $XDG_CACHE_HOME/dsv3-harness, else ~/.cache/dsv3-harness; `mtp/` inside."""
    base = os.environ.get("DSV3_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "dsv3-harness"
    return Path(base) / "mtp"


def run_dir(cfg: ModelConfig, tcfg: TrainConfig | None = None, lam: float = LAMBDA, seed: int = 0) -> Path:
    """The cached run's folder: keyed by everything that defines it (model, training settings (default PLAN), λ,
    seed)."""
    key = json.dumps(run_settings(cfg, tcfg or PLAN, lam, seed), sort_keys=True)
    return cache_root() / f"{cfg.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def trained(cfg: ModelConfig, device: str, progress: Callable[[int, History], None] | None = None,
            tcfg: TrainConfig | None = None) -> tuple[Path, History]:
    """The run's folder with every checkpoint, training (or resuming) only what the cache lacks; the history.
    tcfg: default PLAN."""
    tcfg = tcfg or PLAN
    out = run_dir(cfg, tcfg)
    done = checkpoints(out)
    if tcfg.steps not in done:
        train_mtp(cfg, stdlib_corpus(), tcfg, out, lam=LAMBDA, checkpoint_every=CHECKPOINT_EVERY, resume=True,
                  device=device, progress=progress)
        done = checkpoints(out)
    saved = json.loads((done[tcfg.steps] / "history.json").read_text())
    return out, History(saved["total"], saved["main"], saved["depths"], [tuple(v) for v in saved["val"]],
                        saved["seconds"])


def load_step(out: Path, step: int, device: str) -> tuple[Transformer, MTP]:
    """The model (absorbed MLA, eval) and its MTP modules at a checkpoint."""
    ck = load_checkpoint(checkpoints(out)[step] / "model", mtp=True, device=device)
    return ck.model, MTP.from_state_dict(ck.model, ck.mtp)


def prompts(count: int | None = None) -> list[list[int]]:
    """`count` (default PROMPTS) evenly spaced windows of PROMPT_LEN bytes of the validation split (files the model
    did not train on)."""
    (x, _), = fixed_batches(stdlib_corpus().val, count or PROMPTS, PROMPT_LEN, 1)
    return x.tolist()


@dataclass(frozen=True)
class Acceptance:
    """One speculative generation's counts and the settings it ran with."""

    cfg: ModelConfig
    steps_trained: int
    sampling: Sampling
    gen: SpeculativeGeneration
    new_tokens: int

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify step of a row (accepted drafts + the bonus or corrected token)."""
        row_steps = self.gen.row_forwards - len(self.gen.tokens)  # the forwards after each row's prefill
        return 1 + self.gen.accepted / row_steps if row_steps else float("nan")


def acceptance(model: Transformer, mtp: MTP, steps_trained: int, sampling: Sampling,
               rows: list[list[int]] | None = None) -> Acceptance:
    """Speculative decoding (one draft per step) of NEW_TOKENS from each validation prompt."""
    gen = speculative_generate(model, mtp, rows or prompts(), NEW_TOKENS, sampling=sampling)
    return Acceptance(model.cfg, steps_trained, sampling, gen, NEW_TOKENS)


@torch.no_grad()
def text_acceptance(model: Transformer, mtp: MTP, windows: int = 8, length: int = 128) -> tuple[float, float]:
    """The first module's acceptance on validation text rather than on the model's own output: at every position
    of fixed validation windows, whether its draft of the token after next equals the main model's greedy choice
    one position later (greedy), and the rejection rule's acceptance probability Σ_v min(p, q) at temperature 1
    (sampled); means over positions."""
    (x, _), = fixed_batches(stdlib_corpus().val, windows, length, 1)
    x = x.to(model.embed.weight.device)
    h0 = model.hidden(x)
    p = model.logits(h0[:, 1:])  # position i + 1: the main model's next token, t_{i+2}
    q = mtp.logits(model, 0, mtp.hidden_states(model, h0, x)[0])  # position i: the draft of t_{i+2}
    greedy = (p.argmax(-1) == q.argmax(-1)).double().mean()
    sampled = torch.minimum(p.double().softmax(-1), q.double().softmax(-1)).sum(-1).mean()
    return float(greedy), float(sampled)


def acceptance_record(a: Acceptance, device: str) -> Record:
    """mtp_acceptance_rate (measured): accepted / drafted, with the paper's 80-90% (middle) as reference."""
    ref = paper.ref("mtp_acceptance_rate", V3)
    g = a.gen
    extra = {"model": a.cfg.name, "steps_trained": a.steps_trained, "batch": len(g.tokens),
             "sampling": "greedy" if a.sampling.temperature == 0 else f"temperature {a.sampling.temperature}",
             "drafted": g.drafted, "accepted": g.accepted, "verify_steps": g.steps,
             "mean_accepted_length": a.mean_accepted_length, "tokens_per_forward": g.tokens_per_forward,
             "new_tokens": a.new_tokens, "prompt_len": PROMPT_LEN, "draft_len": 1, **conditions(device)}
    return Record("mtp_acceptance_rate", f"{a.cfg.name}@{a.steps_trained}", g.acceptance_rate, "ratio",
                  kind="measured", paper=ref and ref.value, method="speculative decoding, accepted / drafted",
                  extra=extra)


def speedup(model: Transformer, mtp: MTP, steps_trained: int, device: str, reps: int = 5,
            new_tokens: int | None = None) -> tuple[dict[str, Timing], SpeculativeGeneration, Record]:
    """Greedy generation (new_tokens, default SPEED_NEW_TOKENS) of one validation prompt, plain vs speculative,
    timed side by side (batch 1)."""
    new_tokens = new_tokens or SPEED_NEW_TOKENS
    prompt = prompts(1)
    runs = {"plain": lambda: generate(model, prompt, new_tokens),
            "speculative": lambda: speculative_generate(model, mtp, prompt, new_tokens)}
    times = time_interleaved(runs, device=device, warmup=1, reps=reps)
    gen = speculative_generate(model, mtp, prompt, new_tokens)
    ref = paper.ref("mtp_speedup", V3)
    extra = {"model": model.cfg.name, "steps_trained": steps_trained, "batch": 1, "sampling": "greedy",
             "new_tokens": new_tokens, "acceptance_rate": gen.acceptance_rate,
             "tokens_per_forward": gen.tokens_per_forward, "dtype": dtype_name(model.embed.weight.dtype),
             "tokens_per_s_plain": new_tokens / times["plain"].median,
             "tokens_per_s_speculative": new_tokens / times["speculative"].median, **conditions(device)}
    record = speedup_record("mtp_speedup", f"{model.cfg.name}@{steps_trained}", times["plain"], times["speculative"],
                            extra)
    return times, gen, dataclasses.replace(record, paper=ref and ref.value)
