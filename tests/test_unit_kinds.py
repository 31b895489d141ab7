"""Unit kinds (``ChannelGroup.unit_kind``) on small Hugging Face transformers: every head axis
is a "head" (also the query heads inside a key/value group of grouped-query attention), every
per-head width a "head-dim" (also RoPE's rotate-half pairs and GPT-2's fused q | k | v), MLP
widths "neuron", and the model width (the embedding's features, normalised by every RMSNorm or
LayerNorm) "hidden". ``include=["head", "neuron"]`` relies on these labels: it used to remove
the hidden width too in the graph output, where it was labelled "neuron". Small
random configs: nothing is downloaded."""
import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx import SelectionError
from etp_fx.regularise.uniform import role_of

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
IDS = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             vocab_size=128)


def _llama():
    return (T.LlamaForCausalLM(T.LlamaConfig(**SMALL, num_key_value_heads=2)),
            {"input_ids": IDS, "use_cache": False})


def _qwen2():
    return (T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, num_key_value_heads=2)),
            {"input_ids": IDS, "use_cache": False})


def _bert():
    return T.BertForSequenceClassification(T.BertConfig(**SMALL)), {"input_ids": IDS}


def _gpt2():
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    return T.GPT2LMHeadModel(cfg), {"input_ids": IDS, "use_cache": False}


def _vit():
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, image_size=32, patch_size=8)
    return T.ViTForImageClassification(cfg), {"pixel_values": torch.randn(1, 3, 32, 32)}


_GQA = {  # 4 query heads in 2 key/value groups of 2; head dim 16, RoPE pairs j and j + 8
    "model.embed_tokens.weight[1]": (64, "hidden"),  # the model width
    "model.layers.*.self_attn.q_proj.weight[0].0": (2, "head"),  # key/value heads
    "model.layers.*.self_attn.q_proj.weight[0].1": (2, "head"),  # query heads per kv group
    "model.layers.*.self_attn.q_proj.weight[0].2": (8, "head-dim"),  # q/k dims (RoPE halves)
    "model.layers.*.self_attn.v_proj.weight[0].1": (16, "head-dim"),  # v dims
    "model.layers.*.mlp.gate_proj.weight[0]": (96, "neuron"),
}
EXPECTED = {
    "llama": (_llama, _GQA),
    "qwen2": (_qwen2, _GQA),
    "bert": (_bert, {
        "bert.embeddings.word_embeddings.weight[1]": (64, "hidden"),
        "bert.encoder.layer.*.attention.self.query.weight[0].0": (4, "head"),
        "bert.encoder.layer.*.attention.self.query.weight[0].1": (16, "head-dim"),
        "bert.encoder.layer.*.attention.self.value.weight[0].1": (16, "head-dim"),
        "bert.encoder.layer.*.intermediate.dense.weight[0]": (96, "neuron"),
        "bert.pooler.dense.weight[0]": (64, "neuron"),
    }),
    "gpt2": (_gpt2, {  # c_attn's output is the concatenation q | k | v of heads x head dim
        "transformer.wte.weight[1]": (64, "hidden"),
        "transformer.h.*.attn.c_attn.weight[1].0": (4, "head"),
        "transformer.h.*.attn.c_attn.weight[1].1": (16, "head-dim"),  # q/k dims
        "transformer.h.*.attn.c_attn.weight[1].5": (16, "head-dim"),  # v dims
        "transformer.h.*.mlp.c_fc.weight[1]": (256, "neuron"),
    }),
    "vit": (_vit, {
        # the hidden width is the patch-embedding conv's output channels: a conv's own
        # channel dim is labelled "channel"
        "vit.embeddings.cls_token[2]": (64, "channel"),
        "vit.layers.*.attention.q_proj.weight[0].0": (4, "head"),
        "vit.layers.*.attention.q_proj.weight[0].1": (16, "head-dim"),
        "vit.layers.*.attention.v_proj.weight[0].1": (16, "head-dim"),
        "vit.layers.*.mlp.fc1.weight[0]": (96, "neuron"),
    }),
}


def _members(grp):
    return {(m.name, m.dim) for m in grp.members}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_group_has_the_kind_of_its_units(name):
    make, expected = EXPECTED[name]
    torch.manual_seed(0)
    model, inputs = make()
    g = etp_fx.trace(model.eval(), inputs)
    got = {}
    for grp in g.groups:  # every layer's group of a role has the same size and kind
        assert got.setdefault(role_of(grp.id), (grp.size, grp.unit_kind)) == \
            (grp.size, grp.unit_kind), grp.id
    assert got == expected


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2"])
def test_gqa_query_heads_are_heads_and_rope_dims_are_head_dims(make):
    """The kinds follow the structure, whatever the group ids: in q_proj's rows
    (kv heads x query heads per kv head x head dim) the two head factors are heads, and the
    RoPE pairs (shared with k_proj and rotary_emb.inv_freq) are head dims."""
    torch.manual_seed(0)
    model, inputs = make()
    g = etp_fx.trace(model.eval(), inputs)
    a = "model.layers.0.self_attn."
    in_q = [grp for grp in g.groups if (a + "q_proj.weight", 0) in _members(grp)]
    kv = [grp for grp in in_q if (a + "k_proj.weight", 0) in _members(grp) and grp.size == 2]
    per_kv = [grp for grp in in_q if (a + "k_proj.weight", 0) not in _members(grp)]
    rope = [grp for grp in in_q if ("model.rotary_emb.inv_freq", 0) in _members(grp)]
    assert [grp.unit_kind for grp in kv + per_kv + rope] == ["head", "head", "head-dim"]
    # include=["head", "neuron"] takes heads and MLP neurons, never a query/key head dim
    plan = etp_fx.Ratio(0.5, include=["head", "neuron"]).select(g, model)
    assert per_kv[0].id in plan and rope[0].id not in plan
    assert all(g[gid].unit_kind in ("head", "neuron") for gid in plan)


def test_heads_and_neurons_leave_the_model_width_alone_in_the_graph_output():
    torch.manual_seed(0)
    model, inputs = _llama()
    model.eval()
    g = etp_fx.trace(model, inputs)
    plan = etp_fx.select.by_budget(g, model, macs=0.5, include=["head", "neuron"])
    assert plan and "model.embed_tokens.weight[1]" not in plan
    small = etp_fx.compress(model, inputs, target_macs=0.6, include=["head", "neuron"],
                            keep_constants=False, graph=g)
    assert small.get_parameter("model.embed_tokens.weight").shape[1] == 64
    assert list(etp_fx.select.by_ratio(g, model, 0.25, include="hidden")) == \
        ["model.embed_tokens.weight[1]"]


def test_a_plain_mlp_has_neurons():
    g = etp_fx.trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
                     torch.randn(2, 4))
    assert [grp.unit_kind for grp in g.groups] == ["neuron"]


def test_an_unknown_kind_names_the_known_ones():
    model, inputs = _llama()
    with pytest.raises(SelectionError, match="kinds: channel, neuron, hidden, head, head-dim"):
        etp_fx.compress(model.eval(), inputs, ratio=0.2, include=["neurons"], output="module")
