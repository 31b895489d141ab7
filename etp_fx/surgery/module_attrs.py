"""Module-level surgery, part 2: the size attributes a module's ``forward`` reads.

After :mod:`etp_fx.surgery.module_slice` has sliced the tensors, each module's attributes are
brought in line with them: ``in_features``/``out_features``, ``in_channels``/``out_channels``
and ``groups`` (from the capture's group axis), ``num_features``, ``normalized_shape``,
embedding sizes, Hugging Face ``Conv1D.nf``, and the head counts of attention modules
(``num_heads``, ``num_key_value_heads``, ``num_key_value_groups``, ``all_head_size``,
``split_size``, ...; checked against Llama, Qwen2, GPT-2, OPT, BERT, ViT and T5 in
transformers 5.x). Every change is recorded, so a fresh copy of the model can be given the
same widths (:func:`apply_widths`) before a state dict is loaded into it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ModuleOutputError
from ..graph.depgraph import DependencyGraph
from ..graph.layout import Cat, Prod, leaves, new_size, resolve
from ..graph.reductions import reduced_leaves
from ..graph.tensors import set_tensor

__all__ = ["minor_factor_groups", "reduced_groups", "inexpressible_groups", "conv_groups",
           "update_attributes", "apply_widths",
           "HEAD_COUNT", "KV_COUNT", "HEAD_DIM"]

#: attribute names of attention modules, as the model families spell them
HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_COUNT = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
INNER = ("all_head_size", "inner_dim", "split_size")
Q_CHILD = ("q_proj", "query", "q", "q_lin", "q_attn")
FUSED_QKV = ("c_attn", "qkv", "qkv_proj", "Wqkv", "query_key_value")
K_CHILD = ("k_proj", "key", "k", "k_lin")
MLP_FIRST = ("gate_proj", "up_proj", "fc1", "c_fc", "wi", "wi_0", "dense", "fc_in")


# --- which groups a module can express ------------------------------------------------------

def _weight_terms(graph: DependencyGraph) -> dict[str, list]:
    """The layout of every parameter dim, from the capture's get_attr nodes."""
    dims: dict[str, list] = {}
    for n in graph.module.graph.nodes:
        if n.op == "get_attr" and isinstance(n.meta.get("etp_dims"), list):
            dims.setdefault(str(n.target), n.meta["etp_dims"])
    return dims


def _in_minor_factor(t, uid: int) -> bool:
    """Is axis ``uid`` the minor factor of a product whose other factors hold a prunable axis
    (the head dim of ``Prod(heads, head_dim)``, not the length of a flatten)?"""
    t = resolve(t)
    if isinstance(t, Cat):
        return any(_in_minor_factor(p, uid) for p in t.parts)
    if not isinstance(t, Prod):
        return False
    *major, minor = t.parts
    if any(x.uid == uid for x in leaves(minor)):
        return any(not x.frozen and x.size > 1 for p in major for x in leaves(p))
    return any(_in_minor_factor(p, uid) for p in major)


def minor_factor_groups(graph: DependencyGraph) -> dict[str, str]:
    """Groups a module cannot shrink: ``{group id: why}``.

    A group that is the per-head width (head dim) of a 2-D weight changes the size every head
    has; attention modules keep one head size (``head_dim``) for queries, keys and values, so
    only the FX rewrite (``output="graph"``) can remove such units."""
    terms = _weight_terms(graph)
    out = {}
    for g in graph.groups:
        for m in g.members:
            t = terms.get(m.name)
            if t is None or len(t) != 2 or m.dim >= len(t):
                continue
            if _in_minor_factor(t[m.dim], g.uid):
                out[g.id] = (f"its units are the per-head width of {m.name} (a head dim); "
                             f"a module keeps one head size")
                break
    return out


