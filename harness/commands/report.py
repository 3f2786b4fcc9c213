"""`dsv3 report`: the analytic tables and measurements of every registered section, each beside the paper's
value (quick by default; `--full` adds the experiments and benchmarks), in text, GitHub, LaTeX, CSV or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TypeVar

import torch

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import Profile, ProfileError, load_profile, profile_names
from harness.commands.common import load_model, positive_int
from harness.environment import environment
from harness.progress import Progress, notify
from harness.registry import UsageError
from harness.report import FORMATS, OUTPUT_FILES, render, run_sections, write_outputs
from harness.report_sections import ReportContext, sections
from harness.results import ResultsError

HELP = "analytic tables and measurements, each beside the paper's value"
INPUT_ERRORS = (ConfigError, ProfileError, ResultsError)
DEFAULT_MODELS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "qwen2.5-72b", "llama3.1-405b")
Named = TypeVar("Named", ModelConfig, Profile)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--out", metavar="DIR", help="also write report.md and results.json into DIR (atomically)")
    parser.add_argument("--profile", action="append", default=[], metavar="NAME|PATH",
                        help=f"hardware profile (repeatable); default: all of {', '.join(profile_names())}")
    parser.add_argument("--model", action="append", default=[], metavar="PRESET|PATH",
                        help="add a model: a preset name or a JSON/TOML config (ours or a Hugging Face config.json); "
                             "the measured tables of --full run the models given here")
    parser.add_argument("--full", action="store_true", help="add every registered experiment and benchmark (minutes)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="torch CPU threads for measurements, an integer >= 1 (default: all cores)")
    parser.add_argument("--plots", action="store_true",
                        help="with --out: also draw the figures (PNG) beside report.md, which embeds them "
                             "(needs the `plot` extra: matplotlib)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no messages on stderr")


def _unique(loaded: list[tuple[str, Named]], option: str, same: Callable[[Named, Named], bool]) -> list[Named]:
    """One item per name, in first-seen order. Records are keyed by name, so a repeat (given twice, or a file whose
    `name` is a preset's or a declared profile's) is dropped when it is the same thing, and is a UsageError when it is
    a different one (the two could not be told apart in the results)."""
    seen: dict[str, Named] = {}
    for spec, item in loaded:
        first = seen.setdefault(item.name, item)
        if not same(first, item):
            raise UsageError(f"{option} {spec}: name {item.name!r} is already taken by a different one; rename it")
    return list(seen.values())


def _models(args: argparse.Namespace) -> tuple[list[ModelConfig], list[ModelConfig]]:
    """The default models, then --model ones, each name once (a config's `source` note does not make it another);
    and the --model ones alone (the measured tables run those)."""
    named = [(s, load_model(s)) for s in args.model]
    models = _unique([(n, ModelConfig.preset(n)) for n in DEFAULT_MODELS] + named, "--model",
                     lambda a, b: a.replace(source="") == b.replace(source=""))
    names = {m.name for _, m in named}
    return models, [m for m in models if m.name in names]


def _declared_profiles(args: argparse.Namespace) -> list[Profile]:
    """The --profile ones (default: every declared profile), each name once; `local` is probed separately."""
    loaded = [(s, load_profile(s)) for s in (args.profile or profile_names()) if s != "local"]
    reserved = [s for s, p in loaded if p.name == "local"]
    if reserved:
        raise UsageError(f"--profile {reserved[0]}: name 'local' is reserved for the probed machine; rename it")
    return _unique(loaded, "--profile", lambda a, b: dataclasses.replace(a, path="") == dataclasses.replace(b, path=""))


def _out_dir(spec: str, figure_files: Sequence[str] = ()) -> Path:
    """--out: create the folder if missing and prove it writable (a temp file created and removed there), so that a
    bad destination is a one-line error before the measurements, not a traceback after them."""
    if not spec:
        raise UsageError("--out: expected a directory path, got ''")
    out = Path(spec)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--out {spec}: exists and is not a directory") from None
    except OSError as e:
        raise UsageError(f"--out {spec}: cannot create the directory ({e.strerror})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".dsv3-write-check."):
            pass
    except OSError as e:
        raise UsageError(f"--out {spec}: cannot write into the directory ({e.strerror})") from None
    taken = [name for name in (*OUTPUT_FILES, *figure_files) if (out / name).is_dir()]
    if taken:
        raise UsageError(f"--out {spec}: {taken[0]} is a directory; expected a file or nothing there")
    return out


def _plots_module(args: argparse.Namespace) -> ModuleType | None:
    """harness.plots when --plots is given (it needs --out and matplotlib), else None."""
    if not args.plots:
        return None
    if args.out is None:
        raise UsageError("--plots: needs --out DIR (the figures are files beside report.md)")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plots: needs matplotlib, which is not installed: pip install 'dsv3-harness[plot]'")
    return importlib.import_module("harness.plots")


def run(args: argparse.Namespace) -> int:
    """`dsv3 report`: every input (models, profiles, --out, --plots) is checked before the machine is probed or
    anything is measured, so that bad usage costs one line and no waiting."""
    models, chosen = _models(args)
    declared = _declared_profiles(args)  # validated first
    plots = _plots_module(args)
    out = _out_dir(args.out, plots.FIGURE_FILES if plots else ()) if args.out is not None else None
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # None: all cores; every measurement records it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen_sections = sections(args.full)
    with Progress(len(chosen_sections), "dsv3 report", quiet=args.quiet) as progress:
        progress("probing the local machine ...")
        local = load_profile("local")
        ctx = ReportContext(models=tuple(models), profiles=(local, *declared), local=local, device=device,
                            full=args.full, chosen=tuple(chosen), progress=progress, fraction=progress.fraction)
        tables = run_sections(ctx, chosen_sections, progress)
    env = environment(device)
    if out is not None:
        figures = plots.write_figures([r for t in tables for r in t.records], out) if plots else []
        write_outputs(out, tables, env, figures)
        written = [*OUTPUT_FILES, *(f.file for f in figures if f.file)]
        notify(f"wrote {', '.join(str(out / name) for name in written)}", args.quiet)
    sys.stdout.write(render(tables, env, args.format))
    return 0
