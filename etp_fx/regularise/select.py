"""Which units go after training: by norm threshold, by ratio, or by a MACs / params budget.

Every function returns a *plan*: ``{group_id: sorted list of unit indices to remove}`` (groups
with nothing to remove are left out), ready for ``etp_fx.zero_units`` / ``etp_fx.compress``.

Rules shared by all selections:

- only exact groups are considered unless ``allow_approximate=True``;
- at least ``min_keep`` (default 1) unit of every group survives;
- ``round_to=r`` keeps widths that are multiples of ``r`` where the group allows it (the kept
  width is rounded *up*, so rounding never removes a unit the criterion kept);
- where heads are the units (``unit_kind == "head"``) a unit is a whole head, so whole heads go.

The range checks of every selection value live here once (``check_share``, ``check_ratio``,
...); :mod:`etp_fx.regularise.selection` wraps these functions in validated values.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import SelectionError
from .norms import unit_norms

__all__ = ["kept_width", "share_widths", "unit_norms", "by_threshold", "by_ratio", "by_budget",
           "check_share", "check_ratio", "check_threshold", "check_scope", "check_normalize"]


# --- the one copy of each range check (the Selection values use them too) ----------------------

def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
        and math.isfinite(v)


def check_share(name: str, v: Any) -> None:
    """A budget: the share of the dense model's MACs or params to keep, in (0, 1]."""
    if not (_is_real(v) and 0 < v <= 1):
        raise SelectionError(f"{name} is the share of the original to keep and must lie in "
                             f"(0, 1]; got {v!r}")


def check_ratio(v: Any) -> None:
    """A ratio: the share of units to remove, in [0, 1)."""
    if not (_is_real(v) and 0 <= v < 1):
        raise SelectionError(f"ratio is the share of units to remove and must lie in [0, 1); "
                             f"got {v!r}")


def check_threshold(v: Any, relative: bool = False) -> None:
    """A norm threshold: finite and >= 0; relative ones (a share of the largest norm) <= 1."""
    if not (_is_real(v) and v >= 0):
        raise SelectionError(f"threshold must be a finite number >= 0, got {v!r}")
    if relative and v > 1:
        raise SelectionError(f"a relative threshold is a share of each group's largest norm "
                             f"and must lie in [0, 1]; got {v!r}")


def check_scope(v: Any) -> None:
    """Where a ratio applies: within each ``"group"``, or to all units ranked ``"global"``ly."""
    if v not in ("group", "global"):
        raise SelectionError(f"scope must be 'group' or 'global', got {v!r}")


def check_normalize(v: Any) -> None:
    """How global rankings compare groups: by each group's ``"mean"`` or ``"max"`` norm."""
    if v not in ("mean", "max", None):
        raise SelectionError(f"normalize must be 'mean', 'max' or None, got {v!r}")





def _groups(graph, norms: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for gid in norms:
        try:
            out[gid] = graph[gid]
        except KeyError as e:
            raise SelectionError(str(e.args[0])) from None
    return out


def kept_width(keep: int, size: int, round_to: int | None, min_keep: int) -> int:
    """``keep`` units of a group of ``size``, at least ``min_keep``, rounded up to a multiple
    of ``round_to`` (the whole group when that would exceed it)."""
    keep = max(min(size, keep), min(size, min_keep))
    if round_to and round_to > 1:
        up = int(math.ceil(keep / round_to) * round_to)
        keep = up if up <= size else size
    return keep


def _plan_from_keep(norms: Mapping[str, np.ndarray], keep: Mapping[str, int]
                    ) -> dict[str, list[int]]:
    plan = {}
    for gid, k in keep.items():
        n = np.asarray(norms[gid])
        order = np.argsort(n, kind="stable")  # ascending: the weakest go first
        drop = order[: len(n) - k]
        if len(drop):
            plan[gid] = sorted(int(i) for i in drop)
    return plan


def _resolve(graph, model, norms, norm, units, include, allow_approximate):
    if norms is None:
        if model is None:
            raise SelectionError("give the trained model (or norms=)")
        norms = unit_norms(graph, model, norm=norm, units=units, include=include,
                           allow_approximate=allow_approximate)
    else:
        norms = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v,
                               dtype=np.float64) for k, v in norms.items()}
        groups = _groups(graph, norms)
        if not allow_approximate:
            norms = {k: v for k, v in norms.items() if groups[k].exact}
        for k, v in norms.items():
            if len(v) != groups[k].size:
                raise SelectionError(f"norms[{k!r}] has {len(v)} values; the group has "
                                     f"{groups[k].size} units")
    if not norms:
        raise SelectionError("no groups to select from (all frozen or approximate; pass "
                             "allow_approximate=True to include approximate groups)")
    return norms


