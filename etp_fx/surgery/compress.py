"""``etp_fx.compress``: one call from a model and a selection to a dense, smaller, verified model.

A short sequence of passes: select -> capture (cached, :mod:`.captures`) -> zero a working copy
(:mod:`.zero`, :mod:`.working_copy`) -> plan folds -> rewrite -> apply folds -> check shapes ->
verify (:mod:`.verify`) -> report. Each compression attempt is one :class:`Job`.
"""
from __future__ import annotations

import math
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..capture import check_deterministic, check_model_and_inputs, describe_inputs, \
    normalize_inputs
from ..errors import (FoldError, ModelError, OptionError, PlanError, RewriteError, TraceError,
                      VerificationError)
from ..graph.depgraph import DependencyGraph
from ..graph.plan import kept_units
from ..graph.signature import check_model_matches
from ..graph.trace import trace_args
from ..regularise.selection import Selection, selection_from
from .captures import batch_dynamic, batch_of_two, capture_for, fits, runs_like_model, unchecked
from .fold import apply_folds, plan_folds
from .module_output import compress_module
from .rewrite import check_shapes, rewrite_module
from .verify import (Tolerance, check_rtol, culprits, deviation_message, headline,
                     reference_checks, run_checks, tolerance_for)
from .working_copy import working_copy
from .zero import zeroed_slices

__all__ = ["compress", "Job", "VerificationError"]


@dataclass(frozen=True)
class Job:
    """One compression attempt: everything fixed before the surgery starts."""

    model: torch.nn.Module  # where the weights come from (never modified)
    graph: DependencyGraph  # the user's graph: group ids, sizes, the cost of its trace
    base: DependencyGraph  # the capture rewritten (each attempt rewrites a working copy)
    plan: Mapping[str, list[int]]  # {group id: units removed}
    traced: tuple[tuple, dict]  # the inputs ``base`` was traced on
    example: tuple[tuple, dict]  # the inputs as given
    keep_constants: bool  # zero only the writing weights, fold the constants (else zero whole)
    # keep_constants was the default, not asked for: groups whose constants cannot be folded
    # are then zeroed whole (``whole``) instead of refusing the plan
    fall_back: bool
    tolerance: Tolerance
    verify: bool
    dynamic_batch: bool
    whole: frozenset = frozenset()  # groups zeroed whole although keep_constants is set
    # ``base`` is a fast-path capture not yet run against the model: the check at another
    # batch then takes its reference from the model itself, which vouches for the capture
    # (one eager run instead of two); where it does not, the capture is checked after all
    unchecked: bool = False


def compress(model: torch.nn.Module, example_inputs: Any, selection: Selection | None = None,
             *, graph: DependencyGraph | None = None, verify: bool | float = True,
             keep_constants: bool | None = None, allow_approximate: bool = False,
             dynamic_batch: bool = True, output: str = "graph",
             **select_forms: Any) -> fx.GraphModule | torch.nn.Module:
    """Remove units: a smaller model that computes what the zeroed original computes.

    Parameters
    ----------
    model : nn.Module
        Not modified; compressed in eval mode.
    example_inputs : Tensor, tuple or dict
        Positional inputs (a tensor or a tuple) or keyword inputs (a dict).
    selection : Selection, optional
        A ``Budget``, ``Ratio``, ``Threshold`` or ``Plan``; or one keyword form with its options:
        ``remove=``, ``threshold=``, ``ratio=``, ``target_macs=`` or ``target_params=``.
    graph : DependencyGraph, optional
        A graph traced from this model (its capture is reused where it fits).
    verify : bool or float
        Check the result against the zeroed original (``docs/verification.md``) with the
        dtype's tolerance (``True``), a given tolerance (a number), or not (``False``).
    keep_constants : bool, optional
        Fold removed units' biases into consumers (default: True except for a Plan).
    allow_approximate : bool
        Allow removing units of approximate groups (their deviation is reported).
    dynamic_batch : bool
        Accept every input size the model's code allows (batch, sequence, image, nodes).
    output : {"graph", "module"}
        A dense ``torch.fx.GraphModule``, or a copy of ``model`` in its own class (Hugging
        Face models keep ``generate()`` and ``save_pretrained``; ``docs/llm.md``).

    Returns
    -------
    torch.fx.GraphModule or nn.Module
        With the report (params, MACs, groups, folds, checks) in ``meta["etp_report"]``.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> small = etp_fx.compress(net, torch.randn(2, 4), ratio=0.5, scope="global")
    >>> small.meta["etp_report"]["params_after"] < small.meta["etp_report"]["params_before"]
    True
    """
    verify, rtol = _verify_option(verify)
    if _module_output(output):
        return compress_module(model, example_inputs, selection, graph=graph, verify=verify,
                               rtol=rtol, keep_constants=keep_constants,
                               allow_approximate=allow_approximate, **select_forms)
    selection = selection_from(selection, **select_forms)
    args, kw, graph = _prepared(model, example_inputs, graph, rtol)
    plan = _select(selection, graph, model, allow_approximate)                     # select
    keep = selection.keeps_constants if keep_constants is None else keep_constants
    job = Job(model, graph, graph, plan, (args, kw), (args, kw), keep, keep_constants is None,
              tolerance_for(model, args, kw, rtol), verify, dynamic_batch)
    return _captured_and_verified(job)  # base and traced: the capture it makes


