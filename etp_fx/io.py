"""Save and load compressed models as ``.pt2`` files (torch.export archives).

A ``.pt2`` file holds the graph as JSON and the weights as raw tensors, so it loads in a fresh
process without the original model's code.

Integrity. :func:`save` adds two members to the archive: ``extra/etp_manifest.json``, the
sha256 of every other member (weights, graph, configs, the report), and
``extra/etp_manifest.sha256``, the sha256 of the manifest itself. :func:`load` checks both and
refuses, with :class:`LoadError` naming the file and the member, a file in which a member was
changed, renamed, added or removed, or that is truncated; torch then reads exactly the bytes
that were checked (the archive is rebuilt in memory from them), never the file a second time.
This detects corruption and accidental edits, not a forger: anyone can recompute the hashes.
What keeps loading a crafted file safe is that :func:`load` never unpickles: tensor payloads
are read with ``torch.load(weights_only=True)`` and pickled Python objects are refused.

A file without a manifest (written by an etp_fx older than the manifest, or by
``torch.export.save`` directly) is refused; ``load(path, allow_unverified=True)`` loads it
with a warning, and :func:`save` writes it again with a manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export.pt2_archive import _package

from .capture import as_plain_module, batch_dynamic_shapes, describe_inputs, normalize_inputs
from .capture.calls import attach_binder, bound_inputs, form_from_json, form_to_json
from .capture.dynamic import concrete_size, shapes_from_dims
from .errors import Error, LoadError, SaveError

__all__ = ["save", "load", "LoadError", "SaveError"]

_REPORT = "etp_report.json"
_TYPES = "etp_pytree_types.json"  # input/output container types the loader must know
_CALL = "etp_call.json"  # the original model's call form (positional/keyword, optional masks)
_DIMS = "etp_dynamic_dims.json"  # which input dims stay dynamic
_MANIFEST = "extra/etp_manifest.json"        # {member name: sha256} of every other member
_MANIFEST_HASH = "extra/etp_manifest.sha256"  # sha256 of the manifest's bytes
_FORMAT = "etp_fx-manifest/1"


# --- save --------------------------------------------------------------------------------------

def save(model: fx.GraphModule | torch.nn.Module, path: str | os.PathLike,
         example_inputs: Any = None) -> Path:
    """Export ``model`` and write it to ``path`` (a ``.pt2`` archive with an integrity manifest).

    Parameters
    ----------
    model : nn.Module or fx.GraphModule
        Typically the result of :func:`etp_fx.compress`.
    path : str or os.PathLike
        The file to write; missing parent folders are created. It is checked for writability
        before any export work, and replaced atomically (a failed save leaves no partial file).
    example_inputs : Tensor, tuple or dict, optional
        Inputs to export the model at, in any form the model accepts. Defaults to the inputs
        a model from :func:`etp_fx.compress` was made for; required for any other model. The
        dims that stay dynamic are the ones the model's capture kept dynamic
        (``meta["etp_dynamic_dims"]``); for any other model, dim 0.

    Returns
    -------
    Path
        ``path``. The compress report (``meta["etp_report"]``) travels with the file.

    Raises
    ------
    SaveError
        ``model`` is not a module; ``path`` is a directory or cannot be written; the example
        inputs are missing, malformed, or the model cannot be exported on them.
    """
    path = Path(path)
    if not isinstance(model, torch.nn.Module):
        raise SaveError(f"cannot save to {path}: etp_fx.save takes a torch.nn.Module (the "
                        f"result of etp_fx.compress, say), got {type(model).__name__}")
    workdir = _reserve(path)  # proves the folder is writable before the (slow) export
    try:
        args, kwargs = _save_inputs(model, path, example_inputs)
        ep = _export(model, path, args, kwargs)
        meta = getattr(model, "meta", {}) or {}
        extra = {_REPORT: json.dumps(meta.get("etp_report", {}), default=str),
                 _TYPES: json.dumps(sorted(_container_types(ep))),
                 _CALL: json.dumps(form_to_json(meta["etp_call"]) if "etp_call" in meta
                                   else None),
                 _DIMS: json.dumps(_dims_record(ep))}
        staged = workdir / path.name  # same name: the archive's root folder is its stem
        torch.export.save(ep, str(staged), extra_files=extra)
        _add_manifest(staged)
        os.replace(staged, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return path


def _reserve(path: Path) -> Path:
    """A fresh folder beside ``path`` to write into, after checking ``path`` can be written."""
    if path.is_dir():
        raise SaveError(f"cannot save to {path}: it is a directory; give a file name, e.g. "
                        f"{path / 'model.pt2'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise SaveError(f"cannot save to {path}: {e.strerror or e} ({e.filename or path.parent});"
                        f" choose a path in a folder you can write to") from None


def _save_inputs(model: torch.nn.Module, path: Path, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        meta = getattr(model, "meta", {}) or {}
        if "etp_example_inputs" not in meta:
            raise SaveError(f"cannot save {type(model).__name__} to {path}: give "
                            f"example_inputs= (a model that does not come from "
                            f"etp_fx.compress() has no inputs of its own to export at)")
        args, kwargs = meta["etp_example_inputs"]
        return tuple(args), dict(kwargs)
    try:
        return normalize_inputs(example_inputs)
    except Error as e:
        raise SaveError(f"cannot save to {path}: {e}") from None


def _export(model: torch.nn.Module, path: Path, args: tuple,
            kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export`` with the dims the capture kept dynamic (else dim 0) dynamic; any
    failure is the inputs' or model's, named."""
    try:
        args, kwargs = bound_inputs(model, args, kwargs)  # the form the graph takes
        dims = (getattr(model, "meta", None) or {}).get("etp_dynamic_dims")
        dyn = shapes_from_dims(model.forward, args, kwargs, dims) if dims is not None else \
            batch_dynamic_shapes(model.forward, args, kwargs)
        return torch.export.export(model, args, kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as e:  # noqa: BLE001 - the model's own error, reported with the inputs
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise SaveError(
            f"cannot save {type(model).__name__} to {path}: torch.export failed on the example "
            f"inputs {describe_inputs(args, kwargs)} ({type(e).__name__}: {first}). Give "
            f"example_inputs the model runs on (for a model from etp_fx.compress, leave "
            f"example_inputs out)") from e


def _dims_record(ep: torch.export.ExportedProgram) -> dict:
    """``{input: {dim: "dynamic" | "static"}}`` of the exported program's user inputs."""
    names = [s.arg.name for s in ep.graph_signature.input_specs
             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    return {name: {d: "dynamic" if concrete_size(size) is None else "static"
                   for d, size in enumerate(vals[name].shape)}
            for name in names if isinstance(vals.get(name), torch.Tensor)}


def _container_types(ep: torch.export.ExportedProgram) -> set[str]:
    """Serialized names of the non-builtin pytree containers in the inputs and outputs (a
    transformers ``ModelOutput``, say): the loading process must have them registered."""
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


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_manifest(archive: Path) -> None:
    """Append the manifest (sha256 of every member) and the manifest's own sha256."""
    with zipfile.ZipFile(archive) as z:
        digests = {i.filename: _sha256(z.read(i)) for i in z.infolist()}
    root = next(iter(digests)).split("/")[0]
    manifest = json.dumps({"format": _FORMAT, "members": digests}, indent=1,
                          sort_keys=True).encode()
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(f"{root}/{_MANIFEST}", manifest)
        z.writestr(f"{root}/{_MANIFEST_HASH}", _sha256(manifest))


# --- load --------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, allow_unverified: bool = False) -> fx.GraphModule:
    """Load a model written by :func:`save`; ``meta["etp_report"]`` is restored.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.pt2`` file written by :func:`save`.
    allow_unverified : bool
        Load a file that has no integrity manifest (written by an older etp_fx, or by
        ``torch.export.save``), with a warning; save it again to add one. A file *with* a
        manifest is always checked.

    Returns
    -------
    torch.fx.GraphModule

    Raises
    ------
    LoadError
        Naming the file (and the member, where one is at fault): missing, not a file, not a
        zip archive, truncated, a member changed, renamed, added or removed since it was
        saved, no manifest, a pickled Python object inside, or an output type that no
        imported module registers.
    """
    path = Path(path)
    members = _verified_members(path, _read_members(path), allow_unverified)
    _check_container_types(path, members)
    extra = {_REPORT: "", _CALL: "", _DIMS: ""}
    try:
        with _safe_torch_load():
            ep = torch.export.load(_rebuilt(members), extra_files=extra)
        gm = as_plain_module(ep.module())
        _restore_call_form(gm, extra)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something not a tensor
        raise LoadError(f"{path}: the file contains a pickled Python object that is not a "
                        f"plain tensor; etp_fx.load refuses to unpickle arbitrary objects") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file to the user
        raise LoadError(f"{path} could not be read as a torch.export archive "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"save it again with etp_fx.save") from e
    try:
        gm.meta["etp_report"] = json.loads(extra[_REPORT]) if extra[_REPORT] else {}
    except ValueError:
        gm.meta["etp_report"] = {}
    return gm


def _restore_call_form(gm: fx.GraphModule, extra: dict) -> None:
    """Accept the original's call forms again, and record the dynamic dims (older files
    have neither: they load as torch.export wrote them)."""
    call = json.loads(extra[_CALL]) if extra[_CALL] else None
    if call:
        attach_binder(gm, form_from_json(call))
    dims = json.loads(extra[_DIMS]) if extra[_DIMS] else None
    if dims:
        gm.meta["etp_dynamic_dims"] = {name: {int(d): s for d, s in marks.items()}
                                       for name, marks in dims.items()}


def _read_members(path: Path) -> list[tuple[str, bytes]]:
    """Every member's name and bytes, each checked against its zip CRC."""
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if not path.is_file():
        raise LoadError(f"{path} is not a file (a directory?); give the path of a .pt2 file")
    try:
        with zipfile.ZipFile(path) as z:
            return [(i.filename, z.read(i)) for i in z.infolist()]
    except OSError as e:
        raise LoadError(f"{path} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - a damaged header shows as many exception types
        raise LoadError(f"{path} is not a .pt2 archive (truncated or corrupt: "
                        f"{type(e).__name__}: {e}); save it again with etp_fx.save") from None


def _verified_members(path: Path, members: list[tuple[str, bytes]],
                      allow_unverified: bool) -> dict[str, bytes]:
    """The members as a dict, after checking them against the manifest."""
    names = [n for n, _ in members]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LoadError(f"{path} is corrupt: member {twice[0]} appears more than once; save it "
                        f"again with etp_fx.save")
    found = dict(members)
    manifests = [n for n in names if n.endswith("/" + _MANIFEST)]
    if not manifests:
        _unverified(path, allow_unverified)
        return found
    if len(manifests) > 1:
        raise LoadError(f"{path} is corrupt: it has {len(manifests)} manifests ({manifests[:2]})")
    listed = _manifest(path, found, manifests[0][: -len(_MANIFEST)])
    own = {manifests[0], manifests[0][: -len(_MANIFEST)] + _MANIFEST_HASH}
    missing = sorted(set(listed) - set(found))
    extra = sorted(set(found) - set(listed) - own)
    if missing:
        raise LoadError(f"{path} was altered after saving: member {missing[0]} is missing "
                        f"({len(missing)} missing in all); save it again with etp_fx.save")
    if extra:
        raise LoadError(f"{path} was altered after saving: member {extra[0]} was not written by "
                        f"etp_fx.save ({len(extra)} unexpected in all); save it again")
    for name, digest in listed.items():
        if _sha256(found[name]) != digest:
            raise LoadError(f"{path} was altered after saving: member {name} does not match its "
                            f"sha256 in the manifest; save it again with etp_fx.save")
    return {n: d for n, d in found.items() if n not in own}


def _manifest(path: Path, found: dict[str, bytes], root: str) -> dict[str, str]:
    """The manifest's ``{member: sha256}``, after checking it against its own hash."""
    name, hash_name = root + _MANIFEST, root + _MANIFEST_HASH
    if hash_name not in found:
        raise LoadError(f"{path} was altered after saving: member {hash_name} (the manifest's "
                        f"own hash) is missing; save it again with etp_fx.save")
    if found[hash_name].strip() != _sha256(found[name]).encode():
        raise LoadError(f"{path} was altered after saving: member {name} does not match its "
                        f"sha256 in {hash_name}; save it again with etp_fx.save")
    try:
        data = json.loads(found[name])
        listed = data["members"]
        ok = data["format"] == _FORMAT and all(
            isinstance(k, str) and isinstance(v, str) for k, v in listed.items())
    except (ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise LoadError(f"{path}: member {name} is not an etp_fx manifest (format {_FORMAT}); "
                        f"save the model again with etp_fx.save")
    return listed


def _unverified(path: Path, allow_unverified: bool) -> None:
    why = (f"{path} has no integrity manifest (it was written by an older etp_fx, or by "
           f"torch.export.save), so etp_fx cannot check that it is intact")
    if not allow_unverified:
        raise LoadError(f"{why}. Load it with etp_fx.load(path, allow_unverified=True) and "
                        f"write it again with etp_fx.save(model, path, example_inputs)")
    warnings.warn(f"{why}; loading it unchecked. Save it again with etp_fx.save to add one.",
                  UserWarning, stacklevel=3)


def _rebuilt(members: dict[str, bytes]) -> io.BytesIO:
    """An in-memory archive of the checked bytes: torch reads nothing unchecked."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    buf.seek(0)
    return buf


def _check_container_types(path: Path, members: dict[str, bytes]) -> None:
    """Refuse, with the fix, a file whose outputs need a type no imported module registers.

    etp_fx never imports a module because a file names it; the user does, knowingly."""
    member = next((n for n in members if n.endswith("/extra/" + _TYPES)), None)
    try:
        names = json.loads(members[member]) if member else []
        names = [n for n in names if isinstance(n, str)]
    except (ValueError, TypeError):
        raise LoadError(f"{path}: member {member} is not a JSON list of type names; save the "
                        f"model again with etp_fx.save") from None
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
        return getattr(pickle, name)


@contextlib.contextmanager
def _safe_torch_load():
    real_load, real_pickle = torch.load, _package.pickle

    def weights_only_load(*a: Any, **k: Any) -> Any:
        k["weights_only"] = True
        return real_load(*a, **k)

    torch.load, _package.pickle = weights_only_load, _NoPickle()
    try:
        yield
    finally:
        torch.load, _package.pickle = real_load, real_pickle
