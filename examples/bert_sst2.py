"""BERT on SST-2 with the Hugging Face ``Trainer`` and ``etp_fx.ETPCallback``, then compress.

What it shows
    ``etp_fx.trace`` on ``BertForSequenceClassification`` finds, in every layer, a group of
    attention heads (query, key, value rows and the output projection's columns), a group of
    query/key head-dims, one of value head-dims and one of MLP neurons; the hidden size is one
    *approximate* group (LayerNorm normalises over it), which etp_fx leaves alone by default.
    ``etp_fx.ETPCallback(reg).attach(trainer)`` adds the ETP penalty to the loss that
    ``transformers.Trainer`` computes, hands the Trainer's step count to the target-driven
    regulariser (``target_macs=``, no strength to tune) and logs ``etp_penalty``,
    ``etp_zero_units``, ``etp_strength`` and ``etp_left`` with the training loss. After fine-tuning, ``etp_fx.compress(target_macs=...)`` removes the
    weakest heads, head-dims and neurons, and the script compares dev accuracy before and after.

Run it on the real data
    SST-2 in the GLUE layout (``DATA/train.tsv`` and ``DATA/dev.tsv``, tab-separated with a
    header ``sentence<TAB>label``) and a BERT checkpoint saved in a local folder (a
    ``save_pretrained`` folder with the tokenizer, e.g. ``bert-base-uncased``)::

        python examples/bert_sst2.py --data ~/data/glue/SST-2 --model ~/models/bert-base-uncased

    Defaults follow the usual SST-2 fine-tuning (AdamW lr 2e-5, 3 epochs, batch 32,
    sequences padded to 64 tokens). Nothing is downloaded: ``--model`` must be a local folder.

Smoke test (offline, seconds)::

    python examples/bert_sst2.py --smoke

    writes generated positive/negative sentences as train.tsv/dev.tsv, reads them with the
    same loader, tokenizes them with a tiny word-hashing tokenizer (below) and fine-tunes a
    2-layer BERT of hidden size 32 (random init) for a few ``Trainer`` steps.
"""
from __future__ import annotations

import csv
import random
import re
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402


# --- data: the GLUE SST-2 TSV files ------------------------------------------------------------

def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and labels of a GLUE SST-2 file (header ``sentence<TAB>label``)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    head = rows[0]
    s, l_ = head.index("sentence"), head.index("label")
    return [r[s] for r in rows[1:]], [int(r[l_]) for r in rows[1:]]


