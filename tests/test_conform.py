"""`dsv3 conform` and checking one's own implementation: the matrix in every format, known deviations, bad input as
one line (exit 2), a user's module imported from the working directory, the protocol checked once, only the chosen
component's implementation tests run, and the same outcomes under pytest-xdist."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import conformance, matrix
from harness.cli import main

pytest_plugins = ["pytester"]

USER = """
from harness.adapters.costmodel import ReferenceCostModel


class Broken(ReferenceCostModel):
    def kv_cache_bytes_per_token(self, cfg, dtype="bf16"):
        return 1


class Incomplete:
    component = "costmodel"

    def params_total(self, cfg):
        return 0


def good():
    return ReferenceCostModel()


def broken():
    return Broken()


def incomplete():
    return Incomplete()


def raises():
    raise RuntimeError("no GPU kernel built\\nsecond line")


def wrong_component():
    obj = ReferenceCostModel()
    obj.component = "gpu"
    return obj
"""
DEVIATIONS = """
# a known-deviations file
["{spec}"]
"costmodel/test_kv_bytes_of_the_papers_models" = "we count the cache in bytes of 1 (a known bug)"
"costmodel/test_v3_tpot_bound" = "listed, but it passes"

["someone_else:impl"]
"costmodel/test_v3_training_flops" = "not this run's implementation"
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch, request):
    """A user's folder holding a module `user_<test name>` (not on sys.path) as the working directory."""
    name = "user_" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    (tmp_path / f"{name}.py").write_text(USER)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the registry may add the working directory
    return tmp_path, name


