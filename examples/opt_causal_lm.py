"""An OPT causal language model trained with ETP on heads and MLP neurons, pruned to half width.

What it shows
    ``etp_fx.trace`` on ``transformers.OPTForCausalLM`` finds, per decoder layer, a group of
    attention heads (q, k, v rows and out_proj columns together), head-dim groups and a group
    of MLP neurons (fc1 rows, fc2 columns); the hidden size is one approximate group
    (LayerNorm) and the vocabulary is the interface. The regulariser is restricted to the units
    we prune (``include=["head", "neuron"]``), and ``etp_fx.compress(ratio=0.5,
    include=["head", "neuron"])`` removes the weaker half of the heads and
    of the MLP neurons of every layer: a half-width model with real, smaller ``q/k/v/out_proj``
    and ``fc1/fc2`` weights. ``--target-params`` or ``--target-macs`` instead rank units
    globally against a budget. The report compares held-out perplexity.

Run it on the real data
    A plain text file, and optionally a local checkpoint folder (``save_pretrained`` layout,
    e.g. ``facebook/opt-125m`` downloaded beforehand; nothing is downloaded here)::

        python examples/opt_causal_lm.py --data corpus.txt --model ~/models/opt-125m

    Without ``--model`` the script trains an OPT-125m-shaped model from random init on the
    file's bytes (a 256-symbol vocabulary). The last 10% of the text is held out.

Smoke test (offline, seconds)::

    python examples/opt_causal_lm.py --smoke

    generates a few kilobytes of templated English, and trains a 2-layer OPT of hidden size 32
    on its bytes for a few steps.
"""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402

PRUNED_KINDS = ["head", "neuron"]  # attention heads and MLP neurons


def write_fake_text(path: Path, sentences: int, seed: int) -> Path:
    """Templated sentences (``--smoke``): enough structure for the loss to drop."""
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the model", "our team"]
    verb = ["sees", "likes", "prunes", "trains", "finds"]
    obj = ["the ball", "a tree", "many heads", "small weights", "the answer"]
    path.write_text("\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}."
                              for _ in range(sentences)))
    return path


def blocks(ids: torch.Tensor, block: int) -> torch.Tensor:
    """Cut a token stream into ``[N, block]`` training sequences (the tail is dropped)."""
    n = len(ids) // block
    return ids[: n * block].view(n, block)


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int, device) -> float:
    """exp(mean next-token cross-entropy); computed from the logits, so it works the same for
    the Hugging Face model and the compressed one."""
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        x = data[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                       reduction="sum"))
        count += x[:, 1:].numel()
    return math.exp(total / max(count, 1))


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="a plain text file", epochs=1, lr=3e-4, batch_size=16,
                 strength=None)
    p.add_argument("--model", help="local OPT checkpoint folder (with its tokenizer)")
    p.add_argument("--block", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="share of heads and of MLP neurons to remove in every layer")
    p.add_argument("--max-steps", type=int, default=None)
    args = C.finish_args(p.parse_args(argv), "opt_causal_lm")
    C.limit_threads(args.smoke)
    import transformers
    from transformers import OPTConfig, OPTForCausalLM
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times: dict[str, float] = {}
    # use_cache=False: the key/value cache is an object torch.export cannot return
    if args.smoke:
        path = write_fake_text(C.smoke_dir(args) / "text.txt", 400, args.seed)
        config = OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                           num_attention_heads=4, word_embed_proj_dim=32,
                           max_position_embeddings=128, use_cache=False)
        args.block, args.batch_size, args.max_steps, args.lr = 32, 16, 8, 3e-3
    else:
        path = Path(args.data).expanduser()
        config = OPTConfig(vocab_size=256, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                           num_attention_heads=12, word_embed_proj_dim=768,
                           max_position_embeddings=2048, use_cache=False)
    text = path.read_text(encoding="utf-8", errors="replace")
    if args.model:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
        model = OPTForCausalLM.from_pretrained(args.model, local_files_only=True, use_cache=False)
    else:  # bytes as tokens
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        model = OPTForCausalLM(config)
    model.to(device)
    split = int(0.9 * len(ids))
    train, held = blocks(ids[:split], args.block), blocks(ids[split:], args.block)
    print(f"{path}: {len(ids):,} tokens, {len(train)} training and {len(held)} held-out "
          f"sequences of {args.block}")

    # 1. trace on one sequence; penalise only heads and MLP neurons
    example = {"input_ids": held[:1].to(device)}
    with C.timed("trace", times):
        graph = etp_fx.trace(model.eval(), example)
    n_batches = -(-len(train) // args.batch_size)
    steps = args.epochs * min(n_batches, args.max_steps or n_batches)
    # the target (half of the heads and neurons) drives the strength over those steps
    reg = C.regulariser(args, graph, steps, default={"ratio": args.ratio},
                        include=PRUNED_KINDS)
    print(f"traced OPT: {len(graph.groups)} groups; penalising {len(reg.unit_sets)} "
          f"({', '.join(PRUNED_KINDS)}): {reg.norms.n_units} units")

    # 2. train: the model's own language-model loss plus the penalty
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    with C.timed("train", times):
        for epoch in range(args.epochs):
            model.train()
            order = torch.randperm(len(train))
            batches = [train[order[i:i + args.batch_size]] for i in range(0, len(train),
                                                                           args.batch_size)]
            for step, x in enumerate(etp_fx.progress(batches, reg, model, desc=f"epoch {epoch}",
                                                     disable=args.smoke)):
                x = x.to(device)
                task = model(input_ids=x, labels=x).loss
                loss = task + reg(model, loss=task)  # the task loss lets the strength back off
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if args.max_steps and step + 1 >= args.max_steps:
                    break
            C.log_epoch(epoch, "LM loss", task, reg, model)
    print(C.describe(reg))

    # 3. compress: half of the heads and half of the MLP neurons of every layer
    model.eval()
    how = C.target(args, default={"ratio": args.ratio})
    with C.timed("compress", times):
        small = etp_fx.compress(model, example, graph=graph, **how, include=PRUNED_KINDS)

    # 4. report
    with C.timed("evaluate", times):
        ppl = (perplexity(model, held, args.batch_size, device),
               perplexity(small, held, args.batch_size, device))
    metrics = [("held-out perplexity", *ppl)]
    # the compressed model returns a transformers ModelOutput: `import transformers` before
    # etp_fx.load(".../model.pt2") in a fresh process, or torch.export cannot rebuild the output
    return C.publish(args, "opt_causal_lm", small, metrics, times, {"selection": how})


if __name__ == "__main__":
    main()
