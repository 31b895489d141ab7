"""Verification: the compressed model against the *zeroed original*, on more than one input.

The oracle is the capture the result was rewritten from, with the removed units zeroed (what
:func:`etp_fx.zero_units` makes of the model); at another batch, for a fast-path capture not
yet run against the model, the model's own forward with those units zeroed. Both run on the
example inputs and, for a result that accepts any batch size, on a second random draw at
another batch size (and, where the capture keeps a non-batch dim dynamic, every such dim
grown: one draw for both). A draw at a larger batch than the example's is the example's rows
followed by fresh ones, its reference first made row by row (the example's, known already,
and the fresh rows' run alone); a result that does not match it is checked against one run
at the whole batch, which rows that interact need. Floating outputs must agree to a
tolerance of the output's scale that depends on the dtype the model computes in; integer
and boolean outputs must be equal.
A floating difference beyond the tolerance is rechecked with both models in float64, which
tells rounding (amplified by an ill-conditioned op) from a real difference. What cannot be
checked is refused, never passed: non-finite inputs or reference outputs, a model with no
output to compare, a tolerance that is not a number (non-finite example inputs are refused
before any capture, by :func:`etp_fx.capture.check_model_and_inputs`).
``docs/verification.md`` describes all of it.
"""
from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..capture import (Comparison, another_shape, compare_outputs, describe_inputs, eval_mode,
                       interface_difference, untouched)
from ..errors import InputError, OptionError, VerificationError

__all__ = ["Tolerance", "TOLERANCES", "RECHECK_TOLERANCES", "OTHER_BATCH_AND_SHAPE",
           "check_rtol", "tolerance_for", "Comparison", "check_interface", "compare",
           "non_finite", "check_finite", "Check", "reference_checks", "zeroed_model",
           "run_checks", "headline", "deviation_message", "culprits"]

_EPS16, _EPSBF16 = torch.finfo(torch.float16).eps, torch.finfo(torch.bfloat16).eps
#: default tolerance, relative to the output's scale, by the least precise dtype the model
#: computes in: float64 and float32 leave room for rounding through many layers; float16 and
#: bfloat16 store every folded bias rounded to their precision (a few eps of a layer's scale)
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5,
              torch.float16: 8 * _EPS16, torch.bfloat16: 8 * _EPSBF16}
#: tolerance of the float64 recheck: the computation's rounding is gone, the parameters'
#: rounding to the model's dtype (folded biases) is not
RECHECK_TOLERANCES = {torch.float32: 1e-9, torch.float16: 4 * _EPS16,
                      torch.bfloat16: 4 * _EPSBF16}


@dataclass(frozen=True)
class Tolerance:
    """How close the compressed model must come to the zeroed original."""

    dtype: torch.dtype  # the least precise floating dtype the model computes in
    rtol: float  # of the output's scale, in that dtype
    recheck: float | None  # in float64 (None: no recheck, the model runs in float64)


def check_rtol(rtol: Any) -> None:
    """Refuse a tolerance that would switch verification off or mean nothing (NaN, inf, < 0)."""
    if rtol is None:
        return
    if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or \
            not math.isfinite(float(rtol)) or float(rtol) < 0:
        raise OptionError(f"verify must be True, False, or a tolerance: a finite real number "
                          f">= 0, relative to the output's scale (True uses the dtype's: "
                          f"{_defaults()}); got {rtol!r}")


def _defaults() -> str:
    return ", ".join(f"{str(d).replace('torch.', '')} {t:.3g}" for d, t in TOLERANCES.items())


def tolerance_for(model: torch.nn.Module, args: tuple, kw: dict, rtol: float | None) -> Tolerance:
    """The tolerance for ``model`` on these inputs: ``rtol``, or the default of the least
    precise floating dtype among its parameters, buffers and inputs."""
    tensors = list(model.parameters()) + list(model.buffers()) + \
        [t for t in pytree.tree_leaves((args, kw)) if isinstance(t, torch.Tensor)]
    dtypes = {t.dtype for t in tensors if t.is_floating_point()} or {torch.float32}
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps)
    default = TOLERANCES.get(dtype, 8 * torch.finfo(dtype).eps)
    return Tolerance(dtype, default if rtol is None else float(rtol),
                     RECHECK_TOLERANCES.get(dtype, 4 * torch.finfo(dtype).eps)
                     if dtype != torch.float64 else None)


