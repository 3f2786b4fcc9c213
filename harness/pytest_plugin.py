"""pytest plugin (entry point `pytest11`): options, markers, hypothesis profiles and implementation fixtures.

A suite module declares its component with `pytest.mark.dsv3_component("mla")`; a test that takes the fixture
`impl` then runs once per selected implementation of that component (`--dsv3-impl`, repeatable; default: every
registered implementation whose optional modules are importable). When implementations or components are named
(`--dsv3-impl`, `--dsv3-component`), only the tests that run against them are kept: the other components' tests
and the implementation-independent ones are deselected.

Every report of such a test carries, as its attribute `dsv3_conformance`, what the conformance matrix needs:
component, test, variant, implementation, whether a skip was a declared "not applicable", and for a failure its
message, the shrunk hypothesis example, the lines that rebuild it and the reproduction blob (`dsv3 conform`
reads them, under pytest-xdist too). `--dsv3-deviations FILE` turns the listed known deviations into expected
failures (harness.deviations).

Importing the plugin, and a session that collects none of the suites, imports no torch and changes nothing (it
only registers the hypothesis profiles, so that --hypothesis-profile can name them): `activate(config)` prepares
a session (Triton's interpreter on a machine without CUDA, loading a hypothesis profile), called by the
conftest.py of `suites/` and `tests/` when they are collected. Under pytest-xdist every worker appends nothing
itself: it hands its measured records to the controller, which writes the results file once.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

MARKERS = {
    "conformance": "conformance property test of a component (suites/conformance)",
    "perf": "performance measurement (suites/performance); deselected in the default test run",
    "gpu": "needs a CUDA GPU; skipped with the reason when there is none",
    "slow": "takes minutes; deselected in the default test run",
    "distributed": "starts several processes (torch.distributed)",
    "dsv3_component(name)": "the component whose implementations the `impl` fixture iterates",
}
PROFILES = {  # hypothesis profiles: ci (the default test run), dev (pytest by hand), thorough (--hypothesis-profile)
    "ci": {"derandomize": True, "max_examples": 15},
    "dev": {"max_examples": 30},
    "thorough": {"max_examples": 3000},
}
# Every profile stops at the first failure and skips hypothesis's "explain" phase: a conformance failure needs one
# shrunk counterexample, and both searches would cost minutes per failing property.
for _name, _options in PROFILES.items():
    settings.register_profile(_name, deadline=None, print_blob=True, report_multiple_bugs=False,
                              phases=[p for p in Phase if p is not Phase.explain],
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **_options)

REPORT_ATTRIBUTE = "dsv3_conformance"  # the report attribute that describes a conformance test's report (a dict:
# pytest-xdist carries a report's extra attributes from the workers, as it does hypothesis's statistics)
_CURRENT: ContextVar[tuple[str, str] | None] = ContextVar("dsv3_current_impl", default=None)
_DEVIATION = pytest.StashKey[Any]()


class NotApplicable(pytest.skip.Exception):
    """The skip of a test whose property the implementation declares not applicable (reported as such)."""


class _State:
    """The plugin's per-session state (kept in config.stash)."""

    def __init__(self) -> None:
        self.active = False
        self.selected: list[Any] | None = None  # Implementations named by --dsv3-impl; None: every available one
        self.components: frozenset[str] | None = None  # --dsv3-component; None: every one
        self.deviations: tuple[Any, ...] = ()  # harness.deviations.Deviation entries of --dsv3-deviations
        self.records: list[Any] = []

    @property
    def narrowed(self) -> bool:
        """True when the session asked for given implementations or components (only their tests run)."""
        return self.selected is not None or self.components is not None


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    """The session's plugin state (created by whichever hook needs it first: conftests may configure first)."""
    return config.stash.setdefault(_STATE, _State())


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3", "dsv3-harness")
    group.addoption("--dsv3-impl", action="append", default=[], metavar="NAME|module:factory",
                    help="implementation to run the suites against (repeatable); default: all available. Only the "
                         "tests that run against the named ones are kept")
    group.addoption("--dsv3-component", action="append", default=[], metavar="NAME",
                    help="keep only this component's implementation tests (repeatable)")
    group.addoption("--dsv3-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device for the suites (auto: cuda when available)")
    group.addoption("--dsv3-results", default=None, metavar="FILE",
                    help="append measured records to this results document (written atomically)")
    group.addoption("--dsv3-deviations", default=None, metavar="FILE",
                    help="known deviations (TOML, see harness.deviations): listed failures are expected ones")


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    asked = ("--dsv3-impl", "--dsv3-component", "--dsv3-deviations")
    if any(config.getoption(o) for o in asked) or config.getoption("--dsv3-device") == "cuda":
        activate(config)  # asked for explicitly: resolve now, so a bad value is a usage error before collection


