"""Removal plans ``{group_id: [unit indices to remove]}``: the one place they are checked."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from ..errors import PlanError
from .depgraph import DependencyGraph

__all__ = ["check_plan", "plan_indices", "kept_units"]


def plan_indices(gid: str, units: Any) -> list[int]:
    """Sorted, de-duplicated unit indices of one plan entry. Every index must be an int (a
    Python or numpy int, or an integer 0-d tensor): ``"12"`` is not units 1 and 2, ``1.7`` is
    not unit 1, ``True`` is not unit 1, so they are refused rather than coerced."""
    if isinstance(units, (str, bytes, torch.Tensor)) and not (
            isinstance(units, torch.Tensor) and units.dim() == 1):
        raise PlanError(f"group {gid!r}: unit indices must be a list of ints, got {units!r}")
    try:
        units = list(units)
    except TypeError:
        raise PlanError(f"group {gid!r}: unit indices must be a list of ints, got "
                        f"{units!r}") from None
    bad = [u for u in units if not _is_index(u)]
    if bad:
        raise PlanError(f"group {gid!r}: unit indices must be integers, got {bad[:3]!r} "
                        f"(in {units!r})")
    return sorted({int(u) for u in units})


def _is_index(u: Any) -> bool:
    if isinstance(u, bool):
        return False
    if isinstance(u, torch.Tensor):
        return u.dim() == 0 and not u.is_floating_point() and not u.is_complex() \
            and u.dtype != torch.bool
    if isinstance(u, int):
        return True
    # numpy integers: integral and not a float, bool or string
    return hasattr(u, "__index__") and getattr(u, "dtype", None) is not None \
        and getattr(u.dtype, "kind", "") in "iu"


def check_plan(graph: DependencyGraph, remove: Mapping[str, Iterable[int]], *,
               allow_all: bool = False) -> dict[str, list[int]]:
    """Validate and normalise a plan: sorted, de-duplicated indices; empty entries dropped.

    Raises :class:`PlanError` for an unknown group (naming close matches), a non-integer or
    out-of-range index, or (unless ``allow_all``) a plan that removes every unit of a group."""
    if not isinstance(remove, Mapping):
        raise PlanError(f"remove must be a dict {{group_id: [unit indices]}}, got "
                        f"{type(remove).__name__}")
    out: dict[str, list[int]] = {}
    for gid, units in remove.items():
        try:
            grp = graph[gid]
        except KeyError as e:
            raise PlanError(e.args[0]) from None
        idx = plan_indices(gid, units)
        bad = [u for u in idx if not 0 <= u < grp.size]
        if bad:
            raise PlanError(f"group {gid!r} has {grp.size} units (0..{grp.size - 1}); "
                            f"indices {bad[:5]} are out of range")
        if len(idx) >= grp.size and not allow_all:
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
