"""The `dsv3` command line: `dsv3 report`, `dsv3 profiles`.

Exit codes: 0 success, 2 bad usage or input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from tabulate import tabulate

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import NUMERIC_FIELDS, ProfileError, load_profile, profile_names
from harness.environment import environment
from harness.registry import UsageError
from harness.report import FORMATS, progress_to_stderr, render, run_sections, write_outputs
from harness.report_sections import ReportContext
from harness.results import ResultsError

DEFAULT_MODELS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "qwen2.5-72b", "llama3.1-405b")
INPUT_ERRORS = (ConfigError, ProfileError, UsageError, ResultsError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints the whole usage otherwise)
        raise UsageError(f"{self.prog}: {message}")


def _load_model(spec: str) -> ModelConfig:
    """A preset name or a path to a JSON/TOML config (ours or a Hugging Face config.json)."""
    if Path(spec).suffix in (".json", ".toml") or Path(spec).exists():
        return ModelConfig.load(spec)
    return ModelConfig.preset(spec)


def cmd_report(args: argparse.Namespace) -> int:
    chosen = [_load_model(s) for s in args.model]
    models = [ModelConfig.preset(n) for n in DEFAULT_MODELS] + chosen
    declared = [load_profile(n) for n in (args.profile or profile_names()) if n != "local"]  # validated first
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # every measurement records this count
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress_to_stderr("probing the local machine ...")
    local = load_profile("local")
    ctx = ReportContext(models=tuple(models), profiles=(local, *declared), local=local, device=device,
                        full=args.full, chosen=tuple(chosen), progress=progress_to_stderr)
    tables = run_sections(ctx, progress_to_stderr)
    env = environment(device)
    if args.out:
        write_outputs(Path(args.out), tables, env)
        progress_to_stderr(f"wrote {Path(args.out) / 'report.md'} and {Path(args.out) / 'results.json'}")
    sys.stdout.write(render(tables, env, args.format))
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    if args.name:
        p = load_profile(args.name)
        rows = [[f, p.get(f), p.sources.get(f, "")] for f in NUMERIC_FIELDS if p.get(f) is not None]
        print(f"{p.name}: {p.description} [{p.kind}]\n")
        print(tabulate(rows, headers=["field", "value", "source"], tablefmt="simple", disable_numparse=True))
        if p.notes:
            print(f"\nnotes: {p.notes}")
        return 0
    rows = []
    for name in profile_names():
        p = load_profile(name)
        rows.append([p.name, p.bf16_dense_TFLOPS, p.fp8_dense_TFLOPS, p.hbm_bandwidth_GBps, p.scaleup_GBps_per_gpu,
                     p.scaleout_GBps_per_gpu, p.description])
    print(tabulate(rows, headers=["profile", "BF16 TFLOP/s", "FP8 TFLOP/s", "mem GB/s", "scale-up GB/s",
                                  "scale-out GB/s", "description"], tablefmt="simple", missingval="—"))
    print("\nlocal: probed on demand (`dsv3 profiles local`); a user profile: `dsv3 profiles path/to/profile.toml`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv3", description="DeepSeek-V3 conformance and performance harness")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rep = sub.add_parser("report", help="analytic tables and measurements, each beside the paper's value")
    rep.add_argument("--format", choices=FORMATS, default="text")
    rep.add_argument("--out", metavar="DIR", help="also write report.md and results.json into DIR (atomically)")
    rep.add_argument("--profile", action="append", default=[], metavar="NAME|PATH",
                     help=f"hardware profile (repeatable); default: all of {', '.join(profile_names())}")
    rep.add_argument("--model", action="append", default=[], metavar="PRESET|PATH",
                     help="add a model: a preset name or a JSON/TOML config (ours or a Hugging Face config.json)")
    rep.add_argument("--full", action="store_true", help="add every registered experiment and benchmark (minutes)")
    rep.add_argument("--threads", type=int, default=0, help="torch CPU threads for measurements (default: all cores)")
    rep.set_defaults(func=cmd_report)
    prof = sub.add_parser("profiles", help="list the hardware profiles, or show one with its sources")
    prof.add_argument("name", nargs="?", metavar="NAME|PATH", help="a profile to show (`local` probes this machine)")
    prof.set_defaults(func=cmd_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except INPUT_ERRORS as e:
        print(f"dsv3: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
