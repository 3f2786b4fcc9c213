"""The `dsv3` command line; one subcommand per module of `harness.commands` (`dsv3 report`, `dsv3 profiles`, ...).

Exit codes: 0 success, 2 bad usage or input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType

import harness.commands as commands
from harness.registry import UsageError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line with exit 2 (argparse prints the whole usage otherwise)."""

    def error(self, message: str) -> None:
        """Raise the message as a UsageError, prefixed by the subcommand (`report: ...`) but not by the program's
        name: main() prints `dsv3: error: ` once in front of every error."""
        command = self.prog.partition(" ")[2]  # "dsv3 report" -> "report"; "dsv3" -> ""
        raise UsageError(f"{command}: {message}" if command else message)


def subcommands() -> dict[str, ModuleType]:
    """Every module of harness.commands that defines `run`, by command name (module name, `_` read as `-`)."""
    found = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "run"):
            found[info.name.replace("_", "-")] = module
    return found


def build_parser(found: dict[str, ModuleType]) -> argparse.ArgumentParser:
    parser = _Parser(prog="dsv3", description="DeepSeek-V3 conformance and performance harness")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module in found.items():
        command = sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def _triton_interpreter_without_cuda() -> None:
    """On a machine without CUDA, Triton kernels can run only through Triton's interpreter, and Triton chooses when
    it is first imported (its standard library is built then). Some subcommand modules import it indirectly
    (through torch), so this comes first: without it `dsv3 conform --impl triton` failed every kernel."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    _triton_interpreter_without_cuda()
    found = subcommands()
    errors = tuple({UsageError, *(e for m in found.values() for e in m.INPUT_ERRORS)})
    try:
        args = build_parser(found).parse_args(argv)
        return args.func(args)
    except errors as e:
        print(f"dsv3: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
