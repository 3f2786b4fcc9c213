"""pytest plugin (entry point `pytest11`): options, markers, hypothesis profiles and implementation fixtures.

A suite module declares its component with `pytest.mark.dsv3_component("mla")`; a test that takes the fixture
`impl` then runs once per selected implementation of that component (`--dsv3-impl`, repeatable; default: every
registered implementation whose optional modules are importable).

Importing the plugin, and a session that collects none of the suites, imports no torch and changes nothing (it
only registers the hypothesis profiles, so that --hypothesis-profile can name them): `activate(config)` prepares
a session (Triton's interpreter on a machine without CUDA, loading a hypothesis profile), called by the
conftest.py of `suites/` and `tests/` when they are collected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

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
    "thorough": {"max_examples": 300},
}
for _name, _options in PROFILES.items():
    settings.register_profile(_name, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], **_options)


class _State:
    """The plugin's per-session state (kept in config.stash)."""

    def __init__(self) -> None:
        self.active = False
        self.selected: list[Any] | None = None  # Implementations named by --dsv3-impl; None: every available one
        self.records: list[Any] = []


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    """The session's plugin state (created by whichever hook needs it first: conftests may configure first)."""
    return config.stash.setdefault(_STATE, _State())


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3", "dsv3-harness")
    group.addoption("--dsv3-impl", action="append", default=[], metavar="NAME|module:factory",
                    help="implementation to run the suites against (repeatable); default: all available")
    group.addoption("--dsv3-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device for the suites (auto: cuda when available)")
    group.addoption("--dsv3-results", default=None, metavar="FILE",
                    help="append measured records to this results document (written atomically)")


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    if config.getoption("--dsv3-impl") or config.getoption("--dsv3-device") == "cuda":
        activate(config)  # asked for explicitly: resolve now, so a bad value is a usage error before collection


def activate(config: pytest.Config) -> None:
    """Prepare a session that runs suites (idempotent): Triton's interpreter without CUDA (Triton picks its
    backend when first imported), the hypothesis profile (`ci` when CI is set, else `dev`, unless
    --hypothesis-profile names one) and the implementations named by --dsv3-impl."""
    state = _state(config)
    if state.active:
        return
    state.active = True
    import torch

    from harness import registry

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("ci" if os.environ.get("CI") else "dev")
    if config.getoption("--dsv3-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--dsv3-device cuda: torch.cuda.is_available() is False on this machine")
    specs = config.getoption("--dsv3-impl")
    try:
        state.selected = [impl for spec in specs for impl in registry.resolve(spec)] if specs else None
    except registry.UsageError as e:
        raise pytest.UsageError(str(e)) from None


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
    selected = _state(metafunc.config).selected
    pool = registry.implementations(component) if selected is None else selected
    impls = [i for i in pool if i.component == component]
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


def skip_if_not_applicable(obj: Any, prop: str) -> None:
    """Skip the calling test when the implementation declares `prop` not applicable."""
    from harness.registry import not_applicable

    if prop in not_applicable(obj):
        pytest.skip(f"{type(obj).__name__} declares {prop!r} not applicable")


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


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--dsv3-results")
    records = _state(session.config).records
    if path and records:
        from harness.environment import environment
        from harness.results import append_records

        append_records(Path(path), records, environment(device(session.config)))
