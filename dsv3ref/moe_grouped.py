"""Fast paths of the MoE layer's routed experts (`dsv3ref.backends` kind "moe_experts"), checked against the
per-expert loop of `dsv3ref.moe` by the conformance suites.

Each sorts the N*k (token, slot) pairs by expert once, runs the experts over their contiguous segments and adds
the results back into their tokens' rows with the routing weights. Matmul backends:
- `segments`: each expert's three matmuls once over its segment (calls the expert modules, so converted linears,
  e.g. FP8, run as themselves; any dtype, differentiable);
- `grouped_mm`: two `torch.nn.functional.grouped_mm` (X W^T per expert) over stacked weights;
- `grouped_mm_t`: the same on the transposed problem (W X^T, tokens as columns): each weight is the left operand,
  which torch's CPU kernel streams faster when an expert has a token or two;
- `padded`: two `torch.bmm` with each expert's tokens as the columns of a block zero-padded to the largest count,
  so every weight is read once in one call;
- `auto`: one of the above for the device, dtype and mean rows per expert (CPU thresholds `CPU_GEMM_ROWS`, measured
  on the report's `moe-mid` benchmark layer on a 2-core AMX Xeon; a machine-specific tuning, not semantics).
The stacked weights are kept per module for inference (refreshed for an expert whose weights changed) and stacked
per forward when gradients are needed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv3ref import backends
from dsv3ref.config import ConfigError
from dsv3ref.layers import swiglu

GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# CPU thresholds of `auto` on mean rows per expert (N k / E), measured on the moe-mid benchmark layer (bf16):
# grouped_mm_t below the first, padded up to the second, grouped_mm up to the third, segments from there on
CPU_GEMM_ROWS = (1.25, 64.0, 160.0)
PADDED_MAX_WASTE = 6.0  # padded only while its zero-padded blocks hold at most this many times the real pairs


class GroupedInputError(ValueError):
    """An input a grouped matmul backend cannot take; the message names it and what was expected."""


@dataclass(frozen=True)
class Pairs:
    """The N*k (token, slot) pairs sorted by expert: each pair's token [N*k], expert [N*k] and routing weight
    [N*k, 1], and the pairs per expert [E]."""

    tokens: torch.Tensor
    experts: torch.Tensor
    scale: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def sort(cls, weights: torch.Tensor, indices: torch.Tensor, n_experts: int) -> Pairs:
        flat = indices.flatten()  # [N*k]
        order = flat.argsort(stable=True)
        return cls(tokens=order // indices.shape[1], experts=flat[order],
                   scale=weights.flatten()[order].unsqueeze(-1), counts=torch.bincount(flat, minlength=n_experts))


def grouped_mm_supported(dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether F.grouped_mm can run: torch has it, the dtype is bf16/fp16/fp32 and rows of width `dims` are
    multiples of 16 bytes (its stride requirement on the CPU and CUDA)."""
    if not hasattr(F, "grouped_mm") or dtype not in GROUPED_MM_DTYPES:
        return False
    return all(d * dtype.itemsize % 16 == 0 for d in dims)


def default_gemm(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...], rows_per_expert: float,
                 padding: float = 1.0) -> str:
    """The matmul backend `auto` runs (`segments` wherever grouped_mm cannot run, e.g. fp64).

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
    choices = ("grouped_mm_t", "padded", "grouped_mm")
    gemm = next((b for b, limit in zip(choices, CPU_GEMM_ROWS, strict=True) if rows_per_expert < limit), "segments")
    return "grouped_mm" if gemm == "padded" and padding > PADDED_MAX_WASTE else gemm


def plain_linears(moe: nn.Module) -> bool:
    """Whether every expert's w1/w2/w3 is a plain nn.Linear (a checkpoint may store only some experts in FP8, so
    every expert is looked at; through the module dicts, as attribute lookups cost microseconds each)."""
    return all(type(linear) is nn.Linear for expert in moe.experts._modules.values()
               for linear in expert._modules.values())


PairsRun = Callable[[nn.Module, torch.Tensor, "Pairs"], torch.Tensor]


def _grouped(gemm: str) -> Callable[[PairsRun], PairsRun]:
    """Register `run(moe, x, pairs)` as backend `gemm`: sorts the pairs, checks the experts can be read raw."""

    def wrap(run: PairsRun) -> PairsRun:
        @backends.register("moe_experts", gemm)
        def backend(moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            if indices.numel() == 0:
                return torch.zeros_like(x)
            if gemm != "segments" and not plain_linears(moe):
                raise ConfigError(f"backend: {gemm!r} multiplies raw weights but the experts' linears are not plain "
                                  "nn.Linear (converted, e.g. to FP8); use backend 'segments' or 'auto'")
            return run(moe, x, Pairs.sort(weights, indices, moe.n_experts))

        backend.__doc__ = run.__doc__
        return run

    return wrap


@backends.register("moe_experts", "auto")
def auto(moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`default_gemm`'s pick; stacked weights only for inference with plain nn.Linear experts."""
    if indices.numel() == 0:
        return torch.zeros_like(x)
    gemm = "segments"
    if not torch.is_grad_enabled() and plain_linears(moe):
        counts = torch.bincount(indices.flatten(), minlength=moe.n_experts)
        hit = counts.nonzero()
        padding = (int(hit[-1]) - int(hit[0]) + 1) * int(counts.max()) / indices.numel()
        gemm = default_gemm(x.device, x.dtype, (moe.dim, moe.inter), indices.numel() / moe.n_experts, padding)
    return backends.get("moe_experts", gemm)(moe, x, weights, indices)


