"""Folding removed units' constants into their consumers (etp_fx.surgery.fold): nodes the pass
adds carry shapes for later folds, rounding is judged by the dtype's eps, and constants that
are the same at every size go into biases."""
import copy

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.surgery.fold import Fold, apply_folds, rounding_tolerance


def _with_biases(model, std=0.3):
    """Trained-looking biases and BatchNorm shifts, so kept constants are not zero."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.normal_(0, std)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, std)
    return model.eval()


def _added_nodes(gm):
    return [n for n in gm.graph.nodes
            if str(n.target).startswith(("_etp_fold_", "_etp_bias_"))
            or getattr(n.target, "__name__", "") == "check_traced_size"
            or (n.op == "call_function" and any(str(a.target).startswith("_etp_fold_")
                                                for a in n.all_input_nodes))]


def test_a_fold_after_a_constant_map_reads_the_shapes_of_the_added_nodes():
    """Hypothesis found ``KeyError: 'val'``: the padded conv's constants became a constant map
    (an add after it), and the next conv, folding its own removed units' constants, read the
    shape of its input, now the add node, which had none."""
    torch.manual_seed(0)
    net = _with_biases(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
                                     nn.Conv2d(8, 4, 1)))
    x = torch.randn(2, 3, 6, 6)
    small = etp_fx.compress(net, x, ratio=0.5, keep_constants=True)  # folds asked for
    folds = small.meta["etp_report"]["folds"]
    assert any("constant map" in f for f in folds) and any("into the bias" in f for f in folds)
    assert all(v["passed"] for v in small.meta["etp_report"]["verified"])
    added = _added_nodes(small)
    assert len(added) >= 3  # the map's buffer, its guard and its add
    for n in added:
        val = n.meta["val"]
        if n.op == "get_attr":
            t = small.get_buffer(n.target) if n.target.startswith("_etp_fold_") else \
                small.get_parameter(n.target)
            assert tuple(val.shape) == tuple(t.shape) and val.dtype == t.dtype
        else:  # the add and the guard have the consumer's shape at the trace (full width)
            assert tuple(val.shape) == (2, 8, 6, 6) and val.dtype == torch.float32


def _conv_gm(dtype):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).to(dtype).eval()
    x = torch.randn(2, 3, 6, 6).to(dtype)
    gm = copy.deepcopy(etp_fx.trace(net, x).module)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    return gm, node


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_map_whose_rows_differ_by_low_precision_rounding_holds_for_every_batch(dtype):
    """A position-dependent constant map is computed at the traced batch; its rows are equal
    in exact arithmetic, but rounding may set them one step apart. In float16 one step is
    1e-3 of the values: a fixed 1e-6 tolerance kept the traced batch and refused any other."""
    gm, node = _conv_gm(dtype)
    C = (torch.rand(2, 4, 6, 6) + 1).to(dtype)  # values in [1, 2): one step is eps
    C[1] = C[0]
    C[1, 0, 0, 0] += torch.finfo(dtype).eps
    assert not torch.equal(C[0], C[1])
    fold = Fold(node.name, C, ["g"], size_free=False, traced_inputs="(Tensor(2, 3, 6, 6))",
                scale=float(C.abs().max()))
    lines = apply_folds(gm, [fold], {})
    assert "constant map" in lines[0]
    out = gm(torch.randn(3, 3, 6, 6).to(dtype))
    assert (out[0] if isinstance(out, (tuple, list)) else out).shape[0] == 3  # any batch
    with pytest.raises(etp_fx.InputError, match="made for inputs like"):
        gm(torch.randn(3, 3, 7, 7).to(dtype))  # but only the traced size


def test_rows_that_really_differ_keep_the_traced_batch():
    gm, node = _conv_gm(torch.float32)
    C = torch.rand(2, 4, 6, 6) + 1
    C[1] = C[0] * 1.01  # a real difference, far beyond rounding
    fold = Fold(node.name, C, ["g"], size_free=False, traced_inputs="(Tensor(2, 3, 6, 6))",
                scale=float(C.abs().max()))
    apply_folds(gm, [fold], {})
    gm(torch.randn(2, 3, 6, 6))
    with pytest.raises(etp_fx.InputError):
        gm(torch.randn(3, 3, 6, 6))


def test_rounding_tolerance_follows_the_dtype():
    f32 = rounding_tolerance(torch.float32)
    assert rounding_tolerance(torch.float16) > 1000 * 1e-6 > f32 / 2
    assert rounding_tolerance(torch.bfloat16) > rounding_tolerance(torch.float16)
    assert rounding_tolerance(torch.float64) == f32  # never tighter than float32's


def test_mobilenet_constants_go_into_biases_and_hold_at_another_size():
    """mobilenet_v3_small: the classifier's Linears (on (B, C)) and the squeeze-excitation 1x1
    convs (on pooled (B, C, 1, 1) maps) take the removed units' constants into their biases;
    a Linear's constant on (B, C) cannot depend on any size, but rounding against a fixed
    1e-6 tolerance made it a guarded constant map."""
    torchvision = pytest.importorskip("torchvision")
    net = _with_biases(torchvision.models.mobilenet_v3_small(weights=None))
    x = torch.randn(2, 3, 64, 64)
    g = etp_fx.trace(net, x)
    small = etp_fx.compress(net, x, ratio=0.3, graph=g)
    rep = small.meta["etp_report"]
    folds = rep["folds"]
    assert folds and not [f for f in folds if "constant map" in f], folds
    linear = [f for f in folds if f.startswith("linear")]
    assert len(linear) == 2 and all("into the bias" in f for f in linear), linear
    # folded into biases, the result is right at a size it was not traced at
    plan = {gid: r["removed"] for gid, r in rep["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(net), g, plan, keep_constants=True)
    y = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = zeroed(y)
        assert float((small(y) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