def activate(config: pytest.Config) -> None:
    """Prepare a session that runs suites (idempotent): Triton's interpreter without CUDA (Triton picks its
    backend when first imported), the hypothesis profile (`ci` when CI is set, else `dev`, unless
    --hypothesis-profile names one), the implementations named by --dsv3-impl (user factories imported, created
    and checked now), the components of --dsv3-component and the --dsv3-deviations file."""
    state = _state(config)
    if state.active:
        return
    state.active = True
    import torch

    from harness import deviations, registry

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("ci" if os.environ.get("CI") else "dev")
    if config.getoption("--dsv3-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--dsv3-device cuda: torch.cuda.is_available() is False on this machine")
    specs, components = config.getoption("--dsv3-impl"), config.getoption("--dsv3-component")
    registry.load_all()
    try:
        state.selected = [impl for spec in specs for impl in registry.resolve(spec)] if specs else None
        state.components = frozenset(map(_component, components)) if components else None
        path = config.getoption("--dsv3-deviations")
        state.deviations = deviations.load(path, tuple(registry.COMPONENTS)) if path else ()
    except (registry.UsageError, deviations.DeviationsError) as e:
        raise pytest.UsageError(str(e)) from None
    if state.deviations:
        config.pluginmanager.register(DeviationTracker(state, path), "dsv3-deviations")


def _component(name: str) -> str:
    from harness import registry

    if name not in registry.COMPONENTS:
        raise registry.UsageError(f"--dsv3-component: unknown component {name!r}; known: "
                                  f"{', '.join(registry.COMPONENTS)}")
    return name


def device(config: pytest.Config) -> str:
    """'cuda' or 'cpu', from --dsv3-device (auto: cuda when available)."""
    choice = config.getoption("--dsv3-device")
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" not in metafunc.fixturenames:
        return
    from harness import registry

    activate(metafunc.config)
    marker = metafunc.definition.get_closest_marker("dsv3_component")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: uses `impl` without pytest.mark.dsv3_component")
    component = marker.args[0]
    registry.load_all()
    if component not in registry.COMPONENTS:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown component {component!r}")
    state = _state(metafunc.config)
    pool = registry.implementations(component) if state.selected is None else state.selected
    chosen = state.components is None or component in state.components
    impls = [i for i in pool if i.component == component] if chosen else []
    params = [pytest.param(i, id=i.name, marks=_marks(i, metafunc.config)) for i in impls]
    if not params:
        params = [pytest.param(None, id="none-selected",
                               marks=pytest.mark.skip(reason=f"no selected implementation of {component!r}"))]
    metafunc.parametrize("impl", params, indirect=True)


def _marks(impl: Any, config: pytest.Config) -> list[Any]:
    missing = impl.missing()
    if missing:
        return [pytest.mark.skip(reason=f"{impl.component}/{impl.name} needs {', '.join(missing)} (not installed)")]
    if device(config) not in impl.devices:
        return [pytest.mark.skip(reason=f"{impl.component}/{impl.name} does not run on {device(config)}")]
    return []


