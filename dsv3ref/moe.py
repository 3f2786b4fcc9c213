"""DeepSeekMoE: the router (`Gate`) and the MoE layer (shared + routed SwiGLU experts).

Semantics follow the official DeepSeek-V3 inference code: sigmoid (V3) or softmax (V2) affinities; an optional
fp32 per-expert bias added only for selection; group-limited top-k (group score = sum of the top-2 biased scores
with a bias, the max without; the other groups masked with -inf), which is node-limited routing when groups are
nodes; gate weights gathered from the unbiased scores, normalised (`norm_topk_prob`) and times `route_scale`.

The routed experts run two ways over the same weights: `reference`, the obvious per-expert loop, and `grouped`,
which sorts the (token, slot) pairs by expert once and runs one batched computation per expert group, then
scatters back with the weights. The grouped path has four matmul backends: `grouped_mm`
(`torch.nn.functional.grouped_mm` over stacked weights, X W^T per expert), `grouped_mm_t` (the same on the
transposed problem, W X^T: each weight is the left operand, which the CPU kernel streams faster when an expert has
few tokens), `padded` (one `torch.bmm` over the experts, each expert's tokens padded to the largest count: every
weight is read once, in one call) and `segments` (each expert's matmuls once over its contiguous segment).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref.config import ConfigError, ModelConfig, MoEConfig
from dsv3ref.layers import MLP, swiglu

PRECISIONS = ("bf16", "fp32")
IMPLS = ("reference", "grouped")
GEMMS = ("auto", "grouped_mm", "grouped_mm_t", "padded", "segments")
_BELOW_FP32 = (torch.bfloat16, torch.float16)
GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# CPU thresholds of `auto` on mean rows per expert (N k / E), measured on the moe-mid benchmark layer (bf16):
# grouped_mm_t below the first, padded up to the second, grouped_mm up to the third, segments from there on
CPU_GEMM_ROWS = (1.25, 64.0, 160.0)
PADDED_MAX_WASTE = 6.0  # padded only while its zero-padded blocks hold at most this many times the real pairs


class MoEInputError(ValueError):
    """A bad input to the router or the MoE layer; the message names the argument and what was expected."""


def select_experts(scores: torch.Tensor, bias: torch.Tensor | None, moe: MoEConfig) -> torch.Tensor:
    """Indices [N, k] of each token's experts: top-k of the biased scores within its top `topk_group` groups.

    `scores` [N, E] are the unbiased affinities; `bias` [E] (or None) shifts them for selection only.
    """
    biased = scores if bias is None else scores + bias
    if moe.n_group > 1:
        groups = moe.n_group
        grouped = biased.view(biased.shape[0], groups, moe.n_routed_experts // groups)  # [N, G, E/G]
        # group score: the best expert without a bias, the sum of the best two with one
        group_score = grouped.amax(dim=-1) if bias is None else grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = group_score.topk(moe.topk_group, dim=-1).indices  # [N, topk_group]
        dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)  # [N, E]
    return biased.topk(moe.num_experts_per_tok, dim=-1).indices


def gate_weights(scores: torch.Tensor, indices: torch.Tensor, moe: MoEConfig) -> torch.Tensor:
    """Weights [N, k] from the unbiased scores of the selected experts, normalised, times route_scale."""
    weights = scores.gather(1, indices)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * moe.route_scale


def _check_input(x: torch.Tensor, dim: int, weight_dtype: torch.dtype) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise MoEInputError(f"x: expected shape [tokens, {dim}], got {list(x.shape)}")
    if x.dtype != weight_dtype:
        raise MoEInputError(f"x: expected dtype {weight_dtype} (the gate weight's), got {x.dtype}")


class Gate(nn.Module):
    """The router: (weights [N, k], indices [N, k]) for x [N, D].

    precision "bf16" computes as the official code: logits and sigmoid in the activation dtype (bf16 when the
    model runs in bf16), softmax in fp32. "fp32" computes as Hugging Face: logits and scores in fp32 (fp64 stays
    fp64). The selection bias (when `cfg.moe.bias`) is fp32 and stays fp32 when the module is cast to bf16/fp16.
    """

    def __init__(self, cfg: ModelConfig, precision: str = "bf16") -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError(f"{cfg.name}: moe: a Gate needs a MoE config")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.cfg, self.moe, self.dim, self.precision = cfg, cfg.moe, cfg.hidden_size, precision
        self.weight = nn.Parameter(torch.empty(cfg.moe.n_routed_experts, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default
        bias = torch.zeros(cfg.moe.n_routed_experts, dtype=torch.float32)
        # the bias is set by the load-balancing update, never by gradients: it only affects the selection
        self.bias = nn.Parameter(bias, requires_grad=False) if cfg.moe.bias else None
        self.last_scores: torch.Tensor | None = None

    def _apply(self, fn: Callable, recurse: bool = True) -> Gate:
        """Module conversions (.to, .bfloat16, ...) never lower the selection bias below fp32."""
        saved = None if self.bias is None else self.bias.detach().clone()
        super()._apply(fn, recurse)
        if saved is not None and self.bias.dtype in _BELOW_FP32:
            self.bias.data = saved.to(device=self.bias.device, dtype=torch.float32)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Unbiased affinities [N, E] in the router's precision."""
        compute = x.dtype if self.precision == "bf16" else torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(compute), self.weight.to(compute))
        if not torch.isfinite(logits).all():  # NaN/Inf in x always reaches the logits of its token
            raise MoEInputError("x: expected finite router logits, got NaN or Inf (non-finite x or gate.weight, "
                                "or overflow)")
        if self.moe.score_func == "softmax":
            return logits.softmax(dim=-1, dtype=torch.promote_types(compute, torch.float32))
        return logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Route x [N, D]: weights [N, k] in x's dtype and expert indices [N, k]; keeps `last_scores`."""
        _check_input(x, self.dim, self.weight.dtype)
        scores = self.scores(x)
        self.last_scores = scores
        indices = select_experts(scores, self.bias, self.moe)
        return gate_weights(scores, indices, self.moe).to(x.dtype), indices


