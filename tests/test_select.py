"""Selecting the units to remove: thresholds, ratios, MACs/params budgets, rounding, heads,
approximate groups, and the official element clipping."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx import select
from etp_fx import SelectionError
from etp_fx.regularise.controller import keep_counts


class Net(nn.Module):
    """Two exact conv groups (16 and 32 channels) and one exact neuron group (24)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 8, 1)
        self.f1 = nn.Linear(8, 24)
        self.f2 = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c3(x)).mean((2, 3))
        return self.f2(torch.relu(self.f1(x)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    m = Net()
    g = etp_fx.trace(m, torch.randn(1, 3, 8, 8))
    assert {grp.id for grp in g.groups} == {"c1.weight[0]", "c2.weight[0]", "c3.weight[0]",
                                            "f1.weight[0]"}
    return m, g


def zero_unit(m, conv_out, conv_in, i):
    with torch.no_grad():
        conv_out.weight[i].zero_()
        conv_out.bias[i].zero_()
        conv_in.weight[:, i].zero_()


def test_threshold_zero_removes_exactly_the_zero_units(net):
    _, g = net
    torch.manual_seed(0)
    m = Net()
    for i in (3, 7, 9):
        zero_unit(m, m.c1, m.c2, i)
    with torch.no_grad():
        m.c2.weight[5].zero_()  # producer row only: zero for "producer", not for "group"
        m.c2.bias[5].zero_()
    assert select.by_threshold(g, m, 0.0) == {"c1.weight[0]": [3, 7, 9]}
    assert select.by_threshold(g, m, 0.0, units="producer") == {"c1.weight[0]": [3, 7, 9],
                                                                "c2.weight[0]": [5]}
    assert etp_fx.selection_from(threshold=0.0).select(g, m) == {"c1.weight[0]": [3, 7, 9]}


def test_relative_threshold_min_keep_and_round_to(net):
    m, g = net
    norms = {"c2.weight[0]": np.arange(1, 33) / 32.0}
    plan = select.by_threshold(g, None, 0.5, relative=True, norms=norms)
    assert plan == {"c2.weight[0]": list(range(16))}  # 1/32 .. 16/32 <= 0.5 * max
    # every unit below the threshold: one survives, the strongest
    plan = select.by_threshold(g, None, 10.0, norms=norms)
    assert plan["c2.weight[0]"] == list(range(31))
    # round_to=8 rounds the kept width up: 17 kept -> 24 kept
    plan = select.by_threshold(g, None, 0.48, norms=norms)
    assert 32 - len(plan["c2.weight[0]"]) == 17
    plan = select.by_threshold(g, None, 0.48, norms=norms, round_to=8)
    assert 32 - len(plan["c2.weight[0]"]) == 24 and plan["c2.weight[0]"] == list(range(8))
    # a group narrower than round_to cannot be rounded: nothing is removed from it
    plan = select.by_threshold(g, None, 0.5, norms={"c3.weight[0]": np.arange(8.0)}, round_to=16)
    assert plan == {}


def test_ratio_per_group_and_global(net):
    m, g = net
    plan = select.by_ratio(g, m, 0.25)
    assert {k: len(v) for k, v in plan.items()} == {"c1.weight[0]": 4, "c2.weight[0]": 8,
                                                    "c3.weight[0]": 2, "f1.weight[0]": 6}
    norms = select.unit_norms(g, m)
    for gid, units in plan.items():  # the weakest units of each group go
        n = norms[gid]
        assert n[units].max() <= np.delete(n, units).min()
    # global: one group is much weaker than the others, after normalising by the group mean it
    # only loses its weakest units; without normalisation it loses everything but one
    fake = {"c1.weight[0]": np.full(16, 1e-3) * np.arange(1, 17),
            "c2.weight[0]": np.arange(1.0, 33.0), "f1.weight[0]": np.arange(1.0, 25.0)}
    raw = select.by_ratio(g, None, 0.2, scope="global", normalize=None, norms=fake)
    assert len(raw["c1.weight[0]"]) == 14 and "c2.weight[0]" not in raw
    fair = select.by_ratio(g, None, 0.2, scope="global", normalize="mean", norms=fake)
    assert sum(len(v) for v in fair.values()) == 14
    assert all(len(v) >= 3 for v in fair.values())


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_budget_is_met_with_the_fewest_units(net, kind):
    m, g = net
    fn = g.cost.macs if kind == "macs" else g.cost.params
    dense = fn()
    plan = select.by_budget(g, m, **{kind: 0.5})
    widths = {gid: g[gid].size - len(v) for gid, v in plan.items()}
    assert fn(widths) <= 0.5 * dense
    # removing one unit fewer (the last one taken) would miss the budget
    norms = select.unit_norms(g, m)
    assert all(w >= 1 for w in widths.values())
    tight = [gid for gid in widths if widths[gid] < g[gid].size]
    assert any(fn({**widths, gid: widths[gid] + 1}) > 0.5 * dense for gid in tight)
    # a budget is a share everywhere (compress, the CLI, Budget): an absolute count is refused
    with pytest.raises(etp_fx.SelectionError, match="share of the original to keep"):
        select.by_budget(g, m, **{kind: int(0.5 * dense)})
    assert norms  # norms were computed from the model


def test_budget_prefers_zero_units_and_respects_round_to(net):
    _, g = net
    torch.manual_seed(0)
    m = Net()
    for i in range(8):
        zero_unit(m, m.c2, m.c3, i)
    plan = select.by_budget(g, m, macs=0.8)  # zero units score 0: they are taken first
    assert list(plan) == ["c2.weight[0]"] and set(plan["c2.weight[0]"]) <= set(range(8))
    plan = select.by_budget(g, m, macs=0.4)
    assert set(range(8)) <= set(plan["c2.weight[0]"])
    plan = select.by_budget(g, m, params=0.6, round_to=8)
    for gid, v in plan.items():
        assert (g[gid].size - len(v)) % 8 == 0
    with pytest.raises(SelectionError, match="out of reach"):
        select.by_budget(g, m, macs=1e-6)


def test_heads_go_whole_and_approximate_groups_need_consent():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=4,
                            hidden_dim=16, mlp_dim=12, num_classes=3)
    g = etp_fx.trace(vit, torch.randn(1, 3, 16, 16))
    heads = next(grp for grp in g.groups if grp.unit_kind == "head")
    with torch.no_grad():  # zero head 2 everywhere it lives: q, k, v rows and out columns
        attn = vit.encoder.layers[0].self_attention
        for m in heads.members:
            p = vit.get_parameter(m.name)
            idx = [i for i, c in enumerate(m.coords) if c == 2]
            p.index_fill_(m.dim, torch.tensor(idx), 0.0)
    plan = select.by_threshold(g, vit, 0.0, include=["head"])
    assert plan == {heads.id: [2]}
    assert attn.in_proj_weight.shape[0] == 48  # a head is 4 rows of each of q, k and v
    # a product over the features: removing zeroed features changes it (approximate)
    model = ProdMix()
    g = etp_fx.trace(model, torch.randn(2, 4))
    approx = [grp.id for grp in g.groups if not grp.exact]
    assert approx == ["a.weight[0]"]
    ratio = select.by_ratio(g, model, 0.5)
    assert not set(ratio) & set(approx)
    ratio = select.by_ratio(g, model, 0.5, allow_approximate=True)
    assert set(approx) <= set(ratio)


class ProdMix(nn.Module):
    """An exact group (``b``'s outputs) and an approximate one (``a``'s, reduced by a product)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h))) + h.prod(-1, keepdim=True)


def test_bad_selection_arguments(net):
    m, g = net
    with pytest.raises(SelectionError, match="exactly one of"):
        etp_fx.selection_from(threshold=0.1, ratio=0.5)
    with pytest.raises(SelectionError, match=r"ratio is the share of units to remove and must lie in \[0, 1\)"):
        select.by_ratio(g, m, 1.0)
    with pytest.raises(SelectionError, match="has 3 values; the group has 16"):
        select.by_threshold(g, None, 0.1, norms={"c1.weight[0]": [1, 2, 3]})
    with pytest.raises(SelectionError, match="no group 'nope'"):
        select.by_threshold(g, None, 0.1, norms={"nope": [1.0]})


def test_official_clipping_callback():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.c2.weight[0, 0] = 1e-4
        m.c2.weight[0, 1] = -4e-4
        m.c2.weight[0, 2] = 6e-4
        m.c1.bias[0] = 1e-5  # a bias: not clipped (only weights with 2+ dims)
    small = (m.c2.weight.abs() < 5e-4).sum().item()
    assert small >= 18 and (m.c2.weight == 0).sum().item() == 0
    clip = etp_fx.ElementClipping(5e-4, every=2)
    assert clip(m) is None  # epoch 0: not a clipping epoch
    zeros = clip(m)
    assert (m.c2.weight == 0).sum().item() == small
    assert not m.c2.weight[0, :2].any()
    assert (m.c2.weight[0, 2] == 6e-4).all()
    assert m.c1.bias[0].item() == pytest.approx(1e-5)
    assert clip.history == [(1, zeros)]


# --- uniform=True: the same count in every repeated block ----------------------------------

def _blocks(n=3):
    """``n`` MLP blocks of unequal scale: a per-layer selection keeps different widths."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(n)]
    with torch.no_grad():
        for i, b in enumerate(blocks):
            b[0].weight.mul_(0.2 + i)
    net = nn.Sequential(*blocks).eval()
    return net, etp_fx.trace(net, torch.randn(2, 8))


def _counts(plan, graph):
    hidden = [grp.id for grp in graph.groups if grp.size == 16]
    return [len(plan.get(gid, [])) for gid in hidden]


@pytest.mark.parametrize("sel", [etp_fx.Ratio(0.3, scope="global", normalize=None),
                                 etp_fx.Budget(params=0.7, normalize=None),
                                 etp_fx.Threshold(0.6)], ids=["ratio", "budget", "threshold"])
def test_uniform_selection_removes_the_same_count_per_layer(sel):
    import dataclasses
    from etp_fx.regularise.uniform import role_of
    net, g = _blocks()
    plain = _counts(sel.select(g, net), g)
    assert len(set(plain)) > 1, plain  # the test is not vacuous: per layer they differ
    uniform = dataclasses.replace(sel, uniform=True)
    plan = uniform.select(g, net)
    counts = _counts(plan, g)
    assert len(set(counts)) == 1 and counts[0] == int(sum(plain) / len(plain) + 0.5)
    norms = select.unit_norms(g, net)
    for gid, units in plan.items():  # each layer loses its own weakest units
        weakest = np.argsort(np.asarray(norms[gid]), kind="stable")[: len(units)]
        assert sorted(units) == sorted(int(i) for i in weakest)
    assert {role_of(gid) for gid in plan} == {"*.0.weight[0]"}  # the hidden MLP width
    assert uniform.select(g, None, norms=norms) == plan  # norms given instead of the model


def test_uniform_applies_to_compress_and_is_refused_for_a_plan():
    net, g = _blocks()
    x = torch.randn(4, 8)
    small = etp_fx.compress(net, x, ratio=0.3, scope="global", normalize=None, uniform=True,
                            graph=g)
    groups = small.meta["etp_report"]["groups"]
    widths = {r["new"] for gid, r in groups.items() if r["old"] == 16}
    assert len(widths) == 1 and widths != {16} and len(groups) == 3, groups
    assert small(torch.randn(3, 8)).shape == (3, 8)  # verified against the zeroed original
    with pytest.raises(SelectionError, match="norm-based"):
        etp_fx.Plan({"0.0.weight[0]": [0]}, uniform=True)
    with pytest.raises(SelectionError, match="norm-based"):
        etp_fx.compress(net, x, remove={"0.0.weight[0]": [0]}, uniform=True)
    with pytest.raises(SelectionError, match="uniform must be True or False"):
        etp_fx.Ratio(0.3, uniform="yes")
    assert etp_fx.Plan({"0.0.weight[0]": [0]}).uniform is False


@pytest.mark.parametrize("kind", ["macs", "params"])
def test_budget_by_group_share_keeps_one_share_of_every_group(net, kind):
    """scope="group": every group keeps ceil(w * n) units for the largest w that meets the
    budget, and drops its weakest units; the target-driven regulariser puts its knee at
    exactly these widths, so what it drives to zero is what compress removes."""
    m, g = net
    fn = g.cost.macs if kind == "macs" else g.cost.params
    b = etp_fx.Budget(**{kind: 0.3}, scope="group")
    plan = b.select(g, m)
    widths = {gid: g[gid].size - len(plan.get(gid, [])) for gid in (x.id for x in g.groups)}
    assert fn(widths) <= 0.3 * fn()
    shares = [w / g[gid].size for gid, w in widths.items()]
    assert max(shares) - min(shares) < 1 / 16 + 1e-9  # one share, up to rounding (16 units)
    assert any(fn({**widths, gid: w + 1}) > 0.3 * fn() for gid, w in widths.items())
    norms = select.unit_norms(g, m)
    for gid, drop in plan.items():  # the weakest of each group go
        kept = np.setdiff1d(np.arange(g[gid].size), drop)
        assert norms[gid][drop].max() <= norms[gid][kept].min()
    sizes = {x.id: x.size for x in g.groups}
    assert keep_counts(g, b, sizes) == widths
    with pytest.raises(SelectionError, match="scope must be 'group' or 'global'"):
        etp_fx.Budget(macs=0.3, scope="layer")
