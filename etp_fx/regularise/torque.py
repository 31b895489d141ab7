"""Exponential Torque (ETP) and linear Torque penalties: vectorised, differentiable, compilable.

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
from .norms import UnitNorms, norm_order, sqrt0
from .units import UnitSet, paper_unit_sets, unit_sets_from_graph, unwrap
from ..graph.distance import check_pivots, group_distances, multi_source_distances, \
    resolve_unit_graph

__all__ = ["ExponentialTorque", "Torque"]



# --- unit sets ---------------------------------------------------------------------------------













# --- the vectorised norm machinery ----------------------------------------------------------





class _Penalty(torch.autograd.Function):
    """``sum_u c_u N_u(W)`` with a hand-written backward: one pass per parameter
    (``sgn(W) * C`` for L1, ``W * C / N`` for L2, ``C`` broadcast from the unit dims).

    Used in eager mode, where autograd's generic reduction backward costs several passes over
    each weight; under ``torch.compile`` the plain differentiable formula is used instead."""

    @staticmethod
    def forward(ctx, norms: "UnitNorms", ord: float, coef: torch.Tensor,
                coef_bcast: list[torch.Tensor] | None, *params: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            r = norms.slot_vector(params, ord)
            if ord == 1:  # coef: per slot position
                pen = torch.dot(r, coef)
                scale = None
            else:
                u = sqrt0(norms.scatter(r, 2))
                pen = torch.dot(u, coef)
                scale = coef / u  # d N_u / d w = w / N_u
                scale = torch.where(u > 0, scale, torch.zeros_like(scale))
        ctx.norms, ctx.ord, ctx.coef_bcast, ctx.scale = norms, ord, coef_bcast, scale
        ctx.save_for_backward(*params)
        return pen

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        params = ctx.saved_tensors
        norms = ctx.norms
        if ctx.ord == 1:
            cb = ctx.coef_bcast
        else:
            cb = norms.broadcast(norms.slot_coefficients(ctx.scale))
        grads = []
        for i, (w, c) in enumerate(zip(params, cb)):
            if not ctx.needs_input_grad[4 + i]:
                grads.append(None)
                continue
            c = (c * g).to(w.dtype)
            grads.append(w.sgn().mul_(c) if ctx.ord == 1 else w * c)
        return (None, None, None, None, *grads)










# --- the penalties -----------------------------------------------------------------------------

class _TorqueBase:
    """Shared machinery of :class:`ExponentialTorque` and :class:`Torque`."""

    kind = "base"

    def __init__(self, graph, *, strength: float | None = None, base: float | None = None,
                 scale: float | None = None, norm: str = "l1", units: str = "group",
                 distance: Any = "index", pivots: Any = None, preset: str | None = None,
                 normalize: str | None = "decay", group_pivots: Any = None,
                 group_scale: float = 10.0, include: Any = None, allow_approximate: bool = False,
                 model: torch.nn.Module | None = None, check_finite: bool = True,
                 every: int = 1) -> None:
        if preset not in (None, "paper"):
            raise RegulariserError(f"preset must be None or 'paper', got {preset!r}")
        if strength is None:
            if preset != "paper":
                raise RegulariserError(
                    "give strength= (with the default normalize='decay' it is an L1 decay rate "
                    "relative to the weights, like weight decay; 1 to 2 pruned a small VGG "
                    "24x in 30 epochs: see docs/etp.md), or use preset='paper' (raw 1e-5)")
            strength = 1e-5
        if not isinstance(strength, (int, float)) or isinstance(strength, bool) or \
                not math.isfinite(strength) or strength < 0:
            raise RegulariserError(f"strength must be a finite number >= 0, got {strength!r}")
        self.graph = graph
        self.strength = float(strength)
        self.preset = preset
        self.norm = norm
        self.ord = norm_order(norm)
        if self.ord not in (1, 2):
            raise RegulariserError(f"norm must be 'l1' or 'l2' for a penalty, got {norm!r}")
        self.check_finite = check_finite
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise RegulariserError(f"every must be an integer >= 1, got {every!r}")
        self.every = every
        self.calls = 0
        self.last_value: torch.Tensor | None = None
        self._bound: tuple[Any, list[torch.Tensor]] | None = None
        shapes = dict(graph.signature)
        if preset == "paper":
            if norm != "l1" or units != "group" or distance != "index" or pivots is not None \
                    or group_pivots is not None or include is not None or base is not None \
                    or scale is not None:
                raise RegulariserError(
                    "preset='paper' fixes norm, units, distance, pivots, base and scale (the "
                    "official recipe); only strength may be changed")
            self.units = "producer"
            sets = paper_unit_sets(graph)
            normalize = None
            base, scale = 1.01, 500.0
            if not sets:
                raise RegulariserError("empty unit graph: the model has no Conv or Linear "
                                       "weight with more than 10 outputs for preset='paper'")
        else:
            self.units = units
            sets = unit_sets_from_graph(graph, units=units, include=include,
                                        allow_approximate=allow_approximate)
            if not sets:
                why = (f"{len(graph.groups)} groups, "
                       f"{sum(not g.exact for g in graph.groups)} approximate")
                raise RegulariserError(
                    f"empty unit graph: no units to penalise ({why}; units={units!r}, "
                    f"include={include!r}). Check graph.summary() and graph.barriers, or pass "
                    f"allow_approximate=True.")
        if normalize not in (None, "init", "decay"):
            raise RegulariserError(f"normalize must be 'decay', 'init' or None, got "
                                   f"{normalize!r}")
        self.normalize = normalize
        self.base, self.scale = self._force_params(base, scale)
        self.unit_sets = sets
        self.norms = UnitNorms(sets, shapes)
        self.names = self.norms.names

        # values at construction: for importance order and the init normalisation
        init = None
        needs_values = normalize is not None or (isinstance(distance, str) and
                                               distance == "importance") or callable(distance)
        if needs_values:
            init = self._initial_norms(model)

        # distances and forces
        self.pivots: dict[str, list[int]] = {}
        self.distances: dict[str, np.ndarray] = {}
        self.unit_graphs: dict[str, Any] = {}
        for s in sets:
            vals = init[s.id] if init is not None else None
            G, default_piv = resolve_unit_graph(distance, s, vals)
            piv = self._pivots_for(s, pivots, default_piv)
            self.unit_graphs[s.id] = G
            self.pivots[s.id] = piv
            self.distances[s.id] = multi_source_distances(G, piv, s.size, f"group {s.id}")
        self.group_factors = {s.id: 1.0 for s in sets}
        if group_pivots is not None:
            if preset == "paper":
                raise RegulariserError("group_pivots is not part of the paper preset")
            gd = group_distances(graph, group_pivots, [graph[s.id] for s in sets])
            dmax = max(gd.values()) or 1.0
            self.group_factors = {s.id: float(group_scale) ** (gd[s.id] / dmax) for s in sets}
        coef = np.zeros(self.norms.n_units)
        self.multiplier: dict[str, float] = {}
        for s in sets:
            o = self.norms.offsets[s.id]
            f = self.force(self.distances[s.id])
            a = self._multiplier(f, init[s.id] if init is not None else None,
                                 self.norms.unit_numel[o: o + s.size])
            self.multiplier[s.id] = a
            coef[o: o + s.size] = f * a * self.group_factors[s.id]
        self.coef = coef
        # L1: sum_u c_u * sum_{i in u} r_i = sum_i r_i * c_{unit(i)}; no scatter needed
        coef_slot = np.zeros(self.norms.length)
        np.add.at(coef_slot, self.norms.src, coef[self.norms.dst])
        self.coef_slot = coef_slot
        self._dev: torch.device | None = None
        self._coef_t: dict[str, Any] = {}
        self.fast_backward = True  # the hand-written backward in eager mode (same values)

    # -- subclass hooks
    def _force_params(self, base, scale):
        raise NotImplementedError

    def force(self, d: np.ndarray) -> np.ndarray:
        """The force on units at distances ``d`` (one unit set)."""
        raise NotImplementedError

    # -- construction helpers
    def _multiplier(self, f: np.ndarray, n0: np.ndarray | None, numel: np.ndarray) -> float:
        """``A_g`` in ``coef_u = gamma_g * f(d_u) * A_g`` (see docs/etp.md)."""
        if self.normalize is None:
            return 1.0 / len(f)  # the paper's 1 / C
        if self.normalize == "init":  # P_g(W_0) = 1
            z = float(np.dot(f, n0)) / len(f)
            return 1.0 / (len(f) * z) if z > 0 else 1.0 / len(f)
        # "decay": the pull on an average weight, relative to its size at construction, is
        # strength * f(d_u) / mean f: an L1 decay rate, like weight decay's coefficient
        total = float(numel.sum())
        fbar = float(np.dot(f, numel)) / total if total else 0.0
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
        params = [src.get_parameter(n) for n in self.names]
        if any(p.device.type == "meta" for p in params):
            raise RegulariserError(
                "the traced parameters live on the meta device, so their norms at "
                "initialisation are unknown: pass model= (with real weights) or normalize=None")
        with torch.no_grad():
            u = self.norms.values([p.detach() for p in params], self.ord)
        if not torch.isfinite(u).all():
            bad = [n for n, p in zip(self.names, params) if not torch.isfinite(p).all()]
            raise FloatingPointError(f"non-finite values in parameters {bad[:3]} at "
                                     f"construction")
        return {k: v.cpu().double().numpy() for k, v in self.norms.split(u).items()}

    # -- call
    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        model = unwrap(model)
        if torch.compiler.is_compiling():
            return [model.get_parameter(n) for n in self.names]
        b = self._bound
        if b is not None and b[0]() is model:
            return b[1]
        check_model_matches(self.graph, model)
        params = [model.get_parameter(n) for n in self.names]
        self._bound = (weakref.ref(model), params)
        return params

    def _coefs(self, device: torch.device) -> dict[str, Any]:
        if self._dev != device:
            slot = torch.as_tensor(self.coef_slot, dtype=torch.float32, device=device)
            self._coef_t = {"slot": slot,
                            "unit": torch.as_tensor(self.coef, dtype=torch.float32,
                                                    device=device),
                            "bcast": self.norms.broadcast(slot)}
            self._dev = device
        return self._coef_t

    def penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The penalty of these parameter tensors (in :attr:`names` order), pure."""
        c = self._coefs(params[0].device)
        if torch.compiler.is_compiling() or not self.fast_backward:
            if self.ord == 1:
                return self.strength * torch.dot(self.norms.slot_vector(params, 1), c["slot"])
            return self.strength * torch.dot(self.norms.values(params, 2), c["unit"])
        if self.ord == 1:
            pen = _Penalty.apply(self.norms, 1, c["slot"], c["bcast"], *params)
        else:
            pen = _Penalty.apply(self.norms, 2, c["unit"], None, *params)
        return self.strength * pen

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        """The penalty for the model's current parameters: a differentiable scalar.

        With ``every=k > 1`` (lazy regularisation, eager mode only) the penalty is applied on
        one call in ``k``, multiplied by ``k``, and 0 is returned on the other calls;
        :attr:`last_value` always holds the last penalty actually computed (unscaled)."""
        if torch.compiler.is_compiling():
            if self.every != 1:
                raise RegulariserError("every > 1 needs a call counter, which a compiled step "
                                       "cannot keep: use every=1 inside torch.compile")
            return self.penalty(self._params(model))
        self.calls += 1
        params = self._params(model)
        if self.every > 1 and (self.calls - 1) % self.every:
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

    # -- monitoring
    def unit_norms(self, model: torch.nn.Module, norm: Any = None) -> dict[str, torch.Tensor]:
        """Each unit set's per-unit norms (detached), in this regulariser's units."""
        params = self._params(model)
        with torch.no_grad():
            u = self.norms.values([p.detach() for p in params], norm_order(norm or self.norm))
        return self.norms.split(u)

    def near_zero(self, model: torch.nn.Module, tol: float = 5e-4) -> int:
        """How many units have every weight below ``tol`` in magnitude (the official code's
        clipping threshold): the units a per-epoch clipping would zero out."""
        params = self._params(model)
        with torch.no_grad():
            u = self.norms.values([p.detach() for p in params], math.inf)
        return int((u < tol).sum())

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
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strength={self.strength:g}, norm={self.norm!r}, "
                f"units={self.units!r}, preset={self.preset!r}, {len(self.unit_sets)} unit sets,"
                f" {self.norms.n_units} units)")


