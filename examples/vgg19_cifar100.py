"""VGG-19 (BatchNorm) on CIFAR-100 with the ETP paper's recipe, then compress with etp_fx.

What it shows
    The official ETP experiment as a script: VGG-19-BN on CIFAR-100 images upsampled to
    224x224 (as the official code does), SGD lr 0.01 (momentum 0.9, weight decay 5e-4) for 179
    epochs with the learning rate divided by 10 at epochs 120 and 160, the penalty of
    ``etp_fx.ExponentialTorque(graph, preset="paper")`` (the paper's formula, strength 1e-5)
    added to the loss, and the official per-epoch clipping of weights below 5e-4. Then
    ``etp_fx.compress`` removes the units whose output rows are all zero (the paper's
    criterion; the official code only counts them) or, with ``--target-macs``, the weakest
    units down to a MACs budget, and the script prints the before/after table.

Run it on the real data
    Download and unpack CIFAR-100, python version (``cifar-100-python.tar.gz`` from
    https://www.cs.toronto.edu/~kriz/cifar.html), then::

        python examples/vgg19_cifar100.py --data ~/data/cifar-100-python --out vgg19-out

    The folder holds the files ``train`` and ``test``. They are Python pickles: reading them
    runs :func:`pickle.load` on *your* dataset file, which is how CIFAR is distributed; only
    load copies you downloaded from the official page. Training takes days on one GPU (179
    epochs at 224x224); ``--epochs`` and ``--image-size 32`` shorten it (the milestones scale
    with ``--epochs``).

Smoke test (offline, seconds)::

    python examples/vgg19_cifar100.py --smoke

    writes random 3x32x32 images with 100 classes in the CIFAR pickle layout, reads them back
    through the same loader, and trains a VGG-19 one sixteenth as wide for a few steps.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402

# --- the model: torchvision's vgg19_bn layout (same parameter names), with a width multiplier --

CFG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG(nn.Module):
    """VGG-19-BN. ``width=1, hidden=4096, pool=7`` is ``torchvision.models.vgg19_bn``."""

    def __init__(self, num_classes: int = 100, width: float = 1.0, hidden: int = 4096,
                 pool: int = 7, dropout: float = 0.5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in CFG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            w = max(8, int(v * width))
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool)
        self.classifier = nn.Sequential(
            nn.Linear(c * pool * pool, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- the data: the CIFAR-100 python pickles -------------------------------------------------

MEAN = torch.tensor([0.5071, 0.4865, 0.4409]).view(1, 3, 1, 1)
STD = torch.tensor([0.2673, 0.2564, 0.2762]).view(1, 3, 1, 1)


def load_cifar100(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images [N, 3, 32, 32], fine labels [N])`` of ``folder/train`` or ``folder/test``.

    The official files are pickled dicts (keys ``b"data"``, ``b"fine_labels"``): this unpickles
    your own dataset file, as every CIFAR loader does."""
    with open(folder / split, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = torch.from_numpy(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    return x, torch.tensor(d[b"fine_labels"], dtype=torch.long)


def write_fake_cifar100(folder: Path, n_train: int, n_test: int, seed: int) -> Path:
    """Random images in the CIFAR-100 pickle layout (for ``--smoke``)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"fine_labels": rng.integers(0, 100, n).tolist()}
        with open(folder / split, "wb") as f:
            pickle.dump(d, f)
    return folder


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool, seed: int = 0):
    """Mini-batches of uint8 images; training batches are shuffled."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if train \
        else torch.arange(len(y))
    for i in range(0, len(y), batch_size):
        idx = order[i:i + batch_size]
        yield x[idx], y[idx]


def prepare(x: torch.Tensor, size: int, train: bool, device) -> torch.Tensor:
    """uint8 -> normalised float at ``size`` x ``size``; random crop (pad 4) and flip in training."""
    x = x.to(device).float().div_(255)
    if train:  # one random crop offset per batch (cheap), a random flip per image
        x = F.pad(x, (4, 4, 4, 4), mode="reflect")
        i, j = np.random.randint(0, 9, 2)
        x = x[:, :, i:i + 32, j:j + 32]
        flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5
        x = torch.where(flip, x.flip(3), x)
    x = (x - MEAN.to(device)) / STD.to(device)
    if size != 32:  # the official code trains at 224x224
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


@torch.no_grad()
def accuracy(model, x, y, size: int, batch_size: int, device) -> float:
    """Top-1 accuracy in percent (a compressed model is always in eval mode)."""
    correct = 0
    for xb, yb in batches(x, y, batch_size, train=False):
        correct += int((model(prepare(xb, size, False, device)).argmax(1).cpu() == yb).sum())
    return 100.0 * correct / len(y)


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="the cifar-100-python folder (files train and test)",
                 epochs=179, lr=0.01, batch_size=128, strength=None)
    p.add_argument("--image-size", type=int, default=224, help="the official code uses 224")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier")
    p.add_argument("--steps", type=int, default=None, help="stop each epoch after this many steps")
    args = C.finish_args(p.parse_args(argv), "vgg19_cifar100")
    C.limit_threads(args.smoke)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times: dict[str, float] = {}
    model_kw = {}
    if args.smoke:  # a narrow VGG-19 on 32x32 random images: the whole path in seconds
        folder = write_fake_cifar100(C.smoke_dir(args), 192, 64, args.seed)
        args.image_size, args.width, args.epochs, args.steps = 32, 1 / 16, 2, 3
        args.batch_size = 64
        args.target_macs = args.target_macs or 0.5
        model_kw = {"hidden": 64, "pool": 1}
    else:
        folder = Path(args.data).expanduser()
    xtr, ytr = load_cifar100(folder, "train")
    xte, yte = load_cifar100(folder, "test")
    print(f"CIFAR-100 from {folder}: {len(ytr)} train, {len(yte)} test images")

    # 1. build the model and the paper's regulariser from a trace of it
    model = VGG(100, width=args.width, **model_kw).to(device)
    example = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    with C.timed("trace", times):
        graph = etp_fx.trace(model, example)
    strength = 1e-5 if args.strength is None else args.strength
    reg = etp_fx.ExponentialTorque(graph, preset="paper", strength=strength)
    print(f"traced: {len(graph.groups)} groups; paper preset on {len(reg.unit_sets)} layers, "
          f"{reg.norms.n_units} units, strength {strength:g}")

    # 2. train: the paper's optimiser and schedule, penalty added to the loss, per-epoch clipping
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    milestones = [round(args.epochs * 120 / 179), round(args.epochs * 160 / 179)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    with C.timed("train", times):
        for epoch in range(args.epochs):
            model.train()
            loader = batches(xtr, ytr, args.batch_size, train=True, seed=args.seed + epoch)
            for step, (xb, yb) in enumerate(etp_fx.progress(loader, reg, model,
                                                              desc=f"epoch {epoch}",
                                                              disable=args.smoke)):
                x = prepare(xb, args.image_size, True, device)
                task = F.cross_entropy(model(x), yb.to(device))
                loss = task + reg(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if args.steps and step + 1 >= args.steps:
                    break
            sched.step()
            zeros = etp_fx.clip_small_weights(model, 5e-4, reg)  # the official clipping
            C.log_epoch(epoch, "task loss", task, reg, model, extra=f"{zeros:,} zero weights, ")

    # 3. compress: the paper preset penalises output rows only, so select on those (units=)
    model.eval()
    how = C.target(args, default={"threshold": 0.0})  # paper: every weight of the unit is zero
    with C.timed("compress", times):
        small = etp_fx.compress(model, example, graph=graph, units="producer", **how)

    # 4. evaluate and report
    with C.timed("evaluate", times):  # the compressed model has no train mode
        acc = (accuracy(model, xte, yte, args.image_size, args.batch_size, device),
               accuracy(small, xte, yte, args.image_size, args.batch_size, device))
    metrics = [("top-1 accuracy %", *acc)]
    return C.publish(args, "vgg19_cifar100", small, metrics, times,
                     {"selection": how, "strength": strength})


if __name__ == "__main__":
    main()
