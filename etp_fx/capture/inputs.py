"""Example inputs and model state around a capture: one place for both capture paths.

Everything here protects the user's model: :func:`check_model_and_inputs` refuses, with the
fix, what etp_fx cannot capture; :func:`eval_mode` and :func:`untouched` make sure that
tracing, exporting or running the model eagerly leaves it exactly as it was given.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export._tree_utils import reorder_kwargs

from ..errors import InputError, ModelError
from .calls import as_captured, bound_inputs
from .compare import outputs_agree

__all__ = ["normalize_inputs", "describe_inputs", "eval_mode", "flat_inputs", "untouched",
           "check_model_and_inputs", "check_deterministic"]


def normalize_inputs(example_inputs: Any, kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    kwargs = dict(kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, Mapping):
        return (), {**dict(example_inputs), **kwargs}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), kwargs
    raise InputError(
        f"example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs; got "
        f"{type(example_inputs).__name__}. Example: etp_fx.trace(model, (torch.randn(1, 3, 224, 224),))")


def describe_inputs(args: Sequence, kwargs: Mapping) -> str:
    """``(Tensor(1, 3, 8, 8) float32, mask=Tensor(1, 8) bool)``: the inputs, for messages."""
    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        return type(v).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _refuses_mode_switch(model: torch.nn.Module) -> bool:
    """A module from ``ExportedProgram.module()`` overrides ``train``/``eval`` on the instance
    to raise; its graph is fixed in the mode it was exported in."""
    return "train" in vars(model) or "eval" in vars(model)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trace in eval mode (dropout off, BatchNorm on running stats); restore every submodule's
    own flag afterwards, even when tracing fails.

    The flags are put back one by one (not with ``train()``), so a model whose submodules were
    in mixed modes, or whose ``train`` override does more than set flags, is left exactly as
    it was; a module from ``torch.export`` (whose ``eval()`` raises) only has its flags set.
    """
    modes = [(m, m.training) for m in model.modules()]
    if _refuses_mode_switch(model):
        for m, _ in modes:
            m.training = False
    else:
        model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            if m.training is not t:  # nn.Module.__setattr__ is slow: only what changed
                m.training = t


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The flat placeholder values of a captured module for these inputs, given in any form
    the module accepts (positionally or by keyword, optional inputs left out: the capture's
    call form binds them, :mod:`etp_fx.capture.calls`)."""
    args, kwargs = bound_inputs(gm, args, kwargs)
    spec = gm._in_spec
    flat, got = pytree.tree_flatten((tuple(args), dict(kwargs)))
    if got == spec:
        return flat
    if spec.num_children == 2 and spec.child(1).num_children == 0 and kwargs:
        # a positional capture (the fast path) called by keyword: bind to its forward's names
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
        return pytree.tree_flatten((tuple(bound.arguments.values()), {}))[0]
    # kwargs order may differ: reorder by the exported signature
    flat, _ = pytree.tree_flatten((tuple(args), reorder_kwargs(dict(kwargs), spec)))
    return flat


# --- leaving the model as it was ---------------------------------------------------------

# the per-module dicts a forward (or a capture's helper) could add to or replace entries of
_SLOTS = ("_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_forward_hooks_always_called")


def _lazy(t: torch.Tensor) -> bool:
    """An uninitialised parameter or buffer of a lazy module: no values to save."""
    return isinstance(t, torch.nn.parameter.UninitializedTensorMixin)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


class _ConfigSnapshot:
    """The attributes of every ``config`` object the modules hold (a Hugging Face
    ``PretrainedConfig``, shared by all of a model's submodules): a forward or a capture that
    sets ``config.use_cache`` or ``config._attn_implementation`` is undone."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.saved: dict[int, tuple[Any, dict]] = {}
        for m in model.modules():
            config = vars(m).get("config")
            if config is not None and id(config) not in self.saved and \
                    hasattr(config, "__dict__") and not isinstance(config, torch.nn.Module):
                self.saved[id(config)] = (config, dict(vars(config)))

    def restore(self) -> None:
        for config, attrs in self.saved.values():
            now = vars(config)
            if now.keys() != attrs.keys() or any(now[k] is not v for k, v in attrs.items()):
                now.clear()
                now.update(attrs)


class _Snapshot:
    """What :func:`untouched` restores: flags, slot dicts, and the values, ``requires_grad``
    and version counters of every parameter and buffer (values copied for buffers, and for
    parameters when asked)."""

    def __init__(self, model: torch.nn.Module, copy_parameters: bool) -> None:
        self.modules, self.flags, self.slots = [], [], []
        self.tensors: dict[int, tuple] = {}
        self.configs = _ConfigSnapshot(model)
        for prefix, m in model.named_modules():  # one walk: this runs on every trace
            state = vars(m)
            self.modules.append(m)
            self.flags.append(m.training)
            self.slots.append({s: dict(state[s]) for s in _SLOTS if s in state})
            for slot, copy in (("_parameters", copy_parameters), ("_buffers", True)):
                for name, t in state.get(slot, {}).items():
                    if t is None or id(t) in self.tensors or _lazy(t):
                        continue
                    self.tensors[id(t)] = (prefix + ("." if prefix else "") + name, t,
                                           _version(t), t.requires_grad,
                                           t.detach().clone() if copy else None)

    def restore(self) -> list[str]:
        """Put everything back; the names of parameters that changed and had no copy."""
        self.configs.restore()
        for m, flag, slots in zip(self.modules, self.flags, self.slots):
            if m.training is not flag:  # nn.Module.__setattr__ is slow: only what changed
                m.training = flag
            for s, saved in slots.items():
                now = vars(m)[s]
                if not now and not saved:  # the common case (hook dicts): nothing to do
                    continue
                if s.endswith("hooks") or s.endswith("called"):
                    # hooks added meanwhile go; one removed stays removed (a lazy module
                    # drops its initialising hook after its first call, for good)
                    saved = {k: v for k, v in saved.items() if k in now}
                if now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items()):
                    now.clear()  # in place: hook handles hold a reference to the dict
                    now.update(saved)
        lost = []
        with torch.no_grad():
            for name, t, version, requires_grad, copy in self.tensors.values():
                if t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
                if version is not None and _version(t) == version:
                    continue
                if copy is None:  # changed (or, without a version counter, unknown)
                    if version is not None:
                        lost.append(name)
                elif t.shape == copy.shape and t.dtype == copy.dtype:
                    t.copy_(copy)
                else:  # resized or cast in place: give the old values back as they were
                    t.data = copy
        return lost


