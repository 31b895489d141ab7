"""Full-width forms of the ops that divide by a count: exact after removing zero units.

When removed units are zero at the input of a mean, a variance, a norm or a softmax over their
dim, the original op still counts them. The pruned op sees only the kept values, so it is
rewritten (``node.target``) into one of these forms, which take the original widths of the
reduced dims and compute what the original op computed, the removed zeros included:

- mean: ``sum(kept) / N``;
- variance: with ``m`` and ``v`` the mean and (biased) variance of the ``n`` kept values and
  ``a = n / N``, the original mean is ``mu = a m`` and its sum of squared deviations, the
  ``N - n`` zeros included, is ``n (v + (1 - a) m^2)``;
- layer / group / batch norm: ``(x - mu) / sqrt(var + eps)`` with that mean and variance;
- RMS norm: ``x / sqrt(a mean(x^2) + eps)``;
- softmax: the zeros add ``(N - n) exp(-M)`` to the denominator, ``M = max(max(kept), 0)``;
- amax / amin / logsumexp: the zeros take part as values ``0``.

``full`` is, per reduced dim, the dim's original width, or None for a dim that kept its width
(its size is read at run time, so a dynamic batch stays dynamic). See ``docs/concepts.md``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["mean_full", "var_full", "layer_norm_full", "rms_norm_full", "group_norm_full",
           "batch_norm_full", "softmax_full", "log_softmax_full", "amax_full", "amin_full",
           "logsumexp_full"]

Sizes = Sequence["int | None"]


def _counts(x: torch.Tensor, dims: Sequence[int], full: Sizes) -> tuple[int, int]:
    """(kept count n, original count N) over ``dims``."""
    n = math.prod(int(x.shape[d]) for d in dims)
    big = math.prod(int(x.shape[d]) if f is None else int(f) for d, f in zip(dims, full))
    return n, big


def _stats(x: torch.Tensor, dims: Sequence[int], full: Sizes
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The mean of the N values (the zeros included), their sum of squared deviations from
    it, and N."""
    n, big = _counts(x, dims, full)
    v, m = torch.var_mean(x, list(dims), correction=0, keepdim=True)
    a = n / big
    return a * m, n * (v + (1.0 - a) * m * m), big


def _opmath(x: torch.Tensor) -> torch.Tensor:
    """Half and bfloat16 norms accumulate in float32, as ATen's do."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mean_full(x: torch.Tensor, dims: Sequence[int], keepdim: bool, dtype: torch.dtype | None,
              full: Sizes) -> torch.Tensor:
    """``mean`` over ``dims`` whose original widths were ``full``."""
    s = torch.sum(x, list(dims), keepdim=keepdim, dtype=dtype)
    return s / _counts(x, dims, full)[1]


def var_full(x: torch.Tensor, dims: Sequence[int], correction: float, keepdim: bool,
             full: Sizes, kind: str = "var") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``var`` / ``std`` / ``var_mean`` / ``std_mean`` over ``dims`` (original widths ``full``)."""
    mu, ss, big = _stats(x, dims, full)
    var = ss / max(big - correction, 0)
    if not keepdim:
        var, mu = var.squeeze(list(dims)), mu.squeeze(list(dims))
    out = var.sqrt() if kind.startswith("std") else var
    return (out, mu) if kind.endswith("_mean") else out


def _normalise(x: torch.Tensor, dims: Sequence[int], full: Sizes, eps: float) -> torch.Tensor:
    mu, ss, big = _stats(x, dims, full)
    return (x - mu) * torch.rsqrt(ss / big + eps)


def layer_norm_full(x: torch.Tensor, shape: Sequence[int], weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, full: Sizes) -> torch.Tensor:
    """``layer_norm`` over the last ``len(shape)`` dims, originally ``full`` wide."""
    dims = list(range(x.dim() - len(shape), x.dim()))
    y = _normalise(_opmath(x), dims, full, eps).to(x.dtype)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


def rms_norm_full(x: torch.Tensor, shape: Sequence[int], weight: torch.Tensor | None,
                  eps: float | None, full: Sizes) -> torch.Tensor:
    """``rms_norm`` over the last ``len(shape)`` dims, originally ``full`` wide."""
    dims = list(range(x.dim() - len(shape), x.dim()))
    xf = _opmath(x)
    n, big = _counts(x, dims, full)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = xf.pow(2).mean(dims, keepdim=True) * (n / big)
    y = (xf * torch.rsqrt(ms + eps)).to(x.dtype)
    return y * weight if weight is not None else y


def group_norm_full(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float, full_per_group: int) -> torch.Tensor:
    """``group_norm`` whose groups had ``full_per_group`` channels each."""
    b, c = x.shape[0], x.shape[1]
    g = x.reshape(b, groups, -1)
    spatial = g.shape[2] // (c // groups) if c else 0
    y = _normalise(_opmath(g), [2], [full_per_group * spatial], eps).to(x.dtype).reshape(x.shape)
    view = [1, c] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(view)
    return y + bias.reshape(view) if bias is not None else y


def batch_norm_full(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float, full: Sizes) -> torch.Tensor:
    """``batch_norm`` on batch statistics (every dim but 1), originally ``full`` wide."""
    dims = [0] + list(range(2, x.dim()))
    y = _normalise(_opmath(x), dims, full, eps).to(x.dtype)
    view = [1, x.shape[1]] + [1] * (x.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(view)
    return y + bias.reshape(view) if bias is not None else y


def _shifted(x: torch.Tensor, dim: int, full: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x - M`` and the softmax denominator over ``full`` values, ``M = max(max(x), 0)``."""
    m = torch.clamp_min(x.amax(dim, keepdim=True), 0.0)
    z = x - m
    denom = z.exp().sum(dim, keepdim=True) + (full - x.shape[dim]) * torch.exp(-m)
    return z, denom


def softmax_full(x: torch.Tensor, dim: int, full: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax`` over ``dim``, originally ``full`` wide."""
    xf = x.to(dtype) if dtype is not None else x
    z, denom = _shifted(xf, dim, full)
    return z.exp() / denom


def log_softmax_full(x: torch.Tensor, dim: int, full: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``log_softmax`` over ``dim``, originally ``full`` wide."""
    xf = x.to(dtype) if dtype is not None else x
    z, denom = _shifted(xf, dim, full)
    return z - denom.log()


def amax_full(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    """``amax`` with removed zeros among the values."""
    return torch.clamp_min(x.amax(list(dims), keepdim=keepdim), 0.0)


def amin_full(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    """``amin`` with removed zeros among the values."""
    return torch.clamp_max(x.amin(list(dims), keepdim=keepdim), 0.0)


def logsumexp_full(x: torch.Tensor, dims: Sequence[int], keepdim: bool, full: Sizes) -> torch.Tensor:
    """``logsumexp`` over ``dims`` (original widths ``full``): the zeros add ``exp(0)`` each."""
    n, big = _counts(x, dims, full)
    m = torch.clamp_min(x.amax(list(dims), keepdim=True), 0.0)
    s = (x - m).exp().sum(list(dims), keepdim=True) + (big - n) * torch.exp(-m)
    out = s.log() + m
    return out if keepdim else out.squeeze(list(dims))