def _leaves(out: Any) -> list:
    return pytree.tree_leaves(out)


def check_interface(reference: Any, got: Any) -> None:
    """Refuse outputs that differ in number, or a tensor that differs in shape or dtype.

    Raises
    ------
    VerificationError
        The compressed model's interface changed.
    """
    differs = interface_difference(reference, got, ("the compressed model", "original"))
    if differs is not None:
        raise VerificationError(f"{differs}; the model interface must not change")


def compare(reference: Any, got: Any) -> Comparison:
    """Compare the outputs (:func:`etp_fx.capture.compare_outputs`: floating ones by their
    largest difference, integer and boolean ones element by element, plain values for
    equality); verdicts with :meth:`Comparison.within` against the largest scale of all.

    Raises
    ------
    VerificationError
        The outputs differ in number, shape or dtype (the interface changed), or there is no
        output with elements to compare.
    """
    check_interface(reference, got)
    cmp = compare_outputs(reference, got)
    if not cmp.elements:
        raise VerificationError("the model returns no tensor with elements on these inputs, so "
                                "there is nothing to verify the compressed model on; give inputs "
                                "it returns values for, or pass verify=False")
    return cmp


def non_finite(out: Any) -> str | None:
    """What is NaN or Inf in ``out`` (``"output 0 has 3 NaN or Inf value(s) of 12"``), or
    None when every floating output is finite."""
    for k, r in enumerate(_leaves(out)):
        if isinstance(r, torch.Tensor) and (r.is_floating_point() or r.is_complex()):
            bad = int((~torch.isfinite(r)).sum())
            if bad:
                return f"output {k} has {bad} NaN or Inf value(s) of {r.numel()}"
    return None


def check_finite(reference: Any, args: tuple, kw: dict) -> None:
    """Refuse to verify against a reference output with NaN or Inf values (the zeroed
    original's output on the example inputs ``args``, ``kw``): no tolerance can say whether
    the compressed model computes the same.

    Raises
    ------
    VerificationError
        Naming the output and the inputs.
    """
    bad = non_finite(reference)
    if bad:
        raise VerificationError(
            f"verification cannot check a model whose output is NaN or Inf on these inputs: on "
            f"{describe_inputs(args, kw)}, {bad} (in the model with the units zeroed). Give "
            f"example inputs on which the model's output is finite, or pass verify=False.")


@dataclass
class Check:
    """One set of inputs the compressed model is verified on, with the zeroed original's
    output on them (computed before the rewrite)."""

    name: str  # "example", "other batch", "other shape" or "other batch and shape"
    args: tuple
    kw: dict
    reference: Any
    traced: bool  # the inputs the capture was traced on: the shape check's run is the output
    note: str = ""
    # "model": the reference is the model's own forward with the units zeroed (an eager
    # run), which vouches for the capture too; "capture": the zeroed capture's
    oracle: str = "capture"
    # a reference made row by row (the example's rows, then fresh rows run alone): when the
    # result does not match it, whole_batch(zeroed_original) makes the check with a reference
    # from one run at the whole batch (rows that interact, or a result that is wrong)
    whole_batch: Callable[[Callable[[], torch.nn.Module]], "Check"] | None = None


#: the name of the one check at another batch and another shape (a merged draw)
OTHER_BATCH_AND_SHAPE = "other batch and shape"


def reference_checks(zeroed: fx.GraphModule, model: torch.nn.Module, example: tuple[tuple, dict],
                     traced: tuple[tuple, dict], traced_output: Any, other_batch: bool, *,
                     merge: bool = True, model_oracle: bool = False) -> list[Check]:
    """The checks to run: the example, and with ``other_batch`` a random draw at another batch
    size and, where the capture keeps a non-batch dim dynamic, at another shape: one draw for
    both with ``merge`` (another batch and every dynamic dim grown), else one each.
    ``traced_output`` is the zeroed original's output on the traced inputs, when it was
    already computed (planning folds runs it). With ``model_oracle``, the reference at another
    batch is computed by the model itself with the units zeroed (:func:`zeroed_model`)
    instead of by ``zeroed``.

    Raises
    ------
    VerificationError
        The zeroed original's output on the example is NaN or Inf, or the capture refuses a
        batch size that the model itself accepts.
    """
    is_traced = _same_shapes(example, traced)
    args, kw = traced if is_traced else example
    reference = traced_output if is_traced else None
    if reference is None:
        reference = _run_zeroed(zeroed, args, kw, traced)
    check_finite(reference, args, kw)
    checks = [Check("example", args, kw, reference, is_traced)]
    if other_batch:
        merged = _merged_check(zeroed, example, _batch_of(*traced)) if merge else None
        oracle = zeroed_model(model, zeroed) if model_oracle else None
        checks += [merged] if merged is not None else \
            [_rows_check(zeroed, model, checks[0], example, _batch_of(*traced), oracle) or
             _other_batch_check(zeroed, model, example, _batch_of(*traced), oracle)] + \
            _other_shape_check(zeroed, model, example)
    return checks


