"""Sections: DeepSeekMoE's activated parameters and layer FLOPs counted from a real forward (quick); the MoE layer
speed ratios (grouped vs loop vs transformers) and the auxiliary-loss-free balancing experiment (full).

The quick measurement builds one MoE layer at the model's real dimensions on the meta device, materialises the
router and shared experts, routes real tokens, materialises only the experts they select, and records which
parameters the forward passes to torch functions (a TorchFunctionMode) and how many matmul FLOPs it runs
(FlopCounterMode). `SpeedBench` and `MID_CFG` are shared with the performance suite.
"""

from __future__ import annotations

import importlib.util
import math
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from dsv3ref.balancing import BalancingRun, run_balancing
from dsv3ref.config import ModelConfig, MoEConfig
from dsv3ref.moe import CPU_GEMM_ROWS, MoE
from hardware.probe import matmul_case
from hardware.timing import Timing, paired_ratio, quartiles, round_ratios, time_interleaved
from harness import paper
from harness.analytic.flops import moe_layer_fwd_flops_per_token
from harness.analytic.params import param_counts
from harness.formatting import billions, deviation, num
from harness.impls.moe import build_hf_moe
from harness.report_sections import ReportContext, Table, section
from harness.results import Record

# The speed benchmark's layer: mid-size, V3-style routing (sigmoid, bias, 8 groups / 4), one shared expert.
MID_CFG = ModelConfig.preset("dsv3-tiny").replace(
    name="moe-mid", hidden_size=1024,
    moe=MoEConfig(n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512, n_shared_experts=1,
                  n_group=8, topk_group=4, first_k_dense_replace=1, score_func="sigmoid", route_scale=2.5,
                  bias=True))
SPEED_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
HF_VARIANTS = ("eager", "grouped_mm", "batched_mm")
PEAK = "matmul-peak"  # SpeedBench.forwards' key of the probe's matmul
BOUND = "expert-matmuls"  # SpeedBench.forwards' key of the layer's matmuls alone, one per expert
BALANCING_MODEL = "deepseek-v3-671b"
BALANCING = {"steps": 300, "tokens": 4096, "gamma": 0.001, "skew_std": 0.5, "window": 10, "seed": 0}
CURVE_STEPS = (1, 10, 25, 50, 75, 100, 125, 150, 200, 250, 300)
MEASURE_TOKENS = 2


# --- quick: parameters touched and FLOPs counted ----------------------------------------------------------------
def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


class _TouchedParameters(TorchFunctionMode):
    """Records every nn.Parameter passed to a torch function (F.linear, Tensor.to, +, ...) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, nn.Parameter] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        for v in _flatten((args, kwargs)):
            if isinstance(v, nn.Parameter):
                self.seen[id(v)] = v
        return func(*args, **kwargs)

    @property
    def count(self) -> int:
        return sum(p.numel() for p in self.seen.values())


@dataclass(frozen=True)
class LayerCount:
    """Per-token counts of one real-dimension MoE layer's forward."""

    params: int  # parameters the forward of one token touched
    flops: float  # matmul FLOPs FlopCounterMode counted for one token
    tokens: int  # tokens measured (each on its own; all gave the same counts)
    experts_built: int  # routed experts materialised (the others stayed on the meta device)


