"""Module-level surgery, part 1: slice the tensors of a model copy, and fold constants into
biases.

The FX rewrite (:mod:`etp_fx.surgery.rewrite`) slices the tensors of a captured graph; here the
same slices are taken from the user's own modules, by parameter name, using the members of each
group (``(name, dim, coords)``): index ``i`` of a member dim goes when ``coords[i]`` is a
removed unit. The modules' size attributes are fixed afterwards by
:mod:`etp_fx.surgery.module_attrs`.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.fx as fx

from ..errors import ModuleOutputError
from ..graph.depgraph import DependencyGraph
from ..graph.plan import kept_units
from ..graph.rules.table import lookup
from ..graph.tensors import get_tensor
from .fold import channel_constant, plan_folds
from .rewrite import RewriteContext, slice_tensor

__all__ = ["removed_positions", "sliced_copy", "bias_folds", "add_fold_biases", "owner_of"]


def owner_of(name: str) -> str:
    """The dotted name of the module that holds tensor ``name`` (``""``: the model)."""
    return name.rpartition(".")[0]


def removed_positions(graph: DependencyGraph, plan: Mapping[str, list[int]]
                      ) -> dict[str, dict[int, list[int]]]:
    """``{tensor name: {dim: removed indices}}`` for every parameter and buffer slice that
    holds a removed unit. A dim shared by several groups (a concat, a product) loses the
    indices of every group's removed units."""
    out: dict[str, dict[int, set[int]]] = {}
    for gid, units in plan.items():
        gone = set(units)
        for m in graph[gid].members:
            idx = {i for i, c in enumerate(m.coords) if c in gone}
            if idx:
                out.setdefault(m.name, {}).setdefault(m.dim, set()).update(idx)
    return {n: {d: sorted(i) for d, i in dims.items()} for n, dims in out.items()}


