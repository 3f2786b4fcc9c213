"""The `env` block of a results document: software versions, device, machine, git commit, UTC time.

`env["machine"]` identifies where measurements ran: `id` is a hash of the host name, CPU model, logical CPU count,
architecture and OS, the fields pytest-benchmark's `machine_info` also records, so that both formats name one
machine alike. The gate compares machine-dependent metrics (timings) only between documents of the same id.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from hardware.probe import cpu_model

ID_FIELDS = ("hostname", "cpu", "cpu_count", "arch", "os")  # what machine_id hashes


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_id(fields: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit id of a machine from its ID_FIELDS (see the module docstring)."""
    text = "\n".join(str(fields.get(k)) for k in ID_FIELDS)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _memory_GB() -> float | None:
    try:
        return round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9, 1)
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def machine() -> dict[str, Any]:
    """This machine: its id and the fields behind it, with its GPU and memory for the reader."""
    fields = {"hostname": platform.node(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
              "arch": platform.machine(), "os": platform.system()}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"id": machine_id(fields), **fields, "gpu": gpu, "memory_GB": _memory_GB()}


def environment(device: str) -> dict[str, Any]:
    """Describe where the numbers were produced."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "dsv3_harness": _version("dsv3-harness"),
        "device": device,
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "utc_time": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
