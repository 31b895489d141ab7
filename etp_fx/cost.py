"""Symbolic cost model: parameters and MACs as sympy expressions of every group's width.

Each group is a symbol named by its id. A dim's size is the sum (concat) or product (heads,
flatten) of the sizes of its leaves, so the parameter count is a polynomial in the widths and a
rewrite can be checked against it exactly. MAC formulas live beside each op's rule (``cost=``).
"""
from __future__ import annotations

from typing import Mapping

import sympy
import torch.fx as fx

from .layout import Axis, Term, resolve
from .rules.table import lookup

__all__ = ["CostModel"]


class CostModel:
    """Params and MACs of a traced model as functions of its group widths.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cm = etp_fx.trace(net, torch.randn(1, 4)).cost
    >>> cm.params_expr
    7*0.weight[0] + 2
    >>> cm.params({"0.weight[0]": 3}), cm.macs({"0.weight[0]": 3})
    (23, 18)
    """

    def __init__(self, graph) -> None:
        self.graph = graph
        self.symbols = {g.uid: sympy.Symbol(g.id, positive=True, integer=True) for g in graph.groups}
        self.by_id = {g.id: self.symbols[g.uid] for g in graph.groups}
        gm: fx.GraphModule = graph.module
        # each parameter tensor once, however many names (ties) or get_attr nodes reach it
        from .depgraph import attr_tensor
        seen: set[int] = set()
        params = sympy.Integer(0)
        for node in gm.graph.nodes:
            name = str(node.target)
            if node.op == "get_attr" and name in graph.param_names:
                key = id(attr_tensor(gm, name))
                if key not in seen:
                    seen.add(key)
                    params += self.numel(node)
        macs = sympy.Integer(0)
        for node in gm.graph.nodes:
            r = lookup(node) if node.op == "call_function" else None
            if r is not None and r.cost is not None:
                macs += r.cost(self, node)
        self.params_expr = params
        self.macs_expr = macs
        syms = list(self.by_id.values())
        self._params_fn = sympy.lambdify(syms, params, "math")
        self._macs_fn = sympy.lambdify(syms, macs, "math")

    # helpers for the per-rule cost functions
    def dims(self, x) -> list[Term] | None:
        d = x.meta.get("etp_dims") if isinstance(x, fx.Node) else None
        return d if isinstance(d, list) else None

    def size(self, t: Term):
        t = resolve(t)
        if isinstance(t, Axis):
            return self.symbols.get(t.uid, sympy.Integer(t.size))
        parts = [self.size(p) for p in t.parts]
        return sympy.Add(*parts) if type(t).__name__ == "Cat" else sympy.Mul(*parts)

    def numel(self, node: fx.Node):
        out = sympy.Integer(1)
        for t in self.dims(node) or []:
            out *= self.size(t)
        return out

    # evaluation
    def _args(self, widths: Mapping[str, int] | None) -> list[int]:
        widths = dict(widths or {})
        unknown = set(widths) - set(self.by_id)
        if unknown:
            raise KeyError(f"unknown group ids {sorted(unknown)[:3]}; see graph.summary()")
        return [int(widths.get(g.id, g.size)) for g in self.graph.groups]

    def params(self, widths: Mapping[str, int] | None = None) -> int:
        """Parameter count when each group in ``widths`` has that many units (others full)."""
        return int(round(self._params_fn(*self._args(widths))))

    def macs(self, widths: Mapping[str, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass on the example inputs' shapes."""
        return int(round(self._macs_fn(*self._args(widths))))
