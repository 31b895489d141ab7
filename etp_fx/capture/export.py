"""Capture a model as an ATen-level ``torch.fx.GraphModule`` with shapes on every node.

We use ``torch.export.export(..., strict=False)`` as the one canonical IR (see
``docs/design.md``): it traces Hugging Face transformers 5.x, PyTorch Geometric layers and
shape-dependent Python code that ``torch.fx.symbolic_trace`` cannot, it works on parameters that
live on the ``meta`` device, and it lowers every ``nn.Module``, ``F.*`` call and tensor method to
one small vocabulary of ATen ops, so the rule table needs one entry per op instead of three.
"""
from __future__ import annotations

import inspect
import os
import traceback
import types
from typing import Any

import torch
import torch.fx as fx

from ..errors import InputError, ModelError, TraceError
from .fast import fast_capture
from .inputs import describe_inputs, eval_mode, untouched

__all__ = ["capture", "batch_dynamic_shapes", "as_plain_module"]


class _WhereFailed:
    """Forward pre-hooks that remember the innermost module running when an error is raised."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._pre(name)))
            self.handles.append(m.register_forward_hook(self._post()))

    def _pre(self, name: str):
        def hook(mod, args):
            self.stack.append(f"{name or '<root>'} ({type(mod).__name__})")
        return hook

    def _post(self):
        def hook(mod, args, out):
            if self.stack:
                self.stack.pop()
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _check_runs(model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Run the model once on the example inputs to turn a shape error into a clear message."""
    where = _WhereFailed(model)
    try:
        # the model really runs: a counter or BatchNorm statistics it updates are put back
        with untouched(model), torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - we re-raise with context
        module = where.stack[-1] if where.stack else "<root>"
        raise InputError(
            f"the model does not run on the example inputs {describe_inputs(args, kwargs)}: in module "
            f"{module}: {type(e).__name__}: {str(e).strip().splitlines()[0]}\n"
            f"Give example inputs of the shape and dtype the model expects (for an image model "
            f"typically torch.randn(1, 3, H, W)).") from e
    finally:
        where.close()


def _user_frame(exc: BaseException) -> str:
    """The innermost source line outside torch that the error passed through."""
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if "/torch/" not in f.filename and "/etp_fx/" not in f.filename:
            return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"
    return "<unknown source line>"


def batch_dynamic_shapes(fn: Any, args: tuple, kwargs: dict) -> dict:
    """A ``dynamic_shapes`` spec that lets dim 0 of every tensor input vary (``Dim.AUTO``:
    export keeps it symbolic where the code allows, and specialises it where it does not)."""
    import torch.utils._pytree as pytree
    bound = inspect.signature(fn).bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        spec[name] = pytree.tree_map(
            lambda v: {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None,
            value)
    return spec


def _export(model: torch.nn.Module, args: tuple, kwargs: dict, dyn: Any):
    """``torch.export.export`` without recording a Python stack trace for every node: etp_fx
    never reads ``node.meta["stack_trace"]``, and symbolising one per node costs 10-25% of an
    export. Messages about a node use its ATen call (``node.format_node()``)."""
    import torch.fx.config as fx_config
    before = getattr(fx_config, "do_not_emit_stack_traces", None)
    if before is None:  # an older torch without the switch
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    fx_config.do_not_emit_stack_traces = True
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    finally:
        fx_config.do_not_emit_stack_traces = before


def as_plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Make a module from ``ExportedProgram.module()`` behave like any ``nn.Module`` (in place).

    torch.export returns modules whose ``train()`` and ``eval()`` raise
    ``NotImplementedError`` and whose lifted constants are plain tensor attributes (which
    ``.to()`` leaves behind). After this call:

    - ``.train()`` and ``.eval()`` set the flags and nothing else (the flags start in eval).
      **The graph computes eval-mode semantics whatever the flag says**: it was captured in
      eval mode, so BatchNorm normalises with its running statistics (training does not
      update them) and dropout is off. ``meta["etp_mode"]`` records this as ``"eval"``.
    - ``.to(dtype)`` and ``.to(device)`` move the weights and the constants (now
      non-persistent buffers); ops in the graph that name a dtype or device keep it.
    - ``state_dict()`` holds the same keys as the exported program's (constants are not
      saved).

    Parameters
    ----------
    gm : torch.fx.GraphModule
        From ``ExportedProgram.module()`` or :func:`etp_fx.load` (calling it again, or on
        another graph module, changes nothing but plain tensor attributes into non-persistent
        buffers); anything that is not a graph module is returned as it is.

    Returns
    -------
    torch.fx.GraphModule
        ``gm`` itself.
    """
    if not isinstance(gm, fx.GraphModule):
        return gm
    overrides = [n for n in ("train", "eval") if isinstance(vars(gm).get(n), types.MethodType)]
    for name in overrides:  # the instance overrides that raise
        del gm.__dict__[name]
    for m in gm.modules():
        if overrides:  # fresh from torch.export: the flags start as what the graph computes
            m.training = False
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                del m.__dict__[name]
                m.register_buffer(name, value, persistent=False)
    gm.meta["etp_mode"] = "eval"
    return gm


def _own_written_state(gm: fx.GraphModule) -> None:
    """Give the graph its own copy of every tensor it writes to in place (a counter buffer).

    ``ep.module()`` holds the model's own tensors, so running a graph with ``aten.add_`` on a
    buffer would change the user's model."""
    written: set[int] = set()
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and \
                    isinstance(value, fx.Node) and value.op == "get_attr":
                written.add(id(_attr(gm, str(value.target))))
    if not written:
        return
    copies: dict[int, torch.Tensor] = {}
    for m in gm.modules():
        for slot in (m._parameters, m._buffers):
            for name, t in slot.items():
                if t is not None and id(t) in written:
                    if id(t) not in copies:
                        c = t.detach().clone()
                        copies[id(t)] = (torch.nn.Parameter(c, t.requires_grad)
                                         if isinstance(t, torch.nn.Parameter) else c)
                    slot[name] = copies[id(t)]


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner), name)


