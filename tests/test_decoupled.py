"""The decoupled (proximal) form of the penalty: ``reg.attach(optimizer)``."""
import copy

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.errors import RegulariserError
from etp_fx.regularise.torque import ExponentialTorque


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return x, x[:, :3].argmax(1)


def sgd_step(model, opt, x, y, reg=None):
    loss = nn.functional.cross_entropy(model(x), y)
    if reg is not None:
        loss = loss + reg(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("norm,lr", [("l1", 1e-2), ("l2", 1e-3)])
def test_one_sgd_step_equals_the_loss_term_step(norm, lr):
    x, y = data()
    a = mlp()
    b = copy.deepcopy(a)
    g = etp_fx.trace(a, x[:1])
    loss_term = ExponentialTorque(g, strength=0.5, norm=norm, model=a)
    decoupled = ExponentialTorque(g, strength=0.5, norm=norm, model=b)
    opt_a = torch.optim.SGD(a.parameters(), lr=lr)
    opt_b = torch.optim.SGD(b.parameters(), lr=lr)
    decoupled.attach(opt_b)
    before = [p.detach().clone() for p in a.parameters()]
    sgd_step(a, opt_a, x[:32], y[:32], loss_term)
    sgd_step(b, opt_b, x[:32], y[:32])
    assert decoupled.calls == 1
    moved, compared, total = 0.0, 0, 0
    for w0, p, q in zip(before, a.parameters(), b.parameters()):
        p, q = p.detach(), q.detach()
        same_side = (torch.sign(w0) == torch.sign(p)) & (q != 0)  # nothing crossed zero
        torch.testing.assert_close(q[same_side], p[same_side], rtol=0,
                                   atol=1e-6 if norm == "l1" else 5e-7)
        compared, total = compared + int(same_side.sum()), total + p.numel()
        moved = max(moved, (p - w0).abs().max().item())
    assert compared > 0.95 * total
    assert moved > 1e-4  # the comparison is not between two unchanged models


def test_weights_that_would_cross_zero_land_exactly_on_zero():
    x, y = data()
    model = mlp()
    g = etp_fx.trace(model, x[:1])
    reg = ExponentialTorque(g, strength=50.0, model=model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    reg.attach(opt)
    w = model[2].weight
    before = w.detach().clone()
    sgd_step(model, opt, x[:32], y[:32])
    zeros = (w == 0).sum().item()
    assert zeros > 0.3 * w.numel()
    assert not (torch.sign(w) * torch.sign(before) < 0).any()  # none jumped across zero


def test_l2_units_go_to_zero_whole():
    x, y = data()
    model = mlp()
    g = etp_fx.trace(model, x[:1])
    reg = ExponentialTorque(g, strength=200.0, norm="l2", model=model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    reg.attach(opt)
    sgd_step(model, opt, x[:32], y[:32])
    norms = torch.cat(list(reg.unit_norms(model, "l2").values()))
    assert (norms == 0).sum().item() > 5
    rows = model[0].weight.detach()
    assert ((rows == 0).all(1) | (rows != 0).all(1)).all()  # a unit is zeroed whole or not


def test_the_hook_counts_steps_and_updates_the_strength_like_the_call():
    x, y = data()
    a, b = mlp(), mlp()
    g = etp_fx.trace(a, x[:1])
    by_call = ExponentialTorque(g, ratio=0.5, steps=40, control={"interval": 4}, model=a)
    hooked = ExponentialTorque(g, ratio=0.5, steps=40, control={"interval": 4}, model=b)
    opt_a = torch.optim.SGD(a.parameters(), lr=1e-2)
    opt_b = torch.optim.SGD(b.parameters(), lr=1e-2)
    hooked.attach(opt_b)
    for i in range(10):
        sgd_step(a, opt_a, x[:32], y[:32], by_call)
        sgd_step(b, opt_b, x[:32], y[:32])
    assert hooked.calls == by_call.calls == 10
    steps = [s.step for s in hooked.controller.history]
    assert steps == [s.step for s in by_call.controller.history] == [1, 5, 9]
    hooked.detach()
    frozen = [p.detach().clone() for p in b.parameters()]
    opt_b.step()  # the gradients are still there: a step without the penalty
    assert hooked.calls == 10
    plain = copy.deepcopy(frozen)
    for w, p in zip(plain, b.parameters()):
        w -= 1e-2 * p.grad
        torch.testing.assert_close(p.detach(), w)


def test_observe_feeds_the_loss_guard():
    x, _ = data()
    model = mlp()
    reg = ExponentialTorque(etp_fx.trace(model, x[:1]), ratio=0.5, steps=40, model=model)
    for v in (2.0, 1.0, 0.5):
        reg.observe(torch.tensor(v))
    assert reg.controller._loss.n == 3  # noqa: SLF001 - the guard's own count
    assert reg.calls == 0  # observing is not a step
    ExponentialTorque(etp_fx.trace(model, x[:1]), strength=1.0).observe(1.0)  # no-op


def test_each_parameter_uses_its_own_groups_lr():
    x, y = data()
    model = mlp()
    reg = ExponentialTorque(etp_fx.trace(model, x[:1]), strength=5.0, model=model)
    first = list(model[0].parameters())
    rest = [p for m in (model[2], model[4]) for p in m.parameters()]
    opt = torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest, "lr": 1e-2}])
    reg.attach(opt)
    before = [p.detach().clone() for p in first]
    sgd_step(model, opt, x[:32], y[:32])
    for w, p in zip(before, first):  # lr 0: neither the gradient nor the penalty moves it
        assert torch.equal(w, p.detach())
    assert (model[2].weight == 0).any()


