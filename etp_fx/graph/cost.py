"""Cost model: parameters and MACs as polynomials of every group's width.

Each group is a variable named by its id. A dim's size is the sum (concat) or product (heads,
flatten) of the sizes of its leaves, so the parameter count is a polynomial in the widths and a
rewrite can be checked against it exactly. MAC formulas live beside each op's rule (``cost=``).

The formulas are built once, as small expression trees of sums and products (no sympy), and
compiled to one Python function each, so evaluating a set of widths is one call of plain
integer arithmetic. The sympy forms (``params_expr``, ``macs_expr``) are built on first use.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch.fx as fx

from .layout import Axis, Term, resolve
from .rules.table import lookup
from .tensors import get_tensor

__all__ = ["CostModel"]


class _Expr:
    """A sum or product of group widths and integers; ``+`` and ``*`` with ints or other
    expressions, constants folded. ``kind`` is ``"w"`` (width ``i``), ``"+"`` or ``"*"``."""

    __slots__ = ("kind", "i", "parts", "const")

    def __init__(self, kind: str, i: int = -1, parts: tuple = (), const: int = 0) -> None:
        self.kind, self.i, self.parts, self.const = kind, i, parts, const

    def __add__(self, other: Any) -> Any:
        if isinstance(other, int):
            if other == 0:
                return self
            if self.kind == "+":
                return _Expr("+", parts=self.parts, const=self.const + other)
            return _Expr("+", parts=(self,), const=other)
        if not isinstance(other, _Expr):
            return NotImplemented
        a = self.parts if self.kind == "+" else (self,)
        b = other.parts if other.kind == "+" else (other,)
        c = (self.const if self.kind == "+" else 0) + (other.const if other.kind == "+" else 0)
        return _Expr("+", parts=a + b, const=c)

    __radd__ = __add__

    def __mul__(self, other: Any) -> Any:
        if isinstance(other, int):
            if other == 1:
                return self
            if other == 0:
                return 0
            if self.kind == "*":
                return _Expr("*", parts=self.parts, const=self.const * other)
            return _Expr("*", parts=(self,), const=other)
        if not isinstance(other, _Expr):
            return NotImplemented
        a = self.parts if self.kind == "*" else (self,)
        b = other.parts if other.kind == "*" else (other,)
        c = (self.const if self.kind == "*" else 1) * (other.const if other.kind == "*" else 1)
        return _Expr("*", parts=a + b, const=c)

    __rmul__ = __mul__

    def code(self) -> str:
        if self.kind == "w":
            return f"w[{self.i}]"
        inner = ", ".join(p.code() for p in self.parts)
        if self.kind == "+":  # sum()/prod() of a flat tuple: no deep parse trees
            return f"sum(({inner},), {self.const})"
        return f"prod(({inner},), start={self.const})"


def _compile(e: Any):
    if isinstance(e, int):
        return lambda w: e
    src = f"lambda w: {e.code()}"
    return eval(compile(src, "<etp_fx cost model>", "eval"), {"sum": sum, "prod": math.prod})


def _walk(e: Any, w: list[int]) -> int:
    """The value of ``e`` at widths ``w``, by walking the tree (what the compiled code does)."""
    if isinstance(e, int):
        return e
    if e.kind == "w":
        return w[e.i]
    values = [_walk(p, w) for p in e.parts]
    return sum(values, e.const) if e.kind == "+" else math.prod(values, start=e.const)


class _Formula:
    """An expression, evaluated by walking its tree for its first few evaluations and by
    compiled code after: compiling costs as much as about twenty walks (a few ms on a large
    CNN), and ``compress`` evaluates a fresh trace's cost model four times, while a search
    over widths evaluates it hundreds of times."""

    WALKS = 16  # evaluations before compiling

    def __init__(self, e: Any) -> None:
        self.e, self.calls, self.fn = e, 0, None

    def __call__(self, w: list[int]) -> int:
        if self.fn is None:
            self.calls += 1
            if self.calls <= self.WALKS:
                return _walk(self.e, w)
            self.fn = _compile(self.e)
        return self.fn(w)


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
        self._index = {g.uid: i for i, g in enumerate(graph.groups)}
        self._ids = {g.id: i for i, g in enumerate(graph.groups)}
        self._full = [int(g.size) for g in graph.groups]
        self._sympy: dict[str, Any] = {}
        gm: fx.GraphModule = graph.module
        # each parameter tensor once, however many names (ties) or get_attr nodes reach it
        seen: set[int] = set()
        params: Any = 0
        for node in gm.graph.nodes:
            name = str(node.target)
            if node.op == "get_attr" and name in graph.param_names:
                key = id(get_tensor(gm, name))
                if key not in seen:
                    seen.add(key)
                    params = params + self.numel(node)
        macs: Any = 0
        for node in gm.graph.nodes:
            r = lookup(node) if node.op == "call_function" else None
            if r is not None and r.cost is not None:
                macs = macs + r.cost(self, node)
        self._params_tree, self._macs_tree = params, macs
        self._params_fn = _Formula(params)
        self._macs_fn = _Formula(macs)

    # helpers for the per-rule cost functions
    def dims(self, x) -> list[Term] | None:
        d = x.meta.get("etp_dims") if isinstance(x, fx.Node) else None
        return d if isinstance(d, list) else None

    def size(self, t: Term):
        t = resolve(t)
        if isinstance(t, Axis):
            i = self._index.get(t.uid)
            return int(t.size) if i is None else _Expr("w", i=i)
        parts = [self.size(p) for p in t.parts]
        out: Any = 0 if type(t).__name__ == "Cat" else 1
        for p in parts:
            out = out + p if type(t).__name__ == "Cat" else out * p
        return out

    def numel(self, node: fx.Node):
        out: Any = 1
        for t in self.dims(node) or []:
            out = out * self.size(t)
        return out

    # sympy views, for people and doctests
    @property
    def symbols(self) -> dict:
        """``{axis uid: sympy.Symbol}``, one per group, named by its id."""
        return {g.uid: s for g, s in zip(self.graph.groups, self._syms())}

    @property
    def by_id(self) -> dict:
        return {g.id: s for g, s in zip(self.graph.groups, self._syms())}

    def _syms(self) -> list:
        if "syms" not in self._sympy:
            import sympy
            self._sympy["syms"] = [sympy.Symbol(g.id, positive=True, integer=True)
                                   for g in self.graph.groups]
        return self._sympy["syms"]

    def _to_sympy(self, e: Any):
        import sympy
        if isinstance(e, int):
            return sympy.Integer(e)
        if e.kind == "w":
            return self._syms()[e.i]
        parts = [self._to_sympy(p) for p in e.parts]
        if e.kind == "+":
            return sympy.Add(*parts, sympy.Integer(e.const))
        return sympy.Mul(sympy.Integer(e.const), *parts)

    @property
    def params_expr(self):
        """The parameter count as a sympy expression of the group widths."""
        if "params" not in self._sympy:
            self._sympy["params"] = self._to_sympy(self._params_tree)
        return self._sympy["params"]

    @property
    def macs_expr(self):
        """The MACs as a sympy expression of the group widths."""
        if "macs" not in self._sympy:
            self._sympy["macs"] = self._to_sympy(self._macs_tree)
        return self._sympy["macs"]

    # evaluation
    def _args(self, widths: Mapping[str, int] | None) -> list[int]:
        w = list(self._full)
        if widths:
            for gid, v in widths.items():
                i = self._ids.get(gid)
                if i is None:
                    unknown = sorted(set(widths) - set(self._ids))
                    raise KeyError(f"unknown group ids {unknown[:3]}; see graph.summary()")
                w[i] = int(v)
        return w

    def params(self, widths: Mapping[str, int] | None = None) -> int:
        """Parameter count when each group in ``widths`` has that many units (others full)."""
        return int(self._params_fn(self._args(widths)))

    def macs(self, widths: Mapping[str, int] | None = None) -> int:
        """Multiply-accumulates of one forward pass on the example inputs' shapes."""
        return int(self._macs_fn(self._args(widths)))
