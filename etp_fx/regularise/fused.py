"""The decoupled update as one compiled pass over each weight (``attach(optimizer, fused=...)``).

The eager update (:mod:`.decoupled`) costs several passes over every penalised weight: abs,
a broadcast subtract, a clamp and a copysign, each a kernel of its own, and on CPU the
subtract's operand broadcast over 3x3 blocks (or a full-size coefficient matrix for a linear
weight) is slow. Measured at one thread on ResNet-18's 11.2 M weights: 22 ms eager against
1.7 ms for one plain in-place pass (docs/regulariser_overhead.md).

Here the whole update is one ``torch.compile``d function, so inductor emits one loop per
weight that reads each weight once and writes it once. To keep that loop a plain vectorised
one, each weight is seen as a matrix ``[shape[0], rest]`` (``[1, n]`` for a vector): its
per-element coefficient, a sum of parts that each vary along one unit dim, is then ``row[o] +
col[j]`` (the dim-0 part, and the other parts laid out over the ``rest`` columns), two short
vectors instead of a 4-D broadcast.

The compiled code runs on one thread: the update is memory-bound and short (one read and one
write per weight), so a thread team would be woken once per weight for little gain (with
sleeping OpenMP waiters it made ViT-tiny's update 4x slower), while the training step, whose
cost grows with the same weights times the batch, keeps every thread.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import RegulariserError
from .norms import UnitNorms

__all__ = ["FusedProximal", "FUSED_MIN_STEPS", "row_col_layout", "row_col", "resolve_fused",
           "warn_unfused", "shrink_l1", "compile_one_thread", "per_weight"]

# fused=None turns the fused update on for a target-driven run of at least this many steps:
# the compile costs 10-30 s once (2-4 s from a warm cache) against a few ms saved per step.
FUSED_MIN_STEPS = 5000


@dataclass(frozen=True)
class RowCol:
    """Where one weight's coefficient parts sit in the slot vector, seen as a matrix
    ``[rows, cols]``: ``row`` the slot offset of its dim-0 units (None if none), ``cols``
    ``(offset, dim)`` of its other unit dims, ``shape`` the weight's own shape."""

    rows: int
    cols: int
    row: int | None
    col_parts: tuple[tuple[int, int], ...]
    shape: tuple[int, ...]


