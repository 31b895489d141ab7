"""The target drives the strength: a feedback controller for the ETP and Torque penalties.

A user knows what they want to remove (a MACs or parameter budget, a share of units) and how
long they train, not a decay rate. Given a :class:`~etp_fx.Selection` and the number of
steps, :class:`StrengthController` adapts the penalty's strength during training so that the
units the selection removes *at the end* have (almost) no weight left by a chosen share of
the steps, while the units it keeps are not crushed. ``docs/etp.md`` has the design, the
alternatives that were tried and the measurements.

Every ``interval`` steps it reads every unit's norm (the one kernel in :mod:`.norms`), asks the
selection which units it would remove *now* (:meth:`Selection.select` on those norms, so the
set follows training), and compares ``left``, the share of the unit-norm mass that lies in
those units (each norm divided by its group's mean norm at the first update, so wide and
narrow groups weigh alike), with a schedule: flat for ``warmup`` of the steps, then falling
linearly to ``floor`` at ``reach`` of the steps. The strength is multiplied by ``up`` when
``left`` is above the schedule and divided by ``sqrt(up)`` when it is below; ``up`` moves it
100-fold within ``ramp`` of the run, whatever its length.

Guards against wind-up (more strength that no longer helps), each from a measured failure:
hold while the gap closes on its own (damping); back off when raising made the kept units'
norms swell (SGD throwing weights across zero and back), and stay below the strength before;
stay below ``ceiling`` times the strength at the last new low of ``left`` and below ``most``;
after ``reach`` stay below ``settle`` times the strength then; back off while the task loss
(when given) has given back ``loss_rise`` of its progress. :func:`keep_counts` gives the
regulariser the keep boundary of every group, where the force's knee goes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import RegulariserError
from .select import kept_width, share_widths
from .selection import Budget, Plan, Ratio, Selection, Threshold, selection_from

__all__ = ["StrengthController", "ControlState", "target_selection", "removal_share",
           "keep_counts"]

@dataclass(frozen=True)
class ControlState:
    """One controller update: the step, the strength it set, the mass share left in the units
    to remove, the schedule's share at that step, the kept units' relative mass, and how many
    units the selection removes now."""

    step: int
    strength: float
    left: float
    goal: float
    kept: float
    removed: int

    def as_dict(self) -> dict[str, float]:
        """The fields as a plain dict (for logs)."""
        return {"step": self.step, "strength": self.strength, "left": self.left,
                "goal": self.goal, "kept": self.kept, "removed": self.removed}


def target_selection(selection: Selection | None = None, *, target_macs: float | None = None,
                     target_params: float | None = None, ratio: float | None = None,
                     units: str = "group") -> Selection | None:
    """The regulariser's target as a :class:`Selection`, or None when none is given.

    The keyword forms build the value :func:`etp_fx.compress` builds from the same keywords
    (same validation), reading the units the regulariser penalises (``units``)."""
    forms = {"target_macs": target_macs, "target_params": target_params, "ratio": ratio}
    given = {k: v for k, v in forms.items() if v is not None}
    if selection is None and not given:
        return None
    if selection is not None and given:
        raise RegulariserError(f"give the target as selection= or as one of target_macs=, "
                               f"target_params=, ratio=; not both (got selection= and "
                               f"{sorted(given)})")
    if selection is None:
        selection = selection_from(**given, units=units)
    elif not isinstance(selection, Selection):
        raise RegulariserError(f"selection= takes etp_fx.Budget, Ratio or Plan; got "
                               f"{type(selection).__name__}")
    if isinstance(selection, (Threshold, Plan)):
        raise RegulariserError(
            f"a {type(selection).__name__} cannot drive the strength: a Threshold says "
            f"nothing about how much to remove, and a Plan names units the force does not "
            f"know (give pivots= / distance= for those); use Budget(macs=...), "
            f"Budget(params=...) or Ratio(...)")
    if selection.units != units:
        raise RegulariserError(f"the selection reads units={selection.units!r} but the "
                               f"regulariser penalises units={units!r}: make them agree")
    return selection


def keep_counts(graph, selection: Selection, sizes: Mapping[str, int]) -> dict[str, int]:
    """How many units each group keeps when ``selection`` is met by one share of every
    group's width: the boundary where the force's knee goes.

    ``Ratio(r)``: ``n - floor(r * n)`` in every group. ``Budget``: the largest width share
    ``w`` (every group keeping ``ceil(w * n)`` units, at least ``min_keep``, rounded up to
    ``round_to``) whose MACs or params, from the graph's cost model, meet the budget; groups
    outside ``sizes`` keep their width."""
    if isinstance(selection, Ratio):
        return {g: kept_width(n - math.floor(selection.ratio * n), n, selection.round_to,
                              selection.min_keep) for g, n in sizes.items()}
    if not isinstance(selection, Budget):
        raise RegulariserError(f"keep counts need a Budget or a Ratio, got "
                               f"{type(selection).__name__}")
    cost = graph.cost.macs if selection.kind == "macs" else graph.cost.params
    return share_widths(cost, selection.share * cost(), sizes, selection.round_to,
                        selection.min_keep)


def removal_share(graph, selection: Selection, norms: Mapping[str, np.ndarray],
                  scale: Mapping[str, float] | None = None, *, allow_approximate: bool = False
                  ) -> tuple[dict[str, list[int]], float, float]:
    """``(plan, left, kept_mean)``: the units ``selection`` removes given these per-unit
    ``norms``, the share of the (scaled) norm mass they hold, and the kept units' mean scaled
    norm. ``scale``: each group's divisor (default: its mean norm now)."""
    plan = selection.select(graph, None, norms=norms, allow_approximate=allow_approximate)
    removed = total = 0.0
    n_kept = 0
    for gid, n in norms.items():
        d = scale[gid] if scale is not None else float(np.mean(n))
        s = n / d if d > 0 else np.zeros_like(n)
        gone = np.asarray(plan.get(gid, ()), dtype=np.int64)
        removed += float(s[gone].sum())
        total += float(s.sum())
        n_kept += len(n) - len(gone)
    left = removed / total if total > 0 else 0.0
    kept = (total - removed) / n_kept if n_kept else 0.0
    return plan, left, kept