def run_conform(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["conform", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    """reference and a broken user cost model on three properties (one hypothesis test among them), run once for
    the module in every format: (exit code, the JSON matrix, (code, stdout, stderr) by format, the user
    implementation's name)."""
    root, name = tmp_path_factory.mktemp("user"), "user_failing_run"
    (root / f"{name}.py").write_text(USER)
    args = ["--impl", "reference", "--impl", f"{name}:broken", "--component", "costmodel",
            "-k", "papers_models or linear_in_layers or tpot_bound"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr(sys, "path", list(sys.path))
        runs = {fmt: _conform(*args, "--format", fmt) for fmt in matrix.FORMATS}
    code, out, _ = runs["json"]
    return code, json.loads(out), runs, f"{name}:broken"


def _conform(*args: str) -> tuple[int, str, str]:
    """`dsv3 conform ARGS` in this process with stdout and stderr captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["conform", *args])
    return code, out.getvalue(), err.getvalue()


def test_matrix_json_names_each_cell_and_the_failure(failing_run):
    code, doc, _, spec = failing_run
    assert code == 1 and doc["schema"] == "dsv3-conformance/1" and doc["verdict"] == "fail"
    cells = {(c["property"], c["implementation"]): c for c in doc["cells"]}
    assert {c["status"] for (_, impl), c in cells.items() if impl == "reference"} == {"pass"}
    papers = cells[("costmodel/test_kv_bytes_of_the_papers_models", spec)]
    assert papers["status"] == "fail"
    assert papers["message"].startswith("deepseek-v3-671b: kv_cache_bytes_per_token = 1, expected 70272")
    layers = cells[("costmodel/test_kv_bytes_linear_in_layers", spec)]
    assert layers["status"] == "fail" and "Failing test case" in layers["example"]
    assert f"impl = create('costmodel', '{spec}')" in layers["rebuild"] and "cfg = ModelConfig(" in layers["rebuild"]
    assert cells[("costmodel/test_v3_tpot_bound", spec)]["status"] == "pass"
    assert [p["id"] for p in doc["properties"]] == ["costmodel/test_kv_bytes_of_the_papers_models",
                                                    "costmodel/test_v3_tpot_bound",
                                                    "costmodel/test_kv_bytes_linear_in_layers"]


def test_rebuild_lines_rerun_the_failing_case(failing_run):
    _, doc, _, spec = failing_run
    rebuild = next(c["rebuild"] for c in doc["cells"] if c["implementation"] == spec and c["rebuild"])
    lines = [line.strip() for line in rebuild.splitlines()[1:]]
    *setup, call = lines
    scope: dict = {}
    exec("\n".join(setup), scope)  # noqa: S102 - the lines the matrix prints for the user to run
    assert isinstance(eval(call, scope), int)  # noqa: S307


@pytest.mark.parametrize(("fmt", "expected"), [("text", "FAIL ["), ("github", "| property"), ("latex", "\\toprule"),
                                                ("csv", "property,implementation,variant,status")])
def test_every_format_renders_the_matrix(failing_run, fmt, expected):
    code, out, err = failing_run[2][fmt]
    assert code == 1 and expected in out
    assert "costmodel/test_kv_bytes_of_the_papers_models" in out
    assert "passed" in err or "failed" in err  # pytest's progress goes to stderr, the matrix alone to stdout


def test_known_deviations_turn_listed_failures_into_expected_ones(user_dir, capsys):
    root, name = user_dir
    spec = f"{name}:broken"
    (root / "deviations.toml").write_text(DEVIATIONS.format(spec=spec))
    code, out, _ = run_conform(capsys, "--impl", spec, "--deviations", "deviations.toml", "-k",
                               "papers_models or tpot_bound", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "pass"
    status = {c["property"]: c for c in doc["cells"]}
    assert status["costmodel/test_kv_bytes_of_the_papers_models"]["status"] == "xfail"
    assert "a known bug" in status["costmodel/test_kv_bytes_of_the_papers_models"]["reason"]
    assert status["costmodel/test_v3_tpot_bound"]["status"] == "xpass"
    assert doc["unused_deviations"] == ["someone_else:impl costmodel/test_v3_training_flops"]


def test_bare_pytest_in_the_users_folder_with_known_deviations(user_dir):
    # The user's module is found in the working directory by the `pytest` script itself (no python -m, no
    # PYTHONPATH=.); only the costmodel implementation tests run (the other components' and the
    # implementation-independent ones are deselected, none skipped); the listed deviations are expected failures,
    # and the one that passes is reported.
    root, name = user_dir
    spec = f"{name}:broken"
    more = ('"costmodel/test_kv_bytes_linear_in_layers" = "same bug"\n'
            '"costmodel/test_kv_bytes_linear_in_dtype_width" = "same bug"\n')
    tpot = '"costmodel/test_v3_tpot_bound"'
    text = DEVIATIONS.format(spec=spec).replace(tpot, more + tpot)
    (root / "deviations.toml").write_text(text)
    cmd = [str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider", "--pyargs", "suites", "-m",
           "conformance", "--dsv3-impl", spec, "--dsv3-deviations", "deviations.toml"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "6 passed" in summary and "3 xfailed, 1 xpassed" in summary and "skipped" not in summary, summary
    assert f"now passes (remove it from deviations.toml): {spec} costmodel/test_v3_tpot_bound" in done.stdout
    assert "matched no test that ran: someone_else:impl costmodel/test_v3_training_flops" in done.stdout


@pytest.mark.parametrize(("factory", "message"), [
    ("incomplete", "implementation '{spec}' of 'costmodel' lacks kv_cache_bytes_per_token, params_activated, "
                   "train_flops_per_token, ep_tpot_s; the protocol is harness.protocols.CostModelImpl"),
    ("raises", "--dsv3-impl {spec}: the factory raised RuntimeError: no GPU kernel built"),
    ("wrong_component", "--dsv3-impl {spec}: the factory's object must have a `component` attribute naming one"),
    ("missing", "--dsv3-impl {spec}: module '{name}' has no callable 'missing'"),
])
def test_a_bad_factory_is_one_line_and_a_usage_error(user_dir, capsys, factory, message):
    root, name = user_dir
    spec = f"{name}:{factory}"
    expected = message.format(spec=spec, name=name)
    code, out, err = run_conform(capsys, "--impl", spec)
    assert code == 2 and out == ""
    assert err.startswith("dsv3: error: ") and expected in err and err.count("\n") == 1, err


@pytest.mark.parametrize(("args", "message"), [
    (["--impl", "nope"], "--dsv3-impl: unknown implementation 'nope'; known: "),
    (["--impl", "no_such_module_anywhere:f"], "cannot import module 'no_such_module_anywhere'"),
    (["--impl", ":f"], "expected module:factory"),
    (["--component", "nope"], "--component: unknown component 'nope'; known: "),
    (["--impl", "transformers", "--component", "fp8"], "no implementation of fp8 among transformers"),
    (["--jobs", "0"], "conform: argument --jobs: expected an integer >= 1 or 'auto', got '0'"),
    (["--impl", "reference", "--component", "costmodel", "-k", "no_such_test"],
     "no conformance test matching -k 'no_such_test' runs against the chosen implementations"),
])
def test_bad_usage_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_conform(capsys, *args)
    last = err.strip().splitlines()[-1]  # with -k, pytest's own summary line comes first on stderr
    assert code == 2 and out == "" and last.startswith("dsv3: error: ") and message in last, err
    assert err.count("\n") == 1 or "-k" in args, err


@pytest.mark.parametrize(("text", "message"), [
    ("[x\n", "malformed TOML"),
    ('"costmodel/test_v3_tpot_bound" = "top-level key"\n', "expected a table [\"IMPLEMENTATION\"] of properties"),
    ('["*"]\n"test_v3_tpot_bound" = "no component"\n', "expected a property COMPONENT/TEST or COMPONENT/TEST[VARIANT]"),
    ('["*"]\n"gpu/test_x" = "r"\n', "unknown component 'gpu'"),
    ('["*"]\n"costmodel/test_v3_tpot_bound" = ""\n', "expected the reason as a non-empty string"),
    ('["*"]\n"costmodel/test_v3_tpot_bound" = 3\n', "expected the reason as a non-empty string, got 3"),
    (None, "cannot read the known-deviations file"),
])
def test_a_malformed_deviations_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "deviations.toml"
    if text is not None:
        path.write_text(text)
    code, out, err = run_conform(capsys, "--impl", "reference", "--component", "costmodel", "--deviations", str(path))
    assert code == 2 and out == "" and err.startswith(f"dsv3: error: {path}") and message in err, err
    assert err.count("\n") == 1


def test_the_folders_own_pytest_configuration_stays_out_of_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --an-option-of-their-own -x\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_conform(capsys, "--impl", "reference", "--component", "costmodel", "-k", "papers_models")
    assert code == 0 and "costmodel/test_kv_bytes_of_the_papers_models  pass" in out


def test_list_names_components_properties_and_implementations(capsys):
    code, out, _ = run_conform(capsys, "--list")
    assert code == 0
    assert "mla: " in out and "paged_cache" in out and "  absorbed: " in out and "  transformers: " in out


def test_parallel_workers_give_the_same_matrix(capsys):
    args = ["--impl", "reference", "--component", "costmodel", "--component", "moe", "-k",
            "papers or linear_in_layers or selection_uses or tiny_scores"]

    def statuses(*extra: str) -> dict:
        code, out, _ = run_conform(capsys, *args, *extra, "--format", "json")
        assert code == 0
        return {(c["property"], c["implementation"]): c["status"] for c in json.loads(out)["cells"]}

    serial = statuses()
    assert len(serial) == 4 and set(serial.values()) == {"pass"}
    assert statuses("--jobs", "2") == serial


def test_results_under_xdist_are_written_once_by_the_controller(pytester, tmp_path):
    # A worker hands its records over (workeroutput) instead of appending to the file; the controller collects
    # every worker's (pytest_testnodedown) and writes them once.
    from types import SimpleNamespace

    from harness import pytest_plugin
    from harness.results import Record

    path = tmp_path / "r.json"
    workers = []
    for n in range(2):
        config = pytester.parseconfigure("--dsv3-results", str(path))
        config.workeroutput = {}
        pytest_plugin._state(config).records.append(Record("kv_cache_bytes_per_token", f"w{n}", n, "B"))
        pytest_plugin.pytest_sessionfinish(SimpleNamespace(config=config))
        workers.append(config.workeroutput)
    assert not path.exists()
    controller = pytester.parseconfigure("--dsv3-results", str(path))
    for output in workers:
        pytest_plugin.pytest_testnodedown(SimpleNamespace(config=controller, workeroutput=output), None)
    pytest_plugin.pytest_sessionfinish(SimpleNamespace(config=controller))
    assert sorted(r["subject"] for r in json.loads(path.read_text())["results"]) == ["w0", "w1"]


def _outcome(status: str, variant: str = "", **details: str) -> conformance.Outcome:
    return conformance.Outcome("moe", "test_x", variant, "mine", status, **details)


@pytest.mark.parametrize(("statuses", "cell"), [
    (["pass", "n/a"], "pass"), (["n/a", "skip"], "n/a"), (["pass", "fail", "error"], "error"),
    (["xfail", "pass"], "xfail"), (["xpass", "pass"], "xpass"), (["skip"], "skip"), (["fail", "xfail"], "fail"),
])
def test_a_cell_shows_its_worst_variant(statuses, cell):
    outcomes = [_outcome(s, variant=str(i), reason=f"r{i}") for i, s in enumerate(statuses)]
    run = conformance.Run(conformance.Request(), [], ["moe"], outcomes)
    built = matrix.build(run)
    assert built.rows == ["moe/test_x"] and built.cells[("moe/test_x", "mine")].status == cell
    assert built.failed == (cell in ("fail", "error"))


def _worked_example() -> str:
    """`mykernels.py` of the worked example in docs/conformance.md: the python block that defines make_fp8."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "conformance.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    return next(b for b in blocks if "def make_fp8" in b)


def test_the_worked_example_of_the_docs_conforms_and_its_bf16_variant_fails(user_dir, capsys):
    root, name = user_dir
    source = _worked_example()
    (root / f"{name}.py").write_text(source)
    bf16 = source.replace("device=a.device)", "device=a.device, dtype=torch.bfloat16)")
    assert bf16 != source
    (root / f"{name}_bf16.py").write_text(bf16)
    code, out, _ = run_conform(capsys, "--impl", f"{name}:make_fp8", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["verdict"] == "pass", doc["summary"]
    assert {c["status"] for c in doc["cells"]} == {"pass", "n/a"}
    code, out, _ = run_conform(capsys, "--impl", f"{name}_bf16:make_fp8", "-k", "gemm", "--format", "json")
    cell = next(c for c in json.loads(out)["cells"] if c["property"] == "fp8/test_gemm_within_fp32_summation_bound")
    assert code == 1 and cell["status"] == "fail" and cell["rebuild"].startswith("Rebuild this case:"), cell


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_the_triton_kernels_conform_from_a_fresh_dsv3_process(tmp_path):
    # In a fresh process (this one set TRITON_INTERPRET long ago): a subcommand module imports triton through torch
    # before the suites run, which used to leave Triton compiling instead of interpreting on a CPU-only machine.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "harness.cli", "conform", "--impl", "triton", "-k",
                           "quant_1x128_bitwise", "--format", "json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert {c["status"] for c in json.loads(done.stdout)["cells"]} == {"pass"}
