"""Channel rules for the ATen ops of torch.export's training IR: one entry per op family.

Each rule has a one-line algebra comment. Notation: ``x[i]`` is the layout of dim ``i`` of ``x``;
``~`` means "same units"; ``Prod``/``Cat`` are defined in :mod:`etp_fx.layout`.
A rule's ``rewrite`` hook, when present, fixes the op's shape arguments after pruning; it sees a
:class:`etp_fx.rewrite.RewriteContext` (``r.shape(node)`` is a tensor's new shape).

A rule's ``zero`` hook says which output dims are zero at removed units (see
:func:`etp_fx.graph.rules.table.zero_flags`). Norms, means, softmaxes and other reductions over
a pruned dim, and contractions (linear, conv, matmul, einsum, attention), read those flags:
a reduction over zeros is rewritten into its full-width form (:mod:`.exact`) and stays exact;
over anything else it marks the group approximate. Nothing is silently exact.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ..layout import Cat, Prod, size_of
from . import exact
from .table import FoldSpec, RuleContext, ZeroContext, aten_ops, rule


def _dim(d: int, n: int) -> int:
    return d % n if n else 0


def _dimlist(d: Any, n: int) -> list[int]:
    if d is None or (isinstance(d, (list, tuple)) and not d):  # no dims: all of them
        return list(range(n))
    if isinstance(d, int):
        d = [d]
    return sorted({_dim(int(i), n) for i in d})


# --- elementwise -------------------------------------------------------------------------------

def broadcast(ctx: RuleContext, node: fx.Node, args: list[Any] | None = None) -> None:
    """out[-k] ~ x[-k] for every tensor input x whose dim -k is not broadcast (size > 1 or equal)."""
    out = ctx.out()
    oshape = ctx.shape(node)
    for a in (node.args if args is None else args):
        for x in (a if isinstance(a, (list, tuple)) else [a]):
            xd, xs = ctx.dims(x), ctx.shape(x)
            if xd is None:
                continue
            for k in range(1, len(xd) + 1):
                if k <= len(out) and xs[-k] == oshape[-k]:
                    ctx.same(xd[-k], out[-k])
                    ctx.role(x, -k, "elementwise")


def _bound(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (ATen ops only)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


# --- zero flags: per output dim, is the value zero at removed units (see table.zero_flags)

def _aligned(z: ZeroContext, node: fx.Node, x: Any) -> list[bool | None] | None:
    """Per output dim of an elementwise op: ``x``'s flag at the dim broadcasting aligns with
    it, or None where ``x`` is broadcast along it. None when ``x`` is not a tensor."""
    out, xs, f = z.shape(node), z.shape(x), z.of(x)
    if out is None or xs is None or not isinstance(f, list):
        return None
    n = len(out)
    return [f[i - n] if n - i <= len(xs) and xs[i - n] == out[i] else None for i in range(n)]


def _scalar_zero(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and v == 0


def _zero_if_all(z: ZeroContext, node: fx.Node, operands: list[Any]) -> list[bool] | None:
    """Zero where every operand is (a + b, where(c, a, b)): a scalar must be 0, a tensor
    zero and not broadcast along the dim."""
    n = len(z.shape(node) or ())
    out = [True] * n
    for a in operands:
        if a is None:
            continue
        if not isinstance(a, fx.Node):
            if not _scalar_zero(a):
                return None
            continue
        f = _aligned(z, node, a)
        if f is None:
            return None
        out = [o and bool(g) for o, g in zip(out, f)]
    return out


def _zero_if_any(z: ZeroContext, node: fx.Node, operands: list[Any]) -> list[bool] | None:
    """Zero where some operand is (a * b): a scalar 0, or a tensor zero along the dim."""
    n = len(z.shape(node) or ())
    if any(_scalar_zero(a) for a in operands):
        return [True] * n
    out = [False] * n
    for a in operands:
        f = _aligned(z, node, a) if isinstance(a, fx.Node) else None
        if f is not None:
            out = [o or bool(g) for o, g in zip(out, f)]
    return out


def _in_range(lo: Any, hi: Any) -> bool:
    """Does ``clamp(0, lo, hi)`` stay 0?"""
    return (lo is None or (not isinstance(lo, fx.Node) and lo <= 0)) and \
        (hi is None or (not isinstance(hi, fx.Node) and hi >= 0))


# f(0) = 0 for these (in eval mode for the dropouts): zeros pass through
KEEPS_ZERO = {
    "relu", "relu6", "gelu", "silu", "tanh", "hardswish", "leaky_relu", "elu", "selu", "celu",
    "mish", "neg", "sqrt", "abs", "erf", "sin", "square", "sign", "sgn", "log1p", "dropout",
    "feature_dropout", "alpha_dropout", "contiguous", "clone", "detach", "alias", "to",
    "_to_copy", "type_as", "lift_fresh_copy", "floor", "ceil", "round", "trunc", "nan_to_num",
    "tril", "triu", "prelu", "_prelu_kernel"}


def _elementwise_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # which inputs must be zero for the output to be: by what the op computes at 0
    name, a = _name(node), node.args
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]  # the in-place twin computes the same
    b = _bound(node)
    if name in KEEPS_ZERO:
        return _zero_if_all(z, node, [a[0]])
    if name in ("hardtanh", "clamp", "clamp_min", "clamp_max"):
        lo = b.get("min_val", b.get("min")) if name != "clamp_max" else None
        hi = b.get("max_val", b.get("max")) if name != "clamp_min" else None
        if name == "hardtanh":
            lo, hi = b.get("min_val", -1.0), b.get("max_val", 1.0)
        return _zero_if_all(z, node, [a[0]]) if _in_range(lo, hi) else None
    if name == "mul":
        return _zero_if_any(z, node, list(a[:2]))
    if name in ("div", "floor_divide", "remainder", "fmod"):
        return _zero_if_all(z, node, [a[0]])
    if name in ("add", "sub", "rsub", "maximum", "minimum", "lerp"):
        return _zero_if_all(z, node, list(a[:2]))
    if name == "where":
        return _zero_if_all(z, node, list(a[1:3]))
    if name == "masked_fill":
        return _zero_if_all(z, node, [a[0], a[2]])
    if name == "pow":
        e = b.get("exponent")
        ok = isinstance(a[0], fx.Node) and isinstance(e, (int, float)) and e > 0
        return _zero_if_all(z, node, [a[0]]) if ok else None
    if name in ("zero", "zeros_like"):
        return [True] * len(z.shape(node) or ())
    if name in ("fill", "full_like"):
        return [True] * len(z.shape(node) or ()) if _scalar_zero(a[1]) else None
    if name == "copy":
        return _zero_if_all(z, node, [a[1]])
    if name in ("addcmul", "addcdiv"):
        prod = _zero_if_any(z, node, list(a[1:3]) if name == "addcmul" else [a[1]])
        first = _zero_if_all(z, node, [a[0]])
        return None if prod is None or first is None else [p and f for p, f in zip(prod, first)]
    return None


ELEMENTWISE = aten_ops(
    "add", "sub", "rsub", "mul", "div", "relu", "relu6", "gelu", "silu", "sigmoid", "tanh",
    "hardswish", "hardsigmoid", "hardtanh", "clamp", "clamp_min", "clamp_max", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "prelu", "neg", "exp", "log", "log1p", "sqrt",
    "rsqrt", "abs", "pow", "erf", "reciprocal", "sin", "cos", "square", "sign", "maximum",
    "minimum", "where", "masked_fill", "dropout", "feature_dropout", "alpha_dropout",
    "contiguous", "clone", "detach", "alias", "to", "_to_copy", "type_as", "lift_fresh_copy",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
    "bitwise_and", "bitwise_or", "__and__", "__or__", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "fill", "copy", "lerp", "addcmul", "addcdiv",
    "floor", "ceil", "round", "trunc", "isnan", "isinf", "nan_to_num", "logit", "floor_divide",
    "remainder", "fmod", "sgn", "tril", "triu", "_assert_tensor_metadata", "zero",
    inplace=True,
)


# ops that give inf or NaN at 0, and which operand: the removed units' zeros would poison the
# zeroed original (0 * inf is NaN in every consumer), so its removal is not well defined
BY_ZERO = {"div": 1, "floor_divide": 1, "remainder": 1, "fmod": 1, "reciprocal": 0, "rsqrt": 0,
           "log": 0, "pow": 0}


def _divides_by_zero(ctx: RuleContext, node: fx.Node) -> None:
    """Mark the output dims where a divisor (or the input of log, rsqrt, 1/x, x^-p) is zero
    at removed units approximate: the zeroed original has inf or NaN there."""
    name = _name(node).rstrip("_")
    i = BY_ZERO.get(name)
    if i is None or len(node.args) <= i or not isinstance(node.args[i], fx.Node):
        return
    if name == "pow" and not (isinstance(node.args[1], (int, float)) and node.args[1] < 0):
        return
    flags = _aligned(ZeroContext(node), node, node.args[i]) or []
    out, shape = ctx.out(), ctx.shape(node)
    bad = [out[j] for j, f in enumerate(flags) if f and shape[j] > 1]
    if bad:
        ctx.inexact(bad, f"{name} of a value that removed units zero gives inf or NaN")


@rule(*ELEMENTWISE, zero=_elementwise_zero)
def elementwise(ctx: RuleContext, node: fx.Node) -> None:
    # out[-k] ~ x[-k] for every non-broadcast input dim (numpy broadcasting, aligned right)
    if ctx.out() is not None:
        broadcast(ctx, node)
        _divides_by_zero(ctx, node)


@rule(*aten_ops("prelu", "_prelu_kernel"), zero=_elementwise_zero)
def prelu(ctx: RuleContext, node: fx.Node) -> None:
    # y = max(0, x) + w[c] * min(0, x): y ~ x; w[0] ~ x[1], the channel dim (x[0] for 1-D x),
    # not the last dim as numpy broadcasting would align it
    x, w = node.args[0], node.args[1]
    xd, wd = ctx.dims(x), ctx.dims(w)
    ctx.same_all(xd, ctx.out())
    if wd and ctx.shape(w)[0] > 1:
        ctx.same(wd[0], xd[1 if len(xd) >= 2 else 0])
        ctx.role(w, 0, "affine")


# --- contractions: the ops that own weights ----------------------------------------------------

def _linear_macs(c: Any, node: fx.Node) -> Any:
    # every output element is one dot product over the input features
    return c.numel(node) * c.size(c.dims(node.args[0])[-1])


def _is_weight(x: Any) -> bool:
    return isinstance(x, fx.Node) and x.op == "get_attr"


def contracts(ctx: RuleContext, terms: list, operands: list[tuple[Any, int]], what: str) -> None:
    """A sum of products over ``terms`` is exact when, at every removed unit, one factor is
    zero: some ``(operand, dim)`` must be zero there (a weight always is: its slices are
    zeroed). Otherwise the removed units add something the pruned op cannot: approximate."""
    for x, d in operands:  # weights first: they answer without looking upstream
        flags = ctx.zeros(x)
        if flags and flags[d]:
            return
    ctx.inexact(terms, f"{what} sums products that removed units do not zero over this dim")


def _zero_or_none(z: ZeroContext, x: Any, d: int) -> bool:
    """Is optional operand ``x`` (a bias, say) absent or zero along dim ``d``?"""
    f = z.of(x)
    return x is None or (isinstance(f, list) and bool(f[d]))


def _linear_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # y[..., o] = x W[o] + b[o]: zero at a removed o when its row (and bias) are; along the
    # other dims x's zeros stay only without a bias
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    fx_, fw = z.of(x) or [], z.of(w) or []
    rows = len(fw) == 2 and fw[0] and _zero_or_none(z, b, 0)
    return [bool(f) and b is None for f in fx_[:-1]] + [bool(rows)]


@rule(*aten_ops("linear"), cost=_linear_macs, zero=_linear_zero,
      fold=lambda n: FoldSpec(x=0, dim=-1, bias=2, out_dim=-1) if _is_weight(n.args[1]) else None)
def linear(ctx: RuleContext, node: fx.Node) -> None:
    # y[..., o] = x[..., i] W[o, i] + b[o]:  x[-1] ~ W[1] (in),  y[-1] ~ W[0] ~ b[0] (out)
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    xd, wd, y = ctx.dims(x), ctx.dims(w), ctx.out()
    ctx.same_all(xd[:-1], y[:-1])
    ctx.same(xd[-1], wd[-1])
    contracts(ctx, [xd[-1]], [(w, -1), (x, -1)], "linear")
    ctx.role(w, -1, "in")
    if len(wd) == 2:
        ctx.same(wd[0], y[-1])
        ctx.role(w, 0, "out")
    if ctx.dims(b) is not None:
        ctx.same(ctx.dims(b)[0], y[-1])
        ctx.role(b, 0, "bias")


def set_arg(node: fx.Node, index: int, value: Any) -> None:
    """Set argument ``index`` of an ATen call positionally, filling the ones before it from
    keywords or the op's schema defaults."""
    schema = node.target._schema.arguments
    args = list(node.args)
    kwargs = dict(node.kwargs)
    for i in range(len(args), index + 1):
        a = schema[i]
        args.append(kwargs.pop(a.name) if a.name in kwargs else a.default_value)
    kwargs.pop(schema[index].name, None)
    args[index] = value
    node.args, node.kwargs = tuple(args), kwargs


