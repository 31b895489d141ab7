"""``etp_fx.trace``: capture a model and build its dependency graph in one call."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..capture import capture, check_model_and_inputs, normalize_inputs
from .depgraph import DependencyGraph, build_graph
from .signature import signature_of, structure_of

__all__ = ["trace", "trace_args", "signature_of", "structure_of"]


def trace(model: torch.nn.Module, example_inputs: Any, *,
          kwargs: Mapping[str, Any] | None = None, capture: str = "auto") -> DependencyGraph:
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
    return trace_args(model, args, kw, method=capture)


def trace_args(model: torch.nn.Module, args: tuple, kwargs: dict,
               dynamic_batch: bool = False, method: str = "auto") -> DependencyGraph:
    """:func:`trace` on already normalised positional and keyword inputs.

    The model and inputs are checked first (:func:`etp_fx.capture.check_model_and_inputs`:
    not a module, quantized or sparse weights, an empty batch, NaN/Inf inputs), without
    running the model."""
    check_model_and_inputs(model, args, kwargs)
    gm = capture(model, args, kwargs, dynamic_batch=dynamic_batch, method=method)
    return build_graph(gm, signature_of(model), structure_of(model))


