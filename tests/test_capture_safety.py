"""Capture safety: what etp_fx captures is what the model computes, and nothing it is given
changes.

- the fast path honours forward hooks (it hands hooked models to torch.export);
- trace, compress and every eager run leave parameters, buffers, flags, hooks and
  requires_grad exactly as they were, on both capture paths;
- a position-dependent folded constant refuses other sizes; a per-channel one holds for all;
- export-path results (and ``ep.module()``) accept train/eval/to/state_dict;
- bad models and inputs get clear etp_fx errors before any capture.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import etp_fx
from etp_fx.capture import (as_plain_module, capture, check_capture, check_deterministic,
                            check_model_and_inputs)
from etp_fx.errors import ModelError


def _groups(g: etp_fx.DependencyGraph) -> list:
    return [(x.id, x.size, x.exact, sorted((m.name, m.dim, m.coords) for m in x.members))
            for x in g.groups]


# --- 1. hooks -----------------------------------------------------------------------------

def _shuffle(x: torch.Tensor) -> torch.Tensor:
    """A channel shuffle of 8 features (2 x 4 -> 4 x 2): unit i moves to another column."""
    return x.view(x.shape[0], 2, 4).transpose(1, 2).reshape(x.shape[0], 8)


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_a_permuting_pre_hook_gives_the_exported_groups_and_compresses_right():
    model = TwoLinear().eval()
    model.b.register_forward_pre_hook(lambda mod, args: (_shuffle(args[0]),))
    x = torch.randn(2, 4)
    fast = etp_fx.trace(model, x)
    exported = etp_fx.trace(model, x, capture="export")
    assert _groups(fast) == _groups(exported)
    assert "forward pre-hook" in fast.module.meta["etp_capture_fast_path"]
    plan = {grp.id: [1] for grp in fast.groups}
    small = etp_fx.compress(model, x, remove=plan, graph=fast)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), fast, plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)


def _hook_variants():
    def pre(m):
        m.b.register_forward_pre_hook(lambda mod, args: (args[0].flip(1),))

    def pre_kwargs(m):
        m.b.register_forward_pre_hook(lambda mod, args, kw: ((args[0].flip(1),), kw),
                                      with_kwargs=True)

    def post(m):
        m.a.register_forward_hook(lambda mod, args, out: out.flip(1))

    def post_kwargs(m):
        m.a.register_forward_hook(lambda mod, args, kw, out: out.flip(1), with_kwargs=True)

    def root(m):
        m.register_forward_hook(lambda mod, args, out: out * 2)

    def root_pre(m):
        m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
    return [pre, pre_kwargs, post, post_kwargs, root, root_pre]


@pytest.mark.parametrize("add_hook", _hook_variants(), ids=lambda f: f.__name__)
def test_every_kind_of_forward_hook_sends_the_model_to_export(add_hook):
    model = TwoLinear().eval()
    add_hook(model)
    x = torch.randn(2, 4)
    gm = capture(model, (x,))
    assert gm.meta["etp_capture"] == "export"
    assert "hook" in gm.meta["etp_capture_fast_path"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))


# --- 2. the model is left as it was ---------------------------------------------------------

class TrainBN(nn.Module):
    """BatchNorm in train mode, no counter: the fast path takes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


