"""Section: KV-cache bytes per token (the paper's Table 1), from each model's config."""

from __future__ import annotations

from harness import paper
from harness.analytic import kv_cache_bytes_per_token, kv_cache_bytes_per_token_layer
from harness.formatting import count, deviation, num
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

REFERENCE_MODEL = "deepseek-v3-671b"


@section("kv_cache", "KV cache per token (BF16)", order=10)
def run(ctx: ReportContext) -> list[Table]:
    base = next((m for m in ctx.models if m.name == REFERENCE_MODEL), None)
    base_bytes = kv_cache_bytes_per_token(base) if base else None
    rows, records, notes = [], [], []
    for m in ctx.models:
        value = kv_cache_bytes_per_token(m)
        ref = paper.ref("kv_cache_bytes_per_token", m.name)
        records.append(Record("kv_cache_bytes_per_token", m.name, value, "B", paper=ref and ref.value,
                              method="bf16", extra={"bytes_per_layer": kv_cache_bytes_per_token_layer(m.attention)}))
        ratio = value / base_bytes if base_bytes else None
        ratio_ref = paper.ref("kv_cache_ratio", m.name)
        if ratio is not None and m.name != REFERENCE_MODEL:
            records.append(Record("kv_cache_ratio", f"{m.name}/{REFERENCE_MODEL}", ratio, "x",
                                  paper=ratio_ref and ratio_ref.value, method="bf16"))
        if ratio_ref and ratio_ref.note:
            notes.append(f"{m.name}: {ratio_ref.note}")
        rows.append([m.name, m.attention.kind, m.num_layers, count(kv_cache_bytes_per_token_layer(m.attention)),
                     count(value), count(ref.value) if ref else "—", deviation(value, ref and ref.value),
                     num(ratio) + "x" if ratio else "—", num(ratio_ref.value) + "x" if ratio_ref else "—"])
    notes.append("MLA caches the latent c^KV and the shared RoPE key: (kv_lora_rank + qk_rope_head_dim) x 2 B per "
                 "layer; GQA caches K and V: 2 x kv_heads x head_dim x 2 B per layer")
    headers = ["model", "attention", "layers", "B/token/layer", "B/token", "paper", "dev", "x vs V3", "paper x"]
    return [Table("KV cache per token (BF16)", headers, rows, records, notes)]
