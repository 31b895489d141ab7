"""Verification that cannot be empty (issue 14): what compress checks, on which inputs, at which
tolerance, and what it refuses instead of passing silently. docs/verification.md describes it."""
import copy
import inspect
import math
import operator
import sys

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.demo import SmallVGG
from test_trace_basic import Residual

C = sys.modules["etp_fx.surgery.compress"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(),
                         nn.Linear(12, 3)).eval()


def _cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    for m in net.modules():  # non-trivial shifts, so kept constants really are folded
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.bias.data.normal_()
    return net


class _Classes(nn.Module):
    """Returns integer class ids only: nothing floating to compare."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).argmax(-1)


def _corrupt_bias(monkeypatch, name, delta):
    """Sabotage the surgery: after the folds, add ``delta`` to one bias element of the result."""
    real = C.apply_folds

    def corrupt(gm, folds, keep):
        lines = real(gm, folds, keep)
        with torch.no_grad():
            gm.get_parameter(name)[0] += delta
        return lines
    monkeypatch.setattr(C, "apply_folds", corrupt)


# --- 1. non-finite inputs and outputs are refused -------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_example_input_is_refused_by_name(bad):
    x = torch.randn(4, 5)
    x[1, 2] = bad
    with pytest.raises(etp_fx.InputError,
                       match=r"positional input 0 \(shape \(4, 5\)\) holds NaN or Inf"):
        etp_fx.compress(_mlp(), x, remove={"0.weight[0]": [0]})


def test_non_finite_keyword_input_is_named():
    inputs = {"x": torch.randn(2, 5), "scale": torch.tensor([2.0])}
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(5, 6), nn.Linear(6, 2)

        def forward(self, x, scale):
            return self.out(torch.relu(self.fc(x))) * scale

    etp_fx.compress(KW().eval(), inputs, remove={"fc.weight[0]": [0]})  # finite: fine
    inputs["scale"] = torch.tensor([math.nan])
    with pytest.raises(etp_fx.InputError, match="keyword input 'scale'"):
        etp_fx.compress(KW().eval(), inputs, remove={"fc.weight[0]": [0]})


class _Overflow(_Classes):
    """Returns Inf (or NaN) on any input."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) / 0.0


class _Nothing(_Classes):
    """Returns a tensor without elements."""

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))[:, :0]


def test_non_finite_reference_output_is_refused():
    with pytest.raises(etp_fx.VerificationError, match="output is NaN or Inf on these inputs"):
        etp_fx.compress(_Overflow().eval(), torch.randn(3, 4), remove={"a.weight[0]": [1]})


# --- 2. integer outputs are compared exactly; no output is no pass ----------------------------

def test_integer_outputs_are_compared_exactly(monkeypatch):
    torch.manual_seed(0)
    model, x = _Classes().eval(), torch.randn(16, 4)
    _corrupt_bias(monkeypatch, "b.bias", 100.0)  # every row now says class 0
    with pytest.raises(etp_fx.VerificationError, match="integer/boolean output element"):
        etp_fx.compress(model, x, remove={"a.weight[0]": [0, 3]})
    monkeypatch.undo()
    small = etp_fx.compress(model, x, remove={"a.weight[0]": [0, 3]})
    assert small.meta["etp_report"]["verified"][0]["exact_elements"] == 16


def test_a_model_with_no_output_to_compare_does_not_pass():
    with pytest.raises(etp_fx.VerificationError, match="nothing to verify"):
        etp_fx.compress(_Nothing().eval(), torch.randn(3, 4), remove={"a.weight[0]": [1]})
    small = etp_fx.compress(_Nothing().eval(), torch.randn(3, 4), remove={"a.weight[0]": [1]},
                            verify=False)
    assert small.meta["etp_report"]["verified"] == []


# --- 3. rtol is validated before any work ---------------------------------------------------

@pytest.mark.parametrize("rtol", [math.nan, math.inf, -1e-5, "1e-5", None, 1j])
def test_bad_rtol_is_refused_before_any_work(monkeypatch, rtol):
    monkeypatch.setattr(C, "trace_args", lambda *a, **k: pytest.fail("traced before the check"))
    with pytest.raises(etp_fx.Error, match="verify must be True, False, or a tolerance") as e:
        etp_fx.compress(_mlp(), torch.randn(2, 5), remove={"0.weight[0]": [0]}, verify=rtol)
    assert isinstance(e.value, ValueError)


def test_nan_rtol_cannot_pass_a_wrong_model(monkeypatch):
    _corrupt_bias(monkeypatch, "2.bias", 1.0)
    with pytest.raises(etp_fx.Error):  # the sabotaged model was returned with rtol=nan
        etp_fx.compress(_mlp(), torch.randn(2, 5), remove={"0.weight[0]": [0]}, verify=math.nan)


