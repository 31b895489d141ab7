"""Module output: prune into the user's own class (compress_module), checked like the graph
output against the zeroed original, on torchvision and timm models and small hand-made ones;
what a module cannot express is a ModuleOutputError that names the module."""
import copy
import random

import pytest
import torch
import torch.utils._pytree as pytree

import etp_fx
from etp_fx.errors import ModuleOutputError
from etp_fx.surgery.module_attrs import apply_widths, inexpressible_groups
from etp_fx.surgery.module_output import compress_module, other_inputs
from etp_fx.regularise.norms import unit_norms
from etp_fx.regularise.uniform import role_of


def module_plan_for(graph, frac=0.3, seed=0):
    """A random share of the units of every exact group a module can shrink."""
    rng = random.Random(seed)
    bad = inexpressible_groups(graph)
    plan = {}
    for g in graph.groups:
        if g.exact and g.id not in bad and g.size > 1:
            k = min(g.size - 1, max(1, int(frac * g.size)))
            plan[g.id] = sorted(rng.sample(range(g.size), k))
    return plan


def floats(out):
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in pytree.tree_leaves(out)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def assert_same(ref, got, atol=1e-5):
    ref, got = floats(ref), floats(got)
    assert len(ref) == len(got)
    for r, o in zip(ref, got):
        assert r.shape == o.shape
        assert float((r - o).abs().max()) <= atol * max(float(r.abs().max()), 1e-6)


def check_module_oracle(model, inputs, plan=None, keep_constants=False, fresh=None, **kw):
    """compress_module(model)(x) == zero_units(copy(model))(x) on the inputs and on another
    shape; same class; the original untouched; a fresh model given the widths loads the
    result's state dict and computes the same."""
    model = model.eval()
    if isinstance(inputs, dict):
        args, kwargs = (), inputs
    else:
        args, kwargs = (inputs if isinstance(inputs, tuple) else (inputs,)), {}
    before = {n: t.clone() for n, t in model.state_dict().items()}
    g = etp_fx.trace(model, inputs)
    plan = module_plan_for(g) if plan is None else plan
    assert plan
    small = compress_module(model, inputs, remove=plan, graph=g, keep_constants=keep_constants,
                            **kw)
    assert type(small) is type(model)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()), "original changed"
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=keep_constants).eval()
    small.eval()
    second = other_inputs(args, kwargs)
    for a, k in [(args, kwargs), second[:2]]:
        with torch.no_grad():
            assert_same(zeroed(*a, **k), small(*a, **k))
    report = small.etp_report
    assert len(report["checked"]) == 2, report["checked"]
    widths = {gid: g[gid].size - len(u) for gid, u in plan.items()}
    added = sum(p.numel() for n, p in small.named_parameters()
                if n in report["tensors"] and n not in dict(model.named_parameters()))
    assert report["params_after"] - added == g.cost.params(widths)
    assert report["params_after"] < report["params_before"]
    if fresh is not None:
        rebuilt = apply_widths(fresh(), report).eval()
        rebuilt.load_state_dict(small.state_dict())
        with torch.no_grad():
            assert_same(small(*args, **kwargs), rebuilt(*args, **kwargs))
    return small, g, plan


def tv(name, **kw):
    import torchvision
    return lambda: torchvision.models.get_model(name, weights=None, **kw)


def timm_model(name):
    timm = pytest.importorskip("timm")
    return lambda: timm.create_model(name, pretrained=False)


VISION = {
    "resnet18": tv("resnet18"),
    "mobilenet_v3_small": tv("mobilenet_v3_small"),
    "squeezenet1_1": tv("squeezenet1_1"),
    "timm_resnet18": timm_model("resnet18"),
    "timm_mobilenetv3_small_050": timm_model("mobilenetv3_small_050"),
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_models_keep_their_class(name):
    torch.manual_seed(0)
    build = VISION[name]
    check_module_oracle(build(), torch.randn(2, 3, 32, 32), fresh=build)


def test_grouped_and_depthwise_convs_get_new_groups():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1, groups=4),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(16, 3))
    g = etp_fx.trace(net, torch.randn(2, 3, 8, 8))
    plan = {g.groups[0].id: [1, 5]}  # the depthwise conv's channels
    small, _, _ = check_module_oracle(net, torch.randn(2, 3, 8, 8), plan=plan)
    assert (small[2].groups, small[2].in_channels, small[2].out_channels) == (6, 6, 6)
    assert small.etp_report["modules"]["2"]["groups"] == [8, 6]


