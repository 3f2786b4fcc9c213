"""Component `ep` (protocol `harness.protocols.EPImpl`): expert-parallel dispatch/combine. Built-in:
`reference` (dsv3ref's flat all-to-all, the literal semantics) and `hierarchical` (the plane-aware path: one
scale-out message per destination node over the sender's plane, NVLink forwarding inside the node).
"""

from __future__ import annotations

from dsv3ref.comms.ep import AllToAll
from harness.protocols import EPImpl
from harness.registry import register_component, register_impl

PROPERTIES = (
    "link_bytes",  # adds the payload bytes of each call per link class to a LinkBytes counter
    "node_dedup",  # a token crosses scale-out once per destination node (hierarchical forwarding)
    "input_checks",  # bad input, or ranks that disagree, raise a ValueError on every rank
    "fp8_dispatch",  # dispatch format "fp8" (e4m3 + fp32 1x128 scales)
    "fp64",  # float64 activations travel exactly (format "native")
)


class DsAllToAll(AllToAll):
    """dsv3ref.comms.ep's dispatch/combine on one path, as the `ep` component."""

    component = "ep"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.not_applicable = {} if path == "hierarchical" else {
            "node_dedup": "the flat path sends one scale-out message per destination rank, not per node"}


register_component("ep", "expert-parallel dispatch/combine over torch.distributed (DeepEP normal-mode semantics)",
                   EPImpl, PROPERTIES)
register_impl("ep", "reference", lambda: DsAllToAll("flat"), "dsv3ref.comms.ep, flat all-to-all over the world")
register_impl("ep", "hierarchical", lambda: DsAllToAll("hierarchical"),
              "dsv3ref.comms.ep, scale-out once per node over the sender's plane, then NVLink forwarding")
