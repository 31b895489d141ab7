"""Hugging Face transformers as people run them (issue 15): built from default configs (small
sizes, but ``use_cache`` and every other switch as the library sets it), traced without
touching the config, compressed, and called as the original is called (positionally or by
keyword, with or without an attention mask, padded batches, other sequence lengths). Random
init, nothing is downloaded."""
from __future__ import annotations

import copy

import pytest
import torch

import etp_fx
from etp_fx.capture import capture, check_deterministic
from etp_fx.errors import InputError, TraceError

T = pytest.importorskip("transformers")
T.logging.set_verbosity_error()
VOCAB = 128
LENGTHS = (5, 8, 13)  # the example is traced at 8


def ids(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def padded_mask(x: torch.Tensor) -> torch.Tensor:
    """Right padding: the first row ends two tokens early, the second one."""
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    mask[1, -1:] = 0
    return mask


# name -> (model class, config); small sizes, every other setting the library's default
CONFIGS = {
    "bert": lambda: T.BertForSequenceClassification(T.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=VOCAB)),
    "roberta": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=64)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96,
        vocab_size=VOCAB, max_position_embeddings=64, word_embed_proj_dim=64)),
    "llama_gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=VOCAB)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=VOCAB)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=VOCAB)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=VOCAB, head_dim=16)),
    "phi": lambda: T.PhiForCausalLM(T.PhiConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        vocab_size=VOCAB)),
}
# Phi is a third family beyond Mistral and Gemma: run with the slow tests
TEXT = [pytest.param(n, marks=pytest.mark.slow) if n == "phi" else n for n in CONFIGS]


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return CONFIGS[name]().eval()


def small_plan(graph) -> dict:
    """The first and last unit of the first head group and the first two neuron groups."""
    plan = {}
    for kind, count in (("head", 1), ("neuron", 2)):
        for g in [g for g in graph.groups if g.unit_kind == kind][:count]:
            plan[g.id] = [0, g.size - 1] if g.size > 2 else [0]
    return plan


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def assert_same(a, b):
    torch.testing.assert_close(logits(a), logits(b), rtol=1e-4, atol=1e-5)


def config_state(model) -> dict:
    return {k: repr(v) for k, v in vars(model.config).items()}


@pytest.mark.parametrize("name", TEXT)
def test_default_config_traces_and_compresses(name):
    """use_cache=True by default: traced anyway, the config and model left as they were; heads
    and neurons are groups; a compressed result matches the zeroed original at three sequence
    lengths, positionally and by keyword, with no mask and with a padded batch."""
    model = model_of(name)
    before = config_state(model)
    x = ids()
    graph = etp_fx.trace(model, x)  # positional: the way a user calls it
    assert config_state(model) == before
    assert not model._forward_pre_hooks and not model._forward_hooks
    kinds = {g.unit_kind for g in graph.groups}
    assert {"head", "neuron"} <= kinds, kinds
    plan = small_plan(graph)
    small = etp_fx.compress(model, x, remove=plan, graph=graph)
    assert config_state(model) == before
    zeroed = etp_fx.zero_units(copy.deepcopy(model), graph, plan)
    with torch.no_grad():
        for length in LENGTHS:
            xl = ids(3, length, seed=length)
            mask = padded_mask(xl)
            assert_same(small(xl), zeroed(xl))
            assert_same(small(input_ids=xl), zeroed(xl))
            assert_same(small(input_ids=xl, attention_mask=mask),
                        zeroed(input_ids=xl, attention_mask=mask))
        # the padded check compares something: the mask changes the output
        assert not torch.allclose(logits(small(xl)), logits(small(xl, attention_mask=mask)))
    notes = small.meta["etp_capture_notes"]
    if "use_cache" in type(model).forward.__code__.co_varnames:
        assert any("use_cache=False" in n for n in notes), notes


@pytest.mark.parametrize("name", ["llama_gqa", "bert", "gpt2"])
def test_capture_api_keeps_batch_and_length_dynamic(name):
    """capture(dynamic="auto") on a keyword call: batch and length of the ids and of the mask
    added for them stay dynamic; the result accepts the original's call forms."""
    model = model_of(name)
    gm = capture(model, (), {"input_ids": ids()}, dynamic="auto")
    dims = gm.meta["etp_dynamic_dims"]
    assert dims["input_ids"] == {0: "dynamic", 1: "dynamic"}
    assert dims["attention_mask"] == {0: "dynamic", 1: "dynamic"}
    assert gm.meta["etp_pinned_dims"] == {}
    with torch.no_grad():
        for length in LENGTHS:
            xl = ids(3, length, seed=length)
            mask = padded_mask(xl)
            want = model(xl, attention_mask=mask)
            assert_same(gm(xl, attention_mask=mask), want)
            assert_same(gm(input_ids=xl, attention_mask=mask), want)
            assert_same(gm(xl), model(xl))


def test_t5_encoder_decoder_default_config():
    """T5 needs decoder_input_ids; both masks become inputs; lengths of encoder and decoder
    vary independently."""
    torch.manual_seed(0)
    model = T.T5ForConditionalGeneration(T.T5Config(
        d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0)).eval()
    before = config_state(model)
    example = {"input_ids": ids(), "decoder_input_ids": ids(2, 5, 1)}
    graph = etp_fx.trace(model, example)
    assert config_state(model) == before
    assert {"head", "neuron"} <= {g.unit_kind for g in graph.groups}
    plan = small_plan(graph)
    small = etp_fx.compress(model, example, remove=plan, graph=graph)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), graph, plan)
    dims = small.meta["etp_dynamic_dims"]
    assert dims["input_ids"] == dims["decoder_input_ids"] == {0: "dynamic", 1: "dynamic"}
    with torch.no_grad():
        for enc, dec in ((5, 3), (8, 5), (13, 7)):
            x, d = ids(3, enc, enc), ids(3, dec, dec)
            mask = padded_mask(x)
            assert_same(small(x, decoder_input_ids=d), zeroed(x, decoder_input_ids=d))
            assert_same(small(input_ids=x, attention_mask=mask, decoder_input_ids=d),
                        zeroed(input_ids=x, attention_mask=mask, decoder_input_ids=d))


