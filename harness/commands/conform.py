"""`dsv3 conform`: run the conformance suites against chosen implementations and print the conformance matrix,
property x implementation: pass, FAIL (with the first counterexample, shrunk, and the lines that rebuild it), n/a
(declared by the implementation, with its reason), skip, xfail / XPASS (a listed known deviation that fails /
now passes), ERROR. Exit 0 when every chosen implementation conforms, 1 when one fails a property, 2 on bad usage.
Example: dsv3 conform --impl reference --impl mykernels:make_moe --deviations known-deviations.toml."""

from __future__ import annotations

import argparse
import sys

import torch

from harness import conformance, matrix
from harness.deviations import DeviationsError
from harness.environment import environment
from harness.pytest_plugin import PROFILES
from harness.registry import COMPONENTS, implementations, load_all

HELP = "run the conformance suites against implementations and print the conformance matrix"
INPUT_ERRORS = (DeviationsError,)


def _jobs(text: str) -> str:
    """--jobs: a worker count >= 1 or `auto` (pytest-xdist's -n)."""
    if text == "auto" or (text.isdigit() and int(text) >= 1):
        return text
    raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--impl", action="append", default=[], metavar="NAME|module:factory",
                        help="an implementation (repeatable): a registered name (in every component that has it) or "
                             "module:factory (importable from the working directory); default: every registered one")
    parser.add_argument("--component", action="append", default=[], metavar="NAME",
                        help="only this component's properties (repeatable); default: those of the implementations")
    parser.add_argument("--format", choices=matrix.FORMATS, default="text")
    parser.add_argument("--deviations", metavar="FILE",
                        help="known deviations (TOML): listed failures become expected ones (xfail)")
    parser.add_argument("--hypothesis-profile", choices=tuple(PROFILES), default="ci",
                        help="examples per property: ci 15 (derandomized, default), dev 30, thorough 3000")
    parser.add_argument("-k", dest="select", metavar="EXPR", help="only the tests matching this pytest -k expression")
    parser.add_argument("--jobs", type=_jobs, metavar="N|auto", help="run in N processes (pytest-xdist)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--verbose", action="store_true", help="pytest's failure tracebacks on stderr")
    parser.add_argument("--list", action="store_true", help="list the components and implementations, run nothing")


def _list() -> None:
    load_all()
    for name, comp in COMPONENTS.items():
        print(f"{name}: {comp.description}")
        print(f"  protocol harness.protocols.{comp.protocol.__name__}; may declare not applicable: "
              f"{', '.join(comp.properties) or 'nothing'}")
        for impl in implementations(name):
            missing = impl.missing()
            note = f" (needs {', '.join(missing)})" if missing else ""
            print(f"  {impl.name}: {impl.description}{note}")


def run(args: argparse.Namespace) -> int:
    """`dsv3 conform`: plan and check the request (bad input: exit 2 before anything runs), run the suites
    (pytest's progress on stderr), print the matrix on stdout; exit 1 when a chosen implementation fails."""
    if args.list:
        _list()
        return 0
    request = conformance.Request(tuple(args.impl), tuple(args.component), args.hypothesis_profile, args.select,
                                  args.jobs, args.deviations, args.device, args.verbose)
    result = conformance.run(request)
    table = matrix.build(result)
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    sys.stdout.write(matrix.render(table, args.format, environment(device)))
    return 1 if table.failed or result.collection_errors else 0