def implementation_of(item: pytest.Item) -> Any:
    """The registry Implementation an item runs against, or None (implementation-independent, none selected)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("impl") if callspec is not None else None


def variant_of(item: pytest.Item) -> str:
    """The item's parameter id without the implementation's (e.g. `bf16` of `test_x[reference-bf16]`)."""
    impl, callspec = implementation_of(item), getattr(item, "callspec", None)
    if impl is None or callspec is None:
        return ""
    parts, name = callspec.id, impl.name
    if parts == name:
        return ""
    if parts.startswith(name + "-"):
        return parts[len(name) + 1:]
    if parts.endswith("-" + name):
        return parts[: -len(name) - 1]
    return parts.replace(f"-{name}-", "-", 1)


def property_id(component: str, test: str, variant: str = "") -> str:
    """How the matrix and the known-deviations file name a property: `component/test` or `component/test[v]`."""
    return f"{component}/{test}" + (f"[{variant}]" if variant else "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = _state(config)
    if not state.active:
        return
    if state.narrowed:
        keep = [i for i in items if i.get_closest_marker("dsv3_component") is None or implementation_of(i)]
        dropped = [i for i in items if i not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
    if state.deviations:
        _mark_deviations(state, items)


def _mark_deviations(state: _State, items: list[pytest.Item]) -> None:
    """An xfail mark (not strict) on every test a known-deviations entry covers, with the entry's reason."""
    from harness.deviations import find

    for item in items:
        impl = implementation_of(item)
        if impl is None:
            continue
        entry = find(state.deviations, impl.name, impl.component, item.originalname, variant_of(item))
        if entry is not None:
            item.stash[_DEVIATION] = entry
            item.add_marker(pytest.mark.xfail(reason=f"known deviation: {entry.reason}", strict=False))


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest) -> Any:
    """The implementation object under test (created once per session and implementation)."""
    from harness.registry import UsageError

    try:
        return request.param.create()
    except UsageError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def impl_name(request: pytest.FixtureRequest) -> str:
    """The registered name (or module:factory) of the implementation the calling test runs against."""
    return request.node.callspec.params["impl"].name


def current_implementation() -> tuple[str, str] | None:
    """(component, name) of the implementation the running test is checking, or None outside such a test."""
    return _CURRENT.get()


def applicable(obj: Any, prop: str) -> bool:
    """False when the implementation declares `prop` not applicable (for tests that exclude only some draws)."""
    from harness.registry import not_applicable

    return prop not in not_applicable(obj)


