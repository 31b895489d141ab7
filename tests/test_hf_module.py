"""Hugging Face models pruned into their own class: the module-output oracle on Llama (GQA),
Qwen2, GPT-2, OPT, BERT, ViT and T5; generate() with the KV cache against the zeroed original;
the config; save_pretrained / from_pretrained round trips in a fresh process. Small random
configs only: nothing is downloaded."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import etp_fx
from etp_fx import hf
from etp_fx.errors import LoadError, ModuleOutputError, SaveError
from etp_fx.surgery.module_output import compress_module

from test_module_output import check_module_oracle, module_plan_for

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128


def ids(batch=2, length=8, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def llama():
    cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                        pad_token_id=0)
    return T.LlamaForCausalLM(cfg), {"input_ids": ids(), "use_cache": False}


def qwen2():
    cfg = T.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, vocab_size=VOCAB,
                        pad_token_id=0)
    return T.Qwen2ForCausalLM(cfg), {"input_ids": ids(), "use_cache": False}


def gpt2():
    cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return T.GPT2LMHeadModel(cfg), {"input_ids": ids(), "use_cache": False}


def opt():
    cfg = T.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
                      vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64)
    return T.OPTForCausalLM(cfg), {"input_ids": ids(), "use_cache": False}


def bert():
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, vocab_size=VOCAB)
    return T.BertForSequenceClassification(cfg), {"input_ids": ids()}


def vit():
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=96, image_size=32, patch_size=8)
    return T.ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32)}


def t5():
    cfg = T.T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
                     decoder_start_token_id=0)
    inputs = {"input_ids": ids(), "decoder_input_ids": ids(2, 5, 1), "use_cache": False}
    return T.T5ForConditionalGeneration(cfg), inputs


MODELS = {"llama_gqa": llama, "qwen2": qwen2, "gpt2": gpt2, "opt": opt, "bert": bert, "vit": vit,
          "t5": t5}
# the config alone rebuilds the pruned model where head_dim is a config value (Llama, Qwen2:
# head_dim; ViT: read with getattr; T5: d_kv); GPT-2, OPT, BERT derive it from hidden // heads
CONFIG_EXACT = {"llama_gqa": True, "qwen2": True, "vit": True, "t5": True, "gpt2": False,
                "opt": False, "bert": False}


def randomise_biases(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_module_oracle(name):
    """Every head and MLP group pruned by 30 %, as the graph output's oracle does: the same
    class, equal to the zeroed original on the inputs and on another batch and length; the
    config says the new widths."""
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    small, g, plan = check_module_oracle(model, inputs, fresh=lambda: MODELS[name]()[0])
    rep = small.etp_report
    assert rep["config_exact"] is CONFIG_EXACT[name], rep["config"]
    assert small.config.num_attention_heads == 3 or name in ("llama_gqa", "qwen2")
    for key, (old, new) in rep["config"].items():
        assert getattr(small.config, key) == new and getattr(model.config, key, None) == old


def test_llama_gqa_heads_and_config():
    """Removing a key/value head takes its query heads with it; a query head inside a KV group
    changes num_key_value_groups; the config and every attention module agree."""
    torch.manual_seed(0)
    model, inputs = llama()
    kv = "model.layers.{}.self_attn.q_proj.weight[0].0"
    rep = "model.layers.{}.self_attn.q_proj.weight[0].1"
    plan = {kv.format(0): [1], kv.format(1): [0], rep.format(0): [0], rep.format(1): [1]}
    small, _, _ = check_module_oracle(model, inputs, plan=plan)
    for layer in small.model.layers:
        attn = layer.self_attn
        assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.num_key_value_groups) \
            == (16, 16, 1)
    assert small.etp_report["config"]["num_attention_heads"] == [4, 1]
    assert small.etp_report["config"]["num_key_value_heads"] == [2, 1]
    assert small.etp_report["config_exact"]


def test_head_dim_groups_are_refused_for_modules():
    """The per-head width (RoPE halves of q/k, v's head dim) cannot be expressed: Llama keeps
    one head_dim. A selection skips those groups; a Plan naming one is refused."""
    model, inputs = llama()
    g = etp_fx.trace(model, inputs)
    head_dims = [grp.id for grp in g.groups if grp.unit_kind == "head-dim"]
    assert head_dims
    with pytest.raises(ModuleOutputError, match="head dim"):
        compress_module(model, inputs, remove={head_dims[0]: [0]}, graph=g)
    small = compress_module(model, inputs, ratio=0.5, graph=g, keep_constants=False)
    assert not set(small.etp_report["groups"]) & set(head_dims)


def test_bias_constants_fold_in_bert_and_gpt2():
    """The norm-based default keeps the removed heads' value biases and MLP biases as constants,
    folded into the next layer's bias (attention output, c_proj)."""
    for build in (bert, gpt2):
        torch.manual_seed(0)
        model, inputs = build()
        model = randomise_biases(model.eval())
        g = etp_fx.trace(model, inputs)
        small = compress_module(model, inputs, ratio=0.3, include=["head", "neuron"], graph=g)
        plan = {gid: r["removed"] for gid, r in small.etp_report["groups"].items()}
        assert plan and small.etp_report["folds"]
        zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=True).eval()
        with torch.no_grad():
            ref = zeroed(**inputs).logits
            got = small(**inputs).logits
        assert float((ref - got).abs().max()) <= 1e-5 * float(ref.abs().max())


