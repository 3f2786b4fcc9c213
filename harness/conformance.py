"""Run the conformance suites for chosen implementations and collect one outcome per test: what `dsv3 conform`
turns into the matrix (harness.matrix).

The suites run in this process: pytest over the installed `suites.conformance` package, narrowed to the chosen
components' implementation tests (the plugin's --dsv3-impl / --dsv3-component), optionally under pytest-xdist
(`jobs`), with a small collector plugin that reads what the plugin attaches to every report (`dsv3_conformance`:
component, test, variant, implementation, declared not-applicable skips, the failure's message, shrunk example,
rebuild lines and reproduction blob). Under xdist the reports reach the collector in this process, so it needs
no files. Everything the user names is checked before pytest starts, so that bad input is one line (a UsageError).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings

from harness import deviations, registry
from harness.pytest_plugin import PROFILES, report_info
from harness.registry import Implementation, UsageError

STATUSES = ("pass", "fail", "error", "n/a", "skip", "xfail", "xpass")
SUITES = "suites.conformance"


@dataclass(frozen=True)
class Outcome:
    """What became of one test of one implementation (one parameter variant)."""

    component: str
    test: str
    variant: str
    impl: str
    status: str  # one of STATUSES
    line: int = 0  # where the test is defined in its suite (orders the matrix's rows)
    reason: str = ""  # why it was skipped, declared not applicable or an expected failure
    message: str = ""  # a failure's first line
    details: str = ""  # the failure message's further lines
    example: str = ""  # hypothesis's shrunk failing example
    rebuild: str = ""  # lines that rebuild the failing case with public functions
    reproduce: str = ""  # hypothesis's @reproduce_failure blob


@dataclass(frozen=True)
class Request:
    """A conformance run: implementations (names or module:factory; empty: every registered one), components
    (empty: those of the implementations), hypothesis profile, -k expression, xdist workers, known-deviations file,
    device."""

    impls: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    profile: str = "ci"
    select: str | None = None
    jobs: str | None = None
    deviations: str | None = None
    device: str = "auto"
    verbose: bool = False


@dataclass
class Run:
    """The outcomes of a run, the implementations it chose and what pytest said."""

    request: Request
    implementations: list[Implementation]
    components: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    collection_errors: list[str] = field(default_factory=list)
    unused_deviations: list[str] = field(default_factory=list)
    exit_code: int = 0


def plan(request: Request) -> tuple[list[Implementation], list[str]]:
    """The implementations and components a request names, validated (UsageError, DeviationsError)."""
    registry.load_all()
    known = list(registry.COMPONENTS)
    unknown = [c for c in request.components if c not in known]
    if unknown:
        raise UsageError(f"--component: unknown component {unknown[0]!r}; known: {', '.join(known)}")
    found = [i for spec in request.impls for i in registry.resolve(spec)] if request.impls else \
        registry.implementations()
    chosen = [i for i in found if not request.components or i.component in request.components]
    if not chosen:
        raise UsageError(f"no implementation of {', '.join(request.components)} among {', '.join(request.impls)}")
    if request.profile not in PROFILES:
        raise UsageError(f"--hypothesis-profile: expected one of {', '.join(PROFILES)}, got {request.profile!r}")
    if request.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    if request.jobs is not None and importlib.util.find_spec("xdist") is None:
        raise UsageError("--jobs: needs pytest-xdist (pip install pytest-xdist)")
    if request.deviations:
        deviations.load(request.deviations, tuple(known))
    components = [c for c in known if any(i.component == c for i in chosen)]
    return chosen, components


def pytest_args(request: Request, components: list[str], inifile: Path) -> list[str]:
    """The pytest command line of a request; `inifile` (an empty one) keeps the configuration of the folder it runs
    from (a user's pytest.ini or pyproject.toml, their addopts) out of the run, and the rootdir is the suites'."""
    root = Path(importlib.util.find_spec("suites").origin).resolve().parent.parent
    args = ["-c", str(inifile), "--rootdir", str(root),
            "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=short" if request.verbose else "--tb=no",
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            "--pyargs", SUITES, "-m", "conformance", "--hypothesis-profile", request.profile,
            "--dsv3-device", request.device]
    for spec in request.impls:
        args += ["--dsv3-impl", spec]
    for component in components:
        args += ["--dsv3-component", component]
    if request.deviations:
        args += ["--dsv3-deviations", request.deviations]
    if request.select:
        args += ["-k", request.select]
    if request.jobs is not None:
        args += ["-n", request.jobs]
    return args


class Collector:
    """pytest plugin: one Outcome per conformance test from its reports (setup, call, teardown)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.collection_errors: list[str] = []
        self.deviations_seen: set[str] = set()

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            text = str(report.longrepr).strip().splitlines()
            self.collection_errors.append(f"{report.nodeid or SUITES}: {text[-1] if text else 'collection failed'}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info = report_info(report)
        if info is None:
            return
        if "deviation" in info:
            self.deviations_seen.add(info["deviation"])
        previous = self.outcomes.get(report.nodeid)
        outcome = _outcome(report, info)
        if outcome is not None and (previous is None or report.when != "teardown" or outcome.status == "error"):
            self.outcomes[report.nodeid] = outcome


def _reason(report: pytest.TestReport) -> str:
    """A skip's reason (longrepr (path, line, "Skipped: ...")) or an expected failure's."""
    if hasattr(report, "wasxfail"):
        return str(report.wasxfail).removeprefix("reason: ")
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return ""


def _outcome(report: pytest.TestReport, info: dict[str, Any]) -> Outcome | None:
    """The outcome one phase's report gives (None for a passing setup or teardown)."""
    base = {k: info[k] for k in ("component", "test", "variant", "impl", "line")}
    details = {k: info.get(k, "") for k in ("message", "details", "example", "rebuild", "reproduce")}
    if report.failed:
        return Outcome(**base, status="fail" if report.when == "call" else "error", **details)
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return Outcome(**base, status="xfail", reason=_reason(report), **details)
        return Outcome(**base, status="n/a" if info["not_applicable"] else "skip", reason=_reason(report))
    if report.when != "call":
        return None
    if hasattr(report, "wasxfail"):
        return Outcome(**base, status="xpass", reason=_reason(report))
    return Outcome(**base, status="pass")


def run(request: Request) -> Run:
    """Plan the request (bad input: UsageError before anything runs), run the suites in this process with
    pytest's own output on stderr, and collect the outcomes."""
    implementations, components = plan(request)
    collector = Collector()
    profile = settings.get_current_profile_name()
    try:
        with tempfile.TemporaryDirectory(prefix="dsv3-conform-") as tmp, contextlib.redirect_stdout(sys.stderr):
            inifile = Path(tmp) / "pytest.ini"
            inifile.write_text("[pytest]\n")
            code = pytest.main(pytest_args(request, components, inifile), plugins=[collector])
    finally:
        settings.load_profile(profile)  # the suites' session loaded its own
    if code == pytest.ExitCode.USAGE_ERROR:
        raise UsageError("pytest rejected the run (its message is above)")
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        selection = f" matching -k {request.select!r}" if request.select else ""
        raise UsageError(f"no conformance test{selection} runs against the chosen implementations")
    used = collector.deviations_seen
    entries = deviations.load(request.deviations, tuple(registry.COMPONENTS)) if request.deviations else ()
    return Run(request, implementations, components, list(collector.outcomes.values()),
               collector.collection_errors, sorted(d.key for d in entries if d.key not in used), int(code))
