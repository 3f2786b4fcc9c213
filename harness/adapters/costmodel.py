"""Component `costmodel`: the analytic cost model, so a user's calculator can run through the same suite."""

from __future__ import annotations

from dsv3ref.config import ModelConfig
from harness import analytic
from harness.protocols import CostModelImpl
from harness.registry import register_component, register_impl

register_component("costmodel", "analytic KV-cache bytes, parameter counts, training FLOPs and the EP TPOT bound "
                   "of a ModelConfig", CostModelImpl)


class ReferenceCostModel:
    """Adapter exposing harness.analytic through the costmodel protocol."""

    component = "costmodel"

    def kv_cache_bytes_per_token(self, cfg: ModelConfig, dtype: str = "bf16") -> int:
        return analytic.kv_cache_bytes_per_token(cfg, dtype)

    def params_total(self, cfg: ModelConfig) -> int:
        return analytic.param_counts(cfg).total

    def params_activated(self, cfg: ModelConfig) -> int:
        return analytic.param_counts(cfg).activated

    def train_flops_per_token(self, cfg: ModelConfig, seq_len: int = 4096) -> float:
        return analytic.train_flops_per_token(cfg, "exact", seq_len)

    def ep_tpot_s(self, cfg: ModelConfig, bandwidth_GBps: float, hidden_rounding: bool = True) -> float:
        method = "paper-7k" if hidden_rounding else "config-exact"
        return analytic.ep_comm_bound(cfg, bandwidth_GBps, method).tpot_s


register_impl("costmodel", "reference", ReferenceCostModel, "harness.analytic (the project's cost model)")
