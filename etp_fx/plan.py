"""Removal plans: ``{group_id: [unit indices to remove]}``, checked against a graph and a model."""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .depgraph import DependencyGraph

__all__ = ["PlanError", "check_plan", "check_model_matches", "kept_units"]


class PlanError(ValueError):
    """A removal plan does not fit the graph (unknown group, bad index, every unit removed)."""


def check_plan(graph: DependencyGraph, remove: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Validate and normalise a plan: sorted, de-duplicated indices; empty entries dropped."""
    if not isinstance(remove, Mapping):
        raise PlanError(f"remove must be a dict {{group_id: [unit indices]}}, got {type(remove).__name__}")
    out: dict[str, list[int]] = {}
    for gid, units in remove.items():
        try:
            grp = graph[gid]
        except KeyError as e:
            raise PlanError(e.args[0]) from None
        try:
            idx = sorted({int(u) for u in units})
        except (TypeError, ValueError):
            raise PlanError(f"group {gid!r}: unit indices must be integers, got {units!r}") from None
        bad = [u for u in idx if not 0 <= u < grp.size]
        if bad:
            raise PlanError(f"group {gid!r} has {grp.size} units (0..{grp.size - 1}); "
                            f"indices {bad[:5]} are out of range")
        if len(idx) >= grp.size:
            raise PlanError(f"group {gid!r}: removing all {grp.size} units would cut the model in "
                            f"two; keep at least one unit")
        if idx:
            out[gid] = idx
    return out


def kept_units(graph: DependencyGraph, plan: Mapping[str, list[int]]) -> dict[int, list[int]]:
    """The plan as the rewrite needs it: ``{leaf axis uid: kept unit indices}``."""
    keep = {}
    for gid, removed in plan.items():
        grp = graph[gid]
        gone = set(removed)
        keep[grp.uid] = [u for u in range(grp.size) if u not in gone]
    return keep


def check_model_matches(graph: DependencyGraph, model: torch.nn.Module) -> None:
    """The graph must describe this model: same parameter names and shapes as when traced."""
    now = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    if now == graph.signature:
        return
    was = dict(graph.signature)
    for n, shape in now:
        if n not in was:
            raise PlanError(f"the graph was traced from a different model: parameter {n!r} is new; "
                            f"trace this model again with etp_fx.trace(model, example_inputs)")
        if was[n] != shape:
            raise PlanError(f"parameter {n!r} changed shape since the model was traced "
                            f"({list(was[n])} -> {list(shape)}); trace the model again")
    missing = set(was) - {n for n, _ in now}
    raise PlanError(f"the graph was traced from a different model: parameters "
                    f"{sorted(missing)[:3]} are missing; trace this model again")
