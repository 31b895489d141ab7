"""The one extension point of etp_fx: a table from op to channel rule.

A *rule* is a function ``rule(ctx, node)`` that states, with ``ctx.same(a, b)``, which dims of
the node's inputs and outputs index the same units, and tags parameter dims with roles. It may
also carry a ``rewrite(rctx, node)`` hook that fixes the node's shape arguments once widths
change, and a ``zero(z, node)`` hook that says which output dims stay zero at removed units
(read by the rules of norms, reductions and contractions through ``ctx.zeros``). An op with no
rule is a *barrier*: every dim it touches is frozen.

Register a rule for your own op in a few lines (see ``docs/rules.md``)::

    import etp_fx
    from etp_fx.rules import rule

    @rule(torch.ops.mylib.scale_rows)
    def scale_rows(ctx, node):
        x = ctx.dims(node.args[0])
        ctx.same_all(x, ctx.out())   # output channels are the input channels
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

from ...errors import LayoutError
from ..layout import Axis, Term, freeze, mark_inexact, unify
from ..tensors import get_tensor

__all__ = ["Rule", "FoldSpec", "RULES", "rule", "lookup", "RuleContext", "ZeroContext",
           "aten_ops", "zero_flags"]

RuleFn = Callable[["RuleContext", fx.Node], None]
RewriteFn = Callable[[Any, fx.Node], None]
# per output dim: is the value zero at every removed unit of that dim? (a tuple of lists for
# a multi-output op; None: nothing known)
ZeroFn = Callable[["ZeroContext", fx.Node], Any]


@dataclass
class Rule:
    """How channels flow through one op, and how the op is rewritten when widths change."""

    name: str
    couple: RuleFn
    rewrite: RewriteFn | None = None
    # MACs of one call as a sympy expression of the widths: ``cost(c, node)`` (see cost.py)
    cost: Callable[[Any, fx.Node], Any] | None = None
    # for ops linear in one input whose other operand is a weight: ``fold(node) -> FoldSpec``
    # says which input and dim are contracted, so constants of removed units can be folded
    fold: Callable[[fx.Node], "FoldSpec | None"] | None = None
    # which output dims are zero at removed units when they are zero at the inputs (see
    # ``zero_flags``); without it nothing is known, so a norm or sum over the output is
    # approximate
    zero: ZeroFn | None = None


@dataclass(frozen=True)
class FoldSpec:
    """``node`` is linear in ``args[x]`` along the contracted dim ``dim``; ``bias`` is the index
    of its additive argument (None if it has none) and ``out_dim`` the output dim it adds to."""

    x: int
    dim: int
    bias: int | None
    out_dim: int


RULES: dict[Any, Rule] = {}


def rule(*ops: Any, rewrite: RewriteFn | None = None,
         cost: Callable[[Any, fx.Node], Any] | None = None,
         fold: Callable[[fx.Node], FoldSpec | None] | None = None,
         zero: ZeroFn | None = None):
    """Decorator: register ``fn(ctx, node)`` as the channel rule of ``ops``.

    ``ops`` are ``torch.ops.aten.*`` packets or overloads, custom ``torch.ops.<ns>.<op>`` ops,
    or Python callables that appear as ``call_function`` targets. A later registration replaces
    an earlier one, so users can override built-in rules. ``rewrite``, ``cost``, ``fold`` and
    ``zero`` are the optional parts of the rule contract (``docs/rules.md``).
    """
    def deco(fn: RuleFn) -> RuleFn:
        r = Rule(fn.__name__, fn, rewrite, cost, fold, zero)
        for op in ops:
            RULES[op] = r
        fn.rule = r  # type: ignore[attr-defined]
        return fn
    return deco


def aten_ops(*names: str, inplace: bool = False) -> list[Any]:
    """``torch.ops.aten`` packets by name (skipping names this torch lacks), optionally with
    their in-place ``name_`` twins, which the training IR of torch.export keeps."""
    out = []
    for n in names:
        for m in ([n, n + "_"] if inplace else [n]):
            try:
                out.append(getattr(torch.ops.aten, m))
            except (AttributeError, RuntimeError):
                pass
    return out


def lookup(node: fx.Node) -> Rule | None:
    """The rule for a node's target: the exact overload first, then its packet."""
    t = node.target
    if t in RULES:
        return RULES[t]
    packet = getattr(t, "overloadpacket", None)
    if packet is not None and packet in RULES:
        return RULES[packet]
    return None


# --- the context a rule sees -------------------------------------------------------------------

