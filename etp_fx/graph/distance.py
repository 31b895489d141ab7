"""Pivots and distances of units: multi-source shortest paths in networkx graphs.

ETP pushes a unit towards zero with a force that grows with its *distance* from the *pivots*
(the units that should survive). The paper's choice is a chain ``0 - 1 - ... - C-1`` with pivot
0, so the distance of unit ``i`` is ``i``. Here a distance is always a shortest-path length in a
``networkx`` graph over the units of one group, measured from a set of pivots, so other
topologies drop in:

- :func:`index_graph`: the paper's chain by index, pivot 0;
- :func:`importance_graph`: the chain ordered by importance (norm at construction time), the
  pivots being the most important units; the order is fixed afterwards;
- any graph the user builds (nodes ``0 .. n-1``, optional ``weight`` on edges).

Attention heads need no special graph: groups whose ``unit_kind`` is ``"head"`` already have
one unit per head, so the chain runs over heads.

A second, coarser level scales whole groups: :func:`group_graph` joins two groups when they
share a parameter, and :func:`group_distances` gives each group's hop distance from pivot
groups (for example the stem or the head of the network).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np

from ..errors import DistanceError

__all__ = [
    "DistanceError", "chain_graph", "index_graph", "importance_graph", "multi_source_distances",
    "check_pivots", "group_graph", "group_distances", "BUILTIN",
]



def chain_graph(n: int, order: Sequence[int] | None = None) -> nx.Graph:
    """A path over units ``0 .. n-1``, visiting them in ``order`` (default: by index)."""
    order = list(range(n)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(n)):
        raise DistanceError(f"order must be a permutation of 0..{n - 1}")
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(zip(order[:-1], order[1:]))
    return G


def index_graph(unit_set: Any, norms: np.ndarray | None = None) -> tuple[nx.Graph, list[int]]:
    """The paper's topology: the chain by index, pivot 0 (distance of unit ``i`` is ``i``)."""
    return chain_graph(unit_set.size), [0]


def importance_graph(unit_set: Any, norms: np.ndarray | None, k: int = 1
                     ) -> tuple[nx.Graph, list[int]]:
    """The chain ordered by decreasing norm; the ``k`` most important units are pivots.

    Ties keep index order (a stable sort), so all-equal norms give the paper's chain."""
    if norms is None:
        raise DistanceError(
            f"group {unit_set.id}: distance='importance' needs the weights' values at "
            f"construction (the model was traced on the meta device?): pass model=")
    order = np.argsort(-np.asarray(norms, dtype=np.float64), kind="stable").tolist()
    return chain_graph(unit_set.size, order), order[:max(1, int(k))]


BUILTIN: dict[str, Callable] = {"index": index_graph, "importance": importance_graph}


def check_pivots(pivots: Iterable[int], n: int, where: str) -> list[int]:
    """Pivots as non-negative indices; negative ones count from the end, as in Python."""
    out = []
    for p in pivots:
        if isinstance(p, bool) or not isinstance(p, (int, np.integer)):
            raise DistanceError(f"{where}: pivots must be integer unit indices, got {p!r}")
        if not -n <= int(p) < n:
            raise DistanceError(f"{where}: pivot {int(p)} is out of range: the group has {n} "
                                f"units (valid pivots are 0..{n - 1}, or -{n}..-1 from the end)")
        out.append(int(p) % n)
    if not out:
        raise DistanceError(f"{where}: at least one pivot is needed")
    return sorted(set(out))


def multi_source_distances(G: nx.Graph, pivots: Sequence[int], n: int, where: str = "unit graph"
                           ) -> np.ndarray:
    """Shortest-path length of every unit ``0 .. n-1`` from the nearest pivot.

    Edges may carry a non-negative ``weight`` (default 1). Units no pivot reaches get the
    largest finite distance plus one, so they are pushed hardest."""
    if G.number_of_nodes() == 0:
        raise DistanceError(f"{where}: the unit graph is empty (it has no nodes); a group of "
                            f"{n} units needs a graph over nodes 0..{n - 1}")
    nodes = set(G.nodes)
    if nodes != set(range(n)):
        extra = sorted(nodes - set(range(n)), key=str)[:3]
        missing = sorted(set(range(n)) - nodes)[:3]
        raise DistanceError(f"{where}: the unit graph must have exactly the nodes 0..{n - 1}"
                            + (f"; unknown nodes {extra}" if extra else "")
                            + (f"; missing nodes {missing}" if missing else ""))
    pivots = check_pivots(pivots, n, where)
    if nx.is_weighted(G):
        if any(w < 0 for _, _, w in G.edges(data="weight", default=1)):
            raise DistanceError(f"{where}: edge weights must be non-negative")
        lengths = nx.multi_source_dijkstra_path_length(G, pivots)
    else:  # breadth-first search: hop counts
        lengths = {}
        frontier, d = list(pivots), 0
        for p in pivots:
            lengths[p] = 0
        while frontier:
            d += 1
            nxt = []
            for u in frontier:
                for v in G.adj[u]:
                    if v not in lengths:
                        lengths[v] = d
                        nxt.append(v)
            frontier = nxt
    out = np.full(n, np.nan)
    for u, d in lengths.items():
        out[u] = d
    if np.isnan(out).any():
        out[np.isnan(out)] = np.nanmax(out) + 1
    return out