def zeroed_model(model: torch.nn.Module, zeroed: fx.GraphModule) -> Callable[[tuple, dict], Any]:
    """The model's own forward (eager, eval mode, left as it was) with the zeroed copy's
    parameters in place of its own: the zeroed original without the capture."""
    own = dict(model.named_parameters(remove_duplicate=False))
    params = {name: t for name, t in zeroed.named_parameters(remove_duplicate=False)
              if name in own and own[name].shape == t.shape and own[name].dtype == t.dtype}

    def run(args: tuple, kw: dict) -> Any:
        with eval_mode(model), untouched(model, copy_parameters=False), torch.no_grad():
            return torch.func.functional_call(model, params, tuple(args), dict(kw))
    return run


def _dynamic_non_batch(zeroed: fx.GraphModule) -> bool:
    dims = zeroed.meta.get("etp_dynamic_dims") or {}
    return any(s == "dynamic" and int(d) != 0 for per in dims.values() for d, s in per.items())


def _merged_check(zeroed: fx.GraphModule, example: tuple[tuple, dict],
                  traced_batch: int | None) -> Check | None:
    """One draw at another batch with every dynamic non-batch dim grown by one: a check that
    is both "other batch" and "other shape", for one forward pass of each model instead of
    two. None when there is no dynamic non-batch dim or no batch, or when the draw cannot
    stand for both (the capture refuses it, or its output is NaN or Inf): the two separate
    checks then run, and say why."""
    args, kw = example
    batch = _batch_of(args, kw)
    if batch is None or not _dynamic_non_batch(zeroed):
        return None
    other = _other_batch_size(batch, traced_batch)
    for fresh in (True, False):  # fresh values; else rows of the example
        a, k = another_shape(zeroed, *_draw(args, kw, batch, other, fresh), batch=False)
        try:
            with torch.no_grad():
                reference = zeroed(*a, **k)
        except Exception:  # noqa: BLE001 - diagnosed by the separate checks
            return None
        if non_finite(reference) is None:
            return Check(OTHER_BATCH_AND_SHAPE, a, k, reference, False)
    return None


def _other_batch_size(batch: int, traced_batch: int | None) -> int:
    """2, or 3 when the example's or the traced batch is 2: small, to keep the check cheap;
    never 0 or 1, which torch.export specialises."""
    return 3 if 2 in (batch, traced_batch) else 2


def _other_shape_check(zeroed: fx.GraphModule, model: torch.nn.Module,
                       example: tuple[tuple, dict]) -> list[Check]:
    """One more check where the capture keeps a dim other than the batch dynamic (a sequence
    length, an image size, a node count): every such dim grown by one."""
    if not _dynamic_non_batch(zeroed):
        return []
    args, kw = another_shape(zeroed, *example)
    try:
        with torch.no_grad():
            reference = zeroed(*args, **kw)
    except Exception as e:  # noqa: BLE001 - a relation between dims, or the capture's fault
        return [_refused_shape(model, args, kw, e)]
    if non_finite(reference) is not None:
        return [Check("other shape", args, kw, None, False,
                      f"not checked: at {describe_inputs(args, kw)}, {non_finite(reference)}")]
    return [Check("other shape", args, kw, reference, False)]


