"""Tracing small models: groups, members, roles, barriers, and the user's model left alone."""
import copy

import pytest
import torch
import torch.nn as nn

import etp_fx


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def group_names(g):
    return {grp.id: {(m.name, m.dim) for m in grp.members} for grp in g.groups}


def test_residual_and_flatten_groups():
    g = etp_fx.trace(Residual(), torch.randn(2, 3, 8, 8))
    groups = group_names(g)
    assert set(groups) == {"stem.weight[0]", "a.weight[0]"}
    assert groups["stem.weight[0]"] == {
        ("stem.weight", 0), ("stem.bias", 0), ("bn.weight", 0), ("bn.bias", 0),
        ("bn.running_mean", 0), ("bn.running_var", 0), ("a.weight", 1), ("b.weight", 0),
        ("b.bias", 0), ("head.weight", 1)}
    head = next(m for m in g["stem.weight[0]"].members if m.name == "head.weight")
    # flatten: channel c owns the 16 consecutive features c*16 .. c*16+15
    assert head.coords[:17] == (0,) * 16 + (1,)
    assert g["stem.weight[0]"].exact


def test_model_is_not_modified_and_mode_restored():
    m = Residual().train()
    m.bn.eval()
    before = copy.deepcopy(m.state_dict())
    etp_fx.trace(m, torch.randn(2, 3, 8, 8))
    assert m.training and not m.bn.training
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_op_is_a_barrier_that_freezes_its_channels():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.fft.fft(self.a(x)).real)

    g = etp_fx.trace(Odd(), torch.randn(2, 4))
    assert g.groups == []
    assert any("fft" in b for b in g.barriers)


def test_layernorm_group_is_exact_only_where_removed_units_are_zero():
    # a Linear's removed rows are zero at the norm's input: the norm keeps the original count
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    (grp,) = etp_fx.trace(m, torch.randn(3, 4)).groups
    assert grp.exact
    # after a sigmoid they are 0.5, not zero: removing them changes the norm's statistics
    m = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.LayerNorm(8), nn.Linear(8, 2))
    (grp,) = etp_fx.trace(m, torch.randn(3, 4)).groups
    assert not grp.exact and "layer_norm" in grp.inexact_reasons[0]


def test_wrong_input_shape_says_what_was_given():
    with pytest.raises(etp_fx.InputError, match=r"Tensor\(2, 5\)"):
        etp_fx.trace(nn.Linear(4, 2), torch.randn(2, 5))


def test_tracing_twice_gives_identical_groups():
    m = Residual()
    a = etp_fx.trace(m, torch.randn(1, 3, 8, 8))
    b = etp_fx.trace(m, torch.randn(1, 3, 8, 8))
    assert [(x.id, x.size, x.members) for x in a.groups] == [(x.id, x.size, x.members) for x in b.groups]
