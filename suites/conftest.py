"""Prepares a session that collects the suites (harness.pytest_plugin.activate): pytest calls this conftest's
pytest_configure when the collection first enters this package. `ep_world`: the local world of processes the
expert-parallel suites share (started once per session)."""

from collections.abc import Iterator

import pytest

from harness.pytest_plugin import activate

EP_TIMEOUT_S = 20.0  # collective timeout in the EP suites' world: a failing example costs at most this


def pytest_configure(config: pytest.Config) -> None:
    activate(config)


@pytest.fixture(scope="session")
def ep_world(dsv3_device: str) -> Iterator[object]:
    """4 ranks on the CPU (gloo), or one per GPU (up to 4, NCCL) under --dsv3-device cuda."""
    import torch

    from dsv3ref.comms.ep import backend_for
    from harness.distributed import LocalWorld

    ranks = 4
    if dsv3_device == "cuda":
        count = torch.cuda.device_count()
        ranks = 4 if count >= 4 else (2 if count >= 2 else 1)
    with LocalWorld(ranks, backend_for(dsv3_device), timeout_s=EP_TIMEOUT_S) as world:
        yield world