def count_moe_layer(cfg: ModelConfig, tokens: int = MEASURE_TOKENS, seed: int = 0) -> LayerCount:
    """Forward `tokens` single tokens through a BF16 MoE layer of `cfg` whose routed experts exist only when
    selected; count the parameters each forward touches and its FLOPs (they must agree across tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layer = MoE(cfg, impl="reference").to(torch.bfloat16)
    layer.gate.to_empty(device="cpu")
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, 0.006, generator=gen)  # the paper's init std
        if layer.gate.bias is not None:
            layer.gate.bias.normal_(0.0, 0.01, generator=gen)
    if layer.shared_experts is not None:
        layer.shared_experts.to_empty(device="cpu").apply(_zero)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        _, indices = layer.gate(x)
    selected = sorted(set(indices.flatten().tolist()))
    for e in selected:
        layer.experts[e].to_empty(device="cpu").apply(_zero)
    counts = set()
    for t in range(tokens):
        with torch.no_grad(), _TouchedParameters() as touched, FlopCounterMode(display=False) as flops:
            layer(x[t:t + 1])
        counts.add((touched.count, flops.get_total_flops()))
    if len(counts) != 1:
        raise RuntimeError(f"{cfg.name}: tokens touched different parameter or FLOP counts: {sorted(counts)}")
    params, total = counts.pop()
    return LayerCount(params, float(total), tokens, len(selected))


def _zero(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        with torch.no_grad():
            p.zero_()


def _non_moe_activated(cfg: ModelConfig) -> int:
    """Activated parameters outside the MoE layers' routers and experts (embedding, head, attention, dense FFN,
    norms), from the analytic counts."""
    c = param_counts(cfg)
    return c.embedding + c.head + c.attention + c.dense_ffn + c.norms


def _counts_table(ctx: ReportContext) -> Table:
    """Count one MoE layer's forward of every model that has a MoE layer (a MoE section with first_k_dense_replace
    = num_layers has none: noted, not counted)."""
    rows, records = [], []
    threads = torch.get_num_threads()
    no_moe_layer = [m.name for m in ctx.models if m.moe is not None and m.num_moe_layers == 0]
    for cfg in (m for m in ctx.models if m.num_moe_layers):
        ctx.progress(f"moe: counting one {cfg.name} MoE layer's forward ...")
        layer = count_moe_layer(cfg)
        analytic_layer = (param_counts(cfg).router + param_counts(cfg).shared_experts
                          + param_counts(cfg).activated_routed_experts) // cfg.num_moe_layers
        measured = _non_moe_activated(cfg) + cfg.num_moe_layers * layer.params
        analytic = param_counts(cfg).activated
        ref = paper.ref("params_activated", cfg.name)
        extra = {"moe_layer_params_touched": layer.params, "moe_layers": cfg.num_moe_layers,
                 "tokens": layer.tokens, "experts_materialised": layer.experts_built, "threads": threads}
        records.append(Record("params_activated", cfg.name, measured, "count", kind="measured",
                              paper=ref and ref.value, method="touched-by-forward", extra=extra))
        flops_formula = moe_layer_fwd_flops_per_token(cfg)
        subject = f"{cfg.name}/moe-layer"
        records.append(Record("fwd_gflops_per_token", subject, layer.flops / 1e9, "GFLOP", kind="measured",
                              method="FlopCounterMode", extra={"tokens": layer.tokens, "threads": threads}))
        records.append(Record("fwd_gflops_per_token", subject, flops_formula / 1e9, "GFLOP", kind="analytic",
                              method="moe_layer_fwd_flops_per_token"))
        rows.append([cfg.name, f"{layer.params:,}", f"{analytic_layer:,}", billions(measured), billions(analytic),
                     billions(ref.value, 1) if ref else "—", deviation(measured, ref and ref.value),
                     num(layer.flops / 1e9, 4), num(flops_formula / 1e9, 4)])
    headers = ["model", "MoE layer params/token (measured)", "analytic", "activated (measured)", "analytic",
               "paper", "dev", "MoE layer GFLOP/token (counted)", "analytic"]
    notes = [f"measured: one real-dimension BF16 MoE layer, {MEASURE_TOKENS} tokens forwarded one at a time; the "
             "parameters passed to torch functions during the forward (router weight and bias, the k selected "
             "experts, the shared experts) are counted; only the selected experts are materialised, the others "
             "stay on the meta device, so a forward touching them would fail",
             "activated (measured) = MoE layers x measured layer count + embedding, head, attention, dense FFN and "
             "norms from harness.analytic.params (the formula, not measured)",
             "GFLOP/token: torch.utils.flop_counter.FlopCounterMode over the same forward (matmuls, 2mnk); analytic: "
             "2 D E (router) + 6 D I (k + shared)"]
    if no_moe_layer:
        notes.append(f"no MoE layer (moe.first_k_dense_replace = num_layers), nothing to count: "
                     f"{', '.join(no_moe_layer)}")
    return Table("DeepSeekMoE: activated parameters and layer FLOPs counted from a forward", headers, rows,
                 records, notes)


@section("moe", "DeepSeekMoE: activated parameters and layer FLOPs", order=14, quick=True)
def run_quick(ctx: ReportContext) -> list[Table]:
    return [_counts_table(ctx)]


# --- full: speed ratios ----------------------------------------------------------------------------------------
def batched_mm_bytes(cfg: ModelConfig, tokens: int, elem_bytes: int = 2) -> int:
    """Memory transformers' batched_mm experts gather: every (token, slot) pair gets its own copy of its expert's
    gate_up_proj [2I, D] and down_proj [D, I]."""
    m = cfg.moe
    return tokens * m.num_experts_per_tok * 3 * m.moe_intermediate_size * cfg.hidden_size * elem_bytes


def available_memory_bytes(device: str) -> int:
    """Free memory now: the GPU's (torch.cuda.mem_get_info) or the system's available pages."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass
