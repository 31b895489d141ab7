"""Target-driven ETP vs a fixed strength vs magnitude pruning, on small offline tasks.

For each task, optimiser and MACs target (4x, 8x) it trains a fresh model

- ``target``: ``ExponentialTorque(graph, target_macs=1/x, steps=N)``: the target drives the
  strength, nothing tuned;
- ``torque-target``: the same with the linear force (``Torque``);
- ``target-decoupled``: the ``target`` regulariser as a decoupled proximal update
  (``reg.attach(optimizer, model)`` and ``reg.observe(task_loss)``; no loss term);
- ``fixed``: ``ExponentialTorque(graph, strength=2)`` (the strength the demo and the quality
  benchmark use);
- ``magnitude``: no regulariser (dense training), then the same budget selection on the
  trained weights;

then ``etp_fx.compress(model, x, target_macs=1/x)`` and measures held-out accuracy after
training (dense), after compressing (before fine-tuning) and after a short fine-tune (the
trained model with the same units zeroed whole and held at zero, BatchNorm in training mode,
which is what the compressed model computes; fine-tuning the compressed graph itself runs its
BatchNorm on frozen statistics, where the tiny weights a penalty leaves blow the gradients
up). One JSON line per run goes to ``--out`` (runs already there are skipped, so
an interrupted sweep resumes).

    python examples/measure/target_strength.py --tasks vgg-digits cnn1d-mnist1d --seeds 0 1

Data: scikit-learn's bundled digits (no download) and MNIST-1D from the ``mnist1d`` package's
generator (no download; cached in ``.cache/mnist1d.pt``). One intra-op thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import etp_fx  # noqa: E402
from etp_fx.demo import SmallVGG, digits  # noqa: E402
from etp_fx.surgery.zero import zeroed_slices  # noqa: E402


class CNN1D(nn.Module):
    """A 1-D CNN with BatchNorm for MNIST-1D (inputs of length 40)."""

    def __init__(self, widths=(32, 64, 64), hidden: int = 128, length: int = 40) -> None:
        super().__init__()
        layers, c = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv1d(c, w, 5 if i == 0 else 3, 1 if i == 0 else 2,
                                 padding=2 if i == 0 else 1), nn.BatchNorm1d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * (length // 4), hidden),
                                        nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def mnist1d() -> tuple[torch.Tensor, ...]:
    path = ROOT / ".cache" / "mnist1d.pt"
    if path.exists():
        return torch.load(path)
    from mnist1d.data import get_dataset_args, make_dataset
    d = make_dataset(get_dataset_args())
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    out = (t(d["x"], torch.float32).unsqueeze(1), t(d["y"], torch.long),
           t(d["x_test"], torch.float32).unsqueeze(1), t(d["y_test"], torch.long))
    path.parent.mkdir(exist_ok=True)
    torch.save(out, path)
    return out


TASKS = {  # data, model, epochs, fine-tune epochs
    "vgg-digits": (lambda: digits(16, 0), lambda: SmallVGG(image_size=16), 15, 2),
    "cnn1d-mnist1d": (mnist1d, CNN1D, 10, 2),
}
# (train lr, fine-tune lr); "-const": no cosine decay (the hard case for a controller: an L1
# subgradient keeps dead weights oscillating at an amplitude that does not shrink)
OPTIMISERS = {"sgd": (0.05, 0.01), "adam": (3e-3, 1e-3), "sgd-const": (0.05, 0.01),
              "adam-const": (3e-3, 1e-3)}


def make_opt(name: str, params, lr: float, steps: int):
    if name.startswith("adam"):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name.endswith("-const"):
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))


def batches(x, y, epoch: int, seed: int, batch: int = 64):
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(y), generator=g)
    for i in range(0, len(y) - batch + 1, batch):
        idx = perm[i:i + batch]
        yield x[idx], y[idx]


def train(model, x, y, *, epochs: int, opt_name: str, lr: float, seed: int, reg=None,
          after_step=None, decoupled: bool = False):
    n = len(y) // 64
    opt, sched = make_opt(opt_name, [p for p in model.parameters() if p.requires_grad], lr,
                          epochs * n)
    if decoupled:  # the penalty as a proximal step after opt.step(), not in the loss
        reg.attach(opt, model)
    torch.manual_seed(seed)
    if hasattr(model, "train") and not hasattr(model, "_in_spec"):
        model.train()
    for epoch in range(epochs):
        for xb, yb in batches(x, y, epoch, seed):
            loss = F.cross_entropy(model(xb), yb)
            if decoupled:
                reg.observe(loss)
            elif reg is not None:  # the task loss lets a target-driven strength back off
                loss = loss + reg(model, loss=loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
    return model


def masks_for(model, graph, plan) -> dict[str, torch.Tensor]:
    """0/1 masks of the slices a plan zeroes whole (to hold them at zero while fine-tuning)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    masks: dict[str, torch.Tensor] = {}
    for name, dim, idx in zeroed_slices(graph, plan, False, params):
        masks.setdefault(name, torch.ones_like(params[name])).index_fill_(dim, idx, 0.0)
    return masks


