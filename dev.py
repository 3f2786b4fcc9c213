#!/usr/bin/env python3
"""Bootstrap and run: needs only python3. Creates `.venv` with the project and its dependencies (torch pinned to
the CPU build 2.13.0), reinstalling when pyproject.toml changes, then runs one job.

    python3 dev.py report [dsv3 report options]   # the main job: `dsv3 report` (local machine + all profiles)
    python3 dev.py test [pytest options]          # the test run that CI (.ci/run) executes
    python3 dev.py perf [pytest options]          # the performance suites (pytest-benchmark), minutes
    python3 dev.py lint                           # ruff
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".dsv3-installed"
# the default test run: perf cases run once, untimed (a smoke test); slow ones are deselected
TEST_ARGS = ["-m", "not slow", "--benchmark-disable", "--hypothesis-profile=ci", "tests", "suites"]
PERF_ARGS = ["-m", "perf", "suites/performance"]  # timed, slow cases included


def _run(cmd: list[str]) -> int:
    return subprocess.call(cmd, cwd=ROOT)


def ensure_env() -> None:
    """Create the virtual environment and install the project (editable, extras hf + lint) when needed."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print("dev.py: creating .venv ...", file=sys.stderr, flush=True)
        if _run([sys.executable, "-m", "venv", str(VENV)]):
            sys.exit("dev.py: error: `python3 -m venv` failed (on Debian: apt-get install python3-venv)")
    print("dev.py: installing the project and its dependencies into .venv ...", file=sys.stderr, flush=True)
    if _run([str(PY), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", ".[hf,lint]"]):
        sys.exit("dev.py: error: pip install failed (see the messages above)")
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    """Run the job named by argv[0] with the rest of argv; -h/--help prints this module's docstring (exit 0)."""
    jobs = {
        "report": [str(VENV / "bin" / "dsv3"), "report"],
        "test": [str(PY), "-m", "pytest", *TEST_ARGS],
        "perf": [str(PY), "-m", "pytest", *PERF_ARGS],
        "lint": [str(VENV / "bin" / "ruff"), "check", "."],
    }
    usage = f"usage: python3 dev.py {{{'|'.join(jobs)}}} [options]"
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in jobs:
        problem = f"unknown job {argv[0]!r}" if argv else "no job given"
        print(f"dev.py: error: {problem}; {usage} (-h for help)", file=sys.stderr)
        return 2
    ensure_env()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return _run(jobs[argv[0]] + argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