def _refused_shape(model: torch.nn.Module, args: tuple, kw: dict, error: Exception) -> Check:
    """The capture refuses the grown shape. The dims may only vary together (a guard such as
    ``h * w == 16`` keeps them dynamic but related), and then the model itself refuses that
    shape too: not checked. A model that runs there while its capture refuses is an error."""
    refused = _model_refuses(model, args, kw)
    if refused:
        return Check("other shape", args, kw, None, False, f"not checked: the model itself "
                     f"does not run at {describe_inputs(args, kw)} ({refused})")
    raise VerificationError(
        f"the compressed model should accept the sizes the model accepts, but its capture "
        f"refuses {describe_inputs(args, kw)}, which the model itself runs on: "
        f"{type(error).__name__}: {_first_line(error)}. Pass dynamic_batch=False for a result "
        f"at the example's sizes, and please report it.")


def _run_zeroed(zeroed: fx.GraphModule, args: tuple, kw: dict, traced: tuple[tuple, dict]) -> Any:
    try:
        with torch.no_grad():
            return zeroed(*args, **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with both input shapes
        raise VerificationError(
            f"the capture made at {describe_inputs(*traced)} does not run on the example inputs "
            f"{describe_inputs(args, kw)}: {type(e).__name__}: {_first_line(e)}. Pass "
            f"dynamic_batch=False (a result for the example's shapes only), and please report "
            f"it.") from None


def _same_shapes(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        (x.shape == y.shape) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
        else x is y for x, y in zip(la, lb))


def _batch_of(args: tuple, kw: dict) -> int | None:
    for t in pytree.tree_leaves((args, kw)):
        if isinstance(t, torch.Tensor) and t.dim():
            return int(t.shape[0])
    return None


def _draw(args: tuple, kw: dict, batch: int, other: int, fresh: bool) -> tuple[tuple, dict]:
    """The inputs at batch ``other``: rows of the example picked at random (the same rows for
    every input, so ids and masks stay paired); with ``fresh``, floating inputs are new normal
    draws with the example's mean and spread instead. Seeded: compress is deterministic."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, batch, (other,), generator=gen)

    def one(t: torch.Tensor) -> torch.Tensor:
        if not t.dim() or t.shape[0] != batch:
            return t
        picked = t.index_select(0, rows.to(t.device))
        if not fresh or not t.is_floating_point() or t.numel() < 2:
            return picked
        std, mean = (float(v) for v in torch.std_mean(t.double()))
        if not std > 0:
            return picked
        # drawn in float32 (float64 for a float64 input): the draw is a good part of the
        # check's cost on image inputs, and float32 noise is as random
        wide = torch.float64 if t.dtype == torch.float64 else torch.float32
        noise = torch.randn(picked.shape, generator=gen, dtype=wide)
        return noise.mul_(std).add_(mean).to(device=t.device, dtype=t.dtype)
    return pytree.tree_map_only(torch.Tensor, one, (tuple(args), dict(kw)))


def _other_batch_check(zeroed: fx.GraphModule, model: torch.nn.Module,
                       example: tuple[tuple, dict], traced_batch: int | None,
                       oracle: Callable[[tuple, dict], Any] | None = None) -> Check:
    """A random draw at a batch size the result was neither traced nor called with
    (:func:`_other_batch_size`), its reference from ``oracle`` (the model itself, units
    zeroed) when given, else from the zeroed capture."""
    args, kw = example
    batch = _batch_of(args, kw)
    if batch is None:
        return Check("other batch", args, kw, None, False, "the inputs have no batch dim")
    other = _other_batch_size(batch, traced_batch)
    last = "no draw"
    for fresh in (True, False):  # fresh values; else rows of the example, which are finite
        a, k = _draw(args, kw, batch, other, fresh)
        try:
            with torch.no_grad():
                reference = oracle(a, k) if oracle is not None else zeroed(*a, **k)
        except Exception as e:  # noqa: BLE001 - the capture's fault or the draw's: see below
            if oracle is not None:  # the model itself refuses the draw
                return Check("other batch", a, k, None, False, f"not checked: the model "
                             f"itself does not run at batch {other} ({type(e).__name__})")
            return _refused_batch(model, a, k, batch, other, e)
        last = non_finite(reference)
        if last is None:
            return Check("other batch", a, k, reference, False,
                         oracle="model" if oracle is not None else "capture")
    return Check("other batch", a, k, None, False, f"not checked: on a draw at batch {other}, "
                 f"{last}")


def _rows_check(zeroed: fx.GraphModule, model: torch.nn.Module, example_check: Check,
                example: tuple[tuple, dict], traced_batch: int | None,
                oracle: Callable[[tuple, dict], Any] | None) -> Check | None:
    """The check at another batch for the price of the fresh rows: the draw is the example's
    rows followed by fresh ones (:func:`_draw` for the rows missing), and its reference is
    the example's reference followed by the reference of the fresh rows, run alone (from
    ``oracle``, the model itself, when given, else from the zeroed capture). The example's
    reference is known already, so this runs the reference at the batch of the fresh rows
    instead of the whole batch. Exact for a model whose rows do not interact in eval mode;
    for one whose rows do (it subtracts the batch's mean, say), the result differs from the
    stacked reference and ``whole_batch`` makes the check of :func:`_other_batch_check`
    instead. None where it does not apply: the other batch is not larger than the example's,
    or an output has no rows to stack (no batch dim, a Python number), or the fresh rows'
    reference cannot be had (:func:`_other_batch_check` then says why)."""
    args, kw, reference = example_check.args, example_check.kw, example_check.reference
    batch = _batch_of(args, kw)
    if batch is None:
        return None
    other = _other_batch_size(batch, traced_batch)
    if other <= batch:
        return None
    fresh = _draw(args, kw, batch, other - batch, True)
    try:
        with torch.no_grad():
            fresh_ref = oracle(*fresh) if oracle is not None else zeroed(*fresh[0], **fresh[1])
    except Exception:  # noqa: BLE001 - the whole-batch check runs instead and says why
        return None
    stacked = _stacked_outputs(reference, fresh_ref, batch, other - batch)
    if stacked is None or non_finite(fresh_ref) is not None:
        return None
    a, k = _stacked_inputs((args, kw), fresh, batch)
    by_model = oracle is not None

    def whole_batch(zeroed_original: Callable[[], torch.nn.Module]) -> Check:
        # the zeroed original made again (the one given was rewritten since); the oracle's
        # parameters are not kept until then: they would hold a copy of the model's weights
        again = zeroed_original()
        return _other_batch_check(again, model, example, traced_batch,
                                  zeroed_model(model, again) if by_model else None)
    return Check("other batch", a, k, stacked, False,
                 oracle="model" if by_model else "capture", whole_batch=whole_batch)


def _stacked_inputs(example: tuple[tuple, dict], fresh: tuple[tuple, dict],
                    batch: int) -> tuple[tuple, dict]:
    """The example's inputs with the fresh rows after their own, input by input (an input
    without the batch dim is the same in both, and stays as it is)."""
    flat, spec = pytree.tree_flatten((tuple(example[0]), dict(example[1])))
    rows = pytree.tree_leaves((tuple(fresh[0]), dict(fresh[1])))
    return pytree.tree_unflatten([
        torch.cat([t, r]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == batch
        else t for t, r in zip(flat, rows)], spec)


def _stacked_outputs(reference: Any, fresh_ref: Any, batch: int, fresh: int) -> Any | None:
    """The two references stacked row after row, or None when some output has no such rows
    (not a tensor, no batch dim, another structure, shape or dtype)."""
    flat, spec = pytree.tree_flatten(reference)
    rows, spec_rows = pytree.tree_flatten(fresh_ref)
    if spec != spec_rows or not all(
            isinstance(t, torch.Tensor) and isinstance(r, torch.Tensor) and t.dim() and
            t.shape[0] == batch and r.shape[0] == fresh and t.shape[1:] == r.shape[1:] and
            t.dtype == r.dtype for t, r in zip(flat, rows)):
        return None
    return pytree.tree_unflatten([torch.cat([t, r]) for t, r in zip(flat, rows)], spec)


def _model_refuses(model: torch.nn.Module, args: tuple, kw: dict) -> str | None:
    """The error's type name when the model's own code refuses these inputs, else None."""
    try:
        with eval_mode(model), untouched(model), torch.no_grad():
            model(*args, **kw)
    except Exception as e:  # noqa: BLE001 - the model's code fixes or relates the sizes
        return type(e).__name__
    return None


def _refused_batch(model: torch.nn.Module, args: tuple, kw: dict, batch: int, other: int,
                   error: Exception) -> Check:
    """The capture refuses the other batch: if the model's own code runs on it, the capture
    was specialised to a batch although the result claims any (an etp_fx bug); if not, the
    draw is not an input of this model, and the batch cannot be checked."""
    refused = _model_refuses(model, args, kw)
    if refused:
        return Check("other batch", args, kw, None, False,
                     f"not checked: the model itself does not run at batch {other} ({refused})")
    raise VerificationError(
        f"the compressed model should accept any batch size (dynamic_batch=True), but its "
        f"capture refuses batch {other} at dim 0 of the inputs (the example has {batch}), "
        f"which the model itself accepts: {type(error).__name__}: {_first_line(error)}. Either "
        f"torch.export kept a guard on the batch size or etp_fx captured the model wrongly "
        f"(please report it). dynamic_batch=False gives a result for batch {batch} only.")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


class PinnedBySize(Exception):
    """The result refuses a check's shape on purpose: a folded constant map fits the traced
    size only (kept constants asked for; its guard raises a clear InputError)."""


def _outputs(small: fx.GraphModule, c: Check, traced_got: Any) -> Any:
    if c.traced:
        return traced_got
    try:
        with torch.no_grad():
            return small(*c.args, **c.kw)
    except InputError as e:
        if c.name == "other shape" and "position-dependent constant" in str(e):
            raise PinnedBySize(_first_line(e)) from None
        raise _fails_on(c, e) from None
    except Exception as e:  # noqa: BLE001 - re-raised with the inputs
        raise _fails_on(c, e) from None


def _fails_on(c: Check, e: Exception) -> VerificationError:
    return VerificationError(
        f"the compressed model fails on {describe_inputs(c.args, c.kw)} ({c.name}), where the "
        f"zeroed original runs: {type(e).__name__}: {_first_line(e)}. {_dim_hint(c)}Please "
        f"report it.")


def _dim_hint(c: Check) -> str:
    if c.name == "other batch":
        return ("Dim 0 (the batch) of the inputs is the one that changed from the example; "
                "dynamic_batch=False gives a result for the example's batch only. ")
    if c.name == OTHER_BATCH_AND_SHAPE:
        return ("The batch (dim 0) and every dynamic dim of the inputs changed from the "
                "example (report['dynamic_dims']); dynamic_batch=False gives a result for the "
                "example's sizes only. ")
    return ""


def run_checks(checks: list[Check], small: torch.nn.Module, traced_got: Any, tol: Tolerance,
               zeroed_original: Callable[[], torch.nn.Module], *,
               run: Callable[[Check], Any] | None = None) -> list[dict]:
    """Run the compressed model on every check's inputs and compare; one record per check
    (what was checked, at which tolerance, the deviation, and the verdict ``passed``).

    ``small`` is a compressed ``GraphModule`` (``output="graph"``) or module
    (``output="module"``); ``run(check)``, when given, runs it on a check's inputs instead
    of calling it directly (the module output names the module that fails).
    ``zeroed_original()`` returns a zeroed original the float64 recheck may convert. A check
    whose reference was made row by row (:func:`_rows_check`) that does not pass as it is
    (a difference, a failure, another interface) is made again with a reference from one run
    at the whole batch, and that check's record stands."""
    records = []
    for c in checks:
        if c.whole_batch is not None:
            rec = _record(c, small, traced_got, tol, None, run, rows=True)
            if rec.get("passed") is not True:
                rec = {**_record(c.whole_batch(zeroed_original), small, traced_got, tol,
                                 zeroed_original, run), "reference": "whole batch"}
        else:
            rec = _record(c, small, traced_got, tol, zeroed_original, run)
        records.append(rec)
    return records