def _conv_groups_rewrite(r: Any, node: fx.Node) -> None:
    """``groups`` becomes the new width of the group axis."""
    data = node.meta["etp_rule_data"]
    if r.size(data["G"]) != size_of(data["G"]):
        set_arg(node, data["groups_index"], r.size(data["G"]))


def _couple_conv(ctx: RuleContext, node: fx.Node, transposed: bool, groups: int,
                 groups_index: int) -> None:
    # x[1] = Prod(G, Ci), y[1] = Prod(G, Co); W = [Prod(G,Co), Ci, k..] (transposed: [Prod(G,Ci), Co, k..])
    x, w, b = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    xd, wd, y = ctx.dims(x), ctx.dims(w), ctx.out()
    batched = len(xd) == len(wd)
    xc, yc = (xd[1], y[1]) if batched else (xd[0], y[0])
    if batched:
        ctx.same(xd[0], y[0])
    G = ctx.fresh(groups, "conv groups")
    ci, co = ctx.fresh(size_of(xc) // groups), ctx.fresh(size_of(yc) // groups)
    ctx.same(xc, Prod((G, ci)))
    ctx.same(yc, Prod((G, co)))
    if transposed:
        ctx.same(wd[0], Prod((G, ci)))
        ctx.same(wd[1], co)
        ctx.role(w, 0, "in")
        ctx.role(w, 1, "out")
    else:
        ctx.same(wd[0], Prod((G, co)))
        ctx.same(wd[1], ci)
        ctx.role(w, 0, "out")
        ctx.role(w, 1, "in")
    if ctx.dims(b) is not None:
        ctx.same(ctx.dims(b)[0], yc)
        ctx.role(b, 0, "bias")
    ctx.freeze(wd[2:], "convolution kernel window")
    ctx.freeze(xd[-(len(wd) - 2):] + y[-(len(wd) - 2):], "convolution spatial dims")
    contracts(ctx, [xc], [(w, 0 if transposed else 1), (x, 1 if batched else 0)], "convolution")
    node.meta["etp_rule_data"] = {"G": G, "groups_index": groups_index, "transposed": transposed}


def _conv_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # out channel c: zero when its filter (every weight dim, for the grouped forms) and bias are
    w = node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    n, fw = len(z.shape(node)), z.of(w) or []
    batched = n == len(fw)
    out = [False] * n
    out[1 if batched else 0] = bool(fw) and all(fw[:2]) and _zero_or_none(z, b, 0)
    return out


def _conv_macs(c: Any, node: fx.Node) -> Any:
    # out elements x (input channels per group) x kernel window
    wd = c.dims(node.args[1])
    window = 1
    for t in wd[2:]:
        window *= c.size(t)
    transposed = node.meta["etp_rule_data"].get("transposed", False)
    if transposed:  # every input element scatters into (out channels per group) x window
        return c.numel(node.args[0]) * c.size(wd[1]) * window
    return c.numel(node) * c.size(wd[1]) * window


def _conv_fold(n: fx.Node) -> FoldSpec | None:
    batched = len(n.args[0].meta["val"].shape) == len(n.args[1].meta["val"].shape)
    d = 1 if batched else 0
    return FoldSpec(x=0, dim=d, bias=2, out_dim=d) if _is_weight(n.args[1]) else None


@rule(*aten_ops("conv1d", "conv2d", "conv3d"), rewrite=_conv_groups_rewrite,
      cost=_conv_macs, fold=_conv_fold, zero=_conv_zero)
def conv(ctx: RuleContext, node: fx.Node) -> None:
    # conv(x, W, b, stride, padding, dilation, groups)
    _couple_conv(ctx, node, False, int(ctx.arg(6, "groups", 1)), 6)


def _conv_transpose_rewrite(r: Any, node: fx.Node) -> None:
    _conv_groups_rewrite(r, node)


@rule(*aten_ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
      rewrite=_conv_transpose_rewrite, cost=_conv_macs, fold=_conv_fold, zero=_conv_zero)
def conv_transpose(ctx: RuleContext, node: fx.Node) -> None:
    # conv_transpose(x, W, b, stride, padding, output_padding, groups, dilation)
    _couple_conv(ctx, node, True, int(ctx.arg(6, "groups", 1)), 6)


@rule(*aten_ops("convolution"), rewrite=_conv_groups_rewrite, cost=_conv_macs,
      fold=_conv_fold, zero=_conv_zero)
def convolution(ctx: RuleContext, node: fx.Node) -> None:
    # convolution(x, W, b, stride, padding, dilation, transposed, output_padding, groups)
    _couple_conv(ctx, node, bool(ctx.arg(6, "transposed")), int(ctx.arg(8, "groups", 1)), 8)


def _matmul_dims(ctx: RuleContext, a: Any, b: Any, out_dims: list) -> None:
    # a[..., n, k] @ b[..., k, m] = y[..., n, m]: a[-1] ~ b[-2] (contracted), batch broadcast
    ad, bd = ctx.dims(a), ctx.dims(b)
    a2 = ad if len(ad) > 1 else None
    b2 = bd if len(bd) > 1 else None
    ka, kb = ad[-1], (bd[-2] if b2 else bd[0])
    ctx.same(ka, kb)
    contracts(ctx, [ka], [(b, -2 if b2 else 0), (a, -1)], "matmul")
    ctx.role(a, -1, "in")
    ctx.role(b, -2 if b2 else 0, "in")
    y = list(out_dims)
    if b2:
        ctx.same(bd[-1], y.pop())
        ctx.role(b, -1, "out")
    if a2:
        ctx.same(ad[-2], y.pop())
        ctx.role(a, -2, "out")
    ash, bsh = ctx.shape(a)[:-2], ctx.shape(b)[:-2]
    for k in range(1, len(y) + 1):
        for xd, xs in ((ad[:-2], ash), (bd[:-2], bsh)):
            if k <= len(xs) and xs[-k] == ctx.shape(ctx.node)[len(y) - k]:
                ctx.same(xd[-k], y[-k])


def _matmul_flags(z: ZeroContext, node: fx.Node, a: Any, b: Any) -> list[bool]:
    # y[..., n, m] = a[..., n, :] b[..., :, m]: zero at a removed m where b's column is, at a
    # removed n where a's row is, at a removed batch index where either operand is
    fa, fb, so = z.of(a) or [], z.of(b) or [], z.shape(node)
    out, rest = [False] * len(so), len(so)
    if len(fb) > 1:
        out[rest - 1], rest = bool(fb[-1]), rest - 1
    if len(fa) > 1:
        out[rest - 1], rest = bool(fa[-2]), rest - 1
    for f, s in ((fa, z.shape(a)), (fb, z.shape(b))):
        for k in range(1, min(rest, len(f) - 2) + 1):  # batch dims, aligned right
            if s[-2 - k] == so[rest - k]:
                out[rest - k] = out[rest - k] or bool(f[-2 - k])
    return out


def _matmul_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    return _matmul_flags(z, node, node.args[0], node.args[1])


def _addmm_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # beta*c + alpha*(a @ b): zero where the product and c both are
    prod, c = _matmul_flags(z, node, node.args[1], node.args[2]), _aligned(z, node, node.args[0])
    return None if c is None else [p and bool(f) for p, f in zip(prod, c)]


def _matmul_macs(c: Any, node: fx.Node) -> Any:
    # out elements x contracted length (the last dim of the left operand)
    a = node.args[1] if len(node.args) > 2 and c.dims(node.args[2]) is not None else node.args[0]
    return c.numel(node) * c.size(c.dims(a)[-1])


def _matmul_fold(n: fx.Node) -> FoldSpec | None:
    # x @ W with a weight on the right: linear in x along x[-1]
    return FoldSpec(x=0, dim=-1, bias=None, out_dim=-1) if _is_weight(n.args[1]) else None


@rule(*aten_ops("matmul", "mm", "bmm"), cost=_matmul_macs, fold=_matmul_fold, zero=_matmul_zero)
def matmul(ctx: RuleContext, node: fx.Node) -> None:
    # y = a @ b (numpy matmul semantics)
    _matmul_dims(ctx, node.args[0], node.args[1], ctx.out())


@rule(*aten_ops("addmm", "baddbmm"), cost=_matmul_macs, zero=_addmm_zero,
      fold=lambda n: FoldSpec(x=1, dim=-1, bias=0, out_dim=-1) if _is_weight(n.args[2]) else None)
def addmm(ctx: RuleContext, node: fx.Node) -> None:
    # y = beta*c + alpha*(a @ b): a @ b as matmul, c broadcast onto y
    _matmul_dims(ctx, node.args[1], node.args[2], ctx.out())
    broadcast(ctx, node, [node.args[0]])
    ctx.role(node.args[0], -1, "bias")


def _einsum_macs(c: Any, node: fx.Node) -> Any:
    # product of the sizes of all distinct letters
    letters = node.meta["etp_rule_data"]["letters"]
    out = 1
    for t in letters.values():
        out *= c.size(t)
    return out


def _einsum_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # a product of the operands: an output letter is zero where some operand holding it is
    eq = node.args[0].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    if "." in eq or "->" not in eq:
        return None
    out = []
    for i, ch in enumerate(rhs):
        hit = False
        for spec, o in zip(lhs.split(","), node.args[1]):
            j = spec.find(ch)
            f = z.of(o)
            if j >= 0 and isinstance(f, list) and f[j] and z.shape(o)[j] == z.shape(node)[i]:
                hit = True
        out.append(hit)
    return out


@rule(*aten_ops("einsum"), cost=_einsum_macs, zero=_einsum_zero)
def einsum(ctx: RuleContext, node: fx.Node) -> None:
    # every letter is one axis: dims that share a letter ~ each other (output included)
    eq, ops = node.args[0], node.args[1]
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    if "." in eq or not rhs and "->" not in eq:
        ctx.freeze([t for o in ops for t in ctx.dims(o) or []] + ctx.out(), "einsum with ellipsis")
        return
    letters: dict[str, Any] = {}
    for spec, o in list(zip(lhs.split(","), ops)) + [(rhs, node)]:
        for ch, t in zip(spec, ctx.dims(o) if o is not node else ctx.out()):
            if ctx.shape(o)[spec.index(ch)] == 1 and o is not node:
                continue  # broadcast
            if ch in letters:
                ctx.same(letters[ch], t)
            else:
                letters[ch] = t
    for spec, o in zip(lhs.split(","), ops):
        for i, ch in enumerate(spec):
            ctx.role(o, i, "out" if ch in rhs else "in")
    for ch in sorted((set(lhs.replace(",", "")) - set(rhs)) & set(letters)):  # summed letters
        holders = [(o, spec.index(ch)) for spec, o in zip(lhs.split(","), ops) if ch in spec]
        holders.sort(key=lambda h: not _is_weight(h[0]))
        contracts(ctx, [letters[ch]], holders, "einsum")
    node.meta["etp_rule_data"] = {"letters": letters}


def _sdpa_rewrite(r: Any, node: fx.Node) -> None:
    """The default scale is 1/sqrt(E) of the *original* head dim: pin it."""
    if node.kwargs.get("scale") is None and (len(node.args) < 7 or node.args[6] is None):
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(node.meta["etp_rule_data"]["E"])}