# --- 4. MACs are counted for the inputs given -----------------------------------------------

def test_macs_are_counted_at_the_inputs_given():
    from torch.utils.flop_counter import FlopCounterMode
    net = Residual().eval()
    g = etp_fx.trace(net, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 16, 16)  # four times the pixels of the trace
    plan = {"a.weight[0]": [0, 3]}
    small = etp_fx.compress(net, x, remove=plan, graph=g, dynamic_batch=False)
    rep = small.meta["etp_report"]
    at_x = etp_fx.trace(net, x).cost
    assert rep["macs_before"] == at_x.macs() != g.cost.macs()
    assert "Tensor(2, 3, 16, 16)" in rep["macs_counted_at"]
    with FlopCounterMode(display=False) as fc:
        small(x)
    assert fc.get_total_flops() == 2 * rep["macs_after"]


def test_macs_of_the_users_trace_when_the_inputs_match_it():
    net = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    g = etp_fx.trace(net, x)
    rep = etp_fx.compress(net, x, remove={"a.weight[0]": [0]}, graph=g).meta["etp_report"]
    assert rep["macs_before"] == g.cost.macs()
    assert rep["macs_counted_at"] == "(Tensor(1, 3, 8, 8) float32)"


# --- 5./6. a batch-dynamic result accepts other batches, and this is checked ----------------

def test_issue14_trained_model_result_accepts_every_batch(monkeypatch):
    """Issue 14, silent failure #7: a model trained after tracing, zeroed and compressed with
    the graph, refused every batch but the traced one (Guard failed: x.size()[0] == 1). Two
    causes: the fast capture was checked against the zeroed copy with the trace's own (other)
    weights, so it was wrongly rejected; and the export that replaced it was static although
    a batch-dynamic result was asked for."""
    torch.manual_seed(0)
    model = SmallVGG()  # train mode, as built
    g = etp_fx.trace(model, (torch.randn(1, 1, 16, 16),))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 1, 16, 16)),
                                           torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    plan = {g.groups[0].id: [0, 1, 2], g.groups[2].id: [5]}
    m = copy.deepcopy(model)
    etp_fx.zero_units(m, g, plan)
    m.eval()
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real(*a, **k))
    s = etp_fx.compress(m, (torch.randn(1, 1, 16, 16),), remove=plan, graph=g)
    assert exports == [], "the fast capture runs like the model given: no export needed"
    x4 = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(s(x4), m(x4), rtol=1e-4, atol=1e-5)
    rep = s.meta["etp_report"]
    assert rep["batch_dynamic"]
    assert [v["batch"] for v in rep["verified"]] == [1, 2]
    assert all(v["passed"] for v in rep["verified"])


def test_a_result_specialised_to_one_batch_is_a_verification_error(monkeypatch):
    """The class of bug behind #7: a capture fixed to the example's batch serving a result that
    should take any batch. Forced here (every capture a static export); the check must catch
    it."""
    monkeypatch.setenv("ETP_FX_CAPTURE", "export")
    real = sys.modules["etp_fx.surgery.captures"].trace_args
    monkeypatch.setattr(sys.modules["etp_fx.surgery.captures"], "trace_args",
                        lambda *a, dynamic_batch, method: real(*a, dynamic_batch=False,
                                                               method="export"))
    with pytest.raises(etp_fx.VerificationError, match=r"refuses batch \d at dim 0"):
        etp_fx.compress(_cnn(), torch.randn(1, 3, 8, 8), remove={"0.weight[0]": [0]})


def test_report_says_what_was_verified():
    x = torch.randn(4, 5)
    dyn = etp_fx.compress(_mlp(), x, remove={"0.weight[0]": [0, 1]}).meta["etp_report"]
    assert [(v["check"], v["batch"]) for v in dyn["verified"]] == [("example", 4),
                                                                   ("other batch", 2)]
    for v in dyn["verified"]:
        assert v["dtype"] == "float32" and v["tolerance"] == 1e-5 and v["passed"]
        assert v["max_abs_diff"] <= 1e-5 * v["output_scale"]
    static = etp_fx.compress(_mlp(), x, remove={"0.weight[0]": [0, 1]},
                             dynamic_batch=False).meta["etp_report"]
    assert [v["batch"] for v in static["verified"]] == [4]


