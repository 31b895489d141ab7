"""Which widths an op counts: the dims a norm, mean, variance, softmax or max reduces over.

Two consumers read this fact. The dependency graph names a width that a norm or mean
reduces over a ``"hidden"`` unit (the model width a transformer's RMSNorm / LayerNorm
normalises, not an MLP neuron); the module output refuses to shrink any counted width, since a
module keeps dividing by (or comparing over) its own size.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.fx as fx

from .layout import Axis, leaves

__all__ = ["COUNTING", "NORMALISING", "reduced_dims", "reduced_leaves"]

#: ops that normalise over the dims they reduce (divide by their count)
NORMALISING = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
                         "group_norm", "native_group_norm", "mean", "var", "std", "var_mean",
                         "std_mean"})
#: ops that divide by or compare over the count of the dims they reduce
COUNTING = NORMALISING | {"softmax", "_softmax", "_safe_softmax", "log_softmax",
                          "_log_softmax", "amax", "amin", "logsumexp"}


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def reduced_dims(node: fx.Node, ops: frozenset[str] = COUNTING) -> list[int]:
    """The dims of ``node.args[0]`` that ``node`` reduces over, when it is one of ``ops``
    (empty otherwise)."""
    name = _op_name(node)
    x = node.args[0] if node.args else None
    val = getattr(x, "meta", {}).get("val")
    if node.op != "call_function" or name not in ops or not isinstance(val, torch.Tensor):
        return []
    nd = val.dim()
    if name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
        return list(range(nd - len(node.args[1]), nd))
    if name in ("group_norm", "native_group_norm"):
        return [1]
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        return list(range(nd))
    return [int(d) % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def reduced_leaves(gm: fx.GraphModule, ops: frozenset[str] = COUNTING
                   ) -> Iterator[tuple[Axis, fx.Node]]:
    """Every unit axis (layout leaf) that an op of ``ops`` reduces over, with the node (in
    graph order; a leaf reduced by several nodes comes once per node). Needs the layouts
    (``node.meta["etp_dims"]``) the rules wrote."""
    for n in gm.graph.nodes:
        dims = reduced_dims(n, ops)
        terms = n.args[0].meta.get("etp_dims") if dims else None
        if not isinstance(terms, list):
            continue
        for d in dims:
            for leaf in leaves(terms[d]):
                yield leaf, n
