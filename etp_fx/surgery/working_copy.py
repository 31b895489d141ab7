"""A working copy of a captured module: its own graph, module tree and tensors, with the weights
of the model being compressed. Each compression zeroes and rewrites such a copy, so a capture
(the user's trace, or one ``compress`` cached) is never modified and can be reused."""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from ..capture import flat_inputs

__all__ = ["working_copy"]

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class _NoCopy(Exception):
    """A nested graph module holds state: the cheap copy cannot be made (deepcopy instead)."""


class _Clones:
    """One clone per source tensor, so tensors tied in the source stay tied in the copy. The
    source of a name is the model's tensor when it has the capture's shape and dtype (the
    weights to compress, as they are now), else the capture's own tensor."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.source = dict(model.named_parameters(remove_duplicate=False))
        self.source.update(model.named_buffers(remove_duplicate=False))
        self.done: dict[int, torch.Tensor] = {}

    def matching(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        s = self.source.get(name)
        return s if s is not None and s.shape == t.shape and s.dtype == t.dtype else None

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        s = self.matching(name, t)
        s = t if s is None else s
        if id(s) not in self.done:
            c = s.detach().clone()
            if isinstance(t, torch.nn.Parameter):
                c = torch.nn.Parameter(c, requires_grad=t.requires_grad)
            self.done[id(s)] = c
        return self.done[id(s)]


def _has_state(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _shell(m: torch.nn.Module, root: bool) -> torch.nn.Module:
    """A new module object sharing ``m``'s attributes (tensors and children replaced later)."""
    if root:
        # its own class: a GraphModule's forward lives on its class, recompiled per graph;
        # a capture compiled on first use (the fast path's) gives an ordinary GraphModule
        cls = next(c for c in type(m).__mro__ if c.__name__ != "GraphModuleImpl")
        cls = fx.GraphModule if issubclass(cls, _LazyGraphModule) else cls
        new = fx.GraphModule.__new__(cls)
        new.__dict__.update(m.__dict__)
        new.meta = dict(m.meta)
    else:
        new = m.__class__.__new__(m.__class__)
        new.__dict__.update(m.__dict__)
    for hooks in _HOOKS:  # own hook dicts: hooks added to the copy stay off the capture
        if hooks in m.__dict__:
            new.__dict__[hooks] = type(m.__dict__[hooks])(m.__dict__[hooks])
    return new


def _copy_module(m: torch.nn.Module, prefix: str, clones: _Clones) -> torch.nn.Module:
    if isinstance(m, fx.GraphModule) and prefix:
        if _has_state(m):
            raise _NoCopy
        return m  # a stateless graph (the input guards): shared
    new = _shell(m, root=not prefix)
    new._parameters = {k: None if v is None else clones(prefix + k, v)
                       for k, v in m._parameters.items()}
    new._buffers = {k: None if v is None else clones(prefix + k, v)
                    for k, v in m._buffers.items()}
    new._modules = {k: c if c is None or not (_has_state(c) or isinstance(c, fx.GraphModule))
                    else _copy_module(c, f"{prefix}{k}.", clones)
                    for k, c in m._modules.items()}
    for k, v in m.__dict__.items():  # plain tensor attributes (lifted constants)
        if isinstance(v, torch.Tensor) and k not in ("_parameters", "_buffers"):
            new.__dict__[k] = clones(prefix + k, v)
    return new


def _deep_copy(gm: fx.GraphModule, clones: _Clones) -> fx.GraphModule:
    """The slow way: ``copy.deepcopy``, then the model's weights copied in."""
    new = copy.deepcopy(gm)
    with torch.no_grad():
        for name, t in list(new.named_parameters(remove_duplicate=False)) + \
                list(new.named_buffers(remove_duplicate=False)):
            s = clones.matching(name, t)
            if s is not None:
                t.copy_(s)
    return new


def _interpreted_forward(like: fx.GraphModule) -> Callable[..., Any]:
    """The forward of a copy not compiled yet: its graph run node by node (as fast as the
    generated code, give or take a few microseconds a node, and no code generation). The
    interpreter takes the flat inputs and returns the outputs in the graph's structure. It
    has the signature of ``like``'s forward: inputs are named by it (the dims to grow)."""
    def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        return fx.Interpreter(self).run(*flat_inputs(self, args, kwargs))
    forward.__signature__ = inspect.signature(type(like).forward)
    return forward


def working_copy(gm: fx.GraphModule, model: torch.nn.Module, *,
                 compiled: bool = True) -> fx.GraphModule:
    """A copy of the captured module ``gm`` that can be zeroed and rewritten in place.

    It has its own graph (the nodes' ``meta`` copied shallowly, so layouts are shared), its own
    module tree, and its own copy of every parameter and buffer, taken from ``model`` under the
    same name, else from ``gm``. Tied tensors stay tied. Much cheaper than ``copy.deepcopy``,
    which also copies every node's fake tensor.

    Parameters
    ----------
    gm : fx.GraphModule
        A capture of ``model`` (or of a model with the same parameter names).
    model : nn.Module
        Where the weights come from.
    compiled : bool
        Generate the copy's code now. False for a copy that is rewritten (and so compiled
        again) before it is used much: it runs its graph node by node until
        ``recompile()``, which saves generating code for a graph that is about to change.

    Returns
    -------
    fx.GraphModule
    """
    clones = _Clones(model)
    try:
        new = _copy_module(gm, "", clones)
    except _NoCopy:
        return _deep_copy(gm, clones)
    if compiled:
        new.graph = copy.deepcopy(gm.graph)  # the setter recompiles into new's own class
    else:
        new._graph = copy.deepcopy(gm.graph)
        new._graph.owning_module = new
        type(new).forward = _interpreted_forward(gm)  # new's own class: recompile replaces it
    return new
