"""The penalty as a decoupled (proximal) update after the optimiser's step.

``loss = task + reg(model)`` sends the penalty's gradient through autograd and through the
optimiser: a few extra passes over every weight per step, and, with Adam, a per-weight
normalisation that turns a strong pull into a step of about ``lr`` whatever the strength (the
units to remove never reach zero). The decoupled form applies, after ``optimizer.step()``, the
proximal operator of ``lr * strength * sum_u c_u N_u(W)`` with each parameter's own ``lr``:

- L1 units: elementwise soft-thresholding, ``w <- sign(w) * max(|w| - t, 0)`` with ``t = lr *
  strength * C`` (``C`` the summed coefficient of the units the weight belongs to): one read and one write
  per weight, no reduction, and a weight that would cross zero lands on exactly 0;
- L2 units: group soft-thresholding, ``w *= max(0, 1 - lr * strength * sum_u c_u / N_u)``: one
  norm read (reduced across FSDP2 shards) and one scaled write.

For plain SGD (no momentum, no weight decay) one such step equals one step of the loss-term
form wherever no weight crosses zero. Everything runs under ``torch.no_grad``; FSDP2 ranks
update their own shards (L1 needs nothing from the others) and DDP replicas apply the same
update to the same weights.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import RegulariserError
from .norms import Sharding, UnitNorms, local_shards

__all__ = ["optimiser_groups", "group_lrs", "initial_lr", "soft_threshold", "group_shrink",
           "proximal_step", "most_rate", "DECOUPLED_START_RATE", "DECOUPLED_MOST_RATE"]

# A target-driven decoupled update starts at and never exceeds these per-step pulls (lr *
# strength at the keep boundary, relative to the weights' size): 0.005 is where the loss-term
# form starts with SGD at lr 0.05 and momentum 0.9 (0.01 * 0.05 / (1 - 0.9)). The caps were
# measured on a BatchNorm VGG on digits at 8x (docs/etp.md, "Decoupled update"). Adam's step
# is about lr per weight whatever the gradient, so the same pull weighs more against it:
# with AdamW a cap of 1 crushed the kept units (78 % trained), 0.5 did too (82 %), 0.1 left
# 13 % of the mass in the removed units (69 % compressed), 0.3 gave 93 / 93; with SGD
# (momentum 0.9) 0.3 left too much (82 % compressed), 0.5 gave 99.4 / 99.4.
DECOUPLED_START_RATE = 0.005
DECOUPLED_MOST_RATE = {"adaptive": 0.3, "plain": 0.5}


def optimiser_groups(optimizer: torch.optim.Optimizer, names: Sequence[str],
                     params: Sequence[torch.Tensor]) -> list[int]:
    """The index of the parameter group holding each penalised parameter.

    Raises :class:`RegulariserError` naming the first parameter that is frozen or that the
    optimiser does not hold (the update would then change weights nobody trains)."""
    where = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    out = []
    for name, p in zip(names, params):
        if not p.requires_grad:
            raise RegulariserError(
                f"parameter {name!r} is penalised but frozen (requires_grad=False): unfreeze "
                f"it, or build the regulariser with include= so that it skips its group")
        if id(p) not in where:
            raise RegulariserError(
                f"parameter {name!r} is penalised but {type(optimizer).__name__} does not "
                f"hold it: give the optimiser every parameter of the model the regulariser "
                f"was traced from (model.parameters()), or attach to the one that trains it")
        out.append(where[id(p)])
    return out


def group_lrs(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> list[float]:
    """Each penalised parameter's current learning rate (its group's ``lr``, a scheduler's
    latest value)."""
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    return [lrs[i] for i in groups]


def initial_lr(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> float:
    """The largest learning rate the penalised parameters start with (a scheduler's
    ``initial_lr`` where it set one)."""
    gs = [optimizer.param_groups[i] for i in set(groups)]
    return max(float(g.get("initial_lr", g["lr"])) for g in gs)


def most_rate(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> float:
    """The cap on a target's per-step pull (:data:`DECOUPLED_MOST_RATE`): the adaptive one
    when a penalised parameter's group has Adam's ``betas``."""
    adaptive = any("betas" in optimizer.param_groups[i] for i in set(groups))
    return DECOUPLED_MOST_RATE["adaptive" if adaptive else "plain"]


@torch.no_grad()
def soft_threshold(params: Sequence[torch.Tensor], coefs: Sequence[torch.Tensor],
                   factors: Sequence[float]) -> None:
    """``w <- sign(w) * max(|w| - t, 0)`` (``= w - clamp(w, -t, t)``) in place with ``t =
    factor * coef`` (``coef`` broadcastable, already cut to the local shard): the proximal
    step of ``factor * sum |w| * coef``. Written as abs, subtract, clamp at 0 and copysign: on
    CPU ``clamp`` with tensor bounds is several times slower than these four (22 % less time
    for the whole update on ResNet-18's weights)."""
    for w, c, f in zip(params, coefs, factors):
        if f == 0:
            continue
        shrunk = w.abs().sub_(c.to(w.dtype), alpha=f).clamp_min_(0)
        torch.copysign(shrunk, w, out=w)


@torch.no_grad()
def group_shrink(norms: UnitNorms, params: Sequence[torch.Tensor], unit_coef: torch.Tensor,
                 factors: Sequence[float], sharding: Sharding | None) -> None:
    """``w *= max(0, 1 - factor * sum_u c_u / N_u)`` in place (L2 units; ``N_u`` read across
    the FSDP2 shards when ``sharding`` is given): the group soft-threshold, whose first-order
    step is the loss-term form's SGD step."""
    _, scale = norms.l2_scale(params, unit_coef, sharding)
    for w, c, f in zip(params, norms.per_parameter(scale, sharding), factors):
        if f == 0:
            continue
        w.mul_((1 - c * f).clamp_min_(0).to(w.dtype))


def proximal_step(norms: UnitNorms, params: Sequence[torch.Tensor], ord: float,
                  coefs: dict, factors: Sequence[float]) -> None:
    """One decoupled update of ``params`` (in :attr:`UnitNorms.names` order, DTensors or plain
    tensors): ``factors`` is ``lr * strength`` per parameter, ``coefs`` the regulariser's
    coefficient tensors (``"bcast"`` per parameter for L1, ``"unit"`` per unit for L2)."""
    local, sharding = local_shards(params)
    if ord == 1:
        soft_threshold(local, norms.localise(coefs["bcast"], sharding), factors)
    else:
        group_shrink(norms, local, coefs["unit"], factors, sharding)
