"""Uniform widths: the same number of units removed in every repeated block.

A per-layer selection gives every layer its own number of heads and MLP neurons; a Hugging
Face config holds one number for all layers, so only uniform widths reload with a plain
``from_pretrained``. :func:`uniform_plan` turns any norm-based selection into such a plan:

- groups play the same *role* when their ids match once layer indices are replaced
  (``model.layers.0.mlp.gate_proj.weight[0]`` and ``model.layers.1.mlp.gate_proj.weight[0]``)
  and they have the same size;
- the selection decides how many units go in all (its budget, ratio or threshold, across
  layers); each role then removes, in every layer, the role's mean count (rounded to the
  nearest, kept widths rounded up to ``round_to``, at least ``min_keep`` kept);
- in each layer, the units that go are that layer's weakest.

Only :mod:`etp_fx.regularise` and :mod:`etp_fx.graph` are imported, so the module can move
into the regularise stage as it is, to back a ``uniform=True`` selection option.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import SelectionError
from ..graph.depgraph import DependencyGraph
from ..regularise.norms import unit_norms
from ..regularise.selection import Plan, Selection

__all__ = ["uniform_plan", "uniform_from_plan", "role_of"]

_LAYER_INDEX = re.compile(r"(^|\.)\d+(?=\.)")


def role_of(group_id: str) -> str:
    """A group's role: its id with the layer index (the first all-digit part of the dotted
    name) replaced by ``*``: ``model.layers.*.mlp.up_proj.weight[0]``, ``encoder.block.*.layer.1
    .DenseReluDense.wi.weight[0]`` (a position inside the block stays)."""
    return _LAYER_INDEX.sub(r"\1*", group_id, count=1)


def uniform_from_plan(graph: DependencyGraph, norms: Mapping[str, Any],
                      plan: Mapping[str, list[int]], *, min_keep: int = 1,
                      round_to: int | None = None) -> dict[str, list[int]]:
    """Make ``plan`` uniform across layers: each role (groups of one id pattern and size)
    removes its mean count in every layer, each layer its weakest units by ``norms``. Groups
    without a twin in another layer keep their entry of ``plan``."""
    roles: dict[tuple[str, int], list[str]] = {}
    for g in graph.groups:
        if g.id in norms:
            roles.setdefault((role_of(g.id), g.size), []).append(g.id)
    out = {gid: list(u) for gid, u in plan.items()}
    for (_, size), gids in roles.items():
        if len(gids) < 2:
            continue
        mean = sum(len(plan.get(gid, [])) for gid in gids) / len(gids)
        keep = _rounded_keep(size - int(math.floor(mean + 0.5)), size, min_keep, round_to)
        for gid in gids:
            order = np.argsort(np.asarray(norms[gid], dtype=np.float64), kind="stable")
            drop = sorted(int(i) for i in order[: size - keep])
            out.pop(gid, None)
            if drop:
                out[gid] = drop
    return out


def _rounded_keep(keep: int, size: int, min_keep: int, round_to: int | None) -> int:
    keep = max(min(size, keep), min(size, min_keep))
    if round_to and round_to > 1:
        up = int(math.ceil(keep / round_to) * round_to)
        keep = up if up <= size else size
    return keep


def uniform_plan(graph: DependencyGraph, model_or_norms: torch.nn.Module | Mapping[str, Any],
                 selection: Selection, *, allow_approximate: bool = False
                 ) -> dict[str, list[int]]:
    """The plan of ``selection`` with the same number of units removed in every repeated
    block (see the module docstring).

    Parameters
    ----------
    graph : DependencyGraph
    model_or_norms : nn.Module or dict
        The trained model, or per-unit norms ``{group id: array}`` (as
        :func:`etp_fx.regularise.norms.unit_norms` returns them).
    selection : Budget, Ratio or Threshold
        How many units go in all; its ``include``, ``norm``, ``units``, ``min_keep`` and
        ``round_to`` apply.

    Examples
    --------
    >>> import torch, etp_fx
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 4)) for _ in range(2)])
    >>> g = etp_fx.trace(net, torch.randn(2, 4))
    >>> sel = etp_fx.Ratio(0.5, scope="global")
    >>> {gid: len(u) for gid, u in sorted(sel.select(g, net).items())}
    {'0.0.weight[0]': 5, '0.2.weight[0]': 2, '1.0.weight[0]': 3}
    >>> {gid: len(u) for gid, u in sorted(uniform_plan(g, net, sel).items())}
    {'0.0.weight[0]': 4, '0.2.weight[0]': 2, '1.0.weight[0]': 4}
    """
    if isinstance(selection, Plan):
        raise SelectionError("uniform_plan needs a norm-based selection (Budget, Ratio or "
                             "Threshold); a Plan already says which units go")
    if isinstance(model_or_norms, torch.nn.Module):
        norms = unit_norms(graph, model_or_norms, norm=selection.norm, units=selection.units,
                           include=selection.include, allow_approximate=allow_approximate)
    else:
        norms = dict(model_or_norms)
    plan = selection.select(graph, None, norms=norms, allow_approximate=allow_approximate)
    return uniform_from_plan(graph, norms, plan, min_keep=selection.min_keep,
                             round_to=selection.round_to)
