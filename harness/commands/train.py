"""`dsv3 train`: train a model preset with its MTP modules on the standard-library byte corpus.

The objective is DeepSeek-V3's: next-token loss + (λ/D) Σ_k L_k (dsv3ref.mtp_train). `--seed` fixes the initial
weights and the data order, so a run is reproducible; checkpoints (safetensors, official layout with the MTP layer)
go to `--out DIR/step-NNNNNN/` every `--checkpoint-every` steps and after the last; `--resume` continues from the
latest one exactly as the uninterrupted run would. A progress bar (loss, main, MTP) goes to stderr; the loss
curve's summary is printed at the end and kept in each checkpoint's history.json. A trained checkpoint drafts for
speculative decoding (`dsv3ref.speculative`).

Example (the run documented in docs/mtp.md): `dsv3 train --model dsv3-small --steps 600 --out runs/mtp-small`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dsv3ref.checkpoint import CheckpointError
from dsv3ref.config import ConfigError
from dsv3ref.corpus import CorpusError, stdlib_corpus
from dsv3ref.mtp import MTPError
from dsv3ref.mtp_train import LAMBDA, History, train_mtp
from dsv3ref.train import TrainConfig, TrainError
from harness.commands.common import load_model, positive_int
from harness.commands.report import _out_dir

HELP = "train a model preset with its MTP modules (checkpoints, exact resume, progress bar)"
INPUT_ERRORS = (ConfigError, TrainError, MTPError, CheckpointError, CorpusError)
CURVE_POINTS = 6  # rows of the printed loss-curve summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dsv3-small", metavar="PRESET|PATH",
                        help="model preset or JSON/TOML config with mtp_depth >= 1 (default dsv3-small)")
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder (step-NNNNNN/ inside)")
    parser.add_argument("--steps", type=positive_int, default=600, metavar="N", help="optimizer steps (600)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="sequences per step (8)")
    parser.add_argument("--seq-len", type=positive_int, default=128, metavar="N", help="bytes per sequence (128)")
    parser.add_argument("--lr", type=float, default=3e-3, metavar="X", help="peak learning rate (3e-3)")
    parser.add_argument("--warmup", type=int, default=20, metavar="N", help="warm-up steps (20)")
    parser.add_argument("--mtp-lambda", type=float, default=LAMBDA, metavar="X",
                        help=f"MTP loss weight λ ({LAMBDA}, DeepSeek-V3's for its first 10T tokens)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="initial weights and data order (0)")
    parser.add_argument("--checkpoint-every", type=int, default=100, metavar="N",
                        help="steps between checkpoints (100; 0: only after the last)")
    parser.add_argument("--eval-every", type=int, default=100, metavar="N",
                        help="steps between validation losses (100; 0: after the last only)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="default: bf16 on CUDA, fp32 on a CPU (BF16 matmuls are emulated on most CPUs)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: all cores)")


class _Bar:
    """The progress bar: tqdm on stderr (a plain line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, unit="step", file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def __call__(self, step: int, h: History) -> None:
        mtp = sum(h.depths[-1]) / max(1, len(h.depths[-1]))
        self.bar.set_postfix(loss=f"{h.total[-1]:.3f}", main=f"{h.main[-1]:.3f}", mtp=f"{mtp:.3f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def curve_summary(h: History, points: int = CURVE_POINTS) -> list[str]:
    """Lines: loss means over evenly spaced windows of steps (total, main, MTP per depth), the validation losses."""
    lines = ["steps          total   main   " + " ".join(f"mtp{k + 1}  " for k in range(len(h.depths[0])))]
    for lo, hi, total, main, depths in h.windows(points):
        lines.append(f"{lo:>5}-{hi:<6}  {total:.3f}  {main:.3f}  " + "  ".join(f"{d:.3f}" for d in depths))
    lines.append("validation (total loss): " + ", ".join(f"step {s}: {v:.3f}" for s, v in h.val))
    return lines


def run(args: argparse.Namespace) -> int:
    cfg = load_model(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")
    tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                       warmup_steps=args.warmup, data_seed=args.seed, eval_every=args.eval_every,
                       precision=args.precision or ("bf16" if device == "cuda" else "fp32"), name=f"train {cfg.name}")
    out = _out_dir(args.out)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    corpus = stdlib_corpus()
    bar = _Bar(args.steps, 0)
    try:
        result = train_mtp(cfg, corpus, tcfg, out, lam=args.mtp_lambda, init_seed=args.seed,
                           checkpoint_every=args.checkpoint_every, resume=args.resume, device=device, progress=bar)
    finally:
        bar.close()
    h = result.history
    print(f"{cfg.name}: {len(h.total)} steps, batch {tcfg.batch_size} x {tcfg.seq_len} bytes, {tcfg.precision} on "
          f"{device}, λ {args.mtp_lambda}, seed {args.seed}, {h.seconds:.0f} s of training")
    print("\n".join(curve_summary(h)))
    print(f"checkpoints: {', '.join(str(p) for p in result.checkpoints.values())}")
    return 0
