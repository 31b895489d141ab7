"""The call forms of the original model, kept by its capture.

A model's forward is called as the user likes: ``model(ids)``, ``model(input_ids=ids)``,
``model(ids, attention_mask=mask)``. ``torch.export`` records one form, the one it was traced
with, and its result refuses any other ("keyword mismatch"). So a capture records the model's
*call form* (:class:`CallForm`): the forward's parameter names, the tensor inputs the graph
takes (always by name), the non-tensor inputs it was captured with (``use_cache=False``), and
optional inputs that have a neutral value (an attention mask of ones). A forward pre-hook
(:class:`CallBinder`) binds every call of the captured module to that form, so the result
accepts what the original accepts, positionally or by keyword.

Two things the capture adds where the user did not ask:

- ``use_cache=False`` for a forward that takes ``use_cache`` (every Hugging Face causal LM): a
  key/value cache is an output torch.export cannot return, and a graph has no use for it. It
  is injected while exporting only (the exported signature stays the user's), and recorded in
  ``meta["etp_use_cache"]``.
- ``attention_mask`` (``decoder_attention_mask``) as an input when the forward takes one and
  the user traced with ``input_ids`` (``decoder_input_ids``) only, after checking on the
  example that a mask of ones gives the model's own output. A call without a mask gets the
  ones; a padded batch gets its own mask.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import InputError

__all__ = ["CallForm", "CallBinder", "call_form_for", "as_captured", "with_fillers", "filler", "bind_call",
           "attach_binder", "rebind_after_copy", "bound_inputs", "form_to_json",
           "form_from_json", "MASK_FILLERS"]

#: optional mask input -> the input whose shape it takes; filled with ones when not given
MASK_FILLERS = {"attention_mask": "input_ids", "decoder_attention_mask": "decoder_input_ids"}
_SIMPLE = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class CallForm:
    """How the original model is called, and what its capture takes.

    ``names``: the forward's parameters that can be passed by position, in order.
    ``captured``: the tensor inputs of the graph, by name, in its order.
    ``constants``: non-tensor inputs fixed at capture (a call may repeat them or leave them out).
    ``fillers``: optional captured inputs, ``{name: (input whose shape it takes, fill, dtype)}``.
    ``defaults``: other parameters with a plain default (a call may pass that default).
    ``owner``: the model's class name, for messages.
    """

    names: tuple[str, ...]
    captured: tuple[str, ...]
    constants: dict[str, Any] = field(default_factory=dict)
    fillers: dict[str, tuple[str, int, str]] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    owner: str = "the model"


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def _signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: no names to bind to
        return None


def _bound_by_name(sig: inspect.Signature, args: tuple, kwargs: dict) -> dict | None:
    """Every input by its parameter name (extra keywords of ``**kwargs`` flattened), or None
    when the forward takes some of them only by position (``*args``, positional-only)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None  # the capture reports the wrong inputs
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _sees_positional_args(model: torch.nn.Module) -> bool:
    """Does a hook read the call's positional inputs (a user's pre-hook on the model, the
    input check of a module from ``torch.export``, a global hook)? Then the inputs are
    captured in the form given: binding them by name would change what the hook sees."""
    glob = torch.nn.modules.module
    return bool(model._forward_pre_hooks or model._forward_hooks or
                glob._global_forward_pre_hooks or glob._global_forward_hooks)


def call_form_for(model: torch.nn.Module, args: tuple, kwargs: dict,
                  inject_use_cache: bool = True) -> CallForm | None:
    """The call form for capturing ``model`` on these inputs, or None (capture as given).

    None when the forward takes an input only by position, the inputs do not bind to its
    signature, or a hook on the model reads its positional inputs. The fillers are
    candidates: :func:`with_fillers` keeps those the capture checked on the example."""
    if _sees_positional_args(model):
        return None
    sig = _signature(model)
    if sig is None:
        return None
    named = _bound_by_name(sig, args, kwargs)
    if named is None:
        return None
    params = sig.parameters
    captured = tuple(n for n, v in named.items() if _has_tensor(v))
    constants = {n: v for n, v in named.items() if n not in captured}
    if inject_use_cache and "use_cache" in params and "use_cache" not in named:
        constants["use_cache"] = False
    fillers = {}
    for mask, like in MASK_FILLERS.items():
        v = named.get(like)
        if mask in params and named.get(mask) is None and isinstance(v, torch.Tensor) and \
                not v.is_floating_point() and v.dim() == 2:
            fillers[mask] = (like, 1, "int64")
    positional = (inspect.Parameter.POSITIONAL_OR_KEYWORD,)
    names = tuple(n for n, p in params.items() if p.kind in positional)
    defaults = {n: p.default for n, p in params.items()
                if p.default is not inspect.Parameter.empty and isinstance(p.default, _SIMPLE)
                and n not in captured and n not in constants}
    return CallForm(names, captured, constants, fillers, defaults, type(model).__name__)


