"""``etp_fx.compress``: one call from a model and a plan to a dense, smaller, verified model."""
from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..capture import check_capture, flat_inputs, normalize_inputs
from ..errors import FoldError, PlanError, VerificationError
from ..graph.depgraph import DependencyGraph
from ..graph.signature import check_model_matches, structure_of
from ..graph.trace import trace_args
from ..regularise.selection import Selection, selection_from
from .fold import apply_folds, plan_folds
from ..graph.plan import kept_units
from .rewrite import check_shapes, rewrite_module
from .zero import zeroed_slices

__all__ = ["compress", "VerificationError"]



def _check_weights(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point or p.is_quantized:
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; etp_fx prunes float "
                            f"models. Prune before quantizing, then quantize the smaller model.")
        if p.device.type == "meta":
            raise TypeError(f"parameter {name!r} is on the meta device: trace() can analyse such "
                            f"a model, but compress() needs real weights")


def compress(model: torch.nn.Module, example_inputs: Any, selection: Selection | None = None,
             *, graph: DependencyGraph | None = None, verify: bool = True, rtol: float = 1e-5,
             keep_constants: bool | None = None, allow_approximate: bool = False,
             dynamic_batch: bool = True, **select_forms: Any) -> fx.GraphModule:
    """Remove units and return a dense, smaller ``torch.fx.GraphModule``.

    The result computes what ``zero_units(copy(model), graph, plan)`` computes (the *zeroed
    original*), and with ``verify=True`` this is checked by running both on the example inputs.

    Parameters
    ----------
    model : nn.Module
        Not modified. Compressed in eval mode (BatchNorm on running statistics, dropout off);
        a model in training mode gets a warning.
    example_inputs : Tensor, tuple or dict
        Inputs the result is traced for: a tensor, a tuple of positional inputs or a dict of
        keyword inputs.
    selection : Selection, optional
        Which units go: :class:`etp_fx.Budget`, :class:`etp_fx.Ratio`,
        :class:`etp_fx.Threshold` or :class:`etp_fx.Plan`. Or, instead, exactly one keyword
        form (sugar for the same values): ``remove={group_id: [unit indices]}`` (a Plan),
        ``threshold=`` (a Threshold), ``ratio=`` (a Ratio), ``target_macs=`` /
        ``target_params=`` (a Budget: the share of MACs / params to keep, in (0, 1]), plus the
        selection's own options, e.g. ``ratio=0.5, scope="global"`` or ``threshold=0.02,
        relative=True``. An option the selection does not take is an error.
    graph : DependencyGraph, optional
        A graph traced from this model, to avoid tracing again. With ``dynamic_batch=False``
        its capture is reused (no second ``torch.export``) when the model has the module tree
        and the inputs the shapes it was traced with; otherwise, and for a batch-dynamic
        result, the model is captured once more (once per graph: later calls reuse it). The
        weights are always read from ``model`` as it is now.
    verify : bool
        Run the compressed model against the zeroed original and raise
        :class:`VerificationError`, naming the groups, on any difference beyond ``rtol`` of the
        output's scale. A float32 difference beyond ``rtol`` is rechecked with both models in
        float64 (ill-conditioned ops, such as a norm over two features, amplify rounding);
        the model is returned only if they agree there to 1e-9 (``float64_rel_diff`` in the
        report).
    rtol : float
        The verification tolerance, relative to the output's scale.
    keep_constants : bool, optional
        Keep the per-unit biases and norm shifts of removed units and fold their constants into
        the consumers. Default: False for a Plan (units are zeroed whole), True for the
        norm-based selections (trained biases are preserved).
    allow_approximate : bool
        Allow removing units of groups whose removal is approximate (norms over the pruned dim).
        Verification then reports the deviation instead of raising.
    dynamic_batch : bool
        Keep dim 0 of the inputs symbolic, so the result accepts any batch size (where the
        model's code allows; otherwise the example's sizes are kept). A batch of 1 is traced as
        a batch of 2, since torch.export specialises sizes 0 and 1.

    Returns
    -------
    torch.fx.GraphModule
        With ``meta["etp_report"]``: params and MACs before and after, each changed group (old
        width, new width, exactness), folds and the verified deviation.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> small = etp_fx.compress(net, torch.randn(2, 4), ratio=0.5, scope="global")
    >>> small.meta["etp_report"]["params_after"] < small.meta["etp_report"]["params_before"]
    True
    """
    selection = selection_from(selection, **select_forms)
    _check_weights(model)
    args, kw = normalize_inputs(example_inputs)
    if model.training:
        warnings.warn("compress() treats the model as in eval mode (BatchNorm uses running "
                      "statistics, dropout is off); the model you passed is left in training "
                      "mode", stacklevel=2)
    graph = graph if graph is not None else trace_args(model, args, kw)
    check_model_matches(graph, model)
    plan = selection.select(graph, model, allow_approximate=allow_approximate)
    approximate = [gid for gid in plan if not graph[gid].exact]
    if approximate and not allow_approximate:
        raise PlanError(f"removing units of {approximate[:3]} is approximate "
                        f"({graph[approximate[0]].inexact_reasons[0].split(' at ')[0]}); pass "
                        f"allow_approximate=True to accept that")
    if keep_constants is None:
        keep_constants = selection.keeps_constants
    # a trace that holds for any batch size serves a batch-dynamic result as it is
    dynamic_capture = dynamic_batch and not _batch_generic(graph, model, args, kw)
    if dynamic_capture:  # export specialises a size of 1: trace a batch of two identical halves
        args, kw = _batch_of_two(args, kw)
    base = _base_graph(model, graph, args, kw, dynamic_capture)
    run = (model, base, graph, plan, args, kw, keep_constants, rtol)
    try:
        small = _compress_plan(*run, verify, approximate)
    except VerificationError as e:
        if keep_constants and _verifies_zeroed_whole(*run):
            raise FoldError(
                f"the removed units carry constants (kept biases or norm shifts) into ops "
                f"etp_fx cannot fold them into (for example an einsum or a matmul between "
                f"activations), so removing them would change the result ({e}). Zero the units "
                f"whole (keep_constants=False), or train their biases to zero first.") from None
        raise VerificationError(f"{e}\n{_culprits(*run)}") from None
    if dynamic_batch:  # save() exports at these inputs: a batch of 1 would be specialised
        small.meta["etp_example_inputs"] = _batch_of_two(*small.meta["etp_example_inputs"])
    return small


