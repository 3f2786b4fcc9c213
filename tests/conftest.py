"""Prepares a session that collects the project's tests (harness.pytest_plugin.activate): pytest calls this conftest's
pytest_configure when the collection first enters this folder."""

import pytest

from harness.pytest_plugin import activate


def pytest_configure(config: pytest.Config) -> None:
    activate(config)
