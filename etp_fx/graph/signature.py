"""Which model a graph stands for: the one copy of "does this model match this graph"."""
from __future__ import annotations

import torch

from ..errors import ModelError, ModelMismatchError

__all__ = ["signature_of", "structure_of", "check_model_matches"]


def signature_of(model: torch.nn.Module) -> tuple:
    """Names and shapes of the parameters: what a graph must match to be used on a model."""
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def structure_of(model: torch.nn.Module) -> tuple:
    """The module tree, ``(qualified name, class)`` per module: what a capture must match to
    stand for a model's code (parameters alone do not tell a ReLU from a GELU)."""
    return tuple((n, type(m).__module__, type(m).__qualname__) for n, m in model.named_modules())


def check_model_matches(graph, model: torch.nn.Module) -> None:
    """Refuse a graph traced from another model: parameter names and shapes must match.

    Raises
    ------
    ModelMismatchError
        Naming the missing, new and reshaped parameters, and how to trace again.
    ModelError
        When ``model`` is not a ``torch.nn.Module`` at all.
    """
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"expected the torch.nn.Module the graph was traced from, got "
                         f"{type(model).__name__}")
    got = signature_of(model)
    want = tuple(graph.signature)
    if got == want:
        return
    gd, wd = dict(got), dict(want)
    missing = [n for n in wd if n not in gd][:3]
    extra = [n for n in gd if n not in wd][:3]
    shape = [f"{n!r} changed shape ({list(wd[n])} -> {list(gd[n])})"
             for n in wd if n in gd and gd[n] != wd[n]][:3]
    parts = []
    if missing:
        parts.append(f"parameters {missing} are missing from the model")
    if extra:
        parts.append(f"parameters {extra} are new")
    if shape:
        parts.append(", ".join(shape))
    if not parts:
        parts.append("the parameters are in a different order")
    raise ModelMismatchError(
        f"the graph was traced from a different model ({type(model).__name__} has {len(got)} "
        f"parameters, the graph {len(want)}): " + "; ".join(parts) +
        ". Trace the model you use: etp_fx.trace(model, example_inputs).")
