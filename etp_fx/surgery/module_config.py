"""Module-level surgery, part 3: a Hugging Face model's ``config`` after pruning.

The config is updated where one value describes every layer (``num_attention_heads``,
``num_key_value_heads``, ``head_dim``, ``intermediate_size`` and its spellings ``ffn_dim``,
``n_inner``, ``d_ff``). Whether the updated config *alone* rebuilds the pruned model (so that a
plain ``transformers`` ``from_pretrained`` reloads it) is checked, not assumed: a model of the
same class is built from a copy of the config on the ``meta`` device and its tensor shapes and
size attributes are compared with the pruned model's. Duck-typed: nothing here imports
transformers.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from ..graph.depgraph import DependencyGraph

__all__ = ["proposed_config", "rebuilds_from_config", "update_config"]

INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "d_ff")


def _one(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def _mlp_widths(config: Any, key: str, blocks: list[dict], graph: DependencyGraph,
                plan: Mapping[str, list[int]]) -> set[int]:
    """The MLP width of every layer: from MLP modules that name it, else from the neuron
    groups as wide as the config's old value (what the rebuild check then confirms)."""
    named = {b["intermediate"] for b in blocks if "intermediate" in b}
    if named:
        return named
    old = getattr(config, key)
    if old is None and key == "n_inner":  # GPT-2: None means 4 x hidden
        old = 4 * getattr(config, "hidden_size", 0)
    return {g.size - len(plan.get(g.id, [])) for g in graph.groups
            if g.size == old and g.unit_kind == "neuron"}


def proposed_config(config: Any, blocks: list[dict], graph: DependencyGraph,
                    plan: Mapping[str, list[int]]) -> dict[str, list[Any]]:
    """``{config key: [old, new]}`` for every size one value describes in all layers."""
    new: dict[str, Any] = {}
    attn = [b for b in blocks if "heads" in b]
    heads = _one({b["heads"] for b in attn})
    if heads is not None and hasattr(config, "num_attention_heads"):
        new["num_attention_heads"] = heads
        kv = _one({b["kv_heads"] for b in attn})
        if kv is not None and hasattr(config, "num_key_value_heads"):
            new["num_key_value_heads"] = kv
        head_dim = _one({b["head_dim"] for b in attn})
        # Llama-style configs derive head_dim from hidden_size // heads unless it is given
        if head_dim is not None and not hasattr(config, "d_kv") and \
                heads != config.num_attention_heads:
            new["head_dim"] = head_dim
    key = next((k for k in INTERMEDIATE_KEYS if hasattr(config, k)), None)
    if key is not None:
        width = _one(_mlp_widths(config, key, blocks, graph, plan))
        if width is not None:
            new[key] = width
    return {k: [getattr(config, k, None), v] for k, v in new.items()
            if getattr(config, k, None) != v}


def rebuilds_from_config(model: torch.nn.Module, config: Any,
                         modules: Mapping[str, Mapping[str, list[Any]]]) -> bool:
    """Does ``type(model)(config)`` (built on the meta device) have the model's tensor shapes
    and the changed size attributes?"""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:  # noqa: BLE001 - the class refuses this config: not a description
        return False
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if want != got:
        return False
    fresh_modules = dict(fresh.named_modules(remove_duplicate=False))
    for name, attrs in modules.items():
        m = fresh_modules.get(name)
        for attr, (_, new) in attrs.items():
            value = getattr(m, attr, None)
            if (list(value) if isinstance(value, tuple) else value) != new:
                return False
    return True


def update_config(model: torch.nn.Module, blocks: list[dict], graph: DependencyGraph,
                  plan: Mapping[str, list[int]], modules: Mapping[str, Any]
                  ) -> tuple[dict[str, list[Any]], bool | None, list[str]]:
    """Update ``model.config`` in place; return its changes, whether the config alone
    rebuilds the model (None: the model has no Hugging Face style config) and the keys the
    config did not have before (their old value is not None but absent: a model reading
    ``getattr(config, "head_dim", default)`` must find no attribute there)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}, None, []
    changes = proposed_config(config, blocks, graph, plan)
    added = [k for k in changes if not _has(config, k)]
    trial = copy.deepcopy(config)
    for k, (_, v) in changes.items():
        setattr(trial, k, v)
    exact = rebuilds_from_config(model, trial, modules)
    for k, (_, v) in changes.items():
        setattr(config, k, v)
    return changes, exact, added


def _has(config: Any, key: str) -> bool:
    try:
        getattr(config, key)
    except AttributeError:
        return False
    return True