@contextlib.contextmanager
def untouched(model: torch.nn.Module, *, copy_parameters: bool = True) -> Iterator[None]:
    """Run a capture or an eager forward, then leave ``model`` exactly as it was given.

    Restored: every submodule's train/eval flag, the attributes of its ``config`` object
    (Hugging Face), the entries of its parameter and buffer dicts (a forward that reassigns
    ``self.count = self.count + 1``), its forward hooks (any added meanwhile are removed),
    the values of buffers (a counter, BatchNorm running statistics) and parameters (updated
    in place), and ``requires_grad``. Lazy modules keep the parameters their first call gave
    them.

    ``copy_parameters=False`` saves copying every weight where nothing can write to them (the
    fast path traces parameters as proxies, torch.export as fake tensors); a parameter whose
    version counter moved anyway is then reported with :class:`ModelError`.
    """
    saved = _Snapshot(model, copy_parameters)
    try:
        yield
    finally:
        lost = saved.restore()
    if lost:  # reached only when the body succeeded: its own error comes first otherwise
        raise ModelError(
            f"the forward of {type(model).__name__} wrote to parameter(s) {lost[:3]} in place "
            f"while etp_fx captured it; parameters must only be read in forward. Move that "
            f"update out of forward (into the training loop).")


# --- what etp_fx refuses, before any capture -----------------------------------------------

def _input_name(path: tuple) -> str:
    """``positional input 0``, ``keyword input 'mask'``, with the path inside a container."""
    where, key, rest = path[0], path[1], path[2:]
    head = (f"positional input {key.idx}" if where.idx == 0 else
            f"keyword input {key.key!r}")
    return head + pytree.keystr(rest)


def _check_inputs(args: tuple, kwargs: dict) -> None:
    """A batch of size 0 or a NaN/Inf in a floating input: refused, naming the input."""
    leaves, _ = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
    for path, v in leaves:
        if not isinstance(v, torch.Tensor):
            continue
        if v.dim() and v.shape[0] == 0:
            raise InputError(
                f"{_input_name(path)} has a batch of size 0 (shape {tuple(v.shape)}): etp_fx "
                f"traces the model on the example inputs, and an empty batch shows it nothing. "
                f"Give at least one example, e.g. torch.randn(1, ...).")
        # max propagates NaN and keeps Inf: one reduction (isfinite would write a mask)
        if v.is_floating_point() and v.device.type != "meta" and v.numel() and \
                not math.isfinite(float(v.detach().abs().amax())):
            raise InputError(
                f"{_input_name(path)} (shape {tuple(v.shape)}) holds NaN or Inf values: the "
                f"outputs cannot be compared on it. Give finite example inputs, e.g. "
                f"torch.randn of the same shape.")