# --- groups ------------------------------------------------------------------------------------

def group_graph(graph, groups: Iterable[Any] | None = None) -> nx.Graph:
    """Groups as nodes, joined when they share a parameter (buffers do not count).

    In a ResNet the stem group shares ``layer1.0.conv1.weight`` with the group of that conv's
    outputs, and so on down the network: hop distance is depth in the coupling structure."""
    groups = list(graph.groups if groups is None else groups)
    G = nx.Graph()
    owners: dict[str, list[str]] = {}
    for g in groups:
        G.add_node(g.id, size=g.size, unit_kind=g.unit_kind)
        for m in g.members:
            if not m.is_buffer:
                owners.setdefault(m.name, []).append(g.id)
    for name, ids in owners.items():
        G.add_edges_from(itertools.combinations(dict.fromkeys(ids), 2), param=name)
    return G


def _resolve_group_pivots(graph, pivots: Any, G: nx.Graph) -> list[str]:
    ids = list(G.nodes)
    if not ids:
        raise DistanceError("the group graph is empty: the model has no prunable groups")
    params = [n for n, _ in graph.signature] or sorted(graph.param_names)
    if isinstance(pivots, str) and pivots in ("stem", "head"):
        # the first (or last) parameter of the model in order that belongs to some group
        order = params if pivots == "stem" else params[::-1]
        for name in order:
            hit = [g.id for g in graph.groups if g.id in G and
                   any(m.name == name and not m.is_buffer for m in g.members)]
            if hit:
                return hit
        raise DistanceError(f"no group holds a parameter to serve as the {pivots}")
    if isinstance(pivots, str):
        pivots = [pivots]
    out: list[str] = []
    for p in pivots:
        if p in G:
            out.append(p)
            continue
        # a module or parameter name: every group with a member under it
        hit = [g.id for g in graph.groups if g.id in G and any(
            m.name == p or m.name.startswith(p + ".") for m in g.members if not m.is_buffer)]
        if not hit:
            raise DistanceError(f"group pivot {p!r} is neither a group id nor a module holding "
                                f"a group's parameter; group ids: {ids[:4]}...")
        out.extend(hit)
    return list(dict.fromkeys(out))


def group_distances(graph, pivots: Any = "stem", groups: Iterable[Any] | None = None
                    ) -> dict[str, float]:
    """Hop distance of each group from the pivot groups in :func:`group_graph`.

    ``pivots``: ``"stem"`` (the groups of the model's first parameter), ``"head"`` (of its last),
    or a list of group ids and module/parameter names."""
    G = group_graph(graph, groups)
    piv = _resolve_group_pivots(graph, pivots, G)
    index = {gid: i for i, gid in enumerate(G.nodes)}
    H = nx.relabel_nodes(G, index)
    d = multi_source_distances(H, [index[p] for p in piv], len(index), "group graph")
    return {gid: float(d[i]) for gid, i in index.items()}


def resolve_unit_graph(spec: Any, unit_set: Any, norms: np.ndarray | None
                       ) -> tuple[nx.Graph, list[int] | None]:
    """Turn a ``distance=`` argument into (graph, default pivots) for one unit set."""
    if isinstance(spec, str):
        if spec not in BUILTIN:
            raise DistanceError(f"unknown distance {spec!r}; use one of {sorted(BUILTIN)}, a "
                                f"dict of networkx graphs by group id, or a callable")
        return BUILTIN[spec](unit_set, norms)
    if isinstance(spec, Mapping):
        G = spec.get(unit_set.id)
        if G is None:
            return index_graph(unit_set, norms)
        return G, None
    if isinstance(spec, nx.Graph):
        return spec, None
    if callable(spec):
        r = spec(unit_set, norms)
        if isinstance(r, tuple):
            return r[0], (list(r[1]) if r[1] is not None else None)
        return r, None
    raise DistanceError(f"distance must be 'index', 'importance', a networkx graph, a dict of "
                        f"graphs by group id, or a callable; got {type(spec).__name__}")
