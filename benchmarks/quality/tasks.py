"""The benchmark's tasks: data, model, loss and metric, all offline and deterministic.

A :class:`Task` hides what differs between a classifier and a language model, so the protocol
in :mod:`.runner` is one loop for all of them.
"""
from __future__ import annotations

import glob
import math
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import CACHE


@dataclass
class Task:
    """One task: ``build(seed)`` makes a fresh model; ``batches(epoch, seed)`` yields training
    ``(x, y)``; ``metric(model)`` scores held-out data (accuracy % or perplexity)."""

    name: str
    build: Callable[[int], nn.Module]
    batches: Callable[[int, int], Iterator[tuple[Any, torch.Tensor]]]
    loss: Callable[[Any, Any, torch.Tensor], torch.Tensor]
    metric: Callable[[Any], float]
    example: tuple
    metric_name: str = "accuracy %"
    higher_is_better: bool = True
    tolerance: float = 1.0  # "within tolerance of dense": points of accuracy, or ppl ratio
    optimizer: str = "sgd"
    lr: float = 0.05
    ft_lr: float = 0.01
    # every method prunes only attention heads and MLP neurons (the residual width stays)
    heads_and_neurons: bool = False
    extra: dict = field(default_factory=dict)


def logits_of(out: Any) -> torch.Tensor:
    """Logits from a plain tensor, a Hugging Face output or a dict/tuple (compressed graphs)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return out["logits"]
    return out[0]


def _eval_mode(model: Any) -> bool:
    """Switch to eval where the model has a switch; return whether it was training."""
    was = bool(getattr(model, "training", False)) and not hasattr(model, "_in_spec")
    if hasattr(model, "eval") and not hasattr(model, "_in_spec"):
        model.eval()
    return was


@torch.no_grad()
def accuracy(model: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    was = _eval_mode(model)
    correct = sum(int((logits_of(model(x[i:i + batch])).argmax(-1) == y[i:i + batch]).sum())
                  for i in range(0, len(y), batch))
    if was:
        model.train()
    return 100.0 * correct / len(y)


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch: int) -> Callable:
    """A ``batches(epoch, seed)`` over a fixed tensor dataset; the order depends only on
    (seed, epoch), so every method sees the same batches."""
    def batches(epoch: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):  # drop the ragged last batch (BatchNorm)
            idx = perm[i:i + batch]
            yield x[idx], y[idx]
    return batches


def _ce(model, x, y):
    return F.cross_entropy(logits_of(model(x)), y)


# --- vision: digits --------------------------------------------------------------------------

class SmallResNet(nn.Module):
    """A CIFAR-style ResNet in miniature: a stem and three stages of one BasicBlock each."""

    def __init__(self, widths=(16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        import torchvision.models.resnet as R
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or c != w:
                down = nn.Sequential(nn.Conv2d(c, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            blocks.append(R.BasicBlock(c, w, stride, down))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def digits_task(kind: str, batch: int = 64) -> Task:
    """VGG-BN (``etp_fx.demo.SmallVGG``) or :class:`SmallResNet` on scikit-learn's digits at
    16x16 (fixed 80/20 split)."""
    from etp_fx.demo import SmallVGG, digits
    xtr, ytr, xte, yte = digits(16, seed=0)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return SmallVGG(image_size=16) if kind == "vgg" else SmallResNet()

    return Task(name=f"{kind}-digits", build=build, batches=shuffled_batches(xtr, ytr, batch),
                loss=_ce, metric=lambda m: accuracy(m, xte, yte), example=(xtr[:1],))


# --- sequence: MNIST-1D ----------------------------------------------------------------------

class CNN1D(nn.Module):
    """A 1-D CNN with BatchNorm for MNIST-1D (inputs of length 40)."""

    def __init__(self, widths=(32, 64, 64), hidden: int = 128, length: int = 40) -> None:
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv1d(c, w, 5 if i == 0 else 3, stride, padding=2 if i == 0 else 1),
                       nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        side = length // 4
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def mnist1d_data() -> tuple[torch.Tensor, ...]:
    """MNIST-1D from the ``mnist1d`` package's generator (default arguments, seed fixed by the
    package: 4000 train, 1000 test), cached under ``.cache/`` (generation takes seconds)."""
    path = os.path.join(CACHE, "mnist1d.pt")
    if os.path.exists(path):
        return torch.load(path)
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    out = (t(d["x"], torch.float32).unsqueeze(1), t(d["y"], torch.long),
           t(d["x_test"], torch.float32).unsqueeze(1), t(d["y_test"], torch.long))
    os.makedirs(CACHE, exist_ok=True)
    torch.save(out, path)
    return out


def mnist1d_task(batch: int = 64) -> Task:
    xtr, ytr, xte, yte = mnist1d_data()

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CNN1D()

    return Task(name="cnn1d-mnist1d", build=build, batches=shuffled_batches(xtr, ytr, batch),
                loss=_ce, metric=lambda m: accuracy(m, xte, yte), example=(xtr[:1],))


# --- language: byte-level LM on the standard library ------------------------------------------

def stdlib_bytes(max_train: int, max_val: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's top-level ``*.py`` files, sorted by name; every 10th
    file is held out. Truncated to ``max_train`` / ``max_val`` bytes (fixed, deterministic for
    a given Python version)."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            (val if i % 10 == 9 else train).extend(fh.read() + b"\n")
    to = lambda b, n: torch.frombuffer(bytearray(b[:n]), dtype=torch.uint8).long()  # noqa: E731
    return to(train, max_train), to(val, max_val)


def lm_task(*, seq: int = 64, batch: int = 16, steps_per_epoch: int = 50, hidden: int = 128,
            layers: int = 2, heads: int = 8, ffn: int = 512, val_windows: int = 128) -> Task:
    """A random-init ``LlamaForCausalLM`` (byte vocabulary) trained on stdlib sources; metric:
    held-out perplexity over fixed windows. An "epoch" is ``steps_per_epoch`` random windows.

    Every method prunes whole heads and MLP neurons only. The size is chosen so that 8x MACs
    is reachable that way: the tied ``lm_head`` (``hidden x 256``) and one head per layer stay,
    which at hidden 128, 8 heads, MLP 512, 2 layers is 1/11 of the MACs (at hidden 64 with 4
    heads it was 1/4.6, so 8x could not be reached)."""
    import transformers as T
    train, val = stdlib_bytes(2_000_000, 200_000)
    starts = torch.linspace(0, len(val) - seq - 2, val_windows).long()
    vx = torch.stack([val[s:s + seq + 1] for s in starts.tolist()])

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        cfg = T.LlamaConfig(vocab_size=256, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads,
                            intermediate_size=ffn, max_position_embeddings=seq,
                            tie_word_embeddings=True, use_cache=False)
        return T.LlamaForCausalLM(cfg)

    def batches(epoch: int, seed: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for _ in range(steps_per_epoch):
            s = torch.randint(0, len(train) - seq - 2, (batch,), generator=g)
            w = torch.stack([train[i:i + seq + 1] for i in s.tolist()])
            yield w[:, :-1], w[:, 1:]

    def loss(model, x, y):
        return F.cross_entropy(logits_of(model(x)).reshape(-1, 256), y.reshape(-1))

    @torch.no_grad()
    def perplexity(model) -> float:
        was = _eval_mode(model)
        nll = sum(float(loss(model, vx[i:i + 32, :-1], vx[i:i + 32, 1:])) * len(vx[i:i + 32])
                  for i in range(0, len(vx), 32)) / len(vx)
        if was:
            model.train()
        return math.exp(nll)

    return Task(name="llama-stdlib", build=build, batches=batches, loss=loss, metric=perplexity,
                example=(vx[:1, :-1],), metric_name="perplexity", higher_is_better=False,
                tolerance=1.05, optimizer="adamw", lr=3e-3, ft_lr=1e-3, heads_and_neurons=True)


def make_tasks(names: list[str], quick: bool) -> list[Task]:
    makers = {"vgg-digits": lambda: digits_task("vgg"), "resnet-digits": lambda: digits_task("resnet"),
              "cnn1d-mnist1d": mnist1d_task,
              "llama-stdlib": lambda: lm_task(steps_per_epoch=10 if quick else 50)}
    return [makers[n]() for n in names]


ALL_TASKS = ["vgg-digits", "resnet-digits", "cnn1d-mnist1d", "llama-stdlib"]
