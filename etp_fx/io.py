"""Save and load compressed models as ``.pt2`` files (torch.export archives).

A ``.pt2`` file holds the graph as JSON and the weights as raw tensors, so it loads in a fresh
process without the original model's code. :func:`load` never unpickles arbitrary objects:
tensor payloads are read with ``torch.load(weights_only=True)`` and pickled custom objects are
refused.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .capture import batch_dynamic_shapes, normalize_inputs
from .errors import LoadError

__all__ = ["save", "load", "LoadError"]

_REPORT = "etp_report.json"
_TYPES = "etp_pytree_types.json"  # input/output container types the loader must know



def save(model: fx.GraphModule | torch.nn.Module, path: str | os.PathLike,
         example_inputs: Any = None) -> Path:
    """Export ``model`` and write it to ``path`` (a ``.pt2`` archive).

    ``example_inputs`` defaults to the inputs a model from :func:`etp_fx.compress` was made for.
    The compress report travels with the file.
    """
    path = Path(path)
    meta = getattr(model, "meta", {}) or {}
    if example_inputs is None:
        if "etp_example_inputs" not in meta:
            raise ValueError("save() needs example_inputs for a model that does not come from "
                             "etp_fx.compress()")
        args, kwargs = meta["etp_example_inputs"]
    else:
        args, kwargs = normalize_inputs(example_inputs)
    dyn = batch_dynamic_shapes(model.forward, tuple(args), dict(kwargs))
    ep = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=dyn, strict=False)
    extra = {_REPORT: json.dumps(meta.get("etp_report", {}), default=str),
             _TYPES: json.dumps(sorted(_container_types(ep)))}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(ep, str(path), extra_files=extra)
    return path


def _container_types(ep: torch.export.ExportedProgram) -> set[str]:
    """Serialized names of the non-builtin pytree containers in the inputs and outputs (a
    transformers ``ModelOutput``, say): the loading process must have them registered."""
    import torch.utils._pytree as pytree
    names: set[str] = set()
    stack = [ep.call_spec.in_spec, ep.call_spec.out_spec]
    while stack:
        spec = stack.pop()
        if spec is None:
            continue
        node = pytree.SUPPORTED_SERIALIZED_TYPES.get(spec.type)
        name = node.serialized_type_name if node is not None else None
        if name and not name.startswith(("builtins.", "collections.", "torch.")):
            names.add(name)
        # children() in current torch; children_specs (deprecated there) in older releases
        stack.extend(spec.children() if callable(getattr(spec, "children", None))
                     else spec.children_specs)
    return names


def _check_container_types(path: Path, z: zipfile.ZipFile) -> None:
    """Refuse, with the fix, a file whose outputs need a type no imported module registers.

    etp_fx never imports a module because a file names it; the user does, knowingly."""
    import torch.utils._pytree as pytree
    member = next((n for n in z.namelist() if n.endswith(_TYPES)), None)
    names = json.loads(z.read(member)) if member else []
    missing = [n for n in names if n not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE]
    if missing:
        modules = sorted({n.rpartition(".")[0] for n in missing})
        raise LoadError(f"{path}: the model's inputs or outputs use {', '.join(missing)}, which "
                        f"no imported module has registered with torch's pytree; run "
                        f"`import {', '.join(modules)}` before etp_fx.load")


class _NoPickle:
    """Stands in for the pickle module inside torch's archive reader while we load."""

    @staticmethod
    def loads(*_a: Any, **_k: Any) -> Any:
        raise LoadError("the file contains a pickled Python object; etp_fx.load refuses to "
                        "unpickle arbitrary objects")

    def __getattr__(self, name: str) -> Any:
        import pickle
        return getattr(pickle, name)


@contextlib.contextmanager
def _safe_torch_load():
    from torch.export.pt2_archive import _package
    real_load, real_pickle = torch.load, _package.pickle

    def weights_only_load(*a: Any, **k: Any) -> Any:
        k["weights_only"] = True
        return real_load(*a, **k)

    torch.load, _package.pickle = weights_only_load, _NoPickle()
    try:
        yield
    finally:
        torch.load, _package.pickle = real_load, real_pickle


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Load a model written by :func:`save`; ``meta["etp_report"]`` is restored.

    Raises :class:`LoadError` for a missing, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is None:
                _check_container_types(path, z)
    except zipfile.BadZipFile as e:
        raise LoadError(f"{path} is not a .pt2 archive (truncated or corrupt: {e}); save it "
                        f"again with etp_fx.save") from None
    if bad is not None:
        raise LoadError(f"{path} is corrupt: member {bad} fails its checksum; save it again")
    extra = {_REPORT: ""}
    try:
        with _safe_torch_load():
            ep = torch.export.load(str(path), extra_files=extra)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise LoadError(f"{path} could not be read as a torch.export archive "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    gm = ep.module()
    try:
        gm.meta["etp_report"] = json.loads(extra[_REPORT]) if extra[_REPORT] else {}
    except json.JSONDecodeError:
        gm.meta["etp_report"] = {}
    return gm
