"""Norms, softmaxes and reductions over a pruned dim: exact over zeros, approximate otherwise.

When the removed units are zero at the input of a statistic over their dim, the rewrite keeps
the original count (``etp_fx/graph/rules/exact.py``, ``docs/concepts.md``), so the group is
exact and compress must match the zeroed original. When they are not zero there (a sigmoid in
between, a norm without affine parameters), the group is approximate: never silently exact.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import etp_fx
from etp_fx.graph.rules import exact
from etp_fx.graph.rules.table import zero_flags
from oracle import check_oracle


def _targets(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


# --- one statistic between two Linears ---------------------------------------------------------

class HFRMSNorm(nn.Module):
    """LlamaRMSNorm / T5LayerNorm: decomposed into pow, mean, rsqrt, mul in the ATen graph."""

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6)).to(x.dtype)


STATS = {  # name: (op on the 8 features, the full-width form the rewrite must use, or None)
    "layer_norm": (lambda d: nn.LayerNorm(d), exact.layer_norm_full),
    "rms_norm": (lambda d: nn.RMSNorm(d), exact.rms_norm_full),
    "hf_rms_norm": (HFRMSNorm, exact.mean_full),
    "softmax": (lambda d: lambda x: torch.softmax(x, -1), exact.softmax_full),
    "log_softmax": (lambda d: lambda x: torch.log_softmax(x, -1), exact.log_softmax_full),
    "standardise": (lambda d: lambda x: (x - x.mean(-1, keepdim=True)) /
                    (x.std(-1, keepdim=True) + 1e-3), exact.var_full),
    "var_mean": (lambda d: lambda x: torch.var_mean(x, -1, keepdim=True)[0] + x, exact.var_full),
    "amax": (lambda d: lambda x: x - x.amax(-1, keepdim=True), exact.amax_full),
    "amin": (lambda d: lambda x: x - x.amin(-1, keepdim=True), exact.amin_full),
    "logsumexp": (lambda d: lambda x: x - torch.logsumexp(x, -1, keepdim=True),
                  exact.logsumexp_full),
    "max_all": (lambda d: lambda x: x / (x.abs().max() + 1), exact.amax_full),
    "sum": (lambda d: lambda x: x - x.sum(-1, keepdim=True), None),
    "cumsum": (lambda d: lambda x: x.cumsum(-1), None),
    "l2_normalise": (lambda d: lambda x: F.normalize(x, dim=-1), None),
}


class Between(nn.Module):
    """Linear(4 -> 8) -> act -> stat over the 8 features -> Linear(8 -> 3)."""

    def __init__(self, stat: str, act: str = "relu"):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.stat = STATS[stat][0](8)
        self.act = {"relu": torch.relu, "sigmoid": torch.sigmoid}[act]

    def forward(self, x):
        return self.b(self.stat(self.act(self.a(x))))


@pytest.mark.parametrize("stat", list(STATS))
def test_statistic_over_zeros_is_exact_and_matches_the_zeroed_original(stat):
    torch.manual_seed(0)
    m = Between(stat).eval()
    x = torch.randn(2, 5, 4)
    g = etp_fx.trace(m, x)
    grp = g["a.weight[0]"]
    assert grp.exact, grp.inexact_reasons
    small, _, _ = check_oracle(m, x, plan={grp.id: [1, 4, 6]})
    form = STATS[stat][1]
    if form is not None:  # the full-width form carries the original count
        assert form in _targets(small)


@pytest.mark.parametrize("stat", [s for s in STATS if s not in ("cumsum", "max_all")])
def test_statistic_over_values_removed_units_do_not_zero_is_approximate(stat):
    # sigmoid(0) = 1/2 at a removed unit: the statistic counts it, the pruned model cannot
    torch.manual_seed(0)
    m = Between(stat, act="sigmoid").eval()
    x = torch.randn(2, 5, 4)
    grp = etp_fx.trace(m, x)["a.weight[0]"]
    assert not grp.exact and "do not zero" in grp.inexact_reasons[0]
    with pytest.raises(etp_fx.PlanError, match="approximate"):
        etp_fx.compress(m, x, remove={grp.id: [1, 4]})
    if stat in ("amax", "amin"):
        return  # removed halves rarely change a max over sigmoids: approximate, not visibly
    # and it really is approximate: the pruned model differs from the zeroed original
    small = etp_fx.compress(m, x, remove={grp.id: [1, 4]}, allow_approximate=True)
    assert small.meta["etp_report"]["max_abs_diff"] > 1e-4


def test_a_sum_over_values_removed_units_do_not_zero_was_silently_exact():
    """Regression: ``sum`` over a pruned dim was always exact ("zero units add nothing"), but
    a sigmoid's removed units are 1/2, not 0, so verification failed on the compressed model."""
    torch.manual_seed(0)
    m = Between("sum", act="sigmoid").eval()
    x = torch.randn(2, 5, 4)
    g = etp_fx.trace(m, x)
    assert not g["a.weight[0]"].exact
    assert any("sum" in r for r in g["a.weight[0]"].inexact_reasons)