def _record(c: Check, small: torch.nn.Module, traced_got: Any, tol: Tolerance,
            zeroed_original: Callable[[], torch.nn.Module] | None,
            run: Callable[[Check], Any] | None, rows: bool = False) -> dict:
    """One check's record. ``zeroed_original`` None: no float64 recheck. ``rows``: a
    reference made row by row, where a failure of the result or another interface is a
    failed record (``passed`` False) instead of an error: the whole-batch check decides."""
    rec = {"check": c.name, "inputs": describe_inputs(c.args, c.kw),
           "batch": _batch_of(c.args, c.kw), "dtype": str(tol.dtype).replace("torch.", ""),
           "tolerance": tol.rtol}
    if c.reference is None:
        return {**rec, "passed": None, "note": c.note}
    try:
        got = run(c) if run is not None else _outputs(small, c, traced_got)
        cmp = compare(c.reference, got)
    except PinnedBySize as e:
        return {**rec, "passed": None, "note": f"not checked: the result is pinned to the "
                f"traced size by a folded constant ({e})"}
    except VerificationError:
        if rows:
            return {**rec, "passed": False}
        raise
    rec.update(max_abs_diff=cmp.max_abs_diff, output_scale=cmp.output_scale,
               rel_diff=cmp.rel_diff, exact_elements=cmp.exact_compared,
               exact_mismatches=cmp.exact_mismatches, passed=cmp.within(tol.rtol))
    if rows:
        rec["reference"] = "per row"
    elif not rec["passed"] and tol.recheck is not None:
        cmp64 = _in_float64(zeroed_original(), small, c.args, c.kw)
        rec["float64_rel_diff"] = None if cmp64 is None else cmp64.rel_diff
        rec["float64_tolerance"] = tol.recheck
        rec["passed"] = cmp64 is not None and cmp64.within(tol.recheck)
    return rec