# the stand-in width of a data-dependent (unbacked) size, e.g. the edge count after a boolean
# mask: any value works as long as one symbol always gets the same one (depgraph freezes the
# dims that have such a size)
UNBACKED_WIDTH = 8191


def data_dependent(s: Any) -> bool:
    """Is ``s`` a size no example fixes (an unbacked SymInt, as after a boolean mask)?"""
    if isinstance(s, int):
        return False
    known = getattr(s.node.shape_env, "backed_var_to_val", None) or {}
    return bool(s.node.expr.free_symbols - set(known))


def size_value(s: Any) -> int:
    """An int for a size: itself, a symbolic size's hint (a dynamic batch), or for a
    data-dependent size the value it takes with every unbacked symbol at ``UNBACKED_WIDTH``."""
    try:
        return int(s)
    except Exception:  # noqa: BLE001 - an unbacked SymInt has no value to give
        expr, env = s.node.expr, s.node.shape_env
        known = getattr(env, "backed_var_to_val", None) or {}
        return int(expr.subs({x: known.get(x, UNBACKED_WIDTH) for x in expr.free_symbols}))


@dataclass
class RuleContext:
    """What a rule may do: read the layouts of tensors, state couplings, tag parameter dims."""

    node: fx.Node
    dims_of: Callable[[fx.Node], list]
    roles: dict[tuple[str, int], set[str]]
    notes: dict[str, Any] = field(default_factory=dict)

    # reading
    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name`` of the node."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def dims(self, x: Any) -> list[Term] | None:
        """Layouts of the dims of tensor argument ``x`` (None for non-tensors)."""
        if isinstance(x, fx.Node):
            d = self.dims_of(x)
            return d if isinstance(d, list) else None  # a tuple holds a multi-output's parts
        return None

    def out(self, i: int | None = None) -> list[Term]:
        """The layouts of the node's output dims (of output ``i`` for a tuple output)."""
        d = self.dims_of(self.node)
        return d[i] if i is not None else d

    def shape(self, x: Any) -> tuple[int, ...] | None:
        """The traced shape of ``x`` (a node), or None when it is not a tensor."""
        v = x.meta.get("val") if isinstance(x, fx.Node) else None
        return tuple(size_value(s) for s in v.shape) if isinstance(v, torch.Tensor) else None

    # stating
    def same(self, a: Term, b: Term) -> bool:
        """Units of ``a`` and ``b`` are the same; on conflict both are frozen (never guessed)."""
        try:
            unify(a, b)
            return True
        except LayoutError as e:
            freeze([a, b], f"cannot align channels at {self.where()}: {e}")
            return False

    def same_all(self, xs: Sequence[Term], ys: Sequence[Term]) -> None:
        """``same`` for each pair of dims: ``xs[i]`` indexes the same units as ``ys[i]``."""
        for a, b in zip(xs, ys):
            self.same(a, b)

    def freeze(self, terms: Iterable[Term], why: str) -> None:
        """Make these dims unprunable, recording ``why`` (shown by ``inspect``)."""
        freeze(terms, f"{why} at {self.where()}")

    def inexact(self, terms: Iterable[Term], why: str) -> None:
        """Mark these dims' groups approximate: removing zeroed units changes the output."""
        mark_inexact(terms, f"{why} at {self.where()}")

    def zeros(self, x: Any) -> list[bool]:
        """Per dim of tensor ``x``: is ``x`` zero at every removed unit of that dim in the
        zeroed original? (All False when unknown; see :func:`zero_flags`.)"""
        flags = zero_flags(x) if isinstance(x, fx.Node) else None
        if isinstance(flags, list):
            return flags
        shape = self.shape(x)
        return [False] * len(shape) if shape is not None else []

    def role(self, x: Any, dim: int, role: str) -> None:
        """Tag dim ``dim`` of parameter ``x`` (a get_attr node) with a role: ``out`` (writes the
        units), ``in`` (reads them), ``affine``/``bias``/``stat`` (per-unit vectors)."""
        if isinstance(x, fx.Node) and x.op == "get_attr":
            self.roles.setdefault((str(x.target), dim % len(self.dims(x))), set()).add(role)

    def fresh(self, size: int, why: str = "") -> Axis:
        """A new axis of ``size`` units, unrelated to any other until unified."""
        return Axis(size, why or self.node.name)

    def where(self) -> str:
        """The node being ruled on, formatted for error messages."""
        return self.node.format_node()


# --- which values are zero at removed units ----------------------------------------------------

