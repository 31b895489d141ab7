"""Pictures of the coupled-channel groups that need no Graphviz binary: SVG and one-file HTML.

The picture draws :meth:`DependencyGraph.to_networkx` (groups and the parameters that hold their
units) as a *lane diagram*, which stays readable for models with hundreds of parameters:

* one **row** per parameter-owning module (``layer1.0.conv1``: weight, bias), in the order the
  graph first uses them; a row that holds no prunable units is greyed out;
* one vertical **lane** per group, from the first to the last row holding its units; lanes are
  reused down the picture when groups do not overlap. A marker where a lane meets a row says
  what the module does with the units: filled circle = writes them (``out``: conv filters,
  Linear rows), hollow circle = reads them (``in``), square = per-unit vector (BatchNorm affine
  and statistics, biases), diamond = elementwise operand;
* one **box** per group on the right, joined to the top of its lane: green when removing zeroed
  units is exact, yellow when approximate (a LayerNorm or softmax over the units). The bar in
  the box has one cell per unit; units in ``removed`` are red there.

``write_html`` wraps the same SVG in a self-contained page (inline CSS and JS, nothing fetched)
with a sortable table of the groups, a search box, and linked hover highlighting.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .graph.describe import group_shares, short_reason
from .graph.plan import check_plan

__all__ = ["render_svg", "render_html", "write_svg", "write_html"]

FONT = 11                # px, monospace
CHAR_W = FONT * 0.61     # advance of one monospace character
ROW_H = 18
LANE_W = 13
BOX_H = 32
BOX_GAP = 3
BAR_W = 150
TOP = 78                 # y of the first row

EXACT = {"fill": "#d5efd6", "line": "#2e7d32", "bar": "#7cc47f"}
APPROX = {"fill": "#fff3b0", "line": "#b8860b", "bar": "#f2c94c"}
REMOVED = "#d32f2f"
ROLE_ORDER = ("out", "in", "affine", "bias", "stat", "elementwise", "other")


# --- layout ------------------------------------------------------------------------------------

@dataclass
class _Row:
    index: int
    owner: str
    params: list[tuple[str, tuple[int, ...], bool]] = field(default_factory=list)  # short, shape, buffer
    links: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)     # gid -> (param, dim, role)

    @property
    def frozen(self) -> bool:
        return not self.links

    def suffix(self) -> str:
        shown = [(s, shp) for s, shp, buf in self.params if not buf] or \
                [(s, shp) for s, shp, _ in self.params]
        return " ".join(f"{s}[{','.join(map(str, shp))}]" if s else f"[{','.join(map(str, shp))}]"
                        for s, shp in shown[:3]) + (" ..." if len(shown) > 3 else "")


@dataclass
class _Group:
    index: int
    grp: Any
    rows: dict[int, str]            # row index -> strongest role
    r0: int = 0
    r1: int = 0
    lane: int = 0
    box_y: float = 0.0
    removed: list[int] = field(default_factory=list)
    share: tuple[float, float] = (0.0, 0.0)


def _owner(name: str) -> tuple[str, str]:
    owner, _, short = name.rpartition(".")
    return (owner, short) if owner else (name, "")


def _check_removed(graph, removed: Mapping[str, Iterable[int]] | None) -> dict[str, list[int]]:
    return check_plan(graph, removed or {}, allow_all=True)


def _layout(graph, removed_: dict[str, list[int]], shares: dict[str, tuple[float, float]]):
    G = graph.to_networkx()
    gm = graph.module
    tensors = {n: (tuple(t.shape), False) for n, t in gm.named_parameters()}
    for n, t in gm.named_buffers():
        tensors.setdefault(n, (tuple(t.shape), True))
    # rows: owners in the order the graph first uses their tensors, then any never used
    order: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            for a in node.all_input_nodes:
                if a.op == "get_attr":
                    order.setdefault(_owner(str(a.target))[0], len(order))
    wanted = [n for n, (_, buf) in tensors.items() if not buf or n in G]
    for n in wanted:
        order.setdefault(_owner(n)[0], len(order))
    rows: dict[str, _Row] = {}
    for owner in sorted({_owner(n)[0] for n in wanted}, key=lambda o: order[o]):
        rows[owner] = _Row(len(rows), owner)
    for n in wanted:
        owner, short = _owner(n)
        shape, buf = tensors[n]
        rows[owner].params.append((short, shape, buf))
    groups = []
    for i, grp in enumerate(graph.groups):
        marks: dict[int, str] = {}
        for pname in G.neighbors(grp.id):
            e = G.edges[grp.id, pname]
            row = rows.get(_owner(pname)[0])
            if row is None:
                continue
            row.links.setdefault(grp.id, []).append((pname, e["dim"], e["role"]))
            old = marks.get(row.index)
            if old is None or ROLE_ORDER.index(e["role"]) < ROLE_ORDER.index(old):
                marks[row.index] = e["role"]
        g = _Group(i, grp, marks, removed=removed_.get(grp.id, []), share=shares[grp.id])
        g.r0, g.r1 = (min(marks), max(marks)) if marks else (0, 0)
        groups.append(g)
    # lanes: interval partitioning, first free lane from the left
    ends: list[int] = []
    for g in sorted(groups, key=lambda g: (g.r0, -g.r1)):
        for lane, end in enumerate(ends):
            if end < g.r0:
                g.lane, ends[lane] = lane, g.r1
                break
        else:
            g.lane = len(ends)
            ends.append(g.r1)
    # boxes: next to the top of their lane, pushed down so they never overlap
    bottom = TOP - ROW_H
    for g in sorted(groups, key=lambda g: (g.r0, g.lane)):
        want = _row_y(g.r0) - BOX_H / 2
        g.box_y = max(want, bottom + BOX_GAP)
        bottom = g.box_y + BOX_H
    return list(rows.values()), groups, len(ends)


def _row_y(r: int) -> float:
    return TOP + r * ROW_H + ROW_H / 2


# --- svg ---------------------------------------------------------------------------------------

def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _n(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _kind_plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _marker(role: str, x: float, y: float, color: str) -> str:
    if role == "out":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.2" fill="{color}"/>'
    if role == "in":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.8" fill="#fff" stroke="{color}" stroke-width="1.8"/>'
    if role in ("affine", "bias", "stat"):
        return f'<rect x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6" fill="{color}"/>'
    return (f'<path d="M{x:.1f} {y - 4:.1f}l4 4l-4 4l-4 -4z" fill="#fff" stroke="{color}" '
            f'stroke-width="1.5"/>')


_CSS = """
.etp-fx text{font-family:DejaVu Sans Mono,Menlo,Consolas,monospace;font-size:11px;fill:#222}
.etp-fx .t{font-size:15px;font-weight:bold}.etp-fx .s{fill:#555}.etp-fx .dimt{fill:#888}
.etp-fx .frz{fill:#aaa;font-style:italic}.etp-fx .rm{fill:#d32f2f}.etp-fx .bar text{font-size:10px}
.etp-fx .grp .lane{stroke-width:2.5}.etp-fx .grp .conn{stroke-width:1;opacity:.55;fill:none}
.etp-fx .grp:hover .lane,.etp-fx .grp.hl .lane{stroke-width:5}
.etp-fx .grp:hover .box,.etp-fx .grp.hl .box{stroke-width:2.5}
.etp-fx .grp:hover .conn,.etp-fx .grp.hl .conn{opacity:1;stroke-width:2}
.etp-fx.filtering .grp:not(.match){opacity:.12}
"""


def render_svg(graph, *, removed: Mapping[str, Iterable[int]] | None = None,
               title: str | None = None) -> str:
    """The SVG text of the lane diagram (see the module docstring for how to read it)."""
    return _render_svg(graph, _check_removed(graph, removed), group_shares(graph), title)


@dataclass
class _Canvas:
    """Where things go in the lane diagram: columns, box width, page size."""

    x0: float        # left margin
    lx: float        # left edge of the lanes
    bx: float        # left edge of the boxes
    bw: float        # box width
    width: int
    height: int
    body_bottom: float


_LEGEND_WORDS = ("exact group", "approximate group", "removed unit", "writes (out)",
                 "reads (in)", "per-unit vector", "elementwise")


def _canvas(graph, rows, groups, lanes: int) -> _Canvas:
    label_chars = max([len(r.owner) + len(r.suffix()) + 2 for r in rows] + [20])
    x0 = 10
    lx = x0 + label_chars * CHAR_W + 14
    bx = lx + max(lanes, 1) * LANE_W + 36
    id_chars = max([len(g.grp.id) for g in groups] + [0])
    info_chars = max([len(_info(g)) for g in groups] + [0])
    bw = max(id_chars * CHAR_W, BAR_W + 8 + info_chars * CHAR_W * 10 / 11) + 14
    legend_w = x0 + sum(34 + len(w) * CHAR_W for w in _LEGEND_WORDS) + 10
    body_bottom = max(TOP + len(rows) * ROW_H, max((g.box_y + BOX_H for g in groups), default=0))
    n_bar = len(graph.barriers)
    height = body_bottom + 26 + (18 + 15 * (min(n_bar, 15) + (n_bar > 15)) if n_bar else 0) + 10
    return _Canvas(x0, lx, bx, bw, int(max(bx + bw + 12, legend_w)), int(height), body_bottom)


def _render_svg(graph, removed: dict[str, list[int]], shares, title: str | None) -> str:
    rows, groups, lanes = _layout(graph, removed, shares)
    c = _canvas(graph, rows, groups, lanes)
    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{c.width}" height="{c.height}" '
        f'viewBox="0 0 {c.width} {c.height}" class="etp-fx">',
        f"<style>{_CSS}</style>",
        f'<rect width="{c.width}" height="{c.height}" fill="#fff"/>',
    ]
    out += _svg_header(graph, groups, removed, title, c)
    out += _svg_legend(c)
    out += _svg_rows(rows, c)
    for g in groups:
        out += _svg_group(g, c)
    out += _svg_barriers(list(graph.barriers), c)
    out.append("</svg>")
    return "\n".join(out)


def _svg_header(graph, groups, removed, title: str | None, c: _Canvas) -> list[str]:
    n_units = sum(g.grp.size for g in groups)
    n_approx = sum(not g.grp.exact for g in groups)
    n_removed = sum(len(g.removed) for g in groups)
    summary = (f"{_n(len(groups), 'group')} ({n_approx} approximate), {_n(n_units, 'unit')}"
               + (f", {n_removed} removed" if removed else "")
               + f"; params {graph.cost.params():,}, MACs {graph.cost.macs():,}; "
               f"{_n(len(graph.barriers), 'barrier')}")
    return [f'<text class="t" x="{c.x0}" y="20">{_e(title or "etp_fx: coupled-channel groups")}</text>',
            f'<text class="s" x="{c.x0}" y="38">{_e(summary)}</text>']


def _svg_legend(c: _Canvas) -> list[str]:
    out = []
    lx0, ly = c.x0, 60
    legend = [("box", EXACT), ("box", APPROX), ("removed", None), ("out", None), ("in", None),
              ("affine", None), ("elementwise", None)]
    for (kind, col), word in zip(legend, _LEGEND_WORDS):
        if kind == "box":
            out.append(f'<rect x="{lx0:.1f}" y="{ly - 9}" width="14" height="11" rx="2" '
                       f'fill="{col["fill"]}" stroke="{col["line"]}"/>')
        elif kind == "removed":
            out.append(f'<rect x="{lx0:.1f}" y="{ly - 8}" width="14" height="9" fill="{REMOVED}"/>')
        else:
            out.append(_marker(kind, lx0 + 7, ly - 3.5, "#444"))
        out.append(f'<text class="s" x="{lx0 + 18:.1f}" y="{ly}">{_e(word)}</text>')
        lx0 += 18 + len(word) * CHAR_W + 16
    return out


def _svg_rows(rows, c: _Canvas) -> list[str]:
    out = []
    x0, right = c.x0, c.bx - 24
    for r in rows:
        y = TOP + r.index * ROW_H
        detail = "\n".join(f"  {gid}: {_roles(ls)}" for gid, ls in r.links.items())
        tip = f"{r.owner}: {r.suffix()}\n" + (f"holds units of:\n{detail}" if detail else
                                              "holds no prunable units (frozen)")
        shade = 'fill="#f4f6f8"' if r.index % 2 else 'fill="#fff" fill-opacity="0"'
        out.append(f'<g class="row"><title>{_e(tip)}</title>'
                   f'<rect x="{x0 - 4}" y="{y}" width="{right - x0 + 4:.1f}" height="{ROW_H}" {shade}/>')
        cls = ' class="frz"' if r.frozen else ""
        out.append(f'<text x="{x0}" y="{y + ROW_H - 5}"{cls}>{_e(r.owner)}'
                   f'<tspan class="dimt" dx="{CHAR_W:.1f}">{_e(r.suffix())}</tspan></text>')
        end = x0 + (len(r.owner) + 1 + len(r.suffix())) * CHAR_W + 6
        out.append(f'<line x1="{min(end, c.lx - 6):.1f}" y1="{y + ROW_H / 2}" x2="{right:.1f}" '
                   f'y2="{y + ROW_H / 2}" stroke="#d5d9de" stroke-width="1" stroke-dasharray="1 3"/></g>')
    return out


def _svg_group(g: _Group, c: _Canvas) -> list[str]:
    """One group: connector, lane, markers and box."""
    grp = g.grp
    col = EXACT if grp.exact else APPROX
    x = c.lx + g.lane * LANE_W + LANE_W / 2
    y0, y1 = _row_y(g.r0), _row_y(g.r1)
    mid = g.box_y + BOX_H / 2
    out = [f'<g class="grp" id="grp-{g.index}" data-gid="{_e(grp.id)}">',
           f"<title>{_e(_tooltip(g))}</title>",
           f'<path class="conn" d="M{x:.1f} {y0:.1f}H{c.bx - 16:.1f}L{c.bx:.1f} {mid:.1f}" '
           f'stroke="{col["line"]}"/>']
    if g.r1 > g.r0:
        out.append(f'<line class="lane" x1="{x:.1f}" y1="{y0:.1f}" x2="{x:.1f}" y2="{y1:.1f}" '
                   f'stroke="{col["line"]}" stroke-linecap="round"/>')
    for r, role in sorted(g.rows.items()):
        out.append(_marker(role, x, _row_y(r), col["line"]))
    out.append(f'<rect class="box" x="{c.bx:.1f}" y="{g.box_y:.1f}" width="{c.bw:.1f}" height="{BOX_H}" '
               f'rx="3" fill="{col["fill"]}" stroke="{col["line"]}" stroke-width="1"/>')
    out.append(f'<text x="{c.bx + 6:.1f}" y="{g.box_y + 13:.1f}">{_e(grp.id)}</text>')
    out.append(_bar(g, c.bx + 6, g.box_y + 19, col))
    out.append("</g>")
    return out


def _svg_barriers(barriers: list[str], c: _Canvas) -> list[str]:
    if not barriers:
        return []
    y = c.body_bottom + 26
    out = [f'<text class="rm" x="{c.x0}" y="{y}">{_n(len(barriers), "barrier")} '
           f'(ops without a channel rule; the channels they touch are frozen):</text>']
    for b in barriers[:15]:
        y += 15
        out.append(f'<text class="rm" x="{c.x0 + 14}" y="{y}">{_e(b)}</text>')
    if len(barriers) > 15:
        y += 15
        out.append(f'<text class="rm" x="{c.x0 + 14}" y="{y}">... {len(barriers) - 15} more</text>')
    return out


def _info(g: _Group) -> str:
    n, kind = g.grp.size, g.grp.unit_kind
    units = f"{n} {_kind_plural(kind, n)}"
    if g.removed:
        units += f", {len(g.removed)} removed"
    p, m = g.share
    return f"{units} · params {100 * p:.1f}% · MACs {100 * m:.1f}%"


def _tooltip(g: _Group) -> str:
    grp = g.grp
    lines = [grp.id, _info(g),
             "exact: removing zeroed units leaves the output unchanged" if grp.exact else
             "approximate: " + short_reason(grp.inexact_reasons)]
    if g.removed:
        shown = ", ".join(map(str, g.removed[:30])) + (" ..." if len(g.removed) > 30 else "")
        lines.append(f"removed units: {shown}")
    lines.append(f"{len(grp.members)} members:")
    by_owner: dict[str, list[tuple[str, int, str]]] = {}
    for m in grp.members:
        by_owner.setdefault(_owner(m.name)[0], []).append((m.name, m.dim, m.role))
    lines.extend(f"  {owner}: {_roles(ls)}" for owner, ls in by_owner.items())
    return "\n".join(lines)


def _roles(links: list[tuple[str, int, str]]) -> str:
    """``weight[0] out, bias[0] bias`` for the parameters of one module."""
    return ", ".join(f"{_owner(p)[1] or p}[{d}] {role}" for p, d, role in links)


def _bar(g: _Group, x: float, y: float, col: dict) -> str:
    n = g.grp.size
    cell = BAR_W / n
    h = 9
    parts = [f'<g class="bar"><rect x="{x:.1f}" y="{y:.1f}" width="{BAR_W}" height="{h}" fill="{col["bar"]}"/>']
    # removed units: runs of consecutive indices
    run_start = prev = None
    runs = []
    for i in g.removed + [None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if run_start is not None:
            runs.append((run_start, prev))
        run_start = prev = i
    for a, b in runs:
        parts.append(f'<rect x="{x + a * cell:.2f}" y="{y:.1f}" width="{max((b - a + 1) * cell, 1.0):.2f}" '
                     f'height="{h}" fill="{REMOVED}"/>')
    if cell >= 3:  # one visible cell per unit: white gaps between them
        parts.append(f'<line x1="{x + cell:.2f}" y1="{y + h / 2:.1f}" x2="{x + BAR_W:.2f}" y2="{y + h / 2:.1f}" '
                     f'stroke="#fff" stroke-width="{h}" stroke-dasharray="0.8 {cell - 0.8:.3f}"/>')
    parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{BAR_W}" height="{h}" fill="none" '
                 f'stroke="{col["line"]}" stroke-width="0.6"/>')
    info = _e(_info(g))
    if g.removed:
        head, _, tail = _info(g).partition(", ")
        rm, _, rest = tail.partition(" · ")
        info = f'{_e(head)}, <tspan class="rm">{_e(rm)}</tspan> · {_e(rest)}'
    parts.append(f'<text x="{x + BAR_W + 8:.1f}" y="{y + h - 0.5:.1f}">{info}</text></g>')
    return "".join(parts)


# --- html --------------------------------------------------------------------------------------

_PAGE_CSS = """
body{margin:0;font:13px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;color:#222}
header{padding:10px 16px;border-bottom:1px solid #ddd;background:#fafafa;position:sticky;top:0;z-index:2}
h1{font-size:17px;margin:0 0 4px}h2{font-size:14px;margin:14px 0 6px}
#q{width:340px;padding:4px 8px;font:inherit}#count{color:#666;margin-left:8px}
main{display:flex;gap:0;align-items:flex-start}
#pic{flex:1 1 60%;overflow:auto;max-height:calc(100vh - 90px);border-right:1px solid #ddd}
#side{flex:1 1 40%;overflow:auto;max-height:calc(100vh - 90px);padding:0 12px 12px}
table{border-collapse:collapse;font:12px DejaVu Sans Mono,Menlo,Consolas,monospace;width:100%}
th,td{padding:2px 6px;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{position:sticky;top:0;background:#fff;cursor:pointer;border-bottom:1px solid #bbb}
td:first-child,th:first-child,td.l{text-align:left}
td.why{white-space:normal;text-align:left;color:#8a6d00;min-width:12em}
tr.hl td{background:#e3f2fd}tr.ex td:first-child{border-left:4px solid #7cc47f}
tr.ap td:first-child{border-left:4px solid #f2c94c}
.rm{color:#d32f2f}ul{margin:0;padding-left:18px;font:12px monospace}
@media (max-width:1100px){main{display:block}#pic,#side{max-height:none}}
"""

_PAGE_JS = """
(function(){
var q=document.getElementById('q'),svg=document.querySelector('#pic svg'),
    body=document.querySelector('#groups tbody'),rows=[].slice.call(body.rows),
    count=document.getElementById('count');
function g(i){return document.getElementById('grp-'+i);}
function row(i){return body.querySelector('tr[data-i="'+i+'"]');}
function hl(i,on){var a=g(i),b=row(i);if(a)a.classList.toggle('hl',on);if(b)b.classList.toggle('hl',on);}
rows.forEach(function(r){var i=r.getAttribute('data-i');
  r.addEventListener('mouseenter',function(){hl(i,true);});
  r.addEventListener('mouseleave',function(){hl(i,false);});
  r.addEventListener('click',function(){var a=g(i);if(a)a.querySelector('.box').scrollIntoView({block:'center'});});});
[].forEach.call(document.querySelectorAll('#pic .grp'),function(a){var i=a.id.slice(4);
  a.addEventListener('mouseenter',function(){hl(i,true);});
  a.addEventListener('mouseleave',function(){hl(i,false);});
  a.addEventListener('click',function(){var b=row(i);if(b)b.scrollIntoView({block:'center'});});});
function filter(){var s=q.value.trim().toLowerCase(),n=0;
  rows.forEach(function(r){var m=!s||r.getAttribute('data-s').indexOf(s)>=0,a=g(r.getAttribute('data-i'));
    r.style.display=m?'':'none';if(a)a.classList.toggle('match',!!s&&m);if(m)n++;});
  svg.classList.toggle('filtering',!!s);count.textContent=n+' of '+rows.length+' groups';}
q.addEventListener('input',filter);filter();
[].forEach.call(document.querySelectorAll('#groups th'),function(th,k){var asc=false;
  th.addEventListener('click',function(){asc=!asc;var num=th.hasAttribute('data-num');
    rows.sort(function(a,b){var x=a.cells[k].getAttribute('data-v')||a.cells[k].textContent,
      y=b.cells[k].getAttribute('data-v')||b.cells[k].textContent;
      var c=num?(parseFloat(x)-parseFloat(y)):x.localeCompare(y);return asc?c:-c;});
    rows.forEach(function(r){body.appendChild(r);});});});
})();
"""


def render_html(graph, *, removed: Mapping[str, Iterable[int]] | None = None,
                title: str | None = None) -> str:
    """A self-contained HTML page: the SVG picture beside a sortable, searchable group table."""
    title = title or "etp_fx: coupled-channel groups"
    removed_ = _check_removed(graph, removed)
    shares = group_shares(graph)
    svg = _render_svg(graph, removed_, shares, title)
    trs = []
    for i, grp in enumerate(graph.groups):
        p, m = shares[grp.id]
        rm = removed_.get(grp.id, [])
        search = " ".join([grp.id, grp.unit_kind, "exact" if grp.exact else "approximate"]
                          + [mb.name for mb in grp.members]).lower()
        why = short_reason(grp.inexact_reasons) if not grp.exact else ""
        trs.append(
            f'<tr data-i="{i}" data-s="{_e(search)}" class="{"ex" if grp.exact else "ap"}">'
            f"<td>{_e(grp.id)}</td><td>{grp.size}</td><td class=\"l\">{_e(grp.unit_kind)}</td>"
            f"<td>{len(grp.members)}</td><td class=\"l\">{'yes' if grp.exact else 'approx'}</td>"
            f'<td data-v="{p}">{100 * p:.2f}</td><td data-v="{m}">{100 * m:.2f}</td>'
            f'<td class="rm">{len(rm) or ""}</td><td class="why">{_e(why)}</td></tr>')
    barriers = "".join(f"<li>{_e(b)}</li>" for b in graph.barriers) or "<li>none</li>"
    n_units = sum(g.size for g in graph.groups)
    head = (f"{_n(len(graph.groups), 'group')}, {_n(n_units, 'prunable unit')}; "
            f"params {graph.cost.params():,}, MACs {graph.cost.macs():,}; "
            f"{_n(len(graph.barriers), 'barrier')}. Hover a group in the "
            f"picture or the table to highlight it; click to jump.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_PAGE_CSS}</style></head>
<body>
<header><h1>{_e(title)}</h1><div>{_e(head)}</div>
<input id="q" type="search" placeholder="filter groups: id, kind, exact/approximate, parameter name" autocomplete="off"><span id="count"></span></header>
<main><div id="pic">
{svg}
</div><div id="side">
<table id="groups"><thead><tr><th>group</th><th data-num>units</th><th>kind</th><th data-num>members</th>
<th>exact</th><th data-num>params%</th><th data-num>MACs%</th><th data-num>removed</th><th>why</th></tr></thead>
<tbody>
{chr(10).join(trs)}
</tbody></table>
<h2>Barriers (ops without a channel rule; their channels are frozen)</h2><ul>{barriers}</ul>
</div></main>
<script>{_PAGE_JS}</script>
</body></html>
"""


def _write(text: str, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.write_text(text, encoding="utf-8")
    return p


def write_svg(graph, path: str | os.PathLike, *, removed: Mapping[str, Iterable[int]] | None = None,
              title: str | None = None) -> Path:
    """Write the lane diagram of ``graph`` as an SVG file (no Graphviz needed).

    Parameters
    ----------
    graph : DependencyGraph
    path : str or PathLike
    removed : mapping of group id to unit indices, optional
        Units to mark as removed (red cells in each group's bar).
    title : str, optional
        Title line at the top of the picture.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    return _write(render_svg(graph, removed=removed, title=title), path)


def write_html(graph, path: str | os.PathLike, *, removed: Mapping[str, Iterable[int]] | None = None,
               title: str | None = None) -> Path:
    """Write a self-contained HTML page (inline SVG, sortable and searchable table of groups,
    hover highlighting; nothing loaded from outside). Arguments as :func:`write_svg`."""
    return _write(render_html(graph, removed=removed, title=title), path)
