"""A selection: one small validated value that says which units go.

``compress``, the regularisers' target, the CLI and the benchmarks all take one of these::

    etp_fx.Budget(macs=0.25)                 # keep 25 % of the MACs (or params=0.5)
    etp_fx.Ratio(0.5, scope="global")        # remove half of the units
    etp_fx.Threshold(0.02, relative=True)    # units at most 2 % of their group's largest norm
    etp_fx.Plan({"conv1.weight[0]": [3, 7]}) # these units, exactly

The keyword forms of :func:`etp_fx.compress` (``remove=``, ``threshold=``, ``ratio=``,
``target_macs=``, ``target_params=``) are sugar that builds one with :func:`selection_from`.
Values are checked when they are built, so a mistake is reported before any work starts.

``uniform=True`` on a norm-based selection removes the same number of units in every repeated
block (:mod:`etp_fx.regularise.uniform`), so one config value describes every layer.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from ..errors import PlanError, SelectionError
from ..graph.plan import check_plan, plan_indices
from . import select
from .uniform import uniform_from_plan

__all__ = ["Selection", "Budget", "Ratio", "Threshold", "Plan", "selection_from"]

_NORMS = ("l1", "l2", "linf")


@dataclass(frozen=True)
class Selection:
    """Options every norm-based selection shares.

    Attributes
    ----------
    round_to : int, optional
        Keep widths that are multiples of ``round_to`` where a group allows it (rounded up).
    min_keep : int
        Units every group keeps (at least 1).
    include : str or list of str, optional
        Unit kinds to select from (``"channel"``, ``"neuron"``, ``"hidden"``, ``"head"``,
        ``"head-dim"``).
    norm : {"l2", "l1", "linf"}
        The norm that ranks units.
    units : {"group", "producer"}
        What a unit's norm covers: every coupled slice, or only the producer's rows (must
        match how the model was trained).
    uniform : bool
        The same number of units removed in every repeated block (every layer keeps as many
        heads, key/value heads and MLP neurons): the selection says how many go in all, each
        role of a block (groups whose ids differ only in the layer index) removes its mean
        count per layer, each layer its own weakest units (:mod:`etp_fx.regularise.uniform`).
    """

    round_to: int | None = field(default=None, kw_only=True)
    min_keep: int = field(default=1, kw_only=True)
    include: Any = field(default=None, kw_only=True)
    norm: str = field(default="l2", kw_only=True)
    units: str = field(default="group", kw_only=True)
    uniform: bool = field(default=False, kw_only=True)

    #: zeroing the units whole (False) or keeping their biases and folding constants (True)
    keeps_constants = True

    def __post_init__(self) -> None:
        if self.round_to is not None and not (_is_int(self.round_to) and self.round_to >= 1):
            raise SelectionError(f"round_to must be a positive integer, got {self.round_to!r}")
        if not (_is_int(self.min_keep) and self.min_keep >= 1):
            raise SelectionError(f"min_keep must be an integer >= 1, got {self.min_keep!r}")
        if self.norm not in _NORMS:
            raise SelectionError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.units not in ("group", "producer"):
            raise SelectionError(f"units must be 'group' or 'producer', got {self.units!r}")
        if not isinstance(self.uniform, bool):
            raise SelectionError(f"uniform must be True or False, got {self.uniform!r}")

    def _common(self) -> dict[str, Any]:
        return dict(round_to=self.round_to, min_keep=self.min_keep, include=self.include,
                    norm=self.norm, units=self.units)

    def select(self, graph, model: torch.nn.Module | None, *, norms: Mapping | None = None,
               allow_approximate: bool = False) -> dict[str, list[int]]:
        """The plan ``{group_id: [unit indices to remove]}`` for ``model`` (or ``norms``)."""
        if self.uniform:
            return self._uniform_plan(graph, model, norms, allow_approximate)
        return self._plan(graph, model, norms, allow_approximate)

    def _plan(self, graph, model, norms, allow_approximate) -> dict[str, list[int]]:
        raise NotImplementedError

    def _uniform_plan(self, graph, model, norms, allow_approximate) -> dict[str, list[int]]:
        """The plan made uniform across layers; the norms are computed once for both steps."""
        if norms is None:
            if model is None:
                raise SelectionError("give the trained model (or norms=)")
            norms = select.unit_norms(graph, model, norm=self.norm, units=self.units,
                                      include=self.include, allow_approximate=allow_approximate)
        plan = self._plan(graph, None, norms, allow_approximate)
        return uniform_from_plan(graph, norms, plan, min_keep=self.min_keep,
                                 round_to=self.round_to)


@dataclass(frozen=True)
class Budget(Selection):
    """Remove the weakest units until MACs or params fall to a share ``macs`` or ``params`` of
    the dense model, in (0, 1]. Exactly one of the two. ``scope="global"`` (default): units
    ranked together by norm per unit of cost; ``scope="group"``: every group keeps the same
    share of its width (the largest that meets the budget) and loses its weakest units."""

    macs: float | None = None
    params: float | None = None
    normalize: str | None = field(default="mean", kw_only=True)
    scope: str = field(default="global", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [k for k in ("macs", "params") if getattr(self, k) is not None]
        if len(given) != 1:
            raise SelectionError(f"Budget takes exactly one of macs= or params= (got "
                                 f"{given or 'none'}), e.g. Budget(macs=0.25)")
        select.check_share(given[0], getattr(self, given[0]))
        select.check_normalize(self.normalize)
        select.check_scope(self.scope)

    @property
    def kind(self) -> str:
        """``"macs"`` or ``"params"``."""
        return "macs" if self.macs is not None else "params"

    @property
    def share(self) -> float:
        """The share of the dense model's MACs (or params) to keep."""
        return float(self.macs if self.macs is not None else self.params)

    def _plan(self, graph, model, norms, allow_approximate):
        return select.by_budget(graph, model, macs=self.macs, params=self.params,
                                normalize=self.normalize, norms=norms, scope=self.scope,
                                allow_approximate=allow_approximate, **self._common())


