"""Workloads of the assembled model: its forward FLOPs counted against the analytic total (quick), time per output
token of greedy decoding measured beside the per-operator roofline prediction, and cached decoding against
recomputation of the whole prefix (full); and the record builders of the DeepSeek-V3 decode-unit prediction.

The measured model is built on the meta device and materialised in the machine's working dtype (pseudo-random
weights, `harness.bench.common.materialise_`). A TPOT point: the cache is prefilled with `context` random tokens,
two warm-up steps are run and rewound, then `TPOT_STEPS` greedy steps (one token per row, the argmax fed back)
are timed one by one (CUDA events on a GPU), each round also timing the local probe's memory copy, in a shuffled
order; median and p90 over the steps. The prediction uses the same model, batch and dtype at the middle context of
the timed steps, the distinct routed experts the timed steps touched, and the local profile with the memory
bandwidth of the copies timed beside the steps (a shared machine's bandwidth drifts between the probe and the
measurement); the ratio is the median over rounds of step time over the prediction at that round's bandwidth.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from dsv3ref.config import AttentionConfig, ModelConfig, MoEConfig
from dsv3ref.generate import generate
from dsv3ref.model import ModelCache, Transformer
from hardware.probe import copy_case
from hardware.profile import Profile
from hardware.timing import Timing, paired_ratio, time_interleaved
from harness import paper
from harness.analytic.decode import DecodeStep, Deployment, Prediction, UnitPrediction, predict
from harness.analytic.flops import model_fwd_flops
from harness.analytic.params import param_counts
from harness.bench.common import conditions, dtype_name, materialise_, speedup_record
from harness.results import Record

TPOT_MODEL = "dsv3-small"  # the measured table's model when --model names none that fits
TPOT_CONTEXTS = (64, 256, 896)
TPOT_BATCHES = (1, 4)
# A model whose decode step reads ~1.4 GB of fp32 weights per token: the memory term outweighs the per-operator
# overhead on a CPU (dsv3-small reads 11 MB, and its step is dispatch overhead), so the roofline itself is tested.
MID_CFG = ModelConfig.preset("dsv3-small").replace(
    name="tpot-mid", hidden_size=2048, intermediate_size=16384,
    attention=AttentionConfig(kind="mla", num_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
                              qk_rope_head_dim=32, v_head_dim=64),
    moe=MoEConfig(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=4096, n_shared_experts=1,
                  first_k_dense_replace=1, score_func="sigmoid", route_scale=2.5, bias=True))
MID_CONTEXTS = (64, 256)
TPOT_STEPS = 16
PREFILL_CHUNK = 256
RECOMPUTE_NEW_TOKENS = (16, 64, 128)
RECOMPUTE_PROMPT = 16
FLOP_MODEL = "dsv3-tiny"  # the quick FLOP count's model when --model names none that fits
FLOP_CONTEXT = 16  # prefill length before the counted decode step
FLOP_BATCH = 2
MEASURED_MAX_PARAMS = 200_000_000  # a --model is measured here only up to this size
PREDICTION_TOLERANCE = 1.5  # measured / predicted within [1/1.5, 1.5] counts as predicted


def fits_here(cfg: ModelConfig) -> bool:
    """Whether a model can be measured here: MLA + MoE, small enough to materialise in full."""
    return cfg.attention.kind == "mla" and param_counts(cfg).total <= MEASURED_MAX_PARAMS


def bench_model(cfg: ModelConfig, dtype: torch.dtype, device: str, seed: int | None = 0, attn_mode: str = "absorbed",
                moe_backend: str = "auto") -> Transformer:
    """The whole model, built on the meta device and materialised (pseudo-random from `seed`, zeros for None)."""
    with torch.device("meta"):
        model = Transformer(cfg, attn_mode=attn_mode, moe_backend=moe_backend)
    return materialise_(model, device, dtype, seed).eval()


# --- quick: forward FLOPs, counted and analytic ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs FlopCounterMode counted for a prefill and the decode step after it, with the analytic totals."""

    cfg: ModelConfig
    mode: str
    batch: int
    context: int
    counted: dict[str, int]  # phase -> FLOPs
    analytic: dict[str, float]


