"""Exponential Torque (ETP) and linear Torque penalties: vectorised, differentiable, compilable.

With a target (``target_macs=``, ``target_params=``, ``ratio=`` or ``selection=``) and
``steps=``, a :class:`~etp_fx.regularise.controller.StrengthController` sets the strength
during training and the force's knee sits at the target's keep boundary; without one the
strength is fixed (``strength=``) or the paper's (``preset="paper"``).

For every *unit set* ``g`` (a coupled channel group, or one layer's output rows in the paper
preset) with ``n_g`` units at distances ``d_u`` from its pivots::

    P_g(W)  = (1 / n_g) * sum_u  f_g(d_u) * N_u(W)          N_u: L1 or L2 norm of unit u
    penalty = strength * sum_g  gamma_g * P_g(W) / Z_g

- ETP:    ``f_g(d) = base ** (scale * d / (d_max_g + 1))`` (the paper: base 1.01, scale 500,
  and on the index chain ``d_max + 1 = C``, so ``f = alpha ** i`` with ``alpha = 1.01**(500/C)``);
- Torque: ``f_g(d) = scale * d`` (the paper's linear force, scale 1);
- ``gamma_g``: an optional group factor from the group's hop distance to pivot groups;
- ``Z_g``: the normalisation. ``normalize="decay"`` (default) makes ``strength`` an L1 decay
  rate relative to the weights' size at construction, comparable across models and widths;
  ``"init"`` makes each group's penalty 1 at construction; ``None`` (and the paper preset) is
  the raw formula. See ``docs/etp.md`` for the exact formulas and why.

The computation is a handful of tensor ops, whatever the number of units: one fused norm
reduction per parameter (``torch.linalg.vector_norm`` over the dims that are not unit dims),
one ``cat``, then one ``dot`` (L1) or ``index_add`` + ``sqrt`` + ``dot`` (L2). All index tensors
are built once. It traces into ``torch.compile(fullgraph=True)`` and works under DDP.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import DistanceError, RegulariserError
from ..graph.signature import check_model_matches
from .controller import StrengthController, keep_counts, removal_share, target_selection
from .decoupled import DECOUPLED_START_RATE, group_lrs, initial_lr, most_rate, \
    optimiser_groups, proximal_step
from .fused import FusedProximal, resolve_fused
from .fused_step import FusedOptimiserStep, optimiser_unsupported
from .norms import Sharding, UnitNorms, local_shards, norm_order, swaps_parameters
from .selection import Selection
from .units import UnitSet, paper_unit_sets, unit_sets_from_graph, unwrap
from ..graph.distance import check_pivots, group_distances, multi_source_distances, \
    resolve_unit_graph

__all__ = ["ExponentialTorque", "Torque"]


# --- the vectorised penalty ------------------------------------------------------------------

class _Penalty(torch.autograd.Function):
    """``sum_u c_u N_u(W)`` with a hand-written backward: one pass per parameter
    (``sgn(W) * C`` for L1, ``W * C / N`` for L2, ``C`` broadcast from the unit dims).

    Used in eager mode, where autograd's generic reduction backward costs several passes over
    each weight; under ``torch.compile`` the plain differentiable formula is used instead."""

    @staticmethod
    def forward(ctx, norms: "UnitNorms", ord: float, coef: torch.Tensor,
                coef_bcast: list[torch.Tensor] | None, sharding: Sharding | None,
                *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if ord == 1:  # coef: per slot position
                pen = torch.dot(norms.slot_vector(params, 1, sharding), coef)
                scale = None
            else:
                u, scale = norms.l2_scale(params, coef, sharding)  # d N_u / d w = w / N_u
                pen = torch.dot(u, coef)
        ctx.norms, ctx.ord, ctx.coef_bcast, ctx.scale = norms, ord, coef_bcast, scale
        ctx.sharding = sharding
        ctx.save_for_backward(*params)
        return pen

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        params = ctx.saved_tensors
        norms = ctx.norms
        if ctx.ord == 1:
            cb = norms.localise(ctx.coef_bcast, ctx.sharding)
        else:
            cb = norms.per_parameter(ctx.scale, ctx.sharding)
        grads = []
        for i, (w, c) in enumerate(zip(params, cb)):
            if not ctx.needs_input_grad[5 + i]:
                grads.append(None)
                continue
            c = (c * g).to(w.dtype)
            grads.append(w.sgn().mul_(c) if ctx.ord == 1 else w * c)
        return (None, None, None, None, None, *grads)


# --- the penalties -----------------------------------------------------------------------------

class _TorqueBase:
    """Shared machinery of :class:`ExponentialTorque` and :class:`Torque`."""

    def __init__(self, graph, *, strength: float | None = None, base: float | None = None,
                 scale: float | None = None, norm: str = "l1", units: str = "group",
                 distance: Any = "index", pivots: Any = None, preset: str | None = None,
                 normalize: str | None = "decay", group_pivots: Any = None,
                 group_scale: float = 10.0, include: Any = None, allow_approximate: bool = False,
                 model: torch.nn.Module | None = None, check_finite: bool = True,
                 every: int = 1, target_macs: float | None = None,
                 target_params: float | None = None, ratio: float | None = None,
                 selection: Selection | None = None, steps: int | None = None,
                 control: Mapping[str, Any] | None = None) -> None:
        self.graph, self.preset = graph, _check_preset(preset)
        if preset == "paper":
            _check_paper_options(norm, units, distance, pivots, group_pivots, include, base,
                                 scale)
            normalize, base, scale = None, 1.01, 500.0
        target = target_selection(selection, target_macs=target_macs,
                                  target_params=target_params, ratio=ratio,
                                  units=units)
        self.controller = _controller(target, steps, strength, control, preset)
        # what the user set about the controlled strength's range (attach() moves the rest)
        self._given = set(control or {}) | ({"start"} if strength is not None else set())
        self._model_ref = weakref.ref(model) if model is not None else None
        self._hook: Any = None
        self._fused: FusedProximal | None = None
        self._fused_step: FusedOptimiserStep | None = None
        self._early: str | None = None  # what the pre-step hook did this step
        self._dev: torch.device | None = None  # the coefficients' device copies: _coefs
        self._coef_t: dict[str, Any] = {}
        fixed = _check_strength(strength, preset, self.controller is not None)
        self.strength = self.controller.start if self.controller is not None else fixed
        self.norm, self.ord = norm, _penalty_order(norm)
        self.check_finite, self.every = check_finite, _check_every(every)
        self.allow_approximate = allow_approximate
        self.calls = 0
        self.last_value: torch.Tensor | None = None
        self._bound: tuple[Any, list[torch.Tensor], bool] | None = None
        self.units = "producer" if preset == "paper" else units
        self.unit_sets = self._unit_sets(units, include, allow_approximate)
        self.keep = None if self.controller is None else keep_counts(
            graph, self.controller.selection, {s.id: s.size for s in self.unit_sets})
        self.normalize = _check_normalize(normalize)
        if self.controller is not None and normalize != "decay":
            raise RegulariserError("a target sets the strength as an L1 decay rate at the "
                                   "keep boundary: use normalize='decay' (the default)")
        self.base, self.scale = self._force_params(base, scale)
        self.norms = UnitNorms(self.unit_sets, dict(graph.signature))
        self.names = self.norms.names
        # values at construction: for importance order and the init normalisation
        needs_values = normalize is not None or callable(distance) or (
            isinstance(distance, str) and distance == "importance")
        init = self._initial_norms(model) if needs_values else None
        self._place_units(distance, pivots, init)
        self._set_group_factors(group_pivots, group_scale)
        self._set_coefficients(init)
        self.fast_backward = True  # the hand-written backward in eager mode (same values)

    # -- construction helpers
    def _unit_sets(self, units: str, include: Any, allow_approximate: bool) -> list[UnitSet]:
        if self.preset == "paper":
            sets = paper_unit_sets(self.graph)
            if not sets:
                raise RegulariserError("empty unit graph: the model has no Conv or Linear "
                                       "weight with more than 10 outputs for preset='paper'")
            return sets
        sets = unit_sets_from_graph(self.graph, units=units, include=include,
                                    allow_approximate=allow_approximate)
        if not sets:
            groups = self.graph.groups
            why = f"{len(groups)} groups, {sum(not g.exact for g in groups)} approximate"
            raise RegulariserError(
                f"empty unit graph: no units to penalise ({why}; units={units!r}, "
                f"include={include!r}). Check graph.summary() and graph.barriers, or pass "
                f"allow_approximate=True.")
        return sets

    def _place_units(self, distance: Any, pivots: Any, init: dict | None) -> None:
        """Each unit set's unit graph, pivots and distances."""
        self.pivots: dict[str, list[int]] = {}
        self.distances: dict[str, np.ndarray] = {}
        self.unit_graphs: dict[str, Any] = {}
        for s in self.unit_sets:
            G, default_piv = resolve_unit_graph(distance, s, init[s.id] if init else None)
            piv = self._pivots_for(s, pivots, default_piv)
            self.unit_graphs[s.id] = G
            self.pivots[s.id] = piv
            self.distances[s.id] = multi_source_distances(G, piv, s.size, f"group {s.id}")

    def _set_group_factors(self, group_pivots: Any, group_scale: float) -> None:
        self.group_factors = {s.id: 1.0 for s in self.unit_sets}
        if group_pivots is None:
            return
        if self.preset == "paper":
            raise RegulariserError("group_pivots is not part of the paper preset")
        gd = group_distances(self.graph, group_pivots, [self.graph[s.id] for s in
                                                        self.unit_sets])
        dmax = max(gd.values()) or 1.0
        self.group_factors = {s.id: float(group_scale) ** (gd[s.id] / dmax)
                              for s in self.unit_sets}

    def _set_coefficients(self, init: dict | None) -> None:
        """``coef_u = f(d_u) * A_g * gamma_g`` per unit, and per slot position for L1."""
        coef = np.zeros(self.norms.n_units)
        self.multiplier: dict[str, float] = {}
        for s in self.unit_sets:
            o = self.norms.offsets[s.id]
            f = self.force(self.distances[s.id])
            a = self._multiplier(f, init[s.id] if init is not None else None,
                                 self.norms.unit_numel[o: o + s.size], self._knee(s))
            self.multiplier[s.id] = a
            coef[o: o + s.size] = f * a * self.group_factors[s.id]
        self._use_coefficients(coef)

    def _use_coefficients(self, coef: np.ndarray) -> None:
        """Penalise with these per-unit coefficients from now on (the device copies and the
        fused update's parts are rebuilt on the next use)."""
        self.coef = coef
        # L1: sum_u c_u * sum_{i in u} r_i = sum_i r_i * c_{unit(i)}; no scatter needed
        coef_slot = np.zeros(self.norms.length)
        np.add.at(coef_slot, self.norms.src, coef[self.norms.dst])
        self.coef_slot = coef_slot
        if self._dev is not None:  # update the device copies in place: a compiled step keeps
            fresh = self._device_coefs(self._dev)  # reading the same tensors, no recompile
            for key in ("slot", "unit"):
                self._coef_t[key].copy_(fresh[key])
            for old, new in zip(self._coef_t["bcast"], fresh["bcast"]):
                old.copy_(new)
        if self._fused is not None:
            self._fused.forget_coefficients()

    def _release_kept(self, plan: Mapping[str, Sequence[int]]) -> None:
        """Only the units in ``plan`` (the ones the target removes) stay penalised."""
        mask = np.zeros(self.norms.n_units)
        for s in self.unit_sets:
            gone = np.asarray(plan.get(s.id, ()), dtype=np.int64)
            mask[self.norms.offsets[s.id] + gone] = 1.0
        self._use_coefficients(self.coef * mask)

    # -- subclass hooks
    def _force_params(self, base, scale):
        raise NotImplementedError

    def force(self, d: np.ndarray, at: np.ndarray | float | None = None) -> np.ndarray:
        """The force on units at distances ``d`` (one unit set), or, with ``at``, the force
        the same unit set puts at distances ``at``."""
        raise NotImplementedError

    def _knee(self, s: UnitSet) -> float | None:
        """With a target: the force at the boundary between the units the target keeps (the
        ``keep[s.id]`` closest to the pivots) and the ones it removes."""
        if self.keep is None or not self.controller.knee:
            return None
        d = self.distances[s.id]
        k, srt = self.keep[s.id], np.sort(d)
        boundary = (srt[k - 1] + srt[k]) / 2 if k < len(d) else srt[-1] + 1.0
        return float(self.force(d, boundary))

    # -- construction helpers
    def _multiplier(self, f: np.ndarray, n0: np.ndarray | None, numel: np.ndarray,
                    knee: float | None = None) -> float:
        """``A_g`` in ``coef_u = gamma_g * f(d_u) * A_g`` (see docs/etp.md). With a target
        (``knee``: the force at the keep boundary) the boundary unit, not the average one,
        is pulled at rate ``strength``."""
        if self.normalize is None:
            return 1.0 / len(f)  # the paper's 1 / C
        if self.normalize == "init":  # P_g(W_0) = 1
            z = float(np.dot(f, n0)) / len(f)
            return 1.0 / (len(f) * z) if z > 0 else 1.0 / len(f)
        # "decay": the pull on an average weight, relative to its size at construction, is
        # strength * f(d_u) / mean f: an L1 decay rate, like weight decay's coefficient
        total = float(numel.sum())
        fbar = float(np.dot(f, numel)) / total if total else 0.0
        if knee is not None and knee > 0:
            fbar = knee
        if self.ord == 1:
            kappa = float(n0.sum()) / total if total else 0.0  # mean |w|
        else:
            kappa = float(np.dot(n0, numel)) / total if total else 0.0  # typical unit norm
        if not fbar > 0 or not kappa > 0:
            return 1.0 / len(f)  # all pivots (Torque) or an all-zero group: raw
        return kappa / fbar

    def _pivots_for(self, s: UnitSet, pivots: Any, default: list[int] | None) -> list[int]:
        where = f"group {s.id}"
        if pivots is None:
            p = default if default is not None else [0]
        elif isinstance(pivots, Mapping):
            unknown = set(pivots) - {u.id for u in self.unit_sets} - {g.id for g in
                                                                    self.graph.groups}
            if unknown:
                raise DistanceError(f"pivots: unknown group ids {sorted(unknown)[:3]}")
            p = pivots.get(s.id, default if default is not None else [0])
        elif isinstance(pivots, (int, np.integer)):
            p = [pivots]
        else:
            p = list(pivots)
        return check_pivots(p, s.size, where)

    def _initial_norms(self, model: torch.nn.Module | None) -> dict[str, np.ndarray]:
        src = unwrap(model) if model is not None else self.graph.module
        if model is not None:
            check_model_matches(self.graph, src)
        params = self.norms.parameters(src)
        if any(p.device.type == "meta" for p in params):
            raise RegulariserError(
                "the traced parameters live on the meta device, so their norms at "
                "initialisation are unknown: pass model= (with real weights) or normalize=None")
        u = self.norms.read(params, self.ord)
        if not torch.isfinite(u).all():
            bad = [n for n, p in zip(self.names, params) if not torch.isfinite(p).all()]
            raise FloatingPointError(f"non-finite values in parameters {bad[:3]} at "
                                     f"construction")
        return self.norms.arrays(u)

    # -- call
    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        model = unwrap(model)
        if torch.compiler.is_compiling():
            return self.norms.parameters(model)
        b = self._bound
        if b is not None and b[0]() is model:
            return self.norms.parameters(model) if b[2] else b[1]
        check_model_matches(self.graph, model)
        params = self.norms.parameters(model)
        self._bound = (weakref.ref(model), params, swaps_parameters(model))
        return params

    def _coefs(self, device: torch.device) -> dict[str, Any]:
        if self._dev != device:
            self._coef_t = self._device_coefs(device)
            self._dev = device
        return self._coef_t

    def _device_coefs(self, device: torch.device) -> dict[str, Any]:
        """The coefficients as tensors on ``device``: per slot position, per unit, broadcast
        per parameter, and the strength as a 0-dim tensor."""
        slot = torch.as_tensor(self.coef_slot, dtype=torch.float32, device=device)
        return {"slot": slot,
                "unit": torch.as_tensor(self.coef, dtype=torch.float32, device=device),
                "bcast": self.norms.broadcast(slot),
                "strength": torch.full((), self.strength, device=device)}

    def _strength_factor(self, c: dict[str, Any]) -> float | torch.Tensor:
        """The strength as a float, or, when a target drives it, as a 0-dim tensor updated in
        place (so a compiled step reads the new value instead of recompiling for each)."""
        return self.strength if self.controller is None else c["strength"]

    def penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The penalty of these parameter tensors (in :attr:`names` order), pure."""
        c = self._coefs(params[0].device)
        k = self._strength_factor(c)
        params, sharding = local_shards(params)  # FSDP2: every rank's own shards
        if sharding is None and (torch.compiler.is_compiling() or not self.fast_backward):
            if self.ord == 1:
                return k * torch.dot(self.norms.slot_vector(params, 1), c["slot"])
            return k * torch.dot(self.norms.values(params, 2), c["unit"])
        if self.ord == 1:
            pen = _Penalty.apply(self.norms, 1, c["slot"], c["bcast"], sharding, *params)
        else:
            pen = _Penalty.apply(self.norms, 2, c["unit"], None, sharding, *params)
        return k * pen

    def __call__(self, model: torch.nn.Module, loss: torch.Tensor | float | None = None
                 ) -> torch.Tensor:
        """The penalty for the model's current parameters: a differentiable scalar.

        Each call counts as one training step (:attr:`calls`); with a target, the strength is
        updated every ``interval`` calls before the penalty is computed (see :meth:`step`).
        ``loss``: this step's task loss (optional); with a target it lets the controller back
        off when the task loss rises (``loss_rise``).
        With ``every=k > 1`` (lazy regularisation, eager mode only) the penalty is applied on
        one call in ``k``, multiplied by ``k``, and 0 is returned on the other calls;
        :attr:`last_value` always holds the last penalty actually computed (unscaled)."""
        if torch.compiler.is_compiling():
            if self.every != 1:
                raise RegulariserError("every > 1 needs a call counter, which a compiled step "
                                       "cannot keep: use every=1 inside torch.compile")
            return self.penalty(self._params(model))
        params = self._params(model)
        if loss is not None:
            self.observe(loss)
        if not self._counted_step(params):
            return torch.zeros((), device=params[0].device)
        pen = self.penalty(params)
        self.last_value = pen.detach()
        if self.check_finite and not bool(torch.isfinite(pen)):
            bad = [n for n, p in zip(self.names, params) if not torch.isfinite(p).all()]
            what = (f"non-finite values in parameters {bad[:5]}" if bad else
                    "the parameters are finite but the penalty overflowed (lower strength?)")
            raise FloatingPointError(
                f"{type(self).__name__}: the penalty is {pen.item()} at step {self.calls}: "
                f"{what}. Lower the learning rate or strength, or clip gradients.")
        return pen * self.every if self.every > 1 else pen

    # -- the target-driven strength
    def _counted_step(self, params: Sequence[torch.Tensor]) -> bool:
        """Count one training step (:meth:`_advance`); whether this step applies the penalty
        (every step, or one in ``every``)."""
        self._advance(params)
        return self.every == 1 or (self.calls - 1) % self.every == 0

    def _advance(self, params: Sequence[torch.Tensor]) -> None:
        self.calls += 1
        if self.controller is not None and self.controller.due(self.calls):
            self._control(params)

    def _control(self, params: Sequence[torch.Tensor]) -> None:
        ctl = self.controller
        norms = self.norms.arrays(self.norms.read(params, norm_order(ctl.selection.norm)))
        released = ctl.released
        self.strength = ctl.update(self.graph, norms, self.calls, self.strength,
                                   allow_approximate=self.allow_approximate)
        if released is None and ctl.released is not None:
            self._release_kept(ctl.released)
        if self._dev is not None:
            self._coef_t["strength"].fill_(self.strength)

    def step(self, model: torch.nn.Module) -> None:
        """Count one training step and update the strength when due, without computing the
        penalty. ``reg(model)`` does this itself; call ``step`` instead when the penalty runs
        inside a compiled function (which cannot keep a counter), once per step, outside it."""
        self._advance(self._params(model))

    # -- the decoupled (proximal) form
    def attach(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
               *, fused: bool | None = None) -> "_TorqueBase":
        """Apply the penalty as a decoupled proximal update after every ``optimizer.step()``
        instead of a loss term (see :mod:`etp_fx.regularise.decoupled` and docs/etp.md,
        "Decoupled update"); returns the regulariser. Do not also add ``reg(model)`` to the
        loss.

        After each step it counts one training step (:attr:`calls`; the controller updates
        the strength when due, as ``reg(model)`` does) and soft-thresholds the penalised
        weights with ``t = lr * strength * c`` (each parameter's own group's current ``lr``).
        ``model``: the trained model; default the one given as ``model=`` at construction or
        to the last ``reg(model)`` call (else an error). With a target, the strength's start
        and cap (unless given in ``control=`` / ``strength=``) are set for the optimiser's
        initial ``lr``: the same per-step pull for SGD and AdamW, nothing to tune.
        ``fused``: run the update as one compiled pass per weight
        (:mod:`etp_fx.regularise.fused`; compiles once on the first step, 10-30 s on CPU),
        and with a plain ``torch.optim.SGD``, ``Adam`` or ``AdamW`` and L1 units run the
        optimiser's own step of the penalised weights in the same loop
        (:mod:`etp_fx.regularise.fused_step`: the optimiser skips them and gets their
        gradients back after its step); ``None``
        (default) does for a target-driven run of at least
        :data:`~etp_fx.regularise.fused.FUSED_MIN_STEPS` steps on CPU.
        Raises :class:`RegulariserError` naming a penalised parameter that the optimiser does
        not hold or that is frozen."""
        model = self._attach_model(model)
        params = self._params(model)
        groups = optimiser_groups(optimizer, self.names, params)
        self.detach()
        steps = self.controller.steps if self.controller is not None else None
        self._fused = (FusedProximal(self.norms, self.ord)
                       if resolve_fused(fused, steps, params) else None)
        if self.controller is not None and not self.controller.history:
            lr0 = initial_lr(optimizer, groups)
            if lr0 > 0:
                self.controller.set_range(
                    None if "start" in self._given else DECOUPLED_START_RATE / lr0,
                    None if "most" in self._given else most_rate(optimizer, groups) / lr0)
                self.strength = self.controller.start
        ref = weakref.ref(model)
        self._hook = [optimizer.register_step_post_hook(
            lambda opt, args, kwargs: self._after_step(opt, groups, ref))]
        self._fused_step = self._optimiser_fusion(optimizer, groups)
        if self._fused_step is not None:
            self._hook.append(optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self._before_step(opt, groups, ref, args, kwargs)))
        return self

    def _optimiser_fusion(self, optimizer: torch.optim.Optimizer, groups: Sequence[int]
                          ) -> FusedOptimiserStep | None:
        """With the fused update, L1 units and every step: the optimiser's step and the
        update in one loop (:mod:`.fused_step`: plain SGD, Adam and AdamW)."""
        if self._fused is None or self.ord != 1 or self.every != 1 or \
                optimiser_unsupported(optimizer, groups) is not None:
            return None
        return FusedOptimiserStep(self._fused, optimizer, groups)

    def detach(self) -> None:
        """Stop the decoupled update :meth:`attach` registered (nothing if none)."""
        for hook in self._hook or ():
            hook.remove()
        self._hook, self._fused_step, self._early = None, None, None

    def observe(self, loss: torch.Tensor | float) -> None:
        """Feed this step's task loss to a target's controller (it backs off when the loss
        rises); computes nothing else, a no-op for a fixed strength. With :meth:`attach`,
        call it once per step."""
        if self.controller is not None:
            self.controller.observe_loss(float(loss.detach() if isinstance(loss, torch.Tensor)
                                               else loss))

    def _attach_model(self, model: torch.nn.Module | None) -> torch.nn.Module:
        if model is not None:
            return model
        for ref in (self._bound[0] if self._bound is not None else None, self._model_ref):
            if ref is not None and ref() is not None:
                return ref()
        raise RegulariserError("attach(optimizer) does not know the model: pass it, "
                               "reg.attach(optimizer, model), or build the regulariser with "
                               "model=")

    def _after_step(self, optimizer: torch.optim.Optimizer, groups: Sequence[int],
                    ref: "weakref.ref[torch.nn.Module]") -> None:
        """The optimiser's post-step hook: count the step, then the proximal update."""
        model = ref()
        if model is None:
            raise RegulariserError("the model this regulariser was attached with no longer "
                                   "exists: call reg.detach() or attach it to the new model")
        early, self._early = self._early, None
        if early == "done":  # the pre-step hook ran SGD's step and the update together
            self._fused_step.restore()
            return
        params = self._params(model)
        if early != "counted" and not self._counted_step(params):
            return
        self._proximal(params, [lr * self.every for lr in group_lrs(optimizer, groups)])

    def _before_step(self, optimizer: torch.optim.Optimizer, groups: Sequence[int],
                     ref: "weakref.ref[torch.nn.Module]", args: tuple, kwargs: dict) -> None:
        """The optimiser's pre-step hook (fused optimisers only): count the step, then the
        optimiser's step and the update of the penalised weights in one loop; the optimiser
        skips them."""
        model = ref()
        if model is None or len(args) > 1 or kwargs.get("closure") is not None:
            return  # (args[0] is the optimiser) a closure recomputes the gradients: not fused
        params = self._params(model)
        states = self._fused_step.ready(params)
        if states is None:
            return
        self._counted_step(params)  # every == 1: the update is due
        self._early = "counted"
        factors = [lr * self.strength for lr in group_lrs(optimizer, groups)]
        if self._fused_step.step(params, states, self._coefs(params[0].device), factors):
            self._early = "done"

    def proximal(self, model: torch.nn.Module, lr: float | Sequence[float]) -> None:
        """One decoupled update of the model's penalised weights now, with step size ``lr``
        (one number, or one per parameter in :attr:`names` order) times the strength; counts
        no step (what :meth:`attach` runs after each ``optimizer.step()``)."""
        params = self._params(model)
        lrs = [float(lr)] * len(params) if isinstance(lr, (int, float)) else list(lr)
        if len(lrs) != len(params):
            raise RegulariserError(f"proximal(): {len(lrs)} learning rates for "
                                   f"{len(params)} penalised parameters")
        self._proximal(params, lrs)

    def _proximal(self, params: Sequence[torch.Tensor], lrs: Sequence[float]) -> None:
        factors = [lr * self.strength for lr in lrs]
        coefs = self._coefs(params[0].device)
        if self._fused is not None and self._fused(params, coefs, factors):
            return
        proximal_step(self.norms, params, self.ord, coefs, factors)

    def update(self, model: torch.nn.Module) -> float:
        """Update the strength from the model's weights now (whatever the step); returns it.
        Needs a target."""
        if self.controller is None:
            raise RegulariserError("update() adapts the strength to a target: build the "
                                   "regulariser with target_macs=, target_params=, ratio= "
                                   "or selection=")
        self._control(self._params(model))
        return self.strength

    def set_steps(self, steps: int) -> None:
        """Tell a target-driven regulariser how many steps training lasts (before it starts)."""
        if self.controller is None:
            raise RegulariserError("set_steps() is for a target-driven strength: build the "
                                   "regulariser with a target (target_macs=, ...)")
        self.controller.set_steps(steps)

    def value(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty now, without counting a training step (for an evaluation loss)."""
        return self.penalty(self._params(model))

    def mass_left(self, model: torch.nn.Module, selection: Selection | None = None) -> float:
        """The share of the unit-norm mass in the units ``selection`` (default: the target)
        would remove now, each unit's norm divided by its group's mean (at the controller's
        first update, or now)."""
        selection = selection if selection is not None else self.target
        if selection is None:
            raise RegulariserError("mass_left() needs a selection (this regulariser has no "
                                   "target), e.g. etp_fx.Budget(macs=0.25)")
        norms = self.norms.arrays(self.norms.read(self._params(model),
                                                  norm_order(selection.norm)))
        scale = self.controller.scale if self.controller is not None else None
        return removal_share(self.graph, selection, norms, scale,
                             allow_approximate=self.allow_approximate)[1]

    @property
    def target(self) -> Selection | None:
        """The selection that drives the strength, or None for a fixed strength."""
        return self.controller.selection if self.controller is not None else None

    @property
    def left(self) -> float | None:
        """The share of unit-norm mass left in the units the target removes (last update)."""
        last = self.controller.last if self.controller is not None else None
        return last.left if last is not None else None

    # -- monitoring
    def unit_norms(self, model: torch.nn.Module, norm: Any = None) -> dict[str, torch.Tensor]:
        """Each unit set's per-unit norms (detached), in this regulariser's units."""
        u = self.norms.read(self._params(model), norm_order(norm or self.norm))
        return self.norms.split(u)

    def near_zero(self, model: torch.nn.Module, tol: float = 5e-4) -> int:
        """How many units have every weight below ``tol`` in magnitude (the official code's
        clipping threshold): the units a per-epoch clipping would zero out."""
        return int((self.norms.read(self._params(model), math.inf) < tol).sum())

    def summary(self) -> str:
        """A table, one row per unit set: units, pivots, largest distance, force range, group
        factor and multiplier."""
        rows = [("group", "units", "pivots", "d_max", "force min..max", "gamma", "A")]
        for s in self.unit_sets:
            d = self.distances[s.id]
            f = self.force(d)
            piv = self.pivots[s.id]
            rows.append((s.id, str(s.size), ",".join(map(str, piv[:3])) + ("..." if len(piv) > 3
                                                                          else ""),
                         f"{d.max():g}", f"{f.min():.3g}..{f.max():.3g}",
                         f"{self.group_factors[s.id]:.3g}", f"{self.multiplier[s.id]:.4g}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
                 for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"{type(self).__name__}: strength {self.strength:g}, norm {self.norm}, "
                     f"units {self.units}, normalize {self.normalize}, preset {self.preset}; "
                     f"{len(self.unit_sets)} unit sets, {self.norms.n_units} units, "
                     f"{len(self.names)} parameters")
        if self.controller is not None:
            lines.append(f"strength driven by {self.controller!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        target = f", target={self.target!r}" if self.controller is not None else ""
        return (f"{type(self).__name__}(strength={self.strength:g}{target}, norm={self.norm!r}, "
                f"units={self.units!r}, preset={self.preset!r}, {len(self.unit_sets)} unit sets,"
                f" {self.norms.n_units} units)")


# --- argument checks ---------------------------------------------------------------------------

def _check_preset(preset: Any) -> str | None:
    if preset not in (None, "paper"):
        raise RegulariserError(f"preset must be None or 'paper', got {preset!r}")
    return preset


def _check_paper_options(norm, units, distance, pivots, group_pivots, include, base,
                         scale) -> None:
    if norm != "l1" or units != "group" or distance != "index" or pivots is not None \
            or group_pivots is not None or include is not None or base is not None \
            or scale is not None:
        raise RegulariserError(
            "preset='paper' fixes norm, units, distance, pivots, base and scale (the "
            "official recipe); only strength may be changed")


def _check_strength(strength: Any, preset: str | None, targeted: bool) -> float | None:
    """The fixed strength, None when a target will set it, or an error."""
    if strength is None:
        if targeted:
            return None
        if preset != "paper":
            raise RegulariserError(
                "give strength= or a target: target_macs=0.25 (or target_params=, ratio=, "
                "selection=) with steps= lets the target drive the strength, no tuning; a "
                "fixed strength is, with the default normalize='decay', an L1 decay rate "
                "relative to the weights, like weight decay (1 to 2 pruned a small VGG 24x in "
                "30 epochs: see docs/etp.md); or use preset='paper' (raw 1e-5)")
        return 1e-5
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or \
            not math.isfinite(strength) or strength < 0:
        raise RegulariserError(f"strength must be a finite number >= 0, got {strength!r}")
    return float(strength)


def _controller(target: Selection | None, steps: Any, strength: Any, control: Any,
                preset: str | None) -> StrengthController | None:
    if target is None:
        if steps is not None or control is not None:
            raise RegulariserError("steps= and control= go with a target (target_macs=, "
                                   "target_params=, ratio= or selection=)")
        return None
    if preset == "paper":
        raise RegulariserError("preset='paper' is the official recipe with a fixed strength; "
                               "a target drives the strength of the default (group) units: "
                               "drop preset='paper'")
    if control is not None and not isinstance(control, Mapping):
        raise RegulariserError(f"control= takes a dict of StrengthController options "
                               f"(floor=, reach=, interval=, ...), got {type(control).__name__}")
    start = _check_strength(strength, preset, True)
    opts = dict(control or {})
    if start is not None:
        opts["start"] = start
    try:
        return StrengthController(target, steps, **opts)
    except TypeError as e:
        raise RegulariserError(f"control=: {e}; see etp_fx.regularise.controller."
                               f"StrengthController for the options") from None


def _penalty_order(norm: Any) -> float:
    order = norm_order(norm)
    if order not in (1, 2):
        raise RegulariserError(f"norm must be 'l1' or 'l2' for a penalty, got {norm!r}")
    return order


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise RegulariserError(f"every must be an integer >= 1, got {every!r}")
    return every


def _check_normalize(normalize: Any) -> str | None:
    if normalize not in (None, "init", "decay"):
        raise RegulariserError(f"normalize must be 'decay', 'init' or None, got {normalize!r}")
    return normalize


class ExponentialTorque(_TorqueBase):
    """Exponential Torque Pruning: a force growing exponentially with distance from the pivots.

    Parameters
    ----------
    graph : DependencyGraph
        From :func:`etp_fx.trace` on the model you train.
    target_macs, target_params, ratio : float, optional
        The target, as for :func:`etp_fx.compress` (at most one): the share of MACs or params
        to keep, or the share of units to remove. With ``steps`` it drives the strength (no
        strength to tune; see ``docs/etp.md``); compress with the same target afterwards.
    selection : Budget or Ratio, optional
        The target as a selection value instead of a keyword.
    steps : int, optional
        Training steps with a target, one ``reg(model)`` call each (or later with
        :meth:`set_steps`, ``progress(steps=)`` or the Hugging Face callback).
    control : dict, optional
        Options of the :class:`~etp_fx.regularise.controller.StrengthController` (``floor``,
        ``reach``, ``interval``, ``knee``, ...).
    strength : float
        Multiplier of the penalty, for experts (with a target: where the controller starts).
        With ``normalize="decay"`` (default) it is an L1 decay
        rate: an average weight is pulled towards zero by ``lr * strength * f(d)/mean(f)``
        times its own size per SGD step, in every group whatever its width (compare weight
        decay's coefficient). With ``preset="paper"`` it defaults to the paper's raw ``1e-5``.
    base, scale : float
        ``f(d) = base ** (scale * d / (d_max + 1))``; defaults 1.01 and 500 (the paper's: the
        farthest unit carries about ``1.01**500 ~ 145`` times the force of a pivot).
    norm : ``"l1"`` or ``"l2"``
        Norm of a unit's weights (L1 as the paper; L2 is group lasso).
    units : ``"group"`` or ``"producer"``
        Every coupled parameter slice of a unit, or only its output rows.
    distance : str, networkx graph, dict or callable
        ``"index"`` (the chain by index), ``"importance"`` (the chain ordered by the norms at
        construction), a networkx graph over the units, a dict of graphs by group id, or a
        callable ``(unit_set, norms_at_init) -> graph | (graph, pivots)``.
    pivots : list of int, or dict group id -> list of int
        Units at distance 0 (default: 0 for ``index``, the most important for ``importance``).
    preset : None or ``"paper"``
        ``"paper"``: the official recipe, exactly (see docs/etp.md).
    normalize : ``"decay"``, ``"init"`` or None
        ``"init"``: each group's penalty is 1 at construction; None: the raw formula.
    group_pivots : None, ``"stem"``, ``"head"``, or group ids / module names
        Scale each group by ``group_scale ** (D_g / D_max)``, ``D_g`` its hop distance from the
        pivot groups in the group graph (groups sharing a parameter are adjacent).
    include : group ids and/or unit kinds, or a predicate on groups
    allow_approximate : bool
        Also penalise groups whose removal is approximate (for example LayerNorm'd channels).
    model : nn.Module, optional
        Where to read initial norms (default: the traced module, which shares the model's
        parameters at trace time).
    check_finite : bool
        Raise ``FloatingPointError`` with the step number when the penalty is NaN or inf.
    every : int
        Lazy regularisation: apply ``every`` times the penalty on one call in ``every`` and
        return 0 on the others (eager mode only), to cut the per-step cost.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> g = etp_fx.trace(net, torch.randn(1, 4))
    >>> reg = etp_fx.ExponentialTorque(g, strength=1e-3, normalize="init")
    >>> round(reg(net).item(), 6)  # 1 per group at construction, times strength
    0.001
    >>> reg = etp_fx.ExponentialTorque(g, target_macs=0.5, steps=1000)  # no strength to tune
    >>> reg.strength, reg.target.macs
    (0.01, 0.5)
    >>> reg = etp_fx.ExponentialTorque(g, strength=0.5)   # an L1 decay rate
    >>> loss = reg(net)                                  # add to the task loss
    >>> opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    >>> reg = etp_fx.ExponentialTorque(g, target_macs=0.5, steps=1000).attach(opt, net)
    >>> opt.step()                # or: a proximal step after every optimizer step instead
    >>> reg.calls
    1
    """

    def _force_params(self, base, scale):
        base = 1.01 if base is None else float(base)
        scale = 500.0 if scale is None else float(scale)
        if not base > 0 or not math.isfinite(scale):
            raise RegulariserError(f"base must be > 0 and scale finite, got {base}, {scale}")
        return base, scale

    def force(self, d: np.ndarray, at: np.ndarray | float | None = None) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        if at is not None:
            return self.base ** (self.scale * np.asarray(at, dtype=np.float64) / (d.max() + 1.0))
        if self.preset == "paper":  # alpha = 1.01 ** (500 / C), force alpha ** i
            n = len(d)
            return (self.base ** (self.scale / n)) ** d
        return self.base ** (self.scale * d / (d.max() + 1.0))


class Torque(_TorqueBase):
    """Torque, the linear baseline: the force on a unit is ``scale * d`` (pivots feel none).

    Same parameters as :class:`ExponentialTorque` (``base`` is not used)."""

    def _force_params(self, base, scale):
        if base is not None and self.preset != "paper":
            raise RegulariserError("Torque has a linear force: base is not used (give scale)")
        scale = 1.0 if scale is None or self.preset == "paper" else float(scale)
        if not scale > 0 or not math.isfinite(scale):
            raise RegulariserError(f"scale must be a finite number > 0, got {scale}")
        return None, scale

    def force(self, d: np.ndarray, at: np.ndarray | float | None = None) -> np.ndarray:
        return self.scale * np.asarray(d if at is None else at, dtype=np.float64)