def by_threshold(graph, model: torch.nn.Module | None = None, threshold: float = 0.0, *,
                 relative: bool = False, norms: Mapping[str, Any] | None = None,
                 norm: Any = "l2", units: str = "group", round_to: int | None = None,
                 min_keep: int = 1, include: Any = None, allow_approximate: bool = False
                 ) -> dict[str, list[int]]:
    """Remove units whose norm is at most ``threshold`` (``relative``: at most ``threshold``
    times the largest norm of the group). ``threshold=0`` removes exactly-zero units."""
    check_threshold(threshold, relative)
    norms = _resolve(graph, model, norms, norm, units, include, allow_approximate)
    keep = {}
    for gid, n in norms.items():
        t = threshold * n.max() if relative else threshold
        keep[gid] = kept_width(int((n > t).sum()), len(n), round_to, min_keep)
    return _plan_from_keep(norms, keep)


def _scores(norms: Mapping[str, np.ndarray], normalize: str | None) -> dict[str, np.ndarray]:
    out = {}
    for gid, n in norms.items():
        if normalize == "mean":
            d = n.mean()
        elif normalize == "max":
            d = n.max()
        elif normalize is None:
            d = 1.0
        else:
            check_normalize(normalize)
        out[gid] = n / d if d > 0 else np.zeros_like(n)
    return out


def by_ratio(graph, model: torch.nn.Module | None = None, ratio: float = 0.5, *,
             scope: str = "group", normalize: str | None = "mean",
             norms: Mapping[str, Any] | None = None, norm: Any = "l2", units: str = "group",
             round_to: int | None = None, min_keep: int = 1, include: Any = None,
             allow_approximate: bool = False) -> dict[str, list[int]]:
    """Remove a fraction ``ratio`` of the units: in every group (``scope="group"``), or of all
    units ranked together (``scope="global"``, each group's norms divided by their mean, or
    max, so wide and narrow slices compare)."""
    check_ratio(ratio)
    check_scope(scope)
    check_normalize(normalize)
    norms = _resolve(graph, model, norms, norm, units, include, allow_approximate)
    if scope == "group":
        keep = {gid: kept_width(len(n) - int(math.floor(ratio * len(n))), len(n), round_to,
                              min_keep) for gid, n in norms.items()}
        return _plan_from_keep(norms, keep)
    scores = _scores(norms, normalize)
    total = sum(len(n) for n in norms.values())
    n_drop = int(math.floor(ratio * total))
    order = _global_order(scores, {gid: 1.0 for gid in scores}, min_keep)
    keep = _keep_after(order[:n_drop], norms, round_to, min_keep)
    return _plan_from_keep(norms, keep)


def _global_order(scores: Mapping[str, np.ndarray], unit_cost: Mapping[str, float],
                  min_keep: int) -> list[tuple[str, int]]:
    """Candidates (group, rank within group), weakest score per unit of cost first; the
    ``min_keep`` strongest units of each group are never candidates."""
    gids, ranks, keys = [], [], []
    for gid, s in scores.items():
        c = unit_cost[gid]
        if c <= 0:
            continue  # removing these units saves nothing
        srt = np.sort(s, kind="stable")
        m = max(0, len(s) - min_keep)
        gids.extend([gid] * m)
        ranks.extend(range(m))
        keys.extend((srt[:m] / c).tolist())
    order = np.argsort(np.asarray(keys, dtype=np.float64), kind="stable")
    return [(gids[i], ranks[i]) for i in order]


def _keep_after(prefix: Sequence[tuple[str, int]], norms, round_to, min_keep) -> dict[str, int]:
    drop: dict[str, int] = {}
    for gid, _ in prefix:
        drop[gid] = drop.get(gid, 0) + 1
    return {gid: kept_width(len(n) - drop.get(gid, 0), len(n), round_to, min_keep)
            for gid, n in norms.items()}


