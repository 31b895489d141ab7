"""Uniform widths: the same number of units removed in every repeated block.

A per-layer selection gives every layer its own number of heads and MLP neurons; a Hugging
Face config holds one number for all layers, so only uniform widths reload with a plain
``from_pretrained``. A norm-based selection with ``uniform=True``
(:class:`etp_fx.regularise.selection.Selection`) makes such a plan with
:func:`uniform_from_plan`:

- groups play the same *role* when their ids match once layer indices are replaced
  (``model.layers.0.mlp.gate_proj.weight[0]`` and ``model.layers.1.mlp.gate_proj.weight[0]``)
  and they have the same size;
- the selection decides how many units go in all (its budget, ratio or threshold, ranking the
  units of every layer together); each role then removes, in every layer, the role's mean
  count (rounded to the nearest, kept widths rounded up to ``round_to``, at least ``min_keep``
  kept);
- in each layer, the units that go are that layer's weakest.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from ..graph.depgraph import DependencyGraph
from .select import kept_width

__all__ = ["uniform_from_plan", "role_of"]

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
    without a twin in another layer keep their entry of ``plan``.

    Examples
    --------
    >>> import torch, etp_fx
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 4)) for _ in range(2)])
    >>> g = etp_fx.trace(net, torch.randn(2, 4))
    >>> norms = etp_fx.regularise.unit_norms(g, net)
    >>> plan = {"0.0.weight[0]": [0, 1, 2, 3, 4], "1.0.weight[0]": [0, 1, 2]}
    >>> {gid: len(u) for gid, u in uniform_from_plan(g, norms, plan).items()}
    {'0.0.weight[0]': 4, '1.0.weight[0]': 4}
    """
    roles: dict[tuple[str, int], list[str]] = {}
    for g in graph.groups:
        if g.id in norms:
            roles.setdefault((role_of(g.id), g.size), []).append(g.id)
    out = {gid: list(u) for gid, u in plan.items()}
    for (_, size), gids in roles.items():
        if len(gids) < 2:
            continue
        mean = sum(len(plan.get(gid, [])) for gid in gids) / len(gids)
        keep = kept_width(size - int(math.floor(mean + 0.5)), size, round_to, min_keep)
        for gid in gids:
            order = np.argsort(np.asarray(norms[gid], dtype=np.float64), kind="stable")
            drop = sorted(int(i) for i in order[: size - keep])
            out.pop(gid, None)
            if drop:
                out[gid] = drop
    return out
