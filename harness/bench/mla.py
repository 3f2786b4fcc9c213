"""MLA workloads: a real-dimension attention layer's live cache bytes and counted FLOPs (quick), and the decode
step of absorbed vs naive MLA vs transformers' DeepseekV3Attention over the same weights and cached state (full).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from baselines.attention import Attention
from dsv3ref.config import MLA_MODES, ModelConfig
from dsv3ref.kv_cache import LatentCache, Span
from dsv3ref.mla import MLA
from dsv3ref.rope import to_half_layout
from hardware.profile import Profile
from hardware.roofline import achieved_fraction_of_bandwidth
from hardware.timing import Timing, time_interleaved
from harness import paper
from harness.analytic.flops import attention_decode_bytes, attention_layer_fwd_flops
from harness.analytic.kv_cache import kv_cache_bytes_per_token
from harness.bench.common import FlopCount, conditions, dtype_name, materialise_, speedup_record
from harness.numerics import calc_diff
from harness.results import Record

FLOP_PREFILL = 2  # prefill tokens through each real-dimension layer (cache bytes, FLOPs); CPUs run M > 2 GEMMs slowly
FLOP_CONTEXT = 4096  # cached tokens before the counted decode step
DECODE_CONTEXTS = (512, 4096, 16384)
DECODE_BATCHES = (1, 4)
HF_MAX_CONTEXT = 4096  # transformers decompresses the whole cache each step: 16k takes seconds per step
DECODE_REFERENCE = "deepseek-v3-671b"  # the decode table's model when --model names no MLA model


def attention_layer(cfg: ModelConfig, mode: str = "absorbed") -> nn.Module:
    """One attention layer of `cfg` on the meta device: MLA in `mode`, or the MHA/GQA/MQA baseline."""
    with torch.device("meta"):
        return MLA(cfg, mode) if cfg.attention.kind == "mla" else Attention(cfg)


def real_layer(cfg: ModelConfig, mode: str, dtype: torch.dtype, device: str, seed: int | None = 0) -> nn.Module:
    """One real-dimension attention layer (see `materialise_`: pseudo-random from `seed`, zeros for None)."""
    return materialise_(attention_layer(cfg, mode), device, dtype, seed)


def load_layer(cfg: ModelConfig, state: dict[str, torch.Tensor], mode: str) -> nn.Module:
    """An attention layer holding `state` (shared, not copied), in its dtype and on its device."""
    layer = attention_layer(cfg, mode)
    layer.load_state_dict(state, assign=True)
    first = next(iter(state.values()))
    return layer.to(device=first.device, dtype=first.dtype)


def fill_cache(layer: nn.Module, cache: Any, context: int, generator: torch.Generator, decompress: bool = True,
               chunk: int = 1024) -> None:
    """Put `context` tokens in a cache without running the layer: a random unit-RMS latent and k_pe for MLA (with
    `decompress`, the naive cache gets that latent through wkv_b, so both modes hold the same state; otherwise
    zeros), random K/V for the baseline."""
    batch, device, dtype = cache.batch, cache.lengths.device, cache.dtype
    for start in range(0, context, chunk):
        width = min(chunk, context - start)
        span = Span.make(batch, width, start, None, layer.cfg.max_seq_len, device)
        if not isinstance(layer, MLA):
            shape = (batch, width, layer.n_kv_heads, layer.head_dim)
            cache.append(span, *(torch.randn(shape, generator=generator).to(device, dtype) for _ in range(2)))
            continue
        kv = torch.randn(batch, width, layer.kv_lora_rank, generator=generator).to(device, dtype)
        pe = torch.randn(batch, width, layer.qk_rope_head_dim, generator=generator).to(device, dtype)
        if layer.mode == "absorbed":
            cache.append(span, kv, pe)
        elif not decompress:  # zeros: the values do not matter where only shapes do (FLOP counts)
            shape = (batch, width, layer.n_heads)
            cache.append(span, kv.new_zeros(*shape, layer.qk_head_dim), kv.new_zeros(*shape, layer.v_head_dim))
        else:
            k_nope, v = layer.wkv_b(kv).view(batch, width, layer.n_heads, -1).split(
                [layer.qk_nope_head_dim, layer.v_head_dim], dim=-1)
            k = torch.cat([k_nope, pe[:, :, None, :].expand(-1, -1, layer.n_heads, -1)], dim=-1)
            cache.append(span, k, v)


# --- quick: live cache bytes and counted FLOPs ---------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMeasurement:
    """What one real-dimension layer measured: its live cache's bytes per token and counted FLOPs."""

    cfg: ModelConfig
    method: str  # absorbed / naive for MLA, the attention kind otherwise
    cache_bytes_per_token: float
    tokens_cached: int
    flops: tuple[tuple[str, int, int, int], ...]  # (phase, tokens, context, counted)