def share_widths(fn, budget: float, sizes: Mapping[str, int], round_to: int | None,
                 min_keep: int) -> dict[str, int]:
    """The widths when every group keeps the same share ``w`` of its units (``ceil(w * n)``,
    at least ``min_keep``, rounded up to ``round_to``): the largest ``w`` whose cost ``fn``
    (the cost model's MACs or params of those widths) meets ``budget`` (bisection), or the
    smallest widths when none does."""
    def widths(w: float) -> dict[str, int]:
        return {g: kept_width(math.ceil(w * n - 1e-9), n, round_to, min_keep)
                for g, n in sizes.items()}

    lo, hi = 0.0, 1.0
    if fn(widths(lo)) > budget:
        return widths(lo)
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(widths(mid)) <= budget else (lo, mid)
    return widths(lo)


def by_budget(graph, model: torch.nn.Module | None = None, *, macs: float | None = None,
              params: float | None = None, normalize: str | None = "mean",
              norms: Mapping[str, Any] | None = None, norm: Any = "l2", units: str = "group",
              round_to: int | None = None, min_keep: int = 1, include: Any = None,
              allow_approximate: bool = False, scope: str = "global") -> dict[str, list[int]]:
    """Remove the fewest units that bring MACs (or params) down to the budget.

    ``macs`` / ``params``: the share of the dense model to keep, in (0, 1].
    ``scope="global"``: units are ranked together by (normalised) norm per unit of cost, the
    cost of a unit being the drop in MACs (params) when its group loses one unit, from the
    sympy cost model; the shortest prefix of that ranking that meets the budget (after
    ``round_to``) is removed (a binary search over the prefix length evaluates the cost model
    exactly, so interactions between groups, a conv's in-width x out-width, count).
    ``scope="group"``: every group keeps the same share of its width, the largest share that
    meets the budget (:func:`share_widths`), and loses its weakest units."""
    check_scope(scope)
    if scope == "group":
        return _by_share(graph, model, macs, params, norms, norm, units, round_to, min_keep,
                         include, allow_approximate)
    if (macs is None) == (params is None):
        raise SelectionError("give exactly one of macs= or params=")
    kind, target = ("macs", macs) if macs is not None else ("params", params)
    cm = graph.cost
    fn = cm.macs if kind == "macs" else cm.params
    dense = fn()
    check_share(kind, target)
    check_normalize(normalize)
    budget = target * dense
    norms = _resolve(graph, model, norms, norm, units, include, allow_approximate)
    if dense <= budget:
        return {}
    scores = _scores(norms, normalize)
    unit_cost = {}
    for gid, n in norms.items():
        unit_cost[gid] = (dense - fn({gid: len(n) - 1})) / max(dense, 1)
    order = _global_order(scores, unit_cost, min_keep)

    def cost(k: int) -> float:
        keep = _keep_after(order[:k], norms, round_to, min_keep)
        return fn(keep)

    lo, hi = 0, len(order)
    if cost(hi) > budget:
        best = cost(hi)
        raise SelectionError(
            f"{kind} budget {budget:,.0f} ({budget / dense:.1%} of {dense:,}) is out of reach: "
            f"removing every candidate unit (keeping {min_keep} per group) leaves "
            f"{best:,.0f} ({best / dense:.1%}); frozen groups, min_keep or round_to limit it")
    while lo < hi:  # smallest prefix that meets the budget
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return _plan_from_keep(norms, _keep_after(order[:lo], norms, round_to, min_keep))


def _by_share(graph, model, macs, params, norms, norm, units, round_to, min_keep, include,
              allow_approximate) -> dict[str, list[int]]:
    """:func:`by_budget` with ``scope="group"``."""
    if (macs is None) == (params is None):
        raise SelectionError("give exactly one of macs= or params=")
    kind, target = ("macs", macs) if macs is not None else ("params", params)
    check_share(kind, target)
    fn = graph.cost.macs if kind == "macs" else graph.cost.params
    norms = _resolve(graph, model, norms, norm, units, include, allow_approximate)
    dense = fn()
    keep = share_widths(fn, target * dense, {g: len(n) for g, n in norms.items()}, round_to,
                        min_keep)
    left = fn(keep)
    if left > target * dense:
        raise SelectionError(
            f"{kind} budget {target:.1%} of the dense model is out of reach with every group "
            f"keeping the same share (keeping {min_keep} per group leaves "
            f"{left / dense:.1%}); try scope='global'")
    return _plan_from_keep(norms, keep)
