"""``etp_fx.trace``: capture a model and build its dependency graph in one call."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..capture import capture, check_model_and_inputs, normalize_inputs
from .depgraph import DependencyGraph, build_graph
from .signature import signature_of, structure_of

__all__ = ["trace", "trace_args", "signature_of", "structure_of"]

_UNSET = object()  # dynamic not given: dynamic_batch decides


def trace(model: torch.nn.Module, example_inputs: Any, *,
          kwargs: Mapping[str, Any] | None = None, capture: str = "auto",
          dynamic: Any = None) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and build its coupled-channel dependency graph.

    Parameters
    ----------
    model : torch.nn.Module
        Any module; it is not modified, and the train/eval mode of each submodule is restored.
        Parameters may live on the ``meta`` device.
    example_inputs : Tensor, tuple or dict
        One input tensor, a tuple of positional inputs, or a dict of keyword inputs.
    kwargs : dict, optional
        Extra keyword inputs.
    capture : {"auto", "export"}
        How the ATen graph is captured: ``"auto"`` lowers ``torch.fx.symbolic_trace`` output
        where every module and function is one the fast path knows (most CNNs; several
        times faster) and uses ``torch.export`` otherwise; ``"export"`` always exports. Both
        give the same graph (``docs/design.md``).
    dynamic : {None, "auto", "batch"} or dict
        Which input dims the capture keeps symbolic (see :func:`etp_fx.capture.capture`):
        None (default), the example's shapes; ``"auto"``, every dim the model's code allows;
        ``"batch"``, dim 0; or a ``torch.export`` ``dynamic_shapes`` spec. The groups are the
        same either way; ``graph.module.meta["etp_dynamic_dims"]`` and
        ``["etp_pinned_dims"]`` record which dims stayed dynamic and why the others did not.

    Returns
    -------
    DependencyGraph

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> g = etp_fx.trace(net, torch.randn(1, 4))
    >>> [(grp.id, grp.size) for grp in g.groups]
    [('0.weight[0]', 8)]
    """
    args, kw = normalize_inputs(example_inputs, kwargs)
    return trace_args(model, args, kw, method=capture, dynamic=dynamic)


def trace_args(model: torch.nn.Module, args: tuple, kwargs: dict,
               dynamic_batch: bool = False, method: str = "auto",
               dynamic: Any = _UNSET) -> DependencyGraph:
    """:func:`trace` on already normalised positional and keyword inputs.

    ``dynamic`` as for :func:`etp_fx.capture.capture`; when it is not given,
    ``dynamic_batch=True`` asks for every dim the model allows (``"auto"``). The model and
    inputs are checked first (:func:`etp_fx.capture.check_model_and_inputs`: not a module,
    quantized or sparse weights, an empty batch, NaN/Inf inputs), without running the
    model."""
    check_model_and_inputs(model, args, kwargs)
    if dynamic is _UNSET:
        dynamic = "auto" if dynamic_batch else None
    gm = capture(model, args, kwargs, dynamic=dynamic, method=method)
    return build_graph(gm, signature_of(model), structure_of(model))


