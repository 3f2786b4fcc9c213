"""The analytic cost model: every formula lives here once; the report and the suites use it."""

from harness.analytic.flops import fwd_flops_per_token, train_flops_per_token
from harness.analytic.kv_cache import (
    DTYPE_BYTES,
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token,
    kv_cache_bytes_per_token_layer,
)
from harness.analytic.params import ParamCounts, param_counts
from harness.analytic.tpot import EPCommBound, ep_comm_bound, ep_link

__all__ = ["DTYPE_BYTES", "EPCommBound", "ParamCounts", "ep_comm_bound", "ep_link", "fwd_flops_per_token",
           "kv_cache_bytes_per_sequence", "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_layer",
           "param_counts", "train_flops_per_token"]
