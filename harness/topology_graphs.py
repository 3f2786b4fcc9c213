"""Explicit graphs (networkx) of the topologies at small parameters, to verify their structure: counts against
`dsv3ref.comms.topology`, hop counts, path diversity, bisection and which GPU pairs need intra-node forwarding.

Vertices: endpoints ("gpu", node, index) and switches (("leaf", plane, i), ("spine", plane, j), ...); every edge
has `kind` "endpoint" (GPU-switch cable), "network" (switch-switch link) or "nvlink" (scale-up, within a node, only
with `nvlink=True`). The builders are for small radix: real sizes use the counts in `topology.py`.
"""

from __future__ import annotations

import itertools

import networkx as nx

from dsv3ref.comms.topology import TopologyError, check_positive, check_radix, slim_fly_delta

Vertex = tuple


def _nvlink(graph: nx.Graph, nodes: int, gpus: int) -> None:
    for n in range(nodes):
        for i, j in itertools.combinations(range(gpus), 2):
            graph.add_edge(("gpu", n, i), ("gpu", n, j), kind="nvlink")


def _two_layer(graph: nx.Graph, k: int, plane: int, leaf_of: dict[Vertex, int]) -> None:
    """One FT2 plane: k leaves, k/2 spines, each leaf linked to every spine; `leaf_of` maps endpoints to leaves."""
    for leaf, spine in itertools.product(range(k), range(k // 2)):
        graph.add_edge(("leaf", plane, leaf), ("spine", plane, spine), kind="network")
    for gpu, leaf in leaf_of.items():
        graph.add_edge(gpu, ("leaf", plane, leaf), kind="endpoint")


def multi_plane_graph(k: int, planes: int, nvlink: bool = False) -> nx.Graph:
    """MPFT: `planes` FT2 planes of radix k; k^2/2 nodes of `planes` GPUs, GPU i of node n on leaf n // (k/2) of
    plane i (planes = 1 is FT2)."""
    check_radix(k)
    check_positive("planes", planes)
    graph = nx.Graph()
    nodes = k * k // 2
    for plane in range(planes):
        _two_layer(graph, k, plane, {("gpu", n, plane): n // (k // 2) for n in range(nodes)})
    if nvlink:
        _nvlink(graph, nodes, planes)
    return graph


def multi_rail_graph(k: int, rails: int, nvlink: bool = False) -> nx.Graph:
    """MRFT: one FT2 of radix k whose leaves form `rails` rails of k/rails leaves; (k^2/2)/rails nodes of `rails`
    GPUs, GPU r of node n on leaf r (k/rails) + n // (k/2) of rail r."""
    check_radix(k)
    check_positive("rails", rails)
    if k % rails:
        raise TopologyError(f"rails: expected a divisor of the radix {k}, got {rails}")
    graph = nx.Graph()
    nodes = k * k // 2 // rails
    per_rail = k // rails
    _two_layer(graph, k, 0, {("gpu", n, r): r * per_rail + n // (k // 2) for n in range(nodes) for r in range(rails)})
    if nvlink:
        _nvlink(graph, nodes, rails)
    return graph


def fat_tree3_graph(k: int) -> nx.Graph:
    """FT3 of radix k: pods of k/2 edge and k/2 aggregation switches, (k/2)^2 cores; GPU ("gpu", e, i) is endpoint
    i of edge switch e (one GPU per node)."""
    check_radix(k)
    half = k // 2
    graph = nx.Graph()
    for pod in range(k):
        for e, a in itertools.product(range(half), range(half)):
            graph.add_edge(("edge", pod, e), ("agg", pod, a), kind="network")
        for a, c in itertools.product(range(half), range(half)):
            graph.add_edge(("agg", pod, a), ("core", a, c), kind="network")
        for e, i in itertools.product(range(half), range(half)):
            graph.add_edge(("gpu", pod * half + e, i), ("edge", pod, e), kind="endpoint")
    return graph


def _primitive_root(q: int) -> int:
    factors = {d for d in range(2, q) if (q - 1) % d == 0 and all(d % f for f in range(2, d))}
    return next(x for x in range(2, q) if all(pow(x, (q - 1) // f, q) != 1 for f in factors))


def mms_generators(q: int) -> tuple[set[int], set[int]]:
    """The generator sets X, X' of the MMS graph over the prime field F_q (Slim Fly's construction)."""
    if q < 3 or any(q % d == 0 for d in range(2, int(q ** 0.5) + 1)):
        raise TopologyError(f"q: the graph builder needs an odd prime q (prime powers need GF(q) arithmetic), got {q}")
    delta, xi = slim_fly_delta(q), _primitive_root(q)
    power = [pow(xi, e, q) for e in range(q - 1)]
    if delta == 1:
        return {power[e] for e in range(0, q - 1, 2)}, {power[e] for e in range(1, q - 1, 2)}
    w = (q + 1) // 4
    x = {power[e] for e in range(0, 2 * w - 1, 2)} | {power[e] for e in range(2 * w - 1, 4 * w - 2, 2)}
    x_prime = {power[e] for e in range(1, 2 * w, 2)} | {power[e % (q - 1)] for e in range(2 * w, 4 * w - 1, 2)}
    return x, x_prime


def slim_fly_graph(q: int, endpoints_per_switch: int | None = None) -> nx.Graph:
    """Slim Fly on the MMS graph of prime q: switches (s, x, y) for s in {0, 1}, x, y in F_q; (0, x, y) ~ (0, x, y')
    iff y - y' in X, (1, m, c) ~ (1, m, c') iff c - c' in X', (0, x, y) ~ (1, m, c) iff y = m x + c; p endpoints
    per switch (default ceil(degree / 2)), GPU ("gpu", switch number, i)."""
    x_set, x_prime = mms_generators(q)
    graph = nx.Graph()
    field = range(q)
    for a, b in itertools.product(field, field):
        for c in field:
            if (b - c) % q in x_set:
                graph.add_edge(("sw", 0, a, b), ("sw", 0, a, c), kind="network")
            if (b - c) % q in x_prime:
                graph.add_edge(("sw", 1, a, b), ("sw", 1, a, c), kind="network")
            graph.add_edge(("sw", 0, a, (b * a + c) % q), ("sw", 1, b, c), kind="network")
    degree = (3 * q - slim_fly_delta(q)) // 2
    p = -(-degree // 2) if endpoints_per_switch is None else endpoints_per_switch
    for n, switch in enumerate(sorted(v for v in graph if v[0] == "sw")):
        for i in range(p):
            graph.add_edge(("gpu", n, i), switch, kind="endpoint")
    return graph


def dragonfly_graph(p: int, a: int, h: int) -> nx.Graph:
    """Canonical Dragonfly with the maximum g = a h + 1 groups: routers of a group all-to-all; group i reaches group
    t over its global port t (t < i) or t - 1 (t > i), port m on router m // h (one link per pair of groups)."""
    for name, value in (("p", p), ("a", a), ("h", h)):
        check_positive(name, value)
    groups = a * h + 1
    graph = nx.Graph()
    for grp in range(groups):
        for r1, r2 in itertools.combinations(range(a), 2):
            graph.add_edge(("rt", grp, r1), ("rt", grp, r2), kind="network")
        for r, i in itertools.product(range(a), range(p)):
            graph.add_edge(("gpu", grp * a + r, i), ("rt", grp, r), kind="endpoint")
    for g1, g2 in itertools.combinations(range(groups), 2):
        port1, port2 = g2 - 1, g1  # g1 < g2: g1 uses port g2 - 1, g2 uses port g1
        graph.add_edge(("rt", g1, port1 // h), ("rt", g2, port2 // h), kind="network")
    return graph


# --- structure ---------------------------------------------------------------------------------------------------
def endpoints(graph: nx.Graph) -> list[Vertex]:
    return sorted(v for v in graph if v[0] == "gpu")


def counts(graph: nx.Graph) -> tuple[int, int, int]:
    """(endpoints, switches, switch-to-switch links) of a graph."""
    gpus = len(endpoints(graph))
    network = sum(1 for *_, kind in graph.edges(data="kind") if kind == "network")
    return gpus, graph.number_of_nodes() - gpus, network


def scale_out(graph: nx.Graph) -> nx.Graph:
    """The graph without its NVLink edges (the network alone)."""
    return graph.edge_subgraph((u, v) for u, v, kind in graph.edges(data="kind") if kind != "nvlink")


def hops(graph: nx.Graph, a: Vertex, b: Vertex) -> int:
    """Links on a shortest path between two endpoints."""
    return nx.shortest_path_length(graph, a, b)


def minimal_paths(graph: nx.Graph, a: Vertex, b: Vertex) -> int:
    """Number of distinct shortest paths between two endpoints (path diversity)."""
    return sum(1 for _ in nx.all_shortest_paths(graph, a, b))


def bisection_links(graph: nx.Graph, half: list[Vertex], other: list[Vertex]) -> int:
    """Maximum flow in links (unit capacity, both directions) from the endpoints `half` to `other`: the bisection
    bandwidth of that split; len(half) means full bisection."""
    flow = nx.DiGraph()
    for u, v in scale_out(graph).edges:
        flow.add_edge(u, v, capacity=1)
        flow.add_edge(v, u, capacity=1)
    for v in half:
        flow.add_edge("source", v, capacity=len(half))
    for v in other:
        flow.add_edge(v, "sink", capacity=len(other))
    return nx.maximum_flow_value(flow, "source", "sink")


def forwarding_pairs(graph: nx.Graph) -> set[tuple[Vertex, Vertex]]:
    """Pairs of endpoints on different nodes that the network alone does not connect: their traffic must first
    cross NVLink inside a node (in MPFT, the GPUs of different planes)."""
    components = {v: i for i, comp in enumerate(nx.connected_components(scale_out(graph))) for v in comp}
    return {(a, b) for a, b in itertools.combinations(endpoints(graph), 2)
            if a[1] != b[1] and components[a] != components[b]}
