"""ResNet-50 on an ImageNet-style image folder, trained with ETP and compressed with etp_fx.

What it shows
    ``etp_fx.trace`` on torchvision's ResNet-50 finds the coupled channel groups: the
    residual stream of each stage is one group (every block's last conv, its BatchNorm and
    the downsample branch are pruned together), plus the two inner widths of every bottleneck.
    ``etp_fx.ExponentialTorque(graph, target_macs=..., steps=...)`` (the MACs target drives
    the strength: nothing to tune; ``--strength`` fixes it instead) is added to the loss in an
    ordinary training loop shown with ``etp_fx.progress`` (live strength and mass left);
    ``etp_fx.NormHistory`` records every unit's norm per epoch and ``etp_fx.plot_norms``
    draws the paper's "norms over training" figure. ``etp_fx.compress(target_macs=...)`` then
    removes the weakest units down to the MACs budget, and the script prints accuracy,
    parameters and MACs before and after, and saves the small model as ``model.pt2``.

Run it on the real data
    An ImageNet-style folder: ``DATA/train/<class>/*.JPEG`` and ``DATA/val/<class>/*.JPEG``
    (torchvision's ``ImageFolder`` layout; ImageNet's validation images sorted into class
    folders)::

        python examples/resnet50_imagenet.py --data ~/data/imagenet --epochs 90 --out r50-out

    The recipe is the usual one (SGD lr 0.1, momentum 0.9, weight decay 1e-4, cosine
    schedule, 224x224 crops); on one GPU it takes days, so try ``--epochs`` and
    ``--max-steps`` first.

Smoke test (offline, seconds)::

    python examples/resnet50_imagenet.py --smoke

    writes a tiny image folder (3 classes of random PNGs), reads it with ``ImageFolder`` at
    32x32, and uses the ResNet-50 bottleneck design with one block per stage
    (``--layers 1,1,1,1``) instead of ``3,4,6,3``: compressing the full ResNet-50 alone takes
    about 15 s on 2 CPU cores.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from torchvision.models.resnet import Bottleneck, ResNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import etp_fx  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def loaders(root: Path, size: int, batch_size: int, workers: int):
    """Train and validation loaders over ``root/train`` and ``root/val`` (ImageFolder)."""
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val_tf = transforms.Compose([transforms.Resize(int(size * 8 / 7)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = torchvision.datasets.ImageFolder(str(root / "train"), train_tf)
    val = torchvision.datasets.ImageFolder(str(root / "val"), val_tf)
    mk = lambda ds, shuffle: torch.utils.data.DataLoader(  # noqa: E731
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=shuffle)
    return mk(train, True), mk(val, False), train.classes


def write_fake_image_folder(root: Path, classes: int = 3, per_class: int = 8, side: int = 40,
                            seed: int = 0) -> Path:
    """A tiny ImageFolder of random PNGs whose mean colour depends on the class (``--smoke``)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 128, (side, side, 3)) + 100 * np.eye(3)[c % 3]
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    """Top-1 accuracy in percent (call ``model.eval()`` first where the model has a train mode)."""
    correct = total = 0
    for x, y in loader:
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def main(argv: list[str] | None = None) -> dict:
    p = C.parser(__doc__, data_help="ImageFolder root with train/ and val/", epochs=90,
                 lr=0.1, batch_size=256, strength=None, target_macs=0.5)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--layers", default="3,4,6,3", help="bottleneck blocks per stage")
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many")
    args = C.finish_args(p.parse_args(argv), "resnet50_imagenet")
    C.limit_threads(args.smoke)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    times: dict[str, float] = {}
    if args.smoke:
        root = write_fake_image_folder(C.smoke_dir(args), seed=args.seed)
        args.image_size, args.layers, args.batch_size, args.epochs = 32, "1,1,1,1", 8, 2
        args.lr = 0.02
    else:
        root = Path(args.data).expanduser()
    train_loader, val_loader, classes = loaders(root, args.image_size, args.batch_size,
                                                args.workers)
    print(f"{root}: {len(train_loader.dataset)} training images, {len(classes)} classes")

    # 1. the model (torchvision's ResNet class; 3,4,6,3 Bottleneck blocks is resnet50)
    layers = [int(n) for n in args.layers.split(",")]
    model = ResNet(Bottleneck, layers, num_classes=len(classes)).to(device)
    example = torch.randn(1, 3, args.image_size, args.image_size, device=device)
    with C.timed("trace", times):
        graph = etp_fx.trace(model, example)
    # the MACs target drives the strength over the run's steps (--strength fixes it instead)
    steps = args.epochs * min(len(train_loader), args.max_steps or len(train_loader))
    reg = C.regulariser(args, graph, steps)
    history = etp_fx.NormHistory(reg)
    print(f"traced ResNet{layers}: {len(graph.groups)} groups, "
          f"{sum(g.size for g in graph.groups):,} units, barriers: {graph.barriers or 'none'}")

    # 2. train with the penalty added to the loss
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs)
    with C.timed("train", times):
        for epoch in range(args.epochs):
            model.train()
            bar = etp_fx.progress(train_loader, reg, model, desc=f"epoch {epoch}",
                                  disable=args.smoke)
            for step, (x, y) in enumerate(bar):
                task = F.cross_entropy(model(x.to(device)), y.to(device))
                loss = task + reg(model, loss=task)  # the task loss lets the strength back off
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if args.max_steps and step + 1 >= args.max_steps:
                    break
            sched.step()
            history.record(model, epoch)
            C.log_epoch(epoch, "task loss", task, reg, model)
    print(C.describe(reg))

    # 3. compress to the MACs budget (units ranked by norm per MAC saved)
    model.eval()
    how = C.target(args)
    with C.timed("compress", times):
        small = etp_fx.compress(model, example, graph=graph, **how)

    # 4. report
    with C.timed("evaluate", times):
        acc = accuracy(model, val_loader, device), accuracy(small, val_loader, device)
    metrics = [("top-1 accuracy %", *acc)]
    # the paper's figure; by default the 4 widest groups (one line per unit: the smoke run
    # draws the 2 narrowest, since thousands of lines take matplotlib a while)
    narrow = sorted(history.ids, key=lambda gid: history.array(gid).shape[1])[:2]
    with C.timed("plot", times):
        etp_fx.plot_norms(history, str(args.out / "norms.png"),
                          groups=narrow if args.smoke else None)
    print(f"wrote {args.out / 'norms.png'}")
    return C.publish(args, "resnet50_imagenet", small, metrics, times,
                     {"layers": layers, "selection": how})


if __name__ == "__main__":
    main()