def _check_weights(model: torch.nn.Module) -> None:
    """Quantized or sparse weights: refused, naming the module or tensor."""
    for name, m in model.named_modules():
        # packed weights, not Parameters; FloatFunctional is the float stand-in that
        # quantization-ready float models (torchvision's quantizable ones) hold
        if ".quantized" in type(m).__module__ and type(m).__name__ != "FloatFunctional":
            raise ModelError(
                f"module {name or '<root>'} ({type(m).__module__}.{type(m).__name__}) is "
                f"quantized: etp_fx prunes float models. Prune before quantizing, then quantize "
                f"the smaller model.")
    for kind, named in (("parameter", model.named_parameters()),
                        ("buffer", model.named_buffers())):
        for name, t in named:
            if _lazy(t):
                continue
            if t.is_quantized:
                raise ModelError(
                    f"{kind} {name!r} is quantized ({t.dtype}): etp_fx prunes float models. "
                    f"Prune before quantizing, then quantize the smaller model.")
            if t.layout != torch.strided:
                raise ModelError(
                    f"{kind} {name!r} is a sparse tensor ({t.layout}): etp_fx slices dense "
                    f"weights. Densify it first (module.{name} = Parameter(t.to_dense())) and "
                    f"sparsify the compressed model again.")


def check_model_and_inputs(model: Any, args: tuple, kwargs: dict) -> None:
    """Refuse, before any capture, what etp_fx cannot capture or prune, with what to do.

    Parameters
    ----------
    model : torch.nn.Module
        Refused with :class:`ModelError` when it is not an ``nn.Module``, or has quantized
        or sparse parameters or buffers (or quantized modules).
    args, kwargs : tuple, dict
        The normalised example inputs; refused with :class:`InputError` when a tensor has a
        batch (dim 0) of size 0, or a floating tensor holds NaN or Inf.

    Cheap (one pass over the weights' metadata and the inputs): it never runs the model. For
    a forward that is random or stateful, see :func:`check_deterministic`.
    """
    if not isinstance(model, torch.nn.Module):
        hint = (" (a state_dict: build the model and load_state_dict it first)"
                if isinstance(model, Mapping) else "")
        raise ModelError(f"etp_fx needs a torch.nn.Module as the model, got "
                         f"{type(model).__name__}{hint}")
    _check_weights(model)
    _check_inputs(args, kwargs)


def check_deterministic(model: torch.nn.Module, args: tuple, kwargs: dict,
                        rtol: float = 1e-5) -> None:
    """Run the model twice in eval mode on the same inputs; refuse it when the outputs differ.

    A forward that draws random numbers (``torch.rand``, a dropout that ignores ``eval()``)
    or keeps state that changes its output (a call counter) cannot be checked against a
    compressed copy: the difference would be reported as an etp_fx bug. Two eager runs, so
    call it where the model runs anyway (``compress``), not on ``trace``'s fast path. The
    model, its buffers and the random number generators are left as they were.

    Raises
    ------
    ModelError
        The outputs differ by more than ``rtol`` of their scale.
    """
    devices = sorted({t.device.index or 0 for t in model.parameters()
                      if t.device.type == "cuda"})
    args, kwargs = as_captured(model, args, kwargs)  # use_cache=False, as it is captured
    with torch.random.fork_rng(devices=devices), eval_mode(model), untouched(model), \
            torch.no_grad():
        first = model(*args, **kwargs)
        second = model(*args, **kwargs)
    if not outputs_agree(first, second, rtol):
        raise ModelError(
            f"{type(model).__name__} is not deterministic: two runs in eval mode on the same "
            f"example inputs {describe_inputs(args, kwargs)} give different outputs, so a "
            f"compressed copy cannot be verified against it. Remove randomness from forward "
            f"(torch.rand, dropout called with training=True: use nn.Dropout, which eval() "
            f"turns off) and state that changes the output (counters updated in forward).")
