"""The oracle on real architectures: remove a random 30 % of the units of every exact group."""
import pytest
import torch

from oracle import check_oracle


def tv(name, size=64, **kw):
    import torchvision
    return lambda: (torchvision.models.get_model(name, weights=None, **kw), torch.randn(1, 3, size, size))


def hf(kind):
    def build():
        import transformers as T
        torch.manual_seed(0)
        ids = torch.randint(0, 100, (2, 8))
        if kind == "llama":
            cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=96, vocab_size=100, use_cache=False)
            return T.LlamaForCausalLM(cfg), ids
        cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, vocab_size=100)
        return T.BertForSequenceClassification(cfg), ids
    return build


FAST = {
    "resnet18": tv("resnet18"),
    "mobilenet_v3_small": tv("mobilenet_v3_small"),
    "llama_gqa": hf("llama"),
    "bert": hf("bert"),
}
SLOW = {
    "efficientnet_b0": tv("efficientnet_b0"),
    "densenet121": tv("densenet121"),
    "convnext_tiny": tv("convnext_tiny"),
    "vit_b_16": tv("vit_b_16", size=32, image_size=32),
    "swin_t": tv("swin_t", size=64),
}


def _run(build):
    torch.manual_seed(0)
    model, x = build()
    small, g, plan = check_oracle(model, x, frac=0.3, seed=1)
    assert plan, "expected at least one exact group to prune"
    bigger = torch.cat([x, x, x])  # the compressed model takes other batch sizes
    assert len(small(bigger)[0] if isinstance(small(bigger), tuple) else small(bigger)) >= 1
    assert small.meta["etp_report"]["params_after"] < small.meta["etp_report"]["params_before"]


@pytest.mark.parametrize("name", list(FAST))
def test_zoo_oracle(name):
    _run(FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_zoo_oracle_slow(name):
    _run(SLOW[name])