def finetune_masked(model, graph, plan, x, y, *, epochs: int, opt_name: str, lr: float,
                    seed: int):
    etp_fx.zero_units(model, graph, plan)
    masks = masks_for(model, graph, plan)
    params = dict(model.named_parameters(remove_duplicate=False))

    @torch.no_grad()
    def hold(_):
        for name, m in masks.items():
            params[name].mul_(m)
    train(model, x, y, epochs=epochs, opt_name=opt_name, lr=lr, seed=seed, after_step=hold)
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    if not hasattr(model, "_in_spec"):
        model.eval()
    return 100.0 * float((model(x).argmax(1) == y).float().mean())


def build_reg(method: str, graph, target: float, steps: int, control: dict | None):
    if method == "fixed":
        return etp_fx.ExponentialTorque(graph, strength=2.0)
    cls = etp_fx.Torque if method == "torque-target" else etp_fx.ExponentialTorque
    if method == "target-decoupled":
        method = "target"
    if method == "target-noknee":
        control = {**(control or {}), "knee": False}
    return cls(graph, target_macs=target, steps=steps, control=control)


def run(task: str, opt_name: str, method: str, speedup: float, seed: int,
        control: dict | None = None) -> dict:
    data, build, epochs, ft_epochs = TASKS[task]
    xtr, ytr, xte, yte = data()
    lr, ft_lr = OPTIMISERS[opt_name]
    torch.manual_seed(seed)
    model = build()
    example = xtr[:2]
    graph = etp_fx.trace(model, example)
    steps = epochs * (len(ytr) // 64)
    reg = None if method == "magnitude" else build_reg(method, graph, 1 / speedup, steps,
                                                       control)
    t0 = time.time()
    out = {"task": task, "opt": opt_name, "method": method, "speedup": speedup, "seed": seed,
           "control": control, "steps": steps}
    try:
        train(model, xtr, ytr, epochs=epochs, opt_name=opt_name, lr=lr, seed=seed, reg=reg,
              decoupled=method == "target-decoupled")
    except FloatingPointError as e:  # the penalty's finite check: training diverged
        out.update(diverged=str(e)[:200], acc_trained=None, acc_compressed=None,
                   acc_finetuned=None)
        return out
    out.update(acc_trained=accuracy(model, xte, yte), train_s=round(time.time() - t0, 1))
    if reg is not None and reg.controller is not None:
        h = reg.controller.history
        out["strength_final"] = h[-1].strength
        out["strength_max"] = max(s.strength for s in h)
        out["left_final"] = h[-1].left
        out["kept_final"] = h[-1].kept
        out["trace"] = [(s.step, round(s.strength, 4), round(s.left, 4), round(s.goal, 4),
                         round(s.kept, 3)) for s in h[:: max(1, len(h) // 12)]]
    small = etp_fx.compress(model.eval(), example, target_macs=1 / speedup, graph=graph)
    rep = small.meta["etp_report"]
    out["macs_speedup"] = rep["macs_before"] / rep["macs_after"]
    out["acc_compressed"] = accuracy(small, xte, yte)
    plan = {gid: g["removed"] for gid, g in rep["groups"].items()}
    finetune_masked(model, graph, plan, xtr, ytr, epochs=ft_epochs, opt_name=opt_name,
                    lr=ft_lr, seed=seed + 100)
    out["acc_finetuned"] = accuracy(model, xte, yte)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--opts", nargs="+", default=list(OPTIMISERS))
    p.add_argument("--methods", nargs="+",
                   default=["target", "target-noknee", "fixed", "magnitude",
                            "torque-target", "target-decoupled"])
    p.add_argument("--speedups", nargs="+", type=float, default=[4.0, 8.0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--control", default=None, help="JSON dict of controller options")
    p.add_argument("--out", default="target_strength.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ETP_THREADS", "1")))
    control = json.loads(args.control) if args.control else None
    done = set()
    if os.path.exists(args.out):
        for line in open(args.out):
            r = json.loads(line)
            done.add((r["task"], r["opt"], r["method"], r["speedup"], r["seed"],
                      json.dumps(r.get("control"), sort_keys=True)))
    for task in args.tasks:
        for opt in args.opts:
            for sp in args.speedups:
                for method in args.methods:
                    for seed in args.seeds:
                        ctl = control if "target" in method else None
                        key = (task, opt, method, sp, seed, json.dumps(ctl, sort_keys=True))
                        if key in done:
                            continue
                        r = run(task, opt, method, sp, seed, ctl)
                        print(json.dumps({k: v for k, v in r.items() if k != "trace"}),
                              flush=True)
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
