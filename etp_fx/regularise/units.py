"""Unit sets: which parameter slices hold each unit, read off a dependency graph (or off single
layers, for the paper preset). The regulariser, the norms and the selections all start here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RegulariserError
from ..graph.depgraph import include_predicate

__all__ = ["UnitSet", "parameter_aliases", "unit_sets_from_graph", "paper_unit_sets", "unwrap"]


@dataclass(frozen=True)
class UnitSet:
    """Units that share one distance structure: a channel group, or one layer's output rows.

    ``slices`` are ``(parameter name, dim, coords)`` with ``coords[i]`` the unit of index ``i``
    along ``dim`` (-1: not a unit of this set)."""

    id: str
    size: int
    unit_kind: str
    slices: tuple[tuple[str, int, tuple[int, ...]], ...]
    exact: bool = True


def parameter_aliases(graph) -> dict[str, str]:
    """``{name: canonical name}`` for parameters reachable under several names (tied weights:
    a language model's ``lm_head.weight`` is its ``embed_tokens.weight``). The canonical name
    is the one ``model.named_parameters()`` lists, i.e. the one in ``graph.signature``."""
    listed = {n for n, _ in graph.signature}
    by_id: dict[int, list[str]] = {}
    for n, p in graph.module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    out = {}
    for names in by_id.values():
        canon = next((n for n in names if n in listed), names[0])
        for n in names:
            out[n] = canon
    return out


def _dedupe(slices) -> tuple:
    return tuple(dict.fromkeys(slices))


def unit_sets_from_graph(graph, *, units: str = "group", include: Any = None,
                         allow_approximate: bool = False) -> list[UnitSet]:
    """One :class:`UnitSet` per channel group of ``graph``.

    ``units="group"``: every parameter slice of the group (producer rows, consumer columns, norm
    and bias vectors, elementwise parameters); ``"producer"``: only slices with role ``out``.
    Buffers are never penalised. ``include``: group ids and/or unit kinds, or a predicate.
    Approximate groups are skipped unless ``allow_approximate``."""
    if units not in ("group", "producer"):
        raise RegulariserError(f"units must be 'group' or 'producer', got {units!r}")
    groups = list(graph.groups)
    if include is not None:
        keep = include_predicate(graph, include, RegulariserError)
        groups = [g for g in groups if keep(g)]
    out = []
    alias = parameter_aliases(graph)
    for g in groups:
        if not g.exact and not allow_approximate:
            continue
        sl = _dedupe((alias.get(m.name, m.name), m.dim, tuple(m.coords)) for m in g.members
                     if not m.is_buffer and (units == "group" or "out" in m.roles))
        if sl:
            out.append(UnitSet(g.id, g.size, g.unit_kind, sl, g.exact))
    return out


_CONV_LINEAR = ("conv1d", "conv2d", "conv3d", "convolution", "linear")


def paper_unit_sets(graph, min_outputs: int = 10) -> list[UnitSet]:
    """The official code's units: output rows of every Conv and Linear weight with more than
    ``min_outputs`` rows, one set per layer (weights found as the weight argument of the
    convolution and linear ops of the traced graph)."""
    shapes = dict(graph.signature)
    alias = parameter_aliases(graph)
    seen, out = set(), []
    for node in graph.module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", "")
        if name not in _CONV_LINEAR or len(node.args) < 2:
            continue
        if name == "convolution" and len(node.args) > 6 and node.args[6]:
            continue  # transposed: rows are inputs
        w = node.args[1]
        if getattr(w, "op", None) != "get_attr":
            continue
        wname = alias.get(str(w.target), str(w.target))
        if wname in seen or wname not in shapes:
            continue
        seen.add(wname)
        c = shapes[wname][0]
        if c > min_outputs:
            out.append(UnitSet(wname, c, "row", ((wname, 0, tuple(range(c))),)))
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                torch.nn.DataParallel)):
            model = model.module
        else:
            return model
