"""The optimiser's step and the L1 proximal update in one compiled loop per weight.

The fused proximal update (:mod:`.fused`) still reads and writes every penalised weight once
more after ``optimizer.step()`` has just done so: on a short step (ViT-tiny at batch 8 on CPU,
22 MB of weights pushed out of cache by the step) that pass alone is 4 % of the step. Here the
regulariser computes the optimiser's own update of the penalised weights and the
soft-threshold in the same loop (one read of the weight, its gradient and the optimiser's
state, one write of the weight and the state), then hands the weights to the optimiser with no
gradient, so that its step skips them (and gives the gradients back after it).

One rule per optimiser, each the optimiser's single-tensor step term for term:

- ``torch.optim.SGD``: ``d = g + wd w``; ``b = momentum b + (1 - dampening) d``; ``d = d +
  momentum b`` (Nesterov) or ``b``; ``w = w - lr d``;
- ``torch.optim.Adam`` / ``AdamW``: ``step += 1``; ``w = w (1 - lr wd)`` (decoupled) or ``g =
  g + wd w``; ``m = m + (1 - beta1)(g - m)``; ``v = beta2 v + (1 - beta2) g^2``; ``w = w -
  lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)``;

then ``w = sign(w) * max(|w| - t, 0)``. A rule runs only where it is exactly that optimiser
(the class itself, not ``maximize``, ``differentiable``, ``fused``, ``capturable`` or
``amsgrad``), with dense contiguous gradients, the state its first step made, and no closure;
anything else takes the optimiser's step and the separate proximal update.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from .fused import FusedProximal, compile_one_thread, per_weight, shrink_l1, warn_unfused

__all__ = ["FusedOptimiserStep", "optimiser_unsupported"]


def _sgd_loop(params, grads, states, rows, cols, hyper, factors, nesterov) -> None:
    # hyper per weight: lr, momentum, 1 - dampening, weight decay; states: momentum buffers
    for i, (w, g, b, r, c) in enumerate(zip(params, grads, states, rows, cols)):
        shape = (r.shape[0], c.shape[1])
        w2 = w.view(shape)
        d = g.view(shape) + hyper[i, 3] * w2
        if b is not None:
            b2 = b.view(shape)
            nb = hyper[i, 1] * b2 + hyper[i, 2] * d
            b2.copy_(nb)
            d = d + hyper[i, 1] * nb if nesterov[i] else nb
        w2.copy_(shrink_l1(w2 - hyper[i, 0] * d, factors[i], r, c))


def _adam_loop(params, grads, states, rows, cols, hyper, factors, decoupled) -> None:
    # hyper per weight: weight decay (1 - lr wd when decoupled), 1 - beta1, beta2, 1 - beta2,
    # step size lr / (1 - beta1^t), sqrt(1 - beta2^t), eps; states: (exp_avg, exp_avg_sq)
    for i, (w, g, (m, v), r, c) in enumerate(zip(params, grads, states, rows, cols)):
        shape = (r.shape[0], c.shape[1])
        w2, g2, m2, v2 = w.view(shape), g.view(shape), m.view(shape), v.view(shape)
        if decoupled[i]:
            p = w2 * hyper[i, 0]
        else:
            p, g2 = w2, g2 + hyper[i, 0] * w2
        nm = m2 + hyper[i, 1] * (g2 - m2)
        nv = hyper[i, 2] * v2 + hyper[i, 3] * g2 * g2
        m2.copy_(nm)
        v2.copy_(nv)
        denom = nv.sqrt() / hyper[i, 5] + hyper[i, 6]
        w2.copy_(shrink_l1(p - hyper[i, 4] * nm / denom, factors[i], r, c))


class _SGD:
    loop = staticmethod(_sgd_loop)
    flags = ("maximize", "differentiable", "fused")

    @staticmethod
    def state(p: torch.Tensor, group: dict, st: dict) -> Any:
        if not group["momentum"]:
            return None
        buf = st.get("momentum_buffer")
        return buf if buf is not None and buf.is_contiguous() else False

    @staticmethod
    def hyper(group: dict, st: dict) -> list[float]:
        return [float(group["lr"]), float(group["momentum"]), 1.0 - float(group["dampening"]),
                float(group["weight_decay"])]

    @staticmethod
    def switch(group: dict) -> bool:
        return bool(group["nesterov"])


class _Adam:
    loop = staticmethod(_adam_loop)
    flags = ("maximize", "differentiable", "fused", "capturable", "amsgrad")

    @staticmethod
    def state(p: torch.Tensor, group: dict, st: dict) -> Any:
        m, v, step = st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step")
        if m is None or v is None or step is None or not (m.is_contiguous() and
                                                           v.is_contiguous()):
            return False  # the optimiser's first step makes the state
        return (m, v)

    @staticmethod
    def hyper(group: dict, st: dict) -> list[float]:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        t = float(st["step"])  # already counted for this step
        decay = 1.0 - lr * wd if group.get("decoupled_weight_decay") else wd
        return [decay, 1.0 - beta1, beta2, 1.0 - beta2, lr / (1.0 - beta1 ** t),
                math.sqrt(1.0 - beta2 ** t), float(group["eps"])]

    @staticmethod
    def switch(group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay"))


_RULES = {torch.optim.SGD: _SGD, torch.optim.Adam: _Adam, torch.optim.AdamW: _Adam}


def optimiser_unsupported(optimizer: torch.optim.Optimizer, groups: Sequence[int]) -> str | None:
    """Why the optimiser's step cannot be fused with the update, or None if it can."""
    rule = _RULES.get(type(optimizer))
    if rule is None:
        return f"no fused rule for {type(optimizer).__name__} (SGD, Adam and AdamW have one)"
    for i in sorted(set(groups)):
        g = optimizer.param_groups[i]
        for flag in rule.flags:
            if g.get(flag):
                return f"param group {i} has {flag}=True"
    return None


