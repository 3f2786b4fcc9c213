"""The report's figures (the `plot` extra: matplotlib), each drawn from records, never from recomputed numbers.

One function per figure takes the report's records and returns a matplotlib Figure (None when there is nothing to
draw) and a caption that says what is drawn and what is absent. Records they read:
- KV cache: `kv_cache_bytes_per_sequence` (analytic; extra `context`), one line per model.
- roofline: the profiles' `hbm_bandwidth_GBps` and `*_dense_TFLOPS` (declared ones analytic, `local` measured) and
  every measured record with an extra `roofline = {"flops", "bytes", "seconds", "dtype"}` as a point.
- TPOT: `tpot_ms` analytic with extra `link_GBps` (the sweep) as lines, per-profile records as markers with the
  paper's values, measured `tpot_ms` with `link_GBps` as points (a measured decode step's `tpot_ms` carries a
  memory bandwidth, not a link's, and is a roofline point instead).
- training loss: `train_loss` records (measured; subject the run, extra `seed`, `curve_steps`,
  `curve_loss`), else the final validation losses per seed of `fp8_rel_loss_gap` (`val_loss_bf16`, `val_loss_fp8`).
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter

from harness.report import Figure
from harness.results import Record, write_atomic

Drawn = tuple[MplFigure | None, str]
_SIZE = (7.5, 4.8)  # inches; 150 dpi gives 1125 x 720 pixels
_DPI = 150
_DTYPE_FIELDS = {"bf16": "bf16_dense_TFLOPS", "fp32": "fp32_dense_TFLOPS", "fp8": "fp8_dense_TFLOPS"}
_POINT_FAMILIES = {"achieved_bandwidth_fraction": "MLA decode step", "achieved_compute_fraction": "MoE layer forward",
                   "tpot_ms": "decode step"}  # legend names of the roofline points by metric


def _figure(width: float = _SIZE[0]) -> tuple[MplFigure, object]:
    fig = MplFigure(figsize=(width, _SIZE[1]), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    return fig, ax


def _tokens(value: float, _: object) -> str:
    """An axis label for a token count: 1k, 128k, 1M."""
    if value >= 1 << 20:
        return f"{value / (1 << 20):g}M"
    return f"{value / 1024:g}k" if value >= 1024 else f"{value:g}"


def kv_cache_context(records: list[Record]) -> Drawn:
    """KV-cache bytes of one sequence against its context length, one line per model (log-log)."""
    lines: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r.metric == "kv_cache_bytes_per_sequence" and "context" in r.extra:
            lines[r.subject].append((r.extra["context"], r.value))
    if not lines:
        return None, "not drawn: no kv_cache_bytes_per_sequence records in this report"
    fig, ax = _figure()
    for model, points in sorted(lines.items(), key=lambda kv: -max(v for _, v in kv[1])):
        points.sort()
        x = [c for c, _ in points]
        per_token = points[-1][1] / points[-1][0]
        ax.plot(x, [v / 1e9 for _, v in points], marker="o", ms=3, label=f"{model} ({per_token / 1e3:,.1f} kB/token)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_tokens))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache of one sequence (GB)")
    ax.set_title("KV cache per sequence vs context length (BF16, all layers)")
    ax.legend(fontsize=8)
    return fig, ("KV-cache bytes of one sequence (bytes per token x context, all layers, BF16) from the "
                 "kv_cache_bytes_per_sequence records; log-log axes; the legend gives bytes per token.")


def _profiles(records: list[Record]) -> dict[str, dict[str, float]]:
    """{profile: {field: value}} of the profiles' bandwidth and peak throughputs in the records."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for r in records:
        if r.profile and (r.metric == "hbm_bandwidth_GBps" or r.metric in _DTYPE_FIELDS.values()):
            out[r.profile][r.metric] = r.value
    return {p: f for p, f in out.items() if "hbm_bandwidth_GBps" in f}


def _roofs(profiles: dict[str, dict[str, float]]) -> dict[tuple[float, float, str], list[str]]:
    """{(GB/s, TFLOP/s, dtype): profile names} of the roofs to draw: BF16 of each declared profile (profiles with
    the same roof share one line), every measured dtype of the local machine."""
    roofs: dict[tuple[float, float, str], list[str]] = defaultdict(list)
    for name, fields in sorted(profiles.items()):
        for dtype in ("fp32", "bf16") if name == "local" else ("bf16",):
            if _DTYPE_FIELDS[dtype] in fields:
                roofs[fields["hbm_bandwidth_GBps"], fields[_DTYPE_FIELDS[dtype]], dtype].append(name)
    return roofs


def _points(records: list[Record]) -> list[tuple[Record, float, float]]:
    """(record, FLOP/byte, TFLOP/s) of every measured record with a roofline point."""
    out = []
    for r in records:
        point = r.extra.get("roofline")
        if r.kind == "measured" and isinstance(point, dict) and point.get("bytes") and point.get("seconds"):
            out.append((r, point["flops"] / point["bytes"], point["flops"] / point["seconds"] / 1e12))
    return out


