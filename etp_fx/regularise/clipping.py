"""The official code's per-epoch element clipping: weights with ``|w| < 5e-4`` are set to 0."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import SelectionError
from .units import unwrap

__all__ = ["clip_small_weights", "ElementClipping"]


def _clip_names(model: torch.nn.Module, source: Any) -> list[str]:
    if source is None:  # every Conv/Linear-like weight: parameters with 2 or more dims
        return [n for n, p in model.named_parameters() if p.dim() >= 2]
    if hasattr(source, "names"):  # a regulariser: the parameters it penalises
        return list(source.names)
    return list(source)


@torch.no_grad()
def clip_small_weights(model: torch.nn.Module, threshold: float = 5e-4,
                       params: Any = None) -> int:
    """Set weights with ``|w| < threshold`` to zero, in place (the official code does this
    after every epoch). ``params``: a regulariser (its penalised parameters), a list of
    parameter names, or None (every parameter with 2 or more dims). Returns how many weights
    are zero afterwards among those parameters."""
    if not threshold >= 0:
        raise SelectionError(f"threshold must be >= 0, got {threshold}")
    model = unwrap(model)
    zeros = 0
    for n in _clip_names(model, params):
        p = model.get_parameter(n)
        p.masked_fill_(p.abs() < threshold, 0)
        zeros += int((p == 0).sum())
    return zeros


class ElementClipping:
    """Callback: ``clip(model, epoch)`` after each epoch zeroes weights below ``threshold``
    every ``every`` epochs, and records how many weights are zero (``history``)."""

    def __init__(self, threshold: float = 5e-4, params: Any = None, every: int = 1) -> None:
        self.threshold, self.params, self.every = threshold, params, max(1, int(every))
        self.history: list[tuple[int, int]] = []
        self._calls = 0

    def __call__(self, model: torch.nn.Module, epoch: int | None = None) -> int | None:
        """Clip at the end of an epoch (every ``every``-th call); returns how many weights are
        now zero, or None on epochs it skips."""
        epoch = self._calls if epoch is None else epoch
        self._calls += 1
        if (epoch + 1) % self.every:
            return None
        z = clip_small_weights(model, self.threshold, self.params)
        self.history.append((epoch, z))
        return z