def count_flops(cfg: ModelConfig, device: str, mode: str = "absorbed", batch: int = FLOP_BATCH,
                context: int = FLOP_CONTEXT) -> FlopCount:
    """Count one prefill of `context` tokens per row and the decode step after it, through the whole model (zero
    weights, fp32, the per-expert MoE loop: a count depends on neither values nor dtype, and the loop runs
    exactly the selected experts). One torch thread: a count does not depend on it, and a loaded machine stalls
    multi-threaded small ops."""
    context = min(context, cfg.max_seq_len - 1)
    model = bench_model(cfg, torch.float32, device, seed=None, attn_mode=mode, moe_backend="loop")
    cache = model.new_cache(batch, context + 1)
    tokens = torch.zeros(batch, context + 1, dtype=torch.long, device=device)
    counted, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for phase, chunk in (("prefill", tokens[:, :context]), ("decode", tokens[:, context:])):
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                model.extend(chunk, cache)
            counted[phase] = counter.get_total_flops()
    finally:
        torch.set_num_threads(threads)
    analytic = {"prefill": model_fwd_flops(cfg, context, 0, batch, mode),
                "decode": model_fwd_flops(cfg, 1, context, batch, mode)}
    return FlopCount(cfg, mode, batch, context, counted, analytic)


def flop_records(f: FlopCount) -> list[Record]:
    """fwd_gflops_per_token of the whole model, measured (FlopCounterMode) and analytic, per phase."""
    records = []
    for phase, tokens, cached in (("prefill", f.context, 0), ("decode", 1, f.context)):
        extra = {"phase": phase, "tokens": tokens, "cached_tokens": cached, "batch": f.batch}
        for kind, value in (("measured", f.counted[phase]), ("analytic", f.analytic[phase])):
            records.append(Record("fwd_gflops_per_token", f.cfg.name, value / (tokens * f.batch) / 1e9, "GFLOP",
                                  kind=kind, method=f.mode, extra=extra))
    return records


# --- full: TPOT measured and predicted -----------------------------------------------------------------------------


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a region runs (each a kernel launch, or a CPU kernel call, plus dispatch)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class TPOTPoint:
    """One measured TPOT point and its prediction."""

    cfg: ModelConfig
    batch: int
    context: int  # cached tokens before the first timed step
    dtype: torch.dtype
    device: str
    timing: Timing  # one sample per decode step
    prediction: Prediction  # on the local profile at the side-by-side bandwidth, at the middle context
    bandwidth_GBps: float  # the probe's copy timed in the same rounds as the steps, median
    per_round: tuple[float, ...]  # step time / the prediction at that round's copy bandwidth
    routed_experts: float  # distinct routed experts per MoE layer and step, mean
    op_calls: int  # aten operators one decode step runs
    small_m_slowdown: float  # F.linear over the largest weight: `batch` rows' time / one row's (1.0 at batch 1)
    conditions: dict[str, Any]
    step: DecodeStep  # what was predicted (the same step on another profile: `profile_record`)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.timing.samples, n=10, method="inclusive")[-1]

    @property
    def ratio(self) -> float:
        """measured / predicted: the median over rounds of each step's time over the prediction at the bandwidth of
        the copy timed in its round (a loaded machine slows both alike)."""
        return statistics.median(self.per_round)

    def missing_term(self) -> str:
        """What the prediction leaves out when the measurement is outside PREDICTION_TOLERANCE (empty otherwise).
        Above one row: the matmul operators' predicted time scaled by how much slower than one row a matmul over the
        model's largest weight ran with that many rows (the roofline takes them as equal); then the rest of the
        gap spread over the step's aten calls (kernel launch / dispatch, which the roofline omits)."""
        if self.ratio < 1 / PREDICTION_TOLERANCE:
            return "reuse: bytes served from caches faster than the profile's memory bandwidth"
        if self.ratio <= PREDICTION_TOLERANCE:
            return ""
        gap, terms = self.timing.median - self.prediction.time_s, []
        if self.batch > 1:
            matmuls = sum(r.time_s for op, r in zip(self.prediction.ops, self.prediction.rooflines, strict=True)
                          if op.flops)
            slow = min(gap, (self.small_m_slowdown - 1) * matmuls)
            terms.append(f"~{slow * 1e3:.1f} ms in matmuls of {self.batch} rows ({self.small_m_slowdown:.1f}x "
                         "their 1-row time)")
            gap -= slow
        if gap > 0:
            terms.append(f"{gap * 1e3:.1f} ms over {self.op_calls} aten calls ({gap / self.op_calls * 1e6:.0f} us "
                         "each: launch / dispatch)")
        return "; ".join(terms)


