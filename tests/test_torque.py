"""ETP and Torque penalties: the paper preset against the formula, group units, distances,
normalisation, the hand-written backward, torch.compile, and bad input."""
import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.graph.distance import DistanceError, group_distances, multi_source_distances
from etp_fx.regularise.torque import ExponentialTorque, RegulariserError, Torque


def vgg_like(num_classes=10):
    """VGG-BN in miniature: convs with BN, a conv with 8 (<= 10) outputs, two Linears, the last
    with 10 outputs (skipped by the paper's rule)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, num_classes))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.ln = nn.BatchNorm1d(12)
        self.b = nn.Linear(12, 9)
        self.c = nn.Linear(9, 3)
        with torch.no_grad():
            self.ln.bias.uniform_(-0.5, 0.5)  # not all zero: L1's gradient at 0 is 0

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.ln(self.a(x))))))


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    m = vgg_like()
    return m, etp_fx.trace(m, torch.randn(2, 3, 16, 16))


def paper_reference(model, beta=1e-5, linear=False):
    """DESIGN.md, 'ETP as its authors implemented it', written out literally."""
    total = 0.0
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.shape[0] > 10:
            C = mod.weight.shape[0]
            alpha = 1.01 ** (500 / C)
            layer = 0.0
            for i in range(C):
                force = i if linear else alpha ** i
                layer = layer + force * mod.weight[i].abs().sum()
            total = total + layer / C
    return beta * total


@pytest.mark.parametrize("cls,linear", [(ExponentialTorque, False), (Torque, True)])
def test_paper_preset_is_the_official_formula(vgg, cls, linear):
    m, g = vgg
    reg = cls(g, preset="paper")
    assert reg.strength == 1e-5 and [s.id for s in reg.unit_sets] == ["0.weight", "4.weight",
                                                                       "11.weight"]
    m.zero_grad()
    ours = reg(m)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = paper_reference(m, linear=linear)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    g_ref = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(g_ours) == set(g_ref) == {"0.weight", "4.weight", "11.weight"}
    for n in g_ref:  # biases, BN, the 8-output conv and the 10-output Linear are untouched
        torch.testing.assert_close(g_ours[n], g_ref[n], rtol=1e-5, atol=1e-12)


def test_paper_preset_strength_can_change_and_nothing_else(vgg):
    m, g = vgg
    a = ExponentialTorque(g, preset="paper")(m)
    b = ExponentialTorque(g, preset="paper", strength=0.1)(m)
    assert b.item() == pytest.approx(a.item() * 1e4, rel=1e-6)
    with pytest.raises(RegulariserError, match="only strength"):
        ExponentialTorque(g, preset="paper", norm="l2")


@torch.no_grad()
def group_reference(model, reg, ord):
    """Slow, obvious per-unit loop over every group member (for the vectorised version)."""
    total = 0.0
    for s in reg.unit_sets:
        f = reg.force(reg.distances[s.id])
        acc = [0.0] * s.size
        for name, dim, coords in s.slices:
            w = model.get_parameter(name)
            for i, c in enumerate(coords):
                if c >= 0:
                    sl = w.select(dim, i)
                    acc[c] = acc[c] + (sl.abs().sum() if ord == 1 else sl.square().sum())
        for u in range(s.size):
            n = acc[u] if ord == 1 else torch.sqrt(torch.as_tensor(acc[u]))
            total = total + f[u] / s.size * reg.group_factors[s.id] * n
    return reg.strength * total


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("cls", [ExponentialTorque, Torque])
def test_vectorised_penalty_matches_a_loop_over_units(norm, cls):
    torch.manual_seed(1)
    from torchvision.models import VisionTransformer
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                            hidden_dim=8, mlp_dim=12, num_classes=3)
    g = etp_fx.trace(vit, torch.randn(1, 3, 16, 16))
    reg = cls(g, strength=0.5, norm=norm, allow_approximate=True, group_pivots="stem",
              normalize=None)
    kinds = {s.unit_kind for s in reg.unit_sets}
    assert {"head", "head-dim", "neuron"} <= kinds
    assert not reg.norms.one_to_one  # heads and head dims share the q/k/v rows
    with torch.no_grad():
        vit.heads.head.weight.mul_(3)
        vit.encoder.layers[0].mlp[0].weight[:4] = 0  # exact zeros in some units
    ours = reg(vit).detach()
    ref = group_reference(vit, reg, 1 if norm == "l1" else 2)
    assert ours.item() == pytest.approx(float(ref), rel=1e-5)


def test_group_units_read_every_coupled_parameter_and_producer_only_the_rows():
    m = MLP()
    g = etp_fx.trace(m, torch.randn(4, 6))
    touched = {}
    for units in ("group", "producer"):
        m.zero_grad()
        ExponentialTorque(g, strength=1.0, units=units)(m).backward()
        touched[units] = {n for n, p in m.named_parameters()
                          if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched["group"] == {"a.weight", "a.bias", "ln.weight", "ln.bias", "b.weight",
                                "b.bias", "c.weight"}
    assert touched["producer"] == {"a.weight", "b.weight"}
    # consumer columns are read along dim 1: c.weight's gradient varies by column only
    m.zero_grad()
    ExponentialTorque(g, strength=1.0, units="producer")(m).backward()
    assert m.c.weight.grad is None or not m.c.weight.grad.abs().sum()


def test_decay_normalisation_pulls_every_group_at_rate_strength():
    """normalize="decay" (default): the average weight of every group is pulled towards zero
    by strength times its own mean size, whatever the group's width or the weights' scale."""
    torch.manual_seed(0)
    m1, m2 = MLP(), MLP()
    m2.load_state_dict(m1.state_dict())
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(100.0)  # same model, weights 100x larger
    g1 = etp_fx.trace(m1, torch.randn(4, 6))
    g2 = etp_fx.trace(m2, torch.randn(4, 6))
    for gid, n_units in (("a.weight[0]", 12), ("b.weight[0]", 9)):
        grads = []
        for m, g in ((m1, g1), (m2, g2)):
            reg = ExponentialTorque(g, strength=0.3, include=[gid])
            (s,) = reg.unit_sets
            assert s.size == n_units
            m.zero_grad()
            reg(m).backward()
            elems = [m.get_parameter(n).select(d, i).reshape(-1) for n, d, c in s.slices
                     for i in range(len(c))]
            ge = [m.get_parameter(n).grad.select(d, i).reshape(-1) for n, d, c in s.slices
                  for i in range(len(c))]
            kappa = torch.cat(elems).abs().mean()
            pull = torch.cat(ge).abs().mean() / kappa
            assert pull.item() == pytest.approx(0.3, rel=1e-5)
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()
                          if p.grad is not None})
        for n in grads[0]:  # relative pull is scale-free: gradients scale with the weights
            torch.testing.assert_close(grads[1][n], 100 * grads[0][n], rtol=1e-4, atol=1e-9)
    # the farthest unit is pulled ~145 / mean(f) times harder than the average
    reg = ExponentialTorque(g1, strength=0.3, include=["a.weight[0]"])
    f = reg.force(reg.distances["a.weight[0]"])
    assert f[-1] / f[0] == pytest.approx(1.01 ** (500 * 11 / 12))


def test_init_normalisation_makes_strength_the_initial_penalty():
    torch.manual_seed(0)
    m1, m2 = MLP(), MLP()
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(100.0)  # same architecture, weights 100x larger
    g1 = etp_fx.trace(m1, torch.randn(4, 6))
    g2 = etp_fx.trace(m2, torch.randn(4, 6))
    for norm in ("l1", "l2"):
        r1 = ExponentialTorque(g1, strength=0.3, norm=norm, normalize="init")
        r2 = ExponentialTorque(g2, strength=0.3, norm=norm, normalize="init")
        n = len(r1.unit_sets)
        assert n == 2
        assert r1(m1).item() == pytest.approx(0.3 * n, rel=1e-5)
        assert r2(m2).item() == pytest.approx(0.3 * n, rel=1e-5)
    raw = ExponentialTorque(g2, strength=0.3, normalize=None)(m2).item()
    assert raw > 100 * 0.3 * 2  # the raw penalty does depend on the weights' scale


def test_hand_written_backward_equals_autograd_and_zero_weights_stay_put():
    torch.manual_seed(0)
    m = vgg_like()
    g = etp_fx.trace(m, torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        m[4].weight[3].zero_()
        m[0].weight[:, 1].zero_()
    for norm in ("l1", "l2"):
        reg = ExponentialTorque(g, strength=1.0, norm=norm, distance="importance")
        grads = []
        for fast in (True, False):
            reg.fast_backward = fast
            m.zero_grad()
            v = reg(m)
            v.backward()
            grads.append((v.item(), {n: p.grad.clone() for n, p in m.named_parameters()
                                     if p.grad is not None}))
        assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
        assert grads[0][1].keys() == grads[1][1].keys()
        for n in grads[0][1]:
            torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-9)
        assert not grads[0][1]["4.weight"][3].any()  # sgn(0) = 0: a zero unit gets no push


# --- distances ---------------------------------------------------------------------------------

def test_index_chain_is_the_paper_distance_and_pivots_move_it():
    m = MLP()
    g = etp_fx.trace(m, torch.randn(4, 6))
    reg = ExponentialTorque(g, strength=1.0)
    np.testing.assert_array_equal(reg.distances["a.weight[0]"], np.arange(12))
    reg = ExponentialTorque(g, strength=1.0, pivots={"a.weight[0]": [0, 11]})
    np.testing.assert_array_equal(reg.distances["a.weight[0]"],
                                  [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(reg.distances["b.weight[0]"], np.arange(9))
    f = reg.force(reg.distances["b.weight[0]"])
    assert f[0] == 1 and f[-1] == pytest.approx(1.01 ** (500 * 8 / 9))  # base**(scale*d/(dmax+1))


def test_importance_order_is_fixed_at_construction():
    m = MLP()
    with torch.no_grad():
        m.a.weight[7].mul_(50)  # unit 7 of the first group is by far the most important
        m.a.weight[2].mul_(20)
    g = etp_fx.trace(m, torch.randn(4, 6))
    reg = ExponentialTorque(g, strength=1.0, distance="importance", units="producer")
    d = reg.distances["a.weight[0]"]
    assert reg.pivots["a.weight[0]"] == [7] and d[7] == 0 and d[2] == 1
    before = reg(m).item()
    with torch.no_grad():
        m.a.weight[7].zero_()  # unit 7 dies during training: its place in the order stays
    assert reg.distances["a.weight[0]"][7] == 0
    assert reg(m).item() < before


def test_custom_unit_graph_and_group_factor():
    m = MLP()
    g = etp_fx.trace(m, torch.randn(4, 6))
    star = nx.star_graph(11)  # node 0 joined to every other unit
    reg = ExponentialTorque(g, strength=1.0, distance={"a.weight[0]": star})
    np.testing.assert_array_equal(reg.distances["a.weight[0]"], [0] + [1] * 11)
    gd = group_distances(g, "stem")
    assert gd == {"a.weight[0]": 0.0, "b.weight[0]": 1.0}
    reg = ExponentialTorque(g, strength=1.0, group_pivots="stem", group_scale=7.0,
                            normalize="init")
    assert reg.group_factors == {"a.weight[0]": 1.0, "b.weight[0]": 7.0}
    assert reg(m).item() == pytest.approx(1.0 + 7.0, rel=1e-5)
    # a weighted custom graph through a callable
    def ring(unit_set, norms):
        G = nx.cycle_graph(unit_set.size)
        nx.set_edge_attributes(G, 2.0, "weight")
        return G, [0]
    reg = Torque(g, strength=1.0, distance=ring)
    assert reg.distances["b.weight[0]"].tolist() == [0, 2, 4, 6, 8, 8, 6, 4, 2]


def test_unreachable_units_are_farthest():
    G = nx.empty_graph(4)
    G.add_edge(0, 1)
    assert multi_source_distances(G, [0], 4).tolist() == [0, 1, 2, 2]


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlp_graph():
    m = MLP()
    return m, etp_fx.trace(m, torch.randn(4, 6))


def test_negative_or_missing_strength(mlp_graph):
    _, g = mlp_graph
    with pytest.raises(RegulariserError, match="strength must be a finite number >= 0"):
        ExponentialTorque(g, strength=-1e-3)
    with pytest.raises(RegulariserError, match="strength must be"):
        Torque(g, strength=float("nan"))
    with pytest.raises(RegulariserError, match="give strength="):
        ExponentialTorque(g)


def test_graph_of_another_model_is_refused(mlp_graph):
    _, g = mlp_graph
    reg = ExponentialTorque(g, strength=1.0)
    other = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(etp_fx.ModelMismatchError, match="traced from a different model.*missing"):
        reg(other)
    wider = MLP()
    wider.b = nn.Linear(12, 10)
    with pytest.raises(etp_fx.ModelMismatchError, match=r"'b.weight' changed shape \(\[9, 12\] -> \[10, 12\]\)"):
        reg(wider)


def test_nan_stops_with_the_step_number(mlp_graph):
    m, g = mlp_graph
    m = MLP()
    reg = ExponentialTorque(g, strength=1.0, model=m)
    reg(m)
    reg(m)
    with torch.no_grad():
        m.b.weight[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"at step 3: non-finite values in parameters "
                                                 r"\['b.weight'\]"):
        reg(m)
    with torch.no_grad():
        m.b.weight[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="step 4"):
        reg(m)


def test_pivots_out_of_range(mlp_graph):
    _, g = mlp_graph
    with pytest.raises(DistanceError, match="pivot 12 is out of range: the group has 12 units"):
        ExponentialTorque(g, strength=1.0, pivots={"a.weight[0]": [12]})
    with pytest.raises(DistanceError, match="pivot -10 is out of range.*9 units"):
        ExponentialTorque(g, strength=1.0, pivots=[-10])
    with pytest.raises(DistanceError, match="unknown group ids"):
        ExponentialTorque(g, strength=1.0, pivots={"nope": [0]})


def test_empty_unit_graph(mlp_graph):
    _, g = mlp_graph
    with pytest.raises(DistanceError, match="unit graph is empty"):
        ExponentialTorque(g, strength=1.0, distance={"a.weight[0]": nx.Graph()})
    with pytest.raises(DistanceError, match="missing nodes"):
        ExponentialTorque(g, strength=1.0, distance={"a.weight[0]": nx.path_graph(5)})

    class Odd(nn.Module):  # every channel is frozen by a barrier: nothing to penalise
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)

        def forward(self, x):
            return torch.fft.fft(self.a(x)).real
    odd = Odd()
    go = etp_fx.trace(odd, torch.randn(2, 4))
    with pytest.raises(RegulariserError, match="empty unit graph: no units to penalise"):
        ExponentialTorque(go, strength=1.0)


def test_lazy_regularisation_every_k_steps(mlp_graph):  # noqa: D103
    m, g = mlp_graph
    full = ExponentialTorque(g, strength=1.0)(m).item()
    reg = ExponentialTorque(g, strength=1.0, every=3)
    vals = [reg(m).item() for _ in range(6)]
    assert vals == pytest.approx([3 * full, 0, 0, 3 * full, 0, 0], rel=1e-6)
    assert reg.last_value.item() == pytest.approx(full, rel=1e-6)


def test_near_zero_and_unit_norms(mlp_graph):
    _, g = mlp_graph
    m = MLP()
    reg = ExponentialTorque(g, strength=1.0, model=m)
    with torch.no_grad():
        for p in (m.a.weight[3], m.a.bias[3:4], m.ln.weight[3:4], m.ln.bias[3:4], m.b.weight[:, 3]):
            p.zero_()
    assert reg.near_zero(m) == 1
    n = reg.unit_norms(m, "l2")
    assert n["a.weight[0]"][3] == 0 and (n["a.weight[0]"][:3] > 0).all()


# --- torch.compile -----------------------------------------------------------------------------

def test_compiled_training_step_fullgraph(monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/etp_fx_inductor_cache")
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 6 * 6, 12), nn.ReLU(), nn.Linear(12, 4))
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
    reg = ExponentialTorque(etp_fx.trace(m, x), strength=0.1, norm="l2")

    def loss_fn(x, y):
        return nn.functional.cross_entropy(m(x), y) + reg(m)

    m.zero_grad()
    eager = loss_fn(x, y)
    eager.backward()
    g_eager = [p.grad.clone() for p in m.parameters()]
    compiled = torch.compile(loss_fn, fullgraph=True)
    m.zero_grad()
    out = compiled(x, y)
    out.backward()
    assert out.item() == pytest.approx(eager.item(), rel=1e-5)
    for a, b in zip(g_eager, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    torch._dynamo.reset()


def test_tied_weights_are_penalised_once_under_their_listed_name():
    class Tied(nn.Module):  # a language model whose output layer is its embedding
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.mid = nn.Linear(8, 12)
            self.out = nn.Linear(12, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.out(torch.relu(self.mid(self.emb(ids)))))

    torch.manual_seed(0)
    m = Tied()
    g = etp_fx.trace(m, torch.randint(0, 20, (2, 5)))
    listed = dict(m.named_parameters())
    assert "head.weight" not in listed
    for kw in ({"allow_approximate": True}, {"preset": "paper"}):
        reg = ExponentialTorque(g, **({"strength": 0.5} | kw if "preset" not in kw else kw))
        for s in reg.unit_sets:
            assert all(name in listed for name, _, _ in s.slices)
            assert len(set(s.slices)) == len(s.slices)
        m.zero_grad()
        reg(m).backward()
        assert m.emb.weight.grad is not None
    paper = ExponentialTorque(g, preset="paper")
    assert [s.id for s in paper.unit_sets] == ["mid.weight", "emb.weight"]  # head = emb


# --- one norm kernel ---------------------------------------------------------------------------

def test_every_consumer_reads_norms_through_the_one_kernel(mlp_graph):
    """The penalty's initial norms, reg.unit_norms, near_zero, NormHistory and the selections'
    unit_norms are one computation (UnitNorms.read): same values, and they move together."""
    from etp_fx.regularise.norms import UnitNorms, unit_norms
    _, g = mlp_graph
    m = MLP()
    reg = ExponentialTorque(g, strength=1.0, model=m)
    hist = etp_fx.NormHistory(reg)
    hist.record(m)
    calls = []
    read = UnitNorms.read

    def counting(self, *a, **kw):
        calls.append(1)
        return read(self, *a, **kw)
    UnitNorms.read = counting
    try:
        ours = {k: v.double().numpy() for k, v in reg.unit_norms(m, "l2").items()}
        sel = unit_norms(g, m, norm="l2")
        reg.near_zero(m)
        hist.record(m)
    finally:
        UnitNorms.read = read
    assert len(calls) == 4
    for gid in ours:
        np.testing.assert_allclose(ours[gid], sel[gid], rtol=1e-6)
        np.testing.assert_allclose(hist.array(gid)[-1], sel[gid], rtol=1e-6)


def test_the_dead_kind_attribute_is_gone():
    assert not hasattr(ExponentialTorque, "kind") and not hasattr(Torque, "kind")


def test_compiled_penalty_follows_the_target_driven_strength(monkeypatch):
    """reg.step(model) outside the compiled function moves the strength; the compiled penalty
    reads it from a tensor changed in place, so new values need no new graph."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/etp_fx_inductor_cache")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    reg = ExponentialTorque(etp_fx.trace(m, x), target_macs=0.5, steps=20,
                            control={"interval": 1, "warmup": 0.0})
    reg.value(m)  # the coefficient tensors exist before tracing

    def loss_fn(x, y):
        return nn.functional.cross_entropy(m(x), y) + reg(m)

    compiled = torch.compile(loss_fn, fullgraph=True)
    seen = []
    for _ in range(16):  # the release of the kept units at step 14 changes the coefficients
        reg.step(m)
        out = compiled(x, y).item()
        assert out == pytest.approx((nn.functional.cross_entropy(m(x), y) +
                                     reg.value(m)).item(), rel=1e-5)
        seen.append(reg.strength)
    assert reg.controller.released is not None and (reg.coef == 0).any()
    assert len(set(seen[:4])) == 4 and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