class StrengthController:
    """Sets a regulariser's strength from how far the units a target removes have faded.

    Parameters
    ----------
    selection : Selection
        What will be removed after training (``Budget``, ``Ratio`` or ``Plan``); compress with
        the same selection.
    steps : int, optional
        Training steps (calls of the regulariser). May be given later with :meth:`set_steps`
        (the Hugging Face callback reads it from the Trainer), but before the first update.
    start : float
        The strength at step 0. Small: the controller raises it as fast as the schedule asks.
    reach : float
        Share of the steps by which the mass left in the units to remove must be down to
        ``floor``.
    floor : float
        The share of the (scaled) unit-norm mass the units to remove may keep.
    interval : int, optional
        Steps between updates (default: ``steps // 100``, between 1 and 16).
    ramp : float
        How fast the strength may move: by a factor of 100 within ``ramp`` of the steps. Each
        update multiplies it by ``up = 100 ** (interval / (ramp * steps))`` when the mass left
        is above the schedule (and not closing in on it, see ``horizon``; at most 2) and
        divides it by ``sqrt(up)`` when it is below. Tied to the run's length, so a short run and a long
        one follow the same schedule in the same way.
    horizon : float
        Damping: while the gap to the schedule shrinks fast enough to close within
        ``horizon`` updates, the strength is held instead of raised (0: never hold). Without
        it the strength overshoots by the lag between a change and its effect.
    warmup : float
        Share of the steps before the schedule starts falling; the strength stays at
        ``start`` meanwhile (a fresh network reorganises its weights first, and the share
        left then rises whatever the strength).
    keep : float
        Back off (divide by ``backoff``) when the kept units' mean norm falls below ``keep``
        times its value at the first update (0, the default: off; under BatchNorm a unit's
        weights can shrink without harm, so this guard held back pruning that was fine).
    swell : float
        Back off, and never again go above the strength of ``lookback`` updates before, when
        the kept units' mean norm grew by this factor over those updates while the strength
        was being raised: with SGD, a strength too large for the learning rate makes the
        weights jump across zero and back, and their norms swell instead of shrinking (0:
        off). ``lookback`` spans 5 % of the steps (at least 2 updates).
    inflate : float
        Back off when the kept units' mean norm rises above ``inflate`` times its first
        value (0, the default: off). With SGD a strength far too large for the learning
        rate makes every weight jump across zero and back, and the norms swell; but a
        network that learns grows its weights too (an MLP without normalisation doubled
        them in 60 steps), so this is a guard to opt into.
    most : float
        The strength never exceeds this (an L1 decay rate at the keep boundary; a strength
        of 8 from the start collapsed a small BatchNorm VGG trained with SGD at lr 0.05,
        while the controller's useful values on the tasks measured were 0.05 to 2).
    ceiling : float
        Anti-windup: the strength stays below ``ceiling`` times its value when the mass left
        last fell to a new low (by 5 %). When more strength stops helping (Adam moves every
        weight the penalty dominates at the same speed, near or far), it must not grow on.
    knee : bool
        Put the force's knee at the target's boundary in every group (see
        :func:`keep_counts`): the unit at the boundary is pulled at rate ``strength``, the
        units beyond it harder, the kept ones less. False: the plain force, normalised by
        its mean as without a target.
    backoff : float
        The divisor of a back-off (``keep`` or ``loss_rise``).
    settle : float
        After ``reach`` the strength stays below ``settle`` times its value at ``reach``: the
        work is done by then, and a share that lingers just above the floor (an L1
        subgradient keeps dead weights jittering around zero) must not wind the strength up.
    release : bool
        At the first update after ``reach``, name the units the target removes then
        (:attr:`released`): from there on only they are penalised, and the kept units train
        free of the force. By ``reach`` the units to remove are at the floor; a pull that
        goes on shrinking the kept ones only costs accuracy (False: the force stays on every
        unit to the end).
    loss_rise : float
        With the task loss given (``reg(model, loss=...)``): back off while its running mean
        has given back more than ``loss_rise`` of the way from its first value down to its
        lowest (a ratio to the lowest would fire on noise once a classifier's loss is near
        0.01). No lasting ceiling: pruning pressure raises the loss for a while on purpose.
    """

    def __init__(self, selection: Selection, steps: int | None = None, *, start: float = 0.01,
                 reach: float = 0.7, floor: float = 0.02, interval: int | None = None,
                 ramp: float = 0.2, horizon: float = 3.0, warmup: float = 0.1,
                 keep: float = 0.0, swell: float = 1.3, inflate: float = 0.0, backoff: float = 1.5,
                 loss_rise: float = 0.2, settle: float = 4.0, most: float = 10.0,
                 ceiling: float = 100.0, knee: bool = True, release: bool = True) -> None:
        _check_positive("start", start)
        _check_positive("ramp", ramp)
        _check_positive("most", most)
        if not (_real(swell) and (swell == 0 or swell >= 1)):
            raise RegulariserError(f"swell must be 0 (off) or a number >= 1, got {swell!r}")
        if not (_real(inflate) and (inflate == 0 or inflate >= 1)):
            raise RegulariserError(f"inflate must be 0 (off) or a number >= 1, got "
                                   f"{inflate!r}")
        _check_positive("loss_rise", loss_rise)
        for name, v in (("backoff", backoff), ("settle", settle), ("ceiling", ceiling)):
            if not (_real(v) and v >= 1):
                raise RegulariserError(f"{name} must be a finite number >= 1, got {v!r}")
        for name, v in (("reach", reach), ("floor", floor), ("keep", keep),
                        ("warmup", warmup)):
            if not (_real(v) and 0 <= v <= 1):
                raise RegulariserError(f"{name} must lie in [0, 1], got {v!r}")
        if not (_real(horizon) and horizon >= 0):
            raise RegulariserError(f"horizon must be a finite number >= 0, got {horizon!r}")
        if interval is not None and (isinstance(interval, bool) or
                                     not isinstance(interval, int) or interval < 1):
            raise RegulariserError(f"interval must be a positive integer, got {interval!r}")
        self.selection = selection
        self.start, self.reach, self.floor = float(start), float(reach), float(floor)
        self.ramp, self.horizon, self.settle = float(ramp), horizon, settle
        self.keep, self.backoff, self.loss_rise = keep, backoff, loss_rise
        self._at_reach: float | None = None
        self.ceiling, self.knee, self.release = ceiling, bool(knee), bool(release)
        self.released: dict[str, list[int]] | None = None  # the plan frozen at the release
        self.warmup, self.inflate, self.most = float(min(warmup, reach)), inflate, float(most)
        self.swell = swell
        self.learned_cap = math.inf  # the strength at which the weights began to swell
        self._low: tuple[float, float] | None = None  # (lowest share left, strength then)
        self._interval = interval
        self.steps: int | None = None
        if steps is not None:
            self.set_steps(steps)
        self.history: list[ControlState] = []
        self.plan: dict[str, list[int]] = {}
        self._scale: dict[str, float] | None = None
        self._first: tuple[float, float] | None = None  # (left, kept) at the first update
        self._loss = _LossWatch()

    def set_range(self, start: float | None = None, most: float | None = None) -> None:
        """Move ``start`` and ``most`` before the first update: a decoupled update's strength
        multiplies the learning rate, so its useful range moves with ``1 / lr`` (see
        :meth:`~etp_fx.ExponentialTorque.attach`)."""
        if self.history:
            raise RegulariserError("the strength's range can only be moved before the "
                                   "controller's first update: attach before training")
        if start is not None:
            _check_positive("start", start)
            self.start = float(start)
        if most is not None:
            _check_positive("most", most)
            self.most = float(most)

    def set_steps(self, steps: int) -> None:
        """Set the number of training steps (calls of the regulariser)."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise RegulariserError(f"steps must be a positive integer (the number of training "
                                   f"steps, one regulariser call each), got {steps!r}")
        self.steps = int(steps)

    @property
    def interval(self) -> int:
        """Steps between two updates."""
        if self._interval is not None:
            return self._interval
        return max(1, min(16, (self.steps or 0) // 100))

    @property
    def up(self) -> float:
        """The factor of one raise (a fall divides by its square root); at most 2, so a run of
        a few steps cannot jump the strength by orders of magnitude at once."""
        return min(2.0, 100.0 ** (self.interval / (self.ramp * max(1, self.steps or 1))))

    def goal(self, step: int) -> float:
        """The share of mass the units to remove may hold at ``step``: the first measured
        share until ``warmup * steps``, then linear down to ``floor`` at ``reach * steps``,
        then ``floor``."""
        first = self._first[0] if self._first is not None else 1.0
        n = self.steps or 1
        begin, end = self.warmup * n, max(self.warmup * n + 1.0, self.reach * n)
        t = min(1.0, max(0.0, (step - begin) / (end - begin)))
        return max(self.floor, first + (self.floor - first) * t)

    def due(self, step: int) -> bool:
        """Whether an update is due after ``step`` calls (an error before :meth:`set_steps`)."""
        self._check_steps()
        return (step - 1) % self.interval == 0

    def _check_steps(self) -> None:
        if self.steps is None:
            raise RegulariserError("the target-driven strength needs the number of training "
                                   "steps: pass steps= to the regulariser (or call "
                                   "reg.set_steps(n) before training)")

    def observe_loss(self, loss: float) -> None:
        """Feed the task loss of one step (optional; enables the ``loss_rise`` guard)."""
        self._loss.add(loss)

    def update(self, graph, norms: Mapping[str, np.ndarray], step: int, strength: float, *,
               allow_approximate: bool = False) -> float:
        """One control step from the per-unit ``norms`` now; returns the new strength."""
        self._check_steps()
        if self._scale is None:
            self._scale = {g: float(np.mean(n)) or 1.0 for g, n in norms.items()}
        plan, left, kept = removal_share(graph, self.selection, norms, self._scale,
                                         allow_approximate=allow_approximate)
        if self._first is None:
            self._first = (left, kept)
            new = self.start
        else:
            new = self._capped(self._next(strength, left, kept, self.goal(step), step), step,
                               strength, left)
        goal = self.goal(step)
        self.plan = plan
        if self.release and self.released is None and step >= self.reach * self.steps:
            self.released = {g: list(u) for g, u in plan.items()}
        self.history.append(ControlState(step, new, left, goal,
                                         kept / self._first[1] if self._first[1] else 0.0,
                                         sum(map(len, plan.values()))))
        return new

    def _next(self, strength: float, left: float, kept: float, goal: float, step: int
              ) -> float:
        if step < self.warmup * self.steps:
            return strength
        k0 = self._first[1]
        if k0 > 0 and kept < self.keep * k0:
            return strength / self.backoff  # the kept units are being crushed
        if self.inflate and k0 > 0 and kept > self.inflate * k0:
            return strength / self.backoff  # weights jump across zero: far too strong
        if self._swelling(kept, strength):
            return strength / self.backoff
        if self._loss.risen(self.loss_rise):  # the task suffers
            return strength / self.backoff
        gap = left - goal
        if gap <= 0:
            return strength / math.sqrt(self.up)
        prev = self.history[-1]
        closing = (prev.left - prev.goal) - gap
        if self.horizon and closing > 0 and closing * self.horizon >= gap:
            return strength  # on its way: raising now would overshoot
        return strength * self.up

    def _swelling(self, kept: float, strength: float) -> bool:
        """Did raising the strength make the kept units' norms swell? Then remember the
        strength before the raises as a ceiling."""
        n = max(2, int(0.05 * self.steps / self.interval))
        if not self.swell or len(self.history) < n:
            return False
        then = self.history[-n]
        k0 = self._first[1] or 1.0
        if kept / k0 > self.swell * then.kept and strength > then.strength * (1 + 1e-9):
            self.learned_cap = min(self.learned_cap, then.strength)
            return True
        return False

    def _capped(self, new: float, step: int, strength: float, left: float) -> float:
        if self._low is None or left < 0.95 * self._low[0]:
            self._low = (left, strength)
        new = min(new, self.ceiling * self._low[1], self.most, self.learned_cap)
        if step < self.reach * self.steps:
            return new
        if self._at_reach is None:
            self._at_reach = strength
        return min(new, self.settle * self._at_reach)

    @property
    def scale(self) -> dict[str, float] | None:
        """Each group's divisor of its unit norms (its mean norm at the first update)."""
        return self._scale

    @property
    def last(self) -> ControlState | None:
        """The latest update, or None before the first."""
        return self.history[-1] if self.history else None

    def __repr__(self) -> str:
        return (f"StrengthController({self.selection!r}, steps={self.steps}, "
                f"floor={self.floor}, reach={self.reach}, interval={self.interval})")


class _LossWatch:
    """A running mean of the task loss, its first value and its lowest so far."""

    def __init__(self, decay: float = 0.95) -> None:
        self.decay, self.mean, self.first, self.best, self.n = decay, None, None, math.inf, 0

    def add(self, loss: float) -> None:
        loss = float(loss)
        if not math.isfinite(loss):
            return
        self.n += 1
        self.mean = loss if self.mean is None else self.decay * self.mean + \
            (1 - self.decay) * loss
        if self.first is None:
            self.first = loss
        if self.n >= 20:  # the first steps' mean is mostly its starting value
            self.best = min(self.best, self.mean)

    def risen(self, share: float) -> bool:
        """Whether the running mean gave back ``share`` of its progress."""
        if self.mean is None or not math.isfinite(self.best) or self.first <= self.best:
            return False
        return self.mean > self.best + share * (self.first - self.best)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_positive(name: str, v: Any) -> None:
    if not (_real(v) and v > 0):
        raise RegulariserError(f"{name} must be a finite number > 0, got {v!r}")