@dataclass(frozen=True)
class Ratio(Selection):
    """Remove a share ``ratio`` in [0, 1) of the units: in every group (``scope="group"``) or of
    all units ranked together (``scope="global"``, norms divided by their group's mean)."""

    ratio: float = 0.5
    scope: str = field(default="group", kw_only=True)
    normalize: str | None = field(default="mean", kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        select.check_ratio(self.ratio)
        select.check_scope(self.scope)
        select.check_normalize(self.normalize)

    def _plan(self, graph, model, norms, allow_approximate):
        return select.by_ratio(graph, model, float(self.ratio), scope=self.scope,
                               normalize=self.normalize, norms=norms,
                               allow_approximate=allow_approximate, **self._common())


@dataclass(frozen=True)
class Threshold(Selection):
    """Remove units whose norm is at most ``threshold`` (``relative=True``: at most that share
    of their group's largest norm). ``Threshold(0)`` removes exactly-zero units."""

    threshold: float = 0.0
    relative: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        select.check_threshold(self.threshold, self.relative)

    def _plan(self, graph, model, norms, allow_approximate):
        return select.by_threshold(graph, model, float(self.threshold), relative=self.relative,
                                   norms=norms, allow_approximate=allow_approximate,
                                   **self._common())


@dataclass(frozen=True, init=False)
class Plan(Selection):
    """Exactly these units: ``{group_id: [unit indices]}``. Units are zeroed whole (their
    biases too), so nothing is folded. Indices must be ints (not bools, floats or strings)."""

    remove: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    keeps_constants = False

    def __init__(self, remove: Mapping[str, Iterable[int]], *, uniform: bool = False) -> None:
        if uniform is not False:
            raise SelectionError("uniform=True needs a norm-based selection (Budget, Ratio or "
                                 "Threshold), which decides how many units go; a Plan already "
                                 "says which units go: give every layer the same count in it")
        if not isinstance(remove, Mapping):
            raise PlanError(f"a plan is a dict {{group_id: [unit indices]}}, got "
                            f"{type(remove).__name__}")
        object.__setattr__(self, "remove", {str(g): tuple(plan_indices(g, u))
                                            for g, u in remove.items()})
        Selection.__init__(self)

    def select(self, graph, model, *, norms=None, allow_approximate=False):
        return check_plan(graph, self.remove)


def selection_from(selection: Selection | None = None, *, remove: Any = None,
                   threshold: Any = None, ratio: Any = None, target_macs: Any = None,
                   target_params: Any = None, **options: Any) -> Selection:
    """One :class:`Selection` from a value or from exactly one keyword form.

    Examples
    --------
    >>> selection_from(target_macs=0.25)
    Budget(round_to=None, min_keep=1, include=None, norm='l2', units='group', uniform=False, macs=0.25, params=None, normalize='mean', scope='global')
    >>> selection_from(ratio=0.5, scope="global").scope
    'global'
    """
    forms = dict(remove=remove, threshold=threshold, ratio=ratio, target_macs=target_macs,
                 target_params=target_params)
    given = [k for k, v in forms.items() if v is not None]
    if selection is not None:
        if given or options:
            raise SelectionError(f"give a Selection or keyword forms, not both (got a "
                                 f"{type(selection).__name__} and {given + sorted(options)})")
        if not isinstance(selection, Selection):
            raise SelectionError(f"a selection is etp_fx.Budget, Ratio, Threshold or Plan; got "
                                 f"{type(selection).__name__}")
        return selection
    if len(given) != 1:
        raise SelectionError(f"give exactly one of remove=, threshold=, ratio=, target_macs=, "
                             f"target_params= (got {given or 'none'}), or a selection such as "
                             f"etp_fx.Budget(macs=0.25)")
    kind = given[0]
    cls, value = {"remove": (Plan, remove), "threshold": (Threshold, threshold),
                  "ratio": (Ratio, ratio), "target_macs": (Budget, target_macs),
                  "target_params": (Budget, target_params)}[kind]
    _check_options(cls, options)
    if cls is Plan:
        return Plan(value, uniform=options.get("uniform", False))
    if cls is Budget:
        return Budget(**{"macs" if kind == "target_macs" else "params": value}, **options)
    return cls(value, **options)


def _check_options(cls: type, options: Mapping[str, Any]) -> None:
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.kw_only)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SelectionError(f"unknown option(s) {unknown} for {cls.__name__}; it takes "
                             f"{allowed or 'no options'}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)