def test_the_other_batch_draw_is_checked_too(monkeypatch):
    # a fold map with the traced batch baked in broadcasts wrongly at any other batch: the
    # example alone would pass it
    real = C.apply_folds

    def batch_bound(gm, folds, keep):
        lines = real(gm, folds, keep)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = out.args[0][0]
        gm.register_buffer("_wrong", torch.zeros(4, 3))  # right only for a batch of 4
        with gm.graph.inserting_before(out):
            c = gm.graph.get_attr("_wrong")
            add = gm.graph.call_function(torch.ops.aten.add.Tensor, (first, c))
        out.args = ((add,) + tuple(out.args[0][1:]),)
        gm.recompile()
        return lines
    monkeypatch.setattr(C, "apply_folds", batch_bound)
    with pytest.raises(etp_fx.VerificationError, match=r"Tensor\(2, 5\).*other batch"):
        etp_fx.compress(_mlp(), torch.randn(4, 5), remove={"0.weight[0]": [0]})


class _BatchCoupled(nn.Module):
    """Rows that interact in eval mode: every row gets the batch's mean added, so a row's
    output at a batch of 2 is not its output alone (ops the fast capture lowers)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y + y.mean(0, keepdim=True)


@pytest.mark.parametrize("capture", ["fast", "export"])
def test_rows_that_interact_are_checked_against_the_whole_batch(monkeypatch, capture):
    """The check at another batch stacks the example's reference and the fresh row's (run
    alone); rows that interact make those differ from the model's batch of 2, so the check is
    made again with a reference from the whole batch, and the model is neither refused nor
    passed on the stacked reference."""
    if capture == "export":
        monkeypatch.setenv("ETP_FX_CAPTURE", "export")
    torch.manual_seed(0)
    net, x = _BatchCoupled().eval(), torch.randn(1, 5)
    s = etp_fx.compress(net, x, remove={"a.weight[0]": [0, 1, 2]})
    rep = s.meta["etp_report"]
    other = rep["verified"][1]
    assert other["check"] == "other batch" and other["passed"] is True
    assert other["reference"] == "whole batch"
    x3 = torch.randn(3, 5)
    ref = copy.deepcopy(net)
    etp_fx.zero_units(ref, etp_fx.trace(net, x), {"a.weight[0]": [0, 1, 2]})
    with torch.no_grad():
        torch.testing.assert_close(s(x3), ref(x3), rtol=1e-4, atol=1e-5)


def _row_one_perturbed(monkeypatch):
    """Sabotage: the result's row k gets the sum of the rows before it added (cumsum over the
    batch minus the row itself): right at a batch of 1 and on row 0 of any batch, wrong on
    row 1 of a batch of 2, the fresh row of the check at another batch."""
    real = C.apply_folds

    def coupled(gm, folds, keep):
        lines = real(gm, folds, keep)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = out.args[0][0]
        aten = torch.ops.aten
        with gm.graph.inserting_before(out):
            before = gm.graph.call_function(
                aten.sub.Tensor, (gm.graph.call_function(aten.cumsum.default, (first, 0)), first))
            wrong = gm.graph.call_function(aten.add.Tensor, (first, before))
        out.args = ((wrong,) + tuple(out.args[0][1:]),)
        gm.recompile()
        return lines
    monkeypatch.setattr(C, "apply_folds", coupled)


@pytest.mark.parametrize("capture", ["fast", "export"])
def test_a_result_wrong_only_on_the_fresh_row_is_caught(monkeypatch, capture):
    """The example's row of the draw at another batch is right; the fresh row is not: the
    stacked reference fails, the whole-batch reference fails too, and compress refuses."""
    if capture == "export":
        monkeypatch.setenv("ETP_FX_CAPTURE", "export")
    _row_one_perturbed(monkeypatch)
    with pytest.raises(etp_fx.VerificationError, match=r"\(other batch\)"):
        etp_fx.compress(_mlp(), torch.randn(1, 5), remove={"0.weight[0]": [0]})


def test_the_other_batch_stacks_the_example_and_a_fresh_row(monkeypatch):
    """For a batch of 1, the draw at another batch is the example's row and one fresh row; the
    model itself (the oracle of a fast capture) runs on the fresh row alone, the result at the
    batch of 2 matches the stacked reference, and that vouches for the capture (no separate
    run of the capture against the model)."""
    batches, capture_runs = [], []
    real = torch.func.functional_call

    def counted(module, params, args, kwargs=None, **kw):
        batches.append(args[0].shape[0])
        return real(module, params, args, kwargs, **kw)
    monkeypatch.setattr(torch.func, "functional_call", counted)
    real_runs = C.runs_like_model
    monkeypatch.setattr(C, "runs_like_model",
                        lambda *a, **k: capture_runs.append(1) or real_runs(*a, **k))
    x = torch.randn(1, 5)
    small = etp_fx.compress(_mlp(), x, remove={"0.weight[0]": [0, 1]})
    rep = small.meta["etp_report"]
    assert batches == [1] and capture_runs == []
    assert [(v["check"], v["batch"], v.get("reference")) for v in rep["verified"]] == [
        ("example", 1, None), ("other batch", 2, "per row")]
    assert all(v["passed"] for v in rep["verified"])


class _Tokens(nn.Module):
    """Per-token MLP on (batch, length, features): an export keeps batch and length dynamic."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _tokens_result(monkeypatch, **kw):
    monkeypatch.setenv("ETP_FX_CAPTURE", "export")  # the fast path would say "generic"
    torch.manual_seed(0)
    return etp_fx.compress(_Tokens().eval(), torch.randn(4, 6, 5), remove={"a.weight[0]": [0, 1]},
                           **kw)