def _tensors_by_identity(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every parameter and buffer, once, with all the names it is reachable under (tied)."""
    names: dict[int, list[str]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(n)
    return names


def _sliced(old: torch.Tensor, dims: Mapping[int, list[int]]) -> torch.Tensor:
    """``old`` without the given indices of each dim: a new contiguous tensor (a Parameter
    with the same ``requires_grad`` for a Parameter)."""
    new = old.detach()
    for d, idx in sorted(dims.items()):
        gone = set(idx)
        keep = [i for i in range(new.shape[d]) if i not in gone]
        new = new.index_select(d, torch.tensor(keep, dtype=torch.long, device=new.device))
    new = new.contiguous()
    if isinstance(old, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=old.requires_grad)
    return new


def _slices(model: torch.nn.Module, removed: Mapping[str, Mapping[int, list[int]]]
            ) -> list[tuple[list[str], dict[int, list[int]]]]:
    """``(every name of one tensor, {dim: removed indices})`` for each tensor that loses
    indices; a tied tensor loses the union of what its names lose."""
    out = []
    for names in _tensors_by_identity(model).values():
        dims: dict[int, list[int]] = {}
        for n in names:
            for d, idx in removed.get(n, {}).items():
                dims[d] = sorted(set(dims.get(d, [])) | set(idx))
        if dims:
            out.append((names, dims))
    return out


def sliced_copy(model: torch.nn.Module, removed: Mapping[str, Mapping[int, list[int]]]
                ) -> tuple[torch.nn.Module, dict[str, tuple[list[int], list[int]]]]:
    """A deep copy of ``model`` whose tensors named in ``removed`` are sliced, built without
    a full-size copy: each sliced tensor is made from the original and handed to
    ``copy.deepcopy`` in its memo, so the copy holds it wherever the original held the old
    one (tied names stay tied); every other tensor is copied as it is. ``model`` is not
    modified. Returns the copy and ``{name: (old shape, new shape)}`` for every sliced
    name."""
    memo: dict[int, Any] = {}
    changed = {}
    for names, dims in _slices(model, removed):
        old = get_tensor(model, names[0])
        new = _sliced(old, dims)
        memo[id(old)] = new
        changed.update({n: (list(old.shape), list(new.shape)) for n in names})
    return copy.deepcopy(model, memo), changed


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of the same elements (the capture shares the model's)."""
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and \
        a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def _zeroed_capture(graph: DependencyGraph, zeroed: torch.nn.Module) -> fx.GraphModule:
    """A copy of the graph's capture that holds the zeroed original's weights. A capture
    tensor that shares its memory with the zeroed model's (the capture of a model zeroed in
    place, :func:`etp_fx.surgery.zero.zeroed_in_place`) is shared, not copied: the fold
    planning only reads it. The others are copied from the zeroed model."""
    tensors = list(graph.module.named_parameters(remove_duplicate=False)) + \
        list(graph.module.named_buffers(remove_duplicate=False))
    sources = {}
    for name, t in tensors:
        try:
            sources[name] = get_tensor(zeroed, name)
        except AttributeError:
            continue  # a constant of the capture, not a tensor of the model
    memo = {id(t): t for name, t in tensors if isinstance(sources.get(name), torch.Tensor)
            and _same_memory(sources[name], t)}
    gm = copy.deepcopy(graph.module, memo)
    with torch.no_grad():
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + \
                list(gm.named_buffers(remove_duplicate=False)):
            src = sources.get(name)
            if id(t) not in memo and isinstance(src, torch.Tensor) and src.shape == t.shape:
                t.copy_(src)
    return gm


def bias_folds(graph: DependencyGraph, plan: Mapping[str, list[int]],
               zeroed: torch.nn.Module, args: tuple, kwargs: dict) -> list[dict[str, Any]]:
    """The constants that the removed units carry into each consumer, as bias vectors.

    Runs the zeroed original's capture once (:func:`etp_fx.surgery.fold.plan_folds`, which
    refuses input-dependent values with a :class:`FoldError`). Each contribution must be one
    value per channel at any input size (:func:`etp_fx.surgery.fold.channel_constant`, the
    graph output's test for a bias): one a module cannot carry (a zero-padded convolution sees
    the constant only inside the image) raises :class:`ModuleOutputError`.

    Returns one dict per consumer: ``module`` (its name), ``bias`` (the bias tensor's name, or
    None when the module has none), ``vector`` (at the kept output width), ``groups``."""
    keep = kept_units(graph, plan)
    group_of = {graph[gid].uid: gid for gid in plan}
    gm = _zeroed_capture(graph, zeroed)
    folds = plan_folds(gm, keep, group_of, args, kwargs)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for f in folds:
        node = nodes[f.node]
        spec = lookup(node).fold(node)
        weight = _weight_name(node, spec)
        C = slice_tensor(f.contribution, node.meta["etp_dims"], RewriteContext(keep))
        vec = channel_constant(f, C, spec.out_dim % C.dim())
        if vec is None:
            raise ModuleOutputError(
                f"the removed units of {', '.join(f.groups)} leave a constant in module "
                f"{owner_of(weight)!r} that differs by position (e.g. a zero-padded "
                f"convolution sees it only inside the image); no bias can carry it. Use "
                f"output='graph' (etp_fx.compress), which adds it as a constant map, or zero "
                f"the units whole (keep_constants=False).")
        bias = node.args[spec.bias] if spec.bias is not None and spec.bias < len(node.args) \
            else None
        bias_name = str(bias.target) if isinstance(bias, fx.Node) and bias.op == "get_attr" \
            else None
        out.append({"module": owner_of(weight), "bias": bias_name, "vector": vec,
                    "groups": list(f.groups)})
    return out


def _weight_name(node: fx.Node, spec) -> str:
    """The weight operand of a linear consumer (the get_attr that is neither input nor bias)."""
    for i, a in enumerate(node.args):
        if i not in (spec.x, spec.bias) and isinstance(a, fx.Node) and a.op == "get_attr":
            return str(a.target)
    raise ModuleOutputError(f"cannot fold constants into {node.format_node()}: its operand is "
                            f"not a weight of a module; use output='graph' (etp_fx.compress)")


_BIAS_CAPABLE = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


def add_fold_biases(model: torch.nn.Module, folds: list[dict[str, Any]]) -> list[str]:
    """Add each fold's vector to its module's bias; a Linear or convolution without one gets
    one (``bias=True`` behaviour, the same forward). Returns one report line per fold."""
    lines = []
    for f in folds:
        module = model.get_submodule(f["module"])
        vec = f["vector"]
        if f["bias"] is not None:
            old = get_tensor(model, f["bias"])
            with torch.no_grad():
                old.add_(vec.to(old.dtype).to(old.device))
            lines.append(f"{f['module']}: constants of {', '.join(f['groups'])} folded into "
                         f"the bias")
            continue
        if not isinstance(module, _BIAS_CAPABLE) or getattr(module, "bias", None) is not None:
            raise ModuleOutputError(
                f"module {f['module']!r} ({type(module).__name__}) receives constants of "
                f"{', '.join(f['groups'])} but has no bias to carry them; use output='graph' "
                f"(etp_fx.compress) or zero the units whole (keep_constants=False)")
        w = module.weight
        module.bias = torch.nn.Parameter(vec.to(w.dtype).to(w.device).contiguous(),
                                         requires_grad=w.requires_grad)
        lines.append(f"{f['module']}: constants of {', '.join(f['groups'])} folded into a new "
                     f"bias")
    return lines
