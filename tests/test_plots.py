"""The report's figures: each is drawn from records (PNG files written, non-empty), says what is absent, and
`dsv3 report --plots` needs --out and matplotlib (one-line errors otherwise)."""

from __future__ import annotations

import importlib.util

import pytest

from harness.cli import main
from harness.results import Record

pytest.importorskip("matplotlib")
plots = pytest.importorskip("harness.plots")
PNG = b"\x89PNG\r\n\x1a\n"


def _records(measured: bool) -> list[Record]:
    """What a report holds: the analytic records the figures read and, when `measured`, the measured ones."""
    records = [Record("kv_cache_bytes_per_sequence", m, per_token * c, "B", method="bf16", extra={"context": c})
               for m, per_token in (("deepseek-v3-671b", 70272), ("llama3.1-405b", 516096))
               for c in (1024, 4096, 131072)]
    records += [Record("tpot_ms", "deepseek-v3-671b", 756.0 / bw, "ms", method="config-exact",
                       extra={"link_GBps": bw}) for bw in (25, 100, 900)]
    records += [Record("tpot_ms", "deepseek-v3-671b", 15.1, "ms", profile="h800", paper=14.76, method="paper-7k",
                       extra={"link": "scale-out", "bandwidth_GBps": 50})]
    records += [Record(f, "h800", v, u, profile="h800", method="declared")
                for f, v, u in (("bf16_dense_TFLOPS", 989.0, "TFLOP/s"), ("hbm_bandwidth_GBps", 3350.0, "GB/s"))]
    records += [Record(f, "local", v, u, kind="measured", profile="local")
                for f, v, u in (("fp32_dense_TFLOPS", 0.3, "TFLOP/s"), ("bf16_dense_TFLOPS", 0.05, "TFLOP/s"),
                                ("hbm_bandwidth_GBps", 12.0, "GB/s"))]
    if measured:
        records.append(Record("achieved_bandwidth_fraction", "dsv3-small/mla-absorbed-decode", 0.04, "ratio",
                              kind="measured", profile="local",
                              extra={"context": 64, "batch": 1, "model": "dsv3-small",
                                     "roofline": {"flops": 2e6, "bytes": 4e6, "seconds": 2e-3, "dtype": "fp32"}}))
        records += [Record("train_loss", precision, 2.0, "nat", kind="measured",
                           extra={"seed": 0, "curve_steps": [1, 2, 3], "curve_loss": [5.0, 3.0, 2.0]})
                    for precision in ("bf16", "fp8")]
    return records


@pytest.mark.parametrize("measured", [False, True])
def test_every_figure_is_written_from_records(tmp_path, measured):
    figures = plots.write_figures(_records(measured), tmp_path)
    assert [f.file for f in figures][:3] == list(plots.FIGURE_FILES[:3])
    for f in figures:
        if f.file:
            data = (tmp_path / f.file).read_bytes()
            assert data.startswith(PNG) and len(data) > 10_000
    by_title = {f.title: f for f in figures}
    roofline, loss = by_title["Roofline with measured points"], by_title["FP8 vs BF16 training loss"]
    assert ("No measured points" in roofline.caption) != measured
    assert (loss.file is None) != measured and ("not drawn" in loss.caption) != measured
    assert "No measured TPOT" in by_title["TPOT bound vs interconnect bandwidth"].caption


def test_final_losses_are_drawn_when_the_records_have_no_curves(tmp_path):
    gap = Record("fp8_rel_loss_gap", "fp8-vs-bf16", 0.2, "%", kind="measured",
                 extra={"seeds": [0, 1], "val_loss_bf16": [2.0, 2.1], "val_loss_fp8": [2.01, 2.1]})
    fig, caption = plots.loss_curves([gap])
    assert fig is not None and "Per-step loss curves are absent" in caption


def test_only_ep_bounds_mark_links_on_the_bandwidth_figure():
    """A decode step's roofline prediction carries the memory bandwidth it used, not a link: no link line."""
    prediction = Record("tpot_ms", "dsv3-tiny", 0.5, "ms", profile="local", method="roofline",
                        extra={"context": 64, "batch": 1, "bandwidth_GBps": 9.8})
    assert plots._profile_links([*_records(False), prediction]) == {50: "scale-out: h800"}


def test_no_records_no_figures(tmp_path):
    figures = plots.write_figures([], tmp_path)
    assert all(f.file is None and f.caption.startswith("not drawn") for f in figures)
    assert list(tmp_path.iterdir()) == []


def test_plots_need_out_and_matplotlib(tmp_path, capsys, monkeypatch):
    assert main(["report", "--plots"]) == 2
    assert "--plots: needs --out DIR" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["report", "--plots", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dsv3-harness[plot]'" in err
