"""`dsv3` end to end: the report reproduces the paper's analytic numbers; bad input exits 2 with one line."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from hardware.profile import load_profile, profile_names
from harness.analytic import ep_link
from harness.cli import main, subcommands
from harness.commands.report import DEFAULT_MODELS
from harness.report import render
from harness.report_sections import Table
from harness.results import Record

USER_MODEL = ('vocab_size = 100\nhidden_size = 64\nnum_layers = 2\nintermediate_size = 128\n'
              '[attention]\nkind = "mqa"\nnum_heads = 8\n')
NO_MOE_LAYER = USER_MODEL + ('[moe]\nn_routed_experts = 4\nnum_experts_per_tok = 2\nmoe_intermediate_size = 16\n'
                             'first_k_dense_replace = 2\n')  # a MoE section, every layer dense


_H800 = Path(load_profile("h800").path).read_text()


def _each(option: str, values: list[str]) -> list[str]:
    return [arg for v in values for arg in (option, v)]


@pytest.fixture(scope="module")
def report_json(tmp_path_factory):
    """One full quick report (every section runs once for the whole module), with a user model and a MoE model too
    small for the paper's "7K" rounding added, one whose MoE section has no MoE layer, and models and profiles given
    twice (by name, path or copy)."""
    root = tmp_path_factory.mktemp("report")
    (root / "mine.toml").write_text(USER_MODEL)
    (root / "no-moe-layer.toml").write_text(NO_MOE_LAYER)
    (root / "my-h800.toml").write_text(_H800)
    out = root / "new" / "sub"
    models = [str(root / "mine.toml"), "dsv3-tiny", "dsv3-tiny", "deepseek-v3-671b", str(root / "mine.toml"),
              str(root / "no-moe-layer.toml")]
    profiles = [*profile_names(), "h800", str(root / "my-h800.toml")]
    plots = ["--plots"] if importlib.util.find_spec("matplotlib") else []  # the `plot` extra
    assert main(["report", "--format", "json", "--out", str(out), *_each("--model", models),
                 *_each("--profile", profiles), *plots]) == 0
    return json.loads((out / "results.json").read_text()), out


def _value(doc, metric, subject, profile=None, method=None, kind="analytic"):
    hits = [r for r in doc["results"] if r["metric"] == metric and r["subject"] == subject and r["kind"] == kind
            and r["profile"] == profile and (method is None or r["method"] == method)]
    assert len(hits) == 1, (metric, subject, profile, method)
    return hits[0]["value"]


def test_report_reproduces_the_papers_tables(report_json):
    doc, _ = report_json
    assert doc["schema"] == "dsv3-results/1" and doc["env"]["torch"].startswith("2.13.0")
    assert _value(doc, "kv_cache_bytes_per_token", "deepseek-v3-671b") == 70_272
    assert _value(doc, "kv_cache_bytes_per_token", "qwen2.5-72b") == 327_680
    assert _value(doc, "kv_cache_bytes_per_token", "llama3.1-405b") == 516_096
    for model, paper in (("deepseek-v3-671b", 250), ("deepseek-v2-236b", 155), ("qwen2.5-72b", 394),
                         ("llama3.1-405b", 2448)):
        assert _value(doc, "train_gflops_per_token", model, method="paper-table2") == pytest.approx(paper, rel=0.01)
    assert _value(doc, "params_total", "deepseek-v3-671b") == pytest.approx(671e9, rel=5e-3)
    assert 36.5e9 <= _value(doc, "params_activated", "deepseek-v3-671b") <= 38.0e9
    assert _value(doc, "tpot_ms", "deepseek-v3-671b", "h800", "paper-7k") == pytest.approx(14.76, rel=5e-3)
    assert _value(doc, "tokens_per_s", "deepseek-v3-671b", "h800", "paper-7k") == pytest.approx(67.76, rel=5e-3)
    assert _value(doc, "tpot_ms", "deepseek-v3-671b", "gb200-nvl72", "paper-7k") == pytest.approx(0.82, rel=5e-3)
    assert _value(doc, "tokens_per_s", "deepseek-v3-671b", "gb200-nvl72", "paper-7k") == pytest.approx(1220,
                                                                                                     rel=5e-3)


def test_report_predicts_v3_decode_per_profile_and_counts_model_flops(report_json):
    doc, _ = report_json
    h800 = [r for r in doc["results"] if r["metric"] == "tpot_ms" and r["method"] == "roofline"
            and r["profile"] == "h800" and r["subject"] == "deepseek-v3-671b"]
    assert len(h800) == 1 and h800[0]["paper"] == 14.76 and h800[0]["context"] == 4096 and h800[0]["batch"] == 32
    assert h800[0]["value"] >= h800[0]["all_to_all_ms"]  # the prediction includes the EP all-to-all
    counted = {(r["kind"], r["phase"]): r["value"] for r in doc["results"]
               if r["metric"] == "fwd_gflops_per_token" and r["subject"] == "dsv3-tiny"}
    assert counted[("measured", "decode")] == counted[("analytic", "decode")] > 0
    assert counted[("measured", "prefill")] == counted[("analytic", "prefill")]


def test_report_writes_markdown_and_flags_the_papers_inconsistencies(report_json):
    _, out = report_json
    md = (out / "report.md").read_text()
    assert "7.34x" in md and "7.28x is inconsistent" in md
    assert "## EP-communication bound on TPOT" in md
    assert "`dsv3 profiles NAME` lists each number's source" in md and "profiles show" not in md  # no such command


def test_user_model_is_added(report_json):
    doc, _ = report_json
    assert _value(doc, "kv_cache_bytes_per_token", "mine") == 2 * 2 * 1 * 8 * 2  # layers x K,V x 1 head x 8 x 2 B


def test_models_and_profiles_given_twice_appear_once_in_first_seen_order(report_json):
    doc, _ = report_json
    analytic = [json.dumps(r, sort_keys=True) for r in doc["results"] if r["kind"] == "analytic"]
    assert len(set(analytic)) == len(analytic)
    kv = [r["subject"] for r in doc["results"] if r["metric"] == "kv_cache_bytes_per_token" and r["kind"] == "analytic"
          and r["method"] == "bf16"]
    assert kv == [*DEFAULT_MODELS, "mine", "dsv3-tiny", "no-moe-layer"]
    tpot = [r["profile"] for r in doc["results"]
            if (r["metric"], r["subject"], r["method"]) == ("tpot_ms", "deepseek-v3-671b", "paper-7k")]
    assert tpot == [n for n in profile_names() if ep_link(load_profile(n)) is not None]


def test_a_different_model_under_a_taken_name_is_an_error(capsys, tmp_path):
    a, b = tmp_path / "a" / "mine.toml", tmp_path / "b" / "mine.toml"  # both named "mine" by their file name
    for path, layers in ((a, "2"), (b, "3")):
        path.parent.mkdir()
        path.write_text(USER_MODEL.replace("num_layers = 2", f"num_layers = {layers}"))
    assert main(["report", "--model", str(a), "--model", str(b)]) == 2
    assert capsys.readouterr().err == f"dsv3: error: --model {b}: name 'mine' is already taken by a different one; " \
                                      "rename it\n"


@pytest.mark.parametrize(("change", "message"), [
    (('description = "NVIDIA', 'description = "my'), "name 'h800' is already taken by a different one; rename it"),
    (('name = "h800"', 'name = "local"'), "name 'local' is reserved for the probed machine; rename it"),
])
def test_a_different_profile_under_a_taken_name_is_an_error(capsys, tmp_path, change, message):
    path = tmp_path / "mine.toml"
    path.write_text(_H800.replace(*change))
    assert main(["report", "--profile", "h800", "--profile", str(path)]) == 2
    assert capsys.readouterr().err == f"dsv3: error: --profile {path}: {message}\n"


def test_moe_model_without_moe_layers_is_noted_not_counted(report_json):
    doc, out = report_json
    assert not [r for r in doc["results"] if r["subject"] == "no-moe-layer/moe-layer"]
    assert "nothing to count: no-moe-layer" in (out / "report.md").read_text()


def test_plots_are_written_beside_the_markdown_that_embeds_them(report_json):
    pytest.importorskip("matplotlib")
    _, out = report_json
    md = (out / "report.md").read_text()
    for name in ("fig-kv-cache-context.png", "fig-roofline.png", "fig-tpot-bandwidth.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and f"]({name})" in md
    assert "### FP8 vs BF16 training loss\n\n(not drawn)" in md  # the quick report trains nothing


def test_threads_default_to_all_cores(report_json):
    doc, _ = report_json
    assert doc["env"]["torch_threads"] == os.cpu_count()


def test_small_moe_model_gets_config_exact_ep_bound_only(report_json):
    # (its decode roofline, method "roofline", is the model section's and applies to any size)
    doc, out = report_json
    linked = [n for n in profile_names() if ep_link(load_profile(n)) is not None]
    got = sorted((r["metric"], r["profile"], r["method"]) for r in doc["results"]
                 if r["subject"] == "dsv3-tiny" and r["metric"] in ("tpot_ms", "tokens_per_s") and r["profile"]
                 and r["method"] != "roofline")
    assert got == sorted((m, p, "config-exact") for m in ("tpot_ms", "tokens_per_s") for p in linked)
    sweep = [(r["link_GBps"], r["value"]) for r in doc["results"] if r["subject"] == "dsv3-tiny"
             and r["metric"] == "tpot_ms" and r["profile"] is None and r["method"] == "config-exact"]
    assert len(sweep) >= 5 and {50, 900} <= {bw for bw, _ in sweep}  # H800's scale-out, NVL72's scale-up
    products = [bw * ms for bw, ms in sweep]  # TPOT inversely proportional to the bandwidth
    assert max(products) == pytest.approx(min(products), rel=1e-12)
    note = "dsv3-tiny: paper-7k not applicable (hidden_size 64 rounds to 0 thousands)"
    assert note in (out / "report.md").read_text()


@pytest.mark.parametrize("fmt", ["text", "github", "latex", "csv"])
def test_every_format_renders_every_table(report_json, fmt):
    doc, _ = report_json
    records = [Record.from_dict(r) for r in doc["results"]]
    table = Table("KV", ["model", "bytes"], [["deepseek-v3-671b", "70,272"]], records, ["a note"])
    out = render([table], doc["env"], fmt)
    if fmt == "csv":
        assert out.count("\n") == len(records) + 1 and "kv_cache_bytes_per_token,deepseek-v3-671b," in out
    else:
        assert "70,272" in out and "a note" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "--profile", "nope"], "dsv3: error: unknown profile 'nope'; known: b200, gb200-nvl72"),
    (["report", "--model", "nope"], "dsv3: error: preset: unknown model 'nope'"),
    (["report", "--format", "xml"], "dsv3: error: report: argument --format: invalid choice: 'xml' (choose from "),
    (["frobnicate"], "dsv3: error: argument command: invalid choice: 'frobnicate' (choose from "),
    (["report", "--threads", "-3"], "dsv3: error: report: argument --threads: expected an integer >= 1, got -3"),
    (["report", "--threads", "0"], "dsv3: error: report: argument --threads: expected an integer >= 1, got 0"),
    (["report", "--threads", "two"], "dsv3: error: report: argument --threads: expected an integer >= 1, got 'two'"),
])
def test_bad_usage_is_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def _bad_out(tmp_path, case):
    """A destination --out cannot use: an existing file, a folder under a file, an unwritable folder."""
    (tmp_path / "file").write_text("")
    (tmp_path / "ro").mkdir(mode=0o555)
    return {"file": tmp_path / "file", "under-a-file": tmp_path / "file" / "sub", "unwritable": tmp_path / "ro"}[case]


@pytest.mark.parametrize(("case", "message"), [
    ("file", "exists and is not a directory"),
    ("under-a-file", "cannot create the directory (Not a directory)"),
    pytest.param("unwritable", "cannot write into the directory (Permission denied)",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a 0555 folder")),
])
def test_bad_out_fails_before_any_measurement(capsys, tmp_path, case, message):
    out = _bad_out(tmp_path, case)
    assert main(["report", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"dsv3: error: --out {out}: {message}\n"  # the only line: nothing ran first


def test_empty_out_is_a_usage_error(capsys):
    assert main(["report", "--out", ""]) == 2
    assert capsys.readouterr().err == "dsv3: error: --out: expected a directory path, got ''\n"


def test_out_folder_is_created_and_its_files_get_the_umask_mode(report_json):
    _, out = report_json
    assert out.name == "sub" and out.parent.name == "new"  # created by the report (two levels)
    for name in ("report.md", "results.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_malformed_profile_names_file_and_field(capsys, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('name = "b"\ndescription = "d"\nkind = "gpu"\nbf16_dense_TFLOPS = { value = "fast", '
                    'source = "s" }\n')
    assert main(["report", "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.toml: field 'bf16_dense_TFLOPS': expected a positive number" in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "what"), [
    (["report", "--model"], "model config"), (["report", "--profile"], "profile"), (["profiles"], "profile"),
])
@pytest.mark.parametrize(("name", "reason"), [
    ("folder.toml", "Is a directory"), ("latin1.json", "not UTF-8 text: byte 0"),
    ("latin1.toml", "not UTF-8 text: byte 0"),
])
def test_unreadable_model_or_profile_file_is_one_line(capsys, tmp_path, argv, what, name, reason):
    path = tmp_path / name
    if name == "folder.toml":
        path.mkdir()
    else:
        path.write_bytes("é = 1\n".encode("latin-1"))
    assert main([*argv, str(path)]) == 2
    assert capsys.readouterr().err == f"dsv3: error: {path}: cannot read {what} ({reason})\n"


def test_profiles_command(capsys):
    assert main(["profiles"]) == 0
    listing = capsys.readouterr().out
    assert "gb200-nvl72" in listing
    assert "1,979" in listing and "1978.9" not in listing  # h800 FP8 TFLOP/s to 4 significant digits
    assert main(["profiles", "h800"]) == 0
    assert "Insights §2.3.2/§4: one 400 Gb/s CX7" in capsys.readouterr().out


def test_profiles_show_rounds_probed_floats(capsys, tmp_path):
    path = tmp_path / "probed.toml"
    path.write_text(_H800.replace('name = "h800"', 'name = "probed"').replace(
        "bf16_dense_TFLOPS = { value = 989.4,", "bf16_dense_TFLOPS = { value = 0.0179277557783743,"))
    assert main(["profiles", str(path)]) == 0
    out = capsys.readouterr().out
    assert " 0.01793  " in out and "0.0179277557783743" not in out
    assert " 1,979  " in out and " 3,350  " in out and " 80  " in out


def test_help_of_every_command(capsys):
    for name in subcommands():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0 and f"dsv3 {name}" in capsys.readouterr().out


def test_report_reproduces_table3_and_the_ep_traffic(report_json):
    doc, _ = report_json
    for name, (endpoints, switches, links, per_endpoint) in {
            "FT2": (2_048, 96, 2_048, 4.39), "MPFT": (16_384, 768, 16_384, 4.39), "FT3": (65_536, 5_120, 131_072, 7.5),
            "SF": (32_928, 1_568, 32_928, 4.4), "DF": (261_632, 16_352, 384_272, 5.8)}.items():
        assert _value(doc, "topology_endpoints", name) == endpoints
        assert _value(doc, "topology_switches", name) == switches
        assert _value(doc, "topology_links", name) == links
        for prices in ("two-column", "five-column-fit"):
            assert _value(doc, "topology_cost_per_endpoint", name, method=prices) == pytest.approx(per_endpoint,
                                                                                                 rel=0.05)
    flat = _value(doc, "ep_scaleout_bytes_per_token", "flat")
    hierarchical = _value(doc, "ep_scaleout_bytes_per_token", "hierarchical")
    assert 0 < hierarchical < flat < 8 * (7168 + 224 + 2 * 7168)  # at most k remote copies, each dispatch + combine
    traffic = [r for r in doc["results"] if r["metric"] == "tpot_ms" and r["method"].startswith("ep-traffic-")]
    assert {r["profile"] for r in traffic} >= {"h800", "gb200-nvl72"}