def test_another_batch_and_length_are_one_draw(monkeypatch):
    """Where a non-batch dim is dynamic, one draw is both the other batch and the other shape
    (one forward pass of each model instead of two): its batch and its length both differ
    from the example's."""
    rep = _tokens_result(monkeypatch).meta["etp_report"]
    assert rep["dynamic_dims"]["x"] == {0: "dynamic", 1: "dynamic", 2: "static"}
    assert [(v["check"], v["inputs"]) for v in rep["verified"]] == [
        ("example", "(Tensor(4, 6, 5) float32)"),
        ("other batch and shape", "(x=Tensor(2, 7, 5) float32)")]
    assert all(v["passed"] for v in rep["verified"])


def test_a_result_wrong_only_at_another_length_is_caught(monkeypatch):
    """Sabotage: the result's output is scaled by length / 6, right at the example's length 6
    (and at any batch of that length) only; the merged draw must catch it."""
    real = C.apply_folds

    def length_bound(gm, folds, keep):
        lines = real(gm, folds, keep)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        first = out.args[0][0]
        with gm.graph.inserting_before(out):
            length = gm.graph.call_function(torch.ops.aten.sym_size.int, (first, 1))
            scale = gm.graph.call_function(operator.truediv, (length, 6))
            wrong = gm.graph.call_function(torch.mul, (first, scale))
        out.args = ((wrong,) + tuple(out.args[0][1:]),)
        gm.recompile()
        return lines
    monkeypatch.setattr(C, "apply_folds", length_bound)
    with pytest.raises(etp_fx.VerificationError, match=r"Tensor\(2, 7, 5\).*other batch and shape"):
        _tokens_result(monkeypatch)


def test_the_working_copy_runs_and_grows_inputs_before_it_is_compiled():
    """The zeroed original is not compiled until the rewrite (it runs node by node): it must
    compute what the capture computes, and name its inputs as the capture's forward does (the
    dims to grow are found by name), at any shape the capture takes."""
    model, x = _Tokens().eval(), torch.randn(4, 6, 5)
    gm = etp_fx.capture.capture(model, (x,), {}, dynamic="auto", method="export")
    copy_ = sys.modules["etp_fx.surgery.working_copy"].working_copy(gm, model, compiled=False)
    assert inspect.signature(copy_.forward) == inspect.signature(gm.forward)
    args, kw = etp_fx.capture.another_shape(copy_, (x,), {})
    assert kw["x"].shape == (5, 7, 5)
    with torch.no_grad():
        assert torch.equal(copy_(x), gm(x)) and torch.equal(copy_(**kw), gm(**kw))


# --- 7./8. every dtype, every selection; rounding is not "an etp_fx bug" ---------------------

SELECTIONS = [etp_fx.Ratio(0.3), etp_fx.Threshold(0.9, relative=True), etp_fx.Budget(macs=0.6)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("make,shape", [(_cnn, (2, 3, 8, 8)), (_mlp, (4, 5))],
                         ids=["cnn", "mlp"])
def test_every_dtype_compresses_with_every_selection(dtype, make, shape):
    model = make().to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    g = etp_fx.trace(model, x)
    for sel in SELECTIONS + [etp_fx.Plan({g.groups[0].id: [0, 1]})]:
        small = etp_fx.compress(model, x, sel, graph=g)
        rep = small.meta["etp_report"]
        assert rep["params_after"] < rep["params_before"], sel
        tol = etp_fx.surgery.verify.TOLERANCES[dtype]
        for v in rep["verified"]:
            assert v["dtype"] == str(dtype).replace("torch.", "") and v["tolerance"] == tol
            assert v["passed"], (sel, v)
        assert next(small.parameters()).dtype == dtype


def test_low_precision_rounding_is_rechecked_in_float64_not_called_a_bug():
    # with rtol=0 every float16 rounding fails the first check: the float64 recheck (what is
    # left: the folded biases rounded to float16) must pass it
    model = _mlp().half()
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).half()
    small = etp_fx.compress(model, x, ratio=0.3, verify=0.0)
    verified = small.meta["etp_report"]["verified"]
    assert all(v["passed"] for v in verified)
    rechecked = [v for v in verified if v["max_abs_diff"] > 0]
    assert rechecked, "float16 rounding was expected in at least one check"
    assert all(v["float64_rel_diff"] <= v["float64_tolerance"] for v in rechecked)


