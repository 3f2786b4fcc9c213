"""Section: the paper's EP-communication bound on TPOT, for every MoE model on every profile with a network,
and over a sweep of link bandwidths (the report's TPOT figure)."""

from __future__ import annotations

from dsv3ref.config import ModelConfig
from hardware.profile import Profile
from harness import paper
from harness.analytic import EPCommBound, ep_comm_bound, ep_link
from harness.analytic.tpot import tpot_methods
from harness.formatting import deviation, num, significant
from harness.paper import PaperRef
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

Refs = tuple[PaperRef | None, PaperRef | None]  # the paper's tpot_ms and tokens_per_s
LINK_GBPS = (25, 50, 100, 200, 400, 900, 1800)  # the sweep of the bandwidth table (GB/s per GPU per direction)


def _records(m: ModelConfig, p: Profile, link: tuple[str, float], bounds: dict[str, EPCommBound],
             refs: Refs) -> list[Record]:
    """A tpot_ms and a tokens_per_s record per method, beside the paper's values where it states them."""
    ref_ms, ref_tps = refs
    records = []
    for meth, b in bounds.items():
        extra = {"link": link[0], "bandwidth_GBps": link[1], "hidden": b.hidden,
                 "comm_time_us": b.comm_time_s * 1e6, "tokens_per_device": b.tokens_per_device,
                 "experts_per_token": b.experts_per_token, "micro_batches": b.micro_batches}
        records.append(Record("tpot_ms", m.name, b.tpot_s * 1e3, "ms", profile=p.name,
                              paper=ref_ms and ref_ms.value, method=meth, extra=extra))
        records.append(Record("tokens_per_s", m.name, b.tokens_per_s, "1/s", profile=p.name,
                              paper=ref_tps and ref_tps.value, method=meth, extra=extra))
    return records


def _row(m: ModelConfig, p: Profile, link: tuple[str, float], bounds: dict[str, EPCommBound], refs: Refs) -> list[str]:
    """One table row; the paper-7k cells are em dashes where that method does not apply."""
    ref_ms, ref_tps = refs
    b7, bx = bounds.get("paper-7k"), bounds["config-exact"]
    tpot7 = b7 and b7.tpot_s * 1e3
    return [m.name, p.name, f"{link[0]} {num(link[1], 0)}", num(b7 and b7.comm_time_s * 1e6), num(tpot7, 3),
            num(ref_ms.value) if ref_ms else "—",
            deviation(tpot7, ref_ms and ref_ms.value) if b7 else "—", num(b7 and b7.tokens_per_s, 1),
            num(ref_tps.value, 0) if ref_tps else "—", num(bx.tpot_s * 1e3, 3), num(bx.tokens_per_s, 1)]


def bandwidth_table(models: list[ModelConfig]) -> Table:
    """The bound (config-exact) of every MoE model over a sweep of link bandwidths (the TPOT figure's lines)."""
    rows, records = [], []
    for m in models:
        row = [m.name]
        for bw in LINK_GBPS:
            b = ep_comm_bound(m, bw, "config-exact")
            records.append(Record("tpot_ms", m.name, b.tpot_s * 1e3, "ms", method="config-exact",
                                  extra={"link_GBps": bw, "hidden": b.hidden, "comm_time_us": b.comm_time_s * 1e6}))
            row.append(significant(b.tpot_s * 1e3, 3))
        rows.append(row)
    notes = ["TPOT ms of the bound above (config-exact) at each link bandwidth, GB/s per GPU per direction: TPOT is "
             "inversely proportional to it"]
    headers = ["model (TPOT ms)", *(f"{bw} GB/s" for bw in LINK_GBPS)]
    return Table("EP-communication bound on TPOT by link bandwidth", headers, rows, records, notes)


@section("tpot", "EP-communication bound on TPOT", order=40)
def run(ctx: ReportContext) -> list[Table]:
    rows, records, notes = [], [], []
    skipped = [p.name for p in ctx.profiles if ep_link(p) is None]
    for m in (m for m in ctx.models if m.moe is not None):
        methods = tpot_methods(m)
        if "paper-7k" not in methods:
            notes.append(f"{m.name}: paper-7k not applicable (hidden_size {m.hidden_size} rounds to 0 thousands); "
                         "config-exact only")
        for p in ctx.profiles:
            link = ep_link(p)
            if link is None:
                continue
            bounds = {meth: ep_comm_bound(m, link[1], meth) for meth in methods}
            refs = paper.ref("tpot_ms", m.name, p.name), paper.ref("tokens_per_s", m.name, p.name)
            records.extend(_records(m, p, link, bounds, refs))
            rows.append(_row(m, p, link, bounds, refs))
            if refs[0] and refs[0].note:
                notes.append(f"{m.name} on {p.name}: {refs[0].note}")
    notes.append("bound = layers x 2 micro-batches x (1 B FP8 dispatch + 2 B BF16 combine) x 32 tokens x "
                 "(top-k + shared) experts x hidden / bandwidth; paper-7k rounds hidden to thousands as the paper "
                 "does, config-exact uses the config's hidden size; compute and latency assumed hidden")
    notes.append("link: scale-up when the profile's NVLink domain spans several nodes (rack-scale, e.g. NVL72), "
                 "else scale-out")
    if skipped:
        notes.append(f"no scale-out or rack-scale link declared (bound not applicable): {', '.join(skipped)}")
    headers = ["model", "profile", "link GB/s", "comm us (7k)", "TPOT ms (7k)", "paper ms", "dev", "tok/s (7k)",
               "paper tok/s", "TPOT ms (exact)", "tok/s (exact)"]
    moe_models = [m for m in ctx.models if m.moe is not None]
    return [Table("EP-communication bound on TPOT (Insights §2.3.2)", headers, rows, records, notes),
            bandwidth_table(moe_models)]
