"""Hugging Face models pruned into their own class: save and reload with per-layer widths.

:func:`etp_fx.surgery.module_output.compress_module` returns the model's own class with its
``config`` updated where one value describes every layer. When it does not (per-layer widths,
or a family whose head size is derived from ``hidden_size // num_attention_heads``), a plain
``from_pretrained`` cannot rebuild the model. :func:`save_pretrained` therefore stores the
widths next to the weights, in the safetensors metadata (JSON, no pickle), and
:func:`from_pretrained` rebuilds the model exactly: the original config, then every recorded
size attribute and tensor shape (:func:`etp_fx.surgery.module_attrs.apply_widths`), then the
weights. A directory saved this way is still an ordinary Hugging Face checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch

from .errors import LoadError, SaveError
from .surgery.module_attrs import apply_widths

__all__ = ["save_pretrained", "from_pretrained", "WIDTHS_KEY"]

#: the safetensors metadata key that holds the widths
WIDTHS_KEY = "etp_fx_widths"
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory (one, or the shards of an index)."""
    index = os.path.join(directory, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    single = os.path.join(directory, _SINGLE)
    return [single] if os.path.isfile(single) else []


def save_pretrained(model: torch.nn.Module, save_directory: str | os.PathLike,
                    **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, **kwargs)``, plus the pruned widths in the
    safetensors metadata, so that :func:`from_pretrained` rebuilds the model exactly.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A result of ``compress_module`` (it carries ``etp_report``).
    save_directory : str or path
    **kwargs
        Passed to the model's own ``save_pretrained`` (``max_shard_size``, ...).

    Raises
    ------
    SaveError
        The model is not a module-output result, has no ``save_pretrained``, or no
        safetensors file was written.
    """
    report = getattr(model, "etp_report", None)
    if not isinstance(report, dict) or report.get("output") != "module":
        raise SaveError(f"{type(model).__name__} carries no module-output report: give "
                        f"etp_fx.save_pretrained the result of compress_module (or "
                        f"compress(..., output='module'))")
    if not callable(getattr(model, "save_pretrained", None)):
        raise SaveError(f"{type(model).__name__} has no save_pretrained method (not a Hugging "
                        f"Face model); save its state_dict and etp_report, and rebuild with "
                        f"etp_fx.surgery.module_attrs.apply_widths")
    directory = os.fspath(save_directory)
    model.save_pretrained(directory, **kwargs)
    files = _weight_files(directory)
    if not files:
        raise SaveError(f"no safetensors weights were written to {directory!r}; do not pass "
                        f"safe_serialization=False")
    record = json.dumps({"version": 1, "class": report.get("class"),
                         "modules": report.get("modules", {}),
                         "tensors": report.get("tensors", {}),
                         "config": report.get("config", {}),
                         "config_added": report.get("config_added", [])})
    for path in files:
        _add_metadata(path, record)


def _add_metadata(path: str, record: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load_file(path)
    meta[WIDTHS_KEY] = record
    save_file(tensors, path, metadata=meta)


def _read_record(files: list[str]) -> dict[str, Any] | None:
    from safetensors import safe_open
    with safe_open(files[0], "pt") as f:
        raw = (f.metadata() or {}).get(WIDTHS_KEY)
    return None if raw is None else json.loads(raw)


def from_pretrained(directory: str | os.PathLike) -> torch.nn.Module:
    """Rebuild a model saved by :func:`save_pretrained`, per-layer widths and all, in eval mode.

    Nothing is downloaded: ``directory`` is a local checkpoint. The architecture is the
    config's ``architectures[0]`` (a ``transformers`` class).

    Raises
    ------
    LoadError
        Naming the directory: no weights, no recorded widths (a plain checkpoint: use
        ``transformers``' own ``from_pretrained``), an unknown architecture, or weights that
        do not fit the rebuilt model.
    """
    import transformers
    directory = os.fspath(directory)
    files = _weight_files(directory)
    if not files:
        raise LoadError(f"{directory!r} holds no model.safetensors (or index of shards)")
    record = _read_record(files)
    if record is None:
        raise LoadError(f"{directory!r} has no etp_fx widths in its safetensors metadata (it was "
                        f"not written by etp_fx.save_pretrained); load it with transformers' "
                        f"from_pretrained")
    config = transformers.AutoConfig.from_pretrained(directory)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise LoadError(f"{directory!r}: config.json names architecture {arch!r}, which this "
                        f"transformers does not have")
    model = _build(cls, config, record)
    _load_weights(model, files, directory)
    model.etp_report = {"output": "module", **{k: record.get(k, {}) for k in
                                                  ("class", "modules", "tensors", "config")},
                        "config_added": record.get("config_added", [])}
    return model.eval()


def _build(cls: type, config: Any, record: dict[str, Any]) -> torch.nn.Module:
    """The original architecture from the original config values, then the recorded widths,
    then the pruned config values."""
    from transformers.initialization import no_init_weights
    original = copy.deepcopy(config)
    added = set(record.get("config_added", []))
    for key, (old, _) in record.get("config", {}).items():
        if key in added:  # the original config had no such key (head_dim of Qwen2, ViT)
            original.__dict__.pop(key, None)
        else:
            setattr(original, key, old)
    with no_init_weights():  # every weight is loaded next
        model = cls(original)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # no_init_weights skips tying (lm_head to the embeddings)
    apply_widths(model, record)
    for key, (_, new) in record.get("config", {}).items():
        setattr(model.config, key, new)
    return model


def _load_weights(model: torch.nn.Module, files: list[str], directory: str) -> None:
    from safetensors.torch import load_file
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path))
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(next(iter(dtypes)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise LoadError(f"{directory!r}: the weights do not fit the rebuilt model: {e}") from None
    loaded = {id(t) for n, t in model.state_dict(keep_vars=True).items() if n in state}
    current = model.state_dict(keep_vars=True)
    untied = [n for n in missing if id(current[n]) not in loaded]
    if unexpected or untied:
        raise LoadError(f"{directory!r}: weights {unexpected[:3]} are not in the rebuilt model "
                        f"and {untied[:3]} are missing from the files")
