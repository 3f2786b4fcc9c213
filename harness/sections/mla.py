"""Sections: MLA's KV-cache bytes and layer FLOPs measured on real-dimension layers (quick), and the decode step
of absorbed vs naive MLA vs transformers' DeepseekV3Attention timed side by side (full).

The layers get pseudo-random weights (a random block tiled over each matrix, scaled by 1/sqrt(fan_in)): cheap to
make at real dimensions, and the outputs are non-trivial. `DecodeBench` is shared with the performance suite.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from baselines.attention import Attention
from dsv3ref.config import ModelConfig
from dsv3ref.fp8 import calc_diff
from dsv3ref.kv_cache import LatentCache, Span
from dsv3ref.mla import MLA, MODES
from dsv3ref.rope import to_half_layout
from hardware.roofline import achieved_fraction_of_bandwidth
from hardware.timing import Timing, time_interleaved
from harness import paper
from harness.analytic.flops import attention_decode_bytes, attention_layer_fwd_flops
from harness.analytic.kv_cache import kv_cache_bytes_per_token
from harness.formatting import count, deviation, num
from harness.impls.mla import build_reference
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

FLOP_PREFILL = 16  # prefill tokens run through each real-dimension layer (cache bytes and FLOPs)
FLOP_CONTEXT = 4096  # cached tokens before the measured decode step
FULL_CONTEXTS = (512, 4096, 16384)
FULL_BATCHES = (1, 4)
HF_MAX_CONTEXT = 4096  # transformers decompresses the whole cache each step: 16k takes seconds per step
FULL_REFERENCE = "deepseek-v3-671b"
_POOL = 1 << 22  # random block tiled over every weight


def pseudo_random_(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill t in place with a tiled random block (standard normal / sqrt(fan_in)); norm weights (1-D) with ones."""
    if t.dim() == 1:
        return t.fill_(1.0)
    pool = (torch.randn(min(_POOL, t.numel()), generator=generator) / math.sqrt(t.shape[-1])).to(t.device, t.dtype)
    flat = t.view(-1)
    for i in range(0, flat.numel(), pool.numel()):
        chunk = flat[i: i + pool.numel()]
        chunk.copy_(pool[: chunk.numel()])
    return t


def real_weights(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for one attention layer of `cfg` at its real dimensions (MLA or the baseline), pseudo-random."""
    with torch.device("meta"):
        layer = MLA(cfg) if cfg.attention.kind == "mla" else Attention(cfg)
    layer = layer.to(dtype).to_empty(device=device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return {name: pseudo_random_(t, generator) for name, t in layer.state_dict().items()}


def real_layer(cfg: ModelConfig, weights: dict[str, torch.Tensor], mode: str) -> nn.Module:
    """MLA in `mode` (or the MHA/GQA/MQA baseline) holding `weights` (shared, not copied)."""
    if cfg.attention.kind == "mla":
        layer = build_reference(cfg, weights, mode, next(iter(weights.values())).dtype,
                                next(iter(weights.values())).device)
    else:
        with torch.device("meta"):
            layer = Attention(cfg)
        layer.load_state_dict(weights, assign=True)
        layer.rotary.to(next(iter(weights.values())).device)
    return layer


# --- quick: measured cache bytes and FLOPs ----------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMeasurement:
    """What one real-dimension layer measured: its live cache's bytes per token and counted FLOPs."""

    cfg: ModelConfig
    method: str  # absorbed / naive for MLA, the attention kind otherwise
    cache_bytes_per_token: float
    tokens_cached: int
    flops: tuple[tuple[str, int, int, int], ...]  # (phase, tokens, context, counted)


def _counted_flops(layer: nn.Module, x: torch.Tensor, start: int, cache: object) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = layer(x, start, cache)
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("a real-dimension layer produced non-finite output")
    return counter.get_total_flops()


def measure_layer(cfg: ModelConfig, weights: dict[str, torch.Tensor], mode: str) -> LayerMeasurement:
    """Prefill FLOP_PREFILL tokens into a cache sized for them (its nbytes / slots is the measured size; the prefill
    FLOPs are counted), then count one decode step after FLOP_CONTEXT cached tokens (both capped by max_seq_len)."""
    layer = real_layer(cfg, weights, mode)
    dtype, device = layer.wo.weight.dtype, layer.wo.weight.device
    tokens, context = min(FLOP_PREFILL, cfg.max_seq_len), min(FLOP_CONTEXT, cfg.max_seq_len - 1)
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=dtype, device=device)
    cache = layer.new_cache(1, tokens)
    prefill = _counted_flops(layer, x, 0, cache)
    long_cache = layer.new_cache(1, context + 1)
    _fill(layer, long_cache, context, torch.Generator().manual_seed(1), decompress=False)
    decode = _counted_flops(layer, x[:, :1], context, long_cache)
    method = mode if cfg.attention.kind == "mla" else cfg.attention.kind
    return LayerMeasurement(cfg, method, cache.bytes_per_token(), int(cache.lengths.sum()),
                            (("prefill", tokens, 0, prefill), ("decode", 1, context, decode)))


