"""Tensors of a module by dotted name: the one copy of getting and setting them."""
from __future__ import annotations

import torch

__all__ = ["get_tensor", "set_tensor"]


def get_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or plain tensor attribute ``name`` (``"layer1.0.weight"``)."""
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr)


def set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace ``name`` by ``value``, keeping its kind: a parameter stays a parameter (with its
    ``requires_grad``), a buffer a buffer, a plain attribute an attribute."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        if not isinstance(value, torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=old.requires_grad)
        if attr in owner._parameters:
            owner._parameters[attr] = value
            return
    if attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)
