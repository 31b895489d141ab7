"""Human-readable views of a dependency graph: a table, a JSON-ready dict, a networkx graph, DOT.

Pictures that need no Graphviz binary (SVG, self-contained HTML) are in :mod:`etp_fx.render`.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import networkx as nx

__all__ = ["summary_table", "group_networkx", "to_dot", "group_shares", "short_reason", "clean_reason",
           "graph_to_dict"]


def group_shares(graph) -> dict[str, tuple[float, float]]:
    """Share of the model's params and MACs that each group's units account for
    (the drop if the whole group were removed)."""
    cm = graph.cost
    p0, m0 = cm.params(), cm.macs()
    out = {}
    for g in graph.groups:
        out[g.id] = ((p0 - cm.params({g.id: 0})) / max(p0, 1), (m0 - cm.macs({g.id: 0})) / max(m0, 1))
    return out


# ``node.format_node()`` text inside a reason: ``%name : [num_users=1] = call_function[...](...)``
_NODE = re.compile(r"%(\w+) : \[num_users=\d+\] = \w+\[target=.*?\]\(args = .*?, kwargs = \{.*?\}\)",
                   re.S)
_WHERE = re.compile(r"\s+at\s+%\w+$")


def clean_reason(reason: str) -> str:
    """A reason with each node's full text shortened to its name (``%layer_norm_3``)."""
    return _NODE.sub(r"%\1", reason).strip()


def short_reason(reasons: list[str], width: int | None = None) -> str:
    """One line for a list of reasons: without the node they were found at, deduplicated, with a
    count where a reason repeats (``layer_norm normalises over this dim (x25)``)."""
    counts = Counter(_WHERE.sub("", clean_reason(r)) for r in reasons)
    text = "; ".join(r if n == 1 else f"{r} (x{n})" for r, n in counts.items())
    if width is not None and len(text) > width:
        text = text[:max(width - 3, 0)] + "..."
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_table(graph, max_rows: int | None = None, *, why_width: int = 48) -> str:
    """A fixed-width table: group, units, kind, members, exactness, share of params and MACs
    (and, when some group is approximate, a short reason why), followed by the barriers."""
    shares = group_shares(graph)
    inexact = any(not g.exact for g in graph.groups)
    head = ("group", "units", "kind", "members", "exact", "params%", "MACs%") + (("why",) if inexact else ())
    rows = [head]
    for g in graph.groups[:max_rows]:
        p, m = shares[g.id]
        row = (g.id, str(g.size), g.unit_kind, str(len(g.members)),
               "yes" if g.exact else "approx", f"{100 * p:.2f}", f"{100 * m:.2f}")
        if inexact:
            row += (short_reason(g.inexact_reasons, why_width) if not g.exact else "",)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    left = {0, len(head) - 1} if inexact else {0}
    lines = ["  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))).rstrip() for r in rows]
    lines.insert(1, "-" * max(len(x) for x in lines))
    if max_rows is not None and len(graph.groups) > max_rows:
        lines.append(f"... {len(graph.groups) - max_rows} more groups")
    total = sum(g.size for g in graph.groups)
    n_approx = sum(not g.exact for g in graph.groups)
    lines.append(f"{_plural(len(graph.groups), 'group')} ({n_approx} approximate), "
                 f"{_plural(total, 'prunable unit')}; "
                 f"params {graph.cost.params():,}, MACs {graph.cost.macs():,}")
    if graph.barriers:
        lines.append(f"{_plural(len(graph.barriers), 'barrier')} "
                     f"(ops without a channel rule; their channels are frozen):")
        lines.extend(f"  - {b}" for b in graph.barriers)
    else:
        lines.append("no barriers")
    return "\n".join(lines)


def graph_to_dict(graph) -> dict[str, Any]:
    """Everything :func:`summary_table` shows, as plain JSON-ready data (``etp-fx inspect
    --json``): the model's totals, each group with its members, the barriers, frozen dims."""
    shares = group_shares(graph)
    groups = []
    for g in graph.groups:
        p, m = shares[g.id]
        groups.append({
            "id": g.id, "units": g.size, "unit_kind": g.unit_kind, "exact": g.exact,
            "inexact_reasons": [clean_reason(r) for r in g.inexact_reasons],
            "params_share": p, "macs_share": m,
            "members": [{"name": mb.name, "dim": mb.dim, "role": mb.role,
                         "roles": sorted(mb.roles), "is_buffer": mb.is_buffer,
                         "indices": sum(c >= 0 for c in mb.coords), "length": len(mb.coords)}
                        for mb in g.members],
        })
    return {
        "params": graph.cost.params(), "macs": graph.cost.macs(),
        "units": sum(g.size for g in graph.groups),
        "groups": groups,
        "barriers": list(graph.barriers),
        "frozen": {k: [clean_reason(r) for r in v] for k, v in graph.frozen_reasons.items()},
    }


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
    """Graphviz DOT text of :func:`group_networkx` (groups as boxes, parameters as ellipses).

    For a picture without the Graphviz binary see :func:`etp_fx.render.write_svg`."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', r'\"') + '"'
    out = ["graph etp_fx {", "  rankdir=LR;", "  node [fontsize=10];"]
    G = group_networkx(graph)
    for n, d in G.nodes(data=True):
        if d["kind"] == "group":
            color = "palegreen" if d["exact"] else "khaki"
            label = '"' + n.replace("\\", "\\\\").replace('"', r'\"') + "\\n" + f"{d['size']} {d['unit_kind']}s" + '"'
            out.append(f"  {q(n)} [shape=box, style=filled, fillcolor={color}, label={label}];")
        else:
            out.append(f"  {q(n)} [shape=ellipse];")
    for a, b, d in G.edges(data=True):
        label = q(f"{d['role']}[{d['dim']}]")
        out.append(f"  {q(a)} -- {q(b)} [label={label}];")
    out.append("}")
    return "\n".join(out)