def _measure_all(ctx: ReportContext) -> list[LayerMeasurement]:
    out = []
    for cfg in ctx.models:
        ctx.progress(f"mla: one real-dimension {cfg.name} attention layer (live cache, FlopCounterMode)")
        weights = real_weights(cfg, torch.bfloat16, ctx.device)
        if cfg.attention.kind != "mla":
            modes: tuple[str, ...] = ("",)
        else:  # the naive mode's per-head cache and FLOPs for the reference model only (it costs seconds)
            modes = ("absorbed", "naive") if cfg.name == FULL_REFERENCE else ("absorbed",)
        out += [measure_layer(cfg, weights, mode) for mode in modes]
        del weights
    return out


def _cache_table(measured: list[LayerMeasurement]) -> Table:
    rows, records = [], []
    for m in measured:
        mla_mode = "naive" if m.method == "naive" else "absorbed"
        analytic = kv_cache_bytes_per_token(m.cfg, "bf16", mla_mode)
        total = m.cache_bytes_per_token * m.cfg.num_layers
        ref = paper.ref("kv_cache_bytes_per_token", m.cfg.name) if m.method != "naive" else None
        records.append(Record("kv_cache_bytes_per_token", m.cfg.name, total, "B", kind="measured",
                              paper=ref and ref.value, method=m.method,
                              extra={"bytes_per_layer": m.cache_bytes_per_token, "layers": m.cfg.num_layers,
                                     "dtype": "bf16", "tokens_cached": m.tokens_cached, "analytic": analytic}))
        rows.append([m.cfg.name, m.method, count(m.cache_bytes_per_token), count(total), count(analytic),
                     "yes" if total == analytic else "NO", count(ref.value) if ref else "—",
                     deviation(total, ref and ref.value)])
    headers = ["model", "cache", "B/token/layer (live)", "x layers", "analytic", "equal", "paper", "dev"]
    notes = [f"measured: nbytes / slots of the cache after {FLOP_PREFILL} tokens (or max_seq_len) ran through one "
             "real-dimension BF16 layer (pseudo-random weights), times the layer count",
             "absorbed: the latent cache (kv_norm(c) + roped k_pe); naive: the per-head K/V the naive mode caches; "
             "gqa: the baseline layer's K/V cache"]
    return Table("MLA: KV cache per token, measured from a live cache (BF16)", headers, rows, records, notes)


