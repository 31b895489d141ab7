"""Build the dependency graph of coupled channels from a captured graph module.

One pass over the graph: every tensor dim gets a fresh layout (``node.meta["etp_dims"]``),
every op's rule unifies layouts, ops without a rule freeze what they touch, and the model's
inputs and outputs are frozen. Each unfrozen leaf axis that reaches a parameter is a group.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx
import torch
import torch.fx as fx

from . import rules as _rules  # noqa: F401 - registers the built-in rules
from .cost import CostModel
from .describe import group_networkx, summary_table, to_dot
from .layout import Axis, Cat, Prod, Term, freeze, leaves, resolve, size_of, unify
from .reductions import NORMALISING, reduced_leaves
from .rules.table import RuleContext, data_dependent, lookup, size_value
from .tensors import get_tensor

__all__ = ["Member", "ChannelGroup", "DependencyGraph", "build_graph", "UNIT_KINDS",
           "include_predicate"]

#: the kinds of unit ``include=`` may name besides group ids (see ``_unit_kind``)
UNIT_KINDS = ("channel", "neuron", "hidden", "head", "head-dim")


@dataclass(frozen=True)
class Member:
    """One parameter (or buffer) dim that holds units of a group.

    ``coords[i]`` is the unit that index ``i`` of that dim belongs to, or -1 when index ``i``
    belongs to other groups (a concat segment, another factor's block)."""

    name: str
    dim: int
    roles: frozenset[str]
    is_buffer: bool
    coords: tuple[int, ...]

    @property
    def role(self) -> str:
        """The member's main role, for display: out, in, affine, bias, stat or elementwise."""
        for r in ("out", "in", "affine", "bias", "stat", "elementwise"):
            if r in self.roles:
                return r
        return "other"


@dataclass
class ChannelGroup:
    """Channels (or neurons, or heads) that must be removed together.

    Attributes
    ----------
    id : str
        Stable name derived from the first parameter slot holding the units.
    size : int
        Number of units.
    unit_kind : str
        ``channel``, ``neuron``, ``head`` or ``head-dim``.
    members : list of Member
        Every parameter dim that holds the units.
    exact : bool
        Removing zeroed units leaves the output unchanged (up to folding of constants).
    inexact_reasons : list of str
        Why not, when ``exact`` is False.
    """

    id: str
    size: int
    unit_kind: str
    members: list[Member]
    exact: bool
    inexact_reasons: list[str]
    axis: Axis = field(repr=False)

    @property
    def uid(self) -> int:
        """The id of the group's axis in the layout algebra (stable within one trace)."""
        return self.axis.uid


@dataclass(frozen=True, eq=False)
class DependencyGraph:
    """Coupled-channel groups of one traced model. Build it with :func:`etp_fx.trace`."""

    module: fx.GraphModule
    groups: list[ChannelGroup]
    barriers: list[str]
    frozen_reasons: dict[str, list[str]]
    param_names: frozenset[str]
    signature: tuple
    # the traced model's module tree, (name, class) per module: compress() reuses this
    # graph's capture only for a model with the same tree (empty: unknown, never reused)
    structure: tuple = field(default=(), repr=False)

    def __getitem__(self, gid: str) -> ChannelGroup:
        for g in self.groups:
            if g.id == gid:
                return g
        raise KeyError(_unknown_group(gid, self))

    def group_of(self, gid: str) -> ChannelGroup:
        """The group with id ``gid`` (the same as ``graph[gid]``)."""
        return self[gid]

    @functools.cached_property
    def cost(self) -> CostModel:
        """The cost model (params and MACs as functions of group widths), built on first use
        (a memo of the graph's own facts: the graph itself never changes)."""
        return CostModel(self)

    def summary(self, max_rows: int | None = None) -> str:
        """A text table of the groups (id, units, kind, exactness, members), then barriers and
        frozen channels with their reasons; ``max_rows`` caps the group rows."""
        return summary_table(self, max_rows=max_rows)

    def to_networkx(self) -> nx.Graph:
        """A bipartite networkx graph: one node per group and one per parameter, an edge for
        each parameter dim that holds the group's units."""
        return group_networkx(self)

    def to_dot(self) -> str:
        """The group graph in Graphviz DOT format."""
        return to_dot(self)

    def __repr__(self) -> str:
        return (f"DependencyGraph({len(self.groups)} groups, {len(self.barriers)} barriers, "
                f"{sum(g.size for g in self.groups)} units)")


def _unknown_group(gid: str, g: DependencyGraph) -> str:
    import difflib
    close = difflib.get_close_matches(gid, [x.id for x in g.groups], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"no group {gid!r} in this graph ({len(g.groups)} groups; see graph.summary()).{hint}"


# --- building ----------------------------------------------------------------------------------

def _axis(s: Any, name: str) -> Axis:
    """A fresh axis for one dim of size ``s``; a data-dependent size (an unbacked SymInt)
    gets a stand-in width and is frozen."""
    a = Axis(size_value(s), name)
    if data_dependent(s):
        freeze([a], f"data-dependent size {s.node.expr} at {name}")
    return a


def _fresh_dims(node: fx.Node) -> Any:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return [_axis(s, node.name) for s in v.shape]
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple([_axis(s, node.name) for s in t.shape] for t in v)
    return None


def _all_terms(d: Any) -> Iterator[Term]:
    if isinstance(d, list):
        yield from d
    elif isinstance(d, tuple):
        for part in d:
            yield from part




def build_graph(gm: fx.GraphModule, signature: tuple = (), structure: tuple = ()) -> DependencyGraph:
    """Run every node's rule over ``gm`` and collect the groups."""
    for node in gm.graph.nodes:
        node.meta["etp_dims"] = _fresh_dims(node)
    roles: dict[tuple[str, int], set[str]] = {}
    barriers: list[str] = []

    def dims_of(n: fx.Node) -> Any:
        return n.meta.get("etp_dims")

    _couple_aliases(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            freeze(_all_terms(dims_of(node)), f"model input {node.name}")
        elif node.op == "output":
            for a in node.all_input_nodes:
                freeze(_all_terms(dims_of(a)), "model output")
        elif node.op == "call_function":
            _apply_rule(node, dims_of, roles, barriers)
        elif node.op == "call_module" and dims_of(node) is not None:
            _barrier(node, dims_of, barriers, "a submodule call etp_fx cannot see into")
    params = frozenset(n for n, _ in gm.named_parameters(remove_duplicate=False))
    buffers = frozenset(n for n, _ in gm.named_buffers(remove_duplicate=False))
    groups, frozen = _collect_groups(gm, roles, params, buffers)
    return DependencyGraph(gm, groups, barriers, frozen, params, signature, structure)




def _couple_aliases(gm: fx.GraphModule) -> None:
    """One tensor reached under two names (tied weights, a module registered twice) is one
    set of units: the dims of its get_attr nodes are unified."""
    first: dict[int, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.meta.get("etp_dims"), list):
            continue
        key = id(get_tensor(gm, str(node.target)))
        if key in first:
            for a, b in zip(first[key].meta["etp_dims"], node.meta["etp_dims"]):
                unify(a, b)
        else:
            first[key] = node


def _apply_rule(node: fx.Node, dims_of, roles, barriers) -> None:
    if dims_of(node) is None and not any(dims_of(a) is not None for a in node.all_input_nodes):
        return  # no tensors in or out: asserts, symbolic sizes
    r = lookup(node)
    if r is None:
        _barrier(node, dims_of, barriers, "no channel rule")
        return
    try:
        r.couple(RuleContext(node, dims_of, roles), node)
    except Exception as e:  # noqa: BLE001 - a failing rule must freeze, never guess
        _barrier(node, dims_of, barriers, f"rule {r.name} failed: {type(e).__name__}: {e}")


def _barrier(node: fx.Node, dims_of, barriers: list[str], why: str) -> None:
    terms = list(_all_terms(dims_of(node)))
    for a in node.all_input_nodes:
        terms.extend(_all_terms(dims_of(a)))
    freeze(terms, f"barrier ({why}): {node.format_node()}")
    target = getattr(node.target, "__name__", str(node.target))
    barriers.append(f"{target} at {node.name}: {why}")


def _coords(t: Term, leaf: Axis, normal: dict[int, tuple]) -> list[int]:
    """For each index of a dim with layout ``t``: the coordinate of ``leaf`` there, or -1.

    ``normal`` caches, by ``id(t)``, ``t``'s normal form and, when that is one axis or a
    concatenation of distinct axes (the common case), each axis's offset: a densenet concat
    layout is a member of dozens of groups, resolved and measured once, not once per group."""
    if id(t) not in normal:
        form = resolve(t)
        normal[id(t)] = (t, form, _offsets(form))  # t kept: its id stays its own
    _, form, offsets = normal[id(t)]
    if offsets is None:
        return _resolved_coords(form, leaf)
    total, at = offsets
    start = at.get(leaf.uid)
    if start is None:
        return [-1] * total
    return [-1] * start + list(range(leaf.size)) + [-1] * (total - start - leaf.size)


def _offsets(form: Term) -> tuple[int, dict[int, int]] | None:
    """``(size, {axis uid: offset})`` of an axis or a concatenation of distinct axes, else
    None (a product, or a nested form: :func:`_resolved_coords` handles those)."""
    parts = (form,) if isinstance(form, Axis) else form.parts if isinstance(form, Cat) else ()
    if not parts or not all(isinstance(p, Axis) for p in parts):
        return None
    at, off = {}, 0
    for p in parts:
        if p.uid in at:
            return None
        at[p.uid] = off
        off += p.size
    return off, at


def _holds(t: Term, leaf: Axis) -> bool:
    """Does the normal-form layout ``t`` contain ``leaf``?"""
    return t is leaf if isinstance(t, Axis) else any(_holds(p, leaf) for p in t.parts)


def _resolved_coords(t: Term, leaf: Axis) -> list[int]:
    # t is in normal form, and so are its parts: no resolving on the way down (a densenet
    # concat is a Cat of dozens of parts, met once per member of every group)
    if isinstance(t, Axis):
        return list(range(t.size)) if t is leaf else [-1] * t.size
    if not isinstance(t, Prod):  # a concat: its parts one after the other (list ops in C)
        out: list[int] = []
        for p in t.parts:
            out.extend(_resolved_coords(p, leaf) if _holds(p, leaf) else [-1] * size_of(p))
        return out
    parts = [_resolved_coords(p, leaf) if _holds(p, leaf) else [-1] * size_of(p)
             for p in t.parts]
    out = [-1]
    for p in parts:
        out = [a if b == -1 else (b if a == -1 else None) for a in out for b in p]
        if None in out:
            raise ValueError("the same units appear twice in one product")
    return out


def _collect_groups(gm: fx.GraphModule, roles, params, buffers):
    slots: dict[int, list[tuple[str, int, Term]]] = {}
    leaf_of: dict[int, Axis] = {}
    frozen: dict[str, list[str]] = {}
    seen: set[tuple[str, int]] = set()
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(node.meta.get("etp_dims"), list):
            continue
        name = str(node.target)
        for d, t in enumerate(node.meta["etp_dims"]):
            if (name, d) in seen:
                continue
            seen.add((name, d))
            for leaf in {x.uid: x for x in leaves(t)}.values():
                if leaf.size <= 1:
                    continue
                if leaf.frozen:
                    frozen.setdefault(f"{name}[{d}]", []).extend(
                        r for r in leaf.frozen[:1] if r not in frozen.get(f"{name}[{d}]", []))
                    continue
                slots.setdefault(leaf.uid, []).append((name, d, t))
                leaf_of[leaf.uid] = leaf
    # a leaf may be reached via a second get_attr of the same parameter: names dedupe above
    order = {n: i for i, (n, _) in enumerate(list(gm.named_parameters()) + list(gm.named_buffers()))}
    normalised = {leaf.uid for leaf, _ in reduced_leaves(gm, NORMALISING)}
    groups, normal = [], {}  # normal: layouts' normal forms (the terms live on the nodes)
    for uid, members in slots.items():
        leaf = leaf_of[uid]
        members.sort(key=lambda m: (order.get(m[0], 1 << 30), m[1]))
        if not any(m[0] in params for m in members):
            continue  # only buffers: nothing to learn or shrink
        try:
            mem = [Member(n, d, frozenset(roles.get((n, d), ())), n in buffers,
                          tuple(_coords(t, leaf, normal))) for n, d, t in members]
        except ValueError as e:  # not expressible as slices: keep these channels
            frozen.setdefault(f"{members[0][0]}[{members[0][1]}]", []).append(str(e))
            continue
        if not any(m.roles for m in mem):
            continue  # no rule ever read these dims as channels (nothing couples them)
        groups.append(ChannelGroup(_group_id(members, leaf), leaf.size, _unit_kind(members, leaf, mem, gm,
                                                                     leaf.uid in normalised),
                                   mem, not leaf.inexact, list(leaf.inexact), leaf))
    groups.sort(key=lambda g: (order.get(g.members[0].name, 1 << 30), g.members[0].dim, g.id))
    return groups, frozen


def _group_id(members, leaf: Axis) -> str:
    name, d, t = next((m for m in members), members[0])
    ls = [x for x in leaves(t) if x.size > 1]
    base = f"{name}[{d}]"
    if len(ls) == 1:
        return base
    return f"{base}.{ls.index(leaf)}"


def _unit_kind(members, leaf: Axis, mem: list[Member], gm: fx.GraphModule,
               normalised: bool) -> str:
    """A label for people: heads and head-dims are the factors of a product in a weight dim;
    a width of matrices that a norm or mean reduces over is ``"hidden"`` (a transformer's model
    width, under its RMSNorm / LayerNorm), other widths of matrices are ``"neuron"``.

    In a product that splits a weight dim into heads (``kv heads x query heads per kv head x
    head dim`` in grouped-query attention, ``heads x head dim`` elsewhere) every factor but the
    last is a kind of head, and the last is the head dim, also when it is a concatenation (RoPE's
    rotate-half pairs dim ``j`` with ``j + d/2``: the head dim is the same axis twice), and also
    when the product is one part of a concatenation (GPT-2's fused ``q | k | v``).

    A conv's own channel dim wins over products: a flatten into a Linear makes conv channels
    the major factor of the Linear's input, and they are still channels."""
    weights = [(t, m) for (_, _, t), m in zip(members, mem) if "out" in m.roles or "in" in m.roles]
    if any(resolve(t) is leaf and _ndim(gm, m.name) > 2 for t, m in weights):
        return "channel"
    for t, _ in weights:
        kind = _factor_kind(resolve(t), leaf)
        if kind is not None:
            return kind
    for _, m in weights:
        if _ndim(gm, m.name) > 2:
            return "channel"
        return "hidden" if normalised else "neuron"
    return "channel"


def _factor_kind(t: Term, leaf: Axis) -> str | None:
    """``"head"`` or ``"head-dim"`` when ``leaf`` is a factor of a product inside the
    normal-form layout ``t`` (itself, or inside a concatenation that is the factor), else
    None."""
    if isinstance(t, Axis):
        return None
    if isinstance(t, Prod):
        for k, part in enumerate(t.parts):
            if part is leaf or (isinstance(part, Cat) and _holds(part, leaf)):
                return "head-dim" if k == len(t.parts) - 1 else "head"
    for part in t.parts:
        if _holds(part, leaf):
            kind = _factor_kind(part, leaf)
            if kind is not None:
                return kind
    return None


def _ndim(gm: fx.GraphModule, name: str) -> int:
    return get_tensor(gm, name).dim()


def include_predicate(graph: "DependencyGraph", include: Any, error: type[Exception] = ValueError
                      ) -> Callable[[ChannelGroup], bool]:
    """``include`` (None, a predicate, or group ids and/or unit kinds of :data:`UNIT_KINDS`) as
    a predicate on groups; an unknown name raises ``error``, naming it.

    Examples
    --------
    >>> import torch, etp_fx
    >>> from etp_fx.graph.depgraph import include_predicate
    >>> g = etp_fx.trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)),
    ...                  torch.randn(2, 4))
    >>> [grp.id for grp in g.groups if include_predicate(g, "neuron")(grp)]
    ['0.weight[0]']
    """
    if include is None:
        return lambda g: True
    if callable(include):
        return include
    wanted = {include} if isinstance(include, str) else set(include)
    unknown = wanted - {g.id for g in graph.groups} - set(UNIT_KINDS)
    if unknown:
        raise error(f"include: unknown group ids or unit kinds {sorted(unknown)[:3]} (kinds: "
                    f"{', '.join(UNIT_KINDS)}); see graph.summary()")
    return lambda g: g.id in wanted or g.unit_kind in wanted
