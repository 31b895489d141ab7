"""Captured modules that behave like any ``nn.Module``: train/eval, ``.to(dtype or device)``,
``state_dict()``, deep copies that keep their call forms.

``ExportedProgram.module()`` returns a module whose ``train()`` and ``eval()`` raise, whose
lifted constants ``.to()`` leaves behind, and whose graph names the dtype and device it was
traced with (``aten.to(x, torch.float32)``, ``_assert_tensor_metadata(..., device=cpu)``:
Hugging Face models cast activations explicitly), so that a ``.to(torch.float64)`` or a
``.cuda()`` result fails at the first such op. :func:`as_plain_module` fixes all three, in
place: the module's class becomes a :class:`PlainGraphModule` of the same kind, whose
``_apply`` (what ``.to()``, ``.double()``, ``.cuda()`` run) retargets those ops along with
the weights.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch
import torch.fx as fx

from .calls import rebind_after_copy

__all__ = ["as_plain_module", "PlainGraphModule", "compute_of"]


def compute_of(module: torch.nn.Module) -> tuple[torch.dtype, torch.device] | None:
    """The floating dtype and the device the module computes in: those of its first floating
    parameter (or buffer); None without one."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype, t.device
    for t in module.buffers():
        if t.is_floating_point():
            return t.dtype, t.device
    return None


def _retarget(gm: fx.GraphModule, before: tuple, after: tuple) -> None:
    """Ops that name the old compute dtype or device name the new one (other dtypes, an
    integer index or a float32 upcast of a float16 model, stay)."""
    (old_dtype, old_device), (new_dtype, new_device) = before, after

    def swap(v: Any) -> Any:
        if isinstance(v, torch.dtype) and v == old_dtype:
            return new_dtype
        if isinstance(v, torch.device) and v == old_device:
            return new_device
        return v
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args = fx.node.map_aggregate(node.args, swap)
        kwargs = fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


class PlainGraphModule(fx.GraphModule):
    """A captured graph module whose ``.to()``, ``.double()``, ``.cuda()`` also retarget the
    ops of its graph that name the dtype or device it computed in."""

    def _apply(self, fn: Callable, recurse: bool = True) -> Any:
        before = compute_of(self)
        out = super()._apply(fn, recurse)
        after = compute_of(self)
        if before is not None and after is not None and before != after:
            _retarget(self, before, after)
        return out


_PLAIN: dict[type, type] = {}


def _plain_class(gm: fx.GraphModule) -> type:
    """``PlainGraphModule`` mixed into the class of ``gm`` (one class per kind, e.g. the
    stateful graph module of torch.export)."""
    # the per-instance class is named GraphModuleImpl by qualname (torch renames it)
    base = next(c for c in type(gm).__mro__
                if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
    if issubclass(base, PlainGraphModule):
        return base
    if base not in _PLAIN:
        _PLAIN[base] = type(base)("PlainGraphModule", (PlainGraphModule, base),
                                  {"__module__": __name__})
    return _PLAIN[base]


def _as_plain_class(gm: fx.GraphModule) -> None:
    """Give ``gm`` its own subclass of the plain class (a graph module's forward lives on its
    class, one class per instance, as ``GraphModule.__new__`` makes them)."""
    if issubclass(type(gm), PlainGraphModule):
        return
    own = type(type(gm))("GraphModuleImpl", (_plain_class(gm),), {"__module__": __name__})
    gm.__class__ = own
    gm.recompile()


def as_plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Make a module from ``ExportedProgram.module()`` behave like any ``nn.Module`` (in place).

    - ``.train()`` and ``.eval()`` set the flags and nothing else (the flags start in eval).
      **The graph computes eval-mode semantics whatever the flag says**: it was captured in
      eval mode, so BatchNorm normalises with its running statistics (training does not
      update them) and dropout is off. ``meta["etp_mode"]`` records this as ``"eval"``.
    - ``.to(dtype)`` and ``.to(device)`` (``.double()``, ``.cuda()``) move the weights and
      the constants (now non-persistent buffers), and the ops of the graph that name the
      dtype or device the module computed in follow them (:class:`PlainGraphModule`); ops
      naming another dtype (an integer index, a deliberate float32 upcast in a float16
      model) keep it.
    - ``state_dict()`` holds the same keys as the exported program's (constants are not
      saved).
    - ``copy.deepcopy`` keeps the call binder (:mod:`etp_fx.capture.calls`).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        From ``ExportedProgram.module()`` or :func:`etp_fx.load` (calling it again changes
        nothing); anything that is not a graph module is returned as it is.

    Returns
    -------
    torch.fx.GraphModule
        ``gm`` itself.
    """
    if not isinstance(gm, fx.GraphModule):
        return gm
    overrides = [n for n in ("train", "eval") if isinstance(vars(gm).get(n), types.MethodType)]
    for name in overrides:  # the instance overrides that raise
        del gm.__dict__[name]
    for m in gm.modules():
        if overrides:  # fresh from torch.export: the flags start as what the graph computes
            m.training = False
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                del m.__dict__[name]
                m.register_buffer(name, value, persistent=False)
    _as_plain_class(gm)
    if rebind_after_copy not in gm._deepcopy_hooks:
        gm._deepcopy_hooks.append(rebind_after_copy)
    gm.meta["etp_mode"] = "eval"
    return gm
