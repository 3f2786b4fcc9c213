"""Scale-out network topologies (Insights §5.1, Table 3): endpoint, switch and link counts from the switch radix
and the construction parameters, and a linear cost model.

- FT2: two-layer fat-tree of radix k: k leaves (k/2 endpoints, k/2 uplinks each) and k/2 spines.
- MPFT: multi-plane fat-tree, P independent FT2 planes; each GPU-NIC pair of a node sits on its own plane.
- MRFT: multi-rail fat-tree, one FT2 whose leaves are split into R rails; NIC r of every node goes to rail r.
- FT3: three-layer fat-tree of radix k (k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 cores).
- SF: Slim Fly on the MMS graph of parameter q = 4w + delta: 2q^2 switches of network degree (3q - delta)/2,
  p = ceil(degree / 2) endpoints per switch (full global bandwidth).
- DF: canonical Dragonfly (p endpoints, a routers and h global links per router, g groups; all ports cabled).

`links` counts switch-to-switch links only (the endpoint cables are `endpoints`), as the paper's Table 3 does.
The paper states only totals; its prices are not published, so `PRICE_MODELS` holds price models derived from its
totals, each saying how (docs/comms.md compares them with the paper per topology).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TABLE3_RADIX = 64  # 64-port 400G InfiniBand switch (Insights §5.1)
TABLE3_PLANES = 8  # one plane per GPU-NIC pair of an 8-GPU node


class TopologyError(ValueError):
    """Bad topology parameters; the message names the parameter and what was expected."""


@dataclass(frozen=True)
class PriceModel:
    """Prices in US$: per switch, per switch-to-switch link (cable with its transceivers) and per endpoint link."""

    name: str
    switch_usd: float
    link_usd: float
    endpoint_link_usd: float
    source: str


# The paper gives totals only (Table 3, in M$ rounded to 1 M$). Two ways to get prices from them:
PRICE_MODELS = {
    # Two prices solved exactly from two columns: FT2 (96 switches, 2,048 links, 9 M$) and FT3 (5,120 switches,
    # 131,072 links, 491 M$): switch = 85e6 / 1024, link = (9e6 - 96 switch) / 2048. MPFT follows (8 x FT2), SF and
    # DF are predictions of the model.
    "two-column": PriceModel("two-column", 85e6 / 1024, 1_031_250 / 2048, 0.0,
                             "switch and link prices solved from Table 3's FT2 and FT3 totals (9 and 491 M$)"),
    # Three prices (switch, switch-to-switch link, endpoint link) fitted by least squares on the relative error of
    # all five totals (9, 72, 491, 146, 1522 M$); no non-negative price triple fits all five within their rounding
    # (+-0.5 M$), so the paper's method is not a linear price model of these counts.
    "five-column-fit": PriceModel("five-column-fit", 10_761.06, 2_729.39, 1_167.81,
                                  "least-squares fit of switch, link and endpoint-link prices to all five Table 3 "
                                  "totals (relative error)"),
}
DEFAULT_PRICES = "two-column"


@dataclass(frozen=True)
class Topology:
    """Counts of one network; `params` are its construction parameters (radix k, planes, q, p/a/h/g)."""

    name: str
    endpoints: int
    switches: int
    links: int  # switch-to-switch links
    radix: int  # ports per switch the construction uses
    params: tuple[tuple[str, int], ...]

    def cost_usd(self, prices: PriceModel) -> float:
        """Switches, switch-to-switch links and endpoint links at `prices`."""
        return (self.switches * prices.switch_usd + self.links * prices.link_usd
                + self.endpoints * prices.endpoint_link_usd)

    def cost_per_endpoint_usd(self, prices: PriceModel) -> float:
        return self.cost_usd(prices) / self.endpoints


def check_radix(k: int) -> None:
    """Raise TopologyError unless k is an even switch radix >= 2."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2:
        raise TopologyError(f"k: expected an even switch radix >= 2, got {k!r}")


