"""The protocol: for each (task, method, seed) train E epochs with the method's regulariser
(none for magnitude), then for each target MACs speed-up prune a copy to it, fine-tune F
epochs, compress (ours) and evaluate. Every method gets E + F epochs per target, the same
optimiser, data order and seeds. Each finished run is appended to ``runs.json`` at once, so an
interrupted run resumes where it stopped."""
from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import etp_fx
from . import methods as M


@dataclass
class Budget:
    """Epochs, seeds and targets of one mode."""

    epochs: int = 8               # E: training with the regulariser (or dense for magnitude)
    finetune: int = 2             # F: after pruning, per target
    seeds: tuple = (0, 1, 2)
    targets: tuple = (2, 4, 8)    # MACs speed-ups
    max_batches: int | None = None  # cap on batches per epoch (quick mode)
    strength: float = 2.0         # ETP / Torque strength (normalised: an L1 decay rate)
    sweep_strengths: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)
    sweep_pivots: tuple = ("index", "importance", "index-both-ends")
    sweep_targets: tuple = (4, 8)
    sweep_task: str = "vgg-digits"
    latency_repeats: int = 30


FULL = Budget()
QUICK = Budget(epochs=1, finetune=1, seeds=(0,), targets=(2, 4), max_batches=6,
               sweep_strengths=(2.0, 8.0), sweep_pivots=("index",), sweep_targets=(4,),
               latency_repeats=5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- training --------------------------------------------------------------------------------

def train(model, task, *, epochs: int, lr: float, seed: int, trainer=None, masks=None,
          epoch_offset: int = 0, max_batches: int | None = None) -> None:
    """SGD (momentum 0.9, weight decay 5e-4) or AdamW, cosine schedule per step; the trainer's
    penalty joins the loss, its ``regularize`` runs after backward; masks keep pruned units at 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if task.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    n = sum(1 for _ in task.batches(0, seed))
    n = min(n, max_batches) if max_batches else n
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * n))
    torch.manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(task.batches(epoch + epoch_offset, seed)):
            if max_batches and i >= max_batches:
                break
            loss = task.loss(model, x, y)
            if trainer is not None:
                loss = loss + trainer.penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if trainer is not None:
                trainer.regularize(model)
            opt.step()
            sched.step()
            if masks:
                M.apply_masks(model, masks)
        if trainer is not None:
            trainer.epoch_end(model)
    model.eval()


def latency_ms(model, example, repeats: int) -> float:
    """Median wall time (ms) of one forward pass at batch 1, after warm-up."""
    if hasattr(model, "eval") and not hasattr(model, "_in_spec"):
        model.eval()
    times = []
    with torch.no_grad():
        for _ in range(3):
            model(*example)
        for _ in range(repeats):
            t = time.perf_counter()
            model(*example)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


# --- the results file ------------------------------------------------------------------------

class Store:
    """``runs.json``: ``{key: record}``, rewritten atomically after every record."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path) as f:
                self.runs = json.load(f)

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def add(self, key: str, rec: dict) -> None:
        self.runs[key] = rec
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.runs, f, indent=1)
        os.replace(tmp, self.path)


def key_of(task: str, method: str, seed: int, target: float) -> str:
    return f"{task}|{method}|{seed}|{target}"


# --- one (task, method, seed) ----------------------------------------------------------------

def skip_reason(task, method: str) -> str | None:
    """Combinations not run, with the reason (stated in the report)."""
    if task.name == "llama-stdlib" and method in ("greg", "groupnorm"):
        return ("torch-pruning prunes the Llama residual width (embeddings, RMSNorm) rather than "
                "heads and MLP neurons unless configured per model; not set up here")
    return None


