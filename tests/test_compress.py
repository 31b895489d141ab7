"""compress(): the oracle on small models, the report, exactness classes and bad input."""
import copy

import pytest
import torch
import torch.nn as nn

import etp_fx
from oracle import check_oracle
from test_trace_basic import Residual


def perturbed(m):
    """Non-trivial BatchNorm statistics and biases, so constants really flow."""
    torch.manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
            mod.bias.data.normal_()
    return m


def test_oracle_residual_cnn():
    small, g, plan = check_oracle(perturbed(Residual()), torch.randn(2, 3, 8, 8))
    assert small.meta["etp_report"]["params_after"] < small.meta["etp_report"]["params_before"]
    assert small.get_parameter("a.weight").shape[0] == 16 - len(plan["a.weight[0]"])


def test_constants_are_folded_exactly_including_padded_convs():
    small, g, plan = check_oracle(perturbed(Residual()), torch.randn(2, 3, 8, 8), keep_constants=True)
    rep = small.meta["etp_report"]
    assert rep["folds"], "BatchNorm shifts of removed channels must be folded"
    assert {v["exactness"] for v in rep["groups"].values()} <= {"exact", "exact-after-folding"}
    assert "exact-after-folding" in {v["exactness"] for v in rep["groups"].values()}


def test_sigmoid_gate_constant_is_folded():
    class SE(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.fc1, self.fc2 = nn.Linear(8, 4), nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            y = self.conv(x)
            s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3))))))
            return self.out((y * s[:, :, None, None]).mean((2, 3)))

    check_oracle(SE(), torch.randn(2, 3, 5, 5))


def test_report_and_user_model_untouched():
    m = Residual().eval()
    before = copy.deepcopy(m.state_dict())
    small = etp_fx.compress(m, torch.randn(1, 3, 8, 8), remove={"a.weight[0]": [0, 3]})
    rep = small.meta["etp_report"]
    assert rep["groups"]["a.weight[0]"] == {"old": 16, "new": 14, "exactness": "exact", "removed": [0, 3]}
    assert rep["macs_after"] < rep["macs_before"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])


def test_flop_counter_agrees_with_predicted_macs():
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(1, 3, 8, 8)
    small = etp_fx.compress(Residual().eval(), x, remove={"a.weight[0]": [1, 2, 5], "stem.weight[0]": [0]})
    with FlopCounterMode(display=False) as fc:
        small(x)
    assert fc.get_total_flops() == 2 * small.meta["etp_report"]["macs_after"]


@pytest.mark.parametrize("plan,match", [
    ({"nope[0]": [0]}, "no group 'nope"),
    ({"a.weight[0]": [99]}, "out of range"),
    ({"a.weight[0]": list(range(16))}, "keep at least one unit"),
])
def test_bad_plans(plan, match):
    with pytest.raises(etp_fx.PlanError, match=match):
        etp_fx.compress(Residual().eval(), torch.randn(1, 3, 8, 8), remove=plan)


def test_model_changed_since_traced():
    m = Residual().eval()
    g = etp_fx.trace(m, torch.randn(1, 3, 8, 8))
    m.a = nn.Conv2d(8, 12, 3, padding=1)
    m.b = nn.Conv2d(12, 8, 3, padding=1)
    with pytest.raises(etp_fx.ModelMismatchError, match="changed shape"):
        etp_fx.compress(m, torch.randn(1, 3, 8, 8), remove={"a.weight[0]": [0]}, graph=g)


def test_integer_weights_are_refused():
    m = nn.Linear(4, 4)
    m.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="Prune before quantizing"):
        etp_fx.compress(m, torch.randn(1, 4), remove={})


@pytest.mark.parametrize("v", [0, 1.5, -0.1])
def test_target_macs_out_of_range(v):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        etp_fx.compress(Residual().eval(), torch.randn(1, 3, 8, 8), target_macs=v)


def test_training_mode_warns_and_is_kept():
    m = Residual().train()
    with pytest.warns(UserWarning, match="eval mode"):
        small = etp_fx.compress(m, torch.randn(2, 3, 8, 8), remove={"a.weight[0]": [0]})
    assert m.training
    assert small.meta["etp_report"]["groups"]["a.weight[0]"]["new"] == 15


def test_approximate_groups_need_consent():
    # an argmax over the pruned dim: removing a class shifts the ids of the ones after it
    class Classes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).argmax(-1)

    m = Classes().eval()
    with pytest.raises(etp_fx.PlanError, match="allow_approximate"):
        etp_fx.compress(m, torch.randn(3, 4), remove={"b.weight[0]": [1]})
    small = etp_fx.compress(m, torch.randn(3, 4), remove={"b.weight[0]": [1]}, allow_approximate=True)
    assert small.meta["etp_report"]["groups"]["b.weight[0]"]["exactness"] == "approximate"


def test_verification_failure_names_the_group(monkeypatch):
    # sabotage the rewrite of one op family so the compressed model is wrong: the error must
    # say so and name the group, never return the model
    import sys
    C = sys.modules["etp_fx.surgery.compress"]
    real = C.apply_folds

    def corrupt(gm, folds, keep):
        lines = real(gm, folds, keep)
        if gm.get_parameter("a.bias").shape[0] < 16:  # only when group a.weight[0] shrinks
            with torch.no_grad():
                gm.get_parameter("a.bias").add_(1.0)
        return lines

    monkeypatch.setattr(C, "apply_folds", corrupt)
    with pytest.raises(etp_fx.VerificationError, match=r"fail alone: a\.weight\[0\]$"):
        etp_fx.compress(Residual().eval(), torch.randn(1, 3, 8, 8),
                        remove={"a.weight[0]": [0], "stem.weight[0]": [1]})


