"""The compared methods behind one small interface, and pruning a trained model to a MACs target.

- ``etp-paper``: ``ExponentialTorque(preset="paper")`` (per-layer output rows, index chain, raw
  strength) with the official per-epoch clipping of ``|w| < 5e-4``;
- ``etp``: ``ExponentialTorque`` with the library defaults (coupled-group units, strength as an
  L1 decay rate) and importance-ordered pivots (``distance="importance"``);
- ``torque``: the same but with the linear force (``Torque``), so only the force law differs;
- ``greg`` / ``groupnorm`` / ``magnitude``: torch-pruning through ``etp_fx.baselines``.

Our methods (and ``magnitude`` on the language model, where torch-pruning would prune the
residual width instead of heads and neurons) are pruned with ``etp_fx.select.by_budget`` and
``etp_fx.compress``; the torch-pruning methods with their own pruner, the uniform per-layer ratio
set so that the MACs (``etp_fx`` cost model) reach the target.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

import etp_fx
from etp_fx import baselines, select
from etp_fx.surgery.zero import zeroed_slices

OURS = ("etp-paper", "etp", "torque")
TORCH_PRUNING = ("greg", "groupnorm", "magnitude")
ALL_METHODS = OURS + TORCH_PRUNING


@dataclass
class Trainer:
    """What the training loop calls: ``penalty`` in the loss, ``regularize`` after backward,
    ``epoch_end`` after each epoch. ``reg`` is the etp_fx regulariser (ours) or None."""

    name: str
    penalty: Any
    regularize: Any
    epoch_end: Any
    reg: Any = None
    units: str = "group"


def make_trainer(name: str, model: nn.Module, graph, task, *, strength: float = 2.0,
                 distance: str = "importance", pivots: Any = None) -> Trainer:
    """The regulariser of method ``name`` attached to ``model`` (fresh, untrained)."""
    nothing = lambda *a: 0.0  # noqa: E731
    if name in OURS:
        if name == "etp-paper":
            reg = etp_fx.ExponentialTorque(graph, preset="paper", strength=task.paper_strength)
            clip = lambda m: etp_fx.clip_small_weights(m, 5e-4, reg)  # noqa: E731
        else:
            cls = etp_fx.ExponentialTorque if name == "etp" else etp_fx.Torque
            reg = cls(graph, strength=strength, distance=distance, pivots=pivots, model=model)
            clip = nothing
        return Trainer(name, reg, nothing, clip, reg, reg.units)
    if name in ("magnitude", "dense"):
        return Trainer(name, nothing, nothing, nothing)
    # GReg and DepGraph's group sparsity: their regularisers need the pruner object; the
    # ratio only steers GReg's growing penalty (aimed at the middle target, 4x)
    kw = dict(reg=5e-4) if name == "groupnorm" else {}
    meth = baselines.make(name, model, task.example, pruning_ratio=0.5, **kw)
    return Trainer(name, nothing, meth.regularize, nothing)


# --- pruning to a target ---------------------------------------------------------------------

def masks_for(model: nn.Module, graph, plan) -> dict[str, torch.Tensor]:
    """0/1 masks of the parameter slices a plan zeroes (units zeroed whole), to keep them
    zero while fine-tuning the masked model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, torch.Tensor] = {}
    for name, dim, idx in zeroed_slices(graph, plan, False, params):
        m = masks.setdefault(name, torch.ones_like(params[name]))
        m.index_fill_(dim, idx, 0.0)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, m in masks.items():
        params[name].mul_(m)


def prune_ours(model: nn.Module, graph, target: float, units: str = "group"):
    """Select by MACs budget (``1/target`` of dense), zero the units whole in place; returns
    ``(plan, masks)``. The model stays an nn.Module so it fine-tunes like the others."""
    plan = select.by_budget(graph, model, macs=1.0 / target, units=units)
    etp_fx.zero_units(model, graph, plan)
    return plan, masks_for(model, graph, plan)


def finalize_ours(model: nn.Module, graph, plan, example) -> tuple[Any, int]:
    """The compressed graph module (verified against the masked model) and its MACs."""
    model.eval()
    small = etp_fx.compress(model, example, remove=plan, graph=graph)
    return small, int(small.meta["etp_report"]["macs_after"])


def macs_of(model: nn.Module, example) -> int:
    """MACs by the etp_fx cost model (the one counter used for every method)."""
    return int(etp_fx.trace(model, example).cost.macs())


def prune_torch_pruning(name: str, model: nn.Module, example, target: float,
                        dense_macs: int) -> nn.Module:
    """Prune a copy with the method's own torch-pruning pruner; the per-layer ratio starts at
    ``1 - 1/sqrt(target)`` (MACs scale with in x out widths) and is corrected by secant steps
    on the measured MACs (a few prunes of a small model)."""
    want = dense_macs / target
    tried: list[tuple[float, int, nn.Module]] = []
    r = 1 - target ** -0.5
    for _ in range(4):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = dict(reg=5e-4) if name == "groupnorm" else {}
            baselines.make(name, m, example, pruning_ratio=min(r, 0.97), **kw).step()
        macs = macs_of(m, example)
        tried.append((r, macs, m))
        if abs(macs / want - 1) < 0.04:
            break
        # secant on log MACs (or a plain step when only one point is known)
        if len(tried) == 1:
            r = min(0.97, r + 0.05 * (1 if macs > want else -1))
        else:
            (r0, m0, _), (r1, m1, _) = tried[-2], tried[-1]
            import math
            if m1 == m0:
                break
            r = r1 + (math.log(want) - math.log(m1)) * (r1 - r0) / (math.log(m1) - math.log(m0))
            r = min(max(r, 0.0), 0.97)
    # the closest not above target if any, else the closest
    under = [t for t in tried if t[1] <= want * 1.04]
    best = min(under or tried, key=lambda t: abs(t[1] - want))
    return best[2]
