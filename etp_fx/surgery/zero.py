"""``zero_units``: the *zeroed original*, the model that a compressed model must reproduce.

:func:`zeroed_in_place` gives the same model without a copy: the user's own model with the
slices zeroed for the duration of a ``with`` block, restored bit for bit afterwards (the
module output computes its references that way, so no full-size zeroed copy exists).
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Collection, Iterable, Iterator, Mapping

import torch

from ..errors import ModelError
from ..graph.depgraph import DependencyGraph, Member
from ..graph.signature import check_model_matches
from ..graph.plan import check_plan

__all__ = ["zero_units", "zeroed_slices", "zeroed_in_place", "fingerprint"]


def _zeroes(m: Member, param: torch.Tensor, keep_constants: bool) -> bool:
    """Which member slices are zeroed.

    By default every parameter slice of the unit: what writes it, what reads it (consumer
    columns) and its per-unit vectors, so the unit contributes nothing anywhere. Buffers
    (running statistics) are kept. With ``keep_constants`` only the weights that write the unit
    are zeroed; consumer columns and per-unit vectors (biases, norm shifts) stay, so the unit
    carries a constant that ``compress`` folds into its consumers (and refuses to remove when
    the value is not constant, e.g. a query head whose shared values still flow).
    """
    if m.is_buffer:
        return False
    if keep_constants and ("in" in m.roles or param.dim() == 1):
        return False
    return True


def zeroed_slices(graph: DependencyGraph, plan: Mapping[str, list[int]], keep_constants: bool,
                  params: Mapping[str, torch.Tensor], whole: Collection[str] = ()
                  ) -> list[tuple[str, int, torch.Tensor]]:
    """``(param name, dim, indices)`` for every slice that :func:`zero_units` zeroes; the
    groups in ``whole`` are zeroed whole whatever ``keep_constants`` says."""
    out = []
    for gid, units in plan.items():
        grp = graph[gid]
        gone = sorted(set(units))
        block = tuple(range(grp.size))
        keep = keep_constants and gid not in whole
        for m in grp.members:
            p = params.get(m.name)
            if p is None or not _zeroes(m, p, keep):
                continue
            idx = _positions(m.coords, gone, block)
            out.append((m.name, m.dim, torch.tensor(idx, dtype=torch.long, device=p.device)))
    return out


def _positions(coords: tuple[int, ...], gone: list[int], block: tuple[int, ...]) -> list[int]:
    """The indices ``i`` with ``coords[i]`` in ``gone`` (sorted units), in increasing order.

    Most members hold the group's units as one block in order (the whole dim, or one segment
    of a concat), the rest of the dim being other groups' (-1): then the indices are the
    block's start plus the units, found with tuple operations in C instead of a Python loop
    over the dim (a densenet concat is thousands of indices wide, met once per group)."""
    start = coords.index(0) if 0 in coords else -1
    if start >= 0 and coords[start:start + len(block)] == block and \
            coords.count(-1) == len(coords) - len(block):
        return [start + u for u in gone]
    wanted = set(gone)
    return [i for i, c in enumerate(coords) if c in wanted]


def zero_units(model: torch.nn.Module, graph: DependencyGraph,
               remove: Mapping[str, Iterable[int]], *, keep_constants: bool = False
               ) -> torch.nn.Module:
    """Zero, in place, the parameter slices of the given units; return ``model``.

    Parameters
    ----------
    model : nn.Module
        The model the graph was traced from (same parameter names and shapes).
    graph : DependencyGraph
    remove : dict
        ``{group_id: [unit indices]}``.
    keep_constants : bool
        Zero only the weights that write the units; keep the consumers' columns and per-unit
        vectors (biases, norm parameters). The removed units then carry constants, which
        :func:`etp_fx.compress` folds into the consumers' bias.

    Examples
    --------
    >>> import torch, etp_fx
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    >>> g = etp_fx.trace(net, torch.randn(1, 2))
    >>> _ = etp_fx.zero_units(net, g, {"0.weight[0]": [1]})
    >>> net[0].weight[1].abs().sum().item(), net[0].bias[1].item()
    (0.0, 0.0)
    """
    check_model_matches(graph, model)
    plan = check_plan(graph, remove)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    with torch.no_grad():
        for name, dim, idx in zeroed_slices(graph, plan, keep_constants, params):
            params[name].index_fill_(dim, idx, 0.0)
    return model


def fingerprint(t: torch.Tensor) -> tuple[str, tuple[int, ...], int]:
    """``t``'s dtype, shape and the CRC-32 of its bytes, read in chunks without copying a
    contiguous CPU tensor (about 1 GB/s). Other bits (a sign of zero, a NaN payload) give
    another CRC, except by a 2**-32 chance: a guard against a wrong restore, not a proof."""
    src = t.detach()
    src = (src if src.is_contiguous() else src.contiguous()).reshape(-1)
    crc = 0
    for chunk in src.split(1 << 24):
        crc = zlib.crc32(chunk.cpu().view(torch.uint8).numpy(), crc)
    return str(t.dtype), tuple(t.shape), crc


@contextlib.contextmanager
def zeroed_in_place(model: torch.nn.Module, graph: DependencyGraph,
                    remove: Mapping[str, Iterable[int]], *, keep_constants: bool = False
                    ) -> Iterator[torch.nn.Module]:
    """``model`` itself as :func:`zero_units` would make it, inside the ``with`` block only.

    Only the values that zeroing changes are saved (the removed units' slices, a fraction of
    the model) and put back afterwards, whatever the block raised. After a block that
    succeeded the model is checked to be bit for bit as it was given: no zeroed parameter
    was written in the block (version counters), and every restored slice has the
    :func:`fingerprint` it had before. Another thread using ``model`` meanwhile sees the
    zeros.

    Raises
    ------
    ModelError
        A zeroed parameter was written in the block (a forward that updates its weights),
        or a slice differs after the restore.
    """
    check_model_matches(graph, model)
    plan = check_plan(graph, remove)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    slices = [(n, params[n], d, i) for n, d, i in
              zeroed_slices(graph, plan, keep_constants, params)]
    with torch.no_grad():  # every slice saved before any is zeroed: all hold the originals
        saved = [p.index_select(d, i) for _, p, d, i in slices]
    before = [fingerprint(v) for v in saved]
    try:
        with torch.no_grad():
            for _, p, dim, idx in slices:
                p.index_fill_(dim, idx, 0.0)
        versions = [_version_of(p) for _, p, _, _ in slices]
        yield model
        written = [n for (n, p, _, _), v in zip(slices, versions) if _version_of(p) != v]
    finally:
        _restore(slices, saved)
    with torch.no_grad():
        differ = [n for (n, p, d, i), digest in zip(slices, before)
                  if fingerprint(p.index_select(d, i)) != digest]
    if written or differ:
        raise ModelError(
            f"parameter(s) {sorted(set(written + differ))[:3]} of {type(model).__name__} were "
            f"written while etp_fx held their removed units at zero: parameters must only be "
            f"read in forward, and nothing else may use the model during compress. The "
            f"zeroed slices were restored.")


def _version_of(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def _restore(slices: list[tuple[str, torch.Tensor, int, torch.Tensor]],
             saved: list[torch.Tensor]) -> None:
    """Put the saved values (taken before any zeroing: the originals) back."""
    with torch.no_grad():
        for (_, p, dim, idx), values in zip(reversed(slices), reversed(saved)):
            p.index_copy_(dim, idx, values)
    saved.clear()
