"""Which input dims a capture keeps symbolic, and why the others are pinned.

``capture(..., dynamic="auto")`` asks torch.export to keep every dim of every tensor input
symbolic where the model's code allows (``Dim.AUTO``): the batch, a sequence length, an image
size, the node and edge counts of a graph. The model's code decides what stays: a view to a
fixed shape, a weight multiplied with a dim, a position table of fixed length each pin a dim
to the example's size. After the export, :func:`read_dims` records in the capture's meta

- ``meta["etp_dynamic_dims"]``: ``{input: {dim: "dynamic" | "static"}}`` for every tensor
  input (``"input_ids"``, ``"x[0]"`` for a tensor inside a tuple input); a fast-path capture
  that reads no size says ``"generic"`` for every dim (the graph runs at every size its ops
  accept, which it does not check itself);
- ``meta["etp_pinned_dims"]``: ``{input: {dim: why}}`` for every dim that was asked to vary
  and did not, e.g. ``"pinned to 16 in module blocks.0 (Block): a view, reshape or
  broadcast"``. A dim of size 0 or 1 is always pinned (torch.export specialises those sizes):
  trace it at 2 or more to keep it dynamic.

:class:`PinWatch` finds the module: forward hooks note which module was running when the
shape environment replaced an input's symbol by a number.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode

from ..errors import OptionError
from .calls import bound_inputs

__all__ = ["DYNAMIC_MODES", "check_dynamic", "dynamic_shapes_for", "input_names", "PinWatch",
           "read_dims", "generic_dims", "another_shape", "shapes_from_dims", "concrete_size"]

#: what ``capture(dynamic=...)`` takes besides an explicit ``dynamic_shapes`` spec
DYNAMIC_MODES = ("auto", "batch", None)
_SOURCE = re.compile(r"^(?P<base>.*)\.size\(\)\[(?P<dim>\d+)\]$")
# torch functions where a size gets pinned, in words (the rest are named as they are)
_OPS = {"meta_mm": "a matrix multiply (a Linear layer, say)", "meta_bmm": "a batched matmul",
        "infer_size": "a view, reshape or broadcast", "meta_addmm": "a matrix multiply",
        "_reshape_view_helper": "a view or reshape", "view": "a view",
        "conv": "a convolution (its weight's input channels)",
        "__torch_function__": "a check on sizes in the model's code (an assert or comparison)"}


def check_dynamic(dynamic: Any) -> None:
    """Refuse a ``dynamic`` option that is none of ``"auto"``, ``"batch"``, None or a spec."""
    if dynamic in DYNAMIC_MODES or isinstance(dynamic, (dict, tuple, list)):
        return
    raise OptionError(f"dynamic must be 'auto' (every input dim the model allows), 'batch' "
                      f"(dim 0 only), None (the example's shapes) or a torch.export "
                      f"dynamic_shapes spec (a dict by input name); got {dynamic!r}")


def _dims_spec(t: torch.Tensor, dynamic: str) -> dict | None:
    """``{dim: Dim.AUTO}`` for the dims of ``t`` to keep dynamic (sizes 0 and 1 excluded:
    torch.export specialises them anyway, with a warning)."""
    if not isinstance(t, torch.Tensor) or not t.dim():
        return None
    dims = [0] if dynamic == "batch" else range(t.dim())
    spec = {d: torch.export.Dim.AUTO for d in dims if t.shape[d] >= 2}
    return spec or None


def dynamic_shapes_for(fn: Any, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    """The ``dynamic_shapes`` for ``torch.export.export(fn, args, kwargs)``: None for static
    shapes, the spec itself when one is given, else ``Dim.AUTO`` on every dim (``"auto"``) or
    dim 0 (``"batch"``) of every tensor input, keyed by the forward's parameter names."""
    check_dynamic(dynamic)
    if dynamic is None or not isinstance(dynamic, str):
        return dynamic
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return {name: pytree.tree_map(lambda v: _dims_spec(v, dynamic), value)
            for name, value in bound.arguments.items()}


