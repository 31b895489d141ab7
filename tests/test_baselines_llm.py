"""torch-pruning baselines restricted to attention heads and MLP neurons on a tiny Llama
(``heads_and_neurons=True``), as the quality benchmark runs GReg, DepGraph group-norm and
magnitude on its language model: the hidden width stays, heads go whole, every layer keeps a
head, and the pruned model still runs."""
import copy
import warnings

import pytest
import torch

from etp_fx import baselines
from etp_fx.errors import OptionError

T = pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

HIDDEN, HEADS, FFN, LAYERS = 32, 4, 64, 2
HEAD_DIM = HIDDEN // HEADS


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=16,
                        tie_word_embeddings=True, use_cache=False)
    return T.LlamaForCausalLM(cfg).eval(), (torch.randint(0, 64, (1, 12)),)


def _prune(name, model, example, ratio, **kw):
    m = copy.deepcopy(model)
    meth = baselines.make(name, m, example, pruning_ratio=ratio, **kw)
    x = torch.randint(0, 64, (2, 12))
    loss = m(x, labels=x).loss
    loss.backward()
    meth.regularize(m)  # the regulariser runs on the restricted groups
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return meth.step()


def _shapes(model, part):
    return {n: tuple(p.shape) for n, p in model.named_parameters() if part in n}


@pytest.mark.parametrize("name", ["greg", "groupnorm", "magnitude"])
def test_heads_and_neurons_leave_the_hidden_width(name, llama):
    model, example = llama
    m = _prune(name, model, example, 0.5, heads_and_neurons=True)
    for layer in m.model.layers:
        a, mlp = layer.self_attn, layer.mlp
        assert a.q_proj.out_features == a.k_proj.out_features == a.v_proj.out_features
        assert a.q_proj.out_features == HEADS // 2 * HEAD_DIM  # half the heads, whole
        assert a.o_proj.in_features == a.q_proj.out_features
        assert mlp.gate_proj.out_features == mlp.up_proj.out_features == FFN // 2
        # the residual stream is untouched
        assert a.q_proj.in_features == a.o_proj.out_features == HIDDEN
        assert mlp.down_proj.out_features == HIDDEN
        assert layer.input_layernorm.weight.shape == (HIDDEN,)
    assert m.model.embed_tokens.weight.shape == (64, HIDDEN)
    assert m.lm_head.weight.shape == (64, HIDDEN)
    out = m(*example).logits
    assert out.shape == (1, 12, 64) and torch.isfinite(out).all()


def test_without_the_restriction_torch_pruning_cuts_the_hidden_width(llama):
    """Why the restriction exists: by default torch-pruning prunes the residual width."""
    model, example = llama
    m = _prune("magnitude", model, example, 0.5)
    assert m.model.embed_tokens.weight.shape[1] < HIDDEN


def test_large_ratios_keep_one_head_per_layer(llama):
    """torch-pruning skips a layer whose ratio would remove all its heads; the restriction caps
    the head ratio so a large ratio still removes all heads but one (not none)."""
    model, example = llama
    m = _prune("magnitude", model, example, 0.95, heads_and_neurons=True)
    for layer in m.model.layers:
        assert layer.self_attn.q_proj.out_features == HEAD_DIM
        assert layer.mlp.gate_proj.out_features < FFN // 4


def test_heads_and_neurons_needs_attention_modules():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(OptionError, match="heads_and_neurons=True needs Llama-style"):
        baselines.make("magnitude", net, (torch.randn(1, 4),), heads_and_neurons=True)
