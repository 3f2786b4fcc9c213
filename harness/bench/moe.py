"""DeepSeekMoE workloads: the parameters and FLOPs one token's forward touches at real dimensions (quick), and the
layer's speed, grouped vs the per-expert loop vs transformers' DeepseekV3MoE, with its matmul roofline (full).

The quick count builds one MoE layer on the meta device, materialises the router and shared experts, routes real
tokens, materialises only the experts they select, and records which parameters the forward passes to torch
functions (a TorchFunctionMode) and how many matmul FLOPs it runs (`FlopCount`: FlopCounterMode's formulas).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dsv3ref.config import ModelConfig, MoEConfig
from dsv3ref.moe import MoE
from hardware.probe import matmul_case
from hardware.timing import Timing, round_ratios
from harness.analytic.flops import moe_layer_fwd_bytes, moe_layer_fwd_flops_per_token
from harness.analytic.params import param_counts
from harness.bench.common import FlopCount, conditions, dtype_name, speedup_record
from harness.results import Record

# The speed benchmark's default layer: mid-size, V3-style routing (sigmoid, bias, 8 groups / 4), one shared expert.
MID_CFG = ModelConfig.preset("dsv3-tiny").replace(
    name="moe-mid", hidden_size=1024,
    moe=MoEConfig(n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=512, n_shared_experts=1,
                  n_group=8, topk_group=4, first_k_dense_replace=1, score_func="sigmoid", route_scale=2.5,
                  bias=True))
SPEED_TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
HF_EXPERTS = ("eager", "grouped_mm", "batched_mm")  # transformers' experts implementations
PEAK = "matmul-peak"  # SpeedBench.forwards' key of the probe's matmul
BOUND = "expert-matmuls"  # SpeedBench.forwards' key of the layer's matmuls alone, one per expert
COUNT_TOKENS = 2


# --- quick: parameters touched and FLOPs counted -------------------------------------------------------------------
def _flatten(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


class TouchedParameters(TorchFunctionMode):
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
    flops: float  # matmul FLOPs counted for one token (FlopCount)
    tokens: int  # tokens measured (each on its own; all gave the same counts)
    experts_built: int  # routed experts materialised (the others stayed on the meta device)


def _zero(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        with torch.no_grad():
            p.zero_()


def count_moe_layer(cfg: ModelConfig, tokens: int = COUNT_TOKENS, seed: int = 0) -> LayerCount:
    """Forward `tokens` single tokens through a BF16 MoE layer of `cfg` whose routed experts exist only when
    selected; count the parameters each forward touches and its FLOPs (they must agree across tokens)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        layer = MoE(cfg, backend="loop").to(torch.bfloat16)
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
        with torch.no_grad(), TouchedParameters() as touched, FlopCount() as flops:
            layer(x[t:t + 1])
        counts.add((touched.count, flops.total))
    if len(counts) != 1:
        raise RuntimeError(f"{cfg.name}: tokens touched different parameter or FLOP counts: {sorted(counts)}")
    params, total = counts.pop()
    return LayerCount(params, float(total), tokens, len(selected))


def non_moe_activated(cfg: ModelConfig) -> int:
    """Activated parameters outside the MoE layers' routers and experts (embedding, head, attention, dense FFN,
    norms), from the analytic counts."""
    c = param_counts(cfg)
    return c.embedding + c.head + c.attention + c.dense_ffn + c.norms


def count_records(cfg: ModelConfig, layer: LayerCount, paper_value: float | None) -> list[Record]:
    """params_activated (measured: MoE layers x the touched count + the rest from the formulas) and the MoE layer's
    fwd_gflops_per_token, counted and analytic."""
    extra = {"moe_layer_params_touched": layer.params, "moe_layers": cfg.num_moe_layers, "tokens": layer.tokens,
             "experts_materialised": layer.experts_built, **conditions("cpu")}
    subject = f"{cfg.name}/moe-layer"
    return [Record("params_activated", cfg.name, non_moe_activated(cfg) + cfg.num_moe_layers * layer.params,
                   "count", kind="measured", paper=paper_value, method="touched-by-forward", extra=extra),
            Record("fwd_gflops_per_token", subject, layer.flops / 1e9, "GFLOP", kind="measured",
                   method="flop_counter-formulas", extra={"tokens": layer.tokens, **conditions("cpu")}),
            Record("fwd_gflops_per_token", subject, moe_layer_fwd_flops_per_token(cfg) / 1e9, "GFLOP",
                   kind="analytic", method="moe_layer_fwd_flops_per_token")]


# --- full: speed ratios ------------------------------------------------------------------------------------------
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


