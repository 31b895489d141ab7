"""Fold the constants carried by removed units into their consumers.

A removed unit whose producing weights are zero still carries a constant where a bias, a
BatchNorm shift or ``sigmoid(0)`` put one. A consumer that is linear in that input (Linear,
conv, ``x @ W``) turns the constant into a fixed contribution ``C = op(Z) - op(0)``, where ``Z``
holds only the removed units' constants.

``C`` is added to the consumer's bias (or, without one, as a per-channel constant that
broadcasts) when it is the same at every position *for every input size*: computed again at a
larger size of every other dim, it must give the same per-channel values (a Linear, a matmul,
an unpadded conv). Otherwise (a zero-padded conv sees the constant only inside the image; at a
size with no inside at all, it looks uniform but is not) it is added as a constant map after
the op, valid only at the traced size: a guard in the graph (:func:`check_traced_size`)
refuses any other non-batch size with a clear error instead of broadcasting the map wrongly.

Every comparison here ("the same value", "the same vector") allows for rounding: a few eps of
the dtype the model computes in (never less than float32's), relative to the magnitude of the
values compared, so float16 and bfloat16 rounding does not make a constant look
position- or batch-dependent. Every node the pass adds carries ``meta["val"]`` (a meta tensor
of its shape and dtype at the trace), so later folds and rules read shapes as on any node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from ..capture import describe_inputs, flat_inputs
from ..errors import FoldError, InputError
from ..graph.layout import kept_indices, leaves, new_size
from ..graph.rules.table import lookup
from ..graph.tensors import get_tensor, set_tensor
from .rewrite import RewriteContext, slice_tensor

__all__ = ["FoldError", "Fold", "plan_folds", "apply_folds", "check_traced_size",
           "channel_constant", "rounding_tolerance"]

#: how many eps of the dtype two computations of the same constant may differ by, relative to
#: the magnitude of the values that made it (BLAS blocking, another algorithm at another size)
_ROUNDING_EPS = 16


def rounding_tolerance(dtype: torch.dtype) -> float:
    """The rounding, relative to the values' magnitude, below which two computations of a
    constant in ``dtype`` count as the same: :data:`_ROUNDING_EPS` eps of ``dtype``, and never
    less than float32's (float64 keeps float32's tolerance, far below any position effect)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return _ROUNDING_EPS * max(eps, torch.finfo(torch.float32).eps)


@dataclass
class Fold:
    """One consumer's contribution from the constants of removed units."""

    node: str  # the consumer node's name
    contribution: torch.Tensor  # full-width contribution C (batch dims kept as in the trace)
    groups: list[str]  # ids of the groups whose units carried the constant
    # C is one value per output channel at any size of the other dims (else: a map, guarded)
    size_free: bool = False
    traced_inputs: str = ""  # the example inputs C was computed for, for the guard's message
    # the largest magnitude among the values C was computed from (the op's output with and
    # without the constants): the scale of its rounding
    scale: float = 0.0


