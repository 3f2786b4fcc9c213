"""`dsv3 experiment NAME`: run one registered experiment at a chosen size, write its records, print its tables.

`dsv3 experiment fp8-training` trains FP8 against BF16 over paired seeds (harness.experiments.fp8_training): the
`long` budget by default (`--budget report` is what `dsv3 report --full` runs), each field overridable
(`--model`, `--seeds`, `--steps`, `--device`, ...). With `--out DIR` the records are written to DIR/results.json
after every seed (atomically), so a stopped or interrupted run keeps the seeds it completed, and DIR/report.md at
the end. A progress bar on stderr shows the share of training steps done and the latest loss (silent off a terminal
and under --quiet).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from dsv3ref.config import ConfigError
from dsv3ref.fp8.quant import FP8Error
from dsv3ref.train import TrainError
from harness.commands.common import int_at_least, load_model, positive_int
from harness.commands.report import _out_dir
from harness.environment import environment
from harness.experiments import fp8_training
from harness.progress import Progress, notify
from harness.report import FORMATS, render, write_outputs
from harness.results import ResultsError

HELP = "run an experiment at a chosen size (fp8-training: FP8 vs BF16 training over paired seeds)"
INPUT_ERRORS = (ConfigError, FP8Error, TrainError, ResultsError, fp8_training.ExperimentError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="NAME")
    fp8 = sub.add_parser("fp8-training", help="FP8 vs BF16 training: signed gap, 95%% interval, noise floor",
                         description=fp8_training.__doc__.split("\n\n")[0])
    fp8.add_argument("--budget", choices=tuple(fp8_training.BUDGETS), default="long",
                     help="the sizes to start from (report: what `dsv3 report --full` runs; default long)")
    fp8.add_argument("--model", metavar="PRESET|PATH", help="model preset or JSON/TOML config (every projection "
                     "input a multiple of 128; default: the budget's)")
    fp8.add_argument("--seeds", type=positive_int, metavar="N", help="paired seeds (>= 2)")
    fp8.add_argument("--first-seed", type=int_at_least(0), metavar="S",
                     help="seeds S, S+1, ... (default 0; run shards of one experiment on several machines)")
    fp8.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps per run")
    fp8.add_argument("--batch-size", type=positive_int, metavar="N", help="sequences per step")
    fp8.add_argument("--seq-len", type=positive_int, metavar="N", help="bytes per sequence")
    fp8.add_argument("--eval-batches", type=int_at_least(0), metavar="N",
                     help="validation batches per evaluation (0: the whole validation split)")
    fp8.add_argument("--lr", type=float, metavar="X", help="peak learning rate")
    fp8.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    fp8.add_argument("--fp8-backend", choices=("auto", "torch", "fused", "triton"),
                     help="FP8 GEMM path (auto: triton on CUDA, fused on a CPU with a C++ compiler, else torch)")
    fp8.add_argument("--other-ops", choices=("auto", "bf16", "fp32"),
                     help="dtype of everything but the compared GEMMs (auto: bf16 on CUDA, fp32 on the CPU)")
    fp8.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: all cores)")
    fp8.add_argument("--format", choices=FORMATS, default="text")
    fp8.add_argument("--out", metavar="DIR", help="write results.json (after every seed) and report.md into DIR")
    fp8.add_argument("--quiet", action="store_true", help="no progress bar and no messages on stderr")


def _budget(args: argparse.Namespace) -> fp8_training.Budget:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return fp8_training.with_overrides(
        fp8_training.BUDGETS[args.budget], model=args.model, seeds=args.seeds, first_seed=args.first_seed,
        steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, eval_batches=args.eval_batches, lr=args.lr, device=device,
        fp8_backend=args.fp8_backend, other_ops=args.other_ops)


def run(args: argparse.Namespace) -> int:
    """Inputs (budget, model, --out) are checked before anything is trained."""
    budget = _budget(args)
    cfg = load_model(budget.model)
    fp8_training.check_model(cfg)
    out = _out_dir(args.out) if args.out is not None else None
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    env = environment(budget.device)

    def save(result: fp8_training.Fp8TrainingResult) -> None:
        if out is not None:
            write_outputs(out, fp8_training.tables(result), env)

    notify(f"fp8-training: {dataclasses.asdict(budget)}", args.quiet)
    with Progress(1, "fp8-training", quiet=args.quiet) as progress:
        result = fp8_training.run_experiment(budget, cfg, progress=progress, on_seed=save, fraction=progress.fraction)
    save(result)
    sys.stdout.write(render(fp8_training.tables(result), env, args.format))
    if result.stopped:
        raise fp8_training.ExperimentError(f"fp8-training stopped: {result.stopped}"
                                           + (f" (records kept in {out})" if out is not None else ""))
    return 0
