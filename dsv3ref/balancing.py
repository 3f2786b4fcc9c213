"""Load balancing for DeepSeekMoE: the auxiliary-loss-free bias update, the sequence-wise balance loss and load
statistics.

Bias update (DeepSeek-V3 report §2.1.2, as torchtitan implements it): after each step, every over-loaded
expert's bias goes down by gamma and every under-loaded one's goes up, the change centred to sum to zero.
Sequence-wise loss: L_Bal = alpha * sum_i f_i P_i with f_i = E / (k T) * #tokens sent to i and P_i the mean over
tokens of i's normalised affinity s_i / sum_j s_j, per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GAMMA = 0.001  # bias update speed for the first 14.3T tokens of DeepSeek-V3 (0 for the last 500B)
ALPHA = 0.0001  # sequence-wise balance loss factor of DeepSeek-V3


class BalancingInputError(ValueError):
    """A bad input to a balancing function; the message names the argument and what was expected."""


def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert [E] (int64) from indices [..., k]; entries of -1 (dropped slots) are ignored."""
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise BalancingInputError(f"indices: expected an integer tensor, got {indices.dtype}")
    flat = indices.flatten()
    if flat.numel() and (flat.min() < -1 or flat.max() >= n_experts):
        raise BalancingInputError(f"indices: expected values in [-1, {n_experts}), got "
                                  f"[{int(flat.min())}, {int(flat.max())}]")
    return torch.bincount(flat[flat >= 0], minlength=n_experts)


def _check_load(load: torch.Tensor) -> None:
    if load.ndim != 1 or load.numel() == 0:
        raise BalancingInputError(f"load: expected a non-empty 1-D tensor [experts], got shape {list(load.shape)}")
    if load.dtype.is_floating_point and not torch.isfinite(load).all():
        raise BalancingInputError("load: expected finite values, got NaN or Inf")
    if (load < 0).any():
        raise BalancingInputError("load: expected counts >= 0, got a negative value")


def bias_update(load: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """The change of the selection bias [E] for one step: gamma * sign(mean load - load), minus its mean."""
    _check_load(load)
    if not gamma >= 0 or gamma == float("inf"):
        raise BalancingInputError(f"gamma: expected a finite number >= 0, got {gamma!r}")
    load = load.double()
    delta = gamma * torch.sign(load.mean() - load)
    return delta - delta.mean()


def apply_bias_update_(bias: torch.Tensor, load: torch.Tensor, gamma: float = GAMMA) -> torch.Tensor:
    """Add the update for `load` to `bias` in place (no gradient) and return it."""
    if bias.shape != load.shape:
        raise BalancingInputError(f"bias: expected shape {list(load.shape)} (one per expert), got {list(bias.shape)}")
    with torch.no_grad():
        return bias.add_(bias_update(load, gamma).to(bias.dtype))


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """L_Bal = alpha * sum_i f_i P_i averaged over sequences; scores [B, T, E] unbiased affinities, indices [B, T, k].

    Differentiable through `scores` (P_i); f_i counts selections and carries no gradient.
    """
    if scores.ndim != 3 or indices.ndim != 3 or scores.shape[:2] != indices.shape[:2]:
        raise BalancingInputError(f"scores, indices: expected [B, T, E] and [B, T, k] with the same B, T; got "
                                  f"{list(scores.shape)} and {list(indices.shape)}")
    b, t, e = scores.shape
    k = indices.shape[-1]
    if t == 0:
        raise BalancingInputError("scores: expected at least one token per sequence, got T = 0")
    if indices.dtype.is_floating_point or indices.min() < 0 or indices.max() >= e:
        raise BalancingInputError(f"indices: expected integer expert ids in [0, {e}), got {indices.dtype} values "
                                  f"in [{indices.min().item()}, {indices.max().item()}]")
    counts = torch.zeros(b, e, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, indices.reshape(b, t * k), torch.ones(b, t * k, dtype=scores.dtype, device=scores.device))
    f = counts * e / (k * t)  # [B, E]
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


@dataclass(frozen=True)
class LoadStats:
    """Summary of an expert load vector."""

    max_over_mean: float
    cv: float  # coefficient of variation: population std / mean
    min: int
    max: int
    mean: float


def load_stats(load: torch.Tensor) -> LoadStats:
    """Max/mean, coefficient of variation and extremes of per-expert loads (mean must be positive)."""
    _check_load(load)
    load = load.double()
    mean = load.mean().item()
    if mean == 0:
        raise BalancingInputError("load: expected at least one routed token, got all zeros")
    return LoadStats(load.max().item() / mean, load.std(correction=0).item() / mean, int(load.min()),
                     int(load.max()), mean)
