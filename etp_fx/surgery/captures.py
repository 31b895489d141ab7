"""Which capture ``compress`` rewrites, and the cache of the captures it makes.

The user's own trace is reused when it stands for the result wanted; otherwise the model is
captured once more (once per graph, model and input shapes: the cache below). A result that
is to accept any batch size is always made from a capture that holds for any batch size, or,
where the model's code fixes the batch, from a static capture at the example's own shapes:
never from a capture specialised to a batch the example does not have.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..capture import check_capture, flat_inputs
from ..graph.depgraph import DependencyGraph
from ..graph.signature import structure_of
from ..graph.trace import trace_args
from .working_copy import working_copy

__all__ = ["capture_for", "batch_of_two", "batch_dynamic", "fits", "runs_like_model",
           "unchecked"]

# captures of a model that compress() made for other input shapes or a dynamic batch, per user
# graph, keyed by (id of the model, dynamic batch, method, input shapes): one capture per key.
# Kept by the surgery stage that owns them, so that a DependencyGraph never changes once built.
_CAPTURES: "weakref.WeakKeyDictionary[DependencyGraph, dict]" = weakref.WeakKeyDictionary()


def capture_for(model: torch.nn.Module, graph: DependencyGraph, args: tuple, kw: dict,
                dynamic_batch: bool, *, defer_check: bool = False
                ) -> tuple[DependencyGraph, tuple[tuple, dict]]:
    """The capture to rewrite (never modified: each attempt rewrites a working copy) and the
    inputs it was traced on.

    The user's trace when it fits (the model's module tree, inputs of these shapes, and for a
    batch-dynamic result a trace that holds for any batch). Otherwise the model is captured
    again: batch-dynamic, on a batch of two when the example has a batch of 1 (torch.export
    specialises sizes 0 and 1); if the model's code fixes the batch anyway, statically at the
    example's own shapes. A fast-path capture is first run against the model (with the
    model's weights); when they disagree, the model is exported instead. With
    ``defer_check``, that run is left to the caller (:func:`unchecked` says whether it is
    still due, :func:`runs_like_model` makes it), unless its verdict is known already."""
    if _reusable(graph, model, args, kw, dynamic_batch, defer_check):
        return graph, (args, kw)
    if dynamic_batch:
        args2, kw2 = batch_of_two(args, kw)
        base = _checked_capture(model, graph, args2, kw2, True, defer_check)
        if batch_dynamic(base.module) or not _doubled(args, kw, args2, kw2):
            return base, (args2, kw2)
    return _checked_capture(model, graph, args, kw, False, defer_check), (args, kw)


def _reusable(graph: DependencyGraph, model, args: tuple, kw: dict, dynamic_batch: bool,
              defer_check: bool) -> bool:
    """Does the user's trace serve as it is? A capture of this model's code, on inputs of these
    shapes, holding for any batch size when a batch-dynamic result is wanted."""
    if graph.structure != structure_of(model) or not fits(graph.module, args, kw):
        return False
    meta = graph.module.meta
    if dynamic_batch and not (meta.get("etp_batch_generic") or meta.get("etp_dynamic") == "auto"):
        return False
    return (defer_check and unchecked(graph, model)) or runs_like_model(graph, model, args, kw)


def _checked_capture(model, graph: DependencyGraph, args: tuple, kw: dict,
                     dynamic_batch: bool, defer_check: bool) -> DependencyGraph:
    base = _cached_capture(model, graph, args, kw, dynamic_batch, "auto")
    if (defer_check and unchecked(base, model)) or runs_like_model(base, model, args, kw):
        return base
    return _cached_capture(model, graph, args, kw, dynamic_batch, "export")


def unchecked(base: DependencyGraph, model: torch.nn.Module) -> bool:
    """Is ``base`` a fast-path capture whose run against ``model`` is still due (no verdict
    for these weights yet)?"""
    gm = base.module
    return gm.meta.get("etp_capture") == "fx" and not (
        "etp_capture_check" in gm.meta and _shares_weights(gm, model))


def runs_like_model(base: DependencyGraph, model, args: tuple, kw: dict) -> bool:
    """Does the capture compute what ``model`` computes on these inputs? Only a fast-path capture
    is in doubt (export is the reference IR). It is run with ``model``'s weights: a capture
    shares the weights of the model it was traced from, and ``model`` may be another copy
    (trained further, or zeroed) with the same code; comparing the two would blame the
    capture for the weights."""
    gm = base.module
    if gm.meta.get("etp_capture") != "fx":
        return True
    if not _shares_weights(gm, model):
        gm = working_copy(gm, model)
        gm.meta.pop("etp_capture_check", None)  # that verdict was for the capture's own weights
    return check_capture(gm, model, args, kw) is None


def _shares_weights(gm: fx.GraphModule, model: torch.nn.Module) -> bool:
    theirs = dict(model.named_parameters(remove_duplicate=False))
    theirs.update(model.named_buffers(remove_duplicate=False))
    ours = list(gm.named_parameters(remove_duplicate=False)) + \
        list(gm.named_buffers(remove_duplicate=False))
    return all(theirs.get(name) is t for name, t in ours)


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


def batch_of_two(args: tuple, kw: dict) -> tuple[tuple, dict]:
    """Inputs whose batch of 1 is repeated to 2 (torch.export specialises a size of 1). The
    batch is dim 0 of the first tensor input: when it is larger, an input whose dim 0 is 1 (a
    scale that broadcasts, say) is no batch and stays as it is."""
    first = next((t for t in pytree.tree_leaves((args, kw))
                  if isinstance(t, torch.Tensor) and t.dim()), None)
    if first is None or first.shape[0] != 1:
        return args, kw
    return pytree.tree_map_only(
        torch.Tensor, lambda t: torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t, (args, kw))


def _doubled(args: tuple, kw: dict, args2: tuple, kw2: dict) -> bool:
    shapes = [tuple(t.shape) for t in pytree.tree_leaves((args, kw)) if isinstance(t, torch.Tensor)]
    shapes2 = [tuple(t.shape) for t in pytree.tree_leaves((args2, kw2))
               if isinstance(t, torch.Tensor)]
    return shapes != shapes2


def batch_dynamic(gm: fx.GraphModule) -> bool:
    """Does the capture accept any batch size? A fast-path graph that reads no tensor size is
    the model's code for every batch; an export keeps dim 0 symbolic where the code allows."""
    if gm.meta.get("etp_batch_generic"):
        return True
    dims = [n.meta["val"].shape[0] for n in gm.graph.nodes if n.op == "placeholder"
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim()]
    return any(not isinstance(d, int) for d in dims)


def fits(gm: fx.GraphModule, args: tuple, kw: dict) -> bool:
    """Was ``gm`` captured on inputs of exactly these shapes and dtypes (static shapes)?"""
    try:
        flat = flat_inputs(gm, args, kw)
    except Exception:  # noqa: BLE001 - another input structure
        return False
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return len(ph) == len(flat) and all(_same_input(n.meta.get("val"), v) for n, v in zip(ph, flat))


def _same_input(m: Any, v: Any) -> bool:
    if isinstance(v, torch.Tensor) != isinstance(m, torch.Tensor):
        return False
    if not isinstance(v, torch.Tensor):
        return True
    return v.dtype == m.dtype and len(v.shape) == len(m.shape) and all(
        _hint(a) == b for a, b in zip(m.shape, v.shape))


def _hint(size: Any) -> int | None:
    """A traced size: an int, or the example value a symbolic size was traced at."""
    if isinstance(size, int):
        return size
    return getattr(getattr(size, "node", None), "hint", None)