def _per_layer_llama(build=None):
    """Llama (or Qwen2) with other widths in each layer: layer 0 loses a key/value head, layer
    1 a query head of each KV group and 40 MLP neurons."""
    torch.manual_seed(0)
    model, inputs = (build or llama)()
    g = etp_fx.trace(model, inputs)
    plan = {"model.layers.0.self_attn.q_proj.weight[0].0": [1],
            "model.layers.1.self_attn.q_proj.weight[0].1": [0],
            "model.layers.1.mlp.gate_proj.weight[0]": list(range(0, 80, 2))}
    return model.eval(), inputs, g, plan


@pytest.mark.parametrize("build", [llama, qwen2, gpt2, opt, t5])
def test_generate_with_kv_cache_matches_zeroed_original(build):
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    g = etp_fx.trace(model, inputs)
    plan = module_plan_for(g, 0.4, 1)
    if build is llama:
        model, inputs, g, plan = _per_layer_llama()
    small = compress_module(model, inputs, remove=plan, graph=g)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan).eval()
    prompt = ids(2, 5, 3)
    kw = dict(max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        got, ref = small.generate(prompt, **kw), zeroed.generate(prompt, **kw)
    assert got.shape[1] > prompt.shape[1]
    assert torch.equal(got, ref)


def _run_fresh(code: str, tmp: Path) -> None:
    """Run ``code`` in a fresh interpreter (PYTHONPATH cleared: etp_fx only where imported)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tmp, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]


def test_uniform_widths_reload_with_plain_transformers_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model, inputs = llama()
    small = compress_module(model.eval(), inputs,
                            etp_fx.Ratio(0.5, include=["head", "neuron"], uniform=True),
                            keep_constants=False)
    rep = small.etp_report
    assert rep["config_exact"], rep["config"]
    assert rep["config"]["intermediate_size"] == [96, 48]
    small.save_pretrained(tmp_path / "m")
    x = ids(3, 7, 5)
    torch.save(x, tmp_path / "ids.pt")
    _run_fresh(f"""
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})
assert "etp_fx" not in sys.modules, "the reload must not need etp_fx"
with torch.no_grad():
    torch.save(m(torch.load("ids.pt")).logits, "logits.pt")