def row_col_layout(norms: UnitNorms) -> list[RowCol]:
    """Every penalised weight's :class:`RowCol`, in :attr:`UnitNorms.names` order."""
    out = []
    for shape, (ud, _, offs, _) in zip(norms.shapes, norms.specs):
        matrix = len(shape) > 1
        rows = shape[0] if matrix else 1
        row = next((o for d, o in zip(ud, offs) if d == 0 and matrix), None)
        cols = tuple((o, d) for d, o in zip(ud, offs) if not (d == 0 and matrix))
        out.append(RowCol(rows, math.prod(shape) // rows, row, cols, tuple(shape)))
    return out


def row_col(layout: Sequence[RowCol], slot: torch.Tensor
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-slot-position values (a coefficient or a scale) -> each weight's ``[rows, 1]`` and
    ``[1, cols]`` parts, whose sum is the value at every element of the weight's matrix view
    (zeros where it has no unit along that side)."""
    rows, cols = [], []
    for rc in layout:
        r = (slot[rc.row: rc.row + rc.rows] if rc.row is not None
             else slot.new_zeros(rc.rows))
        rows.append(r.view(rc.rows, 1))
        c = slot.new_zeros(rc.shape[1:] if len(rc.shape) > 1 else rc.shape)
        for off, d in rc.col_parts:
            at = d - 1 if len(rc.shape) > 1 else d  # position among the column dims
            view = [1] * c.dim()
            view[at] = c.shape[at]
            c = c + slot[off: off + c.shape[at]].view(view)
        cols.append(c.reshape(1, rc.cols))
    return rows, cols


def shrink_l1(s: torch.Tensor, f: torch.Tensor, r: torch.Tensor, c: torch.Tensor
              ) -> torch.Tensor:
    """``sign(s) * max(|s| - f * (row + col), 0)``: the L1 proximal step of a weight's
    matrix view ``s`` (an expression to compile into a loop, not a kernel of its own)."""
    return torch.copysign((s.abs() - (f * (r + c)).to(s.dtype)).clamp_min(0), s)


def _soft_threshold(params: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
                    cols: Sequence[torch.Tensor], factors: torch.Tensor) -> None:
    # the L1 proximal step, one pass per weight
    for i, (w, r, c) in enumerate(zip(params, rows, cols)):
        w2 = w.view(r.shape[0], c.shape[1])
        w2.copy_(shrink_l1(w2, factors[i], r, c))


def _group_shrink(norms: UnitNorms, layout: Sequence[RowCol], params: Sequence[torch.Tensor],
                  unit_coef: torch.Tensor, factors: torch.Tensor) -> None:
    # w *= max(0, 1 - f * sum_u c_u / N_u): the L2 (group) proximal step; the norms' reduction
    # (the one norm kernel, traced) and the scaled write are two loops
    _, scale = norms.l2_scale(params, unit_coef)
    rows, cols = row_col(layout, norms.slot_coefficients(scale))
    for i, (w, r, c) in enumerate(zip(params, rows, cols)):
        w2 = w.view(r.shape[0], c.shape[1])
        w2.mul_((1 - factors[i] * (r + c)).clamp_min(0).to(w2.dtype))


class FusedProximal:
    """The proximal update of one regulariser's weights as one compiled function.

    Built once per regulariser; compiles on the first call (``torch.compile``, inductor, one
    thread). ``unsupported(params)`` says why a parameter list cannot take it (then the
    eager update runs). Same values as :func:`.decoupled.proximal_step` up to rounding."""

    def __init__(self, norms: UnitNorms, ord: float) -> None:
        if ord not in (1, 2):
            raise RegulariserError(f"the fused update is for L1 or L2 penalties, got ord={ord}")
        self.norms, self.ord = norms, ord
        self.layout = row_col_layout(norms)
        self._fn: Callable | None = None
        self.compiled = self.broken = False
        self._key: tuple | None = None
        self._ws: list[torch.Tensor] | None = None
        self._l1: tuple[torch.device, list, list] | None = None

    @staticmethod
    def unsupported(params: Sequence[torch.Tensor]) -> str | None:
        """Why these parameters cannot take the fused update, or None if they can."""
        for p in params:
            if type(p.data) is not torch.Tensor:  # a DTensor (FSDP2) or another subclass
                return f"a parameter is a {type(p.data).__name__} (the eager update handles it)"
            if not p.is_contiguous():
                return "a parameter is not contiguous (channels_last or a view)"
            if not p.is_floating_point():
                return f"a parameter has dtype {p.dtype}"
        return None

    def __call__(self, params: Sequence[torch.Tensor], coefs: dict, factors: Sequence[float]
                 ) -> bool:
        """One update in place, or False if these parameters cannot take it (the caller then
        runs the eager one). ``factors`` is ``lr * strength`` per parameter, ``coefs`` the
        regulariser's coefficient tensors (``"slot"`` for L1, ``"unit"`` for L2). If the
        first call cannot compile (no C++ compiler, ...) it warns once and returns False from
        then on."""
        ws = None if self.broken else self.views(params)
        if ws is None:
            return False
        if self._fn is None:
            self._fn = self._compile()
        try:
            self._run(ws, coefs, factors)
        except Exception as err:  # only the first call compiles; later errors are real
            if self.compiled:
                raise
            self.broken = True
            warn_unfused(err)
            return False
        self.compiled = True
        return True

    def views(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """Detached aliases of the parameters (None if unsupported), kept while the same
        storages back the same parameters: building them costs a tenth of a small model's
        update."""
        key = tuple((id(p), p.data_ptr()) for p in params)
        if key != self._key:
            ok = self.unsupported(params) is None
            self._ws, self._key = ([p.detach() for p in params] if ok else None), key
        return self._ws

    def _run(self, ws: Sequence[torch.Tensor], coefs: dict, factors: Sequence[float]
             ) -> None:
        dev = ws[0].device
        f = per_weight(factors, dev)
        self.norms.tensors(dev)  # built here, not as a side effect inside the compiled code
        with torch.no_grad():
            if self.ord == 1:
                rows, cols = self.l1_parts(coefs["slot"], dev)
                self._fn(ws, rows, cols, f)
            else:
                self._fn(ws, coefs["unit"], f)

    def forget_coefficients(self) -> None:
        """The regulariser's coefficients changed: rebuild the L1 parts on the next call."""
        self._l1 = None

    def l1_parts(self, slot: torch.Tensor, dev: torch.device) -> tuple[list, list]:
        if self._l1 is None or self._l1[0] != dev:
            self._l1 = (dev, *row_col(self.layout, slot.to(dev)))
        return self._l1[1], self._l1[2]

    def _compile(self) -> Callable:
        if self.ord == 1:
            fn = _soft_threshold
        else:
            def fn(params, unit_coef, factors):
                _group_shrink(self.norms, self.layout, params, unit_coef, factors)
        return compile_one_thread(fn)


def compile_one_thread(fn: Callable) -> Callable:
    """``fn`` compiled whole (inductor, static shapes) into one-thread loops (see the module
    docstring for why one thread)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp.threads": 1})


def per_weight(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-weight numbers (``lr * strength``, optimiser settings) as a float32 tensor: an
    input of the compiled loops, so new values each step need no recompile."""
    return torch.tensor(list(values), dtype=torch.float32, device=device)


def resolve_fused(fused: bool | None, steps: int | None, params: Sequence[torch.Tensor]
                  ) -> bool:
    """Whether :meth:`attach` uses the fused update. ``None`` (auto): on CPU, for a run of at
    least :data:`FUSED_MIN_STEPS` steps whose parameters it supports. ``True``: always, or a
    :class:`RegulariserError` saying why it cannot."""
    why = FusedProximal.unsupported(params)
    if fused is None:
        return (why is None and steps is not None and steps >= FUSED_MIN_STEPS
                and all(p.device.type == "cpu" for p in params))
    if fused and why is not None:
        raise RegulariserError(f"attach(fused=True): {why}; use fused=False (the eager "
                               f"update, same values)")
    return bool(fused)


def warn_unfused(err: Exception) -> None:
    """The fused update could not compile here: say so once, the eager update runs."""
    warnings.warn(f"the fused decoupled update did not compile ({type(err).__name__}: "
                  f"{err}); using the eager update (same values, slower). Pass fused=False "
                  f"to attach() to silence this.", RuntimeWarning, stacklevel=4)