def test_folded_constants_go_into_biases_and_new_biases():
    """keep_constants (the norm-based default): relu(bias) of removed units is a constant that
    the next layer's bias absorbs; a layer without a bias gets one."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                              torch.nn.ReLU(), torch.nn.Linear(6, 2, bias=False))
    with torch.no_grad():
        net[0].bias.uniform_(0.5, 1.0)
        net[2].bias.uniform_(0.5, 1.0)
    g = etp_fx.trace(net, torch.randn(2, 4))
    plan = {g.groups[0].id: [0, 3], g.groups[1].id: [1, 2]}
    small, _, _ = check_module_oracle(net, torch.randn(2, 4), plan=plan, keep_constants=True)
    assert isinstance(small[4].bias, torch.nn.Parameter) and small[4].bias.shape == (2,)
    assert any("new bias" in line for line in small.etp_report["folds"])
    assert small.etp_report["tensors"]["4.bias"] == [2]
    # the kept bias absorbed the removed units' constants (the oracle above is not vacuous)
    kept = [i for i in range(6) if i not in plan[g.groups[1].id]]
    assert not torch.allclose(small[2].bias.detach(), net[2].bias.detach()[kept])


def test_default_selection_folds_on_mobilenet():
    """Ratio (keep_constants=True) with trained-looking biases: folds into 1x1 convs and the
    classifier, a new bias where a conv had none; the result matches the zeroed original."""
    torch.manual_seed(0)
    net = tv("mobilenet_v3_small")().eval()
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    x = torch.randn(2, 3, 64, 64)
    g = etp_fx.trace(net, x)
    small = compress_module(net, x, ratio=0.3, graph=g)
    plan = {gid: r["removed"] for gid, r in small.etp_report["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(net), g, plan, keep_constants=True).eval()
    with torch.no_grad():
        assert_same(zeroed(x), small.eval()(x))
    assert small.etp_report["folds"]


def test_position_dependent_constant_is_refused():
    """Through a zero-padded conv the removed units' constant differs at the border: no bias
    can carry it, and the error names the module and the way out."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        net[0].bias.uniform_(0.5, 1.0)
    g = etp_fx.trace(net, torch.randn(2, 3, 8, 8))
    with pytest.raises(ModuleOutputError, match=r"module '2'.*output='graph'"):
        compress_module(net, torch.randn(2, 3, 8, 8), etp_fx.Plan({g.groups[0].id: [1]}),
                        keep_constants=True)
    small = compress_module(net, torch.randn(2, 3, 8, 8), remove={g.groups[0].id: [1]})
    assert small[2].in_channels == 7  # zeroed whole: nothing to fold


class HardCoded(torch.nn.Module):
    """A forward that hard-codes the width of its features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(x.view(-1, 16))


def test_hard_coded_width_gets_a_clear_error():
    net = HardCoded().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ModuleOutputError,
                       match=r"model itself.*HardCoded.*hard-codes.*output='graph'"):
        compress_module(net, x, remove={"conv.weight[0]": [0, 3, 5]})
    # the graph output rewrites the view and succeeds
    assert etp_fx.compress(net, x, remove={"conv.weight[0]": [0, 3, 5]})(x).shape == (2, 4)


def test_multihead_attention_heads_are_refused():
    torch.manual_seed(0)
    net = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    g = etp_fx.trace(net, x)
    heads = [grp.id for grp in g.groups if grp.unit_kind == "head" and grp.exact]
    assert heads
    with pytest.raises(ModuleOutputError, match="MultiheadAttention.*output='graph'"):
        compress_module(net, x, remove={heads[0]: [0]}, graph=g)


def test_norm_over_the_pruned_width_is_never_selected():
    """A LayerNorm reduces over its width: the module would divide by the new width, so a
    selection skips the group and a Plan naming it is refused."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8),
                              torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(2, 4)
    g = etp_fx.trace(net, x)
    bad = inexpressible_groups(g)
    assert "0.weight[0]" in bad
    small = compress_module(net, x, ratio=0.5, graph=g, allow_approximate=True)
    assert "0.weight[0]" not in small.etp_report["groups"]
    assert small[2].out_features == 4 and small[1].normalized_shape == (8,)
    if g["0.weight[0]"].exact:  # exact once norms are rewritten to their full-width forms
        with pytest.raises(ModuleOutputError, match="reduces over"):
            compress_module(net, x, remove={"0.weight[0]": [0]}, graph=g)


def test_uniform_selection_removes_the_same_count_per_layer():
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
              for _ in range(3)]
    with torch.no_grad():  # unequal layers: a per-layer selection would differ per layer
        for i, b in enumerate(blocks):
            b[0].weight.mul_(0.2 + i)
    net = torch.nn.Sequential(*blocks)
    g = etp_fx.trace(net, torch.randn(2, 8))
    sel = etp_fx.Ratio(0.5, scope="global")
    plain = sel.select(g, net)
    assert len({len(u) for u in plain.values()}) > 1 or len(plain) < 3
    plan = etp_fx.Ratio(0.5, scope="global", uniform=True).select(g, net)
    hidden = [grp.id for grp in g.groups if grp.size == 16]
    assert len(hidden) == 3 and len({role_of(gid) for gid in hidden}) == 1
    counts = {len(plan.get(gid, [])) for gid in hidden}
    mean = sum(len(plain.get(gid, [])) for gid in hidden) / 3
    assert counts == {int(mean + 0.5)} and counts != {0}
    norms = unit_norms(g, net)
    for gid in hidden:  # in each layer, that layer's weakest units
        assert set(plan[gid]) == set(norms[gid].argsort(kind="stable")[: len(plan[gid])].tolist())
    # compress_module passes the selection through: the option applies as it is
    small = compress_module(net, torch.randn(2, 8), ratio=0.5, scope="global", uniform=True,
                            graph=g)
    assert {b[0].out_features for b in small} == {16 - counts.pop()}
    with pytest.raises(etp_fx.SelectionError, match="norm-based"):
        compress_module(net, torch.randn(2, 8), remove={hidden[0]: [0]}, uniform=True, graph=g)
    with pytest.raises(etp_fx.SelectionError, match="not both"):  # an option of the selection
        compress_module(net, torch.randn(2, 8), sel, uniform=True, graph=g)


def test_original_is_untouched_and_selection_options_apply():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    w = net[0].weight.clone()
    small = compress_module(net, torch.randn(2, 4), ratio=0.5, round_to=2)
    assert torch.equal(net[0].weight, w) and net[0].out_features == 8
    assert small[0].out_features % 2 == 0 and small[0].out_features < 8
    with pytest.raises(etp_fx.SelectionError):
        compress_module(net, torch.randn(2, 4), ratio=0.5, include=["no-such-group"])
