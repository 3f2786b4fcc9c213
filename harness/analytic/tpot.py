"""The paper's expert-parallel communication bound on time per output token (Insights §2.3.2).

Each device holds one expert and processes `tokens_per_device` tokens; per MoE step every token's hidden vector
is dispatched (FP8, 1 B/element) to and combined (BF16, 2 B/element) from each of its experts (routed top-k plus
the shared one). With dual micro-batch overlap each layer pays that time twice; computation and network latency
are assumed hidden. TPOT = layers x micro_batches x comm_time.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3ref.config import ConfigError, ModelConfig
from hardware.profile import Profile

TPOT_METHODS = ("paper-7k", "config-exact")


@dataclass(frozen=True)
class EPCommBound:
    """The inputs and results of the bound; times in seconds."""

    method: str
    hidden: int
    tokens_per_device: int
    experts_per_token: int
    dispatch_bytes: float
    combine_bytes: float
    bandwidth_GBps: float
    layers: int
    micro_batches: int

    @property
    def bytes_per_layer_step(self) -> float:
        """Bytes one device sends per dispatch + combine of one micro-batch."""
        return ((self.dispatch_bytes + self.combine_bytes) * self.tokens_per_device * self.experts_per_token
                * self.hidden)

    @property
    def comm_time_s(self) -> float:
        return self.bytes_per_layer_step / (self.bandwidth_GBps * 1e9)

    @property
    def tpot_s(self) -> float:
        return tpot_from_comm_time(self.comm_time_s, self.layers, self.micro_batches)

    @property
    def tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s


def tpot_from_comm_time(comm_time_s: float, layers: int, micro_batches: int = 2) -> float:
    """TPOT when each layer pays one dispatch + combine time per micro-batch (dual micro-batch overlap: 2), with
    compute and latency hidden: layers x micro_batches x comm_time_s."""
    return layers * micro_batches * comm_time_s


def ep_comm_bound(cfg: ModelConfig, bandwidth_GBps: float, method: str = "paper-7k", tokens_per_device: int = 32,
                  dispatch_bytes: float = 1.0, combine_bytes: float = 2.0, micro_batches: int = 2) -> EPCommBound:
    """The bound for `cfg` over a link of `bandwidth_GBps` per GPU per direction.

    paper-7k rounds the hidden size to thousands as the paper does (7168 -> "7K" = 7000); config-exact uses it.
    A hidden size that rounds to 0 thousands (<= 500) makes paper-7k undefined: ConfigError (see `tpot_methods`).
    """
    if cfg.moe is None:
        raise ConfigError(f"{cfg.name}: moe: the EP-communication bound needs a MoE model")
    if method not in TPOT_METHODS:
        raise ConfigError(f"method: expected one of {', '.join(TPOT_METHODS)}, got {method!r}")
    if bandwidth_GBps <= 0:
        raise ConfigError(f"bandwidth_GBps: expected a positive number, got {bandwidth_GBps!r}")
    hidden = paper_hidden(cfg.hidden_size) if method == "paper-7k" else cfg.hidden_size
    if hidden == 0:
        raise ConfigError(f"{cfg.name}: hidden_size: method paper-7k rounds it to thousands, which gives 0 for "
                          f"{cfg.hidden_size}; use method config-exact")
    experts = cfg.moe.num_experts_per_tok + cfg.moe.n_shared_experts
    return EPCommBound(method, hidden, tokens_per_device, experts, dispatch_bytes, combine_bytes, bandwidth_GBps,
                       cfg.num_layers, micro_batches)


def paper_hidden(hidden_size: int) -> int:
    """The hidden size as the paper writes it, rounded to thousands (7168 -> 7000)."""
    return round(hidden_size, -3)


def tpot_methods(cfg: ModelConfig) -> tuple[str, ...]:
    """The methods that apply to `cfg`: paper-7k only where its rounded hidden size is not 0."""
    return TPOT_METHODS if paper_hidden(cfg.hidden_size) else tuple(m for m in TPOT_METHODS if m != "paper-7k")


def ep_link(profile: Profile) -> tuple[str, float] | None:
    """The link EP all-to-all crosses on this profile: scale-up when its domain spans several nodes (a rack-scale
    NVLink domain such as NVL72), else scale-out; None when the profile declares no such link."""
    if profile.scaleup_GBps_per_gpu and profile.scaleup_domain_gpus > profile.gpus_per_node:
        return "scale-up", profile.scaleup_GBps_per_gpu
    if profile.scaleout_GBps_per_gpu:
        return "scale-out", profile.scaleout_GBps_per_gpu
    return None