def skip_if_not_applicable(obj: Any, prop: str) -> None:
    """Skip the calling test, as not applicable with the declared reason, when the implementation declares `prop`
    not applicable."""
    from harness.registry import not_applicable_reason

    if not applicable(obj, prop):
        current = current_implementation()
        label = current[1] if current else type(obj).__name__
        raise NotApplicable(f"{label} declares {prop!r} not applicable: {not_applicable_reason(obj, prop)}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    impl = implementation_of(item)
    token = _CURRENT.set((impl.component, impl.name) if impl is not None else None)
    try:
        return (yield)
    finally:
        _CURRENT.reset(token)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    impl = implementation_of(item)
    if impl is not None:
        declared = call.excinfo is not None and call.excinfo.errisinstance(NotApplicable)
        if declared:  # report the reason as a plain skip's, at the test's location
            path, line, _ = item.location
            report.longrepr = (path, line + 1 if line is not None else None, f"Skipped: {call.excinfo.value.msg}")
        info = {"component": impl.component, "test": item.originalname, "variant": variant_of(item),
                "impl": impl.name, "line": item.location[1] or 0, "not_applicable": declared}
        entry = item.stash.get(_DEVIATION, None)
        if entry is not None:
            info.update(deviation=entry.key, deviation_reason=entry.reason)
        if call.excinfo is not None and (report.failed or hasattr(report, "wasxfail")):
            info.update(failure_details(call.excinfo.value))
        setattr(report, REPORT_ATTRIBUTE, info)
    return report


def failure_details(exc: BaseException) -> dict[str, str]:
    """A failure as the matrix shows it: the message's first line and its further lines, hypothesis's shrunk
    example, the lines that rebuild the case (harness.cases.rebuild) and the reproduction blob (from the
    exception's notes)."""
    from harness.cases import REBUILD

    while isinstance(exc, BaseExceptionGroup):  # hypothesis found several distinct failures: the first one
        exc = exc.exceptions[0]
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    message = first if isinstance(exc, AssertionError) and first else f"{type(exc).__name__}: {first}".rstrip(": ")
    details = []  # the message's further lines (e.g. a token's logits), before pytest's own `assert ...` explanation
    for line in lines[1:]:
        if line.startswith("assert "):
            break
        details.append(line.strip())
    notes = [str(n) for n in getattr(exc, "__notes__", ())]

    def note(*starts: str) -> str:
        return next((n.strip() for n in notes if n.lstrip().startswith(starts)), "")

    blob = next((n.strip() for n in notes if "@reproduce_failure(" in n), "")
    return {"message": message, "details": "\n".join(details),
            "example": note("Failing test case", "Falsifying example"), "rebuild": note(REBUILD), "reproduce": blob}


def report_info(report: pytest.TestReport) -> dict[str, Any] | None:
    """What a conformance test's report says about it (see the module docstring), or None for another test."""
    return getattr(report, REPORT_ATTRIBUTE, None)


class DeviationTracker:
    """Registered when --dsv3-deviations is given: counts what became of each entry's tests (in the controller
    under pytest-xdist, which sees every worker's reports) and says at the end which deviations now pass and which
    entries matched no test that ran."""

    def __init__(self, state: _State, path: str) -> None:
        self.state, self.path = state, path
        self.outcomes: dict[str, list[str]] = {}  # entry key -> outcomes of the tests it covered

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info = report_info(report)
        if info is None or "deviation" not in info or report.when != "call":
            return
        outcome = ("xpass" if report.passed else "xfail") if hasattr(report, "wasxfail") else report.outcome
        self.outcomes.setdefault(info["deviation"], []).append(outcome)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        passing = sorted(k for k, outcomes in self.outcomes.items() if "xpass" in outcomes)
        still = sorted(k for k, outcomes in self.outcomes.items() if "xfail" in outcomes)
        unused = sorted(d.key for d in self.state.deviations if d.key not in self.outcomes)
        terminalreporter.section("dsv3 known deviations")
        terminalreporter.write_line(f"{len(still)} listed deviation(s) still fail (expected failures)")
        for key in passing:
            terminalreporter.write_line(f"now passes (remove it from {self.path}): {key}")
        for key in unused:
            terminalreporter.write_line(f"matched no test that ran: {key}")


@pytest.fixture(scope="session")
def dsv3_device(pytestconfig: pytest.Config) -> str:
    """'cuda' or 'cpu', from --dsv3-device."""
    return device(pytestconfig)


@pytest.fixture
def dsv3_threads() -> Iterator[int]:
    """torch's CPU threads pinned to every logical core for a measurement (the measurement policy), restored
    afterwards; yields the count, which the records carry."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class Results:
    """Measured records kept for --dsv3-results."""

    def __init__(self, records: list[Any]) -> None:
        self._records = records

    def add(self, record: Any) -> None:
        """Keep a measured record (a harness.results.Record)."""
        self._records.append(record)


@pytest.fixture(scope="session")
def dsv3_results(pytestconfig: pytest.Config) -> Results:
    """Collects records; written to --dsv3-results at the end of the session."""
    return Results(_state(pytestconfig).records)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and device(item.config) != "cuda":
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False (or --dsv3-device cpu)")


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist (controller): keep the records a worker handed over."""
    from harness.results import Record

    records = getattr(node, "workeroutput", {}).get("dsv3_records", [])
    _state(node.config).records.extend(Record.from_dict(r) for r in records)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    records = _state(config).records
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller writes the file once
        config.workeroutput["dsv3_records"] = [r.to_dict() for r in records]
        return
    path = config.getoption("--dsv3-results")
    if path and records:
        from harness.environment import environment
        from harness.results import append_records

        append_records(Path(path), records, environment(device(config)))