def write_fake_sst2(folder: Path, n_train: int, n_dev: int, seed: int) -> Path:
    """Generated sentences whose label is the sentiment of their adjective (``--smoke``)."""
    rng = random.Random(seed)
    good = ["great", "moving", "funny", "brilliant", "warm", "sharp"]
    bad = ["dull", "boring", "clumsy", "tedious", "flat", "messy"]
    nouns = ["film", "story", "cast", "script", "ending", "score"]
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(folder / name, "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                y = rng.randint(0, 1)
                adj = rng.choice(good if y else bad)
                f.write(f"the {rng.choice(nouns)} is {adj} and {rng.choice(nouns)} too\t{y}\n")
    return folder


class HashTokenizer:
    """A stand-in tokenizer for the smoke test: each word's id is a CRC32 hash modulo the
    vocabulary (ids 0, 1, 2 are [PAD], [CLS], [SEP]). Same call convention as a HF tokenizer."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, texts, *, max_length: int, **_):
        ids = torch.zeros(len(texts), max_length, dtype=torch.long)
        for i, t in enumerate(texts):
            words = re.findall(r"\w+|[^\w\s]", t.lower())[: max_length - 2]
            tok = [1] + [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words] + [2]
            ids[i, : len(tok)] = torch.tensor(tok)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class Encoded(torch.utils.data.Dataset):
    """Tokenized sentences with labels, as the ``Trainer`` wants them (dicts of tensors)."""

    def __init__(self, enc: dict[str, torch.Tensor], labels: list[int]) -> None:
        self.enc, self.labels = enc, torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


@torch.no_grad()
def accuracy(model, enc: dict[str, torch.Tensor], labels: list[int], batch_size: int,
             device) -> float:
    """Dev accuracy in percent; works for the Hugging Face model and the compressed one."""
    correct = 0
    for i in range(0, len(labels), batch_size):
        out = model(**{k: v[i:i + batch_size].to(device) for k, v in enc.items()})
        correct += int((out.logits.argmax(-1).cpu() == torch.tensor(labels[i:i + batch_size])).sum())
    return 100.0 * correct / len(labels)


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="folder with the GLUE SST-2 train.tsv and dev.tsv",
                 epochs=3, lr=2e-5, batch_size=32, strength=None, target_macs=0.25)
    p.add_argument("--model", help="local folder of a BERT checkpoint and its tokenizer")
    p.add_argument("--max-len", type=int, default=64, help="tokens per sentence (padded)")
    args = C.finish_args(p.parse_args(argv), "bert_sst2")
    C.limit_threads(args.smoke)
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    times: dict[str, float] = {}
    max_steps = -1
    if args.smoke:
        folder = write_fake_sst2(C.smoke_dir(args), 256, 64, args.seed)
        tokenizer = HashTokenizer(vocab_size=500)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, num_labels=2))
        args.max_len, args.lr, args.batch_size, max_steps = 16, 1e-3, 32, 6
        args.target_macs = 0.5
    else:
        if not args.model:
            raise SystemExit("bert_sst2: give --model DIR (a local BERT checkpoint folder)")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        folder = Path(args.data).expanduser()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=2, local_files_only=True)

    def encode(texts):  # fixed-length padding: the compressed model is traced at this length
        enc = tokenizer(texts, max_length=args.max_len, padding="max_length", truncation=True,
                        return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                      "token_type_ids")}

    train_texts, train_labels = read_sst2(folder / "train.tsv")
    dev_texts, dev_labels = read_sst2(folder / "dev.tsv")
    train_enc, dev_enc = encode(train_texts), encode(dev_texts)
    print(f"SST-2 from {folder}: {len(train_labels)} train, {len(dev_labels)} dev sentences")

    # 1. trace once (on CPU, one example) and build the regulariser
    example = {k: v[:1] for k, v in dev_enc.items()}
    with C.timed("trace", times):
        graph = etp_fx.trace(model.eval(), example)
    # the MACs target drives the strength; ETPCallback hands it the Trainer's step count
    reg = C.regulariser(args, graph, None)
    kinds = sorted({g.unit_kind for g in reg.unit_sets})
    print(f"traced {type(model).__name__}: {len(graph.groups)} groups; penalising "
          f"{len(reg.unit_sets)} exact groups ({', '.join(kinds)}), "
          f"{sum(not g.exact for g in graph.groups)} approximate left alone")

    # 2. fine-tune with the Trainer; the callback puts the penalty into its loss
    targs = TrainingArguments(
        output_dir=str(args.out / "trainer"), num_train_epochs=args.epochs, max_steps=max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, weight_decay=0.01,
        logging_steps=2 if args.smoke else 50, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=args.smoke, dataloader_num_workers=args.workers,
        seed=args.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=Encoded(train_enc, train_labels))
    etp_fx.ETPCallback(reg).attach(trainer)
    with C.timed("train", times):
        trainer.train()
    logged = [h for h in trainer.state.log_history if "etp_penalty" in h]
    if logged:
        h = logged[-1]
        print(f"step {h['step']}: loss {h['loss']:.4g} (with the penalty), "
              f"etp_penalty {h['etp_penalty']:.4g}, etp_zero_units {h['etp_zero_units']}")
    print(C.describe(reg))

    # 3. compress: the weakest heads, head-dims and MLP neurons, down to the MACs budget
    model = trainer.model.cpu().eval()
    how = C.target(args)
    with C.timed("compress", times):
        small = etp_fx.compress(model, example, graph=graph, **how)

    # 4. report (dev accuracy of both, on the CPU)
    with C.timed("evaluate", times):
        acc = (accuracy(model, dev_enc, dev_labels, 64, "cpu"),
               accuracy(small, dev_enc, dev_labels, 64, "cpu"))
    metrics = [("dev accuracy %", *acc)]
    # the compressed model returns a transformers ModelOutput: `import transformers` before
    # etp_fx.load(".../model.pt2") in a fresh process, or torch.export cannot rebuild the output
    return C.publish(args, "bert_sst2", small, metrics, times,
                     {"selection": how, "log_history": trainer.state.log_history})


if __name__ == "__main__":
    main()