def _batch_of_two(args: tuple, kw: dict) -> tuple[tuple, dict]:
    """Inputs whose batch of 1 is repeated to 2 (torch.export specialises a size of 1)."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t, (args, kw))


def _base_graph(model, graph: DependencyGraph, args: tuple, kw: dict,
                dynamic_capture: bool) -> DependencyGraph:
    """The capture to rewrite (never modified: each attempt rewrites a copy).

    The user's own trace when it fits (static shapes wanted, traced on inputs of these shapes):
    no second capture. Otherwise (a batch-dynamic result is wanted, or other inputs) the model
    is captured once more, unzeroed; zeroing is done on copies of that capture. A fast-path
    capture (:mod:`etp_fx.fxcapture`) is first run against the model on the inputs; if they
    disagree, the model is exported instead."""
    if not dynamic_capture and graph.structure == structure_of(model) and \
            _fits(graph.module, args, kw):
        base = graph
    else:
        base = _cached_capture(model, graph, args, kw, dynamic_capture, "auto")
    if check_capture(base.module, model, args, kw) is None:
        return base
    return _cached_capture(model, graph, args, kw, dynamic_capture, "export")


# captures of a model that compress() made for other input shapes or a dynamic batch, per user
# graph, keyed by (id of the model, dynamic_batch, input shapes): one export per key. Kept here,
# by the pass that owns them, so that a DependencyGraph never changes after it is built.
_CAPTURES: "weakref.WeakKeyDictionary[DependencyGraph, dict]" = weakref.WeakKeyDictionary()


def _cached_capture(model, graph: DependencyGraph, args: tuple, kw: dict, dynamic_batch: bool,
                    method: str) -> DependencyGraph:
    """A capture of ``model`` for these inputs, remembered on ``graph`` (one at a time)."""
    flat, spec = pytree.tree_flatten((args, kw))
    key = (id(model), dynamic_batch, method, str(spec), tuple(
        (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v)
        for v in flat))
    cache = _CAPTURES.setdefault(graph, {})
    hit = cache.get(key)
    if hit is not None and hit[0]() is model and hit[1].structure == structure_of(model) \
            and hit[1].signature == graph.signature:
        return hit[1]
    base = trace_args(model, args, kw, dynamic_batch=dynamic_batch, method=method)
    cache.clear()  # one at a time: it holds a graph module
    cache[key] = (weakref.ref(model), base)
    return base


def _batch_generic(graph: DependencyGraph, model, args: tuple, kw: dict) -> bool:
    """Is the user's trace a capture that holds for any batch size, of this model, on inputs
    of these shapes? Then it serves a batch-dynamic result as it is (no second capture)."""
    return bool(graph.module.meta.get("etp_batch_generic")) and \
        graph.structure == structure_of(model) and _fits(graph.module, args, kw)


def _fits(gm: fx.GraphModule, args: tuple, kw: dict) -> bool:
    """Was ``gm`` captured on inputs of exactly these shapes and dtypes (static shapes)?"""
    try:
        flat = flat_inputs(gm, args, kw)
    except Exception:  # noqa: BLE001 - another input structure
        return False
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(ph) != len(flat):
        return False
    for n, v in zip(ph, flat):
        m = n.meta.get("val")
        if isinstance(v, torch.Tensor) != isinstance(m, torch.Tensor):
            return False
        if isinstance(v, torch.Tensor):
            if v.dtype != m.dtype or len(v.shape) != len(m.shape) or any(
                    not isinstance(a, int) or a != b for a, b in zip(m.shape, v.shape)):
                return False
    return True


def _verifies_zeroed_whole(model, base, graph, plan, args, kw, keep_constants, rtol) -> bool:
    try:
        _compress_plan(model, base, graph, plan, args, kw, False, rtol, True, [])
        return True
    except VerificationError:
        return False


def _compress_plan(model, base, graph, plan, args, kw, keep_constants, rtol, verify,
                   approximate):
    """Zero the plan's units in a copy of the capture ``base`` (weights from ``model``), then
    rewrite that copy: the zeroed original is the copy before the rewrite."""
    def zeroed_original() -> fx.GraphModule:
        gm = _working_copy(base.module, model)
        params = dict(gm.named_parameters(remove_duplicate=False))  # tied names too
        with torch.no_grad():
            for name, dim, idx in zeroed_slices(base, plan, keep_constants, params):
                params[name].index_fill_(dim, idx, 0.0)
        return gm

    g2 = dataclasses.replace(base, module=zeroed_original())
    return _compress_traced(g2, graph, plan, args, kw, verify, approximate, rtol,
                            zeroed_original)


def _working_copy(gm: fx.GraphModule, model: torch.nn.Module) -> fx.GraphModule:
    """A copy of the exported module ``gm`` that can be zeroed and rewritten in place: its own
    graph (the nodes' ``meta`` copied shallowly, so layouts are shared), its own module tree,
    and its own copy of every parameter and buffer, taken from ``model`` under the same name
    (the weights to compress, as they are now), else from ``gm``. Tied tensors stay tied.
    Much cheaper than ``copy.deepcopy`` (which also copies every node's fake tensor)."""
    src = dict(model.named_parameters(remove_duplicate=False))
    src.update(model.named_buffers(remove_duplicate=False))
    clones: dict[int, torch.Tensor] = {}

    def clone(name: str, t: torch.Tensor) -> torch.Tensor:
        s = src.get(name)
        if s is None or s.shape != t.shape or s.dtype != t.dtype:
            s = t
        if id(s) not in clones:
            c = s.detach().clone()
            if isinstance(t, torch.nn.Parameter):
                c = torch.nn.Parameter(c, requires_grad=t.requires_grad)
            clones[id(s)] = c
        return clones[id(s)]

    def has_state(m: torch.nn.Module) -> bool:
        return any(True for _ in m.parameters()) or any(True for _ in m.buffers())

    def copy_module(m: torch.nn.Module, prefix: str) -> torch.nn.Module:
        if isinstance(m, fx.GraphModule) and prefix:
            if has_state(m):
                raise _NoCopy
            return m  # a stateless graph (the input guards): shared
        if prefix:
            new = m.__class__.__new__(m.__class__)
            new.__dict__.update(m.__dict__)
        else:
            cls = next(c for c in type(m).__mro__ if c.__name__ != "GraphModuleImpl")
            new = fx.GraphModule.__new__(cls)  # its own class: forward lives on the class
            new.__dict__.update(m.__dict__)
            new.meta = dict(m.meta)
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                      "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if hooks in m.__dict__:
                new.__dict__[hooks] = type(m.__dict__[hooks])(m.__dict__[hooks])
        new._parameters = {k: None if v is None else clone(prefix + k, v)
                           for k, v in m._parameters.items()}
        new._buffers = {k: None if v is None else clone(prefix + k, v)
                        for k, v in m._buffers.items()}
        new._modules = {k: None if c is None else (copy_module(c, f"{prefix}{k}.")
                                                   if has_state(c) or isinstance(c, fx.GraphModule)
                                                   else c)
                        for k, c in m._modules.items()}
        for k, v in m.__dict__.items():  # plain tensor attributes (lifted constants)
            if isinstance(v, torch.Tensor) and k not in ("_parameters", "_buffers"):
                new.__dict__[k] = clone(prefix + k, v)
        return new

    try:
        new = copy_module(gm, "")
    except _NoCopy:
        new = copy.deepcopy(gm)
        with torch.no_grad():
            for name, t in list(new.named_parameters(remove_duplicate=False)) + \
                    list(new.named_buffers(remove_duplicate=False)):
                s = src.get(name)
                if s is not None and s.shape == t.shape and s.dtype == t.dtype:
                    t.copy_(s)
        return new
    new.graph = copy.deepcopy(gm.graph)  # the setter recompiles into new's own class
    return new


class _NoCopy(Exception):
    pass


def _culprits(model, base, graph, plan, args, kw, keep_constants, rtol, limit: int = 32) -> str:
    """Compress each group alone to name the ones that break verification."""
    bad = []
    for gid in list(plan)[:limit]:
        try:
            _compress_plan(model, base, graph, {gid: plan[gid]}, args, kw, keep_constants,
                           rtol, True, [])
        except VerificationError:
            bad.append(gid)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            bad.append(f"{gid} ({type(e).__name__}: {e})")
    if not bad:
        return "Each group alone verifies; the failure comes from removing them together."
    return "Groups that fail alone: " + ", ".join(bad)


def _compress_traced(g2: DependencyGraph, graph: DependencyGraph, plan: dict[str, list[int]],
                     args: tuple, kw: dict, verify: bool, approximate: list[str], rtol: float,
                     zeroed_original):
    gm = g2.module
    for gid, units in plan.items():
        if gid not in {g.id for g in g2.groups} or g2[gid].size != graph[gid].size:
            raise RuntimeError(f"group {gid!r} changed between two traces of the same model; "
                               f"etp_fx cannot compress it safely")
    keep = kept_units(g2, plan)
    group_of = {g2[gid].uid: gid for gid in plan}
    # two forward passes in all: the zeroed original's (planning the folds, when there are any,
    # records its output as the reference) and the rewritten module's (checking every node's
    # shape, its output is the one verified)
    ran: list = []
    folds = plan_folds(gm, keep, group_of, args, kw, outputs=ran)
    reference = None
    if verify:
        if ran:
            reference = ran[0]
        else:
            with torch.no_grad():
                reference = gm(*args, **kw)
    del ran
    widths = {gid: g2[gid].size - len(units) for gid, units in plan.items()}
    rewrite_module(gm, keep)
    fold_lines = apply_folds(gm, folds, keep)
    with torch.no_grad():
        got = check_shapes(gm, keep, args, kw)
    report = _report(graph, g2, plan, widths, gm, fold_lines)
    if verify:
        report["max_abs_diff"], report["output_scale"] = _compare(reference, got)
        bad = report["max_abs_diff"] > rtol * max(report["output_scale"], 1e-12)
        if bad and not approximate:
            # float32 rounding, amplified by an ill-conditioned op (a norm over two features,
            # say), or a real difference? Both models again in float64 tell them apart
            report["float64_rel_diff"] = _deviation_in_float64(zeroed_original(), gm, args, kw)
            bad = report["float64_rel_diff"] is None or report["float64_rel_diff"] > 1e-9
        if bad and not approximate:
            raise VerificationError(
                f"the compressed model differs from the zeroed original by "
                f"{report['max_abs_diff']:.3g} (output scale {report['output_scale']:.3g}) after "
                f"removing units of {sorted(plan)[:5]}{'...' if len(plan) > 5 else ''}. This is an "
                f"etp_fx bug: please report it.")
    gm.meta["etp_report"] = report
    gm.meta["etp_example_inputs"] = (pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), args),
                                     pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), kw))
    return gm