def _no_grad_call(module: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        with torch.no_grad():
            return module(x)

    return call


@dataclass
class SpeedBench:
    """The grouped and loop paths of one MoE layer and, when transformers is installed, its DeepseekV3MoE with
    each experts implementation, all holding the same weights and routing in fp32 (so all read the same experts);
    `forwards(tokens)` gives side-by-side callables and `skipped` why a variant was left out."""

    cfg: ModelConfig = MID_CFG
    device: str = "cpu"
    with_transformers: bool = True
    dtype: torch.dtype = torch.bfloat16
    modules: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    matmul: tuple[Callable[[], torch.Tensor], float, str] | None = None  # the probe's matmul (peak) in `dtype`

    def __post_init__(self) -> None:
        from harness.adapters.moe import build_hf_moe

        torch.manual_seed(0)
        # fp32 routers everywhere (transformers' precision): every module selects the same experts
        grouped = MoE(self.cfg, backend="auto", precision="fp32").to(device=self.device, dtype=self.dtype).eval()
        with torch.no_grad():
            if grouped.gate.bias is not None:
                grouped.gate.bias.normal_(0.0, 0.01)
        state = grouped.state_dict()
        loop = MoE(self.cfg, backend="loop", precision="fp32").to(device=self.device, dtype=self.dtype).eval()
        loop.load_state_dict(state)
        self.modules = {"grouped": grouped, "loop": loop}
        if self.with_transformers:
            for variant in HF_EXPERTS:
                self.modules[f"transformers-{variant}"] = build_hf_moe(self.cfg, state, self.dtype, self.device,
                                                                       variant).eval()
        else:
            self.skipped["transformers"] = "transformers is not installed (pip install '.[hf]')"
        self.matmul = matmul_case(self.device, self.dtype)

    def forwards(self, tokens: int) -> dict[str, Callable[[], Any]]:
        """One forward of `tokens` tokens per module, the probe's matmul under PEAK and the layer's matmuls alone
        under BOUND (timed beside them: the roofline); batched_mm is left out when its gathered weights would not
        fit in half the free memory."""
        x = self.batch(tokens)
        out: dict[str, Callable[[], Any]] = {}
        for name, module in self.modules.items():
            if name == "transformers-batched_mm":
                need = batched_mm_bytes(self.cfg, tokens, self.dtype.itemsize)
                free = available_memory_bytes(self.device)
                if need > free / 2:
                    self.skipped[f"{name}@{tokens}"] = (f"would gather {need / 1e9:.1f} GB of expert weights; "
                                                        f"{free / 1e9:.1f} GB free")
                    continue
            out[name] = _no_grad_call(module, x)
        out[PEAK] = self.matmul[0]
        out[BOUND] = self._matmuls_alone(x)
        return out

    def batch(self, tokens: int) -> torch.Tensor:
        """The input [tokens, hidden] that `forwards(tokens)` runs, seeded by its size."""
        x = torch.randn(tokens, self.cfg.hidden_size, generator=torch.Generator().manual_seed(tokens))
        return x.to(device=self.device, dtype=self.dtype)

    def experts_hit(self, tokens: int) -> int:
        """The distinct routed experts `batch(tokens)` selects (whose weights a forward reads)."""
        with torch.no_grad():
            _, indices = self.modules["grouped"].gate(self.batch(tokens))
        return int(indices.unique().numel())

    def _matmuls_alone(self, x: torch.Tensor) -> Callable[[], None]:
        """The layer's matmuls at this batch's shapes and nothing else: the router's (fp32, as every router
        here), each hit expert's three over its routed rows, the shared expert's three, on inputs made beforehand.
        The segments backend runs these and more, so they bound its roofline fraction."""
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


def reps_for(tokens: int) -> int:
    """Side-by-side rounds: more for small (noisy, fast) batches, fewer for the large ones."""
    return 30 if tokens <= 64 else 15 if tokens <= 1024 else 10


def speed_records(bench: SpeedBench, tokens: int, timings: dict[str, Timing]) -> list[Record]:
    """moe_speedup of grouped against every other module, and the achieved fraction of the matmul throughput timed
    beside it, of grouped and of the layer's matmuls alone (the bound of its per-expert path): per round
    (analytic FLOPs / time) over (the probe matmul's FLOPs / time), the median over rounds. Grouped's record
    carries its roofline point (analytic FLOPs and bytes of the batch, median seconds)."""
    base = timings["grouped"]
    extra = {"tokens": tokens, "config": bench.cfg.name, "dtype": dtype_name(bench.dtype),
             **conditions(bench.device)}
    records = [speedup_record("moe_speedup", f"grouped-vs-{name}", t, base, extra)
               for name, t in timings.items() if name not in ("grouped", PEAK, BOUND)]
    _, matmul_flops, what = bench.matmul
    flops = moe_layer_fwd_flops_per_token(bench.cfg) * tokens
    moved = moe_layer_fwd_bytes(bench.cfg, tokens, bench.experts_hit(tokens), extra["dtype"])
    point = {"roofline": {"flops": flops, "bytes": moved, "seconds": base.median, "dtype": extra["dtype"]}}
    for subject, t in (("grouped", base), (BOUND, timings[BOUND])):
        per_round = [flops / matmul_flops * r for r in round_ratios(timings[PEAK], t)]  # (F / t) / (F_mm / t_mm)
        records.append(Record("achieved_compute_fraction", subject, statistics.median(per_round), "ratio",
                              kind="measured", profile="local",
                              method="analytic FLOPs / time over the probe matmul's FLOPs / time, median over "
                                     "interleaved rounds",
                              extra={**extra, "matmul": what,
                                     "matmul_TFLOPS": matmul_flops / timings[PEAK].median / 1e12,
                                     "per_round": per_round, "samples_s": list(t.samples),
                                     "matmul_samples_s": list(timings[PEAK].samples),
                                     **(point if subject == "grouped" else {})}))
    return records