def reduced_groups(graph: DependencyGraph) -> dict[str, str]:
    """Groups that a mean, variance, norm, softmax or max reduces over: ``{group id: why}``.

    The FX rewrite replaces such an op by its full-width form (the removed zeros counted); a
    module (``nn.LayerNorm``, an RMSNorm's ``mean``) keeps dividing by its own width, so only
    ``output="graph"`` can remove these units (for instance the hidden width)."""
    uid_to_id = {g.uid: g.id for g in graph.groups}
    out: dict[str, str] = {}
    for leaf, n in reduced_leaves(graph.module):
        gid = uid_to_id.get(leaf.uid)
        if gid is not None and gid not in out:
            out[gid] = (f"{n.name} ({getattr(n.target, '__name__', n.target)}) reduces "
                        f"over its units, and a module would divide by the new width")
    return out


def inexpressible_groups(graph: DependencyGraph) -> dict[str, str]:
    """Every group a module cannot shrink exactly (:func:`minor_factor_groups`,
    :func:`reduced_groups`): ``{group id: why}``."""
    return {**reduced_groups(graph), **minor_factor_groups(graph)}


def conv_groups(graph: DependencyGraph, keep: Mapping[int, list[int]]) -> dict[str, int]:
    """``{conv weight name: new groups}`` from each convolution's group axis."""
    out = {}
    for n in graph.module.graph.nodes:
        data = n.meta.get("etp_rule_data")
        if not isinstance(data, dict) or "G" not in data or len(n.args) < 2:
            continue
        w = n.args[1]
        if getattr(w, "op", None) == "get_attr":
            out[str(w.target)] = new_size(data["G"], keep)
    return out


# --- updating attributes -------------------------------------------------------------------

class _Recorder:
    """Sets attributes and remembers ``{module: {attr: [old, new]}}``."""

    def __init__(self) -> None:
        self.changes: dict[str, dict[str, list[Any]]] = {}

    def set(self, name: str, module: torch.nn.Module, attr: str, value: Any) -> None:
        old = getattr(module, attr)
        if isinstance(old, tuple):
            value = tuple(value)
        if old == value:
            return
        setattr(module, attr, value)
        entry = self.changes.setdefault(name, {})
        first = entry.get(attr, [old, None])[0]
        entry[attr] = [list(first) if isinstance(first, tuple) else first,
                       list(value) if isinstance(value, tuple) else value]


def _out_width(m: torch.nn.Module) -> int | None:
    """Output width of a Linear-like child (nn.Linear, HF Conv1D)."""
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return int(w.shape[1]) if hasattr(m, "nf") else int(w.shape[0])


def _torch_module(rec: _Recorder, name: str, m: torch.nn.Module, groups: Mapping[str, int]) -> None:
    nn = torch.nn
    if isinstance(m, nn.Linear):
        rec.set(name, m, "out_features", m.weight.shape[0])
        rec.set(name, m, "in_features", m.weight.shape[1])
    elif isinstance(m, nn.modules.conv._ConvNd):
        g = groups.get(f"{name}.weight" if name else "weight", m.groups)
        rec.set(name, m, "groups", g)
        if m.transposed:  # weight [in, out / groups, k...]
            rec.set(name, m, "in_channels", m.weight.shape[0])
            rec.set(name, m, "out_channels", m.weight.shape[1] * g)
        else:  # weight [out, in / groups, k...]
            rec.set(name, m, "out_channels", m.weight.shape[0])
            rec.set(name, m, "in_channels", m.weight.shape[1] * g)
    elif isinstance(m, (nn.modules.batchnorm._NormBase, )):
        t = m.weight if m.weight is not None else m.running_mean
        if t is not None:
            rec.set(name, m, "num_features", t.shape[0])
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        rec.set(name, m, "normalized_shape", tuple(m.weight.shape))
    elif isinstance(m, nn.GroupNorm) and m.weight is not None:
        rec.set(name, m, "num_channels", m.weight.shape[0])
    elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        rec.set(name, m, "num_embeddings", m.weight.shape[0])
        rec.set(name, m, "embedding_dim", m.weight.shape[1])
    elif isinstance(m, nn.PReLU):
        rec.set(name, m, "num_parameters", m.weight.numel())
    elif isinstance(m, nn.MultiheadAttention):
        _refuse_mha(name, m)
    elif hasattr(m, "nf") and hasattr(m, "nx") and isinstance(getattr(m, "weight", None),
                                                             torch.Tensor):
        rec.set(name, m, "nf", m.weight.shape[1])  # transformers' Conv1D: weight [nx, nf]
        rec.set(name, m, "nx", m.weight.shape[0])