def _adamw_run(decoupled: bool, steps: int = 200) -> float:
    x, y = data()
    model = mlp()
    reg = ExponentialTorque(etp_fx.trace(model, x[:1]), ratio=0.5, steps=steps, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if decoupled:
        reg.attach(opt)
    for i in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(i))
        task = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if decoupled:
            reg.observe(task)
        loss = task if decoupled else task + reg(model, loss=task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return reg.mass_left(model)


def test_adamw_with_a_target_empties_the_units_it_removes():
    loss_term, decoupled = _adamw_run(False), _adamw_run(True)
    assert loss_term > 0.03  # Adam's normalisation holds the loss-term form back
    assert decoupled < 0.005
    assert decoupled < loss_term / 10


def test_errors_name_the_parameter():
    x, _ = data()
    model = mlp()
    reg = ExponentialTorque(etp_fx.trace(model, x[:1]), strength=1.0, model=model)
    opt = torch.optim.SGD(list(model[4].parameters()), lr=1e-2)
    with pytest.raises(RegulariserError, match=r"'0\.weight'.*does not hold"):
        reg.attach(opt)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RegulariserError, match=r"'0\.weight'.*frozen"):
        reg.attach(torch.optim.SGD(model.parameters(), lr=1e-2))
    bare = ExponentialTorque(etp_fx.trace(model, x[:1]), strength=1.0)
    with pytest.raises(RegulariserError, match="pass it"):
        bare.attach(torch.optim.SGD(model.parameters(), lr=1e-2))


def test_a_target_sets_the_range_from_the_learning_rate():
    x, _ = data()
    model = mlp()
    g = etp_fx.trace(model, x[:1])
    sgd = ExponentialTorque(g, ratio=0.5, steps=10, model=model)
    adam = ExponentialTorque(g, ratio=0.5, steps=10, model=model)
    sgd.attach(torch.optim.SGD(model.parameters(), lr=0.05))
    adam.attach(torch.optim.AdamW(model.parameters(), lr=5e-3))
    assert adam.strength == pytest.approx(10 * sgd.strength)  # the same lr * strength
    assert adam.controller.most * 5e-3 == pytest.approx(0.3)  # Adam: a lower cap
    assert sgd.controller.most * 0.05 == pytest.approx(0.5)
    given = ExponentialTorque(g, ratio=0.5, steps=10, model=model, strength=0.3,
                              control={"most": 2.0})
    given.attach(torch.optim.AdamW(model.parameters(), lr=5e-3))
    assert (given.strength, given.controller.most) == (0.3, 2.0)


# -- the fused update (one compiled pass per weight)
def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                         nn.Linear(12, 3))


def tiny_vit():
    from torchvision.models import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                             hidden_dim=16, mlp_dim=24, num_classes=3)


