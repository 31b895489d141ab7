"""Example inputs and model state around a capture: one place for both capture paths."""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export._tree_utils import reorder_kwargs

from ..errors import InputError

__all__ = ["normalize_inputs", "describe_inputs", "eval_mode", "flat_inputs"]


def normalize_inputs(example_inputs: Any, kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    kwargs = dict(kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    raise InputError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs; got "
        f"{type(example_inputs).__name__}. Example: etp_fx.trace(model, (torch.randn(1, 3, 224, 224),))")


def describe_inputs(args: Sequence, kwargs: Mapping) -> str:
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Trace in eval mode (dropout off, BatchNorm on running stats); restore every submodule's
    own mode afterwards, even when tracing fails."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.train(t)


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat placeholder values of an exported module for these inputs."""
    spec = gm._in_spec
    flat, got = pytree.tree_flatten((tuple(args), dict(kwargs)))
    if got != spec:  # kwargs order may differ: reorder by the exported signature
        flat, _ = pytree.tree_flatten((tuple(args), reorder_kwargs(dict(kwargs), spec)))
    return flat