def _captured_and_verified(job: Job) -> fx.GraphModule:
    """Capture (:func:`capture_for`), then the surgery. A verified batch-dynamic result lets
    the check at another batch vouch for a fast capture; one that turns out to compute
    something else than the model is captured again (exported)."""
    (args, kw), model = job.example, job.model
    defer = job.verify and job.dynamic_batch
    base, traced = capture_for(model, job.graph, args, kw, job.dynamic_batch, defer_check=defer)
    small = _verified(dataclasses.replace(job, base=base, traced=traced,
                                          unchecked=defer and unchecked(base, model)))
    if small is None:
        base, traced = capture_for(model, job.graph, args, kw, job.dynamic_batch)
        small = _verified(dataclasses.replace(job, base=base, traced=traced, unchecked=False))
    return small


def _capture_differs(job: Job, small: fx.GraphModule | None) -> bool:
    """Does the job's fast capture, not run against the model before the surgery, compute
    something else than the model? Not when the check at another batch vouched for it (its
    reference was the model itself, and it passed without a float64 recheck, which compares
    with the capture); else the capture is run against the model now."""
    if not job.unchecked:
        return False
    if small is not None and small.meta.pop("etp_capture_vouched", False):
        return False
    return not runs_like_model(job.base, job.model, *job.traced)


def _verified(job: Job) -> fx.GraphModule | None:
    """The surgery's result once it verifies. With default kept constants that do not verify
    (folded into ops that are not linear in them), the plan's groups are zeroed whole. None
    when the job's unchecked fast capture turns out to compute something else than the model
    (the caller captures again)."""
    try:
        small = _surgery_of(job)  # zero, plan folds, rewrite, apply folds, check shapes, verify
    except Exception:  # noqa: BLE001 - re-raised unless the capture is to blame
        if _capture_differs(job, None):
            return None
        raise
    if _capture_differs(job, small):
        return None
    job = dataclasses.replace(job, unchecked=False)  # for the retries below: it runs like it
    if not _failed_checks(small) or _approximate(job.graph, job.plan):
        return small
    if job.fall_back and job.keep_constants and set(job.plan) - job.whole:
        retry = _surgery_of(dataclasses.replace(job, whole=frozenset(job.plan)))
        if not _failed_checks(retry):
            return retry
    raise _refusal(job, _failed_checks(small))


def _module_output(output: Any) -> bool:
    if output not in ("graph", "module"):
        raise OptionError(f"output must be 'graph' (a dense GraphModule) or 'module' (your "
                          f"model's own class); got {output!r}")
    return output == "module"


def _zeroed_whole_for_size(job: Job, folds: list) -> set[str]:
    """The groups to zero whole because of their sizes, else an empty set. A constant that
    varies with position (a removed unit's bias seen through zero padding) is folded as a map
    that only fits the traced size; the default kept constants must not pin a size-dynamic
    result that way, so those groups are zeroed whole instead."""
    pinned = {gid for f in folds if not f.size_free for gid in f.groups} - job.whole
    if pinned and job.fall_back and job.keep_constants and job.dynamic_batch:
        return pinned
    return set()


def _surgery_of(job: Job) -> fx.GraphModule:
    """The surgery (:func:`_planned`, then :func:`_finished`). When ``keep_constants`` was
    the default, groups whose kept constants cannot be folded (a LayerNorm after them makes
    them input-dependent) or would pin the result's sizes are zeroed whole, and the surgery
    starts again; a random or stateful forward, which makes values look input-dependent, is
    named as such."""
    while True:
        try:
            planned = _planned(job)
            whole = _zeroed_whole_for_size(job, planned.folds)
            if not whole:
                return _finished(job, planned)
        except FoldError as e:
            whole = set(e.groups) - job.whole
            if not (job.fall_back and job.keep_constants and whole):
                check_deterministic(job.model, *job.example)
                raise
        job = dataclasses.replace(job, whole=job.whole | whole)