def _point_label(r: Record) -> str:
    """The legend entry of a point's family: what was timed, on which model, in which dtype."""
    family = _POINT_FAMILIES.get(r.metric, r.metric)
    model = r.extra.get("model") or r.extra.get("config") or r.subject
    return f"{family} ({model}, {r.extra['roofline'].get('dtype', '?')}, measured)"


def _point_tag(r: Record) -> str:
    e = r.extra
    if "context" in e:
        return f"ctx {_tokens(e['context'], None)} b{e.get('batch', 1)}"
    return f"{e['tokens']} tok" if "tokens" in e else ""


def roofline(records: list[Record]) -> Drawn:
    """Attainable TFLOP/s against arithmetic intensity: each profile's roof (declared: BF16 dense; local: every
    dtype it measured) and the measured points."""
    profiles, points = _profiles(records), _points(records)
    if not profiles:
        return None, "not drawn: no hardware-profile records (bandwidth, TFLOP/s) in this report"
    intensities = [i for _, i, _ in points] + [f[_DTYPE_FIELDS["bf16"]] * 1e3 / f["hbm_bandwidth_GBps"]
                                               for f in profiles.values() if _DTYPE_FIELDS["bf16"] in f]
    x = np.logspace(math.log10(min([0.1, *intensities]) / 2), math.log10(max(intensities) * 10), 200)
    fig, ax = _figure(width=10.0)
    dashes = iter(["-", "-.", "--", ":"] * 4)  # profiles with close roofs stay apart
    for (bandwidth, peak, dtype), names in _roofs(profiles).items():
        roof = np.minimum(peak, bandwidth * x / 1e3)  # GB/s x FLOP/B = GFLOP/s
        local = names == ["local"]
        style = dict(lw=2.2, color="black", ls="-" if dtype == "fp32" else "--") if local else dict(
            lw=1.3, ls=next(dashes, "-"))
        ax.plot(x, roof, label=f"{', '.join(names)} {dtype.upper()}" + (" (measured)" if local else ""), **style)
    markers = iter("o^sDv")
    for label, group in _grouped(points, lambda p: _point_label(p[0])).items():
        ax.scatter([i for _, i, _ in group], [t for _, _, t in group], marker=next(markers, "o"), s=36, zorder=3,
                   edgecolors="black", linewidths=0.5, label=label)
        for r, i, t in group:
            ax.annotate(_point_tag(r), (i, t), textcoords="offset points", xytext=(4, -9), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of memory traffic)")
    ax.set_ylabel("attainable throughput (TFLOP/s)")
    ax.set_title("Roofline: declared profiles (BF16 dense) and this machine")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the points stay visible
    absent = "" if points else (" No measured points in this report: `dsv3 report --full` measures the MLA decode "
                                "step and the MoE layer.")
    return fig, ("Roofs: min(peak, bandwidth x intensity) from the profile records (declared: BF16 dense; local: "
                 "the probe's FP32 and BF16 matmul and copy bandwidth). Points: measured records' analytic FLOPs "
                 "and bytes over their median time." + absent)


def _grouped(items: Iterable, key: Callable) -> dict:
    out: dict = defaultdict(list)
    for item in items:
        out[key(item)].append(item)
    return out


def _ep_bound(r: Record) -> bool:
    """A per-profile EP-communication bound: tpot_ms naming its link and that link's bandwidth (a decode step's
    roofline prediction carries a memory bandwidth and no link)."""
    return r.metric == "tpot_ms" and r.kind == "analytic" and "link" in r.extra and "bandwidth_GBps" in r.extra