def _deviation_in_float64(zeroed: fx.GraphModule, small: fx.GraphModule, args: tuple,
                          kw: dict) -> float | None:
    """max |zeroed - small| / output scale with both models and the inputs in float64, or
    None when a model does not run in float64 (a cast to float32 inside, say)."""
    def to64(t: torch.Tensor) -> torch.Tensor:
        return t.double() if t.is_floating_point() else t
    try:
        small64 = copy.deepcopy(small).double()
        args64, kw64 = pytree.tree_map_only(torch.Tensor, to64, (args, kw))
        with torch.no_grad():
            diff, scale = _compare(zeroed.double()(*args64, **kw64), small64(*args64, **kw64))
    except Exception:  # noqa: BLE001 - no float64 answer: the float32 verdict stands
        return None
    return diff / max(scale, 1e-300)


def _compare(a: Any, b: Any) -> tuple[float, float]:
    fa = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    fb = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(fa) != len(fb) or any(x.shape != y.shape for x, y in zip(fa, fb)):
        raise VerificationError("the compressed model's outputs have other shapes than the "
                                "original's; the model interface must not change")
    diff = max((float((x - y).abs().max()) for x, y in zip(fa, fb) if x.numel()), default=0.0)
    scale = max((float(x.abs().max()) for x in fa if x.numel()), default=0.0)
    return diff, scale


def _report(graph: DependencyGraph, g2: DependencyGraph, plan, widths, gm: fx.GraphModule,
            fold_lines) -> dict:
    cm = graph.cost  # the user's trace: MACs at the user's batch size
    counted = sum(p.numel() for n, p in gm.named_parameters())
    predicted = cm.params(widths)
    # folds may add a bias where there was none: those parameters are counted separately
    added = sum(p.numel() for n, p in gm.named_parameters() if n.startswith("_etp_bias_"))
    if counted - added != predicted:
        raise RuntimeError(f"parameter count {counted - added:,} differs from the cost model's "
                           f"{predicted:,}: an etp_fx bug, please report it")
    groups = {}
    for gid, removed in plan.items():
        g = g2[gid]
        exactness = "exact" if g.exact else "approximate"
        if g.exact and any(gid in line for line in fold_lines):
            exactness = "exact-after-folding"
        groups[gid] = {"old": g.size, "new": widths[gid], "exactness": exactness,
                       "removed": list(removed)}
    return {"params_before": cm.params(), "params_after": counted,
            "macs_before": cm.macs(), "macs_after": cm.macs(widths), "groups": groups,
            "folds": fold_lines}