def test_vit_default_config():
    """ViT: heads and neurons; the batch stays dynamic, channels and image size are pinned by
    the model's own code, and the capture says where."""
    torch.manual_seed(0)
    model = T.ViTForImageClassification(T.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        image_size=32, patch_size=8)).eval()
    px = torch.randn(2, 3, 32, 32)
    graph = etp_fx.trace(model, px)
    assert {"head", "neuron"} <= {g.unit_kind for g in graph.groups}
    plan = small_plan(graph)
    small = etp_fx.compress(model, px, remove=plan, graph=graph)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), graph, plan)
    with torch.no_grad():
        for batch in (1, 3):
            p = torch.randn(batch, 3, 32, 32)
            assert_same(small(p), zeroed(p))
            assert_same(small(pixel_values=p), zeroed(p))
    gm = capture(model, (px,), {}, dynamic="auto")
    assert gm.meta["etp_dynamic_dims"]["pixel_values"] == {
        0: "dynamic", 1: "static", 2: "static", 3: "static"}
    pinned = gm.meta["etp_pinned_dims"]["pixel_values"]
    assert "pinned to 32" in pinned[2] and "vit.embeddings" in pinned[2], pinned


def test_call_forms_are_checked():
    """Traced positionally, called by keyword and the other way round; what the graph cannot
    compute is refused by name, never silently ignored."""
    model = model_of("llama_gqa")
    x = ids()
    by_position = capture(model, (x,), {})
    by_keyword = capture(model, (), {"input_ids": x})
    with torch.no_grad():
        want = model(x, use_cache=False)
        for gm in (by_position, by_keyword):
            assert_same(gm(x), want)
            assert_same(gm(input_ids=x), want)
            assert_same(gm(x, use_cache=False, labels=None), want)  # defaults change nothing
    with pytest.raises(InputError, match="use_cache=False"):
        by_position(x, use_cache=True)
    with pytest.raises(InputError, match="inputs_embeds"):
        by_position(inputs_embeds=torch.randn(2, 8, 64))
    with pytest.raises(InputError, match="given twice"):
        by_position(x, input_ids=x)


def test_a_default_config_model_is_deterministic():
    """Two eager runs return two key/value cache objects, which never compare equal: the
    check runs the model as it is captured (use_cache=False), and passes."""
    model = model_of("llama_gqa")
    check_deterministic(model, (ids(),), {})
    assert model.config.use_cache is True


def test_user_use_cache_true_is_explained():
    """use_cache=True passed on purpose: the error says what to do instead of blaming
    data-dependent control flow."""
    model = model_of("llama_gqa")
    with pytest.raises(TraceError, match="leave use_cache out"):
        capture(model, (), {"input_ids": ids(), "use_cache": True}, dynamic=None)


def test_a_model_without_a_mask_input_is_not_given_one():
    """GPT-2 treats "no mask" like "a mask of ones" and gets a mask input; a model whose
    forward has no such parameter gets none, and a mask of ones that would change the output
    is not used (checked on the example)."""
    gm = capture(model_of("gpt2"), (ids(),), {})
    assert "attention_mask" in gm.meta["etp_call"].captured

    class NoMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, 8)

        def forward(self, input_ids, attention_mask=None):
            h = self.emb(input_ids)
            return h if attention_mask is None else h * 2  # a mask of ones changes it

    gm = capture(NoMask(), (ids(),), {}, method="export")
    assert gm.meta["etp_call"].captured == ("input_ids",)
    with pytest.raises(InputError, match="attention_mask"):
        gm(ids(), attention_mask=torch.ones(2, 8, dtype=torch.long))


def test_compressed_transformer_traces_and_compresses_again():
    """Iterative pruning: a compressed Llama is a normal module (eval, train, to, state_dict)
    and can be traced and compressed again, keeping its call forms and dynamic dims."""
    model = model_of("llama_gqa")
    x = ids()
    small = etp_fx.compress(model, x, ratio=0.3, keep_constants=False)
    small.train()
    small.eval()
    assert set(small.state_dict()) <= set(model.state_dict())
    graph = etp_fx.trace(small, x)
    assert {"head", "neuron"} <= {g.unit_kind for g in graph.groups}
    smaller = etp_fx.compress(small, x, ratio=0.3, keep_constants=False)
    rep = smaller.meta["etp_report"]
    assert rep["params_after"] < rep["params_before"]
    assert smaller.meta["etp_dynamic_dims"]["input_ids"] == {0: "dynamic", 1: "dynamic"}
    x13 = ids(3, 13, 1)
    mask = padded_mask(x13)
    with torch.no_grad():
        assert logits(smaller(x13)).shape == (3, 13, VOCAB)
        assert logits(smaller(input_ids=x13, attention_mask=mask)).shape == (3, 13, VOCAB)
    half = copy.deepcopy(smaller).to(torch.float64)
    with torch.no_grad():
        assert logits(half(x13)).dtype == torch.float64