def _verify_option(verify: Any) -> tuple[bool, float | None]:
    """``verify=True``/``False``, or a number: the tolerance (checked: finite, >= 0)."""
    if isinstance(verify, bool):
        return verify, None
    check_rtol(math.nan if verify is None else verify)
    return True, float(verify)


def _prepared(model: torch.nn.Module, example_inputs: Any, graph: DependencyGraph | None,
              rtol: Any) -> tuple[tuple, dict, DependencyGraph]:
    """The normalised example inputs and the graph, once the options, weights and inputs are
    ones compress can take (refused before any work)."""
    check_rtol(rtol)
    args, kw = normalize_inputs(example_inputs)
    check_model_and_inputs(model, args, kw)  # NaN/Inf inputs, quantized or sparse weights
    _check_weights(model)
    if model.training:
        warnings.warn("compress() treats the model as in eval mode (BatchNorm uses running "
                      "statistics, dropout is off); the model you passed is left in training "
                      "mode", stacklevel=3)
    graph = graph if graph is not None else trace_args(model, args, kw)
    check_model_matches(graph, model)
    return args, kw, graph


def _check_weights(model: torch.nn.Module) -> None:
    """Float weights with values: what trace can analyse but compress cannot prune."""
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            raise ModelError(f"parameter {name!r} has dtype {p.dtype}; etp_fx prunes float "
                             f"models. Prune before quantizing, then quantize the smaller model.")
        if p.device.type == "meta":
            raise ModelError(f"parameter {name!r} is on the meta device: trace() can analyse "
                             f"such a model, but compress() needs real weights")


def _select(selection: Selection, graph: DependencyGraph, model: torch.nn.Module,
            allow_approximate: bool) -> dict[str, list[int]]:
    """The plan; approximate groups only with consent."""
    plan = selection.select(graph, model, allow_approximate=allow_approximate)
    approximate = _approximate(graph, plan)
    if approximate and not allow_approximate:
        raise PlanError(f"removing units of {approximate[:3]} is approximate "
                        f"({graph[approximate[0]].inexact_reasons[0].split(' at ')[0]}); pass "
                        f"allow_approximate=True to accept that")
    return plan


def _approximate(graph: DependencyGraph, plan: Mapping[str, Any]) -> list[str]:
    return [gid for gid in plan if not graph[gid].exact]


def _zeroed_original(job: Job, compiled: bool = True) -> fx.GraphModule:
    """A working copy of the capture with the model's weights and the plan's units zeroed
    (``compiled=False``: one that is rewritten next, see :func:`working_copy`)."""
    gm = working_copy(job.base.module, job.model, compiled=compiled)
    params = dict(gm.named_parameters(remove_duplicate=False))  # tied names too
    with torch.no_grad():
        for name, dim, idx in zeroed_slices(job.base, job.plan, job.keep_constants, params,
                                            job.whole):
            params[name].index_fill_(dim, idx, 0.0)
    return gm


@dataclass
class _Planned:
    """The working copy, zeroed (the zeroed original until the rewrite), and its folds."""

    g2: DependencyGraph
    keep: dict
    folds: list
    ran: list  # the zeroed original's output on the traced inputs, when planning folds ran it


def _planned(job: Job) -> _Planned:
    """Zero a working copy of the capture and plan the folds of the removed units' constants."""
    g2 = dataclasses.replace(job.base, module=_zeroed_original(job, compiled=False))
    _check_same_groups(job, g2)
    keep = kept_units(g2, job.plan)
    ran: list = []  # planning folds runs the zeroed original once (when there is a fold)
    folds = plan_folds(g2.module, keep, {g2[gid].uid: gid for gid in job.plan}, *job.traced,
                       outputs=ran)
    return _Planned(g2, keep, folds, ran)


def _finished(job: Job, planned: _Planned) -> fx.GraphModule:
    """Rewrite the zeroed working copy into the smaller model. The zeroed original's outputs
    on every input to verify are taken before the rewrite; the rewritten model's after."""
    gm, keep, folds = planned.g2.module, planned.keep, planned.folds
    # one draw for another batch and another shape, unless a folded constant map pins the
    # result's sizes (then the batch is checked alone, and the shape is recorded as pinned)
    checks = reference_checks(gm, job.model, job.example, job.traced,
                              planned.ran[0] if planned.ran else None, job.dynamic_batch,
                              merge=all(f.size_free for f in folds),
                              model_oracle=job.unchecked) \
        if job.verify else []
    planned.ran.clear()
    rewrite_module(gm, keep, recompile=False)
    fold_lines = apply_folds(gm, folds, keep)  # compiles the rewritten graph, once
    with torch.no_grad():
        got = check_shapes(gm, keep, *job.traced)
    verified = run_checks(checks, gm, got, job.tolerance, lambda: _zeroed_original(job))
    if job.unchecked:  # read (and dropped) by _capture_differs
        gm.meta["etp_capture_vouched"] = any(
            c.oracle == "model" and r["passed"] is True and "float64_rel_diff" not in r
            for c, r in zip(checks, verified))
    gm.meta["etp_report"] = _report(job, planned.g2, gm, fold_lines, verified)
    example = _detached(job.example)  # save() exports at these: a batch of 1 is specialised
    gm.meta["etp_example_inputs"] = batch_of_two(*example) if \
        gm.meta["etp_report"]["batch_dynamic"] else example
    return gm