def test_a_real_difference_in_float16_is_still_caught(monkeypatch):
    _corrupt_bias(monkeypatch, "8.bias", 0.5)
    with pytest.raises(etp_fx.VerificationError, match="In float64 too.*etp_fx bug"):
        etp_fx.compress(_cnn().half(), torch.randn(2, 3, 8, 8).half(),
                        remove={"0.weight[0]": [0]})


# --- 9. the module output is verified the same way -------------------------------------------

MO = sys.modules["etp_fx.surgery.module_output"]


def test_module_output_reports_verification_as_the_graph_output_does():
    x = torch.randn(4, 5)
    graph = etp_fx.compress(_mlp(), x, ratio=0.3).meta["etp_report"]["verified"]
    module = etp_fx.compress(_mlp(), x, ratio=0.3, output="module").etp_report
    assert [v["check"] for v in module["verified"]] == ["example", "other shape"]
    for g, m in zip(graph, module["verified"]):
        assert set(g) == set(m) and m["passed"] and m["tolerance"] == g["tolerance"] == 1e-5
    assert module["checked"] == ["the example inputs", "batch 5"]
    assert module["max_abs_diff"] == module["verified"][0]["max_abs_diff"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_module_output_tolerance_follows_the_dtype(dtype):
    model, x = _mlp().to(dtype), torch.randn(4, 5, dtype=dtype)
    rep = etp_fx.compress(model, x, ratio=0.3, output="module").etp_report
    for v in rep["verified"]:
        assert v["dtype"] == str(dtype).replace("torch.", "") and v["passed"]
        assert v["tolerance"] == etp_fx.surgery.verify.TOLERANCES[dtype]


def test_module_output_refuses_what_cannot_be_verified():
    with pytest.raises(etp_fx.VerificationError, match="output is NaN or Inf on these inputs"):
        etp_fx.compress(_Overflow().eval(), torch.randn(3, 4), remove={"a.weight[0]": [1]},
                        output="module")
    with pytest.raises(etp_fx.VerificationError, match="nothing to verify"):
        etp_fx.compress(_Nothing().eval(), torch.randn(3, 4), remove={"a.weight[0]": [1]},
                        output="module")


def test_module_output_compares_integer_outputs_exactly(monkeypatch):
    torch.manual_seed(0)
    model, x = _Classes().eval(), torch.randn(16, 4)
    real = MO.add_fold_biases

    def corrupt(small, folds):  # sabotage: every row of the result now says class 0
        with torch.no_grad():
            small.b.bias[0] += 100.0
        return real(small, folds)
    monkeypatch.setattr(MO, "add_fold_biases", corrupt)
    with pytest.raises(etp_fx.ModuleOutputError, match="integer/boolean output element"):
        etp_fx.compress(model, x, remove={"a.weight[0]": [0, 3]}, output="module")
    monkeypatch.undo()
    small = etp_fx.compress(model, x, remove={"a.weight[0]": [0, 3]}, output="module")
    assert small.etp_report["verified"][0]["exact_elements"] == 16


class _Counting(nn.Module):
    """Counts its calls in a buffer; its output has a hard-coded batch of 2."""

    def __init__(self, fixed_batch=False):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.fixed_batch = fixed_batch

    def forward(self, x):
        self.calls += 1
        y = self.b(torch.relu(self.a(x)))
        return y.reshape(2, 2) if self.fixed_batch else y


def test_eager_runs_leave_the_model_and_the_result_untouched():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    model = _Counting().eval()
    small = etp_fx.compress(model, x, ratio=0.5, output="module")
    assert int(model.calls) == 0 and int(small.calls) == 0  # verification ran small twice
    # batch-dynamic: the capture refuses batch 3, so the model itself is run there (and fails)
    model = _Counting(fixed_batch=True).eval()
    small = etp_fx.compress(model, x, ratio=0.5)
    note = small.meta["etp_report"]["verified"][1]["note"]
    assert "the model itself does not run at batch 3" in note
    assert int(model.calls) == 0
