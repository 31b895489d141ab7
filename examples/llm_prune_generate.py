"""Prune a causal LM to ~70 % of its parameters (heads, MLP neurons); generate, save, reload.

What it shows
    ``compress_module`` (the coming ``etp_fx.compress(..., output="module")``) returns the
    model's own class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...), not a GraphModule:
    ``generate()`` with its KV cache, ``config``, ``save_pretrained`` all keep working. Whole
    attention heads (key/value heads and the query heads that share them) and MLP neurons are
    removed until the parameters fall to ``--target-params`` of the dense model; the hidden
    width is kept. It then

    1. checks that greedy decoding gives the same tokens as the *zeroed original* (the dense
       model with the removed units set to zero), which is what pruning promises;
    2. optionally fine-tunes the pruned model for a few steps (``--finetune-steps``);
    3. generates text from ``--prompt``;
    4. saves and reloads it: with ``--uniform`` (the default) every layer keeps the same
       number of heads and neurons, the config describes the model and a plain
       ``transformers.AutoModelForCausalLM.from_pretrained`` reloads it; with ``--per-layer``
       each layer keeps its own widths, saved by ``etp_fx.hf.save_pretrained`` and rebuilt by
       ``etp_fx.hf.from_pretrained``.

Run it on a real model (nothing is downloaded; a local ``save_pretrained`` folder with its
tokenizer)::

    python examples/llm_prune_generate.py --model ~/models/Qwen2-0.5B --prompt "The capital of"
    python examples/llm_prune_generate.py --model ~/models/Qwen2-0.5B --data corpus.txt \\
        --finetune-steps 200 --per-layer

Smoke test (offline, seconds)::

    python examples/llm_prune_generate.py --smoke

    a 4-layer Llama with grouped-query attention (4 query heads, 2 key/value heads), random
    init, bytes as tokens, a few fine-tuning steps on generated text.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402
from etp_fx import hf  # noqa: E402
from etp_fx.surgery.module_output import compress_module  # noqa: E402

NAME = "llm_prune_generate"
UNITS = ["head", "neuron"]  # whole attention heads and MLP neurons; the hidden width stays


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="local causal-LM checkpoint folder (with its tokenizer)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, offline, seconds")
    p.add_argument("--data", help="a text file to fine-tune on and measure perplexity")
    p.add_argument("--target-params", type=float, default=0.7,
                   help="share of the dense model's parameters to keep")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--uniform", dest="uniform", action="store_true", default=True,
                       help="the same widths in every layer (plain from_pretrained reloads it)")
    shape.add_argument("--per-layer", dest="uniform", action="store_false",
                       help="each layer keeps its own widths (etp_fx.hf.save_pretrained)")
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--block", type=int, default=128, help="tokens per sequence")
    p.add_argument("--prompt", default="The pruned model says")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default=None, help="output folder; default ./llm_prune_generate-out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.smoke and not args.model:
        raise SystemExit(f"{NAME}: give --model PATH (a local checkpoint) or --smoke")
    args.out = Path(args.out or f"{NAME}-out")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


class Bytes:
    """Bytes as tokens (``--smoke``): encode and decode like a tokenizer."""

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load(args: argparse.Namespace):
    """(model, encode, decode, text) with use_cache on: generate() uses the KV cache."""
    import transformers
    transformers.logging.set_verbosity_error()
    if args.smoke:
        rng = random.Random(args.seed)
        words = ["the", "model", "prunes", "heads", "and", "neurons", "of", "every", "layer"]
        text = " ".join(rng.choice(words) for _ in range(3000))
        config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                                          num_hidden_layers=4, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=256,
                                          tie_word_embeddings=True)
        args.block, args.finetune_steps = 32, args.finetune_steps or 4
        tok = Bytes()
        return transformers.LlamaForCausalLM(config), tok, tok.decode, text
    path = Path(args.model).expanduser()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    text = Path(args.data).read_text(encoding="utf-8", errors="replace") if args.data else \
        "Structured pruning removes whole heads and neurons, so the model gets smaller. " * 40

    def encode(s: str) -> list[int]:
        return tok(s)["input_ids"]
    return model, encode, tok.decode, text


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over ``[N, block]`` sequences."""
    model.eval()
    logits = model(input_ids=data, use_cache=False).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), data[:, 1:].flatten())
    return math.exp(float(loss))