def _detached(inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), inputs)


def _check_same_groups(job: Job, g2: DependencyGraph) -> None:
    ids = {g.id for g in g2.groups}
    for gid in job.plan:
        if gid not in ids or g2[gid].size != job.graph[gid].size:
            raise TraceError(f"group {gid!r} changed between two traces of the same model "
                             f"(the graph given and compress's capture at "
                             f"{describe_inputs(*job.traced)}); etp_fx cannot compress it "
                             f"safely. Trace the model again with these inputs.")


def _failed_checks(small: fx.GraphModule) -> list[dict]:
    return [r for r in small.meta["etp_report"]["verified"] if r["passed"] is False]


def _refusal(job: Job, failed: list[dict]) -> Exception:
    """The error for a result that does not verify: a FoldError when the units' kept constants
    are to blame (zeroed whole, they verify), else a VerificationError naming the groups."""
    message = deviation_message(failed[0], job.plan)
    # a forward that draws random numbers or keeps state cannot be verified: say so instead
    # of blaming etp_fx (two eager runs, only on this failure path)
    check_deterministic(job.model, *job.example)
    if job.keep_constants and _verifies(dataclasses.replace(job, keep_constants=False)):
        return FoldError(
            f"the removed units carry constants (kept biases or norm shifts) into ops etp_fx "
            f"cannot fold them into (for example an einsum or a matmul between activations), so "
            f"removing them would change the result ({message}). Zero the units whole "
            f"(keep_constants=False), or train their biases to zero first.")
    return VerificationError(f"{message}\n" + culprits(job.plan, lambda gid: not _verifies(
        dataclasses.replace(job, plan={gid: job.plan[gid]}))))


def _verifies(job: Job) -> bool:
    try:
        return not _failed_checks(_surgery_of(dataclasses.replace(job, verify=True)))
    except VerificationError:
        return False


def _report(job: Job, g2: DependencyGraph, gm: fx.GraphModule, fold_lines: list[str],
            verified: list[dict]) -> dict:
    """Params, MACs, changed groups, folds, and what was verified."""
    widths = {gid: g2[gid].size - len(units) for gid, units in job.plan.items()}
    counted = sum(p.numel() for n, p in gm.named_parameters())
    predicted = job.graph.cost.params(widths)
    # folds may add a bias where there was none: those parameters are counted separately
    added = sum(p.numel() for n, p in gm.named_parameters() if n.startswith("_etp_bias_"))
    if counted - added != predicted:
        raise RewriteError(f"the compressed model has {counted - added:,} parameters, the cost "
                           f"model predicts {predicted:,}. This is an etp_fx bug: please report "
                           f"it with the model.")
    groups = {}
    for gid, removed in job.plan.items():
        g = g2[gid]
        exactness = "exact" if g.exact else "approximate"
        if g.exact and any(gid in line for line in fold_lines):
            exactness = "exact-after-folding"
        groups[gid] = {"old": g.size, "new": widths[gid], "exactness": exactness,
                       "removed": list(removed)}
    # MACs depend on the input shapes: count them on a capture made at the inputs given
    cost, at = (job.graph.cost, job.example) if fits(job.graph.module, *job.example) else \
        (job.base.cost, job.traced)
    report = {"params_before": cost.params(), "params_after": counted,
              "macs_before": cost.macs(), "macs_after": cost.macs(widths),
              "macs_counted_at": describe_inputs(*at), "groups": groups, "folds": fold_lines,
              "zeroed_whole": sorted(job.whole),
              "batch_dynamic": batch_dynamic(gm), "verified": verified,
              "capture_notes": list(job.base.module.meta.get("etp_capture_notes", [])),
              "dynamic_dims": job.base.module.meta.get("etp_dynamic_dims"),
              "pinned_dims": job.base.module.meta.get("etp_pinned_dims")}
    return report | headline(verified)