def _refuse_mha(name: str, m: torch.nn.MultiheadAttention) -> None:
    w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
    if w.shape[0] not in (m.embed_dim, 3 * m.embed_dim) or \
            m.out_proj.weight.shape[1] != m.embed_dim:
        raise ModuleOutputError(
            f"module {name!r} (nn.MultiheadAttention) computes head_dim = embed_dim // num_heads "
            f"and checks the projections against embed_dim, so it cannot hold fewer heads; use "
            f"output='graph' (etp_fx.compress), which rewrites the attention ops")


def _attention(rec: _Recorder, name: str, m: torch.nn.Module, before: torch.nn.Module
               ) -> dict[str, int] | None:
    """Head counts of an attention module from its (sliced) projections; returns
    ``{"heads", "kv_heads", "head_dim"}`` or None when ``m`` is not one (no query projection,
    or none of the head attributes)."""
    attrs = [a for a in HEAD_COUNT + KV_COUNT + INNER + ("num_key_value_groups",)
             if isinstance(getattr(m, a, None), int)]
    q, fused = _query_child(m)
    q_old = _query_child(before)[0]
    if not attrs or q is None or q_old is None:
        return None
    head_dim = _head_dim(m, before, _out_width(q_old) // fused)
    if not head_dim:
        return None  # no head size to go by: verification judges the result
    width = _out_width(q)
    if width % (fused * head_dim):
        raise ModuleOutputError(
            f"module {name!r}: its query projection is {width} wide, not a whole number of "
            f"heads of {head_dim}; use output='graph' (etp_fx.compress)")
    heads = width // (fused * head_dim)
    info = {"heads": heads, "kv_heads": heads, "head_dim": head_dim}
    k = next((getattr(m, c) for c in K_CHILD if isinstance(getattr(m, c, None), torch.nn.Module)),
             None)
    if k is not None and _out_width(k) is not None and _out_width(k) % head_dim == 0:
        info["kv_heads"] = _out_width(k) // head_dim
    if heads % info["kv_heads"]:
        raise ModuleOutputError(f"module {name!r}: {heads} query heads cannot share "
                                f"{info['kv_heads']} key/value heads evenly; use "
                                f"output='graph' (etp_fx.compress)")
    values = {**{a: heads for a in HEAD_COUNT}, **{a: info["kv_heads"] for a in KV_COUNT},
              **{a: heads * head_dim for a in INNER},
              "num_key_value_groups": heads // info["kv_heads"]}
    for attr in attrs:
        rec.set(name, m, attr, values[attr])
    return info


def _head_dim(m: torch.nn.Module, before: torch.nn.Module, q_width: int) -> int | None:
    """The per-head width: an attribute, else the old query width over the old head count
    (the head dim never changes here: :func:`minor_factor_groups` keeps it)."""
    for a in HEAD_DIM:
        if isinstance(getattr(m, a, None), int):
            return getattr(m, a)
    count = next((a for a in HEAD_COUNT if isinstance(getattr(before, a, None), int)), None)
    return q_width // getattr(before, count) if count else None


def _query_child(m: torch.nn.Module) -> tuple[torch.nn.Module | None, int]:
    """The query projection and how many projections it fuses (GPT-2's ``c_attn``: 3)."""
    for c in Q_CHILD:
        if isinstance(getattr(m, c, None), torch.nn.Module) and _out_width(getattr(m, c)):
            return getattr(m, c), 1
    for c in FUSED_QKV:
        if isinstance(getattr(m, c, None), torch.nn.Module) and _out_width(getattr(m, c)):
            return getattr(m, c), 3
    return None, 1


def _mlp(rec: _Recorder, name: str, m: torch.nn.Module) -> int | None:
    """``intermediate_size`` of an MLP block (Llama, Qwen2) from its first projection."""
    if not isinstance(getattr(m, "intermediate_size", None), int):
        return None
    first = next((getattr(m, c) for c in MLP_FIRST
                  if isinstance(getattr(m, c, None), torch.nn.Module)), None)
    width = _out_width(first) if first is not None else None
    if width is not None:
        rec.set(name, m, "intermediate_size", width)
    return width


def _classifier_width(rec: _Recorder, model: torch.nn.Module, before: torch.nn.Module) -> None:
    """timm's ``num_features`` / ``head_hidden_size``: the width its classifier reads."""
    get = getattr(model, "get_classifier", None)
    if not callable(get) or not isinstance(getattr(model, "num_features", None), int):
        return
    head, old_head = get(), before.get_classifier()
    if isinstance(head, torch.nn.Linear) and isinstance(old_head, torch.nn.Linear):
        for attr in ("num_features", "head_hidden_size"):
            if getattr(model, attr, None) == old_head.in_features:
                rec.set("", model, attr, head.in_features)


def update_attributes(model: torch.nn.Module, before: torch.nn.Module,
                      groups: Mapping[str, int]) -> tuple[dict, list[dict]]:
    """Bring every module's size attributes in line with its sliced tensors.

    ``before`` is the unsliced model (old widths); ``groups`` the new ``groups`` of each
    convolution weight (:func:`conv_groups`). Returns the changes ``{module: {attr: [old,
    new]}}`` and, per attention module, ``{"module", "heads", "kv_heads", "head_dim",
    "intermediate"}`` for the config."""
    rec = _Recorder()
    blocks = []
    old_modules = dict(before.named_modules(remove_duplicate=False))
    for name, m in model.named_modules(remove_duplicate=False):
        _torch_module(rec, name, m, groups)
        info = _attention(rec, name, m, old_modules[name])
        if info is not None:
            blocks.append({"module": name, **info})
        width = _mlp(rec, name, m)
        if width is not None:
            blocks.append({"module": name, "intermediate": width})
    _classifier_width(rec, model, before)
    return rec.changes, blocks


# --- giving a fresh model the same widths ---------------------------------------------------

def apply_widths(model: torch.nn.Module, report: Mapping[str, Any]) -> torch.nn.Module:
    """Give a fresh, unpruned ``model`` the widths of a module-output result, in place.

    ``report`` is the result's ``etp_report`` (or any mapping with its ``"modules"`` and
    ``"tensors"`` entries): every recorded attribute is set and every changed parameter or
    buffer is replaced by an uninitialised tensor of its new shape (tied tensors stay tied; a
    bias the result gained is added). Load the result's state dict afterwards.

    Examples
    --------
    >>> import torch, etp_fx
    >>> from etp_fx.surgery.module_output import compress_module
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> small = compress_module(net, torch.randn(2, 4), remove={"0.weight[0]": [0, 1, 2]})
    >>> fresh = apply_widths(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
    ...                                          torch.nn.Linear(8, 2)), small.etp_report)
    >>> _ = fresh.load_state_dict(small.state_dict()); fresh[0].out_features
    5
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, attrs in report.get("modules", {}).items():
        if name not in modules:
            raise ModuleOutputError(f"the report names module {name!r}, which this model lacks; "
                                    f"give apply_widths a fresh model of the same class and config")
        for attr, (_, new) in attrs.items():
            old = getattr(modules[name], attr)
            setattr(modules[name], attr, tuple(new) if isinstance(old, tuple) else new)
    _resize_tensors(model, report.get("tensors", {}))
    return model


def _resize_tensors(model: torch.nn.Module, shapes: Mapping[str, Any]) -> None:
    made: dict[int, torch.Tensor] = {}
    for name, shape in shapes.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr, None)
        if old is None:  # a bias the result gained
            w = getattr(owner, "weight")
            owner.register_parameter(attr, torch.nn.Parameter(
                torch.empty(list(shape), dtype=w.dtype, device=w.device)))
            continue
        if id(old) not in made:
            new = torch.empty(list(shape), dtype=old.dtype, device=old.device)
            made[id(old)] = torch.nn.Parameter(new, requires_grad=old.requires_grad) \
                if isinstance(old, torch.nn.Parameter) else new
        set_tensor(model, name, made[id(old)])
