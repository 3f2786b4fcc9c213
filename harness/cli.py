"""The `dsv3` command line: `dsv3 report`, `dsv3 profiles`.

Exit codes: 0 success, 2 bad usage or input (one line on stderr, no traceback), 1 a failed gate/conformance check.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from tabulate import tabulate

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import NUMERIC_FIELDS, Profile, ProfileError, load_profile, profile_names
from harness.environment import environment
from harness.formatting import significant
from harness.registry import UsageError
from harness.report import FORMATS, OUTPUT_FILES, progress_to_stderr, render, run_sections, write_outputs
from harness.report_sections import ReportContext
from harness.results import ResultsError

DEFAULT_MODELS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "qwen2.5-72b", "llama3.1-405b")
INPUT_ERRORS = (ConfigError, ProfileError, UsageError, ResultsError)
Named = TypeVar("Named", ModelConfig, Profile)
_LISTED = ("bf16_dense_TFLOPS", "fp8_dense_TFLOPS", "hbm_bandwidth_GBps", "scaleup_GBps_per_gpu",
           "scaleout_GBps_per_gpu")  # the columns of `dsv3 profiles`


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with exit 2 (argparse prints the whole usage otherwise)."""

    def error(self, message: str) -> None:
        """Raise the message as a UsageError, prefixed by the subcommand (`report: ...`) but not by the program's
        name: main() prints `dsv3: error: ` once in front of every error."""
        command = self.prog.partition(" ")[2]  # "dsv3 report" -> "report"; "dsv3" -> ""
        raise UsageError(f"{command}: {message}" if command else message)


def _positive_int(text: str) -> int:
    """argparse type for counts such as --threads: an integer >= 1 (0 or negative is a usage error, not a default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _load_model(spec: str) -> ModelConfig:
    """A preset name or a path to a JSON/TOML config (ours or a Hugging Face config.json)."""
    if Path(spec).suffix in (".json", ".toml") or Path(spec).exists():
        return ModelConfig.load(spec)
    return ModelConfig.preset(spec)


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
    named = [(s, _load_model(s)) for s in args.model]
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


def _out_dir(spec: str) -> Path:
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
    taken = [name for name in OUTPUT_FILES if (out / name).is_dir()]
    if taken:
        raise UsageError(f"--out {spec}: {taken[0]} is a directory; expected a file or nothing there")
    return out


def cmd_report(args: argparse.Namespace) -> int:
    """`dsv3 report`: every input (models, profiles, --out) is checked before the machine is probed or anything is
    measured, so that bad usage costs one line and no waiting."""
    models, chosen = _models(args)
    declared = _declared_profiles(args)  # validated first
    out = _out_dir(args.out) if args.out is not None else None
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # None: all cores; every measurement records it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    progress_to_stderr("probing the local machine ...")
    local = load_profile("local")
    ctx = ReportContext(models=tuple(models), profiles=(local, *declared), local=local, device=device,
                        full=args.full, chosen=tuple(chosen), progress=progress_to_stderr)
    tables = run_sections(ctx, progress_to_stderr)
    env = environment(device)
    if out is not None:
        write_outputs(out, tables, env)
        progress_to_stderr(f"wrote {' and '.join(str(out / name) for name in OUTPUT_FILES)}")
    sys.stdout.write(render(tables, env, args.format))
    return 0


def _show_profile(p: Profile) -> None:
    """One profile: every number (4 significant digits, as in the list) beside its source, then the notes."""
    rows = [[f, significant(p.get(f)), p.sources.get(f, "")] for f in NUMERIC_FIELDS if p.get(f) is not None]
    print(f"{p.name}: {p.description} [{p.kind}]\n")
    print(tabulate(rows, headers=["field", "value", "source"], tablefmt="simple", disable_numparse=True,
                   colalign=("left", "right", "left")))
    if p.notes:
        print(f"\nnotes: {p.notes}")


def _list_profiles() -> None:
    """The declared profiles side by side, 4 significant digits."""
    rows = [[p.name, *(significant(p.get(f)) for f in _LISTED), p.description]
            for p in map(load_profile, profile_names())]
    print(tabulate(rows, headers=["profile", "BF16 TFLOP/s", "FP8 TFLOP/s", "mem GB/s", "scale-up GB/s",
                                  "scale-out GB/s", "description"], tablefmt="simple", disable_numparse=True,
                   colalign=("left", *("right",) * len(_LISTED), "left")))
    print("\nlocal: probed on demand (`dsv3 profiles local`); a user profile: `dsv3 profiles path/to/profile.toml`")


def cmd_profiles(args: argparse.Namespace) -> int:
    """`dsv3 profiles [NAME|PATH]`: list the declared profiles, or show one with every number's source."""
    if args.name:
        _show_profile(load_profile(args.name))
    else:
        _list_profiles()
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
    rep.add_argument("--threads", type=_positive_int, metavar="N",
                     help="torch CPU threads for measurements, an integer >= 1 (default: all cores)")
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
