"""Human-readable views of a dependency graph: a table, a networkx graph, and DOT."""
from __future__ import annotations

import networkx as nx

__all__ = ["summary_table", "group_networkx", "to_dot", "group_shares"]


def group_shares(graph) -> dict[str, tuple[float, float]]:
    """Share of the model's params and MACs that each group's units account for
    (the drop if the whole group were removed)."""
    cm = graph.cost
    p0, m0 = cm.params(), cm.macs()
    out = {}
    for g in graph.groups:
        out[g.id] = ((p0 - cm.params({g.id: 0})) / max(p0, 1), (m0 - cm.macs({g.id: 0})) / max(m0, 1))
    return out


def summary_table(graph, max_rows: int | None = None) -> str:
    """A fixed-width table: group, units, kind, members, exactness, share of params and MACs,
    followed by the barriers."""
    shares = group_shares(graph)
    rows = [("group", "units", "kind", "members", "exact", "params%", "MACs%")]
    for g in graph.groups[:max_rows]:
        p, m = shares[g.id]
        rows.append((g.id, str(g.size), g.unit_kind, str(len(g.members)),
                     "yes" if g.exact else "approx", f"{100 * p:.2f}", f"{100 * m:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    if max_rows is not None and len(graph.groups) > max_rows:
        lines.append(f"... {len(graph.groups) - max_rows} more groups")
    total = sum(g.size for g in graph.groups)
    lines.append(f"{len(graph.groups)} groups, {total} prunable units; "
                 f"params {graph.cost.params():,}, MACs {graph.cost.macs():,}")
    if graph.barriers:
        lines.append(f"{len(graph.barriers)} barriers (ops without a channel rule; their channels are frozen):")
        lines.extend(f"  - {b}" for b in graph.barriers)
    return "\n".join(lines)


def group_networkx(graph) -> nx.Graph:
    """A bipartite networkx graph: one node per group and one per parameter, an edge for each
    parameter dim that holds the group's units (edge attributes: dim, role)."""
    G = nx.Graph()
    for g in graph.groups:
        G.add_node(g.id, kind="group", size=g.size, unit_kind=g.unit_kind, exact=g.exact)
        for m in g.members:
            G.add_node(m.name, kind="buffer" if m.is_buffer else "param")
            G.add_edge(g.id, m.name, dim=m.dim, role=m.role)
    return G


def to_dot(graph) -> str:
    """Graphviz DOT text of :func:`group_networkx` (groups as boxes, parameters as ellipses)."""
    def q(s: str) -> str:
        return '"' + s.replace('"', r'\"') + '"'
    out = ["graph etp_fx {", "  rankdir=LR;", "  node [fontsize=10];"]
    G = group_networkx(graph)
    for n, d in G.nodes(data=True):
        if d["kind"] == "group":
            color = "palegreen" if d["exact"] else "khaki"
            label = q(n + "\\n" + f"{d['size']} {d['unit_kind']}s")
            out.append(f"  {q(n)} [shape=box, style=filled, fillcolor={color}, label={label}];")
        else:
            out.append(f"  {q(n)} [shape=ellipse];")
    for a, b, d in G.edges(data=True):
        label = q(f"{d['role']}[{d['dim']}]")
        out.append(f"  {q(a)} -- {q(b)} [label={label}];")
    out.append("}")
    return "\n".join(out)