def _profile_links(records: list[Record]) -> dict[float, str]:
    """{link GB/s: 'scale-out: h100, h800'} of the per-profile TPOT records."""
    links: dict[float, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in records:
        if _ep_bound(r) and r.profile:
            links[r.extra["bandwidth_GBps"]][r.extra["link"]].add(r.profile)
    return {bw: "; ".join(f"{link}: {', '.join(sorted(names))}" for link, names in sorted(kinds.items()))
            for bw, kinds in sorted(links.items())}


def tpot_bandwidth(records: list[Record]) -> Drawn:
    """The EP-communication bound on TPOT against the link bandwidth, one line per MoE model, with the declared
    profiles' links, the paper's values and any measured TPOT with a link bandwidth."""
    sweep = [r for r in records if r.metric == "tpot_ms" and r.kind == "analytic" and "link_GBps" in r.extra]
    if not sweep:
        return None, "not drawn: no tpot_ms records over a link-bandwidth sweep (extra link_GBps) in this report"
    fig, ax = _figure()
    for model, group in _grouped(sweep, lambda r: (r.subject, r.method)).items():
        group.sort(key=lambda r: r.extra["link_GBps"])
        ax.plot([r.extra["link_GBps"] for r in group], [r.value for r in group], marker="o", ms=3,
                label=f"{model[0]} ({model[1]})")
    for bw, label in _profile_links(records).items():
        ax.axvline(bw, color="grey", ls=":", lw=1)
        ax.annotate(label, (bw, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="top",
                    ha="right", xytext=(-2, -4), textcoords="offset points", color="dimgrey")
    paper = [r for r in records if _ep_bound(r) and r.paper is not None]
    if paper:
        ax.scatter([r.extra["bandwidth_GBps"] for r in paper], [r.paper for r in paper], marker="x", s=50,
                   color="black", zorder=3, label="paper (Insights §2.3.2)")
    measured = [r for r in records if r.metric == "tpot_ms" and r.kind == "measured" and "link_GBps" in r.extra]
    if measured:
        ax.scatter([r.extra["link_GBps"] for r in measured],
                   [r.value for r in measured], marker="D", s=30, zorder=3, label="measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = sorted({r.extra["link_GBps"] for r in sweep})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xlabel("EP link bandwidth per GPU per direction (GB/s)")
    ax.set_ylabel("TPOT bound (ms)")
    ax.set_title("EP-communication bound on time per output token")
    ax.legend(fontsize=8, loc="lower left")
    absent = "" if measured else " No measured TPOT with a link bandwidth in this report."
    return fig, ("Lines: the bound (layers x 2 micro-batches x dispatch + combine bytes / bandwidth) over a sweep "
                 "of link bandwidths; dotted: the declared profiles' EP links; x: the paper's values." + absent)


def _draw_curves(curves: list[Record]) -> Drawn:
    fig, ax = _figure()
    colours: dict[str, str] = {}
    for r in curves:
        first = r.subject not in colours
        colour = colours.setdefault(r.subject, f"C{len(colours)}")
        ax.plot(r.extra["curve_steps"], r.extra["curve_loss"], color=colour, lw=1, alpha=0.8,
                label=r.subject if first else None)
    seeds = sorted({str(r.extra.get("seed")) for r in curves})
    ax.set_xlabel("training step")
    ax.set_ylabel(f"training loss ({curves[0].unit})")
    ax.set_title("FP8 vs BF16 training loss")
    ax.legend(fontsize=8)
    return fig, f"Training loss per step of the train_loss records, one line per run (seeds {', '.join(seeds)})."


def _draw_final_losses(gap: Record, noise: Record | None) -> Drawn:
    fig, ax = _figure()
    seeds = gap.extra.get("seeds") or list(range(len(gap.extra["val_loss_fp8"])))
    series = [("BF16", gap.extra["val_loss_bf16"], "o"), ("FP8", gap.extra["val_loss_fp8"], "s")]
    if noise is not None:
        series.append(("BF16, other data order", noise.extra["val_loss_bf16_other_order"], "^"))
    for name, values, marker in series:
        ax.plot(seeds, values, marker=marker, ls="none", ms=7, label=name)
    ax.set_xticks(seeds)
    ax.set_xlabel("seed")
    ax.set_ylabel(f"final validation loss ({gap.extra.get('loss_unit', 'nats per byte')})")
    ax.set_title("FP8 vs BF16 training: final validation loss per seed")
    ax.legend(fontsize=8)
    return fig, ("Final validation loss of each seed's runs from the fp8_rel_loss_gap records. Per-step loss "
                 "curves are absent: these records keep only the final losses (a `train_loss` record with "
                 "curve_steps and curve_loss draws them).")


def loss_curves(records: list[Record]) -> Drawn:
    """Training loss per step of the FP8 and BF16 runs (every seed); without curves in the records, the final
    validation losses per seed of the FP8 experiment."""
    curves = [r for r in records if r.metric == "train_loss" and r.kind == "measured"
              and isinstance(r.extra.get("curve_steps"), list) and isinstance(r.extra.get("curve_loss"), list)]
    if curves:
        return _draw_curves(curves)
    gaps = [r for r in records if r.metric == "fp8_rel_loss_gap"]
    gap = next((r for r in gaps if "val_loss_fp8" in r.extra and "val_loss_bf16" in r.extra), None)
    if gap is None:
        return None, ("not drawn: no training records in this report (`dsv3 report --full` runs the FP8 vs BF16 "
                      "experiment)")
    return _draw_final_losses(gap, next((r for r in gaps if "val_loss_bf16_other_order" in r.extra), None))


FIGURES: tuple[tuple[str, str, Callable[[list[Record]], Drawn]], ...] = (
    ("fig-kv-cache-context.png", "KV cache per sequence vs context length", kv_cache_context),
    ("fig-roofline.png", "Roofline with measured points", roofline),
    ("fig-tpot-bandwidth.png", "TPOT bound vs interconnect bandwidth", tpot_bandwidth),
    ("fig-loss-curves.png", "FP8 vs BF16 training loss", loss_curves),
)
FIGURE_FILES = tuple(name for name, _, _ in FIGURES)


def write_figures(records: list[Record], out_dir: Path) -> list[Figure]:
    """Draw every figure from `records` into `out_dir` (PNG, each written atomically)."""
    written = []
    for name, title, draw in FIGURES:
        fig, caption = draw(records)
        if fig is not None:
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=_DPI)
            write_atomic(Path(out_dir) / name, buf.getvalue())
        written.append(Figure(title, name if fig is not None else None, caption))
    return written
