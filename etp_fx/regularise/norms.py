"""Per-unit norms of a model's weights: the one kernel every consumer uses (the penalty, the
selections, the norm history and the training progress bar)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..errors import RegulariserError, SelectionError
from ..graph.signature import check_model_matches
from .units import UnitSet, unit_sets_from_graph, unwrap

try:  # FSDP2 shards parameters as DTensors
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    dist = DTensor = Shard = FSDPModule = None

__all__ = ["UnitNorms", "Sharding", "local_shards", "swaps_parameters", "norm_order",
           "unit_norms"]


def swaps_parameters(model: torch.nn.Module) -> bool:
    """Whether the model's parameter objects change between calls (FSDP2 registers the
    unsharded parameters around forward and the sharded ones after), so a list of them must
    not be kept."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


@dataclass(frozen=True)
class Sharding:
    """Where each parameter's local tensor sits in the whole one: ``(dim, first index, size)``
    along the sharded dim, or None for a parameter every rank holds whole; and the process
    group whose ranks together hold every shard."""

    parts: tuple[tuple[int, int, int] | None, ...]
    group: Any

    @property
    def first(self) -> bool:
        """Whether this is the group's first rank (the one that adds whole parameters)."""
        return dist.get_rank(self.group) == 0


def local_shards(params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], Sharding | None]:
    """FSDP2 parameters (DTensors sharded along one dim) -> their local tensors (``to_local``,
    differentiable: gradients flow back to the DTensors) and where each sits; plain tensors
    pass through with no sharding."""
    if DTensor is None or not any(isinstance(p, DTensor) for p in params):
        return list(params), None
    out, parts, group = [], [], None
    for p in params:
        if not isinstance(p, DTensor):
            out.append(p)
            parts.append(None)
            continue
        placement = p.placements[0] if len(p.placements) == 1 else None
        if placement is None or not (isinstance(placement, Shard) or placement.is_replicate()):
            raise RegulariserError(f"a parameter is a DTensor placed as {p.placements}: the "
                                   f"regulariser reads parameters sharded along one dim over "
                                   f"a 1-D mesh (FSDP2's fully_shard) or replicated")
        mesh, local = p.device_mesh, p.to_local()
        group = mesh.get_group()
        out.append(local)
        if placement.is_replicate():
            parts.append(None)
            continue
        d = placement.dim % p.dim()
        chunk = -(-p.shape[d] // mesh.size())  # torch.chunk: the last shards may be short
        parts.append((d, min(p.shape[d], mesh.get_local_rank() * chunk), local.shape[d]))
    return out, Sharding(tuple(parts), group)


def _unit_dims(unit_sets: Sequence[UnitSet], shapes: Mapping[str, tuple[int, ...]]
               ) -> dict[str, set[int]]:
    """``{parameter name: the dims holding units}``, parameters in first-seen order."""
    dims: dict[str, set[int]] = {}
    for s in unit_sets:
        for name, d, _ in s.slices:
            if name not in shapes:
                raise RegulariserError(f"parameter {name!r} of group {s.id} is not a parameter "
                                       f"of the traced model")
            dims.setdefault(name, set()).add(d)
    return dims


def _narrow(w: torch.Tensor) -> torch.Tensor:
    """``w`` ready for a float32 ``vector_norm``: it widens half precision itself but refuses
    to narrow float64, so float64 weights are cast first (the same values a float32 copy of
    the model would give)."""
    return w.float() if w.dtype == torch.float64 else w


class UnitNorms:
    """Per-unit norms of many unit sets in a few tensor ops.

    Built once from the unit sets and the parameter shapes. Every distinct (parameter, dim)
    that holds units is a *slot*; :meth:`slot_vector` concatenates, for all slots, the norm of
    each index's slice (one reduction per parameter), and a precomputed index turns that into
    per-unit norms with one ``index_add``."""

    def __init__(self, unit_sets: Sequence[UnitSet], shapes: Mapping[str, tuple[int, ...]]):
        self.unit_sets = list(unit_sets)
        dims = _unit_dims(self.unit_sets, shapes)
        self.names = list(dims)
        self.shapes = [tuple(shapes[n]) for n in self.names]
        slot_offset = self._layout_slots(dims)
        self._index_units(slot_offset)
        self._dev: torch.device | None = None
        self._t: dict[str, torch.Tensor] = {}

    def _layout_slots(self, dims: Mapping[str, set[int]]) -> dict[tuple[str, int], int]:
        """Place every (parameter, unit dim) in the slot vector; fills :attr:`specs` (per
        parameter: unit dims, other dims, slot offsets, broadcast shapes of the unit dims) and
        :attr:`length`; returns each slot's offset."""
        self.specs: list[tuple[tuple[int, ...], tuple[int, ...], list[int], list[tuple]]] = []
        slot_offset: dict[tuple[str, int], int] = {}
        off = 0
        for name, shape in zip(self.names, self.shapes):
            nd = len(shape)
            ud = tuple(sorted(dims[name]))
            other = tuple(i for i in range(nd) if i not in dims[name])
            offs, bshapes = [], []
            for d in ud:
                slot_offset[(name, d)] = off
                offs.append(off)
                bshapes.append(tuple(shape[d] if i == d else 1 for i in range(nd)))
                off += shape[d]
            self.specs.append((ud, other, offs, bshapes))
        self.length = off
        return slot_offset

    def _index_units(self, slot_offset: Mapping[tuple[str, int], int]) -> None:
        """The index from slot positions to units (:attr:`src` -> :attr:`dst`), each unit
        set's first unit (:attr:`offsets`) and how many weights each unit owns."""
        self.offsets: dict[str, int] = {}
        n = 0
        src, dst = [], []
        for s in self.unit_sets:
            self.offsets[s.id] = n
            for name, d, coords in s.slices:
                c = np.asarray(coords, dtype=np.int64)
                idx = np.nonzero(c >= 0)[0]
                src.append(slot_offset[(name, d)] + idx)
                dst.append(n + c[idx])
            n += s.size
        self.n_units = n
        self.src = np.concatenate(src) if src else np.zeros(0, np.int64)
        self.dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
        self.unit_numel = np.bincount(self.dst, weights=self._weights_per_slot()[self.src],
                                      minlength=n)
        # each position of the slot vector feeds at most one unit: no gather needed
        self.one_to_one = len(np.unique(self.src)) == len(self.src)
        full = np.full(self.length, n, dtype=np.int64)  # position n: a dump slot
        if self.one_to_one:
            full[self.src] = self.dst
        self.dst_full = full

    def _weights_per_slot(self) -> np.ndarray:
        """How many weights sit behind each slot position (the slice's size)."""
        per_index = np.zeros(self.length)
        for shape, (ud, _, offs, _) in zip(self.shapes, self.specs):
            numel = int(np.prod(shape)) if shape else 1
            for d, o in zip(ud, offs):
                per_index[o: o + shape[d]] = numel // shape[d]
        return per_index

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The index arrays as tensors on ``device`` (built once per device)."""
        if self._dev != device:
            self._t = {"src": torch.as_tensor(self.src, device=device),
                       "dst": torch.as_tensor(self.dst, device=device),
                       "dst_full": torch.as_tensor(self.dst_full, device=device)}
            self._dev = device
        return self._t

    # -- the reductions
    @staticmethod
    def _reduce(w: torch.Tensor, ud: tuple[int, ...], other: tuple[int, ...], ord: float
                ) -> torch.Tensor:
        """Reduce |w| (L1), w**2 (squared L2) or |w| (max) over the ``other`` dims, in float32.

        Output rows of a contiguous weight reduce as one contiguous block with a fused
        ``vector_norm``; other layouts materialise ``|w|`` first (CPU ``vector_norm`` is slow on
        short inner blocks)."""
        if not other:
            m = w.float()
            return m.square() if ord == 2 else m.abs()
        k = len(ud)
        leading = ud == tuple(range(k)) and other == tuple(range(k, w.dim()))
        if leading and w.is_contiguous() and not torch.compiler.is_compiling():
            rows = w.reshape(-1, math.prod(w.shape[k:]))
            if ord == 2 and k == 1:  # CPU's L2 row norm is fast: 8x an elementwise pass
                return torch.linalg.vector_norm(_narrow(rows), 2, dim=1,
                                                dtype=torch.float32).square()
            if ord in (1, 2):  # |w| or w^2 then a BLAS row sum: 2-4x CPU's reductions
                a = rows.float().abs() if ord == 1 else rows.float().square()
                return a.mv(a.new_ones(a.shape[1])).view(w.shape[:k])
        if torch.compiler.is_compiling():  # inductor fuses this into one reduction
            m = torch.linalg.vector_norm(_narrow(w), ord, dim=other, dtype=torch.float32)
            return m.square() if ord == 2 else m
        a = w.float().square() if ord == 2 else w.float().abs()
        return a.amax(dim=other) if ord == math.inf else a.sum(dim=other)

    def slot_parts(self, params: Sequence[torch.Tensor], ord: float) -> list[torch.Tensor]:
        parts = []
        for w, (ud, other, _, _) in zip(params, self.specs):
            m = self._reduce(w, ud, other, ord)
            if len(ud) == 1:
                parts.append(m)
                continue
            for k in range(len(ud)):  # several unit dims of one parameter (rows and columns)
                rest = tuple(j for j in range(len(ud)) if j != k)
                parts.append(m.amax(dim=rest) if ord == math.inf else m.sum(dim=rest))
        return parts

    def slot_vector(self, params: Sequence[torch.Tensor], ord: float,
                    sharding: Sharding | None = None) -> torch.Tensor:
        """For every slot: the L1 norm, the squared L2 norm, or the max |w| of each index's
        slice, concatenated (length :attr:`length`). FSDP2 parameters (DTensors), or local
        shards with their ``sharding``, are reduced across the ranks: every rank gets the
        whole vector."""
        if sharding is None:
            params, sharding = local_shards(params)
        if sharding is not None:
            return self._sharded_slot_vector(params, ord, sharding)
        parts = self.slot_parts(params, ord)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _sharded_slot_vector(self, local: Sequence[torch.Tensor], ord: float,
                             sharding: Sharding) -> torch.Tensor:
        """Each rank places what its shards hold (its own rows of a sharded unit dim, partial
        sums over its rows for the other unit dims, whole parameters on the first rank only)
        into a zero vector; one all-reduce (sum, or max for ``linf``) completes it."""
        full = torch.zeros(self.length, dtype=torch.float32, device=local[0].device)
        parts = iter(self.slot_parts(local, ord))
        for (ud, _, offs, _), part in zip(self.specs, sharding.parts):
            for d, off in zip(ud, offs):
                v = next(parts)
                if part is not None and part[0] == d:
                    full[off + part[1]: off + part[1] + part[2]] += v
                elif part is not None or sharding.first or ord == math.inf:
                    full[off: off + v.numel()] += v
        op = dist.ReduceOp.MAX if ord == math.inf else dist.ReduceOp.SUM
        dist.all_reduce(full, op=op, group=sharding.group)
        return full

    def scatter(self, r: torch.Tensor, ord: float) -> torch.Tensor:
        """Slot vector -> per-unit sums (or maxima)."""
        t = self.tensors(r.device)
        if not self.one_to_one:
            r = r.index_select(0, t["src"])
            idx = t["dst"]
        else:
            idx = t["dst_full"]
        base = r.new_zeros(self.n_units + 1)
        if ord == math.inf:
            return base.scatter_reduce(0, idx, r, reduce="amax", include_self=True)[: self.n_units]
        return base.index_add(0, idx, r)[: self.n_units]

    def values(self, params: Sequence[torch.Tensor], ord: float = 2) -> torch.Tensor:
        """All units' norms, concatenated in unit-set order (``offsets`` gives each start)."""
        u = self.scatter(self.slot_vector(params, ord), ord)
        return sqrt0(u) if ord == 2 else u

    def slot_coefficients(self, unit_coef: torch.Tensor) -> torch.Tensor:
        """Per-unit coefficients -> per-slot-position coefficients (sum over the units each
        position feeds)."""
        t = self.tensors(unit_coef.device)
        out = unit_coef.new_zeros(self.length)
        return out.index_add(0, t["src"], unit_coef.index_select(0, t["dst"]))

    @staticmethod
    def localise(coefs: Sequence[torch.Tensor], sharding: Sharding | None
                 ) -> list[torch.Tensor]:
        """Per-parameter coefficients (from :meth:`broadcast`) cut to each rank's shard."""
        if sharding is None:
            return list(coefs)
        out = []
        for c, part in zip(coefs, sharding.parts):
            if part is not None and c.shape[part[0]] > 1:
                c = c.narrow(part[0], part[1], part[2])
            out.append(c)
        return out

    def broadcast(self, slot_coef: torch.Tensor) -> list[torch.Tensor]:
        """Per parameter, the per-element coefficient as a small broadcastable tensor: the sum
        of the slot coefficients of its unit dims (shape ``[O, I, 1, 1]`` for a conv weight in
        two groups)."""
        out = []
        for ud, _, offs, bshapes in self.specs:
            c = None
            for off, bs in zip(offs, bshapes):
                n = max(bs)
                part = slot_coef[off: off + n].view(bs)
                c = part if c is None else c + part
            out.append(c)
        return out

    def per_parameter(self, unit_coef: torch.Tensor, sharding: Sharding | None = None
                      ) -> list[torch.Tensor]:
        """Per-unit coefficients -> each parameter's broadcastable coefficient (the sum over
        the units each element feeds), cut to this rank's shard."""
        return self.localise(self.broadcast(self.slot_coefficients(unit_coef)), sharding)

    @torch.no_grad()
    def l2_scale(self, params: Sequence[torch.Tensor], unit_coef: torch.Tensor,
                 sharding: Sharding | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every unit's L2 norm ``N_u`` (reduced across shards) and ``c_u / N_u`` (0 where
        ``N_u = 0``): ``d(c_u N_u)/dw = w * c_u / N_u``, the L2 penalty's gradient and its
        group soft-threshold's scale."""
        u = sqrt0(self.scatter(self.slot_vector(params, 2, sharding), 2))
        scale = torch.where(u > 0, unit_coef / u.clamp_min(1e-30), torch.zeros_like(u))
        return u, scale

    def split(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """All units' values -> ``{unit set id: its units' values}`` (views)."""
        return {s.id: u[self.offsets[s.id]: self.offsets[s.id] + s.size] for s in self.unit_sets}

    # -- reading a model: what every consumer (penalty, selection, history, bar) calls
    def parameters(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """The model's tensors in :attr:`names` order (DDP / compile wrappers unwrapped)."""
        model = unwrap(model)
        return [model.get_parameter(n) for n in self.names]

    @torch.no_grad()
    def read(self, source: torch.nn.Module | Sequence[torch.Tensor], ord: float = 2
             ) -> torch.Tensor:
        """Every unit's norm now, detached: from a model or from its tensors in :attr:`names`
        order. ``ord``: 1, 2 or ``math.inf`` (see :func:`norm_order`)."""
        params = self.parameters(source) if isinstance(source, torch.nn.Module) else source
        return self.values([p.detach() for p in params], ord)

    def arrays(self, u: torch.Tensor) -> dict[str, np.ndarray]:
        """All units' values -> ``{unit set id: float64 numpy array}``."""
        return {k: v.cpu().double().numpy() for k, v in self.split(u).items()}


def sqrt0(u: torch.Tensor) -> torch.Tensor:
    """sqrt with sqrt(0) = 0 exactly and a zero (not NaN) gradient there."""
    return torch.where(u > 0, u.clamp_min(1e-30).sqrt(), torch.zeros_like(u))


_ORD = {"l1": 1, "l2": 2, "linf": math.inf, 1: 1, 2: 2, math.inf: math.inf}


def norm_order(norm: Any) -> float:
    """``"l1"`` -> 1, ``"l2"`` -> 2, ``"linf"`` -> ``math.inf`` (numbers pass through)."""
    try:
        return _ORD[norm]
    except (KeyError, TypeError):
        raise RegulariserError(f"norm must be 'l1', 'l2' (or 'linf' for monitoring), got "
                               f"{norm!r}") from None


def unit_norms(graph, model: torch.nn.Module, *, norm: Any = "l2", units: str = "group",
               include: Any = None, allow_approximate: bool = False) -> dict[str, np.ndarray]:
    """Per-unit norms of each group, as numpy arrays (``norm``: ``l1``, ``l2`` or ``linf``).

    ``units`` must match how the model was trained: a model trained with
    ``units="producer"`` has zero output rows but non-zero consumer columns."""
    model = unwrap(model)
    check_model_matches(graph, model)
    sets = unit_sets_from_graph(graph, units=units, include=include,
                                allow_approximate=allow_approximate)
    if not sets:
        return {}
    un = UnitNorms(sets, dict(graph.signature))
    params = un.parameters(model)
    meta = next((n for n, p in zip(un.names, params) if p.is_meta), None)
    if meta is not None:  # no values to rank (a model built on the meta device to plan)
        raise SelectionError(
            f"parameter {meta!r} is on the meta device: a norm-based selection ranks units by "
            f"their weights' norms, which a meta tensor does not hold. Load real weights, or "
            f"name the units to remove with an etp_fx.Plan({{group id: [unit indices]}})")
    return un.arrays(un.read(params, norm_order(norm)))