def _distinct_experts(routing: list[list[torch.Tensor]]) -> float:
    """Distinct routed experts per MoE layer and step, mean over both (routing[step][layer]: indices [N, k])."""
    counts = [int(indices.unique().numel()) for step in routing for indices in step]
    return sum(counts) / len(counts) if counts else 0.0


def _prefill(model: Transformer, cache: ModelCache, tokens: torch.Tensor) -> None:
    for start in range(0, tokens.shape[1], PREFILL_CHUNK):
        model.extend(tokens[:, start: start + PREFILL_CHUNK], cache)


def measure_tpot(model: Transformer, batch: int, context: int, device: str, local: Profile,
                 steps: int = TPOT_STEPS, seed: int = 0) -> TPOTPoint:
    """Time `steps` greedy decode steps after `context` cached tokens (see the module docstring)."""
    cfg, dtype = model.cfg, model.embed.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context + 1), generator=generator).to(device)
    cache = model.new_cache(batch, context + steps + 2)
    routing: list[list[torch.Tensor]] = []  # each step's routing per MoE layer, counted after the timing
    state = {"x": tokens[:, context:]}

    def step() -> torch.Tensor:
        state["x"] = model.extend(state["x"], cache).logits.argmax(dim=-1, keepdim=True)
        routing.append([m.last_indices for m in model.moe_layers()])
        return state["x"]

    with torch.no_grad():
        _prefill(model, cache, tokens[:, :context])
        for _ in range(2):  # warm-up, then back to `context`
            step()
        cache.rewind(context)
        state["x"] = tokens[:, context:]
        with OpCounter() as ops:
            step()
        cache.rewind(context)
        state["x"], routing[:] = tokens[:, context:], []
        copy, moved, _ = copy_case(device)
        times = time_interleaved({"step": step, "copy": copy}, device=device, warmup=0, reps=steps)
    routed = _distinct_experts(routing)
    step_shape = DecodeStep(cfg, batch, context + steps // 2, weights=dtype_name(dtype), dense=dtype_name(dtype),
                            kv=dtype_name(dtype), routed_experts=routed)  # the middle context of the timed steps
    bandwidths = [moved / t / 1e9 for t in times["copy"].samples]
    per_round = tuple(t / predict(step_shape, replace(local, hbm_bandwidth_GBps=bw)).time_s
                      for t, bw in zip(times["step"].samples, bandwidths, strict=True))
    median_bw = statistics.median(bandwidths)
    prediction = predict(step_shape, replace(local, hbm_bandwidth_GBps=median_bw))
    slowdown = small_m_slowdown(model, batch, device)
    return TPOTPoint(cfg, batch, context, dtype, device, times["step"], prediction, median_bw, per_round, routed,
                     ops.calls, slowdown, conditions(device), step_shape)


