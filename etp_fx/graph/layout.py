"""The channel algebra: how the indices of one tensor dimension map onto prunable units.

Every dimension of every tensor in the traced graph gets a *layout*, a small term over *axes*:

- an :class:`Axis` is a union-find variable of a fixed size: "a set of units that are the same
  wherever this axis appears";
- ``Cat((t1, t2, ...))``: the dim is the concatenation of the sub-layouts (concat, split);
- ``Prod((t1, t2, ...))``: the dim is their mixed-radix product, major first
  (flatten, heads: ``H*D`` is ``Prod((H, D))``).

Op rules only ever say "these two layouts are the same" (:func:`unify`). Unification refines
axes on demand: an axis of size 768 unified with ``Prod((12, 64))`` is split into two new axes.
When two layouts cannot be reconciled, every axis involved is frozen rather than guessed.

After all rules ran, each remaining *leaf* axis is one candidate group; its units are its
indices. Removing unit ``u`` of axis ``A`` removes, from every dim whose layout mentions ``A``,
the indices whose ``A``-coordinate is ``u`` (see :func:`kept_indices`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, Union

__all__ = [
    "Axis", "Cat", "Prod", "Term", "LayoutError", "unify", "resolve", "leaves", "size_of",
    "kept_indices", "new_size", "freeze", "mark_inexact",
]


from ..errors import LayoutError

_ids = itertools.count()


class Axis:
    """A union-find variable: ``size`` units that are the same units wherever it appears."""

    __slots__ = ("uid", "size", "parent", "form", "frozen", "inexact", "hint")

    def __init__(self, size: int, hint: str = "") -> None:
        self.uid = next(_ids)
        self.size = int(size)
        self.parent: Axis | None = None
        self.form: Term | None = None  # set on a root once it is refined into Cat/Prod
        self.frozen: list[str] = []  # why these units may not be removed
        self.inexact: list[str] = []  # why removing zeroed units changes the result
        self.hint = hint  # where the axis was born, for messages

    def root(self) -> "Axis":
        a = self
        while a.parent is not None:
            if a.parent.parent is not None:
                a.parent = a.parent.parent  # path halving
            a = a.parent
        return a

    def __repr__(self) -> str:
        return f"Axis#{self.uid}({self.size})"


@dataclass(frozen=True)
class Cat:
    parts: tuple["Term", ...]


@dataclass(frozen=True)
class Prod:
    parts: tuple["Term", ...]


Term = Union[Axis, Cat, Prod]


def size_of(t: Term) -> int:
    if isinstance(t, Axis):
        return t.size
    if isinstance(t, Cat):
        return sum(size_of(p) for p in t.parts)
    n = 1
    for p in t.parts:
        n *= size_of(p)
    return n


def resolve(t: Term) -> Term:
    """Normal form: roots followed through refinements, nested Cat/Prod flattened, and size-1
    factors dropped from products (they do not change any index)."""
    if isinstance(t, Axis):
        r = t.root()
        return resolve(r.form) if r.form is not None else r
    kind = type(t)
    parts: list[Term] = []
    for p in t.parts:
        p = resolve(p)
        if type(p) is kind:
            parts.extend(p.parts)
        elif not (kind is Prod and size_of(p) == 1):
            parts.append(p)
    if not parts:  # a product of size-1 factors
        return _one()
    if len(parts) == 1:
        return parts[0]
    return kind(tuple(parts))


def _one() -> Axis:
    a = Axis(1, "unit")
    a.frozen.append("size 1")
    return a


def leaves(t: Term) -> Iterator[Axis]:
    """The leaf axes of a layout, in index order (major first)."""
    t = resolve(t)
    if isinstance(t, Axis):
        yield t
    else:
        for p in t.parts:
            yield from leaves(p)


# --- refinement --------------------------------------------------------------------------------

def _refine(a: Axis, form: Term) -> None:
    """Bind leaf ``a`` to a compound (or other) term; its flags pass to the new leaves."""
    a = a.root()
    assert a.form is None, "only leaves are refined"
    form = resolve(form)
    if form is a:
        return
    if isinstance(form, Axis):
        _union(a, form)
        return
    a.form = form
    for leaf in leaves(form):
        _merge_flags(leaf, a)


def _union(a: Axis, b: Axis) -> None:
    a, b = a.root(), b.root()
    if a is b:
        return
    if a.size != b.size:
        raise LayoutError(f"size mismatch {a.size} != {b.size}")
    # keep the older axis as root so that ids (and messages) stay stable
    if b.uid < a.uid:
        a, b = b, a
    b.parent = a
    _merge_flags(a, b)


def _merge_flags(dst: Axis, src: Axis) -> None:
    for r in src.frozen:
        if r not in dst.frozen:
            dst.frozen.append(r)
    for r in src.inexact:
        if r not in dst.inexact:
            dst.inexact.append(r)
    if not dst.hint:
        dst.hint = src.hint


def _split_at(t: Term, k: int) -> tuple[Term, Term]:
    """Write ``t`` as ``Cat(left, right)`` with ``size(left) == k`` (refining as needed)."""
    t = resolve(t)
    n = size_of(t)
    assert 0 < k < n
    if isinstance(t, Axis):
        left, right = Axis(k, t.hint), Axis(n - k, t.hint)
        _refine(t, Cat((left, right)))
        return left, right
    if isinstance(t, Cat):
        off = 0
        for i, p in enumerate(t.parts):
            s = size_of(p)
            if off + s == k:
                return Cat(t.parts[: i + 1]), Cat(t.parts[i + 1:])
            if off < k < off + s:
                l, r = _split_at(p, k - off)
                return Cat(t.parts[:i] + (l,)), Cat((r,) + t.parts[i + 1:])
            off += s
        raise AssertionError("unreachable")
    # Prod(major, *rest): a cut that is a multiple of the inner block splits the major factor.
    inner = size_of(Prod(t.parts[1:]))
    if k % inner:
        raise LayoutError(f"cannot cut a {n}-wide product at {k} (inner block {inner})")
    l, r = _split_at(t.parts[0], k // inner)
    return Prod((l,) + t.parts[1:]), Prod((r,) + t.parts[1:])


def _factor(t: Term, major: int) -> tuple[Term, Term]:
    """Write ``t`` as ``Prod(m, q)`` with ``size(m) == major`` (refining as needed)."""
    t = resolve(t)
    n = size_of(t)
    if n % major:
        raise LayoutError(f"{n} is not a multiple of {major}")
    minor = n // major
    if major == 1:
        return _one(), t
    if minor == 1:
        return t, _one()
    if isinstance(t, Axis):
        m, q = Axis(major, t.hint), Axis(minor, t.hint)
        _refine(t, Prod((m, q)))
        return m, q
    if isinstance(t, Prod):
        acc = 1
        for i, p in enumerate(t.parts):
            s = size_of(p)
            if acc == major:
                return Prod(t.parts[:i]), Prod(t.parts[i:])
            if major % acc == 0 and (major // acc) < s and s % (major // acc) == 0:
                pm, pq = _factor(p, major // acc)
                return Prod(t.parts[:i] + (pm,)), Prod((pq,) + t.parts[i + 1:])
            acc *= s
            if acc > major:
                break
        raise LayoutError(f"cannot regroup a product of {[size_of(p) for p in t.parts]} "
                          f"as {major} x {minor}")
    # Cat: every segment must factor with the same minor block, and those blocks are one axis.
    majors, minors = [], []
    for p in t.parts:
        s = size_of(p)
        if s % minor:
            raise LayoutError(f"concat segment of {s} is not a multiple of {minor}")
        pm, pq = _factor(p, s // minor)
        majors.append(pm)
        minors.append(pq)
    for q in minors[1:]:
        unify(minors[0], q)
    return Cat(tuple(majors)), minors[0]


# --- unification -------------------------------------------------------------------------------

def unify(a: Term, b: Term) -> None:
    """Declare that layouts ``a`` and ``b`` index the same units. Raises :class:`LayoutError`
    when they cannot be reconciled; nothing is guessed."""
    a, b = resolve(a), resolve(b)
    if a is b:
        return
    na, nb = size_of(a), size_of(b)
    if na != nb:
        raise LayoutError(f"size mismatch {na} != {nb}")
    if isinstance(a, Axis) and isinstance(b, Axis):
        _union(a, b)
    elif isinstance(a, Axis):
        _refine(a, b)
    elif isinstance(b, Axis):
        _refine(b, a)
    elif isinstance(a, Cat) or isinstance(b, Cat):
        _unify_cuts(a, b)
    else:
        _unify_products(a, b)


def _segments(t: Term) -> list[Term]:
    return list(t.parts) if isinstance(t, Cat) else [t]


def _unify_cuts(a: Term, b: Term) -> None:
    # Cut both at the union of their segment boundaries, then unify piece by piece.
    cuts = sorted(set(_boundaries(a)) | set(_boundaries(b)))
    pa, pb = _cut(a, cuts), _cut(b, cuts)
    if len(pa) == 1:  # no cut at all: both are single segments, i.e. products
        _unify_products(pa[0], pb[0])
        return
    for x, y in zip(pa, pb):
        unify(x, y)


def _boundaries(t: Term) -> list[int]:
    out, off = [], 0
    for p in _segments(t)[:-1]:
        off += size_of(p)
        out.append(off)
    return out


def _cut(t: Term, cuts: Sequence[int]) -> list[Term]:
    pieces, rest, done = [], t, 0
    for c in cuts:
        left, rest = _split_at(rest, c - done)
        pieces.append(left)
        done = c
    pieces.append(rest)
    return pieces


def _unify_products(a: Term, b: Term) -> None:
    fa = list(a.parts) if isinstance(a, Prod) else [a]
    fb = list(b.parts) if isinstance(b, Prod) else [b]
    while fa and fb:
        x, y = fa.pop(0), fb.pop(0)
        sx, sy = size_of(x), size_of(y)
        if sx == sy:
            unify(x, y)
        elif sx > sy:
            xm, xq = _factor(x, sy)
            unify(xm, y)
            fa.insert(0, xq)
        else:
            ym, yq = _factor(y, sx)
            unify(x, ym)
            fb.insert(0, yq)
    if any(size_of(t) != 1 for t in fa + fb):
        raise LayoutError("products of different sizes")


# --- flags -------------------------------------------------------------------------------------

def freeze(terms: Iterable[Term], reason: str) -> None:
    """Mark every leaf under ``terms`` as not removable, with a reason for the summary."""
    for t in terms:
        for leaf in leaves(t):
            if reason not in leaf.frozen:
                leaf.frozen.append(reason)


def mark_inexact(terms: Iterable[Term], reason: str) -> None:
    """Removing zeroed units of these leaves changes the result (e.g. a norm over the dim)."""
    for t in terms:
        for leaf in leaves(t):
            if reason not in leaf.inexact:
                leaf.inexact.append(reason)


# --- indices -----------------------------------------------------------------------------------

def kept_indices(t: Term, keep: dict[int, Sequence[int]]) -> list[int]:
    """Indices of a dim that survive when each leaf ``uid`` in ``keep`` keeps those units.

    >>> h, d = Axis(2), Axis(3)
    >>> kept_indices(Prod((h, d)), {h.uid: [1]})
    [3, 4, 5]
    >>> kept_indices(Cat((h, d)), {d.uid: [0, 2]})
    [0, 1, 2, 4]
    """
    t = resolve(t)
    if isinstance(t, Axis):
        return list(keep.get(t.uid, range(t.size)))
    if isinstance(t, Cat):
        out, off = [], 0
        for p in t.parts:
            out.extend(off + i for i in kept_indices(p, keep))
            off += size_of(p)
        return out
    out = [0]
    for p in t.parts:
        s = size_of(p)
        sub = kept_indices(p, keep)
        out = [o * s + i for o in out for i in sub]
    return out


def new_size(t: Term, keep: dict[int, Sequence[int]]) -> int:
    """Size of a dim after pruning, without listing its indices."""
    t = resolve(t)
    if isinstance(t, Axis):
        return len(keep[t.uid]) if t.uid in keep else t.size
    if isinstance(t, Cat):
        return sum(new_size(p, keep) for p in t.parts)
    n = 1
    for p in t.parts:
        n *= new_size(p, keep)
    return n
