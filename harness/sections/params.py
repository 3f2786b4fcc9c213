"""Section: total and activated parameters, by part."""

from __future__ import annotations

from harness import paper
from harness.analytic import param_counts
from harness.formatting import billions, deviation
from harness.report_sections import ReportContext, Table, section
from harness.results import Record


@section("params", "Parameters", order=20)
def run(ctx: ReportContext) -> list[Table]:
    rows, records = [], []
    for m in ctx.models:
        p = param_counts(m)
        parts = {"embedding": p.embedding, "head": p.head, "attention": p.attention, "dense_ffn": p.dense_ffn,
                 "routed_experts": p.routed_experts, "shared_experts": p.shared_experts, "router": p.router,
                 "norms": p.norms}
        cells = []
        for metric, value in (("params_total", p.total), ("params_activated", p.activated)):
            ref = paper.ref(metric, m.name)
            records.append(Record(metric, m.name, value, "count", paper=ref and ref.value, method="config",
                                  extra={"parts": parts, "mtp": p.mtp} if metric == "params_total" else {}))
            cells += [billions(value), billions(ref.value, 1) if ref else "—", deviation(value, ref and ref.value)]
        rows.append([m.name, *cells, billions(p.attention), billions(p.dense_ffn),
                     billions(p.routed_experts + p.shared_experts), billions(p.embedding + p.head),
                     billions(p.mtp) if p.mtp else "—"])
    headers = ["model", "total", "paper", "dev", "activated", "paper", "dev", "attention", "dense FFN", "experts",
               "emb + head", "MTP (extra)"]
    notes = ["activated = all but the routed experts a token skips; embedding and head counted in full (the paper's "
             "convention); MTP modules are not part of the total",
             "the paper's activated counts are rounded (37B, 21B); deviations against them show the rounding"]
    return [Table("Parameters", headers, rows, records, notes)]