def finetune(model, data: torch.Tensor, steps: int, lr: float) -> None:
    """A few steps of the model's own LM loss: the pruned model is an ordinary model."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        x = data[step % len(data)][None]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def save_and_reload(small, args: argparse.Namespace, ids: torch.Tensor):
    """Save where the config allows it as a plain checkpoint; reload; return the reloaded
    model and how it was saved."""
    import transformers
    folder = args.out / "pruned"
    if small.etp_report.get("config_exact"):
        small.save_pretrained(folder)  # the config alone describes every layer
        back = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        how = "model.save_pretrained + transformers.AutoModelForCausalLM.from_pretrained"
    else:
        hf.save_pretrained(small, folder)  # per-layer widths in the safetensors metadata
        back = hf.from_pretrained(folder)
        how = "etp_fx.hf.save_pretrained + etp_fx.hf.from_pretrained"
    with torch.no_grad():
        same = torch.allclose(back(input_ids=ids).logits, small(input_ids=ids).logits,
                              atol=1e-5, rtol=1e-4)
    return back, how, bool(same)


def main(argv: list[str] | None = None) -> dict:
    args = arguments(argv)
    torch.manual_seed(args.seed)
    if args.smoke:
        torch.set_num_threads(1)
    times: dict[str, float] = {}
    model, encode, decode, text = load(args)
    model.eval()
    ids = torch.tensor(encode(text), dtype=torch.long)
    n = len(ids) // args.block
    data = ids[: n * args.block].view(n, args.block)
    if n < 2:
        raise SystemExit(f"{NAME}: the text has {len(ids)} tokens; give --data with at least "
                         f"{2 * args.block}, or a smaller --block")
    held, train = data[:4], (data[4:] if n > 4 else data)
    # tracing needs the cache off; the pruned model still uses it in generate()
    example = {"input_ids": held[:2], "use_cache": False}
    with C.timed("trace", times):
        graph = etp_fx.trace(model, example)
    # heads and neurons of an LLM carry no bias worth keeping: zero them whole
    selection = etp_fx.Budget(params=args.target_params, include=UNITS, uniform=args.uniform)
    with C.timed("compress", times):
        small = compress_module(model, example, selection, graph=graph, keep_constants=False)
    rep = small.etp_report
    print(f"{type(small).__name__} kept its class; config changes: {rep.get('config')}")

    prompt = torch.tensor([encode(args.prompt)], dtype=torch.long)
    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False,
                  pad_token_id=getattr(model.config, "eos_token_id", None) or 0)
    plan = {gid: g["removed"] for gid, g in rep["groups"].items()}
    zeroed = etp_fx.zero_units(copy.deepcopy(model), graph, plan)
    with torch.no_grad():
        same_tokens = torch.equal(small.generate(prompt, **greedy),
                                  zeroed.generate(prompt, **greedy))
    print(f"greedy tokens equal to the zeroed original's: {same_tokens}")

    dense_ppl = perplexity(model, held)
    with C.timed("finetune", times):
        finetune(small, train, args.finetune_steps, args.lr)
    with torch.no_grad():
        out = small.generate(prompt, **greedy)
    print(f"generated: {decode(out[0, prompt.shape[1]:])!r}")
    with C.timed("save+reload", times):
        back, how, same = save_and_reload(small, args, held[:2])
    print(f"saved and reloaded with {how}: same logits {same}")
    metrics = [("held-out perplexity", dense_ppl, perplexity(small, held))]
    print(C.before_after(rep, metrics))
    print(C.group_changes(rep))
    extra = {"class": type(small).__name__, "config": rep.get("config"),
             "config_exact": rep.get("config_exact"), "uniform": args.uniform,
             "greedy_equal_to_zeroed": same_tokens, "reload": how, "reload_same_logits": same,
             "params_share": rep["params_after"] / rep["params_before"]}
    path = C.write_report(args.out, NAME, rep, metrics, times, extra)
    print(f"wrote {path}")
    if not (same_tokens and same):
        raise SystemExit("the pruned model does not match the zeroed original or its reload")
    return rep


if __name__ == "__main__":
    main()
