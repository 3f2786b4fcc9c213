"""pytest plugin (entry point `pytest11`): options, markers, hypothesis profiles and implementation fixtures.

A suite module declares its component with `pytest.mark.dsv3_component("mla")`; a test that takes the fixture
`impl` then runs once per selected implementation of that component (`--dsv3-impl`, repeatable; default: every
registered implementation whose optional modules are importable).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from harness import registry
from harness.environment import environment
from harness.registry import Implementation, UsageError
from harness.results import Record, append_records

MARKERS = {
    "conformance": "conformance property test of a component (suites/conformance)",
    "perf": "performance measurement (suites/performance); deselected in the default test run",
    "gpu": "needs a CUDA GPU; skipped with the reason when there is none",
    "slow": "takes minutes; deselected in the default test run",
    "distributed": "starts several processes (torch.distributed)",
    "dsv3_component(name)": "the component whose implementations the `impl` fixture iterates",
}

if not torch.cuda.is_available():
    # Triton picks its backend when first imported: without CUDA, kernels run through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dsv3", "dsv3-harness")
    group.addoption("--dsv3-impl", action="append", default=[], metavar="NAME|module:factory",
                    help="implementation to run the suites against (repeatable); default: all available")
    group.addoption("--dsv3-device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device for the suites (auto: cuda when available)")
    group.addoption("--dsv3-results", default=None, metavar="FILE",
                    help="append measured records to this results document (written atomically)")


def _device(config: pytest.Config) -> str:
    choice = config.getoption("--dsv3-device")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def pytest_configure(config: pytest.Config) -> None:
    for marker, text in MARKERS.items():
        config.addinivalue_line("markers", f"{marker}: {text}")
    if not config.getoption("hypothesis_profile", default=None):
        settings.load_profile("ci" if os.environ.get("CI") else "dev")
    if config.getoption("--dsv3-device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--dsv3-device cuda: torch.cuda.is_available() is False on this machine")
    try:
        config._dsv3_selected = _selected(config.getoption("--dsv3-impl"))
    except UsageError as e:
        raise pytest.UsageError(str(e)) from None
    config._dsv3_records = []


def _selected(specs: list[str]) -> list[Implementation] | None:
    """Implementations named on the command line (None: every available one)."""
    if not specs:
        return None
    chosen: list[Implementation] = []
    for spec in specs:
        chosen.extend(registry.resolve(spec))
    return chosen


def _impls_for(config: pytest.Config, component: str) -> list[Implementation]:
    selected = config._dsv3_selected
    pool = registry.implementations(component) if selected is None else selected
    return [i for i in pool if i.component == component]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("dsv3_component")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: uses `impl` without pytest.mark.dsv3_component")
    component = marker.args[0]
    registry.load_all()
    if component not in registry.COMPONENTS:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown component {component!r}")
    impls = _impls_for(metafunc.config, component)
    params = [pytest.param(i, id=i.name, marks=_marks(i, metafunc.config)) for i in impls]
    if not params:
        params = [pytest.param(None, id="none-selected",
                               marks=pytest.mark.skip(reason=f"no selected implementation of {component!r}"))]
    metafunc.parametrize("impl", params, indirect=True)


def _marks(impl: Implementation, config: pytest.Config) -> list[Any]:
    missing = impl.missing()
    if missing:
        return [pytest.mark.skip(reason=f"{impl.component}/{impl.name} needs {', '.join(missing)} (not installed)")]
    if _device(config) not in impl.devices:
        return [pytest.mark.skip(reason=f"{impl.component}/{impl.name} does not run on {_device(config)}")]
    return []


@pytest.fixture(scope="session")
def impl(request: pytest.FixtureRequest) -> Any:
    """The implementation object under test (created once per session and implementation)."""
    implementation: Implementation = request.param
    try:
        return implementation.create()
    except UsageError as e:
        pytest.fail(str(e), pytrace=False)


def skip_if_not_applicable(obj: Any, prop: str) -> None:
    """Skip the calling test when the implementation declares `prop` not applicable."""
    if prop in registry.not_applicable(obj):
        pytest.skip(f"{type(obj).__name__} declares {prop!r} not applicable")


@pytest.fixture(scope="session")
def dsv3_device(pytestconfig: pytest.Config) -> str:
    """'cuda' or 'cpu', from --dsv3-device."""
    return _device(pytestconfig)


class _Results:
    def __init__(self, records: list[Record]) -> None:
        self._records = records

    def add(self, record: Record) -> None:
        """Keep a measured record for --dsv3-results."""
        self._records.append(record)


@pytest.fixture(scope="session")
def dsv3_results(pytestconfig: pytest.Config) -> _Results:
    """Collects records; written to --dsv3-results at the end of the session."""
    return _Results(pytestconfig._dsv3_records)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and _device(item.config) != "cuda":
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False (or --dsv3-device cpu)")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--dsv3-results")
    records = getattr(session.config, "_dsv3_records", [])
    if path and records:
        append_records(Path(path), records, environment(_device(session.config)))