class _Recorder(fx.Interpreter):
    """Runs the module and keeps the value of each consumer's input ``x`` whose removed
    units carry something (a non-zero slice ``(dim, indices)`` of ``wanted[x]``). The others
    are dropped as the interpreter goes: a removed unit that carries zeros has nothing to
    fold, and holding every consumer's input until the end of the run (every conv's, in a
    CNN) costs fresh memory for every activation, about a quarter of the run on CPU."""

    def __init__(self, gm: fx.GraphModule, wanted: Mapping[str, list]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        slices = self.wanted.get(n.name)
        if slices and isinstance(out, torch.Tensor) and any(
                bool(out.index_select(d, idx.to(out.device)).any()) for d, idx in slices):
            self.values[n.name] = out
        return out


def _removed(t, keep) -> list[int]:
    kept = set(kept_indices(t, keep))
    return [i for i in range(new_size(t, {})) if i not in kept]


def plan_folds(gm: fx.GraphModule, keep: Mapping[int, Sequence[int]], group_of: Mapping[int, str],
               args: tuple, kwargs: dict, rtol: float | None = None,
               outputs: list | None = None) -> list[Fold]:
    """Run the full-width (zeroed) module once and compute every consumer's contribution.

    ``rtol``: how far a removed unit's values may vary (relative to the input's magnitude)
    and still count as one constant; None: :func:`rounding_tolerance` of the input's dtype.
    When the module runs (there is something to fold) and ``outputs`` is a list, the run's
    output is appended to it, so the caller need not run the module again."""
    todo = []
    for node in gm.graph.nodes:
        rule = lookup(node) if node.op == "call_function" else None
        spec = rule.fold(node) if rule is not None and rule.fold is not None else None
        if spec is None:
            continue
        x = node.args[spec.x]
        dims = x.meta["etp_dims"]
        d = spec.dim % len(dims)
        rem = _removed(dims[d], keep)
        if rem:
            todo.append((node, spec, x, d, rem))
    if not todo:
        return []
    wanted: dict[str, list] = {}
    for _, _, x, d, rem in todo:
        wanted.setdefault(x.name, []).append((d, torch.tensor(rem, dtype=torch.long)))
    rec = _Recorder(gm, wanted)
    with torch.no_grad():
        out = rec.run(*flat_inputs(gm, args, kwargs))
    if outputs is not None:
        outputs.append(out)
    folds = []
    for node, spec, x, d, rem in todo:
        f = _one_fold(gm, node, spec, x, d, rem, rec.values, group_of, rtol)
        if f is not None:
            f.traced_inputs = describe_inputs(args, kwargs)
            folds.append(f)
    return folds


def _one_fold(gm, node, spec, x, d, rem, values, group_of, rtol) -> Fold | None:
    X = values.get(x.name)
    if X is None:  # the removed units carry zeros here (not kept by the recorder)
        return None
    idx = torch.tensor(rem, dtype=torch.long)
    XR = X.index_select(d, idx)
    groups = sorted({group_of[l.uid] for l in leaves(x.meta["etp_dims"][d]) if l.uid in group_of})
    if float(XR.abs().max()) == 0.0:
        return None
    call_args = [values.get(a.name, None) if isinstance(a, fx.Node) else a for a in node.args]

    def run(z: torch.Tensor) -> torch.Tensor:
        a = list(call_args)
        a[spec.x] = z
        a = [_param(gm, node.args[i]) if isinstance(node.args[i], fx.Node) and i != spec.x
             else v for i, v in enumerate(a)]
        return node.target(*a, **node.kwargs)

    # what the removed units add to the output (the op is linear in x)
    Z = torch.zeros_like(X).index_copy_(d, idx, XR)
    C, scale = _contribution(run, Z)
    if float(C.abs().max()) == 0.0:  # the consumer's columns for these units are zero
        return None
    # a non-zero contribution may stay only if it does not depend on the input: each removed
    # unit must carry one constant, the same value at every other index
    moved = XR.movedim(d, 0).reshape(len(rem), -1)
    rtol = rounding_tolerance(X.dtype) if rtol is None else rtol
    if float((moved - moved[:, :1]).abs().max()) > rtol * (float(X.abs().max()) or 1.0) + 1e-12:
        raise FoldError(
            f"units of group(s) {groups} removed before {node.format_node()} carry values that "
            f"depend on the input into weights that are not zero, so removing them would change "
            f"the result. Zero those units whole (zero_units with keep_constants=False), or "
            f"train them to zero first.", groups)
    free = _size_free(C, scale, spec, run, moved[:, 0], X, d, idx)
    return Fold(node.name, C, groups, size_free=free, scale=scale)


def _contribution(run, Z: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``run(Z) - run(0)`` and the largest magnitude of the two (the scale of its rounding)."""
    with torch.no_grad():
        with_z, without = run(Z), run(torch.zeros_like(Z))
    scale = max(float(with_z.abs().max()), float(without.abs().max())) if with_z.numel() else 0.0
    return with_z - without, scale


def _size_free(C: torch.Tensor, scale: float, spec: Any, run, constants: torch.Tensor,
               X: torch.Tensor, d: int, idx: torch.Tensor) -> bool:
    """Is ``C`` one value per output channel whatever the size of the other dims?

    Where the input has no dim but the batch (dim 0) and the contracted one (a Linear on
    ``(B, C)``), nothing can change size but the batch: one vector at the traced size is
    enough. Otherwise uniform at the traced size is not enough: a zero-padded conv traced at
    1x1 sees only the centre of its kernel everywhere, and another size has positions that
    see all of it. So ``C`` is computed again at a larger size of every dim but the
    contracted one (2s+3: inner and border positions of every kind) and a batch of one; both
    must give the same vector (up to rounding, :func:`rounding_tolerance`)."""
    od = spec.out_dim % C.dim()
    here = _constant_except(C, od, rounding_tolerance(C.dtype) * scale)
    if here is None:
        return False
    if all(i in (0, d) for i in range(X.dim())):
        return True
    shape = [X.shape[i] if i == d else 1 if i == 0 else 2 * X.shape[i] + 3
             for i in range(X.dim())]
    Z = torch.zeros(shape, dtype=X.dtype, device=X.device)
    view = [1] * X.dim()
    view[d] = len(idx)
    Z.index_copy_(d, idx, constants.to(X.dtype).reshape(view).expand(
        [len(idx) if i == d else s for i, s in enumerate(shape)]).contiguous())
    try:
        bigger, bigger_scale = _contribution(run, Z)
    except Exception:  # noqa: BLE001 - no answer at another size: keep the guarded map
        return False
    tol = rounding_tolerance(C.dtype) * max(scale, bigger_scale)
    there = _constant_except(bigger, od, tol) if bigger.dim() == C.dim() else None
    if there is None or there.shape != here.shape:
        return False
    return float((there - here).abs().max()) <= tol


def _param(gm: fx.GraphModule, n: fx.Node) -> torch.Tensor:
    if n.op == "get_attr":
        return get_tensor(gm, str(n.target)).detach()
    raise FoldError(f"cannot fold into {n.format_node()}: operand is not a weight")


def apply_folds(gm: fx.GraphModule, folds: list[Fold], keep: Mapping[int, Sequence[int]]) -> list[str]:
    """Add each contribution to its consumer (bias, or a constant after the op). Call after
    :func:`etp_fx.rewrite.rewrite_module`; returns one line per fold for the report."""
    r = RewriteContext(keep)
    nodes = {n.name: n for n in gm.graph.nodes}
    lines = []
    for i, f in enumerate(folds):
        node = nodes[f.node]
        spec = lookup(node).fold(node)
        C = slice_tensor(f.contribution, node.meta["etp_dims"], r)
        od = spec.out_dim % C.dim()
        per_channel = channel_constant(f, C, od)
        groups = ", ".join(f.groups)
        if per_channel is not None and spec.bias is not None:
            _add_to_bias(gm, node, spec.bias, per_channel, i)
            lines.append(f"{f.node}: constants of {groups} folded into the bias")
        elif per_channel is not None:  # no bias to fold into: one value per channel
            shape = [C.shape[k] if k == od else 1 for k in range(C.dim())]
            _add_constant(gm, node, per_channel.reshape(shape).contiguous(), i, f)
            lines.append(f"{f.node}: constants of {groups} added per channel")
        else:
            _add_guarded_map(gm, node, C, i, f)
            lines.append(f"{f.node}: constants of {groups} added as a constant map "
                         f"(position-dependent, e.g. zero padding; valid at the traced size only)")
    gm.graph.lint()
    gm.recompile()
    return lines


def channel_constant(f: Fold, C: torch.Tensor, out_dim: int) -> torch.Tensor | None:
    """The fold's contribution ``C`` (at the kept widths) as one value per channel of dim
    ``out_dim``, or None when it is a map: it differs by position (up to rounding), or
    :func:`plan_folds` found it would at another input size."""
    if not f.size_free:
        return None
    return _constant_except(C, out_dim, rounding_tolerance(C.dtype) * f.scale)


def _meta_val(node: fx.Node, shape: Sequence[int], dtype: torch.dtype) -> Any:
    """What the pass puts in an added node's ``meta["val"]``: the shape and dtype ``node``
    had at the trace (its own ``val``, symbolic sizes and all), else a meta tensor of
    ``shape``."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dtype == dtype:
        return val
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _add_constant(gm: fx.GraphModule, node: fx.Node, const: torch.Tensor, i: int,
                  f: Fold) -> fx.Node:
    """``node + const`` in the graph (``const`` a new buffer); returns the add node."""
    name = f"_etp_fold_{i}"
    # a copy with its own storage: a view would keep all of the full-width tensor alive
    gm.register_buffer(name, const.clone(memory_format=torch.contiguous_format))
    with gm.graph.inserting_after(node):
        attr = gm.graph.get_attr(name)
    with gm.graph.inserting_after(attr):
        add = gm.graph.call_function(torch.ops.aten.add.Tensor, (node, attr))
    node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
    add.meta["etp_dims"] = node.meta["etp_dims"]
    attr.meta["etp_dims"] = None
    attr.meta["val"] = torch.empty_like(const, device="meta")
    # node + const has node's shape at the trace (the full-width contribution's shape)
    add.meta["val"] = _meta_val(node, f.contribution.shape,
                                torch.promote_types(f.contribution.dtype, const.dtype))
    return add


def _add_guarded_map(gm: fx.GraphModule, node: fx.Node, C: torch.Tensor, i: int,
                     f: Fold) -> None:
    """``node + C`` where ``C`` varies with position: exact at the traced size only, so the
    graph first checks that the consumer's output has that size (any batch, when the map's
    rows agree), and refuses another with a clear error instead of broadcasting ``C``."""
    # one map for every batch element: the constants do not depend on the input, so the rows
    # agree up to rounding (a BLAS may round two identical rows apart); a map with the traced
    # batch size would broadcast a batch of 1 up to it
    batch_free = C.dim() > 1 and _rows_agree(C, rounding_tolerance(C.dtype) * f.scale)
    add = _add_constant(gm, node, C[:1] if batch_free else C, i, f)
    traced = tuple(C.shape[1:]) if batch_free else tuple(C.shape)
    with gm.graph.inserting_before(add):
        guard = gm.graph.call_function(check_traced_size,
                                       (node, traced, batch_free, node.name, f.traced_inputs))
    add.replace_input_with(node, guard)
    guard.meta["etp_dims"] = node.meta["etp_dims"]
    guard.meta["val"] = _meta_val(node, f.contribution.shape, f.contribution.dtype)


def check_traced_size(y: torch.Tensor, traced: tuple, batch_free: bool, node: str,
                      traced_inputs: str) -> torch.Tensor:
    """``y`` itself, when it has the size a folded constant map was computed for.

    Put into a compressed graph before a position-dependent constant map (see the module
    docstring): at another size the map would broadcast to wrong values, or not fit.

    Raises
    ------
    InputError
        ``y`` has another size than at the trace (the batch, dim 0, may differ when
        ``batch_free``).
    """
    if isinstance(y, fx.Proxy):  # symbolic_trace (pickling a GraphModule retraces it): a node
        return y.tracer.create_proxy("call_function", check_traced_size,
                                     (y, traced, batch_free, node, traced_inputs), {})
    got = tuple(y.shape[1:]) if batch_free else tuple(y.shape)
    if len(got) != len(traced) or any(a != b for a, b in zip(got, traced)):
        want = ("(*, " + ", ".join(map(str, traced)) + ")") if batch_free else str(traced)
        raise InputError(
            f"this compressed model was made for inputs like {traced_inputs}: it adds a "
            f"position-dependent constant (e.g. removed units' biases seen through zero padding) "
            f"after node {node}, whose output had size {want} there, but here has "
            f"{tuple(y.shape)}. Compress again with example inputs of the size you will use, "
            f"or with keep_constants=False (removed units zeroed whole, nothing folded).")
    return y


def _rows_agree(C: torch.Tensor, tol: float) -> bool:
    """Is ``C`` the same along dim 0, up to ``tol`` (rounding)?"""
    return float((C - C[:1]).abs().max()) <= tol


def _constant_except(C: torch.Tensor, d: int, tol: float) -> torch.Tensor | None:
    """The vector along dim ``d`` if ``C`` is the same, up to ``tol`` (rounding), at every
    other index, else None."""
    moved = C.movedim(d, 0).reshape(C.shape[d], -1)
    first = moved[:, :1]
    if float((moved - first).abs().max()) <= tol:
        return first[:, 0].clone()
    return None


def _add_to_bias(gm: fx.GraphModule, node: fx.Node, bi: int, vec: torch.Tensor, i: int) -> None:
    args = list(node.args)
    while len(args) <= bi:
        args.append(None)
    b = args[bi]
    if isinstance(b, fx.Node) and b.op == "get_attr":
        old = _param(gm, b)
        set_tensor(gm, str(b.target), (old + vec.to(old.dtype)).contiguous())
        return
    name = f"_etp_bias_{i}"
    gm.register_parameter(name, torch.nn.Parameter(vec.contiguous(), requires_grad=True))
    with gm.graph.inserting_before(node):
        args[bi] = gm.graph.get_attr(name)
    args[bi].meta["etp_dims"] = None
    args[bi].meta["val"] = torch.empty_like(vec, device="meta")
    node.args = tuple(args)
