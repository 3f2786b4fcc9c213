"""Section: KV-cache bytes per token (the paper's Table 1), from each model's config, and the cache of one
sequence by context length (the report's KV-cache figure)."""

from __future__ import annotations

from dsv3ref.config import ModelConfig
from harness import paper
from harness.analytic import kv_cache_bytes_per_sequence, kv_cache_bytes_per_token, kv_cache_bytes_per_token_layer
from harness.formatting import count, deviation, num, significant
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

REFERENCE_MODEL = "deepseek-v3-671b"
CONTEXTS = tuple(1024 * 2**i for i in range(8))  # 1k ... 128k tokens


def per_sequence_table(models: tuple[ModelConfig, ...]) -> Table:
    """The cache of one sequence at each context length up to the model's max_seq_len (the KV-cache figure)."""
    rows, records = [], []
    for m in models:
        row = [m.name]
        for context in CONTEXTS:
            if context > m.max_seq_len:
                row.append("—")
                continue
            value = kv_cache_bytes_per_sequence(m, context)
            records.append(Record("kv_cache_bytes_per_sequence", m.name, value, "B", method="bf16",
                                  extra={"context": context}))
            row.append(significant(value / 1e9, 3))
        rows.append(row)
    notes = ["bytes per token x context, all layers, BF16; — beyond the model's max_seq_len"]
    headers = ["model (GB per sequence)", *(f"{c // 1024}k" for c in CONTEXTS)]
    return Table("KV cache per sequence by context length (BF16)", headers, rows, records, notes)


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
    return [Table("KV cache per token (BF16)", headers, rows, records, notes), per_sequence_table(ctx.models)]