def test_layer_norm_over_channels_and_space_keeps_the_original_count():
    # LayerNorm([C, H, W]) on a conv's output: the pruned channels are one of three reduced dims
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.LayerNorm([6, 4, 4]),
                      nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    g = etp_fx.trace(m, x)
    assert g["0.weight[0]"].exact
    small, _, _ = check_oracle(m, x, plan={"0.weight[0]": [0, 3]})
    assert exact.layer_norm_full in _targets(small)


def test_group_norm_channels_within_groups_keep_the_group_count():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    g = etp_fx.trace(m, x)
    within = next(grp for grp in g.groups if grp.size == 4)
    groups = next(grp for grp in g.groups if grp.size == 2)
    assert within.exact and groups.exact
    small, _, _ = check_oracle(m, x, plan={within.id: [1], groups.id: [0]})
    assert exact.group_norm_full in _targets(small)


# --- reductions applied to weights -------------------------------------------------------------

class WSConv(nn.Module):
    """conv -> act -> conv whose weight is standardised over its fan-in (timm's StdConv2d:
    ``F.batch_norm`` on the reshaped weight, batch statistics)."""

    def __init__(self, act: str = "relu"):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)
        self.act = {"relu": torch.relu, "sigmoid": torch.sigmoid}[act]

    def forward(self, x):
        w = self.b.weight
        w = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0,
                         eps=1e-5).reshape_as(w)
        return F.conv2d(self.act(self.a(x)), w, self.b.bias, padding=1)


def test_weight_standardisation_over_zeroed_columns_is_exact():
    """Regression: the standardisation runs over the consumer columns of ``a``'s channels, which
    zero_units zeroes. It was marked exact but the pruned weight was standardised over fewer
    values, and verification failed; now its statistics keep the original fan-in."""
    torch.manual_seed(0)
    m, x = WSConv().eval(), torch.randn(2, 3, 6, 6)
    g = etp_fx.trace(m, x)
    assert g["a.weight[0]"].exact
    small, _, _ = check_oracle(m, x, plan={"a.weight[0]": [0, 2, 5]})
    assert exact.batch_norm_full in _targets(small)


def test_weight_standardisation_over_inputs_removed_units_do_not_zero_is_approximate():
    # the standardised weight is not zero at the removed columns, and sigmoid(0) = 1/2 is not
    # zero at the removed inputs: the conv sums their product
    m, x = WSConv("sigmoid").eval(), torch.randn(2, 3, 6, 6)
    grp = etp_fx.trace(m, x)["a.weight[0]"]
    assert not grp.exact and any("convolution" in r for r in grp.inexact_reasons)


def test_weight_norm_output_units_divide_by_a_zero_norm():
    # g * v / ||v||: zeroing an output filter makes its norm 0 and the zeroed original NaN
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(),
                      nn.utils.parametrizations.weight_norm(nn.Linear(6, 5)), nn.Linear(5, 2))
    x = torch.randn(2, 4)
    g = etp_fx.trace(m.eval(), x)
    assert g["0.weight[0]"].exact  # the fan-in: zeros add nothing to the norm
    out = next(grp for grp in g.groups if grp.size == 5)
    assert not out.exact and "inf or NaN" in out.inexact_reasons[0]
    check_oracle(m, x, plan={"0.weight[0]": [2, 3]})


# --- Hugging Face transformers: the hidden width is exact --------------------------------------