def input_names(fn: Any, args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor input in flattening order: the parameter's name,
    with the path inside a container (``"x[0]"``, ``"batch['mask']"``)."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    out = []
    for path, v in leaves:
        if not isinstance(v, torch.Tensor):
            continue
        where, key, rest = path[0], path[1], path[2:]
        if where.idx == 0:
            head = params[key.idx] if key.idx < len(params) else f"args[{key.idx}]"
        else:
            head = str(key.key)
        out.append((head + pytree.keystr(rest), v))
    return out


class PinWatch:
    """Forward hooks that remember, for every symbol the shape environment replaces while
    exporting, the innermost module that was running (pure bookkeeping: the graph is the
    same with or without them). Use as a context manager around the export."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self.where: dict[Any, str] = {}
        self.env: Any = None
        self.handles: list = []

    def __enter__(self) -> "PinWatch":
        for name, m in self.model.named_modules():
            label = f"{name or '<root>'} ({type(m).__name__})"
            self.handles.append(m.register_forward_pre_hook(self._pre(label)))
            self.handles.append(m.register_forward_hook(self._post(), always_call=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

    def _poll(self) -> None:
        if self.env is None:
            mode = detect_fake_mode()
            self.env = getattr(mode, "shape_env", None)
        replacements = getattr(self.env, "replacements", None)
        if not replacements or len(replacements) == len(self.where):
            return
        here = self.stack[-1] if self.stack else "<root>"
        for sym in replacements:
            self.where.setdefault(sym, here)

    def _pre(self, label: str):
        def hook(mod, args):
            self._poll()
            self.stack.append(label)
        return hook

    def _post(self):
        def hook(mod, args, out):
            self._poll()
            if self.stack:
                self.stack.pop()
        return hook

    def reason(self, env: Any, sym: Any, value: int) -> str:
        """Why symbol ``sym`` ended as ``value``: the module and the torch op."""
        seen = set()
        replacements = getattr(env, "replacements", {})
        while sym in replacements and sym not in seen:  # s1 -> s0 -> 16: the last link
            seen.add(sym)
            tgt = replacements[sym]
            if not getattr(tgt, "is_Symbol", False):
                break
            sym = tgt
        module = self.where.get(sym)
        sloc = getattr(env, "replacements_slocs", {}).get(sym)
        place = f" in module {module}" if module else ""
        return f"pinned to {value}{place}: {_what_pinned(getattr(sloc, 'framework_loc', None))}"


def _what_pinned(frame: Any) -> str:
    """The op (a torch function, in words) or the line of the model's code that pinned a
    size, from the frame the shape environment recorded."""
    name = getattr(frame, "name", None)
    filename = str(getattr(frame, "filename", "") or "")
    if not name:
        return "the model's code"
    if "/torch/" not in filename.replace("\\", "/"):  # the model's own code (a size check)
        short = "/".join(filename.replace("\\", "/").split("/")[-2:])
        return f"the model's code at {short}:{getattr(frame, 'lineno', '?')} (in {name})"
    return _OPS.get(name, f"torch's {name}")


def concrete_size(size: Any) -> int | None:
    """The size as an int, or None while it is symbolic (a SymInt the shape environment
    replaced by a number is concrete)."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    as_int = getattr(node, "maybe_as_int", None)
    return as_int() if as_int is not None else None


def _placeholder_vals(gm: fx.GraphModule) -> list:
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def _shape_env(vals: list) -> Any:
    for v in vals:
        mode = getattr(v, "fake_mode", None)
        if mode is not None and mode.shape_env is not None:
            return mode.shape_env
    return None


def _symbols_by_source(env: Any) -> dict[tuple[str, int], Any]:
    """``{(input source like "L['x'][0]", dim): symbol}`` from the shape environment."""
    out = {}
    for sym, sources in (getattr(env, "var_to_sources", None) or {}).items():
        for s in sources:
            m = _SOURCE.match(getattr(s, "name", "") if not callable(getattr(s, "name", None))
                              else s.name())
            if m:
                out.setdefault((m["base"], int(m["dim"])), sym)
    return out


def _source_base(name: str) -> str:
    """``"x[0]"`` -> ``"L['x'][0]"``: the name torch's shape environment gives an input."""
    head, bracket, rest = name.partition("[")
    return f"L['{head}']" + (bracket + rest if bracket else "")


def _named_placeholders(gm: fx.GraphModule) -> list[tuple[str, Any]]:
    """``(input name, meta value)`` of every tensor input, named through the module's input
    spec (positional inputs by the forward's parameter names)."""
    vals = _placeholder_vals(gm)
    spec = getattr(gm, "_in_spec", None)
    if spec is None or spec.num_leaves != len(vals):
        return []
    args, kwargs = pytree.tree_unflatten(vals, spec)
    return input_names(gm.forward, args, kwargs)


def read_dims(gm: fx.GraphModule, examples: dict[str, torch.Tensor], dynamic: Any,
              spec: Any, watch: PinWatch | None) -> tuple[dict, dict]:
    """``(etp_dynamic_dims, etp_pinned_dims)`` of an exported module (see the module doc).

    ``examples`` are the example tensors by input name (:func:`input_names`); ``dynamic``
    the mode asked for (``"auto"``: every dim, ``"batch"``: dim 0) and ``spec`` the
    ``dynamic_shapes`` given to torch.export (for an explicit spec, the dims it names)."""
    named = _named_placeholders(gm)
    env = _shape_env([v for _, v in named])
    symbols = _symbols_by_source(env)
    if isinstance(dynamic, str):
        asked = {name: set(range(t.dim())) if dynamic == "auto" else {0}
                 for name, t in examples.items() if t.dim()}
    else:
        asked = _asked_dims(spec)
    dynamic: dict[str, dict[int, str]] = {}
    pinned: dict[str, dict[int, str]] = {}
    for name, val in named:
        dynamic[name] = {}
        for d, size in enumerate(val.shape):
            size = concrete_size(size)
            dynamic[name][d] = "dynamic" if size is None else "static"
            if size is None or d not in asked.get(name, ()):
                continue
            example = examples.get(name)
            if example is not None and example.shape[d] <= 1:
                why = (f"size {example.shape[d]}: torch.export specialises sizes 0 and 1; "
                       f"trace with 2 or more to keep it dynamic")
            else:
                sym = symbols.get((_source_base(name), d))
                why = watch.reason(env, sym, size) if watch is not None and sym is not None \
                    else f"pinned to {size} by the model's code"
            pinned.setdefault(name, {})[d] = why
    return dynamic, pinned


def _asked_dims(requested: Any) -> dict[str, set[int]]:
    """The dims each input was asked to keep dynamic: the dims a spec keyed by input name
    names (``{"x": {0: Dim.AUTO}}``, ``{"pair": ({0: ...}, None)}``)."""
    if not isinstance(requested, dict):
        return {}
    out: dict[str, set[int]] = {}
    leaves, _ = pytree.tree_flatten_with_path(
        requested, is_leaf=lambda x: isinstance(x, dict) and all(isinstance(k, int) for k in x))
    for path, spec in leaves:
        if isinstance(spec, dict) and path:
            name = str(path[0].key) + pytree.keystr(path[1:])
            out[name] = {d for d, v in spec.items() if v is not None}
    return out


def generic_dims(names: list[tuple[str, Any]], generic: bool) -> dict:
    """``etp_dynamic_dims`` of a fast-path capture: a graph that reads no size runs at every
    size its ops accept (each dim ``"generic"``: a conv still fixes its input channels); one
    that reads sizes has them baked in (``"static"``)."""
    state = "generic" if generic else "static"
    return {name: {d: state for d in range(t.dim())} for name, t in names}


def shapes_from_dims(fn: Any, args: tuple, kwargs: dict, dims: dict) -> dict:
    """A ``dynamic_shapes`` spec with ``Dim.AUTO`` on exactly the dims ``dims`` (an
    ``etp_dynamic_dims`` record) marks dynamic or generic, for exporting a capture again
    (dim 0 of an input the record does not name)."""
    named = dict(input_names(fn, args, kwargs))
    spec: dict[str, dict] = {}
    for name in named:
        marks = dims.get(name, {0: "dynamic"})  # an input it has no record of: its batch
        spec[name] = {int(d): torch.export.Dim.AUTO for d, s in marks.items()
                      if s in ("dynamic", "generic") and named[name].shape[int(d)] >= 2} or None
    bound = inspect.signature(fn).bind(*args, **kwargs)
    return {p: _nest(p, value, spec) for p, value in bound.arguments.items()}


def _nest(prefix: str, value: Any, spec: dict) -> Any:
    """The spec entries of input ``prefix`` in the shape of its value (tensor or container)."""
    leaves, tree = pytree.tree_flatten_with_path(value)
    return pytree.tree_unflatten(
        [spec.get(prefix + pytree.keystr(path)) if isinstance(v, torch.Tensor) else None
         for path, v in leaves], tree)


def another_shape(gm: fx.GraphModule, args: tuple, kwargs: dict, step: int = 1, *,
                  batch: bool = True) -> tuple[tuple, dict]:
    """Inputs for ``gm`` with every dim its capture keeps dynamic grown by ``step`` (by
    repeating the last slice, so ids, masks and edge indices stay valid), for checking a
    result at a shape it was not traced at. The inputs come back in the form the graph takes
    (:func:`etp_fx.capture.calls.bound_inputs`: by name, optional masks filled in), which the
    original model accepts too. Dims that vary together (the sequence length of ids and
    mask) grow together. With no dynamic dim, the inputs come back unchanged. With
    ``batch=False``, dim 0 keeps its size (for inputs already drawn at another batch)."""
    args, kwargs = bound_inputs(gm, args, kwargs)
    dims = gm.meta.get("etp_dynamic_dims") or {}
    grow = {id(t): [int(d) for d, s in dims.get(name, {}).items()
                    if s == "dynamic" and (batch or int(d) != 0)]
            for name, t in input_names(gm.forward, args, kwargs)}

    def one(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        for d in grow.get(id(t), ()):
            last = t.narrow(d, t.shape[d] - 1, 1)
            t = torch.cat([t] + [last] * step, dim=d)
        return t
    return pytree.tree_map(one, (tuple(args), dict(kwargs)))
