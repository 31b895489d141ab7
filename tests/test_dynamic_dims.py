"""Every input dim the model allows stays dynamic (issue 15): ``capture(dynamic=...)``, the
record of which dims stayed symbolic and why the others were pinned, the same groups as a
static capture, results at other sizes, and ``.pt2`` files that keep the same dims."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import etp_fx
from etp_fx.capture import capture
from etp_fx.capture.dynamic import another_shape
from etp_fx.errors import OptionError

tv = pytest.importorskip("torchvision")


class Tokens(nn.Module):
    """Features pinned by a Linear, a sequence length pinned by a view to 16 positions, the
    batch free."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.mix = nn.Linear(16, 16)

    def forward(self, x):
        h = self.proj(x)  # (B, S, 8)
        h = h.view(h.shape[0], 16, 8)  # S must be 16
        return self.mix(h.transpose(1, 2))


class SmallCnn(nn.Module):
    """Any image size (adaptive pooling): through the export path, it stays dynamic."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.roll(F.relu(self.conv(x)), 1, dims=2)  # roll: no fast path, export it is
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


def test_pinned_dims_name_the_size_and_the_module():
    gm = capture(Tokens().eval(), (torch.randn(2, 16, 4),), {}, dynamic="auto")
    assert gm.meta["etp_dynamic_dims"] == {"x": {0: "dynamic", 1: "static", 2: "static"}}
    pinned = gm.meta["etp_pinned_dims"]["x"]
    assert set(pinned) == {1, 2}
    assert pinned[1].startswith("pinned to 16") and "view" in pinned[1], pinned
    assert pinned[2].startswith("pinned to 4 in module proj (Linear)"), pinned
    with torch.no_grad():
        assert gm(torch.randn(5, 16, 4)).shape == (5, 8, 16)


def test_a_size_of_one_is_pinned_with_the_reason():
    gm = capture(SmallCnn().eval(), (torch.randn(1, 3, 16, 16),), {}, dynamic="auto")
    dims = gm.meta["etp_dynamic_dims"]["x"]
    assert dims == {0: "static", 1: "static", 2: "dynamic", 3: "dynamic"}
    assert "size 1" in gm.meta["etp_pinned_dims"]["x"][0]


def test_export_path_keeps_the_image_size_dynamic():
    """Old behaviour: dim 0 only ("Guard failed: x.size()[2] == 16" at another size)."""
    model = SmallCnn().eval()
    x = torch.randn(2, 3, 16, 16)
    g = etp_fx.trace(model, x)
    assert g.module.meta["etp_capture"] == "export"
    small = etp_fx.compress(model, x, remove={g.groups[0].id: [0, 3]}, graph=g)
    assert small.meta["etp_dynamic_dims"]["x"] == {
        0: "dynamic", 1: "static", 2: "dynamic", 3: "dynamic"}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, {g.groups[0].id: [0, 3]})
    with torch.no_grad():
        for shape in ((3, 3, 20, 24), (1, 3, 9, 33)):
            xs = torch.randn(shape)
            torch.testing.assert_close(small(xs), zeroed(xs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dynamic,want", [
    (None, {0: "static", 1: "static", 2: "static", 3: "static"}),
    ("batch", {0: "dynamic", 1: "static", 2: "static", 3: "static"}),
    ({"x": {2: torch.export.Dim.AUTO}}, {0: "static", 1: "static", 2: "dynamic", 3: "static"}),
])
def test_the_dynamic_option(dynamic, want):
    gm = capture(SmallCnn().eval(), (torch.randn(2, 3, 16, 16),), {}, dynamic=dynamic)
    assert gm.meta["etp_dynamic_dims"]["x"] == want
    assert gm.meta["etp_pinned_dims"] == {}


def test_a_bad_dynamic_option_is_refused():
    with pytest.raises(OptionError, match="dynamic must be"):
        capture(SmallCnn(), (torch.randn(2, 3, 8, 8),), {}, dynamic="everything")


def test_auto_falls_back_when_symbolic_sizes_cannot_be_traced(monkeypatch):
    """A model whose code cannot run with symbolic sizes is captured with fewer dynamic
    dims (the note says so) instead of failing."""
    from etp_fx.capture import export as export_module
    real = export_module._export

    def refuse_symbolic_lengths(model, args, kwargs, dyn):
        if dyn and any(2 in (spec or {}) for spec in dyn.values()):
            raise RuntimeError("Could not guard on data-dependent expression")
        return real(model, args, kwargs, dyn)
    monkeypatch.setattr(export_module, "_export", refuse_symbolic_lengths)
    gm = capture(SmallCnn().eval(), (torch.randn(2, 3, 16, 16),), {}, dynamic="auto")
    assert gm.meta["etp_dynamic_dims"]["x"] == {0: "dynamic", 1: "static", 2: "static",
                                                3: "static"}
    assert "captured with dynamic='batch'" in gm.meta["etp_capture_notes"][0]


def _groups(g):
    return [(x.id, x.size, x.unit_kind, x.exact, sorted(
        (m.name, m.dim, tuple(sorted(m.roles)), m.coords) for m in x.members)) for x in g.groups]


def _llama():
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, vocab_size=128)
    return T.LlamaForCausalLM(cfg).eval(), torch.randint(0, 128, (2, 8))


def _bert():
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, vocab_size=128)
    return T.BertForSequenceClassification(cfg).eval(), torch.randint(0, 128, (2, 8))


SAME_GROUPS = {
    "resnet18": lambda: (tv.models.resnet18().eval(), torch.randn(2, 3, 64, 64)),
    "vit_b_16": lambda: (tv.models.vit_b_16().eval(), torch.randn(2, 3, 224, 224)),
    "bert": _bert,
    "llama": _llama,
}


@pytest.mark.parametrize("name", list(SAME_GROUPS))
def test_static_and_dynamic_captures_give_the_same_groups(name):
    """The rules read sizes from meta["val"]: with symbolic dims they are SymInts, and the
    groups (ids, sizes, members, exactness) and the cost model must not change."""
    model, x = SAME_GROUPS[name]()
    static = etp_fx.trace(model, x, capture="export")
    dynamic = etp_fx.trace(model, x, capture="export", dynamic="auto")
    assert any(s == "dynamic" for dims in dynamic.module.meta["etp_dynamic_dims"].values()
               for s in dims.values())
    assert _groups(static) == _groups(dynamic)
    assert static.cost.params() == dynamic.cost.params()
    assert static.cost.macs() == dynamic.cost.macs()


def test_another_shape_grows_every_dynamic_dim_together():
    model, x = _llama()
    gm = capture(model, (x,), {}, dynamic="auto")
    args, kwargs = another_shape(gm, (x,), {})
    assert args == () and kwargs["input_ids"].shape == (3, 9)
    assert kwargs["attention_mask"].shape == (3, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(**kwargs).logits, model(**kwargs).logits)


def test_graph_node_and_edge_counts_stay_dynamic():
    pyg = pytest.importorskip("torch_geometric.nn")

    class Gat(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = pyg.GATConv(8, 4, heads=2)
            self.c2 = pyg.GATConv(8, 3, heads=1)

        def forward(self, x, edge_index):
            return self.c2(F.relu(self.c1(x, edge_index)), edge_index)

    torch.manual_seed(0)
    model = Gat().eval()
    x, edges = torch.randn(10, 8), torch.randint(0, 10, (2, 30))
    g = etp_fx.trace(model, (x, edges))
    plan = {g.groups[0].id: [0]}
    small = etp_fx.compress(model, (x, edges), remove=plan, graph=g)
    assert small.meta["etp_dynamic_dims"] == {"x": {0: "dynamic", 1: "static"},
                                              "edge_index": {0: "static", 1: "dynamic"}}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan)
    x2, edges2 = torch.randn(13, 8), torch.randint(0, 13, (2, 41))
    with torch.no_grad():
        torch.testing.assert_close(small(x2, edges2), zeroed(x2, edges2))


def test_saved_file_keeps_the_dynamic_dims(tmp_path):
    """A .pt2 from etp_fx.save accepts the sizes the compressed model accepts (old: the
    re-export kept dim 0 only), by position and by keyword, with and without a mask."""
    model, x = _llama()
    g = etp_fx.trace(model, x)
    small = etp_fx.compress(model, x, remove={g.groups[1].id: [0]}, graph=g)
    path = etp_fx.save(small, tmp_path / "llama.pt2")
    loaded = etp_fx.load(path)
    assert loaded.meta["etp_dynamic_dims"]["input_ids"] == {0: "dynamic", 1: "dynamic"}
    x13 = torch.randint(0, 128, (3, 13))
    mask = torch.ones_like(x13)
    mask[0, -3:] = 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(x13).logits, small(x13).logits)
        torch.testing.assert_close(loaded(input_ids=x13, attention_mask=mask).logits,
                                   small(x13, attention_mask=mask).logits)