@dataclass
class ZeroContext:
    """What a rule's ``zero`` hook sees: the node and the zero flags of its inputs."""

    node: fx.Node

    def of(self, x: Any) -> Any:
        """Flags of input ``x``: a list of bools (one per dim), a tuple of lists for a
        multi-output node, or None when ``x`` is not a tensor node."""
        return zero_flags(x) if isinstance(x, fx.Node) else None

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional argument ``i`` or keyword ``name`` of the node."""
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def shape(self, x: Any) -> tuple[int, ...] | None:
        """The traced shape of ``x`` (a node), or None when it is not a tensor."""
        v = x.meta.get("val") if isinstance(x, fx.Node) else None
        return tuple(size_value(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _shapes(node: fx.Node) -> Any:
    """The output's shape, or a tuple of shapes for a multi-output node (None: no tensor)."""
    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(size_value(d) for d in t.shape)
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return shape(v)
    if isinstance(v, (list, tuple)) and v and all(isinstance(t, torch.Tensor) for t in v):
        return tuple(shape(t) for t in v)
    return None


def _conform(flags: Any, shapes: Any) -> Any:
    """``flags`` checked against the output's shapes (anything that does not fit is unknown);
    a dim of size 1 is zero at removed units trivially (it has none)."""
    if isinstance(shapes, tuple) and all(isinstance(d, int) for d in shapes):
        ok = isinstance(flags, list) and len(flags) == len(shapes)
        return [bool(f) or d <= 1 for f, d in zip(flags if ok else [False] * len(shapes), shapes)]
    if isinstance(shapes, tuple):
        parts = flags if isinstance(flags, tuple) and len(flags) == len(shapes) else \
            (None,) * len(shapes)
        return tuple(_conform(f, s) for f, s in zip(parts, shapes))
    return None


def _own_flags(node: fx.Node) -> Any:
    """The flags of one node, its inputs' flags already known."""
    shapes = _shapes(node)
    if shapes is None:
        return None
    if node.op == "get_attr":  # a parameter is zeroed on every removed unit of each of its dims
        gm = node.graph.owning_module
        try:
            param = isinstance(get_tensor(gm, str(node.target)), torch.nn.Parameter)
        except AttributeError:
            param = False
        return _conform([param] * len(shapes), shapes)
    r = lookup(node) if node.op == "call_function" else None
    # a hook that fails fails the rule that asked: depgraph turns that into a barrier, shown
    # in the summary (frozen, never guessed)
    flags = r.zero(ZeroContext(node), node) if r is not None and r.zero is not None else None
    return _conform(flags, shapes)


def zero_flags(node: fx.Node) -> Any:
    """Per output dim of ``node``: is its value zero at every removed unit of that dim, in the
    *zeroed original* (every parameter slice of the removed units zeroed)?

    A parameter is; a model input or a buffer is not; an op's output is what its rule's
    ``zero`` hook says (nothing, without one). A norm, mean or softmax over a dim is exact
    only when its input is zero there, and a sum or contraction only when an operand is.
    Computed once per node and build (memoised in ``node.meta``), inputs first."""
    stack = [(node, False)]
    while stack:  # post-order over the not-yet-known ancestors (no recursion: graphs are deep)
        n, inputs_done = stack.pop()
        if _known(n):
            continue
        if inputs_done:
            n.meta["etp_zero"] = (n.meta.get("etp_dims"), _own_flags(n))
            continue
        stack.append((n, True))
        stack.extend((a, False) for a in n.all_input_nodes if not _known(a))
    return node.meta["etp_zero"][1]


def _known(n: fx.Node) -> bool:
    """Are ``n``'s flags memoised for this build? (``build_graph`` gives every node new
    layouts, so a memo from an earlier build is recomputed.)"""
    memo = n.meta.get("etp_zero")
    return memo is not None and memo[0] is n.meta.get("etp_dims")


def getitem_rule(ctx: RuleContext, node: fx.Node) -> None:
    """``out = parts[i]``: the layouts of the i-th output of a multi-output op."""
    src, i = node.args
    d = ctx.dims_of(src)
    if isinstance(d, tuple) and isinstance(i, int):
        ctx.same_all(ctx.out(), d[i])
    elif d is not None:
        ctx.freeze(ctx.out(), "indexing a non-tuple")


def getitem_zero(z: ZeroContext, node: fx.Node) -> Any:
    """``parts[i]`` is zero where the i-th output of the op is."""
    src, i = node.args
    flags = z.of(src)
    return flags[i] if isinstance(flags, tuple) and isinstance(i, int) else None


RULES[operator.getitem] = Rule("getitem", getitem_rule, zero=getitem_zero)
