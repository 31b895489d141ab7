"""Fast capture: lower a ``torch.fx.symbolic_trace`` graph to the ATen calls torch.export emits.

torch.export costs 1.5-2 ms per ATen node (fake-tensor and proxy dispatch on every op), while
most CNNs are plain compositions of a few modules and functions that ``symbolic_trace`` records
in microseconds. This pass lowers each recorded call to the ATen call that export's training IR
holds for it (the tables below, one entry per module class, function or tensor method) and
runs the lowered ops on meta tensors to give every node its shape. Anything outside the
tables, an in-place op whose input is used again or that writes to a buffer, or a model with
forward hooks (``symbolic_trace`` does not run them): :func:`fast_capture` returns None and
the caller uses torch.export, the canonical path. Before the graph's values are relied on,
:func:`check_capture` runs it against the model; compress exports instead on any difference.
So this is an optimisation with no behaviour of its own.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .compare import compare_outputs
from .inputs import eval_mode, untouched

__all__ = ["fast_capture", "LOWER_MODULE", "LOWER_FUNCTION", "LOWER_METHOD"]

aten = torch.ops.aten
# the cudnn switch of norm ops, as torch.export records it for CPU graphs (the value is only
# a backend hint; recording the same keeps the two captures identical)
_CUDNN = False


class Unsupported(Exception):
    """This graph is not for the fast path; the message says why (for the capture report)."""


@dataclass
class Val:
    """A lowered value: what the new graph holds (a node, or a Python constant) and its
    value on the example inputs (a meta tensor for a tensor: shape and dtype only)."""

    emit: Any
    real: Any


# module class -> lowering(L, module, qualified name, *args, **kwargs); exact classes only,
# since a subclass may override forward
LOWER_MODULE: dict[type, Callable] = {}
# function -> lowering(L, *args, **kwargs)
LOWER_FUNCTION: dict[Callable, Callable] = {}
# tensor method name -> lowering(L, self, *args, **kwargs)
LOWER_METHOD: dict[str, Callable] = {}


def _register(table: dict, *keys):
    def deco(fn):
        for k in keys:
            table[k] = fn
        return fn
    return deco


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _normalize(op, args: list, kwargs: dict) -> tuple[tuple, dict]:
    """Args as export records them: int lists expanded (``3`` -> ``[3, 3]``), tuples as
    lists, trailing defaults dropped, keyword-only args kept only when not default."""
    schema = op._schema
    pos = [a for a in schema.arguments if not a.kwarg_only]
    full = list(args)
    for a in pos[len(full):]:
        if a.name in kwargs:
            full.append(kwargs.pop(a.name))
        elif a.has_default_value():
            full.append(a.default_value)
        else:
            raise Unsupported(f"{op} misses its argument {a.name}")
    out = []
    for a, v in zip(pos, full):
        if a.N is not None and isinstance(v, int) and not isinstance(v, bool):
            v = [v] * a.N
        out.append(_as_list(v))
    while out and pos[len(out) - 1].has_default_value() and \
            _same(out[-1], pos[len(out) - 1].default_value):
        out.pop()
    kw = {}
    for a in schema.arguments:
        if a.kwarg_only and a.name in kwargs and not _same(kwargs[a.name], a.default_value):
            kw[a.name] = kwargs[a.name]
    return tuple(out), kw


def _same(v: Any, default: Any) -> bool:
    if isinstance(v, fx.Node) or isinstance(default, fx.Node):
        return False
    if isinstance(v, list) and isinstance(default, list):
        return len(v) == len(default) and all(_same(a, b) for a, b in zip(v, default))
    return type(v) is type(default) and v == default


def _pick(v: Any, field: str) -> Any:
    """``v`` with every :class:`Val` replaced by its ``emit`` or ``real`` (a hand-written
    tree map: pytree's costs more than the lowering on graphs of a thousand nodes)."""
    if isinstance(v, Val):
        return getattr(v, field)
    if isinstance(v, (list, tuple)):
        return type(v)(_pick(x, field) for x in v)
    if isinstance(v, dict):
        return {k: _pick(x, field) for k, x in v.items()}
    return v


class Lowering:
    """The new graph under construction, walked from the traced graph in order, with the meta
    value (shape and dtype) of every emitted node."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = fx.Graph()
        self.attrs: dict[str, Val] = {}
        self.tensors = dict(model.named_parameters(remove_duplicate=False))
        self.tensors.update(model.named_buffers(remove_duplicate=False))
        self.uses_sizes = False  # a shape was read: sizes are baked in as constants
        self.readers: dict[int, int] = {}  # id(Val) -> nodes of the traced graph reading it
        self.placeholder_names: list[str] = []  # the traced graph's inputs, in order

    def fake(self, v: Any) -> Any:
        """The shape-only stand-in kept in ``meta["val"]`` (a meta tensor: a fake tensor per
        node would cost more than the lowering itself)."""
        if isinstance(v, torch.Tensor):
            return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
        if isinstance(v, (list, tuple)):
            return type(v)(self.fake(x) for x in v)
        return v

    def attr(self, name: str) -> Val:
        """A ``get_attr`` node for a parameter or buffer of the model (one per name)."""
        if name not in self.attrs:
            if name not in self.tensors:
                raise Unsupported(f"attribute {name} is not a parameter or buffer")
            node = self.graph.get_attr(name)
            node.meta["val"] = self.fake(self.tensors[name])
            self.attrs[name] = Val(node, node.meta["val"])
        return self.attrs[name]

    def optional_attr(self, prefix: str, name: str, module: nn.Module) -> Val | None:
        return None if getattr(module, name, None) is None else self.attr(f"{prefix}.{name}")

    def call(self, op, *args: Any, **kwargs: Any) -> Val:
        """Emit ``op`` on lowered values and run it on their meta values."""
        real_args, real_kwargs = _pick(args, "real"), _pick(kwargs, "real")
        real = _meta_shortcut(op, real_args)
        if real is None:
            real = op(*[_as_list(a) for a in real_args], **real_kwargs)
        emit_args, emit_kwargs = _pick(args, "emit"), _pick(kwargs, "emit")
        emit_args, emit_kwargs = _normalize(op, list(emit_args), dict(emit_kwargs))
        # named as export names it (after the op, not the overload): reports show the names
        node = self.graph.create_node("call_function", op, emit_args, emit_kwargs,
                                      name=op._schema.name.split("::")[-1])
        node.meta["val"] = self.fake(real)
        return Val(node, real)

    def getitem(self, v: Val, i: Any) -> Val:
        if isinstance(v.emit, fx.Node):
            node = self.graph.call_function(operator.getitem, (v.emit, i))
            node.meta["val"] = self.fake(v.real[i])
            return Val(node, v.real[i])
        return Val(v.emit[i], v.real[i])

    def current_input_reused(self, x: Val) -> bool:
        node = x.emit
        return not (isinstance(node, fx.Node) and node.op == "call_function"
                    and self.readers.get(id(x), 0) == 1)

    def run(self, traced: fx.Graph, args: tuple) -> Any:
        env: dict[fx.Node, Any] = {}
        inputs = iter(args)
        for n in traced.nodes:
            if n.op == "output":
                return fx.node.map_arg(n.args[0], env.__getitem__)
            val = self._one(traced, n, env, inputs)
            env[n] = val
            if isinstance(val, Val):
                self.readers[id(val)] = self.readers.get(id(val), 0) + len(n.users)
        raise Unsupported("the graph has no output")

    def _one(self, traced: fx.Graph, n: fx.Node, env: dict, inputs) -> Any:
        if n.op == "placeholder":
            t = next(inputs)
            node = self.graph.placeholder(n.name)
            node.meta["val"] = self.fake(t)
            return Val(node, node.meta["val"])
        if n.op == "get_attr":
            return self.attr(str(n.target))
        args = fx.node.map_arg(n.args, env.__getitem__)
        kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
        if n.op == "call_module":
            m = self.model.get_submodule(str(n.target))
            lower = LOWER_MODULE.get(type(m))
            if lower is None:
                raise Unsupported(f"module {n.target} ({type(m).__name__}) has no lowering")
            return lower(self, m, str(n.target), *args, **kwargs)
        table = LOWER_FUNCTION if n.op == "call_function" else LOWER_METHOD
        lower = table.get(n.target)
        if lower is None:
            raise Unsupported(f"{n.op} {getattr(n.target, '__name__', n.target)} has no lowering")
        return lower(self, *args, **kwargs)


# ops whose output has the shape and dtype of their first input; on meta tensors their
# output is made directly, since their meta kernels are Python decompositions (1-5 ms each)
_SAME_SHAPE = {aten.relu.default, aten.silu.default, aten.hardswish.default,
               aten.hardsigmoid.default, aten.sigmoid.default, aten.tanh.default,
               aten.gelu.default, aten.hardtanh.default, aten.dropout.default,
               aten.batch_norm.default, aten.layer_norm.default, aten.group_norm.default}
_BROADCAST = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor}


def _meta_shortcut(op, args: tuple) -> torch.Tensor | None:
    """The meta output of a shape-preserving or broadcasting op, without its meta kernel."""
    if op in _SAME_SHAPE:
        return torch.empty_like(args[0])
    if op is aten.cat.default and args[0] and all(t.dim() > 1 for t in args[0]):
        dim = args[1] if len(args) > 1 else 0
        shape = list(args[0][0].shape)
        shape[dim] = sum(t.shape[dim] for t in args[0])
        return torch.empty(shape, dtype=args[0][0].dtype, device="meta")
    if op in _BROADCAST and all(isinstance(a, torch.Tensor) for a in args[:2]):
        a, b = args[:2]
        return torch.empty(torch.broadcast_shapes(a.shape, b.shape),
                           dtype=torch.result_type(a, b), device="meta")
    return None


# --- lowering helpers ---------------------------------------------------------------------

def _tensor(v: Any) -> bool:
    return isinstance(v, Val) and isinstance(v.real, torch.Tensor)


def _out_of_place(inplace: bool, x: Val, L: Lowering) -> None:
    """In-place ops are emitted out of place; that is the same only when nothing else reads
    the input afterwards (the caller checked the node's users)."""
    if inplace and L.current_input_reused(x):
        raise Unsupported("an in-place op's input is read again")


def _act(op):
    def lower(L: Lowering, x: Val, inplace: bool = False) -> Val:
        _out_of_place(inplace, x, L)
        return L.call(op, x)
    return lower


# --- modules (eval mode) ------------------------------------------------------------------

@_register(LOWER_MODULE, nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(L, m, name, x):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise Unsupported(f"{name}: padding {m.padding!r} mode {m.padding_mode}")
    op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[len(m.stride)]
    return L.call(op, x, L.attr(f"{name}.weight"), L.optional_attr(name, "bias", m),
                  m.stride, m.padding, m.dilation, m.groups)


@_register(LOWER_MODULE, nn.Linear)
def _linear_module(L, m, name, x):
    return _linear(L, x, L.attr(f"{name}.weight"), L.optional_attr(name, "bias", m))


@_register(LOWER_MODULE, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _bn_module(L, m, name, x):
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise Unsupported(f"{name}: BatchNorm without running statistics")
    return L.call(aten.batch_norm.default, x, L.optional_attr(name, "weight", m),
                  L.optional_attr(name, "bias", m), L.attr(f"{name}.running_mean"),
                  L.attr(f"{name}.running_var"), False,
                  0.0 if m.momentum is None else m.momentum, m.eps, _CUDNN)


@_register(LOWER_MODULE, nn.LayerNorm)
def _ln_module(L, m, name, x):
    return _layer_norm(L, x, m.normalized_shape, L.optional_attr(name, "weight", m),
                       L.optional_attr(name, "bias", m), m.eps)


@_register(LOWER_MODULE, nn.GroupNorm)
def _gn_module(L, m, name, x):
    return L.call(aten.group_norm.default, x, m.num_groups, L.optional_attr(name, "weight", m),
                  L.optional_attr(name, "bias", m), m.eps, _CUDNN)


def _module_act(op):
    return lambda L, m, name, x: _act(op)(L, x, getattr(m, "inplace", False))


for _cls, _op in [(nn.ReLU, aten.relu.default), (nn.SiLU, aten.silu.default),
                  (nn.Hardswish, aten.hardswish.default), (nn.Sigmoid, aten.sigmoid.default),
                  (nn.Hardsigmoid, aten.hardsigmoid.default), (nn.Tanh, aten.tanh.default)]:
    LOWER_MODULE[_cls] = _module_act(_op)


@_register(LOWER_MODULE, nn.ReLU6)
def _relu6_module(L, m, name, x):
    _out_of_place(m.inplace, x, L)
    return L.call(aten.hardtanh.default, x, 0.0, 6.0)


@_register(LOWER_MODULE, nn.GELU)
def _gelu_module(L, m, name, x):
    return _gelu(L, x, m.approximate)


@_register(LOWER_MODULE, nn.Identity)
def _identity_module(L, m, name, x):
    return x


@_register(LOWER_MODULE, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
def _dropout_module(L, m, name, x):
    if type(m) is not nn.Dropout:
        raise Unsupported(f"{name}: {type(m).__name__}")
    return _dropout(L, x, m.p, False, m.inplace)


@_register(LOWER_MODULE, nn.MaxPool2d)
def _maxpool_module(L, m, name, x):
    return _max_pool2d(L, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode,
                       m.return_indices)


@_register(LOWER_MODULE, nn.AvgPool2d)
def _avgpool_module(L, m, name, x):
    return _avg_pool2d(L, x, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                       m.count_include_pad, m.divisor_override)


@_register(LOWER_MODULE, nn.AdaptiveAvgPool2d)
def _adaptive_module(L, m, name, x):
    return _adaptive_avg_pool2d(L, x, m.output_size)


@_register(LOWER_MODULE, nn.Flatten)
def _flatten_module(L, m, name, x):
    return L.call(aten.flatten.using_ints, x, m.start_dim, m.end_dim)


# --- functions ----------------------------------------------------------------------------

def _max_pool2d(L, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                return_indices=False):
    if return_indices:
        raise Unsupported("max_pool2d with indices")
    return L.call(aten.max_pool2d.default, x, kernel_size, [] if stride is None else stride,
                  padding, dilation, ceil_mode)


def _adaptive_avg_pool2d(L, x, output_size):
    size = [output_size] * 2 if isinstance(output_size, int) else list(output_size)
    if any(s is None for s in size):
        raise Unsupported("adaptive pooling with a None size")
    return L.call(aten.adaptive_avg_pool2d.default, x, size)


LOWER_FUNCTION[F.max_pool2d] = _max_pool2d
LOWER_FUNCTION[F.adaptive_avg_pool2d] = _adaptive_avg_pool2d
for _fn, _op in [(F.relu, aten.relu.default), (torch.relu, aten.relu.default),
                 (F.silu, aten.silu.default), (F.hardswish, aten.hardswish.default),
                 (F.hardsigmoid, aten.hardsigmoid.default), (torch.sigmoid, aten.sigmoid.default),
                 (torch.tanh, aten.tanh.default)]:
    LOWER_FUNCTION[_fn] = _act(_op)


@_register(LOWER_FUNCTION, F.gelu)
def _gelu(L, x, approximate="none"):
    return L.call(aten.gelu.default, x, approximate=approximate)


@_register(LOWER_FUNCTION, F.dropout)
def _dropout(L, x, p=0.5, training=True, inplace=False):
    if training:
        raise Unsupported("dropout in training mode")
    _out_of_place(inplace, x, L)
    return L.call(aten.dropout.default, x, p, False)


@_register(LOWER_FUNCTION, F.layer_norm)
def _layer_norm(L, x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return L.call(aten.layer_norm.default, x, list(normalized_shape), weight, bias, eps, _CUDNN)


@_register(LOWER_FUNCTION, F.linear)
def _linear(L, x, weight, bias=None):
    return L.call(aten.linear.default, x, weight, bias)


@_register(LOWER_FUNCTION, F.conv2d)
def _conv2d(L, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        raise Unsupported(f"conv2d padding {padding!r}")
    return L.call(aten.conv2d.default, x, weight, bias, stride, padding, dilation, groups)


@_register(LOWER_FUNCTION, torch.flatten)
def _flatten(L, x, start_dim=0, end_dim=-1):
    return L.call(aten.flatten.using_ints, x, start_dim, end_dim)


@_register(LOWER_FUNCTION, torch.cat)
def _cat(L, tensors, dim=0):
    return L.call(aten.cat.default, list(tensors), dim)


def _python_value(v: Any) -> bool:
    """A plain Python number, or one computed from tensor sizes (baked in as a constant)."""
    if isinstance(v, Val):
        return isinstance(v.real, (int, float)) and not isinstance(v.emit, fx.Node)
    return isinstance(v, (int, float))


def _binary(op, python_op):
    """``a op b``: Python arithmetic on sizes, or the ATen ``op`` on two tensors (``None``:
    no tensor form); a Python scalar next to a tensor is left to torch.export."""
    def lower(L, a, b):
        if _python_value(a) and _python_value(b):  # size arithmetic, e.g. channels // groups
            value = python_op(*(v.real if isinstance(v, Val) else v for v in (a, b)))
            return Val(value, value)
        if op is None or not (_tensor(a) and _tensor(b)):
            raise Unsupported(f"{python_op.__name__} with a scalar operand, or of tensors")
        return L.call(op, a, b)
    return lower


for _fns, _op, _py in [((operator.add, operator.iadd, torch.add), aten.add.Tensor, operator.add),
                       ((operator.mul, operator.imul, torch.mul), aten.mul.Tensor, operator.mul),
                       ((operator.sub, operator.isub, torch.sub), aten.sub.Tensor, operator.sub),
                       ((operator.truediv, torch.div), aten.div.Tensor, operator.truediv)]:
    for _fn in _fns:
        LOWER_FUNCTION[_fn] = _binary(_op, _py)


LOWER_FUNCTION[operator.floordiv] = _binary(None, operator.floordiv)


@_register(LOWER_FUNCTION, getattr)
def _getattr(L, x, name):
    if name == "shape" and _tensor(x):
        return _size(L, x)
    raise Unsupported(f"getattr {name}")


def _stochastic_depth(L, x, p, mode, training=True):
    if training and p > 0:
        raise Unsupported("stochastic depth in training mode")
    return x  # eval: the identity, as export records it (no op)


@_register(LOWER_FUNCTION, F.avg_pool2d)
def _avg_pool2d(L, x, kernel_size, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True, divisor_override=None):
    return L.call(aten.avg_pool2d.default, x, kernel_size, [] if stride is None else stride,
                  padding, ceil_mode, count_include_pad, divisor_override)


@_register(LOWER_FUNCTION, operator.getitem)
def _getitem(L, v, i):
    if isinstance(v, Val) and isinstance(v.real, (list, tuple, torch.Size)) and isinstance(i, int):
        return L.getitem(v, i)
    raise Unsupported("indexing a tensor")


@_register(LOWER_FUNCTION, torch.chunk)
def _chunk(L, x, chunks, dim=0):
    return L.call(aten.chunk.default, x, chunks, dim)


@_register(LOWER_FUNCTION, torch.transpose)
def _transpose(L, x, dim0, dim1):
    return L.call(aten.transpose.int, x, dim0, dim1)


# --- tensor methods -----------------------------------------------------------------------

def _shape_args(shape: tuple) -> list:
    return list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else list(shape)


@_register(LOWER_METHOD, "view")
def _view(L, x, *shape):
    return L.call(aten.view.default, x, _shape_args(shape))


@_register(LOWER_METHOD, "reshape")
def _reshape(L, x, *shape):
    return L.call(aten.reshape.default, x, _shape_args(shape))


@_register(LOWER_METHOD, "permute")
def _permute(L, x, *dims):
    return L.call(aten.permute.default, x, _shape_args(dims))


@_register(LOWER_METHOD, "size")
def _size(L, x, dim=None):
    L.uses_sizes = True
    s = x.real.size() if dim is None else x.real.size(dim)
    return Val(tuple(s) if dim is None else s, s)


@_register(LOWER_METHOD, "contiguous")
def _contiguous(L, x):
    return L.call(aten.contiguous.default, x)


@_register(LOWER_METHOD, "mean")
def _mean(L, x, dim=None, keepdim=False):
    if dim is None:
        raise Unsupported("mean over all dims")
    return L.call(aten.mean.dim, x, [dim] if isinstance(dim, int) else list(dim), keepdim)


LOWER_FUNCTION[torch.permute] = _permute
LOWER_METHOD["flatten"] = _flatten
LOWER_METHOD["transpose"] = _transpose
LOWER_METHOD["chunk"] = _chunk
for _name, _op in [("relu", aten.relu.default), ("sigmoid", aten.sigmoid.default)]:
    LOWER_METHOD[_name] = _act(_op)
LOWER_METHOD["relu_"] = lambda L, x: _act(aten.relu.default)(L, x, True)
LOWER_METHOD["add"] = LOWER_FUNCTION[torch.add]
LOWER_METHOD["mul"] = LOWER_FUNCTION[torch.mul]


def _register_optional() -> None:
    """Lowerings for functions of optional packages, once they are imported."""
    import sys
    ops = sys.modules.get("torchvision.ops.stochastic_depth")
    if ops is not None:  # torchvision wraps it with torch.fx.wrap: a call_function node
        LOWER_FUNCTION.setdefault(ops.stochastic_depth, _stochastic_depth)


# --- the pass -----------------------------------------------------------------------------

def _attrs_first(graph: fx.Graph, names: list[str]) -> None:
    """Put the ``get_attr`` nodes first, parameters then buffers in the model's order, as
    export does: group ids and the order of groups follow the first slot met."""
    rank = {n: i for i, n in enumerate(names)}
    attrs = sorted((n for n in graph.nodes if n.op == "get_attr"), key=lambda n: rank[n.target])
    first = next(n for n in graph.nodes if n.op != "get_attr")
    for node in attrs:
        first.prepend(node)


def _hooked(model: nn.Module) -> str | None:
    """Why the fast path must not take a model with forward hooks, or None.

    ``symbolic_trace`` records a leaf module (a Conv2d, say) as one call and never runs its
    hooks, nor the root's: a pre-hook that permutes features would be missing from the graph,
    and the groups' unit indices would not be the ones the model computes with. torch.export
    runs them, so such a model is exported."""
    glob = torch.nn.modules.module
    if glob._global_forward_pre_hooks or glob._global_forward_hooks:
        return "a global forward hook is registered (register_module_forward_hook)"
    for name, m in model.named_modules():
        for attr, kind in (("_forward_pre_hooks", "forward pre-hook"),
                           ("_forward_hooks", "forward hook")):
            if getattr(m, attr, None):
                return (f"module {name or '<root>'} ({type(m).__name__}) has a {kind}, which "
                        f"symbolic_trace does not run")
    return None


class _BufferProxyTracer(fx.Tracer):
    """``fx.Tracer`` that traces buffers read as module attributes as ``get_attr`` proxies."""

    proxy_buffer_attributes = True


def _symbolic_trace(model: nn.Module) -> fx.Graph:
    """The Tracer's graph, without the GraphModule symbolic_trace would compile around it.

    Buffers are traced as proxies, like parameters: an in-place update of a buffer in
    forward (a counter) is then a node the lowering refuses (so export records it), instead
    of running for real on the model's buffer while tracing and leaving no trace."""
    return _BufferProxyTracer().trace(model)


def _lower(model: nn.Module, args: tuple) -> tuple[Lowering | None, Any, str]:
    """Trace and lower; ``(lowering, outputs, "fx")`` or ``(None, None, why not)``."""
    why = _hooked(model)
    if why is not None:
        return None, None, why
    try:
        traced = _symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any failure means: use torch.export
        return None, None, f"symbolic_trace failed: {type(e).__name__}"
    placeholders = [n for n in traced.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        return None, None, "the forward signature does not match the inputs one to one"
    L = Lowering(model)
    try:
        with torch.no_grad():
            out = L.run(traced, args)
    except Unsupported as e:
        return None, None, str(e)
    except Exception as e:  # noqa: BLE001 - a lowering that does not fit: use torch.export
        return None, None, f"lowering failed: {type(e).__name__}: {e}"
    L.placeholder_names = [p.name for p in placeholders]
    return L, out, "fx"


def fast_capture(model: nn.Module, args: tuple, kwargs: dict, *,
                 dynamic_batch: bool = False) -> tuple[fx.GraphModule | None, str]:
    """The model's ATen graph through ``symbolic_trace``, or ``(None, why not)``.

    The model must be in eval mode already; it is left as it was (:func:`untouched`). A model
    with forward hooks is refused (``symbolic_trace`` would skip them). The result has the
    shape of ``torch.export.export(model, args).module()``: ``get_attr`` nodes for parameters
    and buffers under their qualified names, ``meta["val"]`` on every node, flat inputs and
    outputs with pytree specs. The ops run on meta tensors (shapes only): before the graph's
    values are relied on, :func:`check_capture` compares them with the model's. With
    ``dynamic_batch``, a graph that reads tensor sizes is refused (it would bake the
    example's sizes in). Its Python code is generated on first use
    (:class:`_CompiledOnFirstUse`)."""
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None, "the fast path takes positional tensor inputs only"
    _register_optional()
    with untouched(model, copy_parameters=False):
        L, out, why = _lower(model, args)
    if L is None:
        return None, why
    if dynamic_batch and L.uses_sizes:
        return None, "the graph reads tensor sizes"
    _attrs_first(L.graph, list(L.tensors))
    flat, out_spec = pytree.tree_flatten(out)
    if not all(isinstance(v, Val) and isinstance(v.emit, fx.Node) for v in flat):
        return None, "the model returns values that are not tensors"
    L.graph.output(tuple(v.emit for v in flat))
    in_spec = pytree.tree_flatten((tuple(args), {}))[1]
    L.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(L.placeholder_names, in_spec, out_spec))
    gm = _CompiledOnFirstUse(model, L.graph)  # code generated on first use
    gm.meta["etp_capture"] = "fx"
    # no size was read: the graph is the model's code for any batch size (nothing was
    # specialised to the example's, unlike a static export)
    gm.meta["etp_batch_generic"] = not L.uses_sizes
    return gm, "fx"


class _CompiledOnFirstUse(_LazyGraphModule):
    """A graph module whose Python code is generated when it is first needed (a call,
    ``.code``, printing it), not when it is made: ``compress`` rewrites working copies of the
    capture (:mod:`etp_fx.surgery.working_copy`) and never runs the capture itself on its
    default path, so the code generation (10 to 30 ms on a torchvision CNN) is saved there.

    torch's lazily compiled ``GraphModule`` does the deferring; this subclass makes the
    module look compiled until then, for every copy too (``copy.deepcopy`` and each graph
    assignment come through :meth:`recompile`): the input and output specs are set, as
    compiling sets them, and the forward has the signature of the generated one (inputs are
    bound and named by it)."""

    def recompile(self) -> None:  # the graph changed: compile on the next use
        cls = type(self)  # the module's own class: its forward is replaced on compiling
        if not isinstance(self._graph._codegen, _PyTreeCodeGen):
            if "_lazy_forward" in vars(cls):  # not a capture's graph: torch's lazy forward
                del cls._lazy_forward
            return super().recompile()
        info = self._graph._codegen.pytree_info
        self._in_spec, self._out_spec = info.in_spec, info.out_spec

        def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
            self.real_recompile()
            return self(*args, **kwargs)
        forward.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
             for n in ["self", *info.orig_args]])
        # the lazy class tells "not compiled yet" by this identity
        cls._lazy_forward = cls.forward = forward


def check_capture(gm: fx.GraphModule, model: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """Run a fast capture and the model (in eval mode) on the example inputs: None when they
    agree, else what differs. Once per capture: the result is remembered in ``gm.meta``."""
    if gm.meta.get("etp_capture") != "fx":
        return None
    if "etp_capture_check" not in gm.meta:
        # the graph shares the model's weights: both runs leave them (and every buffer, a
        # counter say) as they were. The weights are not copied: a forward the fast path
        # lowered only reads them (a write would be a node it refuses), and one that wrote
        # them anyway is refused by untouched (ModelError) instead of being restored
        with eval_mode(model), untouched(model, copy_parameters=False), torch.no_grad():
            got = gm(*args, **kwargs)
            want = model(*args, **kwargs)
        same = compare_outputs(want, got)
        if not same.same_structure:
            gm.meta["etp_capture_check"] = "the outputs have another structure"
        # each output within 1e-5 of its own scale, and never finer than 1e-5 absolute: the
        # graph runs the same kernels, but a lowering may reassociate a sum
        elif not same.within(1e-5, per_output=True, floor=1.0):
            gm.meta["etp_capture_check"] = "the lowered graph computes something else"
        else:
            gm.meta["etp_capture_check"] = None
    return gm.meta["etp_capture_check"]