def _unchanged(params: tuple[torch.Tensor, ...], held: tuple[tuple[torch.Tensor, int], ...]) -> bool:
    """Whether every parameter still has the storage and version recorded in `held` (tensor, version) pairs."""
    return all(p.data_ptr() == t.data_ptr() and p._version == v for p, (t, v) in zip(params, held, strict=True))


def _expert_weights(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) weights of one expert, read from the module dicts directly: this runs for every selected
    expert on every grouped_mm forward, where nn.Module attribute lookups alone cost ~5 us per expert."""
    linears = expert._modules
    return tuple(linears[name]._parameters["weight"] for name in ("w1", "w3", "w2"))


def grouped_mm_supported(dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether F.grouped_mm can run: torch has it, the dtype is bf16/fp16/fp32 and rows of width `dims` are
    multiples of 16 bytes (its stride requirement on the CPU and CUDA)."""
    if not hasattr(F, "grouped_mm") or dtype not in GROUPED_MM_DTYPES:
        return False
    return all(d * dtype.itemsize % 16 == 0 for d in dims)


def default_gemm(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...], rows_per_expert: float,
                 padding: float = 1.0) -> str:
    """The grouped path's matmul backend for `auto` (`segments` wherever grouped_mm cannot run, e.g. fp64).

    `padding` = experts in the hit range x the largest count / pairs: what `padded` would compute over what is
    needed; skewed routing (one hot expert) makes it large, and `grouped_mm` runs instead.

    CUDA: `grouped_mm` for bf16. CPU (torch 2.13's grouped_mm loops over the groups, one mm each), by rows per
    expert against CPU_GEMM_ROWS: `grouped_mm_t` while few experts are hit (weights as the left operand stream
    fastest), `padded` while most are hit by a few tokens each (the batch is bound by reading the weights, which
    one bmm does at memory speed), `grouped_mm` for mid-size segments and `segments` for large ones, whose
    working set stays in cache.
    """
    if not grouped_mm_supported(dtype, dims):
        return "segments"
    if device.type == "cuda":
        return "grouped_mm" if dtype == torch.bfloat16 else "segments"
    backends = ("grouped_mm_t", "padded", "grouped_mm")
    gemm = next((b for b, limit in zip(backends, CPU_GEMM_ROWS, strict=True) if rows_per_expert < limit), "segments")
    return "grouped_mm" if gemm == "padded" and padding > PADDED_MAX_WASTE else gemm


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """A copy of t [R, C] whose row stride is a multiple of 16 bytes (grouped_mm's rule), C itself any size."""
    per_16 = max(16 // t.itemsize, 1)
    out = t.new_empty(t.shape[0], -(-t.shape[1] // per_16) * per_16)[:, : t.shape[1]]
    return out.copy_(t)


@dataclass(frozen=True)
class _Pairs:
    """The N*k (token, slot) pairs sorted by expert: each pair's token, expert and routing weight [N*k, 1], and
    the pairs per expert [E]."""

    tokens: torch.Tensor
    experts: torch.Tensor
    scale: torch.Tensor
    counts: torch.Tensor


class MoE(nn.Module):
    """Shared experts + routed experts, y = shared(x) + sum_k w_k expert_{i_k}(x), for x [..., D].

    `impl` picks how routed experts run ("reference": per-expert loop; "grouped": sorted grouped computation);
    `gemm` picks the grouped path's matmul ("auto", "grouped_mm", "segments"). After each forward,
    `last_indices` [N, k] holds the routing (for the bias update) and `gate.last_scores` the affinities.
    """

    def __init__(self, cfg: ModelConfig, impl: str = "grouped", precision: str = "bf16", gemm: str = "auto") -> None:
        super().__init__()
        if cfg.moe is None:
            raise ConfigError(f"{cfg.name}: moe: a MoE layer needs a MoE config")
        if impl not in IMPLS:
            raise ConfigError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")
        if gemm not in GEMMS:
            raise ConfigError(f"gemm: expected one of {', '.join(GEMMS)}, got {gemm!r}")
        moe = cfg.moe
        self.cfg, self.dim, self.impl, self.gemm = cfg, cfg.hidden_size, impl, gemm
        self.n_experts, self.topk, self.inter = moe.n_routed_experts, moe.num_experts_per_tok, moe.moe_intermediate_size
        self.gate = Gate(cfg, precision)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, moe.moe_intermediate_size) for _ in range(self.n_experts))
        shared = moe.n_shared_experts * moe.moe_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared else None
        self.last_indices: torch.Tensor | None = None
        # grouped_mm's weight stack: per expert the (tensor, version) pairs it was copied from, w13, w2
        self._stack_cache: tuple[list[tuple | None], torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]; keeps the routing in `last_indices`."""
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise MoEInputError(f"x: expected shape [..., {self.dim}], got {list(x.shape)}")
        shape = x.shape
        x = x.reshape(-1, self.dim)  # [N, D]
        weights, indices = self.gate(x)
        self.last_indices = indices.detach()
        routed = self._loop if self.impl == "reference" else self._grouped
        y = routed(x, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)

    def _loop(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each expert takes the rows routed to it and adds its weighted output (the official code's loop)."""
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            rows, slot = torch.where(indices == i)
            y[rows] += expert(x[rows]) * weights[rows, slot, None]
        return y

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Sort the N*k (token, slot) pairs by expert once; run each expert once on its segment of pairs; add the
        results, times their routing weights, back into their tokens' rows."""
        flat = indices.flatten()  # [N*k]
        if flat.numel() == 0:
            return torch.zeros_like(x)
        order = flat.argsort(stable=True)
        pairs = _Pairs(tokens=order // self.topk, experts=flat[order], scale=weights.flatten()[order].unsqueeze(-1),
                       counts=torch.bincount(flat, minlength=self.n_experts))
        gemm = self.gemm
        if gemm == "auto":  # stacked weights only for inference with plain nn.Linear experts (see _grouped_mm)
            eligible = not torch.is_grad_enabled() and self._plain_linears()
            hit = pairs.counts.nonzero()
            padding = (int(hit[-1]) - int(hit[0]) + 1) * int(pairs.counts.max()) / flat.numel()
            gemm = (default_gemm(x.device, x.dtype, (self.dim, self.inter), flat.numel() / self.n_experts, padding)
                    if eligible else "segments")
        if gemm != "segments" and not self._plain_linears():
            raise ConfigError(f"gemm: {gemm!r} multiplies raw weights but the experts' linears are not plain "
                              "nn.Linear (converted, e.g. to FP8); use gemm 'segments' or 'auto'")
        run = {"segments": self._segments, "grouped_mm": self._grouped_mm, "grouped_mm_t": self._grouped_mm_t,
               "padded": self._padded}[gemm]
        return run(x, pairs)

    def _segments(self, x: torch.Tensor, p: _Pairs) -> torch.Tensor:
        """Each expert's three matmuls once over its contiguous segment of sorted pairs (calls the modules)."""
        y, start = torch.zeros_like(x), 0
        for expert, rows in zip(self.experts, p.counts.tolist(), strict=True):
            if rows == 0:
                continue
            seg = slice(start, start + rows)
            xe = x.index_select(0, p.tokens[seg])  # [rows, D]
            y.index_add_(0, p.tokens[seg], expert.w2(swiglu(expert.w1(xe), expert.w3(xe), p.scale[seg])))
            start += rows
        return y

    def _grouped_mm(self, x: torch.Tensor, p: _Pairs) -> torch.Tensor:
        """Two grouped matmuls (w1|w3 stacked) over the experts from the first to the last hit one (a view of the
        weight stack; the CPU kernel runs one mm per group, empty or not), segments delimited by row offsets."""
        self._check_grouped_mm(x, "grouped_mm")
        w13, w2, lo, hi = self._hit_range(p.counts)
        offs = p.counts[lo:hi].cumsum(0).to(torch.int32)
        xs = x.index_select(0, p.tokens)  # [N*k, D], rows grouped by expert
        gate, up = F.grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [N*k, I] each
        out = F.grouped_mm(swiglu(gate, up, p.scale), w2.transpose(-2, -1), offs=offs)  # [N*k, D]
        return torch.zeros_like(x).index_add_(0, p.tokens, out)

    def _grouped_mm_t(self, x: torch.Tensor, p: _Pairs) -> torch.Tensor:
        """The transposed problem in two grouped matmuls, W [2I, D] @ X^T [D, rows] per expert (offsets along the
        columns): the CPU kernel streams a weight faster as the left operand than as a transposed right one."""
        self._check_grouped_mm(x, "grouped_mm_t")
        w13, w2, lo, hi = self._hit_range(p.counts)
        offs = p.counts[lo:hi].cumsum(0).to(torch.int32)
        xt = _aligned_rows(x.index_select(0, p.tokens).T)  # [D, N*k], columns grouped by expert
        gate, up = F.grouped_mm(w13, xt, offs=offs).chunk(2, dim=0)  # [I, N*k] each
        out = F.grouped_mm(w2, _aligned_rows(swiglu(gate, up)), offs=offs)  # [D, N*k]
        return torch.zeros_like(x).index_add_(0, p.tokens, out.T * p.scale)

    def _check_grouped_mm(self, x: torch.Tensor, gemm: str) -> None:
        if not grouped_mm_supported(x.dtype, (self.dim, self.inter)):
            raise MoEInputError(f"x: gemm {gemm!r} needs bf16/fp16/fp32 and rows of 16-byte multiples (hidden "
                                f"{self.dim}, expert width {self.inter}); got {x.dtype}")

    def _padded(self, x: torch.Tensor, p: _Pairs) -> torch.Tensor:
        """Two bmm over the experts from the first to the last hit one, each expert's tokens as the columns of a
        [D, R] block zero-padded to the largest count R: W [2I, D] @ X [D, R] reads every weight once."""
        w13, w2, lo, hi = self._hit_range(p.counts)
        starts = p.counts.cumsum(0) - p.counts
        slot = torch.arange(p.tokens.numel(), device=x.device) - starts[p.experts]  # pair's column in its block
        expert = p.experts - lo
        xp = x.new_zeros(hi - lo, self.dim, int(p.counts.max()))  # [E', D, R]
        xp[expert, :, slot] = x.index_select(0, p.tokens)
        gate, up = torch.bmm(w13, xp).chunk(2, dim=1)  # [E', I, R] each
        out = torch.bmm(w2, swiglu(gate, up))  # [E', D, R]
        return torch.zeros_like(x).index_add_(0, p.tokens, out[expert, :, slot] * p.scale)  # [N*k, D] gathered

    def _hit_range(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Views w13 [E', 2I, D] and w2 [E', D, I] of the weight stack over experts lo..hi-1, the first to the last
        expert with tokens (the others' weights are never read)."""
        hit = counts.nonzero().flatten()
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        w13, w2 = self._stacked_weights(hit.tolist())
        return w13[lo:hi], w2[lo:hi], lo, hi

    def _plain_linears(self) -> bool:
        """Whether the experts' w1/w2/w3 are plain nn.Linear (conversions swap them by name, so expert 0 tells)."""
        first = self.experts[0]
        return all(type(m) is nn.Linear for m in (first.w1, first.w2, first.w3))

    def _stacked_weights(self, hit: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert weights stacked as w13 [E, 2I, D] (w1 above w3) and w2 [E, D, I], current for the `hit` experts
        (only their outputs are used: another expert's stale slice only meets zero rows or unread columns).

        When gradients are needed all are stacked on every forward (differentiable; `auto` then prefers segments,
        which need no copy). Otherwise the stack is kept
        and a hit expert's slice is refreshed when its weights changed: new storage (the cache holds the old one,
        so its address cannot be reused) or an in-place update (which bumps the tensor's version counter).
        """
        experts = list(self.experts)
        weights = {e: _expert_weights(experts[e]) for e in hit}
        if torch.is_grad_enabled() and any(p.requires_grad for ps in weights.values() for p in ps):
            w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
            return w13, torch.stack([e.w2.weight for e in experts])
        if self._stack_cache is None:
            w1 = self.experts[0].w1.weight
            w13 = w1.new_zeros(self.n_experts, 2 * self.inter, self.dim)
            self._stack_cache = ([None] * self.n_experts, w13, w1.new_zeros(self.n_experts, self.dim, self.inter))
        held, w13, w2 = self._stack_cache
        with torch.no_grad():
            for e, (p1, p3, p2) in weights.items():
                if held[e] is None or not _unchanged((p1, p3, p2), held[e]):
                    w13[e, : self.inter], w13[e, self.inter:], w2[e] = p1, p3, p2
                    held[e] = tuple((p.detach(), p._version) for p in (p1, p3, p2))
        return w13, w2

    def _apply(self, fn: Callable, recurse: bool = True) -> MoE:
        """Conversions (.to, .cuda, ...) drop the grouped_mm weight stack with the old weights."""
        self._stack_cache = None
        return super()._apply(fn, recurse)
