"""``compress_module``: prune into the user's own model class (the future
``etp_fx.compress(..., output="module")``).

A ``GraphModule`` computes the right thing but loses the model's Python class: its methods,
``generate()`` and its KV cache, ``config``, ``save_pretrained``. Here a deep copy of the model is
sliced instead: its tensors by the groups' members (:mod:`module_slice`), its size attributes
and head counts (:mod:`module_attrs`), a Hugging Face config (:mod:`module_config`). The result
is verified as the graph output is (:mod:`etp_fx.surgery.verify`: the dtype's tolerance, a
float64 recheck beyond it, integer outputs exact, NaN or Inf references refused), against the
zeroed original on the example inputs and on inputs of another shape (one more batch element;
one token fewer for sequence inputs).
Whatever a module cannot express (a width its ``forward`` hard-codes, a constant no bias can
carry, a per-head width) is a :class:`ModuleOutputError` that names the module and suggests
``output="graph"``.

Memory: no full-size copy of the model is made. The zeroed original's outputs come from the
user's model with the removed slices zeroed in place and restored afterwards
(:func:`etp_fx.surgery.zero.zeroed_in_place`), then the pruned copy is built from the kept
slices (:func:`etp_fx.surgery.module_slice.sliced_copy`): the peak is about the model plus the
pruned copy (``docs/llm_scale.md``). Only the failure paths (the float64 recheck, naming the
first module that differs) build a zeroed copy. ``etp_report["seconds"]`` times the phases.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import time
import traceback
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.utils._pytree as pytree

from ..capture import describe_inputs, eval_mode, normalize_inputs, untouched
from ..errors import ModuleOutputError, PlanError, SelectionError, VerificationError
from ..graph.depgraph import DependencyGraph, include_predicate
from ..graph.plan import kept_units
from ..graph.signature import check_model_matches
from ..graph.trace import trace_args
from ..regularise.selection import Plan, Selection, selection_from
from .module_attrs import apply_widths, conv_groups, inexpressible_groups, update_attributes
from .module_config import update_config
from .module_slice import add_fold_biases, bias_folds, removed_positions, sliced_copy
from .verify import (Check, check_finite, check_interface, check_rtol, deviation_message,
                     headline, non_finite, run_checks, tolerance_for)
from .zero import zero_units, zeroed_in_place

__all__ = ["compress_module", "apply_widths", "module_plan", "other_inputs"]


def compress_module(model: torch.nn.Module, example_inputs: Any,
                    selection: Selection | None = None, *, graph: DependencyGraph | None = None,
                    verify: bool = True, rtol: float | None = None,
                    keep_constants: bool | None = None, allow_approximate: bool = False,
                    **select_forms: Any) -> torch.nn.Module:
    """Remove units and return a smaller deep copy of ``model``: the same class and methods
    (``generate()``, ``save_pretrained``, ...), tensors sliced, size attributes updated.

    Parameters are those of :func:`etp_fx.compress` (``selection`` or one keyword form such as
    ``ratio=0.3, include=["head", "neuron"]``; ``graph``; ``verify``; ``rtol``: the tolerance,
    None for the dtype's; ``keep_constants``; ``allow_approximate``). Norm-based selections
    only pick groups a module can shrink exactly (never a per-head width, nor a width a norm
    or softmax reduces over); a :class:`etp_fx.Plan` that names one is refused. With
    ``uniform=True`` (``ratio=0.3, uniform=True``) every repeated block loses as many units, so
    a Hugging Face config describes every layer and a plain ``from_pretrained`` reloads it.

    Returns
    -------
    nn.Module
        ``type(result) is type(model)``; ``model`` is left as it was: while the references
        run, the removed slices are zeroed in ``model`` itself and then restored bit for bit
        (checked), so do not use ``model`` from another thread during the call (this keeps
        the peak memory under two models). ``result.etp_report``
        holds params and MACs before and after, each changed group, ``"modules"`` (every
        changed size attribute, ``{module: {attr: [old, new]}}``), ``"tensors"`` (every changed
        parameter or buffer shape), ``"folds"``, ``"verified"`` (one record per check, as the
        graph output's), ``"checked"`` (the inputs that passed), and for Hugging Face models
        ``"config"`` (``{key: [old, new]}``) and ``"config_exact"`` (whether a plain
        ``from_pretrained`` rebuilds it). :func:`apply_widths` gives a fresh model these widths.

    Raises
    ------
    ModuleOutputError
        A change the modules cannot express, or a result that differs from the zeroed
        original; the message names the module.
    FoldError, PlanError, SelectionError, VerificationError
        As :func:`etp_fx.compress`.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> small = compress_module(net, torch.randn(2, 4), remove={"0.weight[0]": [1, 5]})
    >>> type(small).__name__, small[0].out_features, small[2].in_features
    ('Sequential', 6, 6)
    """
    check_rtol(rtol)
    selection = selection_from(selection, **select_forms)
    args, kw = normalize_inputs(example_inputs)
    clock = _Clock()
    graph = graph if graph is not None else trace_args(model, args, kw)
    clock.lap("trace")
    check_model_matches(graph, model)
    plan = module_plan(graph, model, selection, allow_approximate)
    keep_constants = selection.keeps_constants if keep_constants is None else keep_constants
    clock.lap("plan")
    approximate = allow_approximate and any(not graph[g].exact for g in plan)
    return _pruned_copy(_ZeroedOriginal(model, graph, plan, keep_constants), args, kw, clock,
                        verify=verify, rtol=rtol, approximate=approximate)


def _pruned_copy(zeroed: _ZeroedOriginal, args: tuple, kw: dict, clock: _Clock, *,
                 verify: bool, rtol: float | None, approximate: bool) -> torch.nn.Module:
    """The pruned copy of ``zeroed.model`` and its report, verified when asked.

    The references come first, from the user's model with the removed slices zeroed in
    place (:func:`etp_fx.surgery.zero.zeroed_in_place`: only those slices are saved
    meanwhile); then the pruned copy is built from the kept slices
    (:func:`etp_fx.surgery.module_slice.sliced_copy`). No full-size copy of the model is
    made, so the peak is about the model plus the pruned copy."""
    model, graph, plan = zeroed.model, zeroed.graph, zeroed.plan
    with _zeroed_for_references(zeroed) as reference:
        folds = bias_folds(graph, plan, reference, args, kw) \
            if zeroed.keep_constants and plan else []
        checks = _checks(reference, args, kw) if verify else []
    clock.lap("references")
    gc.collect()  # the saved slices go before the pruned copy is built
    small, tensors = sliced_copy(model, removed_positions(graph, plan))
    report = _shrink(small, model, tensors, folds, graph, plan)
    clock.lap("slice")
    if verify:
        report.update(_verify(small, checks, zeroed, args, kw, rtol, approximate))
    clock.lap("verify")
    report["seconds"] = clock.seconds
    small.etp_report = report
    return small


@contextlib.contextmanager
def _zeroed_for_references(zeroed: _ZeroedOriginal) -> Iterator[torch.nn.Module]:
    """The model the references run on: the user's model with the removed slices zeroed in
    place, or, when its parameters are inference tensors (made under
    ``torch.inference_mode()``, which refuses writes in place), a zeroed copy: full size,
    dropped at the end of the block."""
    if any(p.is_inference() for p in zeroed.model.parameters()):
        yield zeroed.copy()
        return
    with zeroed_in_place(zeroed.model, zeroed.graph, zeroed.plan,
                         keep_constants=zeroed.keep_constants) as model:
        yield model


class _Clock:
    """Wall time per phase of :func:`compress_module` (``etp_report["seconds"]``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = now - self.last
        self.last = now


class _ZeroedOriginal:
    """The zeroed original as a separate model, built only when asked for (the float64
    recheck, or naming the first module that differs after a failed check): a full-size
    copy on the failure path only."""

    def __init__(self, model: torch.nn.Module, graph: DependencyGraph,
                 plan: Mapping[str, list[int]], keep_constants: bool) -> None:
        self.model, self.graph, self.plan = model, graph, plan
        self.keep_constants = keep_constants
        self.built: torch.nn.Module | None = None

    def copy(self) -> torch.nn.Module:
        """A fresh zeroed copy (the float64 recheck converts the one it gets)."""
        return zero_units(copy.deepcopy(self.model), self.graph, self.plan,
                          keep_constants=self.keep_constants)

    def get(self) -> torch.nn.Module:
        """One zeroed copy, kept for the next call."""
        if self.built is None:
            self.built = self.copy()
        return self.built


def module_plan(graph: DependencyGraph, model: torch.nn.Module, selection: Selection,
                allow_approximate: bool = False) -> dict[str, list[int]]:
    """The selection's plan, restricted to groups a module can shrink (see
    :func:`etp_fx.surgery.module_attrs.inexpressible_groups`); a :class:`Plan` naming another
    group raises :class:`ModuleOutputError`. A norm-based selection keeps its options
    (``uniform=True`` too)."""
    bad = inexpressible_groups(graph)
    if isinstance(selection, Plan):
        plan = selection.select(graph, model, allow_approximate=allow_approximate)
        hit = [g for g in plan if g in bad]
        if hit:
            raise ModuleOutputError(f"group {hit[0]!r}: {bad[hit[0]]}. Leave it out of the plan, "
                                    f"or use output='graph' (etp_fx.compress)")
    else:
        wanted = include_predicate(graph, selection.include, SelectionError)
        narrowed = dataclasses.replace(selection, include=lambda g: g.id not in bad and wanted(g))
        plan = narrowed.select(graph, model, allow_approximate=allow_approximate)
    approximate = [g for g in plan if not graph[g].exact]
    if approximate and not allow_approximate:
        raise PlanError(f"removing units of {approximate[:3]} is approximate; pass "
                        f"allow_approximate=True to accept that")
    return plan


def _shrink(small: torch.nn.Module, model: torch.nn.Module,
            tensors: dict[str, tuple[list[int], list[int]]], folds: list[dict[str, Any]],
            graph: DependencyGraph, plan: Mapping[str, list[int]]) -> dict[str, Any]:
    """Fix the attributes and config of ``small`` (its tensors already sliced, ``tensors``)
    and add the folded constants to its biases; the report."""
    modules, blocks = update_attributes(small, model, conv_groups(graph, kept_units(graph, plan)))
    fold_lines = add_fold_biases(small, folds)
    for f in folds:
        if f["bias"] is None:
            name = f"{f['module']}.bias" if f["module"] else "bias"
            tensors[name] = (None, list(small.get_submodule(f["module"]).bias.shape))
    config, exact, added_keys = update_config(small, blocks, graph, plan, modules)
    widths = {gid: graph[gid].size - len(units) for gid, units in plan.items()}
    cm = graph.cost
    report: dict[str, Any] = {
        "output": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in small.parameters()),
        "macs_before": cm.macs(), "macs_after": cm.macs(widths),
        "groups": {gid: {"old": graph[gid].size, "new": widths[gid], "removed": list(units),
                         "exactness": "exact" if graph[gid].exact else "approximate"}
                   for gid, units in plan.items()},
        "modules": modules, "tensors": {n: new for n, (_, new) in tensors.items()},
        "folds": fold_lines}
    if exact is not None:
        report["config"], report["config_exact"] = config, exact
        report["config_added"] = added_keys
    return report


# --- verification ----------------------------------------------------------------------------

def other_inputs(args: tuple, kw: dict) -> tuple[tuple, dict, str] | None:
    """Inputs of another shape the model should accept: one more batch element (the first
    repeated) and, for integer sequences (token ids, masks), one position fewer."""
    flat, spec = pytree.tree_flatten((args, kw))
    tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        return None
    batch = tensors[0].shape[0]
    shorter = False

    def change(t: Any) -> Any:
        nonlocal shorter
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != batch:
            return t
        t = torch.cat([t, t[:1]])
        if t.dim() == 2 and not t.is_floating_point() and t.shape[1] >= 3:
            shorter = True
            t = t[:, :-1]
        return t

    new_args, new_kw = pytree.tree_unflatten([change(t) for t in flat], spec)
    return new_args, new_kw, f"batch {batch + 1}" + (", one token fewer" if shorter else "")


def _run(model: torch.nn.Module, args: tuple, kw: dict) -> Any:
    """One eager forward in eval mode that leaves ``model`` as it was (a forward that counts
    its calls in a buffer, say). The models run here are copies whose parameters the capture
    already showed are only read, so they are not copied again (a write is still refused)."""
    with eval_mode(model), untouched(model, copy_parameters=False), torch.no_grad():
        return model(*args, **kw)


def _checks(zeroed: torch.nn.Module, args: tuple, kw: dict) -> list[tuple[Check, str]]:
    """The example inputs and inputs of another shape (:func:`other_inputs`), each with the
    zeroed original's output on them (``zeroed``: the user's model zeroed in place) and a
    description; the other shape is not checked when the model itself refuses it or returns
    NaN or Inf there."""
    reference = _run(zeroed, args, kw)
    check_finite(reference, args, kw)
    checks = [(Check("example", args, kw, reference, False), "the example inputs")]
    other = other_inputs(args, kw)
    if other is None:
        return checks
    a, k, what = other
    try:
        reference = _run(zeroed, a, k)
    except Exception as e:  # noqa: BLE001 - the model itself refuses this shape: not a check
        return checks + [(Check("other shape", a, k, None, False, f"not checked: the model "
                                f"itself does not run on {what} ({type(e).__name__})"), what)]
    bad = non_finite(reference)
    note = f"not checked: on {what}, {bad} (in the zeroed original)" if bad else ""
    return checks + [(Check("other shape", a, k, None if bad else reference, False, note), what)]


def _verify(small: torch.nn.Module, checks: list[tuple[Check, str]], zeroed: _ZeroedOriginal,
            args: tuple, kw: dict, rtol: float | None, approximate: bool) -> dict[str, Any]:
    """Run ``small`` against the zeroed original's outputs (``checks``, :func:`_checks`) on
    the example inputs and on another shape, as the graph output is verified
    (:func:`etp_fx.surgery.verify.run_checks`: the tolerance of the model's dtype or
    ``rtol``, a float64 recheck beyond it, integer outputs exact)."""
    tol = tolerance_for(zeroed.model, args, kw, rtol)
    records = run_checks([c for c, _ in checks], small, None, tol, zeroed.copy,
                         run=lambda c: _outputs_of(small, zeroed, c))
    failed = [r for r in records if r["passed"] is False]
    if failed and not approximate:
        c = next(c for c, _ in checks if c.name == failed[0]["check"])
        raise ModuleOutputError(deviation_message(failed[0], zeroed.plan, cause=(
            f"A module's forward does not follow its new widths"
            f"{_first_difference(small, zeroed.get(), c.args, c.kw)}; use output='graph' "
            f"(etp_fx.compress).")))
    checked = [what for (_, what), r in zip(checks, records) if r["passed"] or
               (r["passed"] is False and approximate)]
    return {"verified": records, "checked": checked, **headline(records)}


def _outputs_of(small: torch.nn.Module, zeroed: _ZeroedOriginal, c: Check) -> Any:
    """``small``'s outputs on a check's inputs; other outputs than the zeroed original's (in
    number, shape or dtype) name the first module whose output changed shape."""
    got = _run_small(small, c.args, c.kw, c.name)
    try:
        check_interface(c.reference, got)
    except VerificationError as e:
        raise ModuleOutputError(
            f"on {describe_inputs(c.args, c.kw)} ({c.name}), {e}"
            f"{_first_difference(small, zeroed.get(), c.args, c.kw)}; a forward probably "
            f"hard-codes a width. Use output='graph' (etp_fx.compress)") from None
    return got


def _run_small(small: torch.nn.Module, args: tuple, kw: dict, what: str) -> Any:
    """Run the pruned model; an exception becomes a ModuleOutputError naming the module whose
    code raised it (the innermost ``forward`` of a module of ``small`` on the stack)."""
    try:
        return _run(small, args, kw)
    except Exception as e:  # noqa: BLE001 - turned into an error that names the module
        names = {id(m): n for n, m in small.named_modules()}
        where = "the model"
        for frame, line in traceback.walk_tb(e.__traceback__):
            owner = frame.f_locals.get("self")
            if id(owner) in names:
                name = names[id(owner)] or "(the model itself)"
                where = (f"module {name!r} ({type(owner).__name__}, "
                         f"{frame.f_code.co_filename}:{line})")
        raise ModuleOutputError(
            f"the pruned model fails on {describe_inputs(args, kw)} ({what}) in {where}: "
            f"{type(e).__name__}: {e}. Its forward probably hard-codes a width the pruning "
            f"changed; use output='graph' (etp_fx.compress), which rewrites shape arguments, "
            f"or leave those units in") from e


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
            and t.is_floating_point()]


def _module_outputs(model: torch.nn.Module, args: tuple, kw: dict) -> dict[str, torch.Tensor]:
    """The first float output of every module, in the order the modules finish."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        def hook(mod, inp, out, name=name):
            leaves = _float_leaves(out)
            if leaves and name not in seen:
                seen[name] = leaves[0].detach()
        hooks.append(m.register_forward_hook(hook))
    try:
        _run(model, args, kw)
    except Exception:  # noqa: BLE001 - whatever ran before the failure is what we have
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen


def _first_difference(small, zeroed, args, kw) -> str:
    """`` (first seen in module 'x')``: the first module, in execution order, whose output has
    the same shape in both models but other values."""
    a, b = _module_outputs(zeroed, args, kw), _module_outputs(small, args, kw)
    for name, ref in a.items():
        got = b.get(name)
        if got is not None and got.shape == ref.shape and \
                float((got - ref).abs().max()) > 1e-4 * max(float(ref.abs().max()), 1e-6):
            return f" (first seen in module {name or '(the model itself)'!r})"
    return ""
