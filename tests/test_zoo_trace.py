"""Tracing real architectures: the group structure they must have, interfaces never prunable.

A fast subset of ``benchmarks/zoo_sweep.py`` (random weights, small configs, no downloads).
Every model also passes the generic checks of :func:`check_graph`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import etp_fx  # noqa: E402
from benchmarks.zoo_sweep import (  # noqa: E402
    gat_model, hf_model, our_coverage, out_channel_weights, share, used_modules)

torchvision = pytest.importorskip("torchvision")


# --- generic checks ------------------------------------------------------------------------------

def check_graph(model: nn.Module, g: etp_fx.DependencyGraph, interface: list[tuple[str, int]]):
    """Invariants every traced model satisfies; ``interface`` lists (param, dim) slots that must
    never be prunable (embedding vocab dims, classifier outputs)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    params.update(dict(model.named_buffers(remove_duplicate=False)))  # tied weights: any alias
    ids = [grp.id for grp in g.groups]
    assert len(ids) == len(set(ids)), "group ids must be unique"
    for grp in g.groups:
        assert grp.size >= 2
        assert grp.exact == (not grp.inexact_reasons)
        seen = set()
        for m in grp.members:
            assert (m.name, m.dim) not in interface, f"interface {m.name}[{m.dim}] is in {grp.id}"
            assert m.name in params, m.name
            assert len(m.coords) == params[m.name].shape[m.dim]
            assert all(-1 <= c < grp.size for c in m.coords)
            seen.update(c for c in m.coords if c != -1)
        assert seen == set(range(grp.size)), f"{grp.id}: some units own no index"
        assert any(m.role in ("out", "in") for m in grp.members), grp.id


def members(grp) -> set[tuple[str, int]]:
    return {(m.name, m.dim) for m in grp.members}


def groups_with(g, name: str, dim: int):
    return [grp for grp in g.groups if (name, dim) in members(grp)]


def covered(grp, name: str, dim: int) -> int:
    """How many indices of ``name[dim]`` the group owns."""
    m = next(m for m in grp.members if (m.name, m.dim) == (name, dim))
    return sum(c != -1 for c in m.coords)


def coverage(model, args, kwargs, g) -> float:
    targets = out_channel_weights(model, used_modules(model, args, kwargs))
    return share(our_coverage(g, targets), targets)


# --- torchvision ---------------------------------------------------------------------------------

