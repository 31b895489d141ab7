"""``etp-fx demo``: train a small CNN on scikit-learn's bundled digits with ETP, compress it,
and show what changed. Everything runs offline in about a minute on 2 CPUs.

By default the MACs target (a quarter of the dense model's) drives the ETP strength over the
training steps, and ``compress`` removes the units that target names: nothing to tune.
``DemoConfig(strength=...)`` (``--strength``) fixes the strength instead, the expert way."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .graph.trace import trace
from .io import save
from .regularise.torque import ExponentialTorque
from .regularise.training import NormHistory, plot_norms
from .render import write_html, write_svg
from .surgery.compress import compress

__all__ = ["DemoConfig", "digits", "SmallVGG", "train", "evaluate", "latency_ms", "run_demo"]


DEFAULT_TARGET_MACS = 0.25


@dataclass
class DemoConfig:
    """What the demo trains and how. ``strength=None`` (default): the MACs target
    (``target_macs``, default 0.25) drives the strength; a number fixes it, and the model is
    then compressed by ``threshold`` (relative) unless ``target_macs`` is given."""

    epochs: int = 20
    strength: float | None = None
    threshold: float = 0.02  # relative to the group's largest unit norm (fixed strength only)
    target_macs: float | None = None  # share of MACs to keep (default 0.25 when target-driven)
    out: str = "etp-demo-out"
    seed: int = 0
    batch_size: int = 64
    lr: float = 0.05
    image_size: int = 16


def digits(image_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), upsampled to
    ``image_size`` and split 80/20 with a fixed seed: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n = int(0.8 * len(y))
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


class SmallVGG(nn.Module):
    """A VGG-style CNN with BatchNorm: four 3x3 conv layers, two pools, a two-layer head."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64), hidden: int = 128,
                 classes: int = 10, image_size: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** (len(widths) // 2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(),
                                        nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def evaluate(model: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    """Top-1 accuracy in percent (the model is called in eval mode where it has one)."""
    exported = hasattr(model, "_in_spec")  # a compressed module: it has no train/eval switch
    was = getattr(model, "training", False) and not exported
    if not exported:
        model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    if was:
        model.train()
    return 100.0 * correct / len(y)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, reg: Any = None,
          lr: float = 0.05, batch_size: int = 64, seed: int = 0, history: Any = None,
          progress: bool = True, clip: float | None = None) -> nn.Module:
    """SGD with momentum and a cosine schedule. A target-driven ``reg`` is attached to the
    optimiser (a proximal step after each ``opt.step()``, the recommended form); a fixed
    strength's ``reg(model)`` is added to the loss."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    attached = reg is not None and getattr(reg, "target", None) is not None
    if attached:
        reg.attach(opt, model)
    bar = tqdm(range(epochs), desc="training", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if attached:
                reg.observe(loss)
            penalty = reg(model, loss=loss) if reg is not None and not attached \
                else torch.zeros(())
            opt.zero_grad(set_to_none=True)
            (loss + penalty).backward()
            opt.step()
        sched.step()
        if clip is not None:  # the official code's per-epoch clipping of tiny weights
            with torch.no_grad():
                for p in model.parameters():
                    p.masked_fill_(p.abs() < clip, 0.0)
        if history is not None:
            history.record(model, epoch)
        post = {"loss": f"{loss.item():.3f}"}
        if not attached:
            post["penalty"] = f"{float(penalty.detach()):.3g}"
        if reg is not None and hasattr(reg, "near_zero"):
            post["near-zero units"] = reg.near_zero(model)
        if getattr(reg, "left", None) is not None:  # the target drives the strength
            post["strength"], post["mass left"] = f"{reg.strength:.3g}", f"{reg.left:.1%}"
        bar.set_postfix(post)
    if attached:
        reg.detach()
    model.eval()
    return model


def latency_ms(model: Any, x: torch.Tensor, repeats: int = 30) -> float:
    """Median wall time of one forward pass in milliseconds (after warm-up)."""
    with torch.no_grad():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    return 1000 * times[len(times) // 2]


def _table(rows: list[tuple[str, str, str]]) -> str:
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Train with ETP, compress, report, write files, reload in a fresh process."""

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    xtr, ytr, xte, yte = digits(cfg.image_size, cfg.seed)
    model = SmallVGG(image_size=cfg.image_size)
    example = xtr[:1]
    graph = trace(model, example)
    log(f"traced SmallVGG: {len(graph.groups)} groups of coupled channels, "
        f"{sum(g.size for g in graph.groups)} units")
    reg, how = _regulariser(cfg, graph, -(-len(ytr) // cfg.batch_size) * cfg.epochs)
    history = NormHistory(reg)
    t0 = time.time()
    train(model, xtr, ytr, epochs=cfg.epochs, reg=reg, lr=cfg.lr, batch_size=cfg.batch_size,
          seed=cfg.seed, history=history)
    log(f"trained {cfg.epochs} epochs with ETP ({_strength_line(reg)}) in "
        f"{time.time() - t0:.0f} s")
    small = compress(model, example, graph=graph, **how)
    rep = small.meta["etp_report"]
    acc0, acc1 = evaluate(model, xte, yte), evaluate(small, xte, yte)
    # batch 1 shows per-call overhead (a Python call per op either way); a full test batch
    # shows what the smaller tensors buy
    batch = xte[:256]
    lat0, lat1 = latency_ms(model, example), latency_ms(small, example)
    latb0, latb1 = latency_ms(model, batch, repeats=10), latency_ms(small, batch, repeats=10)
    rows = [("", "trained (dense)", "compressed"),
            ("params", f"{rep['params_before']:,}", f"{rep['params_after']:,}"),
            ("MACs", f"{rep['macs_before']:,}", f"{rep['macs_after']:,}"),
            ("test accuracy %", f"{acc0:.2f}", f"{acc1:.2f}"),
            ("CPU latency ms (batch 1)", f"{lat0:.3f}", f"{lat1:.3f}"),
            (f"CPU latency ms (batch {len(batch)})", f"{latb0:.2f}", f"{latb1:.2f}")]
    log(_table(rows))
    log(f"MACs speed-up {rep['macs_before'] / rep['macs_after']:.1f}x, "
        f"params {rep['params_before'] / rep['params_after']:.1f}x smaller")
    save(small, out / "model.pt2")
    plot_norms(history, out / "norms.png")
    plan = {gid: g["removed"] for gid, g in rep["groups"].items()}
    try:
        write_svg(graph, out / "groups.svg", removed=plan)
        write_html(graph, out / "groups.html", removed=plan)
    except ImportError:  # pragma: no cover - render is optional
        pass
    torch.save({"x": xte, "y": yte}, out / "test_set.pt")
    summary = {"accuracy_dense": acc0, "accuracy_compressed": acc1, "latency_ms_dense": lat0,
               "latency_ms_compressed": lat1, "batch_latency_ms_dense": latb0,
               "batch_latency_ms_compressed": latb1, "latency_batch": len(batch), **{k: v for k, v in rep.items() if k != "groups"},
               "groups": {k: {kk: vv for kk, vv in v.items() if kk != "removed"}
                          for k, v in rep["groups"].items()},
               "selection": how, "strength_final": reg.strength, "mass_left": reg.left}
    reloaded = _reload_in_fresh_process(out)
    log(f"reloaded {out / 'model.pt2'} in a fresh process: test accuracy {reloaded:.2f}%")
    summary["accuracy_reloaded"] = reloaded
    (out / "report.json").write_text(json.dumps(summary, indent=1))
    log(f"wrote {out}/: model.pt2, norms.png, groups.svg, groups.html, report.json")
    return summary


def _regulariser(cfg: DemoConfig, graph, steps: int) -> tuple[ExponentialTorque, dict]:
    """The regulariser and the matching ``compress`` selection: target-driven unless
    ``cfg.strength`` fixes the strength."""
    if cfg.strength is None:
        target = {"target_macs": cfg.target_macs or DEFAULT_TARGET_MACS}
        return ExponentialTorque(graph, steps=steps, **target), target
    reg = ExponentialTorque(graph, strength=cfg.strength)
    if cfg.target_macs is not None:
        return reg, {"target_macs": cfg.target_macs}
    return reg, {"threshold": cfg.threshold, "relative": True}


def _strength_line(reg: ExponentialTorque) -> str:
    if reg.controller is None:
        return f"strength {reg.strength:g}"
    last = reg.controller.last
    return (f"strength driven by the target {reg.target.share:.0%} of the MACs: ended at "
            f"{last.strength:.3g}, peak {max(h.strength for h in reg.controller.history):.3g},"
            f" {last.left:.2%} of the unit-norm mass left in the units it removes")


def _reload_in_fresh_process(out: Path) -> float:
    code = ("import torch, etp_fx; m = etp_fx.load(%r); d = torch.load(%r);"
            "print(100.0 * float((m(d['x']).argmax(1) == d['y']).float().mean()))"
            % (str(out / "model.pt2"), str(out / "test_set.pt")))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"reloading {out / 'model.pt2'} in a fresh process failed:\n{res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])
