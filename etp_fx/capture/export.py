"""Capture a model as an ATen-level ``torch.fx.GraphModule`` with shapes on every node.

We use ``torch.export.export(..., strict=False)`` as the one canonical IR (see
``docs/design.md``): it traces Hugging Face transformers 5.x, PyTorch Geometric layers and
shape-dependent Python code that ``torch.fx.symbolic_trace`` cannot, it works on parameters that
live on the ``meta`` device, and it lowers every ``nn.Module``, ``F.*`` call and tensor method to
one small vocabulary of ATen ops, so the rule table needs one entry per op instead of three.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import InputError, ModelError, TraceError
from .calls import CallForm, attach_binder, bind_call, call_form_for, filler, with_fillers
from .compare import outputs_agree
from .dynamic import (PinWatch, check_dynamic, dynamic_shapes_for, generic_dims, input_names,
                      read_dims)
from .fast import fast_capture
from .inputs import describe_inputs, eval_mode, untouched
from .plain import as_plain_module

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
    return dynamic_shapes_for(fn, args, kwargs, "batch")


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


_UNSET = object()


def _dynamic_option(dynamic: Any, dynamic_batch: bool) -> Any:
    """``dynamic`` as given, or from the older ``dynamic_batch`` switch: True asks for a
    result for every size the model allows (``"auto"``), False for the example's shapes."""
    if dynamic is _UNSET:
        dynamic = "auto" if dynamic_batch else None
    check_dynamic(dynamic)
    return dynamic


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
            *, check_inputs: bool = True, dynamic_batch: bool = False,
            dynamic: Any = _UNSET, method: str = "auto") -> fx.GraphModule:
    """Capture ``model`` on the example inputs as an ATen-level graph module.

    Parameters
    ----------
    model : torch.nn.Module
        Left as it was (:func:`untouched`): weights, buffers, flags, hooks, HF config.
    args, kwargs : tuple, dict
        Example inputs, in any form the model's forward accepts.
    check_inputs : bool
        When the export fails, run the model eagerly to tell wrong inputs (an
        :class:`InputError` naming the module) from a model torch.export cannot trace.
    dynamic : {"auto", "batch", None} or dict
        Input dims the result accepts at other sizes: ``"auto"``, every dim the model's
        code allows (batch, sequence length, image size, node and edge counts); ``"batch"``,
        dim 0; None, the example's shapes; or a ``dynamic_shapes`` spec by parameter name.
        ``meta["etp_dynamic_dims"]`` and ``["etp_pinned_dims"]`` record the outcome and why
        (:mod:`.dynamic`). Not given: ``dynamic_batch`` decides (True is ``"auto"``).
    method : {"auto", "export"}
        ``"auto"`` tries the fast path first (:mod:`.fast`: CNNs built from known modules,
        no hooks), ``"export"`` always exports (so does ``ETP_FX_CAPTURE=export``);
        ``meta["etp_capture_fast_path"]`` says why the fast path was not taken.

    Returns
    -------
    torch.fx.GraphModule
        Parameters under their original names (``get_attr`` nodes), ``meta["val"]`` (a fake
        tensor with its shape) on every node. An exported result is a plain module
        (:func:`as_plain_module`: eval-mode semantics) that accepts the original's call
        forms (:mod:`.calls`: positional or keyword, an attention mask or none);
        ``meta["etp_capture_notes"]`` says what the capture fixed, e.g. ``use_cache=False``.
    """
    # a non-contiguous example (a slice such as ids[:, :8]) makes export guard on its strides,
    # so the result would refuse every ordinary tensor: capture on contiguous copies
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(),
                                        (tuple(args), dict(kwargs or {})))
    dynamic = _dynamic_option(dynamic, dynamic_batch)
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
            gm, fallback = fast_capture(model, args, kwargs, dynamic_batch=dynamic is not None)
            if gm is not None:
                return _fast_meta(gm, model, args, kwargs, dynamic)
        gm = _exported(model, args, kwargs, dynamic, check_inputs and not on_meta,
                       lazy and check_inputs and not on_meta)
    gm.meta["etp_capture_fast_path"] = fallback  # why the fast path was not taken
    return gm