def run_method(task, method: str, seed: int, budget: Budget, store: Store, *, label: str | None = None,
               reg_kw: dict | None = None, targets: tuple | None = None, sweep: bool = False) -> None:
    """Train once, then prune/fine-tune/evaluate at each target; records go to ``store``."""
    label = label or method
    targets = () if method == "dense" else (targets or budget.targets)
    keys = [key_of(task.name, label, seed, t) for t in (1,) + tuple(targets)]
    if all(k in store for k in keys):
        return
    t0 = time.time()
    model = task.build(seed)
    graph = etp_fx.trace(model, task.example)
    dense_macs = int(graph.cost.macs())
    kw = {"strength": budget.strength, **(reg_kw or {})}
    trainer = M.make_trainer(method, model, graph, task, **kw)
    # "dense": the unpruned reference, trained the whole E + F budget without a regulariser
    epochs = budget.epochs + (budget.finetune if method == "dense" else 0)
    train(model, task, epochs=epochs, lr=task.lr, seed=seed, trainer=trainer,
          max_batches=budget.max_batches)
    base = dict(task=task.name, method=label, base_method=method, seed=seed, sweep=sweep,
                metric_name=task.metric_name, dense_macs=dense_macs, epochs=budget.epochs,
                finetune=budget.finetune, reg=kw if method in M.OURS else {})
    trained_metric = task.metric(model)
    store.add(keys[0], dict(base, target=1, macs=dense_macs, speedup=1.0, metric=trained_metric,
                            metric_pruned=trained_metric, finetune=0,
                            latency_ms=latency_ms(model, task.example, budget.latency_repeats),
                            seconds=time.time() - t0))
    log(f"{task.name} {label} seed {seed}: trained {epochs} epochs, "
        f"{task.metric_name} {trained_metric:.3f} ({time.time() - t0:.0f} s)")
    ours_pruning = method in M.OURS or (method == "magnitude" and task.name == "llama-stdlib")
    for target, key in zip(targets, keys[1:]):
        if key in store:
            continue
        t1 = time.time()
        rec = dict(base, target=target)
        try:
            m = copy.deepcopy(model)
            if ours_pruning:
                plan, masks = M.prune_ours(m, graph, target, units=trainer.units)
            else:
                m, masks = M.prune_torch_pruning(method, m, task.example, target, dense_macs), None
            rec["metric_pruned"] = task.metric(m)
            train(m, task, epochs=budget.finetune, lr=task.ft_lr, seed=seed, masks=masks,
                  epoch_offset=1000, max_batches=budget.max_batches)
            if ours_pruning:
                final, macs = M.finalize_ours(m, graph, plan, task.example)
            else:
                final, macs = m, M.macs_of(m, task.example)
            rec.update(macs=macs, speedup=dense_macs / macs, metric=task.metric(final),
                       latency_ms=latency_ms(final, task.example, budget.latency_repeats))
        except Exception as e:  # an unreachable budget or a failing pruner is a result too
            rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        rec["seconds"] = time.time() - t1
        store.add(key, rec)
        if "error" in rec:
            log(f"  {target}x: FAILED {rec['error'][:160]}")
        else:
            log(f"  {target}x: reached {rec['speedup']:.2f}x, {task.metric_name} "
                f"{rec['metric_pruned']:.3f} pruned -> {rec['metric']:.3f} fine-tuned, "
                f"{rec['latency_ms']:.2f} ms ({rec['seconds']:.0f} s)")


def sweep_configs(budget: Budget) -> list[tuple[str, dict]]:
    """The strength and pivot sweep of ETP (our defaults otherwise)."""
    out = [(f"etp s={s:g}", dict(strength=s)) for s in budget.sweep_strengths]
    piv = {"index": dict(distance="index"), "importance": dict(distance="importance"),
           "index-both-ends": dict(distance="index", pivots=[0, -1])}
    out += [(f"etp pivots={p}", piv[p]) for p in budget.sweep_pivots]
    return out


def run_all(tasks, method_names, budget: Budget, store: Store, sweep: bool = True,
            dense: bool = True) -> None:
    from tqdm.auto import tqdm
    # seed-major order: a run stopped early still has every task and method at seed 0
    jobs = []
    sweep_task = next((t for t in tasks if t.name == budget.sweep_task), None)
    for i, s in enumerate(budget.seeds):
        jobs += [(t, m, s, None, None) for t in tasks for m in (["dense"] if dense else []) + list(method_names)
                 if skip_reason(t, m) is None]
        if i == 0 and sweep and sweep_task is not None:
            jobs += [(sweep_task, "etp", s, label, kw) for label, kw in sweep_configs(budget)]
    for task, method, seed, label, kw in tqdm(jobs, desc="quality benchmark", file=sys.stderr):
        if label is None:
            run_method(task, method, seed, budget, store)
        else:
            run_method(task, method, seed, budget, store, label=label, reg_kw=kw,
                       targets=budget.sweep_targets, sweep=True)