class ExponentialTorque(_TorqueBase):
    """Exponential Torque Pruning: a force growing exponentially with distance from the pivots.

    Parameters
    ----------
    graph : DependencyGraph
        From :func:`etp_fx.trace` on the model you train.
    strength : float
        Multiplier of the penalty. With ``normalize="decay"`` (default) it is an L1 decay
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
    >>> reg = etp_fx.ExponentialTorque(g, strength=0.5)   # an L1 decay rate
    >>> loss = reg(net)                                  # add to the task loss
    """

    kind = "exponential"

    def _force_params(self, base, scale):
        base = 1.01 if base is None else float(base)
        scale = 500.0 if scale is None else float(scale)
        if not base > 0 or not math.isfinite(scale):
            raise RegulariserError(f"base must be > 0 and scale finite, got {base}, {scale}")
        return base, scale

    def force(self, d: np.ndarray) -> np.ndarray:
        d = np.asarray(d, dtype=np.float64)
        if self.preset == "paper":  # alpha = 1.01 ** (500 / C), force alpha ** i
            n = len(d)
            return (self.base ** (self.scale / n)) ** d
        return self.base ** (self.scale * d / (d.max() + 1.0))


class Torque(_TorqueBase):
    """Torque, the linear baseline: the force on a unit is ``scale * d`` (pivots feel none).

    Same parameters as :class:`ExponentialTorque` (``base`` is not used)."""

    kind = "linear"

    def _force_params(self, base, scale):
        if base is not None and self.preset != "paper":
            raise RegulariserError("Torque has a linear force: base is not used (give scale)")
        scale = 1.0 if scale is None or self.preset == "paper" else float(scale)
        if not scale > 0 or not math.isfinite(scale):
            raise RegulariserError(f"scale must be a finite number > 0, got {scale}")
        return None, scale

    def force(self, d: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(d, dtype=np.float64)
