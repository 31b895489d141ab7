"""The rewrite pass: slice every parameter, fix every shape argument, check every shape.

Input: a captured graph module whose dims carry layouts (``node.meta["etp_dims"]``) and the
kept units of each leaf axis. Output: the same module, rewritten in place into a dense smaller
one. Widths are never guessed: after rewriting, the module is run once and each node's shape is
compared with the one the layouts predict; a mismatch raises an error carrying the node.
"""
from __future__ import annotations

import operator
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from ..capture import flat_inputs
from ..errors import RewriteError
from ..graph.layout import Cat, Prod, Term, kept_indices, new_size, resolve, size_of
from ..graph.rules.table import data_dependent, lookup
from ..graph.tensors import get_tensor, set_tensor

__all__ = ["RewriteError", "RewriteContext", "rewrite_module", "slice_tensor", "check_shapes"]



class RewriteContext:
    """What a rule's ``rewrite`` hook sees: the new width of any layout or tensor."""

    def __init__(self, keep: Mapping[int, Sequence[int]]) -> None:
        self.keep = keep

    def size(self, t: Term) -> int:
        return new_size(t, self.keep)

    def shape(self, node: fx.Node) -> list[int]:
        return [self.size(t) for t in node.meta["etp_dims"]]

    def resize(self, node: fx.Node, old: Sequence[Any], first_dim: int = 0) -> list[Any]:
        """A size argument ``old`` describing dims ``first_dim..`` of ``node``'s output, with
        the entries of dims whose width changes replaced; other entries are kept as they are.
        A ``-1`` stays (the other entries fix it); a symbolic entry (a dynamic batch times
        heads, say) is scaled by the kept share of the units, so it stays batch-generic."""
        dims = node.meta["etp_dims"]
        out = list(old)
        for i in range(len(out)):
            t = dims[first_dim + i]
            if self.size(t) == new_size(t, {}) or (isinstance(out[i], int) and out[i] == -1):
                continue
            ratio = self._ratio(t) if isinstance(out[i], fx.Node) else None
            out[i] = self.size(t) if ratio is None else _scaled(node, out[i], *ratio)
        return out

    def _ratio(self, t: Term) -> tuple[int, int] | None:
        """(new, original) widths of the factors of a product layout that change; None for a
        concatenation (its width is not a multiple of its parts')."""
        t = resolve(t)
        if isinstance(t, Cat):
            return None
        num = den = 1
        for part in (t.parts if isinstance(t, Prod) else (t,)):
            if self.size(part) != size_of(part):
                num, den = num * self.size(part), den * size_of(part)
        return num, den

    def indices(self, t: Term) -> list[int] | None:
        """Kept indices of a dim, or None when the dim keeps everything."""
        idx = kept_indices(t, self.keep)
        return None if len(idx) == new_size(t, {}) else idx


def _scaled(node: fx.Node, entry: fx.Node, num: int, den: int) -> fx.Node:
    """A symbolic size ``entry * num // den``, computed in the graph before ``node`` (exact:
    the entry is a multiple of the ``den`` units it counts)."""
    with node.graph.inserting_before(node):
        prod = node.graph.call_function(operator.mul, (entry, num))
        return node.graph.call_function(operator.floordiv, (prod, den))


def slice_tensor(t: torch.Tensor, dims: Sequence[Term], r: RewriteContext) -> torch.Tensor:
    """``t`` with only the kept indices along every dim."""
    out = t
    for d, term in enumerate(dims):
        idx = r.indices(term)
        if idx is not None:
            out = out.index_select(d, torch.tensor(idx, dtype=torch.long, device=t.device))
    return out.contiguous() if out is not t else t


def rewrite_module(gm: fx.GraphModule, keep: Mapping[int, Sequence[int]], *,
                   recompile: bool = True) -> fx.GraphModule:
    """Slice parameters and fix shape arguments of ``gm`` in place, then recompile (unless
    the caller changes the graph again and recompiles then: ``recompile=False``)."""
    r = RewriteContext(keep)
    aliases: dict[int, list[str]] = {}  # one tensor under several names (tied weights)
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + \
            list(gm.named_buffers(remove_duplicate=False)):
        aliases.setdefault(id(t), []).append(name)
    originals = [(node, get_tensor(gm, str(node.target))) for node in gm.graph.nodes
                 if node.op == "get_attr" and isinstance(node.meta.get("etp_dims"), list)]
    done: set[int] = set()  # tensors already sliced (aliases share one tensor)
    for node, old in originals:
        if id(old) in done:
            continue
        done.add(id(old))
        new = slice_tensor(old.detach() if isinstance(old, torch.nn.Parameter) else old,
                           node.meta["etp_dims"], r)
        if new is not old and tuple(new.shape) != tuple(old.shape):
            shared = None
            for n in aliases.get(id(old), [str(node.target)]):  # the tie survives
                set_tensor(gm, n, new if shared is None else shared)
                shared = get_tensor(gm, n) if shared is None else shared
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        rule = lookup(node)
        if rule is not None and rule.rewrite is not None and _changes(node, r):
            rule.rewrite(r, node)
    gm.graph.lint()
    if recompile:
        gm.recompile()
    return gm


def _changes(node: fx.Node, r: RewriteContext) -> bool:
    """Only rewrite nodes whose inputs or outputs change width (others stay untouched)."""
    def any_change(d: Any) -> bool:
        if isinstance(d, list):
            return any(r.size(t) != new_size(t, {}) for t in d)
        if isinstance(d, tuple):
            return any(any_change(p) for p in d)
        return False
    return any_change(node.meta.get("etp_dims")) or any(
        any_change(a.meta.get("etp_dims")) for a in node.all_input_nodes)


class _ShapeCheck(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, r: RewriteContext) -> None:
        super().__init__(gm)
        self.r = r

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - re-raised with the node
            raise RewriteError(f"the rewritten graph fails at {n.format_node()}: "
                               f"{type(e).__name__}: {e}") from e
        dims = n.meta.get("etp_dims")
        if isinstance(out, torch.Tensor) and isinstance(dims, list):
            want = [self.r.size(t) for t in dims]
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):  # data-dependent sizes have no layout width
                want = [o if data_dependent(v) else w for o, v, w in zip(out.shape, val.shape, want)]
            if list(out.shape) != want:
                raise RewriteError(f"rewritten node {n.format_node()} has shape "
                                   f"{list(out.shape)}, but its layout says {want}. This is an "
                                   f"etp_fx bug: please report it with the model.")
        return out


def check_shapes(gm: fx.GraphModule, keep: Mapping[int, Sequence[int]], args: tuple,
                 kwargs: dict) -> Any:
    """Run the rewritten module once, checking every node's shape; return its outputs."""
    flat = flat_inputs(gm, args, kwargs)
    return _ShapeCheck(gm, RewriteContext(keep)).run(*flat)