def small_m_slowdown(model: Transformer, batch: int, device: str, reps: int = 7) -> float:
    """F.linear over the model's largest linear weight (not the head) with `batch` rows against one row, side by
    side: 1.0 for a memory-bound matmul as the roofline models it (the weight is read once either way)."""
    if batch == 1:
        return 1.0
    weight = max((m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"),
                 key=lambda w: w.numel())
    x1, xb = (torch.randn(rows, weight.shape[1], device=device, dtype=weight.dtype) for rows in (1, batch))
    with torch.no_grad():
        times = time_interleaved({"one": lambda: F.linear(x1, weight), "batch": lambda: F.linear(xb, weight)},
                                 device=device, warmup=1, reps=reps)
    return paired_ratio(times["batch"], times["one"])


def tpot_records(p: TPOTPoint) -> list[Record]:
    """tpot_ms and tokens_per_s measured on `local` and predicted by the roofline (same subject, context, batch)."""
    shared = {"context": p.context, "batch": p.batch, "dtype": dtype_name(p.dtype), "steps": len(p.timing.samples)}
    measured = {**shared, "p90_ms": p.p90 * 1e3, "samples_s": list(p.timing.samples), "ratio_to_prediction": p.ratio,
                "ratio_per_round": list(p.per_round), "side_by_side_bandwidth_GBps": p.bandwidth_GBps,
                "op_calls_per_step": p.op_calls, "small_m_slowdown": p.small_m_slowdown, **p.conditions}
    pr = p.prediction
    # the roofline figure's point: the predicted step's FLOPs and bytes over the measured median step time
    measured["roofline"] = {"flops": pr.flops, "bytes": pr.bytes, "seconds": p.timing.median,
                            "dtype": dtype_name(p.dtype)}
    predicted = {**shared, "predicted_at_context": p.step.context, "bound": pr.bound,
                 "dominant_op": pr.dominant_op(), "memory_bound_ms": pr.memory_s * 1e3,
                 "compute_bound_ms": pr.compute_s * 1e3, "bytes": pr.bytes, "flops": pr.flops,
                 "routed_experts": p.routed_experts, "bandwidth_GBps": p.bandwidth_GBps}
    method = f"{dtype_name(p.dtype)}-greedy-decode"
    median = p.timing.median
    return [
        Record("tpot_ms", p.cfg.name, median * 1e3, "ms", kind="measured", profile="local", method=method,
               extra=measured),
        Record("tokens_per_s", p.cfg.name, 1 / median, "1/s", kind="measured", profile="local", method=method,
               extra={**shared, "batch_tokens_per_s": p.batch / median, **p.conditions}),
        Record("tpot_ms", p.cfg.name, pr.time_s * 1e3, "ms", kind="analytic", profile="local", method="roofline",
               extra=predicted),
        Record("tokens_per_s", p.cfg.name, 1 / pr.time_s, "1/s", kind="analytic", profile="local",
               method="roofline", extra={**shared, "batch_tokens_per_s": p.batch / pr.time_s}),
    ]


def profile_record(p: TPOTPoint, profile: Profile) -> Record:
    """tpot_ms of the measured step predicted on a declared profile (a GPU measurement beside its datasheet)."""
    pr = predict(p.step, profile)
    return Record("tpot_ms", p.cfg.name, pr.time_s * 1e3, "ms", kind="analytic", profile=profile.name,
                  method="roofline", extra={"context": p.context, "batch": p.batch, "dtype": dtype_name(p.dtype),
                                            "bound": pr.bound, "measured_ms": p.timing.median * 1e3})


# --- full: cached decoding vs recomputation ------------------------------------------------------------------------


def recompute_speedup(model: Transformer, new_tokens: int, device: str, reps: int = 3, batch: int = 1,
                      prompt: int = RECOMPUTE_PROMPT) -> tuple[dict[str, Timing], Record]:
    """generate(new_tokens) with the cache vs recomputing the prefix every step, side by side; the record is
    recompute / cached (median of per-round ratios)."""
    cfg = model.cfg
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1))
    runs = {"cached": lambda: generate(model, prompts, new_tokens),
            "recompute": lambda: generate(model, prompts, new_tokens, use_cache=False)}
    times = time_interleaved(runs, device=device, warmup=1, reps=reps)
    extra = {"new_tokens": new_tokens, "prompt": prompt, "batch": batch, "dtype": dtype_name(model.embed.weight.dtype),
             "model": cfg.name, **conditions(device)}
    return times, speedup_record("decode_speedup", f"{cfg.name}/cached-vs-recompute", times["recompute"],
                                 times["cached"], extra)


# --- DeepSeek-V3 on the declared profiles ----------------------------------------------------------------------------


def unit_records(u: UnitPrediction) -> list[Record]:
    """tpot_ms and tokens_per_s of a decode unit (analytic, method roofline), beside the paper's EP bound."""
    d = u.deployment
    extra = {"context": d.context, "batch": d.batch_per_gpu, "micro_batches": d.micro_batches, "ep": d.ep,
             "experts_per_gpu": u.experts_per_gpu, "weights": d.weights, "kv": d.kv, "link": u.link,
             "compute_ms": d.micro_batches * u.compute.time_s * 1e3, "all_to_all_ms": u.comm_only_s * 1e3,
             "serial_ms": u.tpot_serial_s * 1e3, "bound": u.bound, "dominant_op": u.compute.dominant_op(),
             "memory_per_gpu_GB": u.memory_bytes / 1e9, "fits": u.fits,
             "tokens_per_s_per_gpu": u.tokens_per_s_per_gpu}
    ms = paper.ref("tpot_ms", u.cfg.name, u.profile.name)
    tps = paper.ref("tokens_per_s", u.cfg.name, u.profile.name)
    return [Record("tpot_ms", u.cfg.name, u.tpot_s * 1e3, "ms", profile=u.profile.name, paper=ms and ms.value,
                   method="roofline", extra=extra),
            Record("tokens_per_s", u.cfg.name, u.tokens_per_s, "1/s", profile=u.profile.name,
                   paper=tps and tps.value, method="roofline", extra=extra)]


DEFAULT_DEPLOYMENT = Deployment()
