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
from typing import Any

import torch
import torch.fx as fx

from ..errors import InputError, TraceError
from .fast import fast_capture
from .inputs import describe_inputs, eval_mode

__all__ = ["capture", "batch_dynamic_shapes"]










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
        with torch.no_grad():
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


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            *, check_inputs: bool = True, dynamic_batch: bool = False,
            method: str = "auto") -> fx.GraphModule:
    """Export ``model`` on the example inputs and return the ATen-level graph module.

    ``method="auto"`` first tries the fast path (:mod:`etp_fx.fxcapture`: ``symbolic_trace``
    lowered to the same ATen calls, for models built from the modules and functions it
    knows) and uses ``torch.export`` for everything else; ``"export"`` always exports. The
    environment variable ``ETP_FX_CAPTURE=export`` forces export everywhere.

    Parameters live in the returned module under their original qualified names (as
    ``get_attr`` nodes); every node carries ``meta["val"]``, a fake tensor with its shape.
    The model is left as it was: same parameters, same train/eval mode of every submodule.
    With ``dynamic_batch``, dim 0 of the inputs stays symbolic (sizes in ``meta`` are the
    example's).
    """
    kwargs = dict(kwargs or {})
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"etp_fx needs a torch.nn.Module, got {type(model).__name__}")
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.device.type == "meta":
            check_inputs = False  # a meta model cannot run eagerly; export still checks shapes
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    # a lazy module (nn.LazyLinear, ...) gets its parameters on its first call: run it eagerly
    # first, as always; otherwise the eager run only explains an export failure (below)
    lazy = any(isinstance(p, torch.nn.parameter.UninitializedParameter)
               for p in model.parameters()) or any(
        isinstance(b, torch.nn.parameter.UninitializedBuffer) for b in model.buffers())
    if method not in ("auto", "export"):
        raise ValueError(f"capture method must be 'auto' or 'export', got {method!r}")
    fallback = "ETP_FX_CAPTURE=export" if os.environ.get("ETP_FX_CAPTURE") == "export" else (
        "method='export'" if method == "export" else "meta-device parameters" if on_meta
        else "lazy modules" if lazy else None)
    with eval_mode(model):
        if fallback is None:
            gm, fallback = fast_capture(model, args, kwargs, dynamic_batch=dynamic_batch)
            if gm is not None:
                return gm
        if lazy and check_inputs and not on_meta:
            _check_runs(model, args, kwargs)
            check_inputs = False
        try:
            dyn = batch_dynamic_shapes(model.forward, args, kwargs) if dynamic_batch else None
            ep = _export(model, args, kwargs, dyn)
        except Exception as e:  # noqa: BLE001 - re-raised with advice
            # only now run the model eagerly: when it does not run on these inputs either, the
            # inputs are wrong, and the eager error names the module (an InputError)
            if check_inputs and not on_meta:
                _check_runs(model, args, kwargs)
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
                f"  at {_user_frame(e)}\n"
                f"What to try: make data-dependent Python control flow depend on shapes only, "
                f"replace .item()/.tolist() on tensors, or wrap the offending layer as a "
                f"torch.library custom op and register an etp_fx rule for it "
                f"(docs/rules.md).") from e
    gm = ep.module()
    gm.meta["etp_capture"] = "export"
    gm.meta["etp_capture_fast_path"] = fallback  # why the fast path was not taken
    return gm