def _in_float64(zeroed: torch.nn.Module, small: torch.nn.Module, args: tuple,
                kw: dict) -> Comparison | None:
    """Both models and the inputs in float64 (``zeroed`` converted in place, ``small`` a copy),
    or None when a model does not run in float64 (a cast to float32 inside, say)."""
    def to64(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t
    try:
        small64, zeroed64 = copy.deepcopy(small).double(), zeroed.double()
        args64, kw64 = pytree.tree_map_only(torch.Tensor, to64, (args, kw))
        with eval_mode(zeroed64), eval_mode(small64), torch.no_grad():
            return compare(zeroed64(*args64, **kw64), small64(*args64, **kw64))
    except Exception:  # noqa: BLE001 - no float64 answer: the first verdict stands
        return None


def headline(verified: list[dict]) -> dict[str, Any]:
    """The example's deviation for the top of a report (``max_abs_diff``, ``output_scale``),
    and the largest float64 recheck, where one ran."""
    out: dict[str, Any] = {}
    first = next((r for r in verified if "max_abs_diff" in r), None)
    if first is not None:
        out.update(max_abs_diff=first["max_abs_diff"], output_scale=first["output_scale"])
    rechecked = [r["float64_rel_diff"] for r in verified if "float64_rel_diff" in r]
    if rechecked:
        out["float64_rel_diff"] = None if None in rechecked else max(rechecked)
    return out


def deviation_message(rec: Mapping[str, Any], plan: Mapping[str, Any],
                      cause: str = "This is an etp_fx bug: please report it.") -> str:
    """Why a check failed; ``cause`` (by default "an etp_fx bug") only where rounding is ruled
    out (the float64 recheck confirms the difference, or the model runs in float64)."""
    groups = f"{sorted(plan)[:5]}{'...' if len(plan) > 5 else ''}"
    what = (f"{rec['exact_mismatches']} integer/boolean output element(s) and a floating "
            f"deviation of {rec['max_abs_diff']:.3g}" if rec["exact_mismatches"] else
            f"{rec['max_abs_diff']:.3g} (output scale {rec['output_scale']:.3g}, tolerance "
            f"{rec['tolerance']:.3g} of it in {rec['dtype']})")
    head = (f"the compressed model differs from the zeroed original by {what} on "
            f"{rec['inputs']} ({rec['check']}) after removing units of {groups}.")
    if rec["dtype"] == "float64" or rec.get("float64_rel_diff") is not None:
        extra = (f" In float64 too ({rec['float64_rel_diff']:.3g} of the output's scale, "
                 f"tolerance {rec['float64_tolerance']:.3g})." if "float64_tolerance" in rec
                 else "")
        return f"{head}{extra} {cause}"
    return head + (f" The float64 recheck could not run (the model does not run in float64), "
                   f"so rounding in {rec['dtype']} is not ruled out: if you expect that much "
                   f"rounding, pass a larger tolerance (verify=1e-4, say); otherwise please "
                   f"report it.")


def culprits(plan: Mapping[str, Any], fails_alone: Callable[[str], bool], limit: int = 32) -> str:
    """Remove each group's units alone to name the groups that break verification."""
    bad = []
    for gid in list(plan)[:limit]:
        try:
            if fails_alone(gid):
                bad.append(gid)
        except VerificationError:
            bad.append(gid)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            bad.append(f"{gid} ({type(e).__name__}: {e})")
    if not bad:
        return "Each group alone verifies; the failure comes from removing them together."
    return "Groups that fail alone: " + ", ".join(bad)