class Counted(TrainBN):
    """Counts its calls in a buffer (in place) and through a reassigned buffer; the output
    does not depend on the counts. The BatchNorm is in train mode."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        self.seen = self.seen + 1
        return super().forward(x)


def _state(model: nn.Module) -> dict:
    return {"tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
            "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
            "flags": [m.training for m in model.modules()],
            "grad": [p.requires_grad for p in model.parameters()],
            "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]}


def _assert_same_state(model: nn.Module, before: dict) -> None:
    after = _state(model)
    assert after["ids"] == before["ids"]
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    assert after["flags"] == before["flags"]
    assert after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"]


def _prepared(cls):
    model = cls().train()
    model.head.eval()  # mixed modes must come back as they were
    model.conv.bias.requires_grad_(False)
    if cls is Counted:  # (a hooked model is exported: TrainBN stays on the fast path)
        model.bn.register_forward_hook(lambda mod, args, out: None)  # changes nothing
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.bias.uniform_(0.5, 1.0)
    return model


@pytest.mark.parametrize("cls", [Counted, TrainBN])
@pytest.mark.parametrize("method", ["auto", "export"])
def test_trace_and_compress_leave_the_model_as_it_was(cls, method):
    model, x = _prepared(cls), torch.randn(2, 3, 8, 8)
    before = _state(model)
    g = etp_fx.trace(model, x, capture=method)
    _assert_same_state(model, before)
    with pytest.warns(UserWarning, match="eval mode"):
        small = etp_fx.compress(model, x, ratio=0.5, graph=g)
    _assert_same_state(model, before)
    with pytest.warns(UserWarning, match="eval mode"):
        etp_fx.compress(model, x, ratio=0.5)  # traces itself
    _assert_same_state(model, before)
    assert small(x).shape == (2, 4, 8, 8)


def test_the_fast_path_refuses_a_forward_that_writes_a_buffer():
    model, x = Counted().eval(), torch.randn(2, 3, 8, 8)
    model.bn.eval()
    gm = capture(model, (x,))
    assert gm.meta["etp_capture"] == "export"
    assert "add_" in gm.meta["etp_capture_fast_path"]
    assert int(model.calls) == 0
    gm(x)  # the capture writes to its own copy of the counter, never to the model's
    assert int(model.calls) == 0


def test_eager_runs_leave_the_model_as_it_was():
    model, x = _prepared(Counted), torch.randn(2, 3, 8, 8)
    before = _state(model)
    with pytest.raises(etp_fx.InputError):  # the eager run that explains bad inputs
        etp_fx.trace(model, torch.randn(2, 5, 8, 8))
    _assert_same_state(model, before)
    check_deterministic(model, (x,), {})
    _assert_same_state(model, before)
    plain = _prepared(TrainBN)
    plain_before = _state(plain)
    g = etp_fx.trace(plain, x)
    assert g.module.meta["etp_capture"] == "fx"
    assert check_capture(g.module, plain, (x,), {}) is None
    _assert_same_state(plain, plain_before)


# --- 3. folded constants and other input sizes ----------------------------------------------

def _cnn(first_kernel: int = 3) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, first_kernel, padding=first_kernel // 2), nn.BatchNorm2d(8),
                      nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.Conv2d(6, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with torch.no_grad():  # removed channels keep a clear constant (the BatchNorm shift)
        for bn in (m[1], m[4]):
            bn.bias.uniform_(0.5, 1.0)
            bn.running_mean.uniform_(-1, 1)
    return m.eval()


@pytest.mark.parametrize("traced", [(8, 8), (1, 1)])
def test_folded_constants_are_right_or_refused_at_other_sizes(traced):
    """Traced at 8x8, the padded conv's constant map varies with position; traced at 1x1 it
    looks uniform but is not (at 8x8 inner positions see the whole kernel)."""
    model, x = _cnn(), torch.randn(2, 3, *traced)
    g = etp_fx.trace(model, x)
    assert g.module.meta["etp_capture"] == "fx"
    # constants asked for: folded, as a map behind a guard where they vary with position
    small = etp_fx.compress(model, x, ratio=0.5, graph=g, keep_constants=True)
    assert small.meta["etp_report"]["folds"]
    plan = {gid: grp["removed"] for gid, grp in small.meta["etp_report"]["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=True)
    checked = 0
    for size in [traced, (1, 1), (8, 1), (8, 8), (12, 12), (4, 4)]:
        xs = torch.randn(1, 3, *size)
        with torch.no_grad():
            try:
                got = small(xs)
            except etp_fx.InputError as e:
                assert size != traced
                assert "compress again" in str(e).lower() and "node" in str(e)
                continue
            torch.testing.assert_close(got, zeroed(xs), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 1
    buf = io.BytesIO()  # pickling retraces the graph: the guard must survive symbolic_trace
    torch.save(small, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(back(x), small(x))


def test_per_channel_constants_hold_at_every_size():
    """Removed units feeding only a 1x1 conv and a Linear: the folded constants are one value
    per channel, valid for any image size, so the result accepts every size and is right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.bias.uniform_(0.5, 1.0)
    x = torch.randn(2, 3, 8, 8)
    g = etp_fx.trace(model, x)
    small = etp_fx.compress(model, x, ratio=0.5, graph=g)
    folds = small.meta["etp_report"]["folds"]
    assert folds and all("constant map" not in line for line in folds), folds
    plan = {gid: grp["removed"] for gid, grp in small.meta["etp_report"]["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=True)
    for size in [(3, 3), (8, 5), (16, 16)]:
        xs = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(small(xs), zeroed(xs), rtol=1e-5, atol=1e-5)


def test_per_channel_constant_without_a_bias_is_one_value_per_feature():
    """x @ W (no bias to fold into) after removed units: one value per output feature, not a
    map of the traced sequence length (the exported graph itself fixes the length)."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 8)
            self.w = nn.Parameter(torch.randn(8, 5))

        def forward(self, x):
            return torch.relu(self.fc(x)) @ self.w

    model, x = Tokens().eval(), torch.randn(2, 7, 6)
    with torch.no_grad():
        model.fc.bias.uniform_(0.5, 1.0)
    g = etp_fx.trace(model, x)
    plan = {g.groups[0].id: [0, 3]}
    small = etp_fx.compress(model, x, remove=plan, graph=g, keep_constants=True)
    assert "per channel" in " ".join(small.meta["etp_report"]["folds"])
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=True)
    assert small._etp_fold_0.shape == (1, 1, 5)
    for batch in (1, 3):
        xs = torch.randn(batch, 7, 6)
        with torch.no_grad():
            torch.testing.assert_close(small(xs), zeroed(xs), rtol=1e-5, atol=1e-5)


# --- 4. export-path results behave like modules --------------------------------------------

class WithConstant(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Conv2d(8, 4, 1)
        self.scale = torch.full((8, 1, 1), 2.0)  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.bn(self.conv(x))) * self.scale))


def test_export_capture_accepts_train_eval_to_and_state_dict():
    model, x = WithConstant().eval(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,), method="export")
    want = model(x)
    assert not gm.training
    assert gm.eval() is gm and gm.train() is gm  # no NotImplementedError
    assert gm.meta["etp_mode"] == "eval"
    with torch.no_grad():  # eval-mode semantics whatever the flag: BN on running stats, no dropout
        torch.testing.assert_close(gm(x), want)
    assert set(gm.state_dict()) == set(model.state_dict())
    g64 = gm.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in g64.buffers() if t.is_floating_point())
    with torch.no_grad():
        torch.testing.assert_close(g64(x.double()), want.double(), rtol=1e-5, atol=1e-5)


def test_modules_from_torch_export_can_be_traced_and_compressed(tmp_path):
    model, x = WithConstant().eval(), torch.randn(2, 3, 8, 8)
    raw = torch.export.export(model, (x,), strict=False).module()
    with pytest.raises(NotImplementedError):
        raw.eval()
    g = etp_fx.trace(raw, x)  # trace sets the flags itself: no eval() call needed
    assert g.groups
    plain = as_plain_module(torch.export.export(model, (x,), strict=False).module())
    plan = {g.groups[0].id: [1, 2]}
    small = etp_fx.compress(plain, x, remove=plan)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), etp_fx.trace(model, x), plan)
    with torch.no_grad():
        torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-5)
    path = etp_fx.save(small, tmp_path / "small.pt2")
    loaded = as_plain_module(etp_fx.load(path))
    loaded.eval()
    assert etp_fx.trace(loaded, x).groups


class CastsExplicitly(nn.Module):
    """Names its dtype in forward, as Hugging Face norms do (``x.to(torch.float32)``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x).to(torch.float32)
        return self.b(torch.relu(h) * torch.ones(8, dtype=torch.float32, device=x.device))


def test_to_dtype_retargets_the_ops_that_name_the_dtype():
    """Old behaviour: a .to(float64) export result failed in the graph's own casts
    ("Tensor dtype mismatch" from _assert_tensor_metadata, or a float32 matmul). Deep
    copies keep that and the call forms."""
    model, x = CastsExplicitly().eval(), torch.randn(3, 4)
    gm = capture(model, (x,), method="export")
    g64 = copy.deepcopy(gm).to(torch.float64)
    with torch.no_grad():
        got = g64(x.double())
        assert got.dtype == torch.float64
        # the model itself cannot run in float64 (its cast meets a float64 weight)
        torch.testing.assert_close(got, model(x).double(), rtol=1e-5, atol=1e-6)
        assert g64(x=x.double()).dtype == torch.float64  # by keyword, on the copy too
        assert g64.float()(x).dtype == torch.float32
        # a device move retargets the graph's device constants (meta stands in for a GPU)
        assert copy.deepcopy(gm).to("meta")(x.to("meta")).device.type == "meta"


def test_fast_path_result_traces_and_compresses_again():
    """Iterative pruning on a CNN from the fast path: the compressed module is traced and
    compressed again, and stays a normal module."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 5)).eval()
    x = torch.randn(2, 3, 16, 16)
    small = etp_fx.compress(model, x, ratio=0.3)
    assert small.meta["etp_capture"] == "fx"
    small.train()
    small.eval()
    g = etp_fx.trace(small, x)
    assert [grp.size for grp in g.groups] == [12, 12]
    smaller = etp_fx.compress(small, x, ratio=0.3)
    rep = smaller.meta["etp_report"]
    assert rep["params_after"] < rep["params_before"] == sum(p.numel()
                                                            for p in small.parameters())
    with torch.no_grad():
        assert smaller(torch.randn(3, 3, 20, 20)).shape == (3, 5)
    assert set(smaller.to(torch.float64).state_dict()) <= set(small.state_dict())


class SetsItsConfig(nn.Module):
    """A forward that writes to its config, as some Hugging Face code paths do."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {})()
        self.config.use_cache = True
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        self.config.use_cache = False
        self.config.seen = True
        return self.lin(x)


@pytest.mark.parametrize("method", ["auto", "export"])
def test_a_config_written_in_forward_is_restored(method):
    model = SetsItsConfig().eval()
    etp_fx.trace(model, torch.randn(2, 4), capture=method)
    assert vars(model.config) == {"use_cache": True}


# --- 5. bad models and inputs -----------------------------------------------------------------

def test_a_non_module_is_a_model_error():
    with pytest.raises(ModelError, match="nn.Module.*state_dict"):
        etp_fx.trace(TwoLinear().state_dict(), torch.randn(2, 4))
    with pytest.raises(TypeError):  # also a TypeError, and an etp_fx.Error
        etp_fx.trace(lambda x: x, torch.randn(2, 4))
    assert issubclass(ModelError, etp_fx.Error)


@pytest.mark.parametrize("x,match", [
    (torch.randn(0, 4), r"positional input 0 has a batch of size 0"),
    (torch.tensor([[1.0, float("nan"), 0.0, 0.0]]), r"positional input 0 .*NaN or Inf"),
    (torch.tensor([[1.0, float("inf"), 0.0, 0.0]]), r"NaN or Inf"),
])
def test_bad_example_inputs_are_input_errors(x, match):
    with pytest.raises(etp_fx.InputError, match=match):
        etp_fx.trace(TwoLinear(), x)


def test_bad_keyword_input_is_named():
    with pytest.raises(etp_fx.InputError, match=r"keyword input 'x'"):
        check_model_and_inputs(TwoLinear(), (), {"x": torch.full((2, 4), float("nan"))})


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_and_sparse_weights_are_model_errors():
    q = TwoLinear()
    q.a.weight = nn.Parameter(torch.quantize_per_tensor(torch.randn(8, 4), 0.1, 0, torch.qint8),
                              requires_grad=False)
    with pytest.raises(ModelError, match=r"'a.weight' is quantized.*[Pp]rune before quantizing"):
        etp_fx.trace(q, torch.randn(2, 4))
    qmod = nn.Sequential(torch.ao.nn.quantized.Linear(4, 8))
    with pytest.raises(ModelError, match=r"module 0 .*quantized"):
        etp_fx.trace(qmod, torch.randn(2, 4))
    s = TwoLinear()
    s.a.weight = nn.Parameter(torch.randn(8, 4).to_sparse())
    with pytest.raises(ModelError, match=r"'a.weight' is a sparse tensor.*[Dd]ensify"):
        etp_fx.trace(s, torch.randn(2, 4))


def test_a_float_model_ready_for_quantization_is_not_refused():
    class Ready(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.skip = nn.Linear(4, 4), torch.ao.nn.quantized.FloatFunctional()

        def forward(self, x):
            return self.skip.add(self.fc(x), x)

    check_model_and_inputs(Ready(), (torch.randn(2, 4),), {})


class Noisy(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        y = self.fc(x)
        if self.kind == "rand":
            return y + torch.rand_like(y)
        if self.kind == "dropout":  # ignores eval()
            return F.dropout(y, 0.5, training=True)
        self.calls.add_(1)
        return y * self.calls


@pytest.mark.parametrize("kind", ["rand", "dropout", "counter"])
def test_a_random_or_stateful_forward_is_named(kind):
    model, x = Noisy(kind).eval(), torch.randn(2, 4)
    rng = torch.get_rng_state()
    with pytest.raises(ModelError, match="not deterministic.*[Rr]emove randomness"):
        check_deterministic(model, (x,), {})
    assert int(model.calls) == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_deterministic_model_passes_the_check():
    check_deterministic(_cnn(), (torch.randn(2, 3, 8, 8),), {})


def test_a_non_contiguous_example_does_not_pin_the_result_to_its_strides(monkeypatch):
    monkeypatch.setenv("ETP_FX_CAPTURE", "export")  # the path that guards on strides
    # export guards on the strides of a sliced example (ids[:, :8] of a longer tensor), which
    # made the result refuse every contiguous input; captures run on contiguous copies
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    m = Embed().eval()
    ids = torch.randint(0, 50, (2, 12))[:, :8]
    assert not ids.is_contiguous()
    small = etp_fx.compress(m, (ids,), remove={"emb.weight[1]": [0, 3]})
    other = torch.randint(0, 50, (3, 5))
    zeroed = etp_fx.zero_units(copy.deepcopy(m), etp_fx.trace(m, (other,)), {"emb.weight[1]": [0, 3]})
    torch.testing.assert_close(small(other), zeroed(other))


def test_default_constants_never_pin_a_size_dynamic_result():
    # with the default keep_constants, groups whose constants would need a guarded map are
    # zeroed whole instead: the result is right at every size the model accepts
    model, x = _cnn(), torch.randn(2, 3, 8, 8)
    small = etp_fx.compress(model, x, ratio=0.5)
    rep = small.meta["etp_report"]
    assert rep["zeroed_whole"]
    plan = {gid: grp["removed"] for gid, grp in rep["groups"].items()}
    g = etp_fx.trace(model, x)
    whole = {gid: plan[gid] for gid in rep["zeroed_whole"]}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, whole)
    zeroed = etp_fx.zero_units(zeroed, g, {k: v for k, v in plan.items() if k not in whole},
                               keep_constants=True)
    for size in [(1, 1), (8, 1), (12, 12)]:
        xs = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(small(xs), zeroed(xs), rtol=1e-5, atol=1e-5)