@pytest.mark.parametrize("build", [convnet, tiny_vit])
def test_row_and_column_parts_sum_to_every_weights_coefficient(build):
    """The fused kernels see each weight as a matrix whose coefficient is row[o] + col[j]:
    that sum must be, element for element, the eager update's broadcast coefficient (conv
    weights in two groups, depthwise convs, norms, linear heads, attention projections)."""
    from etp_fx.regularise.fused import row_col, row_col_layout
    model = build()
    reg = ExponentialTorque(etp_fx.trace(model, torch.randn(1, 3, 32, 32)), strength=1.0)
    slot = torch.rand(reg.norms.length)
    layout = row_col_layout(reg.norms)
    rows, cols = row_col(layout, slot)
    for shape, bcast, r, c in zip(reg.norms.shapes, reg.norms.broadcast(slot), rows, cols):
        assert torch.equal((r + c).reshape(shape), bcast.expand(shape)), shape
    assert any(rc.row is not None and rc.col_parts for rc in layout)  # rows and columns
    assert any(len(rc.shape) == 1 for rc in layout)  # a norm's or a bias's vector


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_fused_update_gives_the_eager_updates_values(norm):
    """Ten SGD steps with the fused update (compiled) and with the eager one: the same
    weights, the zeros included, and the fused kernel really ran."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    a = convnet()
    b = copy.deepcopy(a)
    g = etp_fx.trace(a, x[:1])
    regs = [ExponentialTorque(g, strength=2.0, norm=norm, model=m) for m in (a, b)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (a, b)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.8) for o in opts]
    regs[0].attach(opts[0], fused=False)
    regs[1].attach(opts[1], fused=True)
    from torch._dynamo.utils import counters
    graphs = []
    for _ in range(10):
        for m, opt, sched in zip((a, b), opts, scheds):
            sgd_step(m, opt, x, y)
            sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert regs[1]._fused is not None and regs[1]._fused.compiled
    # compiled once per kernel (L1 with SGD: the separate update at step 1, before the
    # momentum buffers exist, then SGD's step fused with it): a new lr every step does
    # not recompile
    assert len(set(graphs[1:])) == 1
    assert regs[0]._fused is None
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    zeros = sum(int((p == 0).sum()) for p in a.parameters())
    assert zeros > 0 and zeros == sum(int((q == 0).sum()) for q in b.parameters())


def test_fused_is_automatic_only_for_long_runs_and_refuses_what_it_cannot_do():
    from etp_fx.regularise.fused import FUSED_MIN_STEPS, resolve_fused
    model = convnet()
    params = list(model.parameters())
    assert not resolve_fused(None, None, params)
    assert not resolve_fused(None, FUSED_MIN_STEPS - 1, params)
    assert resolve_fused(None, FUSED_MIN_STEPS, params)
    assert not resolve_fused(False, FUSED_MIN_STEPS, params)
    model = model.to(memory_format=torch.channels_last)
    params = list(model.parameters())
    assert not resolve_fused(None, FUSED_MIN_STEPS, params)
    with pytest.raises(RegulariserError, match="not contiguous"):
        resolve_fused(True, None, params)


def test_a_fused_update_that_cannot_compile_warns_and_runs_the_eager_one(monkeypatch):
    import etp_fx.regularise.fused as fused_mod

    def no_compiler(fn, **kw):
        def broken(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return broken
    monkeypatch.setattr(fused_mod.torch, "compile", no_compiler)
    x, y = data()
    a = mlp()
    b = copy.deepcopy(a)
    g = etp_fx.trace(a, x[:1])
    regs = [ExponentialTorque(g, strength=0.5, model=m) for m in (a, b)]
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2) for m in (a, b)]
    regs[0].attach(opts[0], fused=False)
    regs[1].attach(opts[1], fused=True)
    sgd_step(a, opts[0], x[:32], y[:32])
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        sgd_step(b, opts[1], x[:32], y[:32])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert regs[1]._fused.broken


def test_the_fused_update_follows_the_release_of_the_kept_units():
    """After the controller's release only the units to remove are penalised: the fused
    update must use the new coefficients (its cached row and column parts are rebuilt), so it
    agrees with the eager update on a copy, and a strong step leaves the kept units alone."""
    from etp_fx.regularise.decoupled import proximal_step
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    m = convnet()
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), ratio=0.5, steps=20, model=m,
                            control={"interval": 2, "warmup": 0.0})
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    reg.attach(opt, fused=True)
    for _ in range(20):
        sgd_step(m, opt, x, y)
    assert reg.controller.released is not None and reg._fused.compiled
    twin = copy.deepcopy(m)
    reg.proximal(m, 10.0)  # fused
    params = reg.norms.parameters(twin)
    proximal_step(reg.norms, params, reg.ord, reg._coefs(params[0].device),
                  [10.0 * reg.strength] * len(params))
    for p, q in zip(m.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    kept = reg.norms.values(reg.norms.parameters(m), 1) > 0
    assert kept.any() and (torch.as_tensor(reg.coef)[kept] == 0).all()


# -- SGD's step and the update in one loop
@pytest.mark.parametrize("opts", [dict(momentum=0.9, weight_decay=5e-4),
                                  dict(momentum=0.9, dampening=0.1, nesterov=False),
                                  dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
                                  dict(momentum=0.0, weight_decay=1e-3)])
def test_sgd_fused_with_the_update_gives_sgd_then_the_update(opts):
    """attach(SGD, fused=True): the pre-step hook runs SGD's step and the soft-threshold of the
    penalised weights in one compiled loop and the optimiser skips them. Weights, momentum
    buffers and gradients equal those of SGD's own step followed by the eager update; the
    first step (no momentum buffers yet) runs the unfused way."""
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 3
    a = convnet()
    b = copy.deepcopy(a)
    g = etp_fx.trace(a, x[:1])
    regs = [ExponentialTorque(g, strength=2.0, model=m) for m in (a, b)]
    optims = [torch.optim.SGD(m.parameters(), lr=0.05, **opts) for m in (a, b)]
    regs[0].attach(optims[0], fused=False)
    regs[1].attach(optims[1], fused=True)
    for _ in range(6):
        for m, opt in zip((a, b), optims):
            sgd_step(m, opt, x, y)
    assert regs[1]._fused_step.steps == (6 if opts["momentum"] == 0 else 5)
    assert regs[0].calls == regs[1].calls == 6
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(q.grad, p.grad)  # given back after the step
        if opts["momentum"]:
            torch.testing.assert_close(optims[1].state[q]["momentum_buffer"],
                                       optims[0].state[p]["momentum_buffer"],
                                       rtol=1e-5, atol=1e-6)
    assert sum(int((p == 0).sum()) for p in b.parameters()) > 0


def test_sgd_fusion_steps_aside_for_a_closure_and_other_optimisers():
    x, y = data()
    m = mlp()
    g = etp_fx.trace(m, x[:1])
    reg = ExponentialTorque(g, strength=0.5, model=m)
    opt = torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9)
    reg.attach(opt, fused=True)
    sgd_step(m, opt, x[:32], y[:32])  # makes the momentum buffers

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x[:32]), y[:32])
        loss.backward()
        return loss
    opt.step(closure)
    assert reg.calls == 2 and reg._fused_step.steps == 0
    other = ExponentialTorque(g, strength=0.5, model=m)
    other.attach(torch.optim.AdamW(m.parameters(), lr=1e-3, amsgrad=True), fused=True)
    assert other._fused is not None and other._fused_step is None
    other.attach(torch.optim.RMSprop(m.parameters(), lr=1e-3), fused=True)
    assert other._fused is not None and other._fused_step is None


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.01),
    lambda ps: torch.optim.Adam(ps, lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-3, eps=1e-6),
])
def test_adam_fused_with_the_update_gives_adam_then_the_update(make):
    """Adam and AdamW: the same as SGD's fusion; weights, both moments and the step count
    equal the optimiser's own step followed by the eager update. (An MLP: Adam divides by the
    gradient's size, so a conv bias that BatchNorm cancels, whose gradient is rounding noise,
    would amplify last-bit differences into visible ones.)"""
    x, y = data()
    x, y = x[:64], y[:64]
    a = mlp()
    b = copy.deepcopy(a)
    g = etp_fx.trace(a, x[:1])
    regs = [ExponentialTorque(g, strength=0.5, model=m) for m in (a, b)]
    optims = [make(m.parameters()) for m in (a, b)]
    regs[0].attach(optims[0], fused=False)
    regs[1].attach(optims[1], fused=True)
    for _ in range(6):
        for m, opt in zip((a, b), optims):
            sgd_step(m, opt, x, y)
    assert regs[1]._fused_step.steps == 5  # the first step makes the moments
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        sa, sb = optims[0].state[p], optims[1].state[q]
        assert float(sa["step"]) == float(sb["step"]) == 6
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-7)
    assert sum(int((p == 0).sum()) for p in b.parameters()) > 0
