"""One comparison of two outputs of a model (or of two models) on the same inputs.

Every place that asks "do these outputs agree?" uses :func:`compare_outputs` and says its
own tolerance through :meth:`Comparison.within`: the fast capture against the model
(:func:`etp_fx.capture.check_capture`), two eager runs of one model
(:func:`etp_fx.capture.check_deterministic`, :func:`outputs_agree`), and the compressed model
against the zeroed original (:mod:`etp_fx.surgery.verify`). What is compared:

- the interface: the number of outputs, and each tensor's shape and dtype
  (:attr:`Comparison.interface`); the pytree structure (:attr:`Comparison.same_structure`);
- floating (and complex) tensors by their largest absolute difference, against the largest
  finite absolute value of the reference (its scale), over all of them and per output; a NaN
  compares equal only to a NaN at the same position, an infinity only to the same infinity;
- integer and boolean tensors element by element;
- plain values (numbers, strings, bytes, None) for equality; other objects (a key/value
  cache object, say) are not compared.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["Comparison", "compare_outputs", "interface_difference", "outputs_agree"]

#: output values compared for equality; any other object is not compared
PLAIN = (numbers.Number, str, bytes, type(None))


@dataclass(frozen=True)
class Comparison:
    """How far one output is from a reference output."""

    max_abs_diff: float  # over the floating outputs (inf where a NaN appeared on one side)
    output_scale: float  # the largest finite |reference| over the floating outputs
    exact_compared: int  # integer/boolean elements and plain values, compared for equality
    exact_mismatches: int  # how many of them differ
    elements: int  # tensor elements in the reference
    per_output: tuple[tuple[float, float], ...] = ()  # (diff, scale) per floating output
    same_structure: bool = True  # the same pytree structure (tuple vs list, dict keys)
    interface: str | None = None  # how the outputs differ in number, shape or dtype

    @property
    def rel_diff(self) -> float:
        """The largest difference relative to the output's scale."""
        return self.max_abs_diff / max(self.output_scale, 1e-300)

    def within(self, rtol: float, *, per_output: bool = False, floor: float = 1e-12) -> bool:
        """The outputs agree: the same interface, every integer/boolean element and plain value
        equal, and floating differences at most ``rtol`` times the scale, which is at least
        ``floor``. ``per_output``: each output against its own scale (an output of small
        values next to one of large values is held to its own), else all against the largest.
        """
        if self.interface is not None or self.exact_mismatches:
            return False
        if per_output:
            return all(d <= rtol * max(s, floor) for d, s in self.per_output)
        return self.max_abs_diff <= rtol * max(self.output_scale, floor)


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).replace('torch.', '')} tensor of shape {list(v.shape)}"
    return type(v).__name__


def interface_difference(reference: Any, got: Any,
                         names: tuple[str, str] = ("the model", "reference")) -> str | None:
    """How ``got`` differs from ``reference`` in the number of outputs or a tensor's shape or
    dtype, or None. ``names`` (what returned ``got``, what returned ``reference``) word it:
    ``"the model returns 2 outputs, the reference 3"``, ``"output 0 of the model is a float32
    tensor of shape [2, 4], the reference's a float32 tensor of shape [2, 5]"``."""
    ref, out = pytree.tree_leaves(reference), pytree.tree_leaves(got)
    subject, other = names
    if len(ref) != len(out):
        return f"{subject} returns {len(out)} outputs, the {other} {len(ref)}"
    for k, (r, o) in enumerate(zip(ref, out)):
        tensors = isinstance(r, torch.Tensor), isinstance(o, torch.Tensor)
        if tensors == (True, True) and (o.shape != r.shape or o.dtype != r.dtype) or \
                tensors in ((True, False), (False, True)):
            return f"output {k} of {subject} is {_describe(o)}, the {other}'s {_describe(r)}"
    return None


def _float_diff(r: torch.Tensor, o: torch.Tensor) -> tuple[float, float]:
    """(largest |r - o|, largest finite |r|); equal values (infinities too) and NaNs at the
    same positions count as no difference, a NaN on one side only as an infinite one."""
    r64 = r.detach().to(torch.complex128 if r.is_complex() else torch.float64)
    o64 = o.detach().to(r64.dtype)
    d = (r64 - o64).abs()
    same = (r64 == o64) | (torch.isnan(r64) & torch.isnan(o64))
    d = torch.where(same, torch.zeros_like(d), d).nan_to_num(nan=math.inf)
    finite = r64.abs()[torch.isfinite(r64)]
    return float(d.max()), float(finite.max()) if finite.numel() else 0.0


def compare_outputs(reference: Any, got: Any) -> Comparison:
    """Compare ``got`` with ``reference`` (outputs of one call each); see the module doc.

    Nothing is refused here: a different interface is reported in
    :attr:`Comparison.interface` (and fails :meth:`Comparison.within`); each caller decides
    what an empty comparison or a different structure means to it."""
    interface = interface_difference(reference, got)
    same_structure = pytree.tree_structure(reference) == pytree.tree_structure(got)
    if interface is not None:
        return Comparison(math.inf, 0.0, 0, 0, 0, (), same_structure, interface)
    diff = scale = 0.0
    exact = mismatches = elements = 0
    per_output = []
    for r, o in zip(pytree.tree_leaves(reference), pytree.tree_leaves(got)):
        if not isinstance(r, torch.Tensor):
            if isinstance(r, PLAIN):
                exact, mismatches = exact + 1, mismatches + int(r != o)
            continue
        elements += r.numel()
        if not r.numel():
            continue
        if r.is_floating_point() or r.is_complex():
            d, s = _float_diff(r, o)
            per_output.append((d, s))
            diff, scale = max(diff, d), max(scale, s)
        else:
            exact, mismatches = exact + r.numel(), mismatches + int((r != o).sum())
    return Comparison(diff, scale, exact, mismatches, elements, tuple(per_output),
                      same_structure)


def outputs_agree(a: Any, b: Any, rtol: float) -> bool:
    """Two outputs of the same model on the same inputs agree: the same structure, and each
    tensor within ``rtol`` of its own scale (a GPU kernel may round differently from call to
    call); NaNs agree where both have them."""
    c = compare_outputs(a, b)
    return c.same_structure and c.within(rtol, per_output=True)