class Positional(nn.Module):
    """Keyword inputs as positional ones, logits only (for the oracle)."""

    def __init__(self, model: nn.Module, keys: list[str]):
        super().__init__()
        self.m, self.keys = model, keys

    def forward(self, *args):
        out = self.m(**dict(zip(self.keys, args)))
        return out.logits if hasattr(out, "logits") else out[0]


def _hf(name: str):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=128)
    ids = torch.randint(0, 128, (2, 8))
    if name == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=2, use_cache=False))
    elif name == "qwen2":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2, use_cache=False))
    elif name == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(**small))
    elif name == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                           use_cache=False))
    elif name == "opt":
        m = T.OPTForCausalLM(T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=64,
                                         vocab_size=128, use_cache=False))
    elif name == "t5":
        m = T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                    num_heads=4, vocab_size=128, use_cache=False))
        return Positional(m, ["input_ids", "decoder_input_ids"]).eval(), (ids, ids[:, :5].clone())
    else:  # vit
        m = T.ViTForImageClassification(T.ViTConfig(hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    image_size=32, patch_size=8, num_labels=5))
        return Positional(m, ["pixel_values"]).eval(), (torch.randn(2, 3, 32, 32),)
    return Positional(m, ["input_ids"]).eval(), (ids,)


NORM_FORM = {"llama": exact.mean_full, "qwen2": exact.mean_full, "t5": exact.mean_full,
             "bert": exact.layer_norm_full, "gpt2": exact.layer_norm_full,
             "opt": exact.layer_norm_full, "vit": exact.layer_norm_full}
@pytest.mark.parametrize("name", list(NORM_FORM))
def test_transformer_hidden_width_is_exact(name):
    model, args = _hf(name)
    g = etp_fx.trace(model, args)
    hidden = max((grp for grp in g.groups if grp.size == 64), key=lambda grp: len(grp.members))
    assert hidden.exact, hidden.inexact_reasons
    assert all(grp.exact for grp in g.groups), [grp.id for grp in g.groups if not grp.exact]
    # the hidden width with the rest of a random plan: compressed == zeroed original
    small, _, plan = check_oracle(model, args, seed=1, frac=0.3)
    assert hidden.id in plan
    assert NORM_FORM[name] in _targets(small)


# --- the zero flags ---------------------------------------------------------------------------

def test_zero_flags_follow_parameters_and_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.register_buffer("shift", torch.ones(6))

        def forward(self, x):
            h = self.fc(x)
            return torch.relu(h), torch.sigmoid(h), h + self.shift

    g = etp_fx.trace(M().eval(), torch.randn(3, 4))
    nodes = {n.name: n for n in g.module.graph.nodes}
    flags = {name: zero_flags(nodes[name]) for name in ("x", "fc_weight", "linear", "relu",
                                                           "sigmoid", "add", "shift")}
    assert flags["x"] == [False, False]  # a model input is not zeroed
    assert flags["fc_weight"] == [True, True]  # a parameter is, at every removed unit
    assert flags["shift"] == [False]  # a buffer is not
    assert flags["linear"] == [False, True]  # rows and bias zeroed: the out features are 0
    assert flags["relu"] == [False, True] and flags["sigmoid"] == [False, False]
    assert flags["add"] == [False, False]  # plus a buffer that is not zero


def test_kept_constants_into_a_layer_norm_are_refused_not_guessed():
    # keep_constants keeps the removed units' biases: they reach the LayerNorm as constants, and
    # its removed outputs depend on the input, so they cannot be folded: compress refuses
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 4)
    with pytest.raises(etp_fx.FoldError):
        etp_fx.compress(m, x, remove={"0.weight[0]": [1, 5]}, keep_constants=True)
    # without biases the removed units carry nothing: kept constants are zeros, and it is exact
    m = nn.Sequential(nn.Linear(4, 8, bias=False), nn.RMSNorm(8), nn.Linear(8, 3)).eval()
    small = etp_fx.compress(m, x, remove={"0.weight[0]": [1, 5]}, keep_constants=True)
    zeroed = etp_fx.zero_units(copy.deepcopy(m), etp_fx.trace(m, x), {"0.weight[0]": [1, 5]},
                               keep_constants=True)
    torch.testing.assert_close(small(x), zeroed(x), rtol=1e-5, atol=1e-6)