def _sdpa_macs(c: Any, node: fx.Node) -> Any:
    # q k^T: (..., L, S) x E   plus   attn v: (..., L, Ev) x S
    q, k = c.dims(node.args[0]), c.dims(node.args[1])
    s_len = c.size(k[-2])
    return c.numel(node.args[0]) * s_len + c.numel(node) * s_len


def _sdpa_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # y = softmax(q k^T) v: zero at a removed value dim, or head, where v is
    v, n = node.args[2], len(z.shape(node))
    fv, vs, ys = z.of(v) or [], z.shape(v), z.shape(node)
    out = [False] * n
    if fv:
        out[-1] = bool(fv[-1])
        for i in range(n - 2):
            out[i] = bool(fv[i]) and vs[i] == ys[i]
    return out


@rule(*aten_ops("scaled_dot_product_attention"), rewrite=_sdpa_rewrite,
      cost=_sdpa_macs, zero=_sdpa_zero)
def sdpa(ctx: RuleContext, node: fx.Node) -> None:
    # softmax(q[...,L,E] k[...,S,E]^T) v[...,S,Ev]: q[-1] ~ k[-1]; k[-2] ~ v[-2]; y[-1] ~ v[-1];
    # batch/head dims ~ (with enable_gqa: q heads = Prod(kv heads, repeats))
    q, k, v = node.args[:3]
    qd, kd, vd, y = ctx.dims(q), ctx.dims(k), ctx.dims(v), ctx.out()
    ctx.same(qd[-1], kd[-1])
    ctx.same(kd[-2], vd[-2])
    ctx.same(y[-1], vd[-1])
    ctx.same(y[-2], qd[-2])
    contracts(ctx, [qd[-1]], [(k, -1), (q, -1)], "attention (q k^T)")
    # a removed key still gets exp(q . 0) in the softmax over keys, which sdpa cannot discount
    ctx.inexact([kd[-2]], "attention softmax over keys")
    qs, ks = ctx.shape(q), ctx.shape(k)
    for i in range(len(qd) - 2):
        ctx.same(qd[i], y[i])
        if ks[i] == qs[i]:
            ctx.same(kd[i], qd[i])
            ctx.same(vd[i], qd[i])
        else:  # grouped-query attention inside the kernel: q heads = kv heads x repeats
            rep = ctx.fresh(qs[i] // ks[i], "gqa repeats")
            ctx.same(qd[i], Prod((kd[i], rep)))
            ctx.same(kd[i], vd[i])
    mask = ctx.arg(3, "attn_mask")
    if ctx.dims(mask) is not None:
        md, ms = ctx.dims(mask), ctx.shape(mask)
        logits = qd[:-1] + [kd[-2]]
        lshape = list(qs[:-1]) + [ks[-2]]
        for j in range(1, len(md) + 1):
            if ms[-j] == lshape[-j]:
                ctx.same(md[-j], logits[-j])
    node.meta["etp_rule_data"] = {"E": qs[-1]}


def _embedding_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # y[..., d] = W[ids, d]: zero at a removed d where W's column is
    fw, n = z.of(node.args[0]) or [False, False], len(z.shape(node))
    return [False] * (n - 1) + [bool(fw[1])]


@rule(*aten_ops("embedding"), zero=_embedding_zero)
def embedding(ctx: RuleContext, node: fx.Node) -> None:
    # y[..., d] = W[ids[...], d]: y[:-1] ~ ids, y[-1] ~ W[1] (out); W[0] indexed -> frozen
    w, ids = node.args[0], node.args[1]
    wd, idd, y = ctx.dims(w), ctx.dims(ids), ctx.out()
    ctx.same(wd[1], y[-1])
    ctx.role(w, 1, "out")
    ctx.same_all(idd, y[:-1])
    ctx.freeze([wd[0]], "embedding rows are addressed by token id")


# --- normalisation -----------------------------------------------------------------------------

def normalises(ctx: RuleContext, x: Any, dims: list[int], why: str) -> list[bool]:
    """A statistic of ``x`` over ``dims`` counts the removed units: exact (after the rewrite
    into a full-width form) where ``x`` is zero at them; the other dims are approximate.
    Returns, per dim in ``dims``, whether it is exact."""
    flags, xd = ctx.zeros(x), ctx.dims(x)
    bad = [xd[i] for i in dims if not flags[i]]
    if bad:
        ctx.inexact(bad, f"{why} over values that removed units do not zero")
    return [bool(flags[i]) for i in dims]


def _full_sizes(r: Any, terms: list, zero: list[bool]) -> list[int | None] | None:
    """Per reduced dim: its original width if pruning changes it and its removed units are
    zero (an approximate dim is renormalised over what it keeps), else None (its size is read
    at run time); None when no such dim changes: the op needs no full-width form."""
    full = [size_of(t) if z and r.size(t) != size_of(t) else None for t, z in zip(terms, zero)]
    return full if any(f is not None for f in full) else None


def _affine_zero(z: ZeroContext, w: Any, b: Any, d: int) -> bool:
    """Is ``x_hat * w + b`` zero at removed units (a weight that is, and a bias absent or
    zero)?"""
    fw = z.of(w)
    return isinstance(fw, list) and bool(fw[d]) and _zero_or_none(z, b, d)


def _batch_norm_zero(z: ZeroContext, node: fx.Node) -> Any:
    # y[:, c] = x_hat[:, c] w[c] + b[c]: zero at a removed c when w[c] and b[c] are
    b = _bound(node)
    n = len(z.shape(node.args[0]))
    y = [False] * n
    y[1 % n] = _affine_zero(z, b.get("weight"), b.get("bias"), 0)
    ranks = node.meta["val"]
    if isinstance(ranks, (list, tuple)):
        return (y,) + tuple([False] * t.dim() for t in ranks[1:])
    return y


def _batch_norm_rewrite(r: Any, node: fx.Node) -> None:
    """Batch statistics over a pruned dim (weight standardisation): the full-width form."""
    data = node.meta.get("etp_rule_data") or {}
    if not data:
        return
    x = node.args[0]
    full = _full_sizes(r, [x.meta["etp_dims"][i] for i in data["red"]], data["zero"])
    if full is None:
        return
    b = _bound(node)
    node.target = exact.batch_norm_full
    node.args = (x, b.get("weight"), b.get("bias"), b.get("eps", 1e-5), full)
    node.kwargs = {}


@rule(*aten_ops("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training",
                "native_batch_norm", "_native_batch_norm_legit_functional"),
      rewrite=_batch_norm_rewrite, zero=_batch_norm_zero)
def batch_norm(ctx: RuleContext, node: fx.Node) -> None:
    # y[:, c] = (x[:, c] - m[c]) / s[c] * w[c] + b[c]: per channel. With running statistics
    # nothing is reduced; batch (instance) statistics reduce over every dim but 1 (but 0, 1)
    x = node.args[0]
    xd = ctx.dims(x)
    outs = ctx.out()
    y = outs[0] if isinstance(outs, tuple) else outs
    ctx.same_all(xd, y)
    for i, role in zip(range(1, 5), ("affine", "bias", "stat", "stat")):
        p = node.args[i] if len(node.args) > i else None
        if ctx.dims(p) is not None:
            ctx.same(ctx.dims(p)[0], xd[1])
            ctx.role(p, 0, role)
    if isinstance(outs, tuple):
        for extra in outs[1:]:
            for t in extra:
                ctx.same(t, xd[1]) if size_of(t) == size_of(xd[1]) else None
    b = _bound(node)
    instance = _name(node) == "instance_norm"
    if not (b.get("use_input_stats") if instance else b.get("training")):
        return
    red = [i for i in range(len(xd)) if i != 1 and not (instance and i == 0)]
    zero = normalises(ctx, x, red, f"{_name(node)} on batch statistics")
    # only the plain form without running statistics is rewritten (they would be updated
    # with the pruned batch's statistics): any other one over a pruned dim is approximate
    if _name(node) != "batch_norm" or b.get("running_mean") is not None:
        ctx.inexact([xd[i] for i in red], f"{_name(node)} on batch statistics")
        zero = [False] * len(red)
    node.meta["etp_rule_data"] = {"red": red, "zero": zero}


def _norm_shape_rewrite(r: Any, node: fx.Node) -> None:
    """A norm over zeros keeps the original count (its full-width form); otherwise only the
    normalised shape changes."""
    data = node.meta["etp_rule_data"]
    k, x = data["k"], node.args[0]
    shape = list(r.shape(x)[-k:])
    full = _full_sizes(r, x.meta["etp_dims"][-k:], data["zero"])
    if full is None:
        set_arg(node, 1, shape)
        return
    b = _bound(node)
    if _name(node) == "rms_norm":
        node.target = exact.rms_norm_full
        node.args = (x, shape, b.get("weight"), b.get("eps"), full)
    else:
        node.target = exact.layer_norm_full
        node.args = (x, shape, b.get("weight"), b.get("bias"), b.get("eps", 1e-5), full)
    node.kwargs = {}


def _layer_norm_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # layer_norm: zero where w and b are; rms_norm (x / rms * w): also where x is
    b, k = _bound(node), len(node.args[1])
    fx_ = z.of(node.args[0]) or []
    n = len(fx_)
    rms = _name(node) == "rms_norm"
    out = [rms and bool(f) for f in fx_[:n - k]]
    for j in range(k):
        w_zero = _affine_zero(z, b.get("weight"), b.get("bias") if not rms else None, j)
        out.append(w_zero or (rms and bool(fx_[n - k + j])))
    return out


@rule(*aten_ops("layer_norm", "rms_norm"), rewrite=_norm_shape_rewrite, zero=_layer_norm_zero)
def layer_norm(ctx: RuleContext, node: fx.Node) -> None:
    # y ~ x; w[j] ~ b[j] ~ x[-k+j]; statistics over the last k dims: exact over zeros (the
    # original count kept, see exact.py), approximate otherwise
    x, shape = node.args[0], node.args[1]
    xd = ctx.dims(x)
    k = len(shape)
    ctx.same_all(xd, ctx.out())
    for i, role in ((2, "affine"), (3, "bias")):
        p = node.args[i] if len(node.args) > i else None
        if ctx.dims(p) is not None:
            ctx.same_all(ctx.dims(p), xd[-k:])
            for j in range(k):
                ctx.role(p, j, role)
    zero = normalises(ctx, x, list(range(len(xd) - k, len(xd))), f"{_name(node)} normalises")
    node.meta["etp_rule_data"] = {"k": k, "zero": zero}


def _group_norm_rewrite(r: Any, node: fx.Node) -> None:
    """New group count; channels removed within groups: the full-width form."""
    data = node.meta["etp_rule_data"]
    groups = r.size(data["G"])
    if not (data["zero"] and r.size(data["cg"]) != size_of(data["cg"])):
        set_arg(node, 1, groups)
        return
    b = _bound(node)
    node.target = exact.group_norm_full
    node.args = (node.args[0], groups, b.get("weight"), b.get("bias"), b.get("eps", 1e-5),
                 size_of(data["cg"]))
    node.kwargs = {}


def _group_norm_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    b, n = _bound(node), len(z.shape(node))
    y = [False] * n
    y[1] = _affine_zero(z, b.get("weight"), b.get("bias"), 0)
    return y


@rule(*aten_ops("group_norm"), rewrite=_group_norm_rewrite, zero=_group_norm_zero)
def group_norm(ctx: RuleContext, node: fx.Node) -> None:
    # x[1] = Prod(G, Cg): whole groups are exact to remove; channels within a group are exact
    # over zeros (the original count kept), approximate otherwise
    x, groups = node.args[0], int(node.args[1])
    xd = ctx.dims(x)
    ctx.same_all(xd, ctx.out())
    G, cg = ctx.fresh(groups, "norm groups"), ctx.fresh(size_of(xd[1]) // groups)
    ctx.same(xd[1], Prod((G, cg)))
    full = bool(ctx.zeros(x)[1])
    if not full:
        ctx.inexact([cg], "group_norm normalises over values that removed units do not zero")
    normalises(ctx, x, list(range(2, len(xd))), "group_norm normalises")
    for i, role in ((2, "affine"), (3, "bias")):
        p = node.args[i] if len(node.args) > i else None
        if ctx.dims(p) is not None:
            ctx.same(ctx.dims(p)[0], xd[1])
            ctx.role(p, 0, role)
    node.meta["etp_rule_data"] = {"G": G, "cg": cg, "zero": full}


def _weight_norm_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # w = v * g / ||v||: zero where v is, but on dim (a zero row's norm is 0: NaN)
    return _drop_dim(z, node, _bound(node).get("dim", 0), keep=True)


@rule(*aten_ops("_weight_norm"), zero=_weight_norm_zero)
def weight_norm(ctx: RuleContext, node: fx.Node) -> None:
    # w = v * g / ||v|| (norm over every dim but ``dim``): w ~ v; g[dim] ~ v[dim] (a per-row
    # gain); zeros add nothing to the norm (the fan-in is exact over zeros), but a removed
    # row's norm is 0: the zeroed original divides by it, so the rows are approximate
    v, g = node.args[0], node.args[1]
    vd, gd = ctx.dims(v), ctx.dims(g)
    d = _dim(int(_bound(node).get("dim", 0)), len(vd))
    ctx.same_all(vd, ctx.out())
    if gd is not None and len(gd) == len(vd):
        ctx.same(gd[d], vd[d])
        ctx.role(g, d, "affine")
    normalises(ctx, v, [i for i in range(len(vd)) if i != d], "_weight_norm sums")
    ctx.inexact([vd[d]], "_weight_norm divides by the norm of a zeroed row: inf or NaN")


# --- reductions --------------------------------------------------------------------------------

def _reduce(ctx: RuleContext, node: fx.Node, red: list[int]) -> bool:
    """Couple the dims a reduction keeps; returns keepdim (read off the ranks: robust to every
    overload's signature)."""
    xd = ctx.dims(node.args[0])
    outs = ctx.out()
    keepdim = False
    for y in (outs if isinstance(outs, tuple) else (outs,)):
        keepdim = len(y) == len(xd) and len(xd) > 0
        kept = [t for i, t in enumerate(xd) if i not in red] if not keepdim else list(xd)
        for i, (a, b) in enumerate(zip(kept, y)):
            if keepdim and i in red:
                continue
            ctx.same(a, b)
    return keepdim


def _reduced_dims(node: fx.Node) -> list[int]:
    """The dims a reduction runs over, by schema name (``dim``; none given: all)."""
    x = node.args[0]
    n = len(x.meta["val"].shape) if isinstance(x, fx.Node) else 0
    return _dimlist(_bound(node).get("dim"), n)


def _reduce_zero(z: ZeroContext, node: fx.Node) -> Any:
    # the reduction of an all-zero slice is zero (sum, mean, var, max, p-norm): the kept dims
    # keep the input's flags; index outputs (argmax, max's indices) and logsumexp do not
    fx_, red = z.of(node.args[0]) or [], _reduced_dims(node)
    name = _name(node)

    def flags(rank: int) -> list[bool]:
        if rank == len(fx_) and rank:
            return [bool(f) and i not in red for i, f in enumerate(fx_)]
        return [bool(f) for i, f in enumerate(fx_) if i not in red]
    val = node.meta["val"]
    if isinstance(val, (list, tuple)):
        return tuple(flags(t.dim()) if (i == 0 or name in ("var_mean", "std_mean")) else None
                     for i, t in enumerate(val))
    return None if name in ("argmax", "argmin", "logsumexp") else flags(val.dim())


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


@rule(*aten_ops("sym_size", "sym_numel"))
def sym_size(ctx: RuleContext, node: fx.Node) -> None:
    # n = x.size(d): a number, whatever uses it keeps it; so the dim read is frozen (in
    # practice a batch or data-dependent size, never a channel) and the others stay free
    xd = ctx.dims(node.args[0]) or []
    read = xd if len(node.args) < 2 else [xd[_dim(node.args[1], len(xd))]]
    ctx.freeze(read, f"its size is read at {ctx.where()}")


@rule(*aten_ops("sum", "nansum"), zero=_reduce_zero)
def sum_(ctx: RuleContext, node: fx.Node) -> None:
    # y = sum over dims: exact when removed units are zero there (they add nothing)
    red = _reduced_dims(node)
    _reduce(ctx, node, red)
    normalises(ctx, node.args[0], red, f"{_name(node)} sums")


def _full_form_rewrite(r: Any, node: fx.Node) -> None:
    """mean / var / std / amax / amin / logsumexp / max over zeros: the full-width form."""
    data = node.meta["etp_rule_data"]
    x = node.args[0]
    full = _full_sizes(r, [x.meta["etp_dims"][i] for i in data["red"]], data["zero"])
    if full is None:
        return
    b, name, red, keep = _bound(node), _name(node), data["red"], data["keepdim"]
    if name == "mean":
        node.args = (x, red, keep, b.get("dtype"), full)
        node.target = exact.mean_full
    elif name in ("var", "std", "var_mean", "std_mean"):
        c = b.get("correction")
        c = (1 if b.get("unbiased", True) else 0) if c is None else c
        node.target, node.args = exact.var_full, (x, red, c, keep, full, name)
    elif name == "logsumexp":
        node.target, node.args = exact.logsumexp_full, (x, red, keep, full)
    else:  # amax, amin, and max / min of everything
        big = name in ("amax", "max")
        node.target = exact.amax_full if big else exact.amin_full
        node.args = (x, red, keep)
    node.kwargs = {}


@rule(*aten_ops("mean", "amax", "amin", "var", "std", "var_mean", "std_mean", "logsumexp"),
      rewrite=_full_form_rewrite, zero=_reduce_zero)
def mean(ctx: RuleContext, node: fx.Node) -> None:
    # y = stat over dims: the original count (or the zeros' 0 among the values) is kept by
    # the full-width form when removed units are zero there; approximate otherwise
    red = _reduced_dims(node)
    keepdim = _reduce(ctx, node, red)
    zero = normalises(ctx, node.args[0], red, f"{_name(node)} reduces")
    node.meta["etp_rule_data"] = {"red": red, "zero": zero, "keepdim": keepdim}


def _elementwise_or_reduce_zero(z: ZeroContext, node: fx.Node) -> Any:
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return _zero_if_all(z, node, list(node.args[:2]))  # max(a, b): both zero
    return _reduce_zero(z, node)


@rule(*aten_ops("max", "min", "argmax", "argmin", "prod", "nanmean"),
      rewrite=_full_form_rewrite, zero=_elementwise_or_reduce_zero)
def max_(ctx: RuleContext, node: fx.Node) -> None:
    # max(a, b) is elementwise; max(x) of everything keeps the zeros among its values (exact
    # over zeros); an index (argmax, max over a dim), a product or a nanmean is approximate
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        broadcast(ctx, node)
        return
    red = _reduced_dims(node)
    keepdim = _reduce(ctx, node, red)
    whole = _name(node) in ("max", "min") and _bound(node).get("dim") is None
    xd = ctx.dims(node.args[0])
    if whole:
        zero = normalises(ctx, node.args[0], red, f"{_name(node)} reduces")
    else:
        zero = [False] * len(red)
        ctx.inexact([xd[i] for i in red], f"{_name(node)} reduces over this dim")
    node.meta["etp_rule_data"] = {"red": red, "zero": zero, "keepdim": keepdim}


@rule(*aten_ops("linalg_vector_norm", "norm", "frobenius_norm"), zero=_reduce_zero)
def vector_norm(ctx: RuleContext, node: fx.Node) -> None:
    # y = ||x||_p over dims: zeros add nothing to a p-norm with p >= 0 (the count of non-zeros
    # and the max included): exact over zeros; a negative order is approximate
    red = _reduced_dims(node)
    _reduce(ctx, node, red)
    b = _bound(node)
    p = b.get("ord", b.get("p", 2))
    p = 2 if p is None else p
    if isinstance(p, (int, float)) and p >= 0:
        normalises(ctx, node.args[0], red, f"{_name(node)} sums")
    else:
        xd = ctx.dims(node.args[0])
        ctx.inexact([xd[i] for i in red], f"{_name(node)} of negative order reduces over this dim")


def _softmax_rewrite(r: Any, node: fx.Node) -> None:
    """Softmax over zeros: the zeros' exp(-M) stays in the denominator (the full form)."""
    data = node.meta["etp_rule_data"]
    x = node.args[0]
    t = x.meta["etp_dims"][data["dim"]]
    if not data["zero"] or r.size(t) == size_of(t):
        return
    b, name = _bound(node), _name(node)
    dtype = b.get("dtype")
    if b.get("half_to_float"):
        dtype = torch.float32
    log = "log" in name
    node.target = exact.log_softmax_full if log else exact.softmax_full
    node.args, node.kwargs = (x, data["dim"], size_of(t), dtype), {}


@rule(*aten_ops("softmax", "log_softmax", "_softmax", "_log_softmax"), rewrite=_softmax_rewrite)
def softmax(ctx: RuleContext, node: fx.Node) -> None:
    # y ~ x; exp(0) = 1 still counts in the denominator: kept by the full form over zeros,
    # approximate otherwise. The removed units' outputs are not zero (no zero hook)
    xd = ctx.dims(node.args[0])
    ctx.same_all(xd, ctx.out())
    d = _dim(int(node.args[1]), len(xd))
    (zero,) = normalises(ctx, node.args[0], [d], "softmax normalises")
    node.meta["etp_rule_data"] = {"dim": d, "zero": zero}


def _mapped(z: ZeroContext, x: Any, dims: list[int | None]) -> list[bool]:
    """Output flags: output dim i keeps ``x``'s flag at ``dims[i]`` (None: not zero)."""
    f = z.of(x) or []
    return [bool(f[d]) if d is not None and d < len(f) else False for d in dims]


def _drop_dim(z: ZeroContext, node: fx.Node, d: int | None, keep: bool = False) -> list[bool]:
    """Flags of an op that keeps every dim of its input but ``d`` (dropped, or with
    ``keep``, kept in place but not zero)."""
    n = len(z.shape(node.args[0]))
    d = None if d is None else _dim(int(d), n)
    dims = [i for i in range(n) if keep or i != d]
    return _mapped(z, node.args[0], [None if i == d else i for i in dims])


def _along_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # diff / cumsum along d: the other dims keep x's flags; along d values mix
    b = _bound(node)
    if b.get("prepend") is not None or b.get("append") is not None:
        return None
    return _drop_dim(z, node, b.get("dim", -1), keep=True)


@rule(*aten_ops("diff"), zero=_along_zero)
def diff(ctx: RuleContext, node: fx.Node) -> None:
    # y = x[1:] - x[:-1] along d: d is frozen, other dims ~
    xd, y = ctx.dims(node.args[0]), ctx.out()
    d = _dim(int(ctx.arg(2, "dim", -1)), len(xd))
    ctx.freeze([xd[d], y[d]], "diff runs along this dim")
    ctx.same_all([t for i, t in enumerate(xd) if i != d], [t for i, t in enumerate(y) if i != d])


@rule(*aten_ops("cumsum", "cumprod"), zero=_along_zero)
def cumsum(ctx: RuleContext, node: fx.Node) -> None:
    # y ~ x; the running total at a kept index is unchanged by removing zeros before it
    xd = ctx.dims(node.args[0])
    ctx.same_all(xd, ctx.out())
    d = _dim(int(node.args[1]), len(xd))
    if "prod" in _name(node):
        ctx.freeze([xd[d]], "cumprod runs along this dim")
    else:
        normalises(ctx, node.args[0], [d], "cumsum sums")


def _spatial(ctx: RuleContext, node: fx.Node, k: int) -> None:
    # pools and resizes: the leading dims (batch, channels) pass through; the last k are new
    xd, y = ctx.dims(node.args[0]), ctx.out()
    outs = y if isinstance(y, tuple) else (y,)
    for o in outs:
        ctx.same_all(xd[:-k], o[:-k])
        ctx.freeze(o[-k:], "spatial dims of a pool or resize")
    ctx.freeze(xd[-k:], "spatial dims of a pool or resize")


def _spatial_zero(z: ZeroContext, node: fx.Node, k: int) -> Any:
    # a pool or resize of an all-zero map is zero: the leading dims keep x's flags
    n = len(z.shape(node.args[0]))
    y = _mapped(z, node.args[0], list(range(n - k)) + [None] * k)
    val = node.meta["val"]
    return (y,) + tuple(None for _ in val[1:]) if isinstance(val, (list, tuple)) else y


for _k, _names in ((1, ("adaptive_avg_pool1d", "avg_pool1d", "max_pool1d", "adaptive_max_pool1d",
                        "upsample_nearest1d", "upsample_linear1d")),
                   (2, ("adaptive_avg_pool2d", "avg_pool2d", "max_pool2d", "adaptive_max_pool2d",
                        "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d",
                        "upsample_bicubic2d", "_adaptive_avg_pool2d")),
                   (3, ("adaptive_avg_pool3d", "avg_pool3d", "max_pool3d", "upsample_nearest3d",
                        "upsample_trilinear3d"))):
    rule(*aten_ops(*_names), zero=lambda z, node, _k=_k: _spatial_zero(z, node, _k))(
        lambda ctx, node, _k=_k: _spatial(ctx, node, _k))


# --- shape ops ---------------------------------------------------------------------------------

def _sizes_rewrite(index: int, name: str):
    """A size-list argument: entries of dims whose width changes get the new width; symbolic
    (dynamic batch) and -1 entries of other dims stay as they are."""
    def rw(r: Any, node: fx.Node) -> None:
        old = node.args[index] if len(node.args) > index else node.kwargs[name]
        set_arg(node, index, r.resize(node, old))
    return rw


def _reshape_segments(xs: tuple, ys: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Cut a reshape at every place where the running products of both shapes agree: each
    segment maps a run of input dims onto a run of output dims (None: a zero-size dim)."""
    if 0 in xs or 0 in ys:
        return None
    segs, i, j = [], 0, 0
    while i < len(xs) or j < len(ys):
        si, sj, pi, pj = [], [], 1, 1
        if i < len(xs):
            si, pi, i = [i], xs[i], i + 1
        if j < len(ys):
            sj, pj, j = [j], ys[j], j + 1
        while pi != pj:
            if pi < pj and i < len(xs):
                si.append(i)
                pi, i = pi * xs[i], i + 1
            elif pj < pi and j < len(ys):
                sj.append(j)
                pj, j = pj * ys[j], j + 1
            else:
                return None
        segs.append((si, sj))
    return segs


def _reshape(ctx: RuleContext, node: fx.Node) -> None:
    # Prod(x dims) ~ Prod(y dims): factors are aligned left to right, splitting where needed.
    # Unified segment by segment (cut where the running products agree), so that a conflict in
    # one run of dims (e.g. spatial windows regrouped 2x7 -> 7x2) does not freeze the others.
    xd, y = ctx.dims(node.args[0]), ctx.out()
    segs = _reshape_segments(ctx.shape(node.args[0]), ctx.shape(node))
    if segs is None:
        ctx.same(Prod(tuple(xd)), Prod(tuple(y)))
        return
    for si, sj in segs:
        a, b = Prod(tuple(xd[i] for i in si)), Prod(tuple(y[j] for j in sj))
        if size_of(a) > 1:
            ctx.same(a, b)


def _reshape_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # each run of output dims is zero where every (non-trivial) input dim of its run is
    x = node.args[0]
    xs, ys, f = z.shape(x), z.shape(node), z.of(x) or []
    out = [False] * len(ys)
    for si, sj in _reshape_segments(xs, ys) or []:
        ok = all(f[i] for i in si if xs[i] > 1)
        for j in sj:
            out[j] = ok
    return out


for _names, _rw in (
        (("view", "reshape", "_unsafe_view", "_reshape_alias"), _sizes_rewrite(1, "size")),
        (("unflatten",), None), (("flatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
                                   "ravel"), None)):
    rule(*aten_ops(*_names), rewrite=_rw, zero=_reshape_zero)(_reshape)


def _unflatten_rewrite(r: Any, node: fx.Node) -> None:
    d = _dim(int(node.args[1]), len(node.args[0].meta["etp_dims"]))
    set_arg(node, 2, r.resize(node, node.args[2], first_dim=d))


rule(*aten_ops("unflatten"), rewrite=_unflatten_rewrite, zero=_reshape_zero)(_reshape)


def _perm(node: fx.Node, n: int) -> list[int]:
    """``perm`` of a permute-like op: output dim i is input dim ``perm[i]``."""
    name = _name(node)
    perm = list(range(n))
    if name == "permute":
        perm = [_dim(int(p), n) for p in node.args[1]]
    elif name in ("transpose", "swapaxes"):
        a, b = _dim(int(node.args[1]), n), _dim(int(node.args[2]), n)
        perm[a], perm[b] = perm[b], perm[a]
    elif name == "movedim":
        src, dst = node.args[1], node.args[2]
        src, dst = ([src], [dst]) if isinstance(src, int) else (src, dst)
        rest = [i for i in range(n) if i not in [_dim(s, n) for s in src]]
        perm = [None] * n
        for s, d in zip(src, dst):
            perm[_dim(d, n)] = _dim(s, n)
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    else:  # t, mT, numpy_T
        perm = list(range(n))[::-1] if name != "mT" else perm[:-2] + [n - 1, n - 2]
    return perm


@rule(*aten_ops("permute", "transpose", "t", "swapaxes", "movedim", "numpy_T", "mT"),
      zero=lambda z, node: _mapped(z, node.args[0], _perm(node, len(z.shape(node.args[0])))))
def permute(ctx: RuleContext, node: fx.Node) -> None:
    # y[i] ~ x[perm[i]]
    xd, y = ctx.dims(node.args[0]), ctx.out()
    for i, p in enumerate(_perm(node, len(xd))):
        ctx.same(y[i], xd[p])


def _expand_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # x's flags where not broadcast; a broadcast dim repeats x's values (not zero)
    return _zero_if_all(z, node, [node.args[0]])


@rule(*aten_ops("expand", "broadcast_to"), rewrite=_sizes_rewrite(1, "size"), zero=_expand_zero)
def expand(ctx: RuleContext, node: fx.Node) -> None:
    # y[-k] ~ x[-k] where not broadcast; broadcast dims are new axes
    broadcast(ctx, node, [node.args[0]])


@rule(*aten_ops("expand_as"), zero=_expand_zero)
def expand_as(ctx: RuleContext, node: fx.Node) -> None:
    # y ~ other; y[-k] ~ x[-k] where not broadcast (the size comes from ``other``: no rewrite)
    broadcast(ctx, node, [node.args[0], node.args[1]])


def _repeat_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # an untiled dim keeps x's flag; a tiled one holds the tiles as units too (not zero)
    reps, n = list(node.args[1]), len(z.shape(node))
    f = z.of(node.args[0]) or []
    out = [False] * n
    for k in range(1, len(f) + 1):
        out[-k] = bool(f[-k]) and int(reps[-k]) == 1
    return out


@rule(*aten_ops("repeat"), zero=_repeat_zero)
def repeat(ctx: RuleContext, node: fx.Node) -> None:
    # y[-k] = Prod(R_k, x[-k]): each dim is tiled R_k times (the tiles are a new axis)
    xd, y = ctx.dims(node.args[0]), ctx.out()
    reps = list(node.args[1])
    for k in range(1, len(xd) + 1):
        r = int(reps[-k])
        ctx.same(y[-k], Prod((ctx.fresh(r, "repeat tiles"), xd[-k])) if r > 1 else xd[-k])


def _repeat_interleave_rewrite(r: Any, node: fx.Node) -> None:
    """The repeats count is the new width of the repeats axis (query heads per kv head)."""
    rep = node.meta["etp_rule_data"]["R"]
    if rep is not None and r.size(rep) != size_of(rep):
        set_arg(node, 1, r.size(rep))


def _repeat_interleave_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    reps, d = _bound(node).get("repeats"), _bound(node).get("dim")
    if not isinstance(node.args[0], fx.Node) or d is None or not isinstance(reps, int):
        return None
    return _drop_dim(z, node, d, keep=True) if reps > 1 else z.of(node.args[0])


@rule(*aten_ops("repeat_interleave"), rewrite=_repeat_interleave_rewrite,
      zero=_repeat_interleave_zero)
def repeat_interleave(ctx: RuleContext, node: fx.Node) -> None:
    # y[d] = Prod(x[d], R): each index of x is repeated R times in a row (GQA's kv heads)
    x = node.args[0]
    xd, y = ctx.dims(x), ctx.out()
    reps, d = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if xd is None or d is None or not isinstance(reps, int):
        ctx.freeze([t for t in (xd or []) + list(y)], "repeat_interleave without a dim or with per-index repeats")
        node.meta["etp_rule_data"] = {"R": None}
        return
    d = _dim(int(d), len(xd))
    ctx.same_all([t for i, t in enumerate(xd) if i != d], [t for i, t in enumerate(y) if i != d])
    rep = ctx.fresh(reps, "repeat_interleave") if reps > 1 else None
    ctx.same(y[d], Prod((xd[d], rep)) if rep is not None else xd[d])
    node.meta["etp_rule_data"] = {"R": rep}


def _every(z: ZeroContext, xs: list, dim: int) -> bool:
    """Is every input in ``xs`` zero at removed units of its dim ``dim``?"""
    flags = [z.of(x) for x in xs]
    return all(isinstance(f, list) and dim < len(f) and f[dim] for f in flags)


def _cat_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # every part zero at a removed unit (the cat dim included: each part's units are its own)
    xs = [x for x in node.args[0] if z.shape(x) is not None and z.shape(x) != (0,)]
    return [_every(z, xs, i) for i in range(len(z.shape(node)))]


def _stack_zero(z: ZeroContext, node: fx.Node) -> list[bool]:
    # the stacked dim indexes the inputs (not zero); the others are every input's
    n = len(z.shape(node))
    d = _dim(int(_bound(node).get("dim", 0)), n)
    xs = list(node.args[0])
    return [i != d and _every(z, xs, i if i < d else i - 1) for i in range(n)]


@rule(*aten_ops("cat", "concat", "concatenate"), zero=_cat_zero)
def cat(ctx: RuleContext, node: fx.Node) -> None:
    # y[d] = Cat(x1[d], x2[d], ...); other dims ~
    xs = [x for x in node.args[0] if ctx.shape(x) is not None and ctx.shape(x) != (0,)]
    y = ctx.out()
    d = _dim(int(ctx.arg(1, "dim", 0)), len(y))
    ctx.same(y[d], Cat(tuple(ctx.dims(x)[d] for x in xs)))
    for x in xs:
        ctx.same_all([t for i, t in enumerate(ctx.dims(x)) if i != d],
                     [t for i, t in enumerate(y) if i != d])


@rule(*aten_ops("stack"), zero=_stack_zero)
def stack(ctx: RuleContext, node: fx.Node) -> None:
    # y = stack(xs, d): y[d] is a new axis (one index per input), other dims ~ each x
    y = ctx.out()
    d = _dim(int(ctx.arg(1, "dim", 0)), len(y))
    rest = [t for i, t in enumerate(y) if i != d]
    for x in node.args[0]:
        ctx.same_all(ctx.dims(x), rest)
    ctx.freeze([y[d]], "stacked dim")


def _split_rewrite(r: Any, node: fx.Node) -> None:
    """Pieces may now differ in width: every split form becomes split_with_sizes."""
    parts = node.meta["etp_rule_data"]["parts"]
    d = node.meta["etp_rule_data"]["dim"]
    node.target = torch.ops.aten.split_with_sizes.default
    node.args = (node.args[0], [r.size(p) for p in parts], d)
    node.kwargs = {}


@rule(*aten_ops("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split"),
      rewrite=_split_rewrite,
      zero=lambda z, node: tuple(z.of(node.args[0]) for _ in node.meta["val"]))
def split(ctx: RuleContext, node: fx.Node) -> None:
    # x[d] = Cat(y1[d], y2[d], ...); other dims ~
    xd, outs = ctx.dims(node.args[0]), ctx.out()
    name = _name(node)
    d = _dim(int(ctx.arg(2, "dim", 0) if name != "chunk" else ctx.arg(2, "dim", 0)), len(xd))
    parts = [o[d] for o in outs]
    ctx.same(xd[d], Cat(tuple(parts)))
    for o in outs:
        ctx.same_all([t for i, t in enumerate(xd) if i != d], [t for i, t in enumerate(o) if i != d])
    node.meta["etp_rule_data"] = {"parts": parts, "dim": d}


@rule(*aten_ops("unbind"),
      zero=lambda z, node: tuple(_drop_dim(z, node, _bound(node).get("dim", 0))
                                 for _ in node.meta["val"]))
def unbind(ctx: RuleContext, node: fx.Node) -> None:
    # x[d] is indexed away (each output is one index): frozen; other dims ~
    xd, outs = ctx.dims(node.args[0]), ctx.out()
    d = _dim(int(ctx.arg(1, "dim", 0)), len(xd))
    ctx.freeze([xd[d]], "unbind indexes this dim")
    for o in outs:
        ctx.same_all([t for i, t in enumerate(xd) if i != d], o)


@rule(*aten_ops("select"), zero=lambda z, node: _drop_dim(z, node, node.args[1]))
def select(ctx: RuleContext, node: fx.Node) -> None:
    # y = x[..., i, ...]: x[d] is indexed (frozen), other dims ~
    xd, y = ctx.dims(node.args[0]), ctx.out()
    d = _dim(int(node.args[1]), len(xd))
    ctx.freeze([xd[d]], "select indexes this dim")
    ctx.same_all([t for i, t in enumerate(xd) if i != d], y)


def _slice_rewrite(r: Any, node: fx.Node) -> None:
    """New start/end from the new widths of the parts before and inside the slice; a slice
    whose dim keeps its width (e.g. ``x[:B]`` over a dynamic batch) is left alone."""
    pre, mid = node.meta["etp_rule_data"]["pre"], node.meta["etp_rule_data"]["mid"]
    if r.size(mid) == size_of(mid) and (pre is None or r.size(pre) == size_of(pre)):
        return
    start = r.size(pre) if pre is not None else 0
    set_arg(node, 2, start)
    set_arg(node, 3, start + r.size(mid))


@rule(*aten_ops("slice"), rewrite=_slice_rewrite, zero=lambda z, node: z.of(node.args[0]))
def slice_(ctx: RuleContext, node: fx.Node) -> None:
    # y = x[a:b] along d: x[d] = Cat(pre, y[d], post) (a step other than 1 freezes the dim)
    xd, y = ctx.dims(node.args[0]), ctx.out()
    n = ctx.shape(node.args[0])
    d = _dim(int(ctx.arg(1, "dim", 0)), len(xd))
    step = int(ctx.arg(4, "step", 1) or 1)
    ctx.same_all([t for i, t in enumerate(xd) if i != d], [t for i, t in enumerate(y) if i != d])
    start = ctx.arg(2, "start", 0) or 0
    start = max(0, min(n[d], start + n[d] if start < 0 else start))
    length = ctx.shape(node)[d]
    node.meta["etp_rule_data"] = {"pre": None, "mid": y[d]}
    if step != 1:
        ctx.freeze([xd[d], y[d]], "strided slice")
        return
    pieces = [p for p in (start, length, n[d] - start - length)]
    pre, post = ctx.fresh(start) if start else None, ctx.fresh(pieces[2]) if pieces[2] else None
    ctx.same(xd[d], Cat(tuple(t for t in (pre, y[d], post) if t is not None)))
    node.meta["etp_rule_data"] = {"pre": pre, "mid": y[d]}


@rule(*aten_ops("take_along_dim", "masked_select", inplace=True))
def indexing(ctx: RuleContext, node: fx.Node) -> None:
    # data-dependent addressing: every dim of the data input and the output is frozen
    ts = [ctx.dims(a) for a in node.args if ctx.dims(a) is not None]
    out = ctx.out()
    outs = list(out) if isinstance(out, tuple) else [out]
    ctx.freeze([t for d in ts + outs if d for t in d], f"{_name(node)} addresses elements by index")


def _pass_dims(ctx: RuleContext, a: Any, b: Any, pairs: list[tuple[int, int]], why: str) -> None:
    """a[i] ~ b[j] for each pair whose sizes agree; a pair that differs is frozen."""
    ad, bd, ash, bsh = ctx.dims(a), ctx.dims(b), ctx.shape(a), ctx.shape(b)
    for i, j in pairs:
        if ash[i] == bsh[j]:
            ctx.same(ad[i], bd[j])
        else:
            ctx.freeze([ad[i], bd[j]], why)


@rule(*aten_ops("index_select"),
      zero=lambda z, node: _drop_dim(z, node, node.args[1], keep=True))
def index_select(ctx: RuleContext, node: fx.Node) -> None:
    # y = x.index_select(d, idx): x[d] is addressed by value (frozen), y[d] ~ idx[0], others ~
    x, idx = node.args[0], node.args[2]
    xd, y = ctx.dims(x), ctx.out()
    d = _dim(int(node.args[1]), len(xd))
    ctx.freeze([xd[d]], "index_select addresses this dim by index")
    ctx.same_all([t for i, t in enumerate(xd) if i != d], [t for i, t in enumerate(y) if i != d])
    if ctx.dims(idx):
        ctx.same(ctx.dims(idx)[0], y[d])


@rule(*aten_ops("gather"))
def gather(ctx: RuleContext, node: fx.Node) -> None:
    # y[..j..] = x[..idx[..j..]..] along d: y ~ idx; y[i] ~ x[i] (i != d) where sizes agree
    x, idx = node.args[0], node.args[2]
    xd, y = ctx.dims(x), ctx.out()
    d = _dim(int(node.args[1]), len(xd))
    ctx.freeze([xd[d]], "gather addresses this dim by index")
    ctx.same_all(ctx.dims(idx), y)
    _pass_dims(ctx, x, node, [(i, i) for i in range(len(xd)) if i != d],
               "gather reads a prefix of this dim")


def _scatter_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # self with src written (added, reduced) along d: off d, zero where self and src both are
    # (a written scalar must be 0)
    b = _bound(node)
    src = b.get("src", b.get("source", b.get("value")))
    n = len(z.shape(node))
    d = _dim(int(node.args[1]), n)
    own = _drop_dim(z, node, d, keep=True)
    if not isinstance(src, fx.Node):
        return own if _scalar_zero(src) else None
    fs, ss, ys = z.of(src) or [], z.shape(src), z.shape(node)
    return [o and i < len(fs) and bool(fs[i]) and ss[i] == ys[i] for i, o in enumerate(own)]


@rule(*aten_ops("scatter", "scatter_add", "scatter_reduce", inplace=True), zero=_scatter_zero)
def scatter(ctx: RuleContext, node: fx.Node) -> None:
    # y = self with src[..j..] written (or reduced) at idx[..j..] along d: y ~ self;
    # src[i] ~ idx[i] ~ self[i] (i != d) where sizes agree; self[d] is addressed by value
    s, idx = node.args[0], node.args[2]
    src = node.args[3] if len(node.args) > 3 and isinstance(node.args[3], fx.Node) else None
    sd, y = ctx.dims(s), ctx.out()
    d = _dim(int(node.args[1]), len(sd))
    ctx.same_all(sd, y)
    ctx.freeze([sd[d]], f"{_name(node)} addresses this dim by index")
    why = f"{_name(node)} writes a prefix of this dim"
    for t in (idx, src):
        if ctx.dims(t) is not None:
            _pass_dims(ctx, t, s, [(i, i) for i in range(len(sd)) if i != d], why)
    if src is not None and ctx.dims(idx) is not None:
        _pass_dims(ctx, idx, src, [(d, d)], why)


@rule(*aten_ops("index_add", "index_copy", inplace=True), zero=_scatter_zero)
def index_add(ctx: RuleContext, node: fx.Node) -> None:
    # y = self with source rows added (copied) at idx along d: y ~ self; source[i] ~ self[i]
    # (i != d); source[d] ~ idx[0]; self[d] is addressed by value
    s, idx, src = node.args[0], node.args[2], node.args[3]
    sd, y = ctx.dims(s), ctx.out()
    d = _dim(int(node.args[1]), len(sd))
    ctx.same_all(sd, y)
    ctx.freeze([sd[d]], f"{_name(node)} addresses this dim by index")
    _pass_dims(ctx, src, s, [(i, i) for i in range(len(sd)) if i != d and ctx.dims(src)
                             and len(ctx.dims(src)) == len(sd)], f"{_name(node)} source")
    if ctx.dims(idx) and ctx.dims(src) and len(ctx.dims(src)) == len(sd):
        _pass_dims(ctx, idx, src, [(0, d)], f"{_name(node)} index")


def _advanced_index(ctx: Any, x: Any, indices: list) -> tuple[list[int], list] | None:
    """For ``x[indices]`` (None = a full slice): the indexed dims of x, and for each dim of
    the result either the x dim it keeps (an int) or None (a dim of the broadcast indices).
    None when a bool mask is among the indices (it stands for several dims)."""
    n = len(ctx.shape(x))
    pos = [i for i, t in enumerate(indices) if t is not None]
    for i in pos:
        v = indices[i].meta.get("val") if isinstance(indices[i], fx.Node) else None
        if not isinstance(v, torch.Tensor) or v.dtype in (torch.bool, torch.uint8):
            return None
    nb = max((len(ctx.shape(indices[i])) for i in pos), default=0)
    rest = [i for i in range(n) if i not in pos]
    if pos and pos == list(range(pos[0], pos[-1] + 1)):  # one block: it stays in place
        layout = [i for i in rest if i < pos[0]] + [None] * nb + [i for i in rest if i > pos[-1]]
    else:  # separated: the broadcast dims go first
        layout = [None] * nb + rest
    return pos, layout


def _index_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # the dims of x that are not indexed keep their flags; the index tensors' dims do not
    x, indices = node.args[0], list(node.args[1])
    got = _advanced_index(z, x, indices)
    return None if got is None else _mapped(z, x, got[1])


@rule(*aten_ops("index"), zero=_index_zero)
def index(ctx: RuleContext, node: fx.Node) -> None:
    # y = x[..., idx, ...]: indexed dims of x are addressed by value (frozen); the dims of x
    # that are not indexed pass through to their place in y; the broadcast index dims are new
    x, indices = node.args[0], list(node.args[1])
    xd, y = ctx.dims(x), ctx.out()
    got = _advanced_index(ctx, x, indices)
    if got is None:
        ctx.freeze(xd + y, "boolean mask indexing")
        return
    pos, layout = got
    ctx.freeze([xd[i] for i in pos], "index addresses this dim by index")
    for j, i in enumerate(layout):
        if i is None:
            ctx.freeze([y[j]], "dim of the index tensors")
        else:
            ctx.same(xd[i], y[j])


@rule(*aten_ops("index_put", inplace=True))
def index_put(ctx: RuleContext, node: fx.Node) -> None:
    # y = self with values written at self[indices]: y ~ self; values broadcast onto the
    # indexed view, so values[-k] ~ the self dim that view keeps there (aligned right)
    s, indices, vals = node.args[0], list(node.args[1]), node.args[2]
    sd, y = ctx.dims(s), ctx.out()
    ctx.same_all(sd, y)
    got = _advanced_index(ctx, s, indices)
    vd = ctx.dims(vals)
    if got is None:
        ctx.freeze(sd + (vd or []), "boolean mask index_put")
        return
    pos, layout = got
    ctx.freeze([sd[i] for i in pos], "index_put addresses this dim by index")
    if vd is None:
        return
    vs, ss = ctx.shape(vals), ctx.shape(s)
    for k in range(1, len(vd) + 1):
        i = layout[-k] if k <= len(layout) else None
        if i is not None and vs[-k] == ss[i]:
            ctx.same(vd[-k], sd[i])
        elif vs[-k] != 1:
            ctx.freeze([vd[-k]], "index_put values over the indexed dims")


def _moved(node: fx.Node, n: int) -> list[int]:
    """The dims a roll or flip reorders (a roll without dims runs over the flat tensor)."""
    dims = _bound(node).get("dims")
    dims = [] if dims is None else ([dims] if isinstance(dims, int) else list(dims))
    return _dimlist(dims, n) if dims else list(range(n))


@rule(*aten_ops("roll", "flip"), zero=lambda z, node: _mapped(
    z, node.args[0], [None if i in _moved(node, len(z.shape(node))) else i
                      for i in range(len(z.shape(node)))]))
def roll(ctx: RuleContext, node: fx.Node) -> None:
    # roll/flip along some dims: those dims are reordered (frozen); the others ~
    xd, y = ctx.dims(node.args[0]), ctx.out()
    name = _name(node)
    moved = _moved(node, len(xd))
    ctx.freeze([xd[i] for i in moved] + [y[i] for i in moved], f"{name} reorders this dim")
    ctx.same_all([t for i, t in enumerate(xd) if i not in moved],
                 [t for i, t in enumerate(y) if i not in moved])


def _pad_rewrite(r: Any, node: fx.Node) -> None:
    pass  # padding amounts are per dim and do not depend on widths


def _pad_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # zero padding: every dim keeps x's flag, but a padded one (it holds new positions)
    b, n = _bound(node), len(z.shape(node))
    if not _scalar_zero(b.get("value") or 0) or b.get("mode", "constant") != "constant":
        return None
    amounts = list(node.args[1])
    padded = [2 * (n - 1 - i) + 1 < len(amounts) and
              (amounts[2 * (n - 1 - i)] or amounts[2 * (n - 1 - i) + 1]) for i in range(n)]
    return _mapped(z, node.args[0], [None if p else i for i, p in enumerate(padded)])


@rule(*aten_ops("pad", "constant_pad_nd"), rewrite=_pad_rewrite, zero=_pad_zero)
def pad(ctx: RuleContext, node: fx.Node) -> None:
    # y[d] = Cat(new, x[d], new) for padded dims; unpadded dims ~
    xd, y = ctx.dims(node.args[0]), ctx.out()
    amounts = list(node.args[1])
    n = len(xd)
    for i in range(n):
        k = n - 1 - i  # pad lists start at the last dim
        lo, hi = (amounts[2 * k], amounts[2 * k + 1]) if 2 * k + 1 < len(amounts) else (0, 0)
        if lo == 0 and hi == 0:
            ctx.same(xd[i], y[i])
        else:
            ctx.freeze([xd[i], y[i]], "padded dim")


# --- sources: tensors made inside the graph ----------------------------------------------------

def _factory_rewrite(r: Any, node: fx.Node) -> None:
    i = 1 if _name(node).startswith("new_") else 0
    set_arg(node, i, r.resize(node, node.args[i]))


def _factory_zero(z: ZeroContext, node: fx.Node) -> list[bool] | None:
    # zeros everywhere: zero at every unit
    name, b = _name(node), _bound(node)
    zero = name in ("zeros", "new_zeros") or (name in ("full", "new_full") and
                                                _scalar_zero(b.get("fill_value")))
    return [True] * len(z.shape(node)) if zero else None


@rule(*aten_ops("zeros", "ones", "empty", "full", "rand", "randn", "new_zeros", "new_ones",
                "new_empty", "new_full", "scalar_tensor"), rewrite=_factory_rewrite,
      zero=_factory_zero)
def factory(ctx: RuleContext, node: fx.Node) -> None:
    # a constant made in the graph: its dims are new axes (free to follow their consumers)
    pass


@rule(*aten_ops("arange", "linspace", "tensor", "eye"))
def arange(ctx: RuleContext, node: fx.Node) -> None:
    # values depend on the length: frozen
    ctx.freeze(ctx.out(), f"{_name(node)} values depend on its length")
