"""Unit tests of the channel algebra."""
import pytest

from etp_fx.graph.layout import Axis, Cat, LayoutError, Prod, kept_indices, leaves, new_size, resolve, unify


def test_union_of_leaves_is_one_axis():
    a, b = Axis(4), Axis(4)
    unify(a, b)
    assert resolve(a) is resolve(b)


def test_size_mismatch_raises():
    with pytest.raises(LayoutError):
        unify(Axis(3), Axis(4))


def test_heads_split_a_leaf_into_a_product():
    x, h, d = Axis(12), Axis(3), Axis(4)
    unify(x, Prod((h, d)))
    assert [l.size for l in leaves(x)] == [3, 4]
    # removing head 1 removes indices 4..7; removing head-dim 0 removes 0, 4, 8
    assert kept_indices(x, {h.uid: [0, 2]}) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert kept_indices(x, {d.uid: [1, 2, 3]}) == [1, 2, 3, 5, 6, 7, 9, 10, 11]


def test_concat_against_leaf_splits_it():
    x, a, b = Axis(5), Axis(2), Axis(3)
    unify(x, Cat((a, b)))
    assert kept_indices(x, {b.uid: [0]}) == [0, 1, 2]
    assert new_size(x, {a.uid: [1], b.uid: [0, 2]}) == 3


def test_product_regrouping_aligns_mixed_radix():
    # [12, 64] viewed as [3, 256]: 12 = 3 x 4 and 256 = 4 x 64
    h, d, p, q = Axis(12), Axis(64), Axis(3), Axis(256)
    unify(Prod((h, d)), Prod((p, q)))
    assert [l.size for l in leaves(h)] == [3, 4]
    assert [l.size for l in leaves(q)] == [4, 64]


def test_heads_over_a_concat_share_the_minor_axis():
    # Cat(A(8), B(8)) viewed as [4 heads, 4 dims]: the head-dim axis is shared by both parts
    a, b, h, d = Axis(8), Axis(8), Axis(4), Axis(4)
    unify(Cat((a, b)), Prod((h, d)))
    la, lb = list(leaves(a)), list(leaves(b))
    assert la[-1] is lb[-1]


def test_cut_inside_a_product_that_is_not_a_block_boundary_fails():
    h, d = Axis(2), Axis(4)
    with pytest.raises(LayoutError):
        unify(Prod((h, d)), Cat((Axis(3), Axis(5))))


def test_frozen_flag_passes_to_refined_leaves():
    x = Axis(6)
    x.frozen.append("interface")
    a, b = Axis(2), Axis(3)
    unify(x, Prod((a, b)))
    assert a.root().frozen and b.root().frozen