def as_captured(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs as given plus the constants a capture injects (``use_cache=False``): an
    eager run of the model that computes what its graph computes (a key/value cache is a new
    object on every call, so two runs with one never compare equal)."""
    form = call_form_for(model, args, kwargs)
    if form is None:
        return tuple(args), dict(kwargs)
    given = set(kwargs) | set(form.names[:len(args)])
    return tuple(args), {**kwargs, **{k: v for k, v in form.constants.items()
                                      if k not in given}}


def with_fillers(form: CallForm, fillers: dict) -> CallForm:
    """``form`` whose captured inputs include ``fillers`` (after its ``like`` input)."""
    captured = list(form.captured)
    for name in fillers:
        if name not in captured:
            captured.append(name)
    defaults = {k: v for k, v in form.defaults.items() if k not in fillers}
    constants = {k: v for k, v in form.constants.items() if k not in fillers}  # mask=None
    return CallForm(form.names, tuple(captured), constants, dict(fillers), defaults,
                    form.owner)


def filler(form: CallForm, name: str, named: dict) -> torch.Tensor | None:
    """The neutral value of optional input ``name`` for a call that leaves it out."""
    like_name, fill, dtype = form.fillers[name]
    like = named.get(like_name)
    if not isinstance(like, torch.Tensor):
        return None
    return torch.full(like.shape, fill, dtype=getattr(torch, dtype), device=like.device)


def _named_call(form: CallForm, args: tuple, kwargs: dict) -> dict:
    """The call's inputs by parameter name (positional ones named by the forward's order)."""
    if len(args) > len(form.names):
        raise InputError(f"{form.owner} takes at most {len(form.names)} positional inputs "
                         f"({', '.join(form.names)}), got {len(args)}")
    named = dict(zip(form.names, args))
    for k, v in kwargs.items():
        if k in named:
            raise InputError(f"input {k!r} of {form.owner} was given twice (by position and "
                             f"by keyword)")
        named[k] = v
    return named


def _check_extra(form: CallForm, name: str, value: Any) -> None:
    """An input the graph does not take: accepted when it changes nothing."""
    if name in form.constants:
        want = form.constants[name]
        if value is None or _equal(value, want):
            return
        fix = ("the graph computes the outputs without a key/value cache: leave use_cache "
               "out (for generate() with a cache, prune into the model's own class: "
               "output='module')" if name == "use_cache" else
               f"capture the model with {name}={value!r} for that case")
        raise InputError(f"{form.owner} was captured with {name}={want!r}, so its graph "
                         f"computes that case only; got {name}={value!r}: {fix}")
    if name in form.defaults and (value is None or _equal(value, form.defaults[name])):
        return
    if value is None:
        return
    raise InputError(f"input {name!r} was not among the inputs {form.owner} was captured with "
                     f"({', '.join(form.captured)}), so the graph has no input for it. Capture "
                     f"the model with an example {name} to use it.")


def _equal(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an object without equality is another value
        return False


def bind_call(form: CallForm, args: tuple, kwargs: dict) -> dict:
    """The captured graph's keyword inputs for a call of the original model's form.

    Raises
    ------
    InputError
        An input is given twice, is missing, was not captured (and is not the default), or
        differs from a constant the graph was captured with.
    """
    named = _named_call(form, args, kwargs)
    for name, value in named.items():
        if name not in form.captured:
            _check_extra(form, name, value)
    out = {}
    for name in form.captured:
        value = named.get(name)
        if value is None and name in form.fillers:
            value = filler(form, name, named)
        if value is None:
            raise InputError(f"{form.owner}'s graph needs input {name!r} (it was captured with "
                             f"inputs {', '.join(form.captured)}); it is missing or None")
        out[name] = value
    return out


class CallBinder:
    """A forward pre-hook (``with_kwargs``) that binds each call to the captured form."""

    def __init__(self, form: CallForm) -> None:
        self.form = form

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return (), bind_call(self.form, args, kwargs)


def attach_binder(gm: torch.nn.Module, form: CallForm) -> None:
    """Make ``gm`` (a module captured with ``form``'s keyword inputs) accept the original's
    call forms; runs before torch.export's own input check. ``meta["etp_call"]`` holds it."""
    if getattr(gm, "meta", None) is not None and isinstance(gm.meta.get("etp_call"), CallForm):
        for key, hook in list(gm._forward_pre_hooks.items()):
            if isinstance(hook, CallBinder):  # one binder: a capture of a capture replaces it
                del gm._forward_pre_hooks[key]
                gm._forward_pre_hooks_with_kwargs.pop(key, None)
    gm.register_forward_pre_hook(CallBinder(form), with_kwargs=True, prepend=True)
    gm.meta["etp_call"] = form
    copy_hooks = getattr(gm, "_deepcopy_hooks", None)
    if copy_hooks is not None and rebind_after_copy not in copy_hooks:
        # GraphModule.__deepcopy__ drops forward hooks (and keeps its deepcopy hooks)
        copy_hooks.append(rebind_after_copy)


def rebind_after_copy(copied: torch.nn.Module) -> None:
    """Give a deep copy of a captured module its call binder back."""
    form = getattr(copied, "meta", {}).get("etp_call")
    if isinstance(form, CallForm) and not any(
            isinstance(h, CallBinder) for h in copied._forward_pre_hooks.values()):
        copied.register_forward_pre_hook(CallBinder(form), with_kwargs=True, prepend=True)


def bound_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs as the graph of ``module`` takes them: bound to its call form when it has one
    (``meta["etp_call"]``), else as given."""
    meta = getattr(module, "meta", None)
    form = meta.get("etp_call") if isinstance(meta, dict) else None
    if not isinstance(form, CallForm):
        return tuple(args), dict(kwargs)
    return (), bind_call(form, tuple(args), dict(kwargs))


def _plain(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, _SIMPLE)}


def form_to_json(form: CallForm) -> dict:
    """A JSON-safe dict of ``form`` (constants and defaults of plain types only)."""
    return {"names": list(form.names), "captured": list(form.captured),
            "constants": _plain(form.constants), "defaults": _plain(form.defaults),
            "fillers": {k: list(v) for k, v in form.fillers.items()}, "owner": form.owner}


def form_from_json(data: dict) -> CallForm:
    """The :class:`CallForm` written by :func:`form_to_json`."""
    return CallForm(tuple(data["names"]), tuple(data["captured"]), dict(data["constants"]),
                    {k: (str(v[0]), int(v[1]), str(v[2])) for k, v in data["fillers"].items()},
                    dict(data["defaults"]), str(data["owner"]))