def test_resnet18_residual_groups():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    x = torch.randn(1, 3, 64, 64)
    g = etp_fx.trace(m, x)
    check_graph(m, g, [("fc.weight", 0), ("fc.bias", 0), ("conv1.weight", 1)])
    assert g.barriers == []
    assert len(g.groups) == 12 and all(grp.exact for grp in g.groups)
    # one residual stream per stage: the stem and both blocks' last convs of layer1 ...
    (stem,) = groups_with(g, "conv1.weight", 0)
    assert {("layer1.0.conv2.weight", 0), ("layer1.1.conv2.weight", 0), ("bn1.weight", 0),
            ("layer2.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)} <= members(stem)
    # ... and the downsample conv joins the next stage's stream
    (s2,) = groups_with(g, "layer2.0.conv2.weight", 0)
    assert {("layer2.0.downsample.0.weight", 0), ("layer2.1.conv2.weight", 0)} <= members(s2)
    # every conv output is prunable; only the classifier (1000 of 5800 outputs) is not
    assert coverage(m, (x,), {}, g) == pytest.approx(4800 / 5800)


def test_mobilenet_v3_small_depthwise_and_squeeze_excitation():
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_small(weights=None)
    x = torch.randn(1, 3, 64, 64)
    g = etp_fx.trace(m, x)
    check_graph(m, g, [("classifier.3.weight", 0), ("classifier.3.bias", 0)])
    assert g.barriers == []
    # block 1: 1x1 expand conv -> 3x3 depthwise conv -> SE scale -> 1x1 project
    (grp,) = groups_with(g, "features.4.block.0.0.weight", 0)  # expand conv out
    assert {("features.4.block.1.0.weight", 0),      # depthwise: out channel c reads in channel c
            ("features.4.block.2.fc2.weight", 0),    # SE scale multiplies those channels
            ("features.4.block.2.fc1.weight", 1),
            ("features.4.block.3.0.weight", 1)} <= members(grp)
    assert grp.exact
    # the SE bottleneck is a group of its own
    (se,) = groups_with(g, "features.4.block.2.fc1.weight", 0)
    assert members(se) >= {("features.4.block.2.fc2.weight", 1)}


@pytest.mark.slow
def test_densenet121_concat_segments():
    torch.manual_seed(0)
    m = torchvision.models.densenet121(weights=None)
    x = torch.randn(1, 3, 64, 64)
    g = etp_fx.trace(m, x)
    check_graph(m, g, [("classifier.weight", 0)])
    assert g.barriers == []
    # each dense layer's 32 new channels are one group, read by every later layer of the block
    (grp,) = groups_with(g, "features.denseblock1.denselayer1.conv2.weight", 0)
    assert grp.size == 32
    later = groups_with(g, "features.denseblock1.denselayer6.conv1.weight", 1)
    assert grp in later and len(later) == 6  # the block input and five earlier layers
    assert covered(grp, "features.denseblock1.denselayer6.conv1.weight", 1) == 32


def test_torchvision_vit_heads_and_hidden():
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
                          mlp_dim=128, num_classes=10)
    g = etp_fx.trace(m, torch.randn(1, 3, 32, 32))
    check_graph(m, g, [("heads.head.weight", 0), ("heads.head.bias", 0)])
    assert g.barriers == []
    (hidden,) = groups_with(g, "conv_proj.weight", 0)
    assert {("class_token", 2), ("encoder.pos_embedding", 2),
            ("encoder.layers.encoder_layer_1.mlp.3.weight", 0),
            ("encoder.layers.encoder_layer_0.self_attention.out_proj.weight", 0),
            ("heads.head.weight", 1)} <= members(hidden)
    # removed hidden units are zero at every LayerNorm's input: the norm is kept exact
    assert hidden.exact
    inproj = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    kinds = sorted((grp.unit_kind, grp.size) for grp in groups_with(g, inproj, 0))
    assert kinds == [("head", 4), ("head-dim", 16)]


# --- Hugging Face --------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def test_llama_gqa_heads():
    # 8 query heads over 2 kv heads (4 each), head dim 12 (RoPE pairs 6 + 6)
    m, args, kw = hf_model("llama-gqa", hidden_size=96, num_attention_heads=8,
                           num_key_value_heads=2)
    g = etp_fx.trace(m, args, kwargs=kw)
    check_graph(m, g, [("model.embed_tokens.weight", 0), ("lm_head.weight", 0)])
    assert g.barriers == []
    a = "model.layers.0.self_attn."
    q = groups_with(g, a + "q_proj.weight", 0)
    # kv heads: 2 units, each a block of q, k, v rows and o_proj columns
    (kv,) = [grp for grp in q if (a + "k_proj.weight", 0) in members(grp) and grp.size == 2]
    assert {(a + "v_proj.weight", 0), (a + "o_proj.weight", 1)} <= members(kv)
    assert kv.unit_kind == "head" and kv.exact
    assert covered(kv, a + "k_proj.weight", 0) == 24  # all 2 x 12 rows of k
    # query heads per kv head: 4 units in q and o_proj only
    (rep,) = [grp for grp in q if grp.size == 4]
    assert (a + "k_proj.weight", 0) not in members(rep)
    assert (a + "v_proj.weight", 0) not in members(rep)
    assert (a + "o_proj.weight", 1) in members(rep)
    # RoPE pairs dim j with j + 6 of every q and k head of *every* layer (cos/sin are shared)
    (rope,) = [grp for grp in q if ("model.rotary_emb.inv_freq", 0) in members(grp)]
    assert rope.size == 6 and ("model.layers.1.self_attn.k_proj.weight", 0) in members(rope)
    # v head-dims are free of RoPE
    (vdim,) = [grp for grp in groups_with(g, a + "v_proj.weight", 0) if grp.size == 12]
    assert (a + "q_proj.weight", 0) not in members(vdim)
    # the hidden dim runs through every RMSNorm, whose mean counts the removed zeros: exact
    (hidden,) = groups_with(g, "model.embed_tokens.weight", 1)
    assert ("lm_head.weight", 1) in members(hidden) and ("model.norm.weight", 0) in members(hidden)
    assert hidden.exact
    (mlp,) = groups_with(g, "model.layers.0.mlp.gate_proj.weight", 0)
    assert members(mlp) == {("model.layers.0.mlp.gate_proj.weight", 0),
                            ("model.layers.0.mlp.up_proj.weight", 0),
                            ("model.layers.0.mlp.down_proj.weight", 1)}


def test_bert_heads_and_hidden():
    m, args, kw = hf_model("bert")
    g = etp_fx.trace(m, args, kwargs=kw)
    emb = "bert.embeddings."
    check_graph(m, g, [(emb + "word_embeddings.weight", 0), (emb + "position_embeddings.weight", 0),
                       (emb + "token_type_embeddings.weight", 0), ("classifier.weight", 0),
                       ("classifier.bias", 0)])
    assert g.barriers == []
    for layer in range(2):
        a = f"bert.encoder.layer.{layer}.attention."
        qs = groups_with(g, a + "self.query.weight", 0)
        heads = [grp for grp in qs if grp.unit_kind == "head"]
        assert [h.size for h in heads] == [4]
        assert {(a + "self.key.weight", 0), (a + "self.value.weight", 0),
                (a + "output.dense.weight", 1)} <= members(heads[0])
        # q/k head-dims are coupled by q k^T; v head-dims by attn v -> output.dense
        (qk,) = [grp for grp in qs if grp.unit_kind == "head-dim"]
        assert (a + "self.key.weight", 0) in members(qk)
        assert (a + "self.value.weight", 0) not in members(qk)
        (vd,) = [grp for grp in groups_with(g, a + "self.value.weight", 0)
                 if grp.unit_kind == "head-dim"]
        assert (a + "output.dense.weight", 1) in members(vd)
    (hidden,) = groups_with(g, emb + "word_embeddings.weight", 1)
    assert {(emb + "position_embeddings.weight", 1), (emb + "LayerNorm.weight", 0),
            ("bert.pooler.dense.weight", 1)} <= members(hidden)
    assert hidden.exact
    assert coverage(m, args, kw, g) > 0.99  # all but the 2 classifier outputs


def test_t5_relative_bias_couples_heads_across_layers():
    m, args, kw = hf_model("t5")
    g = etp_fx.trace(m, args, kwargs=kw)
    check_graph(m, g, [("model.shared.weight", 0), ("model.lm_head.weight", 0),
                       ("model.encoder.embed_tokens.weight", 0),
                       ("model.decoder.embed_tokens.weight", 0)])
    assert g.barriers == []
    enc = "model.encoder.block."  # hf_model wraps T5 in LogitsOnly (attribute ``model``)
    bias = enc + "0.layer.0.SelfAttention.relative_attention_bias.weight"
    (heads,) = groups_with(g, bias, 1)
    # position_bias is computed once and added to every layer's scores
    assert heads.size == 4
    assert {(enc + "0.layer.0.SelfAttention.q.weight", 0),
            (enc + "1.layer.0.SelfAttention.q.weight", 0),
            (enc + "1.layer.0.SelfAttention.o.weight", 1)} <= members(heads)
    (ff,) = groups_with(g, enc + "0.layer.1.DenseReluDense.wi.weight", 0)
    assert ff.exact and ff.size == 128


# --- PyTorch Geometric ---------------------------------------------------------------------------

def test_gat_heads():
    pytest.importorskip("torch_geometric")
    m, args, kw = gat_model(self_loops=False)
    g = etp_fx.trace(m, args, kwargs=kw)
    check_graph(m, g, [("conv2.lin.weight", 0), ("conv2.bias", 0), ("conv1.lin.weight", 1)])
    assert g.barriers == []
    by = {(grp.unit_kind, grp.size): grp for grp in g.groups}
    assert set(by) == {("head", 4), ("head-dim", 8)}
    for grp in by.values():
        # index_select gathers node features along edges, scatter_add sums them back:
        # neither touches the feature dims
        assert {("conv1.lin.weight", 0), ("conv1.att_src", 1 if grp.unit_kind == "head" else 2),
                ("conv1.bias", 0), ("conv2.lin.weight", 1)} <= members(grp)
        assert grp.exact


def test_gat_compress_oracle():
    # the pass-through rules of index_select / scatter_add_ / scatter_reduce_ are right:
    pytest.importorskip("torch_geometric")
    from oracle import check_oracle
    # compressing random heads and head-dims matches the zeroed original
    m, args, _ = gat_model(self_loops=False)
    for seed in range(2):
        check_oracle(m, args, seed=seed)


def test_gat_with_self_loops():
    """PyG's default GATConv drops existing self loops with a boolean mask: the edge count is
    a data-dependent size, its dims are frozen, the heads and head-dims stay groups."""
    pytest.importorskip("torch_geometric")
    m, args, kw = gat_model(self_loops=True)
    g = etp_fx.trace(m, args, kwargs=kw)
    assert {(grp.unit_kind, grp.size) for grp in g.groups} == {("head", 4), ("head-dim", 8)}
    assert not g.barriers
    from oracle import check_oracle
    check_oracle(m, args, seed=0)  # removing heads and head-dims matches the zeroed original


# --- rule fixes found by the zoo sweep (small stand-ins, checked with the compress oracle) -------

class WindowGrid(nn.Module):
    """MaxViT's window then grid partition of a 14x14 map: H is regrouped 2x7 then 7x2."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, c, 1), nn.Linear(c, c), nn.Conv2d(c, 4, 1)

    @staticmethod
    def part(x, p):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p, c)

    @staticmethod
    def unpart(x, p, h, w):
        b, _, _, c = x.shape
        x = x.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x):
        x = self.a(x)
        x = self.unpart(self.b(self.part(x, 7)), 7, 14, 14)   # windows of 7x7
        x = self.unpart(self.b(self.part(x, 2)), 2, 14, 14)   # a 7x7 grid of 2x2 cells
        return self.head(x)


def test_reshape_conflict_in_spatial_dims_leaves_channels_prunable():
    from oracle import check_oracle
    torch.manual_seed(0)
    m, x = WindowGrid(), torch.randn(1, 3, 14, 14)
    g = etp_fx.trace(m, x)
    (grp,) = groups_with(g, "a.weight", 0)
    assert {("b.weight", 0), ("b.weight", 1), ("head.weight", 1)} <= members(grp)
    check_oracle(m, x, plan={grp.id: [1, 5]})


def test_prelu_weight_follows_the_channel_dim():
    from oracle import check_oracle
    torch.manual_seed(0)
    # 8 channels on an 8-wide map: numpy broadcasting would pair the weight with the width
    m, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 4, 3)), torch.randn(1, 3, 10, 10)
    g = etp_fx.trace(m, x)
    (grp,) = g.groups
    assert ("1.weight", 0) in members(grp)
    check_oracle(m, x, plan={grp.id: [0, 6]})


class ShiftedWindows(nn.Module):
    """Swin's cyclic shift (roll over H, W) and Swin-v2's in-graph ``zero_`` of the k bias."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a, self.qkv, self.o = nn.Linear(3, c), nn.Linear(c, 3 * c), nn.Linear(c, 2)

    def forward(self, x):  # x: [B, H, W, 3]
        x = torch.roll(self.a(x), shifts=(-1, -1), dims=(1, 2))
        bias = self.qkv.bias.clone()
        n = bias.numel() // 3
        bias[n:2 * n].zero_()
        q, k, v = nn.functional.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        return self.o(torch.roll(q * k + v, shifts=(1, 1), dims=(1, 2)))


def test_roll_and_zero_pass_channels_through():
    from oracle import check_oracle
    torch.manual_seed(0)
    m, x = ShiftedWindows(), torch.randn(1, 4, 4, 3)
    g = etp_fx.trace(m, x)
    assert g.barriers == []
    # q * k + v: the three chunks are one axis (Cat(A, A, A)); the zeroed bias slice stays in it
    (qkv,) = groups_with(g, "qkv.weight", 0)
    assert qkv.size == 8 and {("qkv.bias", 0), ("o.weight", 1)} <= members(qkv)
    (a,) = groups_with(g, "a.weight", 0)
    assert ("qkv.weight", 1) in members(a)
    check_oracle(m, x, plan={qkv.id: [2], a.id: [0, 7]})