class SpeedBench:
    """The grouped and loop paths of one BF16 MoE layer and, when transformers is installed, its DeepseekV3MoE
    with each experts implementation, all holding the same weights and routing in fp32 (so all read the same
    experts); `forwards(tokens)` gives side-by-side callables and `skipped` why a variant was left out."""

    cfg: ModelConfig = MID_CFG
    device: str = "cpu"
    with_transformers: bool = field(default_factory=lambda: importlib.util.find_spec("transformers") is not None)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    matmul: tuple[Callable[[], torch.Tensor], float, str] | None = None  # the probe's BF16 matmul (peak)

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        # fp32 routers everywhere (transformers' precision): every module selects the same experts
        grouped = MoE(self.cfg, impl="grouped", precision="fp32").to(device=self.device, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            grouped.gate.bias.normal_(0.0, 0.01)
        state = grouped.state_dict()
        loop = MoE(self.cfg, impl="reference", precision="fp32").to(device=self.device, dtype=torch.bfloat16).eval()
        loop.load_state_dict(state)
        self.modules = {"grouped": grouped, "loop": loop}
        if self.with_transformers:
            for variant in HF_VARIANTS:
                self.modules[f"transformers-{variant}"] = build_hf_moe(self.cfg, state, torch.bfloat16, self.device,
                                                                       variant).eval()
        else:
            self.skipped["transformers"] = "transformers is not installed (pip install '.[hf]')"
        self.matmul = matmul_case(self.device, torch.bfloat16)

    def forwards(self, tokens: int) -> dict[str, Callable[[], torch.Tensor]]:
        """One forward of `tokens` tokens per module, and the probe's BF16 matmul under PEAK (timed beside them:
        the roofline); batched_mm is left out when its gathered weights would not fit in half the free memory."""
        x = torch.randn(tokens, self.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
        x = x.to(device=self.device, dtype=torch.bfloat16)
        out = {}
        for name, module in self.modules.items():
            if name == "transformers-batched_mm":
                need, free = batched_mm_bytes(self.cfg, tokens), available_memory_bytes(self.device)
                if need > free / 2:
                    self.skipped[f"{name}@{tokens}"] = (f"would gather {need / 1e9:.1f} GB of expert weights; "
                                                        f"{free / 1e9:.1f} GB free")
                    continue
            out[name] = _no_grad_call(module, x)
        out[PEAK] = self.matmul[0]
        out[BOUND] = self._matmuls_alone(x)
        return out

    def _matmuls_alone(self, x: torch.Tensor) -> Callable[[], None]:
        """The layer's matmuls at this batch's shapes and nothing else: the router's (fp32, as every router
        here), each hit expert's three over its routed rows, the shared expert's three, on inputs made beforehand.
        The segments backend (auto's pick on a CPU from CPU_GEMM_ROWS[-1] rows per expert) runs these and more,
        so they bound its roofline fraction."""
        grouped = self.modules["grouped"]
        with torch.no_grad():
            _, indices = grouped.gate(x)
        rows = torch.bincount(indices.flatten(), minlength=grouped.n_experts).tolist()
        gen = torch.Generator().manual_seed(0)

        def inputs(n: int, width: int) -> torch.Tensor:
            return torch.randn(n, width, generator=gen).to(device=x.device, dtype=x.dtype)

        router = (x.float(), grouped.gate.weight.float())
        mlps = [(e, inputs(n, self.cfg.hidden_size), inputs(n, grouped.inter))
                for e, n in zip(grouped.experts, rows, strict=True) if n]
        if grouped.shared_experts is not None:
            shared = grouped.shared_experts
            mlps.append((shared, x, inputs(len(x), shared.w2.in_features)))

        def call() -> None:
            with torch.no_grad():
                F.linear(*router)
                for mlp, xe, he in mlps:  # xe [rows, D], he [rows, I]
                    F.linear(xe, mlp.w1.weight), F.linear(xe, mlp.w3.weight), F.linear(he, mlp.w2.weight)

        return call


def _no_grad_call(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


def reps_for(tokens: int) -> int:
    """Side-by-side rounds: more for small (noisy, fast) batches, fewer for the large ones."""
    return 30 if tokens <= 64 else 15 if tokens <= 1024 else 10


def speed_records(bench: SpeedBench, tokens: int, timings: dict[str, Timing], threads: int) -> list[Record]:
    """moe_speedup of grouped against every other module, and the achieved fraction of the matmul throughput timed
    beside it, of grouped and of the layer's matmuls alone (the bound of its per-expert path): per round
    (analytic FLOPs / time) over (the probe matmul's FLOPs / time), the median over rounds."""
    base = timings["grouped"]
    records = []
    for name, t in timings.items():
        if name in ("grouped", PEAK, BOUND):
            continue
        records.append(Record("moe_speedup", f"grouped-vs-{name}", paired_ratio(t, base), "x", kind="measured",
                              method="median of per-round time ratios, interleaved",
                              extra={"tokens": tokens, "config": bench.cfg.name, "threads": threads,
                                     "samples_s": list(t.samples), "grouped_samples_s": list(base.samples)}))
    _, matmul_flops, what = bench.matmul
    peak = matmul_flops / timings[PEAK].median
    flops = moe_layer_fwd_flops_per_token(bench.cfg) * tokens
    for subject, t in (("grouped", base), (BOUND, timings[BOUND])):
        per_round = [flops / matmul_flops * r for r in round_ratios(timings[PEAK], t)]  # (F / t) / (F_mm / t_mm)
        records.append(Record("achieved_compute_fraction", subject, statistics.median(per_round), "ratio",
                              kind="measured", profile="local",
                              method=f"analytic FLOPs / time over a {what}'s FLOPs / time, median over "
                                     "interleaved rounds",
                              extra={"tokens": tokens, "config": bench.cfg.name, "threads": threads,
                                     "matmul_TFLOPS": peak / 1e12, "per_round": per_round,
                                     "samples_s": list(t.samples), "matmul_samples_s": list(timings[PEAK].samples)}))
    return records


def _fraction_cell(record: Record) -> str:
    """The median fraction and its inter-quartile range over rounds: the machine's phase moves a round's fraction
    (see notes)."""
    q1, q3 = quartiles(record.extra["per_round"])
    return f"{record.value:.0%} ({q1:.0%}-{q3:.0%})"


def _speed_table(ctx: ReportContext) -> Table:
    threads = torch.get_num_threads()
    ctx.progress(f"moe: building the {MID_CFG.name} layer (64 experts, top-6, hidden 1024, expert 512) ...")
    bench = SpeedBench(device=ctx.device)
    others = [n for n in bench.modules if n != "grouped"]
    peaks = []
    rows, records = [], []
    for tokens in SPEED_TOKENS:
        ctx.progress(f"moe: timing {tokens} tokens ...")
        timings = time_interleaved(bench.forwards(tokens), device=ctx.device, warmup=1, reps=reps_for(tokens))
        recs = speed_records(bench, tokens, timings, threads)
        records.extend(recs)
        ratio = {r.subject.removeprefix("grouped-vs-"): r.value for r in recs if r.metric == "moe_speedup"}
        fraction, bound = (next(r for r in recs if r.metric == "achieved_compute_fraction" and r.subject == s)
                           for s in ("grouped", BOUND))
        peaks.append(fraction.extra["matmul_TFLOPS"])
        g = timings["grouped"]
        rows.append([tokens, num(g.median * 1e3, 2), num(g.iqr * 1e3, 2), num(tokens / g.median, 0),
                     *(num(ratio[n]) + "x" if n in ratio else "—" for n in others),
                     num(fraction.extra["matmul_TFLOPS"], 3), *map(_fraction_cell, (fraction, bound))])
    m = MID_CFG.moe
    segments_from = math.ceil(CPU_GEMM_ROWS[-1] * m.n_routed_experts / m.num_experts_per_tok)
    notes = [f"{MID_CFG.name}: hidden {MID_CFG.hidden_size}, {m.n_routed_experts} experts (top-{m.num_experts_per_tok}"
             f", {m.n_group} groups / {m.topk_group}), expert width {m.moe_intermediate_size}, "
             f"{m.n_shared_experts} shared; BF16 with fp32 routers in every module (transformers' precision, so "
             f"all select the same experts), {ctx.device}, {threads} threads; random weights, bias N(0, 0.01)",
             "ratios: median over rounds of the other's time / grouped's time in the same round, all modules timed "
             "side by side (each round runs every module once, in a shuffled order) in one run over the same input; "
             "> 1x means grouped is faster",
             f"roofline: analytic FLOPs (router + experts) / grouped's time over the throughput of the local "
             f"probe's {bench.matmul[2]} in the same round, median over the interleaved rounds ({num(min(peaks), 3)}-"
             f"{num(max(peaks), 3)} TFLOP/s across the batch sizes; the probe at report start: "
             f"{num(ctx.local.bf16_dense_TFLOPS, 3)}); in brackets the inter-quartile range over rounds: where "
             "the machine's speed drifts (a shared VM), the matmul and the layer drift by different factors, so a "
             "round's fraction depends on the phase it ran in (records keep every round in per_round)",
             "expert matmuls alone: the same fraction for the layer's matmuls by themselves, one call per expert "
             "(router, each hit expert's three over its rows, the shared expert's), timed in the same rounds: the "
             f"bound of the per-expert segments path, which auto runs from {num(CPU_GEMM_ROWS[-1], 0)} rows per "
             f"expert on a CPU ({segments_from} tokens here); the gap to it is gather, SwiGLU, weighting, scatter "
             "and routing. At fewer rows the stacked-weight backends run fewer, larger calls and can beat it"]
    notes += [f"not run: {name}: {why}" for name, why in bench.skipped.items()]
    headers = ["tokens", "grouped ms", "IQR ms", "tokens/s", *(f"vs {n}" for n in others), "matmul TFLOP/s",
               "of matmul peak", "expert matmuls alone"]
    return Table("DeepSeekMoE layer forward: grouped vs loop vs transformers", headers, rows, records, notes)


# --- full: balancing experiment -------------------------------------------------------------------------------
def balancing_runs(moe: MoEConfig, **overrides: Any) -> dict[str, BalancingRun]:
    """The bias-update run and the same stream with no balancing."""
    params = dict(BALANCING, **overrides)
    gamma = params.pop("gamma")
    return {"bias-update": run_balancing(moe, gamma=gamma, **params),
            "no-balancing": run_balancing(moe, gamma=0.0, **params)}


def balancing_records(runs: dict[str, BalancingRun], config: str, steps: int, tokens: int) -> list[Record]:
    records = []
    for subject, run in runs.items():
        final = run.final
        reached = run.first_step_at_or_below(1.2)
        curve = {str(s): run.max_over_mean[s - 1] for s in CURVE_STEPS if s <= steps}
        records.append(Record("moe_load_max_over_mean", subject, final.max_over_mean, "ratio", kind="measured",
                              method=f"tokens per expert summed over the last {run.window} batches",
                              extra={"config": config, "steps": steps, "tokens_per_batch": tokens,
                                     "gamma": run.gamma, "final_cv": final.cv, "first_step_at_or_below_1.2": reached,
                                     "curve": curve}))
    return records


def _balancing_table(ctx: ReportContext) -> Table:
    cfg = ModelConfig.preset(BALANCING_MODEL)
    steps, tokens = BALANCING["steps"], BALANCING["tokens"]
    ctx.progress(f"moe: balancing experiment, {steps} batches x 2 runs ...")
    runs = balancing_runs(cfg.moe)
    rows = [[s, num(runs["bias-update"].max_over_mean[s - 1], 3), num(runs["no-balancing"].max_over_mean[s - 1], 3)]
            for s in CURVE_STEPS if s <= steps]
    finals = {k: r.final for k, r in runs.items()}
    rows.append(["final CV", num(finals["bias-update"].cv, 3), num(finals["no-balancing"].cv, 3)])
    reached = runs["bias-update"].first_step_at_or_below(1.2)
    m = cfg.moe
    notes = [f"routing of {cfg.name}: {m.n_routed_experts} experts, top-{m.num_experts_per_tok}, {m.n_group} groups "
             f"/ {m.topk_group}, sigmoid; {tokens} tokens per batch, {steps} batches; logits N(0, 1) per token plus "
             f"a fixed per-expert skew N(0, {BALANCING['skew_std']}) (seed {BALANCING['seed']})",
             f"load = tokens per expert summed over the last {BALANCING['window']} batches (one batch's sampling "
             "noise alone gives max/mean ~1.25 at 256 experts); CV = std / mean of that load",
             f"bias update: gamma {BALANCING['gamma']}, bias -= gamma if over-loaded, += gamma if under-loaded, "
             f"mean-centred; max/mean first <= 1.2 at batch {reached if reached else 'never'}"]
    return Table("Auxiliary-loss-free balancing: max/mean expert load per batch",
                 ["batch", "bias update", "no balancing"], rows,
                 balancing_records(runs, cfg.name, steps, tokens), notes)


@section("moe_full", "DeepSeekMoE: layer speed and load balancing", order=64, quick=False)
def run_full(ctx: ReportContext) -> list[Table]:
    return [_speed_table(ctx), _balancing_table(ctx)]