def _flops_table(measured: list[LayerMeasurement]) -> Table:
    rows, records = [], []
    for m in measured:
        mla_mode = "naive" if m.method == "naive" else "absorbed"
        subject = f"{m.cfg.name}/attention-layer"
        for phase, tokens, context, counted in m.flops:
            analytic = attention_layer_fwd_flops(m.cfg, tokens, context, 1, mla_mode)
            extra = {"phase": phase, "tokens": tokens, "context": context}
            for kind, value in (("measured", counted), ("analytic", analytic)):
                records.append(Record("fwd_gflops_per_token", subject, value / tokens / 1e9, "GFLOP", kind=kind,
                                      method=m.method, extra=extra))
            rows.append([m.cfg.name, m.method, phase, context, num(counted / tokens / 1e9, 4),
                         num(analytic / tokens / 1e9, 4), "yes" if counted == analytic else "NO"])
    headers = ["model", "layer", "phase", "context", "GFLOP/token (FlopCounterMode)", "analytic", "equal"]
    notes = [f"one attention layer in BF16; prefill of {FLOP_PREFILL} tokens from position 0, decode of one token "
             f"after {FLOP_CONTEXT} cached (fewer when max_seq_len is shorter); analytic: "
             "harness.analytic.flops.attention_layer_fwd_flops",
             "absorbed MLA scores [c; k_pe] and sums c (2 x kv_lora_rank + rope FLOPs per key and head) instead of "
             "per-head K/V (qk_head_dim + v_head_dim): more FLOPs per cached token, 1/71 of the cache bytes"]
    return Table("Attention layer forward FLOPs, counted vs analytic", headers, rows, records, notes)


@section("mla", "MLA: measured KV cache and layer FLOPs", order=12, quick=True)
def run_quick(ctx: ReportContext) -> list[Table]:
    measured = _measure_all(ctx)
    return [_cache_table(measured), _flops_table(measured)]


# --- full: decode-step ratios -----------------------------------------------------------------------------------


def _fill(layer: nn.Module, cache: object, context: int, generator: torch.Generator, decompress: bool = True,
          chunk: int = 1024) -> None:
    """Put `context` tokens in a cache without running the layer: a random unit-RMS latent and k_pe for MLA (with
    `decompress`, the naive cache gets that latent through wkv_b, so both modes hold the same state; otherwise
    zeros), random K/V for the baseline."""
    batch, device, dtype = cache.batch, cache.lengths.device, cache.dtype
    for start in range(0, context, chunk):
        width = min(chunk, context - start)
        span = Span.make(batch, width, start, None, layer.cfg.max_seq_len, device)
        if isinstance(layer, MLA):
            kv = torch.randn(batch, width, layer.kv_lora_rank, generator=generator).to(device, dtype)
            pe = torch.randn(batch, width, layer.qk_rope_head_dim, generator=generator).to(device, dtype)
            if layer.mode == "absorbed":
                cache.append(span, kv, pe)
                continue
            if not decompress:  # zeros: the values do not matter where only shapes do (FLOP counts)
                shape = (batch, width, layer.n_heads)
                cache.append(span, kv.new_zeros(*shape, layer.qk_head_dim), kv.new_zeros(*shape, layer.v_head_dim))
                continue
            k_nope, v = layer.wkv_b(kv).view(batch, width, layer.n_heads, -1).split(
                [layer.qk_nope_head_dim, layer.v_head_dim], dim=-1)
            k = torch.cat([k_nope, pe[:, :, None, :].expand(-1, -1, layer.n_heads, -1)], dim=-1)
            cache.append(span, k, v)
        else:
            shape = (batch, width, layer.n_kv_heads, layer.head_dim)
            cache.append(span, *(torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)))


