"""dev.py's command line: help exits 0, a wrong job is one line and exit 2 (both before any bootstrap)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEV = Path(__file__).resolve().parent.parent / "dev.py"


def _dev(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEV), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_exits_0(flag):
    run = _dev(flag)
    assert run.returncode == 0 and run.stderr == ""
    assert run.stdout.startswith("Bootstrap and run") and "python3 dev.py test [pytest options]" in run.stdout


@pytest.mark.parametrize(("args", "problem"), [(["frobnicate"], "unknown job 'frobnicate'"), ([], "no job given")])
def test_wrong_job_is_one_line_exit_2(args, problem):
    run = _dev(*args)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"dev.py: error: {problem}; usage: python3 dev.py {{report|test|perf|lint}} [options] " \
                         "(-h for help)\n"