class FusedOptimiserStep:
    """The optimiser's step and the L1 proximal update of the penalised weights, compiled
    together.

    Holds the regulariser's :class:`~.fused.FusedProximal` (its parameter views and
    coefficient parts). Call :meth:`ready`, then :meth:`step` from the optimiser's pre-step
    hook, and :meth:`restore` from its post-step hook."""

    def __init__(self, prox: FusedProximal, optimizer: torch.optim.Optimizer,
                 groups: Sequence[int]) -> None:
        self.prox, self.optimizer, self.groups = prox, optimizer, list(groups)
        self.rule = _RULES[type(optimizer)]
        self._fn: Callable | None = None
        self._taken: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.steps = 0  # how many steps ran fused (for tests and logs)

    def ready(self, params: Sequence[torch.Tensor]) -> list | None:
        """Each weight's optimiser state for the loop, if this step can run fused."""
        if self.prox.broken or self.prox.views(params) is None:
            return None
        states = []
        for p, gi in zip(params, self.groups):
            grad = p.grad
            if grad is None or grad.is_sparse or not grad.is_contiguous() \
                    or grad.shape != p.shape or grad.dtype != p.dtype:
                return None
            st = self.rule.state(p, self.optimizer.param_groups[gi],
                                 self.optimizer.state.get(p, {}))
            if st is False:
                return None
            states.append(st)
        return states

    def step(self, params: Sequence[torch.Tensor], states: Sequence[Any], coefs: dict,
             factors: Sequence[float]) -> bool:
        """Update the penalised weights (and their optimiser state) now, then take their
        gradients away so that the optimiser's step skips them. False (nothing done) if the
        first call cannot compile: it warns once, and the optimiser's step and the separate
        update run instead."""
        if self.rule is _Adam:  # the step count the optimiser would add, before its hypers
            torch._foreach_add_([self.optimizer.state[p]["step"] for p in params], 1.0)
        try:
            self._run(params, states, coefs, factors)
        except Exception as err:  # only the first call compiles; later errors are real
            if self.steps:
                raise
            if self.rule is _Adam:
                torch._foreach_sub_([self.optimizer.state[p]["step"] for p in params], 1.0)
            self.prox.broken = True
            warn_unfused(err)
            return False
        self._taken = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        self.steps += 1
        return True

    def _run(self, params: Sequence[torch.Tensor], states: Sequence[Any], coefs: dict,
             factors: Sequence[float]) -> None:
        ws = self.prox.views(params)
        dev = ws[0].device
        rows, cols = self.prox.l1_parts(coefs["slot"], dev)
        pg, state = self.optimizer.param_groups, self.optimizer.state
        hyper = per_weight([self.rule.hyper(pg[i], state.get(p, {}))
                            for p, i in zip(params, self.groups)], dev)
        switch = tuple(self.rule.switch(pg[i]) for i in self.groups)
        f = per_weight(factors, dev)
        if self._fn is None:
            self._fn = compile_one_thread(self.rule.loop)
        with torch.no_grad():
            self._fn(ws, [p.grad for p in params], list(states), rows, cols, hyper, f, switch)

    def restore(self) -> bool:
        """Give the gradients back after the optimiser's step; whether this step ran fused."""
        taken, self._taken = self._taken, []
        for p, g in taken:
            p.grad = g
        return bool(taken)