def _counted_flops(layer: nn.Module, x: torch.Tensor, start: int, cache: Any) -> int:
    with torch.no_grad(), FlopCount() as counter:
        out = layer(x, start, cache)
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("a real-dimension layer produced non-finite output")
    return counter.total


def measure_layers(cfg: ModelConfig, device: str) -> list[LayerMeasurement]:
    """`measure_layer` in every mode of `measured_modes(cfg)`, the modes sharing one set of zero weights."""
    state = real_layer(cfg, "absorbed", torch.float32, device, seed=None).state_dict()
    return [measure_layer(load_layer(cfg, state, mode), mode) for mode in measured_modes(cfg)]


def measure_layer(layer: nn.Module, mode: str) -> LayerMeasurement:
    """Count what one real-dimension layer does: prefill FLOP_PREFILL tokens into a BF16 cache sized for them (its
    nbytes / slots is the measured size; the prefill FLOPs are counted), then count one decode step after
    FLOP_CONTEXT cached tokens (both capped by max_seq_len). The layer (`measure_layers`) holds zero weights and
    computes in fp32: a count depends on neither values nor the compute dtype, and CPUs without native BF16 run
    fp32 matmuls faster. The measured cache is BF16, as the table says; the decode step's long cache is fp32, so
    that it is not cast to the compute dtype at every step (3 s for V3's naive 4K-token cache on a 2-core CPU)."""
    cfg, device = layer.cfg, layer.wo.weight.device
    tokens, context = min(FLOP_PREFILL, cfg.max_seq_len), min(FLOP_CONTEXT, cfg.max_seq_len - 1)
    x = torch.randn(1, tokens, cfg.hidden_size, device=device)
    cache = layer.new_cache(1, tokens, dtype=torch.bfloat16)
    prefill = _counted_flops(layer, x, 0, cache)
    long_cache = layer.new_cache(1, context + 1, dtype=torch.float32)
    fill_cache(layer, long_cache, context, torch.Generator().manual_seed(1), decompress=False)
    decode = _counted_flops(layer, x[:, :1], context, long_cache)
    method = mode if cfg.attention.kind == "mla" else cfg.attention.kind
    return LayerMeasurement(cfg, method, cache.bytes_per_token(), int(cache.lengths.sum()),
                            (("prefill", tokens, 0, prefill), ("decode", 1, context, decode)))


def measured_modes(cfg: ModelConfig) -> tuple[str, ...]:
    """The layer executions measured for a model: absorbed MLA (and naive for the paper's V3, whose per-head cache
    is the table's comparison), or the baseline attention."""
    if cfg.attention.kind != "mla":
        return ("",)
    return MLA_MODES[::-1] if cfg.name == DECODE_REFERENCE else ("absorbed",)


def cache_records(m: LayerMeasurement) -> list[Record]:
    """kv_cache_bytes_per_token (measured: the live cache's bytes per slot x layers) with the analytic value."""
    mla_mode = "naive" if m.method == "naive" else "absorbed"
    ref = paper.ref("kv_cache_bytes_per_token", m.cfg.name) if m.method != "naive" else None
    return [Record("kv_cache_bytes_per_token", m.cfg.name, m.cache_bytes_per_token * m.cfg.num_layers, "B",
                   kind="measured", paper=ref and ref.value, method=m.method,
                   extra={"bytes_per_layer": m.cache_bytes_per_token, "layers": m.cfg.num_layers, "dtype": "bf16",
                          "tokens_cached": m.tokens_cached,
                          "analytic": kv_cache_bytes_per_token(m.cfg, "bf16", mla_mode)})]


def flop_records(m: LayerMeasurement) -> list[Record]:
    """fwd_gflops_per_token of one attention layer, counted and analytic, per phase."""
    mla_mode = "naive" if m.method == "naive" else "absorbed"
    records = []
    for phase, tokens, context, counted in m.flops:
        analytic = attention_layer_fwd_flops(m.cfg, tokens, context, 1, mla_mode)
        extra = {"phase": phase, "tokens": tokens, "context": context}
        for kind, value in (("measured", counted), ("analytic", analytic)):
            records.append(Record("fwd_gflops_per_token", f"{m.cfg.name}/attention-layer", value / tokens / 1e9,
                                  "GFLOP", kind=kind, method=m.method, extra=extra))
    return records


# --- full: the decode step ----------------------------------------------------------------------------------------