def check_positive(name: str, value: int) -> None:
    """Raise TopologyError unless `value` is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TopologyError(f"{name}: expected a positive integer, got {value!r}")


def fat_tree2(k: int) -> Topology:
    """Two-layer fat-tree of radix k: k^2/2 endpoints, 3k/2 switches, k^2/2 leaf-spine links."""
    check_radix(k)
    return Topology("FT2", k * k // 2, k + k // 2, k * k // 2, k, (("k", k),))


def multi_plane(k: int, planes: int) -> Topology:
    """`planes` independent FT2 planes of radix k (each node's NIC i on plane i)."""
    check_positive("planes", planes)
    one = fat_tree2(k)
    return Topology("MPFT", planes * one.endpoints, planes * one.switches, planes * one.links, k,
                    (("k", k), ("planes", planes)))


def multi_rail(k: int, rails: int) -> Topology:
    """One FT2 of radix k whose k leaves form `rails` rails (k/rails leaves each); NIC r of a node goes to rail r.
    Counts equal FT2's: a multi-rail fat-tree differs in wiring, not in equipment."""
    check_radix(k)
    check_positive("rails", rails)
    if k % rails:
        raise TopologyError(f"rails: expected a divisor of the radix {k} (leaves split evenly), got {rails}")
    one = fat_tree2(k)
    return Topology("MRFT", one.endpoints, one.switches, one.links, k, (("k", k), ("rails", rails)))


def fat_tree3(k: int) -> Topology:
    """Three-layer fat-tree of radix k: k^3/4 endpoints, 5k^2/4 switches, k^3/2 switch-to-switch links."""
    check_radix(k)
    return Topology("FT3", k ** 3 // 4, 5 * k * k // 4, k ** 3 // 2, k, (("k", k),))


def slim_fly_delta(q: int) -> int:
    """delta of q = 4w + delta, delta in {-1, 0, 1} (q odd or a multiple of 4; q = 4w + 2 has none)."""
    check_positive("q", q)
    delta = {0: 0, 1: 1, 3: -1}.get(q % 4)
    if delta is None or q < 3:
        raise TopologyError(f"q: expected q = 4w + delta with delta in {{-1, 0, 1}} and q >= 3, got {q}")
    return delta


def is_prime_power(n: int) -> bool:
    """Whether n = p^m for a prime p and m >= 1 (the MMS graph exists only for such q)."""
    if n < 2:
        return False
    p = next(d for d in range(2, n + 1) if n % d == 0)  # the smallest prime factor
    while n % p == 0:
        n //= p
    return n == 1


def slim_fly(q: int, endpoints_per_switch: int | None = None) -> Topology:
    """Slim Fly (MMS graph) of parameter q: 2q^2 switches of network degree k' = (3q - delta)/2, p endpoints per
    switch (default ceil(k'/2)), 2q^2 k'/2 links. The counts follow the formulas for any q = 4w + delta; the graph
    itself exists only for prime powers q (`is_prime_power`)."""
    delta = slim_fly_delta(q)
    degree = (3 * q - delta) // 2
    p = math.ceil(degree / 2) if endpoints_per_switch is None else endpoints_per_switch
    check_positive("endpoints_per_switch", p)
    switches = 2 * q * q
    return Topology("SF", switches * p, switches, switches * degree // 2, degree + p,
                    (("q", q), ("p", p), ("network_degree", degree)))


def dragonfly(p: int, a: int, h: int, g: int | None = None) -> Topology:
    """Canonical Dragonfly: g groups (default and at most a h + 1) of a routers, each with p endpoints, a - 1 local
    links and h global links. Every global port is cabled (g a h / 2 global links; below the maximum g some pairs of
    groups get parallel links), plus g a (a - 1) / 2 local links."""
    for name, value in (("p", p), ("a", a), ("h", h)):
        check_positive(name, value)
    groups = a * h + 1 if g is None else g
    check_positive("g", groups)
    if not 2 <= groups <= a * h + 1:
        raise TopologyError(f"g: expected 2 <= g <= a h + 1 = {a * h + 1} (one global link per pair of groups at "
                            f"least), got {groups}")
    if groups * a * h % 2:
        raise TopologyError(f"g: g a h must be even (global ports are paired), got {groups} x {a} x {h}")
    links = groups * a * (a - 1) // 2 + groups * a * h // 2
    return Topology("DF", p * a * groups, a * groups, links, p + a - 1 + h,
                    (("p", p), ("a", a), ("h", h), ("g", groups)))


def table3_topologies(k: int = TABLE3_RADIX, planes: int = TABLE3_PLANES) -> tuple[Topology, ...]:
    """The five networks of the paper's Table 3 at radix 64: FT2, MPFT (8 planes), FT3, SF (q = 28, radix 63) and
    DF (p = 16, a = 32, h = 16, g = 511, radix 63), plus MRFT (8 rails) for the comparison with MPFT."""
    return (fat_tree2(k), multi_plane(k, planes), fat_tree3(k), slim_fly(28), dragonfly(16, 32, 16, 511),
            multi_rail(k, planes))
