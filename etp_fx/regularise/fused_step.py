"""The optimiser's SGD step and the L1 proximal update in one compiled loop per weight.

The fused proximal update (:mod:`.fused`) still reads and writes every penalised weight once
more after ``optimizer.step()`` has just done so: on a short step (ViT-tiny at batch 8 on CPU,
22 MB of weights pushed out of cache by the step) that pass alone is 4 % of the step. Here the
regulariser computes ``torch.optim.SGD``'s own update of the penalised weights and the
soft-threshold in the same loop, one read of the weight, its gradient and its momentum buffer,
one write of the weight and the buffer, then hands the weights to the optimiser with no
gradient, so that its step skips them (and gives the gradients back after it).

The update is SGD's, term for term (``torch.optim.SGD`` with weight decay, momentum, dampening
and Nesterov): ``d = g + wd * w``; ``b = momentum * b + (1 - dampening) * d``; ``d = d +
momentum * b`` (Nesterov) or ``b``; ``w = w - lr * d``; then ``w = sign(w) * max(|w| - t, 0)``.
It runs only where it is exactly that: a plain ``torch.optim.SGD`` (not ``maximize``,
``differentiable`` or ``fused``), dense contiguous gradients, momentum buffers already made by
the optimiser's first step, no closure; anything else takes the optimiser's step and the
separate proximal update.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .fused import FusedProximal, warn_unfused

__all__ = ["FusedSGDStep", "sgd_unsupported"]


def sgd_unsupported(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> str | None:
    """Why the optimiser's step cannot be fused with the update, or None if it can."""
    if type(optimizer) is not torch.optim.SGD:
        return f"the optimiser is {type(optimizer).__name__}, not torch.optim.SGD"
    for i in sorted(set(groups)):
        g = optimizer.param_groups[i]
        for flag in ("maximize", "differentiable", "fused"):
            if g.get(flag):
                return f"param group {i} has {flag}=True"
    return None


def _sgd_soft_threshold(params, grads, bufs, rows, cols, hyper, factors, nesterov) -> None:
    # per weight, one loop: SGD's step (hyper = lr, momentum, 1 - dampening, weight decay),
    # then the L1 proximal step w <- sign(w) * max(|w| - f * (row + col), 0)
    for i, (w, g, b, r, c) in enumerate(zip(params, grads, bufs, rows, cols)):
        shape = (r.shape[0], c.shape[1])
        w2, d = w.view(shape), g.view(shape)
        d = d + hyper[i, 3] * w2
        if b is not None:
            b2 = b.view(shape)
            nb = hyper[i, 1] * b2 + hyper[i, 2] * d
            b2.copy_(nb)
            d = d + hyper[i, 1] * nb if nesterov[i] else nb
        s = w2 - hyper[i, 0] * d
        t = (factors[i] * (r + c)).to(s.dtype)
        w2.copy_(torch.copysign((s.abs() - t).clamp_min(0), s))


class FusedSGDStep:
    """SGD's step and the L1 proximal update of the penalised weights, compiled together.

    Holds the regulariser's :class:`~.fused.FusedProximal` (its parameter views and
    coefficient parts). Call :meth:`step` from the optimiser's pre-step hook, then
    :meth:`restore` from its post-step hook."""

    def __init__(self, prox: FusedProximal, optimizer: torch.optim.Optimizer,
                 groups: Sequence[int]) -> None:
        self.prox, self.optimizer, self.groups = prox, optimizer, list(groups)
        self._fn: Callable | None = None
        self._taken: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps = 0  # how many steps ran fused (for tests and logs)

    def ready(self, params: Sequence[torch.Tensor]) -> list | None:
        """The momentum buffers (None where momentum is 0) if this step can run fused."""
        if self.prox.broken or self.prox.views(params) is None:
            return None
        bufs = []
        for p, gi in zip(params, self.groups):
            grad = p.grad
            if grad is None or grad.is_sparse or not grad.is_contiguous() \
                    or grad.shape != p.shape or grad.dtype != p.dtype:
                return None
            momentum = self.optimizer.param_groups[gi]["momentum"]
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer") if momentum else None
            if momentum and (buf is None or not buf.is_contiguous()):
                return None  # the optimiser's first step makes the buffers
            bufs.append(buf)
        return bufs

    def step(self, params: Sequence[torch.Tensor], bufs: Sequence[Any], coefs: dict,
             factors: Sequence[float]) -> bool:
        """Update the penalised weights (and their momentum buffers) now, then take their
        gradients away so that the optimiser's step skips them. False (nothing done) if the
        first call cannot compile: it warns once, and the optimiser's step and the separate
        update run instead."""
        try:
            self._run(params, bufs, coefs, factors)
        except Exception as err:  # only the first call compiles; later errors are real
            if self.steps:
                raise
            self.prox.broken = True
            warn_unfused(err)
            return False
        self._taken = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        self.steps += 1
        return True

    def _run(self, params: Sequence[torch.Tensor], bufs: Sequence[Any], coefs: dict,
             factors: Sequence[float]) -> None:
        ws = self.prox.views(params)
        dev = ws[0].device
        rows, cols = self.prox.l1_parts(coefs["slot"], dev)
        pg = self.optimizer.param_groups
        hyper = torch.tensor([[float(pg[i]["lr"]), float(pg[i]["momentum"]),
                               1.0 - float(pg[i]["dampening"]), float(pg[i]["weight_decay"])]
                              for i in self.groups], dtype=torch.float32, device=dev)
        nesterov = tuple(bool(pg[i]["nesterov"]) for i in self.groups)
        f = torch.tensor(list(factors), dtype=torch.float32, device=dev)
        if self._fn is None:
            self._fn = torch.compile(_sgd_soft_threshold, fullgraph=True, dynamic=False,
                                     options={"cpp.threads": 1})
        grads = [p.grad for p in params]
        with torch.no_grad():
            self._fn(ws, grads, list(bufs), rows, cols, hyper, f, nesterov)

    def restore(self) -> bool:
        """Give the gradients back after the optimiser's step; whether this step ran fused."""
        taken, self._taken = self._taken, []
        for p, g in taken:
            p.grad = g
        return bool(taken)