@dataclass
class DecodeBench:
    """One real-dimension MLA layer in BF16 (absorbed, naive and, optionally, transformers over the same weights;
    optionally a baseline MHA/GQA/MQA layer of another config) with caches holding `context` tokens per row.
    `steps[name]()` runs one decode step; it is repeatable: each call writes position `context` again."""

    cfg: ModelConfig
    context: int
    batch: int
    device: str
    with_transformers: bool
    baseline: ModelConfig | None = None
    steps: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        weights = real_weights(self.cfg, torch.bfloat16, self.device)
        x = torch.randn(self.batch, 1, self.cfg.hidden_size, generator=generator).to(self.device, torch.bfloat16)
        caches = {}
        for mode in MODES:
            layer = build_reference(self.cfg, weights, mode, torch.bfloat16, self.device)
            caches[mode] = layer.new_cache(self.batch, self.context + 1)
            _fill(layer, caches[mode], self.context, torch.Generator().manual_seed(1))
            self.steps[mode] = self._step(layer, x, caches[mode])
        if self.with_transformers:
            self.steps["transformers"] = self._hf_step(weights, x, caches["absorbed"])
        if self.baseline is not None:
            layer = real_layer(self.baseline, real_weights(self.baseline, torch.bfloat16, self.device), "")
            cache = layer.new_cache(self.batch, self.context + 1)
            _fill(layer, cache, self.context, torch.Generator().manual_seed(1))
            xb = torch.randn(self.batch, 1, self.baseline.hidden_size, generator=generator)
            self.steps[self.baseline.attention.kind] = self._step(layer, xb.to(self.device, torch.bfloat16), cache)

    def _step(self, layer: nn.Module, x: torch.Tensor, cache: object) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.no_grad():
                return layer(x, self.context, cache)

        return step

    def _hf_step(self, weights: dict[str, torch.Tensor], x: torch.Tensor,
                 latent: LatentCache) -> Callable[[], torch.Tensor]:
        """transformers' layer with a DynamicCache holding the same latent (k_pe in its de-interleaved layout)."""
        from harness.impls.mla import TransformersMLA

        impl = TransformersMLA()
        layer = impl.build(self.cfg, weights, torch.bfloat16, self.device)
        cache = impl.new_cache(layer, self.batch, self.context + 1)
        kv, pe = latent.kv[:, : self.context], latent.pe[:, : self.context]  # [B, T, rank], [B, T, rope]
        cache.update(kv[:, None].clone(), to_half_layout(pe)[:, None], 0)

        def step() -> torch.Tensor:
            extra = cache.get_seq_length() - self.context
            if extra:
                cache.crop(-extra)  # drop the previous step's token
            with torch.no_grad():
                return layer(x, self.context, cache)

        return step

    def bytes_per_step(self, name: str) -> float:
        """Weights + the cache rows a step reads (transformers reads the latent cache, as absorbed)."""
        if self.baseline is not None and name == self.baseline.attention.kind:
            return attention_decode_bytes(self.baseline, self.context, self.batch)
        return attention_decode_bytes(self.cfg, self.context, self.batch, "naive" if name == "naive" else "absorbed")

    def agreement(self) -> dict[str, float]:
        """calc_diff of each MLA step's output against absorbed's (DeepGEMM's metric)."""
        ref = self.steps["absorbed"]()
        out = {}
        for name, step in self.steps.items():
            if self.baseline is not None and name == self.baseline.attention.kind:
                continue
            out[name] = calc_diff(ref, step())
        return out


def _decode_rows(ctx: ReportContext, cfg: ModelConfig, threads: int) -> tuple[list[list], list[Record], list[str]]:
    rows, records, notes = [], [], []
    for context in FULL_CONTEXTS:
        for batch in FULL_BATCHES:
            if batch > 1 and context != 4096:
                continue
            hf = batch == 1 and context <= HF_MAX_CONTEXT and importlib.util.find_spec("transformers") is not None
            ctx.progress(f"mla: decode bench context {context} batch {batch}"
                         + (" (absorbed, naive, transformers)" if hf else " (absorbed, naive)"))
            bench = DecodeBench(cfg, context, batch, ctx.device, hf)
            times = time_interleaved(bench.steps, device=ctx.device, warmup=2, reps=9 if context <= 4096 else 5)
            agree = bench.agreement()
            extra = {"context": context, "batch": batch, "threads": threads, "dtype": "bf16",
                     "loadavg_1min": os.getloadavg()[0]}
            rows.append(_row(cfg, bench, times, agree, context, batch))
            records += _records(ctx, cfg, bench, times, extra)
            del bench
    notes.append("one real-dimension layer in BF16 on the local device; steps timed side by side (A B C A B C ...), "
                 "median of the samples; ratios are naive / absorbed and transformers / absorbed step time")
    notes.append(f"transformers runs at batch 1 up to context {HF_MAX_CONTEXT}: it pushes the whole cached latent "
                 "through kv_b_proj every step (context x kv_lora_rank x heads x 256 x 2 FLOP)")
    notes.append("the naive step is many small matmuls (two per head over its cache slice, read in place): on a "
                 "machine shared with other jobs its OpenMP threads stall, so compare runs by the recorded "
                 "loadavg_1min")
    notes.append("bytes/step: weights once + the cache rows read (context + 1 per sequence); bw fraction: absorbed "
                 "bytes / step time over the local profile's measured memory bandwidth")
    notes.append("calc_diff: each mode's decode output against absorbed's on the same state (1 - 2 sum xy / "
                 "sum(x^2 + y^2))")
    return rows, records, notes