@dataclass
class DecodeBench:
    """One real-dimension MLA layer in `dtype` (absorbed, naive and, optionally, transformers over the same
    weights; optionally a baseline MHA/GQA/MQA layer of another config) with caches holding `context` tokens per
    row. `steps[name]()` runs one decode step; it is repeatable: each call writes position `context` again."""

    cfg: ModelConfig
    context: int
    batch: int
    device: str
    with_transformers: bool
    baseline: ModelConfig | None = None
    dtype: torch.dtype = torch.bfloat16
    steps: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        state = real_layer(self.cfg, "absorbed", self.dtype, self.device).state_dict()
        x = torch.randn(self.batch, 1, self.cfg.hidden_size, generator=generator).to(self.device, self.dtype)
        caches = {}
        for mode in MLA_MODES:
            layer = load_layer(self.cfg, state, mode)
            caches[mode] = layer.new_cache(self.batch, self.context + 1)
            fill_cache(layer, caches[mode], self.context, torch.Generator().manual_seed(1))
            self.steps[mode] = self._step(layer, x, caches[mode])
        if self.with_transformers:
            self.steps["transformers"] = self._hf_step(state, x, caches["absorbed"])
        if self.baseline is not None:
            layer = real_layer(self.baseline, "", self.dtype, self.device)
            cache = layer.new_cache(self.batch, self.context + 1)
            fill_cache(layer, cache, self.context, torch.Generator().manual_seed(1))
            xb = torch.randn(self.batch, 1, self.baseline.hidden_size, generator=generator)
            self.steps[self.baseline.attention.kind] = self._step(layer, xb.to(self.device, self.dtype), cache)

    def _step(self, layer: nn.Module, x: torch.Tensor, cache: Any) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.no_grad():
                return layer(x, self.context, cache)

        return step

    def _hf_step(self, state: dict[str, torch.Tensor], x: torch.Tensor,
                 latent: LatentCache) -> Callable[[], torch.Tensor]:
        """transformers' layer with a DynamicCache holding the same latent (k_pe in its de-interleaved layout)."""
        from harness.adapters.mla import TransformersMLA

        impl = TransformersMLA()
        layer = impl.build(self.cfg, state, self.dtype, self.device)
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
        dtype = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        if self.baseline is not None and name == self.baseline.attention.kind:
            return attention_decode_bytes(self.baseline, self.context, self.batch, dtype=dtype)
        mode = "naive" if name == "naive" else "absorbed"
        return attention_decode_bytes(self.cfg, self.context, self.batch, mode, dtype)

    def agreement(self) -> dict[str, float]:
        """calc_diff of each MLA step's output against absorbed's (DeepGEMM's metric)."""
        ref = self.steps["absorbed"]()
        baseline = self.baseline.attention.kind if self.baseline is not None else None
        return {name: calc_diff(ref, step()) for name, step in self.steps.items() if name != baseline}


def decode_cases(with_transformers: bool) -> list[tuple[int, int, bool]]:
    """(context, batch, with transformers) of the decode table: batch 1 at every context, batch 4 at 4096;
    transformers at batch 1 up to HF_MAX_CONTEXT."""
    cases = [(c, 1) for c in DECODE_CONTEXTS] + [(4096, b) for b in DECODE_BATCHES if b > 1]
    return [(c, b, with_transformers and b == 1 and c <= HF_MAX_CONTEXT) for c, b in cases]


def transformers_installed() -> bool:
    return importlib.util.find_spec("transformers") is not None


def decode_records(bench: DecodeBench, times: dict[str, Timing], local: Profile) -> list[Record]:
    """mla_decode_speedup of absorbed against naive and transformers (side by side), and the absorbed step's
    achieved_bandwidth_fraction of the local memory bandwidth (with its raw times and its roofline point: analytic
    FLOPs and bytes of the step, median seconds)."""
    dtype = dtype_name(bench.dtype)
    extra = {"context": bench.context, "batch": bench.batch, "dtype": dtype, "model": bench.cfg.name,
             **conditions(bench.device)}
    records = []
    for peer in ("naive", "transformers"):
        if peer in times:
            records.append(speedup_record("mla_decode_speedup", f"absorbed-vs-{peer}", times[peer], times["absorbed"],
                                          {**extra, "bytes_per_step": {"absorbed": bench.bytes_per_step("absorbed"),
                                                                       peer: bench.bytes_per_step(peer)}}))
    step_s, moved = times["absorbed"].median, bench.bytes_per_step("absorbed")
    fraction = achieved_fraction_of_bandwidth(local, moved, step_s)
    flops = attention_layer_fwd_flops(bench.cfg, 1, bench.context, bench.batch, "absorbed")
    records.append(Record("achieved_bandwidth_fraction", f"{bench.cfg.name}/mla-absorbed-decode", fraction, "ratio",
                          kind="measured", profile="local", method=f"{dtype}-one-layer",
                          extra={**extra, "bytes_per_step": moved, "step_s": step_s,
                                 "bandwidth_GBps": local.hbm_bandwidth_GBps,
                                 "samples_s": list(times["absorbed"].samples),
                                 "roofline": {"flops": flops, "bytes": moved, "seconds": step_s, "dtype": dtype}}))
    return records


def run_decode(bench: DecodeBench, local: Profile, reps: int) -> tuple[dict[str, Timing], list[Record]]:
    """Time every step of `bench` side by side and build its records."""
    times = time_interleaved(bench.steps, device=bench.device, warmup=2, reps=reps)
    return times, decode_records(bench, times, local)
