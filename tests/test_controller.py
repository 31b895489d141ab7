"""The target drives the strength: the controller's rules, the knee at the keep boundary, the
regulariser's clock, bad input, and an end-to-end run where compress with the same target
barely changes the trained model's output."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import etp_fx
from etp_fx.demo import SmallVGG
from etp_fx.errors import RegulariserError
from etp_fx.regularise.controller import StrengthController, keep_counts, removal_share, \
    target_selection
from etp_fx.regularise.selection import selection_from


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = mlp()
    return m, etp_fx.trace(m, torch.randn(2, 6))


# --- the target as a Selection -----------------------------------------------------------------

def test_keyword_target_is_the_selection_compress_builds():
    assert target_selection(target_macs=0.25) == selection_from(target_macs=0.25)
    assert target_selection(target_params=0.5) == selection_from(target_params=0.5)
    assert target_selection(ratio=0.5) == selection_from(ratio=0.5)
    assert target_selection(selection=etp_fx.Budget(macs=0.3)) == etp_fx.Budget(macs=0.3)
    assert target_selection() is None
    with pytest.raises(etp_fx.SelectionError, match="in \\(0, 1\\]"):
        target_selection(target_macs=1.5)  # the same validation as compress
    with pytest.raises(RegulariserError, match="not both"):
        target_selection(etp_fx.Budget(macs=0.3), target_macs=0.3)
    for sel in (etp_fx.Threshold(0.01), etp_fx.Plan({"0.weight[0]": [1]})):
        with pytest.raises(RegulariserError, match="cannot drive the strength"):
            target_selection(sel)
    with pytest.raises(RegulariserError, match="units='producer'.*make them agree"):
        target_selection(etp_fx.Budget(macs=0.3, units="producer"))


def test_keep_counts_meet_the_target_with_one_width_share():
    torch.manual_seed(0)
    m = SmallVGG(image_size=16)
    g = etp_fx.trace(m, torch.randn(1, 1, 16, 16))
    sizes = {grp.id: grp.size for grp in g.groups}
    dense = g.cost.macs()
    for share in (0.25, 0.125):
        keep = keep_counts(g, etp_fx.Budget(macs=share), sizes)
        got = g.cost.macs(keep) / dense
        assert share * 0.85 < got <= share
        shares = [keep[k] / n for k, n in sizes.items()]
        assert max(shares) - min(shares) < 0.05  # one width share, up to rounding
    assert keep_counts(g, etp_fx.Ratio(0.5), sizes) == {k: n // 2 for k, n in sizes.items()}
    keep = keep_counts(g, etp_fx.Budget(params=0.5, round_to=8), sizes)
    assert all(k % 8 == 0 or k == sizes[gid] for gid, k in keep.items())


# --- the controller's rules, on norms we choose ---------------------------------------------------

def norms_with_share(graph, ratio_left):
    """Every group: the first half of the units at norm 1, the second half at ``v`` such that
    the second half holds ``ratio_left`` of the mass (Ratio(0.5) removes that half)."""
    v = ratio_left / (1 - ratio_left)
    out = {}
    for grp in graph.groups:
        n = np.ones(grp.size)
        n[grp.size // 2:] = v
        out[grp.id] = n
    return out


def controller(graph, **kw):
    opts = dict(start=0.1, interval=1, warmup=0.0, reach=0.5, floor=0.1, ramp=0.1)
    opts.update(kw)
    return StrengthController(etp_fx.Ratio(0.5), 100, **opts)


def test_schedule_falls_from_the_first_share_to_the_floor(small):
    _, g = small
    c = controller(g, warmup=0.2, reach=0.6)
    c.update(g, norms_with_share(g, 0.5), 1, 0.0)
    assert c.goal(10) == pytest.approx(0.5) and c.goal(20) == pytest.approx(0.5)
    assert c.goal(40) == pytest.approx(0.3)  # halfway from 0.5 to 0.1
    assert c.goal(60) == c.goal(99) == pytest.approx(0.1)


def test_raise_hold_and_lower(small):
    _, g = small
    c = controller(g)
    up = c.up
    assert up == pytest.approx(100 ** (1 / 10))  # x100 within ramp * steps = 10 steps
    s = c.update(g, norms_with_share(g, 0.5), 1, 0.0)
    assert s == 0.1 and c.last.left == pytest.approx(0.5)
    s2 = c.update(g, norms_with_share(g, 0.5), 2, s)  # above the falling goal, not closing
    assert s2 == pytest.approx(s * up)
    s3 = c.update(g, norms_with_share(g, 0.48), 3, s2)  # above, but closing fast: hold
    assert s3 == s2
    s4 = c.update(g, norms_with_share(g, 0.1), 4, s3)  # below the goal: lower
    assert s4 == pytest.approx(s3 / math.sqrt(up))
    assert [h.step for h in c.history] == [1, 2, 3, 4]


def test_strength_is_capped_after_reach_and_overall(small):
    _, g = small
    c = controller(g, most=1.0, settle=2.0)
    s = c.update(g, norms_with_share(g, 0.5), 1, 0.0)
    for step in range(2, 100):  # the share never falls: the controller keeps asking for more
        s = c.update(g, norms_with_share(g, 0.5), step, s)
        assert s <= 1.0 + 1e-12
    c = controller(g, settle=2.0, most=1e9, ceiling=1e9)
    s = c.update(g, norms_with_share(g, 0.5), 1, 0.0)
    for step in range(2, 51):
        s = c.update(g, norms_with_share(g, 0.5), step, s)
    at_reach = s
    for step in range(51, 100):
        s = c.update(g, norms_with_share(g, 0.5), step, s)
    assert s <= 2.0 * at_reach * (1 + 1e-9)


def test_backs_off_when_the_task_loss_rises(small):
    _, g = small
    c = controller(g)
    s = c.update(g, norms_with_share(g, 0.5), 1, 0.0)
    c.observe_loss(2.3)
    for _ in range(60):
        c.observe_loss(0.01)  # a classifier's loss near zero: noise must not count as a rise
    for _ in range(5):
        c.observe_loss(0.03)
    s = c.update(g, norms_with_share(g, 0.5), 2, s)  # above the goal: raised
    assert s > 0.1
    for _ in range(60):
        c.observe_loss(1.0)  # gave back far more than a tenth of the way down
    s2 = c.update(g, norms_with_share(g, 0.5), 3, s)
    assert s2 == pytest.approx(s / c.backoff)
    s3 = c.update(g, norms_with_share(g, 0.5), 4, s2)  # still risen: backs off again
    assert s3 == pytest.approx(s2 / c.backoff)


def test_bad_controller_options(small):
    _, g = small
    with pytest.raises(RegulariserError, match="floor must lie in"):
        StrengthController(etp_fx.Ratio(0.5), 10, floor=2)
    with pytest.raises(RegulariserError, match="steps must be a positive integer"):
        StrengthController(etp_fx.Ratio(0.5), 0)
    c = StrengthController(etp_fx.Ratio(0.5))
    with pytest.raises(RegulariserError, match="needs the number of training steps"):
        c.update(g, norms_with_share(g, 0.5), 1, 0.0)


# --- the regulariser -----------------------------------------------------------------------------

def test_no_strength_and_no_target_says_how(small):
    _, g = small
    with pytest.raises(RegulariserError, match="give strength= or a target: target_macs="):
        etp_fx.ExponentialTorque(g)
    with pytest.raises(RegulariserError, match="steps= and control= go with a target"):
        etp_fx.ExponentialTorque(g, strength=1.0, steps=10)
    with pytest.raises(RegulariserError, match="preset='paper' is the official recipe"):
        etp_fx.ExponentialTorque(g, preset="paper", target_macs=0.5, steps=10)
    with pytest.raises(RegulariserError, match="use normalize='decay'"):
        etp_fx.ExponentialTorque(g, target_macs=0.5, steps=10, normalize="init")
    with pytest.raises(RegulariserError, match="control=.*unexpected keyword"):
        etp_fx.ExponentialTorque(g, target_macs=0.5, steps=10, control={"nope": 1})


@pytest.mark.parametrize("cls", [etp_fx.ExponentialTorque, etp_fx.Torque])
def test_calls_are_the_clock(small, cls):
    m, g = small
    reg = cls(g, target_macs=0.5, steps=40, control={"interval": 4, "warmup": 0.0})
    assert reg.strength == 0.01 and reg.target == etp_fx.Budget(macs=0.5)
    per_strength = reg.value(m).item() / reg.strength
    for _ in range(9):
        reg(m)
    assert reg.calls == 9 and [h.step for h in reg.controller.history] == [1, 5, 9]
    assert reg.strength == reg.controller.last.strength
    # the penalty follows the controlled strength (a tensor updated in place)
    assert reg.value(m).item() / reg.strength == pytest.approx(per_strength, rel=1e-5)
    assert reg.left == reg.controller.last.left
    started = cls(g, target_macs=0.5, steps=40, strength=0.3)
    assert started.strength == 0.3  # strength= with a target: where the controller starts


def test_steps_can_come_later(small):
    m, g = small
    reg = etp_fx.ExponentialTorque(g, ratio=0.5)
    with pytest.raises(RegulariserError, match="pass steps= to the regulariser"):
        reg(m)
    reg = etp_fx.ExponentialTorque(g, ratio=0.5)
    reg.set_steps(20)
    reg(m)
    assert reg.controller.last.step == 1
    with pytest.raises(RegulariserError, match="set_steps\\(\\) is for a target-driven"):
        etp_fx.ExponentialTorque(g, strength=1.0).set_steps(3)


def test_the_knee_pulls_the_boundary_unit_at_rate_strength(small):
    m, g = small
    reg = etp_fx.ExponentialTorque(g, ratio=0.5, steps=10)
    for s in reg.unit_sets:
        o, k = reg.norms.offsets[s.id], reg.keep[s.id]
        coef = reg.coef[o: o + s.size]
        # the boundary sits between unit k-1 and unit k of the index chain: the exponential
        # force there is the geometric mean of theirs, and it is the group's mean |w|
        numel = reg.norms.unit_numel[o: o + s.size]
        init = reg.norms.arrays(reg.norms.read(m, 1))[s.id]
        kappa = init.sum() / numel.sum()
        assert math.sqrt(coef[k - 1] * coef[k]) == pytest.approx(kappa, rel=1e-9)
        assert coef[-1] / coef[0] == pytest.approx(1.01 ** (500 * (s.size - 1) / s.size))
    plain = etp_fx.ExponentialTorque(g, ratio=0.5, steps=10, control={"knee": False})
    ref = etp_fx.ExponentialTorque(g, strength=1.0)
    np.testing.assert_allclose(plain.coef, ref.coef)  # no knee: the usual mean normalisation


def test_removal_share_is_the_mass_in_the_units_the_selection_removes(small):
    _, g = small
    norms = norms_with_share(g, 0.2)
    plan, left, kept = removal_share(g, etp_fx.Ratio(0.5), norms)
    assert all(sorted(u) == list(range(grp.size // 2, grp.size))
               for grp in g.groups for u in [plan[grp.id]])
    assert left == pytest.approx(0.2) and kept > 0


def test_after_reach_only_the_units_to_remove_stay_penalised(small):
    m, g = small
    reg = etp_fx.ExponentialTorque(g, ratio=0.5, steps=20,
                                   control={"interval": 2, "warmup": 0.0})
    held = etp_fx.ExponentialTorque(g, ratio=0.5, steps=20,
                                    control={"interval": 2, "warmup": 0.0, "release": False})
    before = reg.coef.copy()
    for step in range(1, 21):
        reg(m)
        held(m)
        assert (reg.controller.released is None) == (step < 15)  # updates at 1, 3, ..., 15
    plan = reg.controller.released
    assert held.controller.released is None and np.array_equal(held.coef, before)
    for s in reg.unit_sets:
        o = reg.norms.offsets[s.id]
        gone = np.zeros(s.size, bool)
        gone[plan.get(s.id, [])] = True
        coef = reg.coef[o: o + s.size]
        assert gone.any() and (coef[~gone] == 0).all()
        np.testing.assert_array_equal(coef[gone], before[o: o + s.size][gone])
    # the penalty (and the decoupled update) now read only the removed units
    assert reg.value(m).item() < held.value(m).item() * reg.strength / held.strength


# --- end to end ----------------------------------------------------------------------------------

def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16
    return x, torch.tensor(d.target)


def train(model, reg, x, y, steps, opt):
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, 1500, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        total = loss + reg(model, loss=loss) if reg is not None else loss
        opt.zero_grad()
        total.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("cls", [etp_fx.ExponentialTorque, etp_fx.Torque])
def test_target_driven_training_then_compress_with_the_same_target(cls):
    x, y = digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10))
    g = etp_fx.trace(net, x[:2])
    reg = cls(g, target_macs=0.25, steps=300)  # no strength: the target drives it
    train(net, reg, x, y, 300, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    small = etp_fx.compress(net, x[:2], target_macs=0.25, graph=g)
    rep = small.meta["etp_report"]
    assert rep["macs_after"] <= 0.25 * rep["macs_before"]
    with torch.no_grad():
        dense, pruned = net(x[1500:]), small(x[1500:])
    acc = lambda out: float((out.argmax(1) == y[1500:]).float().mean())  # noqa: E731
    # the units the target removes hold (almost) nothing, and the kept ones still work
    assert float((dense - pruned).abs().max() / dense.abs().max()) < 0.03
    assert abs(acc(dense) - acc(pruned)) <= 0.01 and acc(pruned) > 0.8
    first = reg.controller.history[0].left
    assert reg.controller.last.left < 0.5 * first  # from a third of the mass to about 0.1
    strengths = [h.strength for h in reg.controller.history]
    assert max(strengths) > 10 * strengths[0]  # it had to raise the strength to get there
