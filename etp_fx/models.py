"""Model specs for the command line: build a model with random weights and example inputs."""
from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["ModelSpecError", "load_spec"]


class ModelSpecError(ValueError):
    """A model spec could not be resolved; the message lists the accepted forms."""


FORMS = ("torchvision:NAME (e.g. torchvision:resnet50), timm:NAME, "
         "hf:ConfigClass[,key=value...] (e.g. hf:LlamaConfig,num_hidden_layers=2), "
         "or package.module:factory")


def _shape(s: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
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
        import torchvision
        try:
            model = torchvision.models.get_model(rest, weights=None)
        except ValueError:
            raise ModelSpecError(f"torchvision has no model {rest!r}; see torchvision.models.list_models()") from None
        size = 299 if "inception" in rest else 224
        return model, torch.randn(*_shape(input_shape, (1, 3, size, size)))
    if kind == "timm":
        import timm
        try:
            model = timm.create_model(rest, pretrained=False)
        except RuntimeError as e:
            raise ModelSpecError(f"timm: {e}") from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return model, torch.randn(*_shape(input_shape, (1, *cfg.get("input_size", (3, 224, 224)))))
    if kind == "hf":
        return _hf(rest, input_shape)
    try:
        mod = importlib.import_module(kind)
        factory = getattr(mod, rest)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"cannot load {spec!r}: {e}; use {FORMS}") from None
    model = factory()
    if input_shape is None:
        raise ModelSpecError(f"{spec}: give --input-shape for a model from a factory")
    return model, torch.randn(*_shape(input_shape, ()))


def _hf(rest: str, input_shape: str | None):
    import transformers
    name, *overrides = rest.split(",")
    cls = getattr(transformers, name, None)
    if cls is None or not name.endswith("Config"):
        raise ModelSpecError(f"transformers has no config class {name!r} (e.g. hf:BertConfig)")
    kw: dict[str, Any] = {}
    for o in overrides:
        k, _, v = o.partition("=")
        try:
            kw[k] = int(v)
        except ValueError:
            kw[k] = {"true": True, "false": False}.get(v.lower(), v)
    kw.setdefault("use_cache", False)
    config = cls(**kw)
    model = transformers.AutoModel.from_config(config)
    if "ViT" in name:
        return model, torch.randn(*_shape(input_shape, (1, 3, config.image_size, config.image_size)))
    b, s = _shape(input_shape, (1, 16))
    return model, torch.randint(0, config.vocab_size, (b, s))