""", tmp_path)
    with torch.no_grad():
        ref = small(x).logits
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("output", ["graph", "module"])
def test_compress_with_a_uniform_ratio_for_both_outputs(output):
    """``compress(..., ratio=0.3, uniform=True)``: every layer loses as many units of each
    role, in the graph output (every exact group) and the module output (heads and neurons a
    module can shrink, so the config describes the result)."""
    from etp_fx.regularise.uniform import role_of
    torch.manual_seed(0)
    model, inputs = llama()
    g = etp_fx.trace(model.eval(), inputs)
    small = etp_fx.compress(model, inputs, ratio=0.3, uniform=True, keep_constants=False,
                            graph=g, output=output)
    rep = small.meta["etp_report"] if output == "graph" else small.etp_report
    assert all(v["passed"] for v in rep["verified"])
    layers = {}
    for gid, r in rep["groups"].items():
        layers.setdefault(role_of(gid), set()).add((gid, r["new"]))
    assert any("mlp" in role for role in layers)
    twins = {}  # groups per role in the graph (RoPE's q/k dims are one group for all layers)
    for grp in g.groups:
        twins[role_of(grp.id)] = twins.get(role_of(grp.id), 0) + 1
    for role, entries in layers.items():  # every group of the role, one new width
        assert len(entries) == twins[role] and len({new for _, new in entries}) == 1, entries
    if output == "module":
        assert rep["config_exact"], rep["config"]
        assert {layer.mlp.intermediate_size for layer in small.model.layers} == {96 - 28}


@pytest.mark.parametrize("which", ["llama_per_layer", "qwen2_per_layer", "gpt2"])
def test_per_layer_widths_round_trip_through_etp_fx_hf(tmp_path, which):
    """Widths a config cannot hold (per-layer; GPT-2's head size derived from hidden // heads)
    are stored in the safetensors metadata and rebuilt exactly in a fresh process."""
    if which == "gpt2":
        torch.manual_seed(0)
        model, inputs = gpt2()
        plan = {"transformer.h.0.attn.c_attn.weight[1].0": [2],
                "transformer.h.1.mlp.c_fc.weight[1]": list(range(100))}
        g = etp_fx.trace(model.eval(), inputs)
    else:
        model, inputs, g, plan = _per_layer_llama(qwen2 if which.startswith("qwen2") else llama)
    small = compress_module(model, inputs, remove=plan, graph=g)
    assert small.etp_report["config_exact"] is False
    hf.save_pretrained(small, tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["architectures"] == [type(model).__name__]
    x = ids(2, 6, 7)
    torch.save(x, tmp_path / "ids.pt")
    _run_fresh(f"""
import torch
from etp_fx import hf
m = hf.from_pretrained({str(tmp_path / 'm')!r})
x = torch.load("ids.pt")
with torch.no_grad():
    torch.save(m(x).logits, "logits.pt")
    torch.save(m.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0), "gen.pt")
""", tmp_path)
    with torch.no_grad():
        ref = small(x).logits
        gen = small.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.load(tmp_path / "gen.pt"), gen)


def test_save_and_load_refuse_what_they_cannot_do(tmp_path):
    model, _ = llama()
    with pytest.raises(SaveError, match="compress_module"):
        hf.save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(LoadError, match="no etp_fx widths"):
        hf.from_pretrained(tmp_path / "plain")
    with pytest.raises(LoadError, match="no model.safetensors"):
        hf.from_pretrained(tmp_path)


@pytest.mark.timeout(240)
def test_example_smoke_run(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "llm_prune_generate.py"),
                          "--smoke", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=230, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compressed" in res.stdout and "MACs" in res.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["example"] == "llm_prune_generate" and report["class"] == "LlamaForCausalLM"
    assert report["greedy_equal_to_zeroed"] and report["reload_same_logits"]
    assert 0.6 <= report["params_share"] <= 0.75


def test_llm_doc_runs_and_prints_what_it_says():
    """docs/llm.md: every python block runs and prints what the page says it prints."""
    import contextlib
    import io
    import re
    text = (ROOT / "docs" / "llm.md").read_text()
    ns: dict = {}
    last = None
    for kind, body in re.findall(r"```(python|text)\n(.*?)```", text, flags=re.S):
        if kind == "python":
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                exec(compile(body, "docs/llm.md", "exec"), ns)
            last = buf.getvalue()
        else:
            assert last is not None and last.strip() == body.strip(), (body, last)
            last = None
