"""Model specs for the command line: build a model with random weights and example inputs."""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

import torch

from .errors import ModelSpecError

__all__ = ["ModelSpecError", "load_spec", "parse_shape"]

FORMS = ("torchvision:NAME (e.g. torchvision:resnet50), timm:NAME, "
         "hf:ConfigClass[,key=value...] (e.g. hf:LlamaConfig,num_hidden_layers=2), "
         "package.module:factory, or path/to/file.py:factory")


def parse_shape(s: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` as a shape; ``default`` when ``s`` is None.

    Raises :class:`ModelSpecError` for a size that is not a positive integer."""
    if s is None:
        return default
    try:
        shape = tuple(int(v) for v in s.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ModelSpecError(f"bad --input-shape {s!r}: give comma-separated integers, e.g. 1,3,224,224") from None
    if not shape or min(shape) <= 0:
        raise ModelSpecError(f"bad --input-shape {s!r}: every size must be a positive integer")
    return shape


def load_spec(spec: str, input_shape: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Resolve ``spec`` into ``(model, example_inputs)`` with random weights (no downloads)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ModelSpecError(f"unknown model spec {spec!r}; use {FORMS}")
    if kind == "torchvision":
        torchvision = _need("torchvision", "torchvision")
        try:
            model = torchvision.models.get_model(rest, weights=None)
        except ValueError:
            raise ModelSpecError(f"torchvision has no model {rest!r}; see torchvision.models.list_models()") from None
        size = 299 if "inception" in rest else 224
        return model, torch.randn(*parse_shape(input_shape, (1, 3, size, size)))
    if kind == "timm":
        timm = _need("timm", "timm")
        try:
            model = timm.create_model(rest, pretrained=False)
        except RuntimeError as e:
            raise ModelSpecError(f"timm: {e}") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return model, torch.randn(*parse_shape(input_shape, (1, *cfg.get("input_size", (3, 224, 224)))))
    if kind == "hf":
        return _hf(rest, input_shape)
    factory = _factory(spec, kind, rest)
    if input_shape is None:
        raise ModelSpecError(f"{spec}: give --input-shape for a model from a factory")
    shape = parse_shape(input_shape, ())
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: report it, do not crash
        raise ModelSpecError(f"{spec}: calling {rest}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec}: {rest}() returned {type(model).__name__}, not a torch.nn.Module")
    return model, torch.randn(*shape)


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModelSpecError(f"this spec needs the {package!r} package: pip install {package}") from None


def _factory(spec: str, kind: str, rest: str):
    """``package.module:factory`` or ``path/to/file.py:factory``."""
    if kind.endswith(".py") or os.sep in kind or "/" in kind:
        path = os.path.abspath(kind)
        if not os.path.isfile(path):
            raise ModelSpecError(f"{spec}: no such file {kind!r}")
        name = "_etp_fx_spec_" + os.path.splitext(os.path.basename(path))[0]
        loader = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(mod)
        except Exception as e:  # noqa: BLE001
            raise ModelSpecError(f"{spec}: importing {kind} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            mod = importlib.import_module(kind)
        except ImportError as e:
            raise ModelSpecError(f"cannot load {spec!r}: {e}; use {FORMS}") from None
    factory = getattr(mod, rest, None)
    if not callable(factory):
        raise ModelSpecError(f"{spec}: {kind} has no callable {rest!r}")
    return factory


def _hf(rest: str, input_shape: str | None):
    transformers = _need("transformers", "transformers")
    name, *overrides = rest.split(",")
    cls = getattr(transformers, name, None)
    if cls is None or not name.endswith("Config"):
        raise ModelSpecError(f"transformers has no config class {name!r} (e.g. hf:BertConfig)")
    kw: dict[str, Any] = {}
    for o in overrides:
        k, eq, v = o.partition("=")
        if not eq or not k:
            raise ModelSpecError(f"hf:{rest}: override {o!r} is not key=value")
        try:
            kw[k] = int(v)
        except ValueError:
            kw[k] = {"true": True, "false": False}.get(v.lower(), v)
    kw.setdefault("use_cache", False)
    try:
        config = cls(**kw)
        model = transformers.AutoModel.from_config(config)
    except Exception as e:  # noqa: BLE001 - a bad override: report it, do not crash
        raise ModelSpecError(f"hf:{rest}: {type(e).__name__}: {e}") from e
    if "ViT" in name:
        return model, torch.randn(*parse_shape(input_shape, (1, 3, config.image_size, config.image_size)))
    shape = parse_shape(input_shape, (1, 16))
    if len(shape) != 2:
        raise ModelSpecError(f"bad --input-shape {input_shape!r}: a text model takes BATCH,SEQ_LEN (e.g. 1,16)")
    return model, torch.randint(0, config.vocab_size, shape)