def _exported(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any,
              check_inputs: bool, run_first: bool) -> fx.GraphModule:
    """The export capture: a plain module with its own written state, its dims record and
    its call binder. ``run_first``: run the model eagerly before (a lazy module)."""
    # export reads parameters as fake tensors: only buffers need a copy to restore
    with untouched(model, copy_parameters=False):
        if run_first:
            _check_runs(model, args, kwargs)
            check_inputs = False
        job = _ExportJob(model, args, kwargs, dynamic, check_inputs)
        ep = job.run()
    gm = ep.module()
    for key in [k for k in gm.meta if k.startswith("etp_")]:
        # torch.export copies the meta of the module exported: a capture of a compressed
        # result would inherit its report, its inputs and its capture's verdicts
        del gm.meta[key]
    gm = as_plain_module(gm)
    _own_written_state(gm)
    job.record(gm)
    gm.meta["etp_capture"] = "export"
    return gm


def _fast_meta(gm: fx.GraphModule, model: torch.nn.Module, args: tuple, kwargs: dict,
               dynamic: Any) -> fx.GraphModule:
    """The dims record of a fast-path capture (it reads no size when dynamic was asked)."""
    names = input_names(gm.forward, args, kwargs)  # the graph's names (input -> input_1)
    gm.meta["etp_dynamic"] = dynamic if isinstance(dynamic, str) or dynamic is None else "spec"
    gm.meta["etp_dynamic_dims"] = generic_dims(names, bool(gm.meta.get("etp_batch_generic")))
    gm.meta["etp_pinned_dims"] = {}
    gm.meta["etp_capture_notes"] = []
    gm.meta["etp_mode"] = "eval"
    return gm


class _ExportJob:
    """One torch.export of a model: the call form it is exported in (inputs by name, constants
    such as ``use_cache=False`` injected, neutral masks added), the dynamic dims asked for
    (with a fallback to fewer when the model's code refuses them), and the record of both."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: Any,
                 check_inputs: bool) -> None:
        self.model, self.args, self.kwargs = model, args, kwargs
        self.dynamic, self.check_inputs = dynamic, check_inputs
        # a module etp_fx captured before keeps its form: its graph takes exactly those inputs
        inherited = getattr(model, "meta", {}).get("etp_call") if \
            isinstance(getattr(model, "meta", None), dict) else None
        self.inherited = isinstance(inherited, CallForm)
        self.form = inherited if self.inherited else self._form()
        self.call = (args, kwargs) if self.form is None else \
            ((), bind_call(self.form, args, kwargs))
        self.spec: Any = None
        self.exported_with: Any = None  # the dynamic mode of the export that succeeded
        self.watch: PinWatch | None = None
        self.notes: list[str] = []

    def _form(self) -> CallForm | None:
        """The call form, with the mask fillers that give the model's own output."""
        form = call_form_for(self.model, self.args, self.kwargs)
        if form is None or not form.fillers:
            return form
        kept = {}
        if self.check_inputs:
            named = bind_call(with_fillers(form, {}), self.args, self.kwargs)
            kept = _fillers_that_agree(self.model, form, named)
        return with_fillers(form, kept)

    def run(self) -> Any:
        """Export at the dims asked for; ``"auto"`` falls back to ``"batch"``, then to static
        shapes, when the model's code refuses to trace with them symbolic."""
        tries = [self.dynamic] + ([d for d in ("batch", None) if d != self.dynamic]
                                  if self.dynamic == "auto" else [])
        for k, dynamic in enumerate(tries):
            last = k == len(tries) - 1
            try:
                return self._export(dynamic, explain=last)
            except TraceError as e:
                if last:
                    raise
                self.notes.append(f"dynamic={dynamic!r} could not be traced "
                                  f"({str(e).splitlines()[0]}); captured with "
                                  f"dynamic={tries[k + 1]!r}")
        raise AssertionError("unreachable")

    def _export(self, dynamic: Any, explain: bool) -> Any:
        args, kwargs = self.call
        self.exported_with = dynamic
        self.spec = _spec_for(self.model, self.form, args, kwargs, dynamic)
        inject = None if self.inherited else self.form
        with _injected(self.model, inject), PinWatch(self.model) as self.watch:
            return _export_explained(self.model, args, kwargs, self.spec,
                                     self.check_inputs and explain, self.args, self.kwargs)

    def record(self, gm: fx.GraphModule) -> None:
        """What the capture fixed, which dims stayed dynamic, and the call binder."""
        examples = dict(input_names(self.model.forward, *self.call))
        dims, pinned = read_dims(gm, examples, self.exported_with, self.spec, self.watch)
        gm.meta["etp_dynamic"] = self.dynamic if isinstance(self.dynamic, str) or \
            self.dynamic is None else "spec"
        gm.meta["etp_dynamic_dims"], gm.meta["etp_pinned_dims"] = dims, pinned
        if self.form is not None:
            if self._without_cache():
                gm.meta["etp_use_cache"] = False
                self.notes.append("captured with use_cache=False: the graph computes the "
                                  "outputs without a key/value cache")
            for name in self.form.fillers:
                self.notes.append(f"{name} is an input of the graph (ones when left out)")
            attach_binder(gm, self.form)
        gm.meta["etp_capture_notes"] = self.notes

    def _without_cache(self) -> bool:
        """Did etp_fx (not the user) turn the key/value cache off?"""
        if self.inherited:
            return self.model.meta.get("etp_use_cache") is False
        given = call_form_for(self.model, self.args, self.kwargs, inject_use_cache=False)
        return self.form.constants.get("use_cache") is False and \
            given is not None and "use_cache" not in given.constants