def _row(cfg: ModelConfig, bench: DecodeBench, times: dict[str, Timing], agree: dict[str, float], context: int,
         batch: int) -> list:
    t = {k: v.median for k, v in times.items()}
    hf = "transformers" in t
    return [context, batch, num(t["absorbed"] * 1e3), num(t["naive"] * 1e3),
            num(t["transformers"] * 1e3) if hf else "—", num(t["naive"] / t["absorbed"]) + "x",
            num(t["transformers"] / t["absorbed"]) + "x" if hf else "—",
            num(bench.bytes_per_step("absorbed") / 1e6, 1), num(bench.bytes_per_step("naive") / 1e6, 1),
            f"{max(agree.values()):.1e}"]


def _records(ctx: ReportContext, cfg: ModelConfig, bench: DecodeBench, times: dict[str, Timing],
             extra: dict) -> list[Record]:
    t = {k: v.median for k, v in times.items()}
    samples = {k: list(v.samples) for k, v in times.items()}
    records = []
    for peer in ("naive", "transformers"):
        if peer in t:
            records.append(Record("mla_decode_speedup", f"absorbed-vs-{peer}", t[peer] / t["absorbed"], "x",
                                  kind="measured", method="bf16-one-layer",
                                  extra={**extra, "model": cfg.name, "samples_s": {
                                      "absorbed": samples["absorbed"], peer: samples[peer]},
                                      "bytes_per_step": {"absorbed": bench.bytes_per_step("absorbed"),
                                                         peer: bench.bytes_per_step(peer)}}))
    fraction = achieved_fraction_of_bandwidth(ctx.local, bench.bytes_per_step("absorbed"), t["absorbed"])
    records.append(Record("achieved_bandwidth_fraction", f"{cfg.name}/mla-absorbed-decode", fraction, "ratio",
                          kind="measured", profile="local", method="bf16-one-layer",
                          extra={**extra, "bytes_per_step": bench.bytes_per_step("absorbed"),
                                 "step_s": t["absorbed"], "bandwidth_GBps": ctx.local.hbm_bandwidth_GBps}))
    return records


@section("mla_decode", "MLA decode step: absorbed vs naive vs transformers", order=62, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    threads = torch.get_num_threads()
    cfg = next((m for m in ctx.models if m.name == FULL_REFERENCE), ModelConfig.preset(FULL_REFERENCE))
    rows, records, notes = _decode_rows(ctx, cfg, threads)
    for r in records:
        if r.metric == "achieved_bandwidth_fraction":
            row = next(x for x in rows if x[0] == r.extra["context"] and x[1] == r.extra["batch"])
            row.append(f"{r.value:.2f}")
    notes.insert(0, f"{cfg.name}, {threads} threads, local bandwidth {ctx.local.hbm_bandwidth_GBps:.1f} GB/s")
    headers = ["context", "batch", "absorbed ms", "naive ms", "transformers ms", "naive/absorbed",
               "transformers/absorbed", "absorbed MB/step", "naive MB/step", "max calc_diff", "absorbed bw fraction"]
    return [Table("MLA decode step, one layer, BF16 (side by side)", headers, rows, records, notes)]