def test_expand_as_through_normalize():
    # F.normalize lowers to expand_as(norm, x): its size comes from a tensor, not a list
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(nn.functional.normalize(self.a(x), dim=0))

    check_oracle(M(), torch.randn(2, 8))


def test_float32_rounding_is_told_apart_from_a_real_difference():
    # a LayerNorm over two features amplifies float32 rounding (its output is about
    # (a - b) / |a - b|): with a tolerance below that noise, the float32 check fails, the
    # float64 rerun shows the two models agree, and the model is returned with both numbers
    class TwoFeatureNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.mix = nn.Linear(4, 16), nn.Linear(16, 2)
            self.norm, self.head = nn.LayerNorm(2, elementwise_affine=False), nn.Linear(2, 2)

        def forward(self, x):
            return self.head(self.norm(self.mix(torch.tanh(self.fc(x)))))

    torch.manual_seed(0)
    m, x = TwoFeatureNorm().eval(), torch.randn(3, 4)
    g = etp_fx.trace(m, x)
    small = etp_fx.compress(m, x, remove={g.groups[0].id: [1, 5, 9]}, graph=g, verify=1e-12)
    report = small.meta["etp_report"]
    if report["max_abs_diff"] > 1e-12 * report["output_scale"]:  # float32 noise was there
        assert report["float64_rel_diff"] < 1e-9


def _ln_mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        m[0].bias.uniform_(0.5, 1.0)  # removed units keep these biases with kept constants
    return m


def test_unfoldable_default_constants_are_zeroed_whole_and_reported():
    # kept biases of removed units go through a LayerNorm: input-dependent, no fold can carry
    # them. With the default keep_constants those groups are zeroed whole, and the report
    # says which; the result still matches its zeroed original
    m, x = _ln_mlp(), torch.randn(5, 6)
    small = etp_fx.compress(m, x, ratio=0.25)
    rep = small.meta["etp_report"]
    assert rep["zeroed_whole"] == ["0.weight[0]"] and rep["groups"]["0.weight[0]"]["new"] == 12
    g = etp_fx.trace(m, x)
    zeroed = etp_fx.zero_units(copy.deepcopy(m), g, {k: v["removed"] for k, v in rep["groups"].items()})
    torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-6)


def test_constants_asked_for_are_never_dropped():
    with pytest.raises(etp_fx.FoldError, match="depend on the input") as e:
        etp_fx.compress(_ln_mlp(), torch.randn(5, 6), ratio=0.25, keep_constants=True)
    assert e.value.groups == ("0.weight[0]",)


# --- the fast capture is checked against the model once: by the other batch's reference -----

def _counting_capture_checks(monkeypatch):
    captures = __import__("sys").modules["etp_fx.surgery.captures"]
    calls = []
    real = captures.check_capture
    monkeypatch.setattr(captures, "check_capture",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_other_batch_check_vouches_for_the_fast_capture(monkeypatch):
    """Verified and batch-dynamic: the reference at another batch is the model itself with
    the units zeroed, so the fast capture is not run against the model beforehand (two eager
    runs saved); without verification it still is."""
    calls = _counting_capture_checks(monkeypatch)
    model, x = perturbed(Residual()).eval(), torch.randn(1, 3, 8, 8)
    g = etp_fx.trace(model, x)
    plan = {"a.weight[0]": [0, 3]}
    small = etp_fx.compress(model, x, remove=plan, graph=g)
    assert calls == [] and "etp_capture_vouched" not in small.meta
    assert [v["check"] for v in small.meta["etp_report"]["verified"]] == ["example",
                                                                           "other batch"]
    etp_fx.compress(model, x, remove=plan, graph=etp_fx.trace(model, x), verify=False)
    assert calls == [1]


def test_a_fast_capture_that_computes_something_else_is_replaced(monkeypatch):
    """Sabotage: the user's fast-path graph adds 1 to the output. Its zeroed copy and the
    result agree on the example, but not with the model at another batch: the capture is
    then run against the model, found wrong, and the model exported; the result is right."""
    model, x = perturbed(Residual()).eval(), torch.randn(1, 3, 8, 8)
    g = etp_fx.trace(model, x)
    out = next(n for n in g.module.graph.nodes if n.op == "output")
    with g.module.graph.inserting_before(out):
        wrong = g.module.graph.call_function(torch.ops.aten.add.Tensor, (out.args[0][0], 1.0))
    out.args = ((wrong,) + tuple(out.args[0][1:]),)
    g.module.recompile()
    calls = _counting_capture_checks(monkeypatch)
    plan = {"a.weight[0]": [0, 3]}
    small = etp_fx.compress(model, x, remove=plan, graph=g)
    assert calls, "the capture was run against the model once the other batch disagreed"
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan)
    x3 = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x3), zeroed(x3), rtol=1e-4, atol=1e-5)