def _spec_for(model: torch.nn.Module, form: CallForm | None, args: tuple, kwargs: dict,
              dynamic: Any) -> Any:
    """The ``dynamic_shapes`` for exporting ``model`` on ``(args, kwargs)``; a positional spec
    given for a model exported by keyword is keyed by the forward's parameter names."""
    if isinstance(dynamic, (tuple, list)) and form is not None:
        dynamic = {n: s for n, s in zip(form.names, dynamic) if n in kwargs}
    return dynamic_shapes_for(model.forward, args, kwargs, dynamic)


@contextlib.contextmanager
def _injected(model: torch.nn.Module, form: CallForm | None) -> Iterator[None]:
    """While exporting, add the form's constants (``use_cache=False``) to the model's call,
    so that the exported signature holds only the tensor inputs. Removed afterwards."""
    if form is None or not form.constants:
        yield
        return

    def add_constants(module, args, kwargs):
        return args, {**form.constants, **kwargs}
    handle = model.register_forward_pre_hook(add_constants, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _fillers_that_agree(model: torch.nn.Module, form: CallForm, named: dict) -> dict:
    """The mask fillers that leave the model's output as it is on the example (a model may
    treat "no mask" differently from "a mask of ones"); none if the model does not run."""
    masks = {name: filler(form, name, named) for name in form.fillers}
    masks = {k: v for k, v in masks.items() if v is not None}
    if not masks:
        return {}
    try:
        with untouched(model, copy_parameters=False), torch.no_grad():
            without = model(**named, **form.constants)
            with_masks = model(**named, **masks, **form.constants)
    except Exception:  # noqa: BLE001 - the export reports what is wrong with the inputs
        return {}
    if not outputs_agree(without, with_masks, 1e-5):
        return {}
    return {k: form.fillers[k] for k in masks}


def _export_explained(model: torch.nn.Module, args: tuple, kwargs: dict, dyn: Any,
                      check_inputs: bool, given_args: tuple, given_kwargs: dict) -> Any:
    """``torch.export`` of the model, or a :class:`TraceError` (an :class:`InputError` when
    the model does not run eagerly on the inputs either) that says where and what to try."""
    try:
        return _export(model, args, kwargs, dyn)
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        # only now run the model eagerly: when it does not run on these inputs either, the
        # inputs are wrong, and the eager error names the module (an InputError)
        if check_inputs:
            _check_runs(model, given_args, given_kwargs)
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}\n"
            f"  at {_user_frame(e)}\n{_advice(e)}") from e


def _advice(e: BaseException) -> str:
    """What to try after a failed export: about the output when it holds an object torch
    cannot flatten (a key/value cache), else about data-dependent code."""
    text = str(e)
    if "in output" in text and "not a known type" in text:
        return ("What to try: the model returns an object torch.export cannot flatten (a "
                "key/value cache when use_cache=True was passed): leave use_cache out (etp_fx "
                "then captures with use_cache=False), or return tensors only.")
    return ("What to try: make data-dependent Python control flow depend on shapes only, "
            "replace .item()/.tolist() on tensors, or wrap the offending layer as a "
            "torch.library custom op and register an etp_fx rule for it (docs/rules.md).")
