"""Section: training GFLOPs per token at sequence length 4096 (the paper's Table 2), two methods."""

from __future__ import annotations

from harness import paper
from harness.analytic import train_flops_per_token
from harness.formatting import deviation, num
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

SEQ_LEN = 4096


@section("train_flops", "Training GFLOPs per token (seq 4096)", order=30)
def run(ctx: ReportContext) -> list[Table]:
    rows, records, notes = [], [], []
    for m in ctx.models:
        ref = paper.ref("train_gflops_per_token", m.name)
        values = {meth: train_flops_per_token(m, meth, SEQ_LEN) / 1e9 for meth in ("exact", "paper-table2")}
        for meth, value in values.items():
            records.append(Record("train_gflops_per_token", m.name, value, "GFLOP", paper=ref and ref.value,
                                  method=meth, extra={"seq_len": SEQ_LEN}))
        if ref and ref.note:
            notes.append(f"{m.name}: {ref.note}")
        rows.append([m.name, "MoE" if m.moe else "dense", num(values["exact"]), num(values["paper-table2"]),
                     num(ref.value, 0) if ref else "—", deviation(values["exact"], ref and ref.value),
                     deviation(values["paper-table2"], ref and ref.value)])
    notes.append("exact = 6 x activated non-embedding parameters (head included) + causal attention at 4096, x3 "
                 "for forward + backward; paper-table2 = exact for MoE rows, 72 L d^2 + 6 V d for dense rows (the "
                 "mix of conventions that reproduces the paper's table)")
    headers = ["model", "FFN", "exact", "paper-table2", "paper", "dev exact", "dev table2"]
    return [Table("Training GFLOPs per token (seq 4096)", headers, rows, records, notes)]
