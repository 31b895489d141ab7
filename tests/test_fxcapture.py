"""The fast capture path (etp_fx/fxcapture.py) against torch.export, the canonical one.

The fast path must give the graph export gives, node for node (up to in-place variants,
which it emits out of place), hence the same groups; where it cannot, it must hand over to
export; and a lowering that computes something else must never reach a compressed model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest
from hypothesis import given, settings

import etp_fx
from etp_fx.capture import fast as fxcapture
from etp_fx.capture import capture

from strategies import architectures

tv = pytest.importorskip("torchvision")


def _ir(gm: torch.fx.GraphModule) -> list:
    """The call_function nodes as (op, args, kwargs); node args by position, in-place ops
    as their out-of-place twins."""
    order = {n: i for i, n in enumerate(
        n for n in gm.graph.nodes if n.op in ("placeholder", "call_function"))}

    def norm(v):
        if isinstance(v, torch.fx.Node):
            return ("attr", v.target) if v.op == "get_attr" else ("node", order[v])
        if isinstance(v, (list, tuple)):
            return [norm(a) for a in v]
        return v
    return [(str(n.target).replace("_.", "."), norm(list(n.args)), norm(dict(n.kwargs)))
            for n in gm.graph.nodes if n.op == "call_function"]


def _groups(g: etp_fx.DependencyGraph) -> list:
    return [(x.id, x.size, x.unit_kind, x.exact, sorted(
        (m.name, m.dim, tuple(sorted(m.roles)), m.coords) for m in x.members)) for x in g.groups]


ZOO = [("resnet18", 64), ("mobilenet_v3_small", 64), ("efficientnet_b0", 64),
       ("shufflenet_v2_x0_5", 64), ("convnext_tiny", 64), ("squeezenet1_1", 64),
       ("regnet_x_400mf", 64), ("googlenet", 64)]


@pytest.mark.parametrize("name,size", ZOO)
def test_fast_path_gives_the_exported_graph_and_groups(name, size):
    extra = {"init_weights": False} if name == "googlenet" else {}  # no scipy init warning
    model = tv.models.get_model(name, weights=None, **extra).eval()
    x = torch.randn(1, 3, size, size)
    fast = capture(model, (x,))
    assert fast.meta["etp_capture"] == "fx", fast.meta.get("etp_capture_fast_path")
    exported = capture(model, (x,), method="export")
    assert _ir(fast) == _ir(exported)
    assert _groups(etp_fx.trace(model, x)) == _groups(etp_fx.trace(model, x, capture="export"))
    assert fxcapture.check_capture(fast, model, (x,), {}) is None


@settings(max_examples=40)
@given(architectures(families=("cnn",)))
def test_fast_path_groups_equal_exported_groups_on_generated_cnns(arch):
    model, x = arch[0], arch[1]
    fast = etp_fx.trace(model, x)
    exported = etp_fx.trace(model, x, capture="export")
    assert _groups(fast) == _groups(exported)
    if fast.module.meta["etp_capture"] == "fx":
        assert _ir(fast.module) == _ir(exported.module)
        assert fxcapture.check_capture(fast.module, model, (x,), {}) is None


class AliasedInplace(nn.Module):
    """An in-place ReLU whose input is read again: out of place would change the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.conv(x)
        b = F.relu(a, inplace=True)
        return self.head((a + b).mean((2, 3)))


class Rolled(nn.Module):
    """torch.roll has no lowering: the whole model goes through torch.export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return torch.roll(self.out(torch.relu(self.conv(x))), 1, dims=2)


@pytest.mark.parametrize("model,reason", [(AliasedInplace(), "in-place"), (Rolled(), "roll")])
def test_what_the_fast_path_cannot_lower_goes_through_export(model, reason):
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert gm.meta["etp_capture"] == "export"
    assert reason in gm.meta["etp_capture_fast_path"]
    small = etp_fx.compress(model, x, ratio=0.5)  # verified against the zeroed original
    assert small(x).shape == model(x).shape


def test_a_wrong_lowering_is_caught_and_compress_falls_back_to_export(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    # a deliberately wrong lowering: ReLU as sigmoid (same shapes, so the same groups)
    monkeypatch.setitem(fxcapture.LOWER_MODULE, nn.ReLU, fxcapture._module_act(
        torch.ops.aten.sigmoid.default))
    g = etp_fx.trace(model, x)
    assert g.module.meta["etp_capture"] == "fx"
    assert "computes something else" in fxcapture.check_capture(g.module, model, (x,), {})
    plan = {g.groups[0].id: [0, 2, 5]}
    small = etp_fx.compress(model, x, remove=plan, graph=g)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan)
    torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)


def test_fast_path_result_accepts_any_batch():
    model = tv.models.get_model("resnet18", weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    g = etp_fx.trace(model, x)
    assert g.module.meta["etp_capture"] == "fx"
    small = etp_fx.compress(model, x, ratio=0.3, graph=g, keep_constants=False)
    plan = {gid: grp["removed"] for gid, grp in small.meta["etp_report"]["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(small(xb), zeroed(xb), rtol=1e-4, atol=1e-4)