@_grouped("segments")
def segments(moe: nn.Module, x: torch.Tensor, p: Pairs) -> torch.Tensor:
    """Each expert's three matmuls once over its contiguous segment of sorted pairs (calls the modules)."""
    y, start = torch.zeros_like(x), 0
    for expert, rows in zip(moe.experts, p.counts.tolist(), strict=True):
        if rows == 0:
            continue
        seg = slice(start, start + rows)
        xe = x.index_select(0, p.tokens[seg])  # [rows, D]
        y.index_add_(0, p.tokens[seg], expert.w2(swiglu(expert.w1(xe), expert.w3(xe), p.scale[seg])))
        start += rows
    return y


def _check_grouped_mm(moe: nn.Module, x: torch.Tensor, gemm: str) -> None:
    if not grouped_mm_supported(x.dtype, (moe.dim, moe.inter)):
        raise GroupedInputError(f"x: backend {gemm!r} needs bf16/fp16/fp32 and rows of 16-byte multiples (hidden "
                                f"{moe.dim}, expert width {moe.inter}); got {x.dtype}")


@_grouped("grouped_mm")
def grouped_mm(moe: nn.Module, x: torch.Tensor, p: Pairs) -> torch.Tensor:
    """Two grouped matmuls (w1|w3 stacked) over the experts from the first to the last hit one (a view of the
    weight stack; the CPU kernel runs one mm per group, empty or not), segments delimited by row offsets."""
    _check_grouped_mm(moe, x, "grouped_mm")
    w13, w2, lo, hi = _hit_range(moe, p.counts)
    offs = p.counts[lo:hi].cumsum(0).to(torch.int32)
    xs = x.index_select(0, p.tokens)  # [N*k, D], rows grouped by expert
    gate, up = F.grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [N*k, I] each
    out = F.grouped_mm(swiglu(gate, up, p.scale), w2.transpose(-2, -1), offs=offs)  # [N*k, D]
    return torch.zeros_like(x).index_add_(0, p.tokens, out)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """A copy of t [R, C] whose row stride is a multiple of 16 bytes (grouped_mm's rule), C itself any size."""
    per_16 = max(16 // t.itemsize, 1)
    out = t.new_empty(t.shape[0], -(-t.shape[1] // per_16) * per_16)[:, : t.shape[1]]
    return out.copy_(t)


@_grouped("grouped_mm_t")
def grouped_mm_t(moe: nn.Module, x: torch.Tensor, p: Pairs) -> torch.Tensor:
    """The transposed problem in two grouped matmuls, W [2I, D] @ X^T [D, rows] per expert (offsets along the
    columns): the CPU kernel streams a weight faster as the left operand than as a transposed right one."""
    _check_grouped_mm(moe, x, "grouped_mm_t")
    w13, w2, lo, hi = _hit_range(moe, p.counts)
    offs = p.counts[lo:hi].cumsum(0).to(torch.int32)
    xt = _aligned_rows(x.index_select(0, p.tokens).T)  # [D, N*k], columns grouped by expert
    gate, up = F.grouped_mm(w13, xt, offs=offs).chunk(2, dim=0)  # [I, N*k] each
    out = F.grouped_mm(w2, _aligned_rows(swiglu(gate, up)), offs=offs)  # [D, N*k]
    return torch.zeros_like(x).index_add_(0, p.tokens, out.T * p.scale)


@_grouped("padded")
def padded(moe: nn.Module, x: torch.Tensor, p: Pairs) -> torch.Tensor:
    """Two bmm over the experts from the first to the last hit one, each expert's tokens as the columns of a
    [D, R] block zero-padded to the largest count R: W [2I, D] @ X [D, R] reads every weight once."""
    w13, w2, lo, hi = _hit_range(moe, p.counts)
    starts = p.counts.cumsum(0) - p.counts
    slot = torch.arange(p.tokens.numel(), device=x.device) - starts[p.experts]  # pair's column in its block
    expert = p.experts - lo
    xp = x.new_zeros(hi - lo, moe.dim, int(p.counts.max()))  # [E', D, R]
    xp[expert, :, slot] = x.index_select(0, p.tokens)
    gate, up = torch.bmm(w13, xp).chunk(2, dim=1)  # [E', I, R] each
    out = torch.bmm(w2, swiglu(gate, up))  # [E', D, R]
    return torch.zeros_like(x).index_add_(0, p.tokens, out[expert, :, slot] * p.scale)  # [N*k, D] gathered


def _hit_range(moe: nn.Module, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Views w13 [E', 2I, D] and w2 [E', D, I] of the weight stack over experts lo..hi-1, the first to the last
    expert with tokens (the others' weights are never read)."""
    hit = counts.nonzero().flatten()
    lo, hi = int(hit[0]), int(hit[-1]) + 1
    w13, w2 = _stacks.get(moe, hit.tolist())
    return w13[lo:hi], w2[lo:hi], lo, hi


def _version(t: torch.Tensor) -> int:
    """The tensor's version counter; -1 for inference tensors, which keep none (and cannot change in place)."""
    return -1 if t.is_inference() else t._version


class WeightStacks:
    """Per MoE module, its experts' weights stacked as w13 [E, 2I, D] (w1 above w3) and w2 [E, D, I].

    For inference the stack is kept and a hit expert's slice is refreshed when its weights changed: new storage
    (the stack holds the old tensors, so their addresses cannot be reused) or an in-place update (a new version);
    a module moved to another dtype or device gets a new stack. When gradients are needed all experts are stacked
    on every forward (differentiable). Only the hit experts' slices are used: a stale slice of another expert
    only meets zero rows or unread columns.
    """

    def __init__(self) -> None:
        self._held: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, moe: nn.Module, hit: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        experts = list(moe.experts)
        weights = {e: _expert_weights(experts[e]) for e in hit}
        if torch.is_grad_enabled() and any(p.requires_grad for ps in weights.values() for p in ps):
            w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in experts])
            return w13, torch.stack([e.w2.weight for e in experts])
        w1 = experts[0].w1.weight
        entry = self._held.get(moe)
        if entry is None or entry[1].dtype != w1.dtype or entry[1].device != w1.device:
            entry = ([None] * moe.n_experts, w1.new_zeros(moe.n_experts, 2 * moe.inter, moe.dim),
                     w1.new_zeros(moe.n_experts, moe.dim, moe.inter))
            self._held[moe] = entry
        held, w13, w2 = entry
        with torch.no_grad():
            for e, (p1, p3, p2) in weights.items():
                if held[e] is None or not _unchanged((p1, p3, p2), held[e]):
                    w13[e, : moe.inter], w13[e, moe.inter:], w2[e] = p1, p3, p2
                    held[e] = tuple((p.detach(), _version(p)) for p in (p1, p3, p2))
        return w13, w2


def _unchanged(params: tuple[torch.Tensor, ...], held: tuple[tuple[torch.Tensor, int], ...]) -> bool:
    """Whether every parameter still has the storage and version recorded in `held` (tensor, version) pairs."""
    return all(p.data_ptr() == t.data_ptr() and _version(p) == v for p, (t, v) in zip(params, held, strict=True))


def _expert_weights(expert: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w1, w3, w2) weights of one expert, read from the module dicts directly: this runs for every selected
    expert on every stacked forward, where nn.Module attribute lookups alone cost ~5 us per expert."""
    linears = expert._modules
    return tuple(linears[name]._parameters["weight"] for name in ("w1", "w3", "w2"))


_stacks = WeightStacks()
