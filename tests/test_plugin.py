"""The pytest plugin: implementation selection, usage errors, results files, GPU skips."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import pytest
pytestmark = [pytest.mark.conformance, pytest.mark.dsv3_component("costmodel")]

def test_kv(impl, dsv3_results):
    from dsv3ref.config import ModelConfig
    from harness.results import Record
    value = impl.kv_cache_bytes_per_token(ModelConfig.preset("deepseek-v3-671b"))
    dsv3_results.add(Record("kv_cache_bytes_per_token", "deepseek-v3-671b", value, "B", kind="measured"))
    assert value == 70272

@pytest.mark.gpu
def test_needs_gpu(impl):
    pass
"""

USER_IMPL = """
from harness.adapters.costmodel import ReferenceCostModel

class Broken(ReferenceCostModel):
    def kv_cache_bytes_per_token(self, cfg, dtype="bf16"):
        return 1

def good():
    return ReferenceCostModel()

def broken():
    return Broken()

class Incomplete:
    component = "costmodel"

def incomplete():
    return Incomplete()

def raises():
    raise RuntimeError("no kernel")
"""


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(test_suite=SUITE, user_impl=USER_IMPL)
    pytester.syspathinsert()
    return pytester


def test_runs_reference_and_writes_results(suite):
    result = suite.runpytest("--dsv3-impl", "reference", "--dsv3-device", "cpu", "--dsv3-results", "r.json", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA GPU*"])
    doc = json.loads((suite.path / "r.json").read_text())
    assert doc["results"][0]["value"] == 70272 and doc["env"]["device"] == "cpu"


def test_user_factory_runs_and_a_wrong_one_fails(suite):
    suite.runpytest("--dsv3-impl", "user_impl:good", "-k", "kv").assert_outcomes(passed=1, deselected=1)
    suite.runpytest("--dsv3-impl", "user_impl:broken", "-k", "kv").assert_outcomes(failed=1, deselected=1)


@pytest.mark.parametrize(("spec", "message"), [
    ("no-such-impl", "*--dsv3-impl: unknown implementation 'no-such-impl'; known: *"),
    ("no_module:f", "*--dsv3-impl no_module:f: cannot import module 'no_module'*"),
    ("user_impl:missing", "*--dsv3-impl user_impl:missing: module 'user_impl' has no callable 'missing'*"),
    ("user_impl:incomplete", "*implementation 'user_impl:incomplete' of 'costmodel' lacks kv_cache_bytes_per_token*"),
    ("user_impl:raises", "*--dsv3-impl user_impl:raises: the factory raised RuntimeError: no kernel"),
])
def test_bad_impl_is_a_usage_error(suite, spec, message):
    # Checked once when --dsv3-impl is resolved: one line and pytest's usage error (not 16 setup errors for a
    # missing method, not an INTERNALERROR for a factory that raises).
    result = suite.runpytest("--dsv3-impl", spec)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_suites_run_by_pyargs_from_outside_the_checkout(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs",
           "suites.conformance.test_costmodel", "-m", "conformance", "--dsv3-impl", "reference"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed" in done.stdout
    bad = subprocess.run([*cmd[:-1], "no-such-impl"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         check=False)
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--dsv3-impl: unknown implementation 'no-such-impl'" in bad.stderr


PLAIN = """
import os
import sys

def test_untouched():
    assert "torch" not in sys.modules
    assert "TRITON_INTERPRET" not in os.environ
    from hypothesis import settings
    assert settings._current_profile == "default"
"""


def test_a_session_without_suites_imports_no_torch_and_changes_nothing(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "test_plain.py").write_text(PLAIN)
    # without CI: hypothesis itself loads its own "ci" profile when CI is set
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CI")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_plain.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


def test_importing_the_plugin_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, harness.pytest_plugin; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "False"


THREADS = """
import torch

def test_pins(dsv3_threads):
    import os
    assert dsv3_threads == torch.get_num_threads() == (os.cpu_count() or 1)

def test_restored():
    assert torch.get_num_threads() == 1
"""


def test_benchmark_threads_are_restored(pytester):
    import torch

    pytester.makepyfile(test_threads=THREADS)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pytester.runpytest_inprocess().assert_outcomes(passed=2)
    finally:
        torch.set_num_threads(before)
