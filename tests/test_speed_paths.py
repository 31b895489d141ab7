"""The fast paths of trace and compress: what they skip must not change what they compute.

- trace runs the model eagerly only when export fails (or for lazy modules);
- compress reuses the trace's capture (no second torch.export) when a static result is asked
  for, takes the weights from the model it is given, never touches the model, and re-traces
  when the model's module tree changed since the trace;
- a batch-dynamic compress exports once per graph and model, however often it is called;
- the numeric cost model agrees with its sympy form.
"""
import copy

import pytest
import torch
import torch.nn as nn

import etp_fx
from oracle import check_oracle, random_plan


def _net(act=nn.ReLU):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


class _Exports:
    def __init__(self, monkeypatch):
        self.n = 0
        real = torch.export.export

        def counting(*a, **kw):
            self.n += 1
            return real(*a, **kw)
        monkeypatch.setattr(torch.export, "export", counting)


def test_trace_does_not_run_the_model_eagerly(monkeypatch):
    import etp_fx.capture
    calls = []
    real = etp_fx.capture.export._check_runs
    monkeypatch.setattr(etp_fx.capture.export, "_check_runs", lambda *a: calls.append(1) or real(*a))
    etp_fx.trace(_net(), torch.randn(1, 3, 8, 8))
    assert calls == []
    with pytest.raises(etp_fx.InputError):
        etp_fx.trace(_net(), torch.randn(1, 5, 8, 8))
    assert calls == [1]


def test_bad_inputs_still_name_the_module():
    with pytest.raises(etp_fx.InputError, match="does not run on the example inputs"):
        etp_fx.trace(_net(), torch.randn(1, 5, 8, 8))


def test_lazy_modules_are_initialised_by_trace():
    net = nn.Sequential(nn.LazyLinear(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    g = etp_fx.trace(net, torch.randn(1, 4))
    assert [grp.size for grp in g.groups] == [6]


def _assert_static_compress_matches_zeroed(model, x, g, plan):
    small = etp_fx.compress(model, x, remove=plan, graph=g, dynamic_batch=False)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)


def test_static_compress_reuses_the_trace(monkeypatch):
    net, x = _net(), torch.randn(2, 3, 8, 8)
    g = etp_fx.trace(net, x)
    plan = random_plan(g, 0.4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ex = _Exports(monkeypatch)
    small = etp_fx.compress(net, x, remove=plan, graph=g, dynamic_batch=False)
    assert ex.n == 0, "no second torch.export for a static result"
    zeroed = etp_fx.zero_units(copy.deepcopy(net), g, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)
    # the model is untouched, and the result shares no storage with it
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    ptrs = {p.data_ptr() for p in net.parameters()} | {b.data_ptr() for b in net.buffers()}
    assert not ptrs & {p.data_ptr() for p in small.parameters()}
    # the trace's own module is untouched too: a second compress from it gives the same
    small2 = etp_fx.compress(net, x, remove=plan, graph=g, dynamic_batch=False)
    with torch.no_grad():
        torch.testing.assert_close(small2(x), small(x), rtol=0, atol=0)


def test_weights_come_from_the_model_given():
    net, x = _net(), torch.randn(2, 3, 8, 8)
    g = etp_fx.trace(net, x)
    trained = copy.deepcopy(net)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    plan = random_plan(g, 0.4)
    _assert_static_compress_matches_zeroed(trained, x, g, plan)


def test_changed_module_tree_is_traced_again():
    x = torch.randn(2, 3, 8, 8)
    relu = _net(nn.ReLU)
    g = etp_fx.trace(relu, x)
    gelu = _net(nn.GELU)
    gelu.load_state_dict(relu.state_dict())
    plan = random_plan(g, 0.4)
    _assert_static_compress_matches_zeroed(gelu, x, g, plan)


def test_other_input_shapes_are_traced_again():
    net = _net()
    g = etp_fx.trace(net, torch.randn(1, 3, 8, 8))
    x = torch.randn(3, 3, 10, 10)
    plan = random_plan(g, 0.4)
    small = etp_fx.compress(net, x, remove=plan, graph=g, dynamic_batch=False)
    zeroed = etp_fx.zero_units(copy.deepcopy(net), g, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,exports", [("export", 1), ("auto", 0)])
def test_dynamic_compress_exports_at_most_once_per_graph(monkeypatch, method, exports):
    """Through export, the batch-dynamic capture is made once and reused; through the fast
    path, the user's trace already holds for any batch: no export at all."""
    if method == "export":
        monkeypatch.setenv("ETP_FX_CAPTURE", "export")
    net, x = _net(), torch.randn(1, 3, 8, 8)
    g = etp_fx.trace(net, x)
    ex = _Exports(monkeypatch)
    for frac in (0.2, 0.5):
        small = etp_fx.compress(net, x, remove=random_plan(g, frac), graph=g)
        with torch.no_grad():
            assert small(torch.randn(5, 3, 8, 8)).shape == (5, 4)
    assert ex.n == exports


def test_tied_weights_on_the_reused_capture():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.mid = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mid(self.emb(ids))))

    torch.manual_seed(0)
    net = Tied().eval()
    ids = torch.randint(0, 10, (2, 5))
    for dyn in (False, True):
        small, g, plan = check_oracle(net, ids, frac=0.4, dynamic_batch=dyn)
        assert small.emb.weight is small.head.weight


def test_cost_model_matches_its_sympy_form():
    net = _net()
    cm = etp_fx.trace(net, torch.randn(1, 3, 8, 8)).cost
    widths = {grp.id: max(1, grp.size // 2) for grp in cm.graph.groups}
    subs = {cm.by_id[k]: v for k, v in widths.items()}
    assert int(cm.params_expr.subs(subs)) == cm.params(widths)
    assert int(cm.macs_expr.subs(subs)) == cm.macs(widths)
    assert cm.params() == sum(p.numel() for p in net.parameters())
    with pytest.raises(KeyError, match="unknown group ids"):
        cm.params({"nope": 1})