def _fast_path_off(method: str, on_meta: bool, lazy: bool) -> str | None:
    """Why the fast path is not even tried, or None."""
    if method not in ("auto", "export"):
        raise InputError(f"capture method must be 'auto' or 'export', got {method!r}")
    if os.environ.get("ETP_FX_CAPTURE") == "export":
        return "ETP_FX_CAPTURE=export"
    return ("method='export'" if method == "export" else "meta-device parameters" if on_meta
            else "lazy modules" if lazy else None)


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            *, check_inputs: bool = True, dynamic_batch: bool = False,
            method: str = "auto") -> fx.GraphModule:
    """Export ``model`` on the example inputs and return the ATen-level graph module.

    ``method="auto"`` first tries the fast path (:mod:`etp_fx.capture.fast`: ``symbolic_trace``
    lowered to the same ATen calls, for models built from the modules and functions it
    knows, without forward hooks) and uses ``torch.export`` for everything else; ``"export"``
    always exports. The environment variable ``ETP_FX_CAPTURE=export`` forces export
    everywhere. ``meta["etp_capture_fast_path"]`` of an exported result says why the fast path
    was not taken.

    Parameters live in the returned module under their original qualified names (as
    ``get_attr`` nodes); every node carries ``meta["val"]``, a fake tensor with its shape.
    The model is left as it was (:func:`untouched`): same parameters and buffer values (a
    counter its forward updates, BatchNorm statistics), same train/eval mode of every
    submodule, same hooks. An exported result is made a plain module
    (:func:`as_plain_module`: it computes eval-mode semantics). With ``dynamic_batch``, dim 0
    of the inputs stays symbolic (sizes in ``meta`` are the example's).
    """
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"etp_fx needs a torch.nn.Module as the model, got {type(model).__name__}")
    if any(isinstance(v, torch.Tensor) and v.device.type == "meta"
           for v in list(args) + list(kwargs.values())):
        check_inputs = False  # a meta model cannot run eagerly; export still checks shapes
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    # a lazy module (nn.LazyLinear, ...) gets its parameters on its first call: run it eagerly
    # first, as always; otherwise the eager run only explains an export failure
    lazy = any(isinstance(t, torch.nn.parameter.UninitializedTensorMixin)
               for t in list(model.parameters()) + list(model.buffers()))
    fallback = _fast_path_off(method, on_meta, lazy)
    with eval_mode(model):
        if fallback is None:
            gm, fallback = fast_capture(model, args, kwargs, dynamic_batch=dynamic_batch)
            if gm is not None:
                return gm
        # export reads parameters as fake tensors: only buffers need a copy to restore
        with untouched(model, copy_parameters=False):
            if lazy and check_inputs and not on_meta:
                _check_runs(model, args, kwargs)
                check_inputs = False
            ep = _export_explained(model, args, kwargs, dynamic_batch,
                                   check_inputs and not on_meta)
    gm = as_plain_module(ep.module())
    _own_written_state(gm)
    gm.meta["etp_capture"] = "export"
    gm.meta["etp_capture_fast_path"] = fallback  # why the fast path was not taken
    return gm


def _export_explained(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool,
                      check_inputs: bool) -> Any:
    """``torch.export`` of the model, or a :class:`TraceError` (an :class:`InputError` when
    the model does not run eagerly on the inputs either) that says where and what to try."""
    try:
        dyn = batch_dynamic_shapes(model.forward, args, kwargs) if dynamic_batch else None
        return _export(model, args, kwargs, dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        # only now run the model eagerly: when it does not run on these inputs either, the
        # inputs are wrong, and the eager error names the module (an InputError)
        if check_inputs:
            _check_runs(model, args, kwargs)
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
            f"  at {_user_frame(e)}\n"
            f"What to try: make data-dependent Python control flow depend on shapes only, "
            f"replace .item()/.tolist() on tensors, or wrap the offending layer as a "
            f"torch.library custom op and register an etp_fx rule for it "
            f"(docs/rules.md).") from e
