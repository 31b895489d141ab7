"""``zero_units``: the *zeroed original*, the model that a compressed model must reproduce."""
from __future__ import annotations

from typing import Collection, Iterable, Mapping

import torch

from ..graph.depgraph import DependencyGraph, Member
from ..graph.signature import check_model_matches
from ..graph.plan import check_plan

__all__ = ["zero_units", "zeroed_slices"]


def _zeroes(m: Member, param: torch.Tensor, keep_constants: bool) -> bool:
    """Which member slices are zeroed.

    By default every parameter slice of the unit: what writes it, what reads it (consumer
    columns) and its per-unit vectors, so the unit contributes nothing anywhere. Buffers
    (running statistics) are kept. With ``keep_constants`` only the weights that write the unit
    are zeroed; consumer columns and per-unit vectors (biases, norm shifts) stay, so the unit
    carries a constant that ``compress`` folds into its consumers (and refuses to remove when
    the value is not constant, e.g. a query head whose shared values still flow).
    """
    if m.is_buffer:
        return False
    if keep_constants and ("in" in m.roles or param.dim() == 1):
        return False
    return True


def zeroed_slices(graph: DependencyGraph, plan: Mapping[str, list[int]], keep_constants: bool,
                  params: Mapping[str, torch.Tensor], whole: Collection[str] = ()
                  ) -> list[tuple[str, int, torch.Tensor]]:
    """``(param name, dim, indices)`` for every slice that :func:`zero_units` zeroes; the
    groups in ``whole`` are zeroed whole whatever ``keep_constants`` says."""
    out = []
    for gid, units in plan.items():
        grp = graph[gid]
        gone = set(units)
        keep = keep_constants and gid not in whole
        for m in grp.members:
            p = params.get(m.name)
            if p is None or not _zeroes(m, p, keep):
                continue
            idx = [i for i, c in enumerate(m.coords) if c in gone]
            out.append((m.name, m.dim, torch.tensor(idx, dtype=torch.long, device=p.device)))
    return out


def zero_units(model: torch.nn.Module, graph: DependencyGraph,
               remove: Mapping[str, Iterable[int]], *, keep_constants: bool = False
               ) -> torch.nn.Module:
    """Zero, in place, the parameter slices of the given units; return ``model``.

    Parameters
    ----------
    model : nn.Module
        The model the graph was traced from (same parameter names and shapes).
    graph : DependencyGraph
    remove : dict
        ``{group_id: [unit indices]}``.
    keep_constants : bool
        Zero only the weights that write the units; keep the consumers' columns and per-unit
        vectors (biases, norm parameters). The removed units then carry constants, which
        :func:`etp_fx.compress` folds into the consumers' bias.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> g = etp_fx.trace(net, torch.randn(1, 2))
    >>> _ = etp_fx.zero_units(net, g, {"0.weight[0]": [1]})
    >>> net[0].weight[1].abs().sum().item(), net[0].bias[1].item()
    (0.0, 0.0)
    """
    check_model_matches(graph, model)
    plan = check_plan(graph, remove)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    with torch.no_grad():
        for name, dim, idx in zeroed_slices(graph, plan, keep_constants, params):
            params[name].index_fill_(dim, idx, 0.0)
    return model
