"""The protocol: for each (task, method, seed) train E epochs with the method's regulariser
(none for magnitude), then for each target MACs speed-up prune a copy to it, fine-tune F
epochs, compress (ours) and evaluate. Methods whose regulariser aims at the target (target-driven
ETP and Torque, GReg) train one fresh model per target; the others train once and prune that
model at every target. Every method thus gets E + F epochs per target, the same optimiser,
data order and seeds.

Each finished cell is merged into ``runs.json`` at once under a file lock, so an interrupted run
resumes where it stopped and several processes (split by ``--tasks``) can share one folder."""
from __future__ import annotations

import copy
import fcntl
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
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
    targets: tuple = (4, 8)       # MACs speed-ups (the issue judges 4x and 8x)
    max_batches: int | None = None  # cap on batches per epoch (quick mode)
    # the fixed-strength sweep of ETP (off by default, --sweep): strength is no user setting now
    sweep_strengths: tuple = (0.5, 1.0, 2.0, 4.0, 8.0)
    sweep_pivots: tuple = ("index", "importance", "index-both-ends")
    sweep_targets: tuple = (4, 8)
    sweep_task: str = "vgg-digits"
    latency_repeats: int = 30


FULL = Budget()
QUICK = Budget(epochs=1, finetune=1, seeds=(0,), targets=(4, 8), max_batches=6,
               sweep_strengths=(2.0, 8.0), sweep_pivots=("index",), sweep_targets=(4,),
               latency_repeats=5)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- training --------------------------------------------------------------------------------

def batches_per_epoch(task, seed: int, max_batches: int | None) -> int:
    n = sum(1 for _ in task.batches(0, seed))
    return min(n, max_batches) if max_batches else n


def make_optimizer(model, task, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, weight decay 5e-4) or AdamW (weight decay 0.01)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if task.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def train(model, task, *, epochs: int, lr: float, seed: int, trainer=None, masks=None,
          epoch_offset: int = 0, max_batches: int | None = None) -> None:
    """The task's optimiser with a cosine schedule per step; the trainer's regulariser joins
    the loss (or steps after the optimiser, decoupled form) and its ``after_backward`` runs
    after backward; masks keep pruned units at 0."""
    trainer = trainer or M.Trainer("none")
    opt = make_optimizer(model, task, lr)
    n = batches_per_epoch(task, seed, max_batches)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * n))
    torch.manual_seed(seed)
    trainer.start(opt)
    try:
        for epoch in range(epochs):
            model.train()
            for i, (x, y) in enumerate(task.batches(epoch + epoch_offset, seed)):
                if max_batches and i >= max_batches:
                    break
                loss = trainer.loss(model, task.loss(model, x, y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                trainer.after_backward(model)
                opt.step()
                sched.step()
                if masks:
                    M.apply_masks(model, masks)
            trainer.epoch_end(model)
    finally:
        trainer.stop()
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

@contextmanager
def locked(path: str):
    """An exclusive lock on the folder of ``path`` (processes sharing an out folder); a lock
    on the folder itself leaves no lock file behind."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def write_json(path: str, data: dict) -> None:
    """Atomically (a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class Store:
    """``runs.json``: ``{key: record}``. Every :meth:`add` re-reads the file under a lock and
    merges its record in, so processes writing the same folder keep each other's cells."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.runs: dict[str, dict] = read_json(path)

    def __contains__(self, key: str) -> bool:
        return key in self.runs

    def add(self, key: str, rec: dict) -> None:
        with locked(self.path):
            self.runs = {**read_json(self.path), key: rec}
            write_json(self.path, self.runs)

    def reload(self) -> dict[str, dict]:
        with locked(self.path):
            self.runs = read_json(self.path)
        return self.runs


def key_of(task: str, method: str, seed: int, target: float) -> str:
    return f"{task}|{method}|{seed}|{target}"


# --- one (task, method, seed) ----------------------------------------------------------------

def run_method(task, method: str, seed: int, budget: Budget, store: Store, *,
               label: str | None = None, reg_kw: dict | None = None,
               targets: tuple | None = None, sweep: bool = False) -> None:
    """Train and prune one (task, method, seed): a fresh training per target for the methods
    whose regulariser aims at the target (:data:`methods.PER_TARGET`), else one training
    pruned at every target. Records go to ``store``."""
    label = label or method
    targets = () if method == "dense" else tuple(targets or budget.targets)
    if method in M.PER_TARGET and not reg_kw:
        for t in targets:
            train_and_prune(task, method, seed, budget, store, label, (t,), aim=t)
    else:
        train_and_prune(task, method, seed, budget, store, label, targets, reg_kw=reg_kw,
                        sweep=sweep)


def build_trainer(task, method: str, budget: Budget, model, graph, dense_macs: int,
                  aim: float | None, reg_kw: dict | None, seed: int) -> tuple[M.Trainer, dict]:
    """The method's trainer and what to record about its setting. With ``aim`` (a target):
    our regularisers get the target's Budget and the step count, GReg the ratio reaching it."""
    if aim is None:
        return M.make_trainer(method, model, graph, task, **(reg_kw or {})), dict(reg_kw or {})
    if method == "greg":
        _, ratio = M.prune_torch_pruning(method, model, task.example, aim, dense_macs,
                                         task.heads_and_neurons)
        return M.make_trainer(method, model, graph, task, tp_ratio=ratio), dict(tp_ratio=ratio)
    steps = budget.epochs * batches_per_epoch(task, seed, budget.max_batches)
    selection = M.selection_for(graph, model, task, aim)
    return (M.make_trainer(method, model, graph, task, selection=selection, steps=steps),
            dict(aim_macs=1.0 / aim, steps=steps))


def train_and_prune(task, method: str, seed: int, budget: Budget, store: Store, label: str,
                    targets: tuple, *, aim: float | None = None, reg_kw: dict | None = None,
                    sweep: bool = False) -> None:
    """Train one model (aimed at ``aim`` when given), record it (untargeted only), then prune,
    fine-tune and evaluate a copy at each of ``targets``."""
    keys = {t: key_of(task.name, label, seed, t) for t in targets}
    trained_key = key_of(task.name, label, seed, 1) if aim is None else None
    if all(k in store for k in [*keys.values(), trained_key] if k):
        return
    t0 = time.time()
    model = task.build(seed)
    graph = etp_fx.trace(model, task.example)
    dense_macs = int(graph.cost.macs())
    trainer, setting = build_trainer(task, method, budget, model, graph, dense_macs, aim,
                                     reg_kw, seed)
    # "dense": the unpruned reference, trained the whole E + F budget without a regulariser
    epochs = budget.epochs + (budget.finetune if method == "dense" else 0)
    train(model, task, epochs=epochs, lr=task.lr, seed=seed, trainer=trainer,
          max_batches=budget.max_batches)
    trained = task.metric(model)
    base = dict(task=task.name, method=label, base_method=method, seed=seed, sweep=sweep,
                metric_name=task.metric_name, dense_macs=dense_macs, epochs=budget.epochs,
                finetune=budget.finetune, aim=aim, reg={**setting, **trainer.info()},
                metric_trained=trained)
    log(f"{task.name} {label} seed {seed}{f' aimed at {aim}x' if aim else ''}: trained "
        f"{epochs} epochs, {task.metric_name} {trained:.3f} ({time.time() - t0:.0f} s)")
    if trained_key and trained_key not in store:
        store.add(trained_key, dict(base, target=1, macs=dense_macs, speedup=1.0, metric=trained,
                                    metric_pruned=trained, finetune=0, seconds=time.time() - t0,
                                    latency_ms=latency_ms(model, task.example,
                                                          budget.latency_repeats)))
    for t in targets:
        if keys[t] not in store:
            store.add(keys[t], prune_cell(task, method, model, graph, trainer, t, budget,
                                          dict(base, target=t)))


def prune_cell(task, method: str, model, graph, trainer: M.Trainer, target: float,
               budget: Budget, rec: dict) -> dict:
    """Prune a copy of the trained ``model`` to ``target``, fine-tune it (masked), compress it
    (ours) and evaluate; returns ``rec`` completed (``error`` instead when a step failed)."""
    t1 = time.time()
    try:
        m = copy.deepcopy(model)
        if method in M.OURS:
            # the regulariser's own Budget when it aimed at this target, else the same value
            selection = trainer.selection or M.selection_for(graph, m, task, target, trainer.units)
            plan, masks = M.prune_ours(m, graph, selection)
        else:
            m, ratio = M.prune_torch_pruning(method, m, task.example, target, rec["dense_macs"],
                                             task.heads_and_neurons,
                                             start=rec["reg"].get("tp_ratio"))
            plan, masks = None, None
            rec["tp_ratio"] = ratio
        rec["metric_pruned"] = task.metric(m)
        train(m, task, epochs=budget.finetune, lr=task.ft_lr, seed=rec["seed"], masks=masks,
              epoch_offset=1000, max_batches=budget.max_batches)
        if plan is not None:
            final, macs = M.finalize_ours(m, graph, plan, task.example)
        else:
            final, macs = m, M.macs_of(m, task.example)
        rec.update(macs=macs, speedup=rec["dense_macs"] / macs, metric=task.metric(final),
                   latency_ms=latency_ms(final, task.example, budget.latency_repeats))
    except Exception as e:  # an unreachable budget or a failing pruner is a result too
        rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
    rec["seconds"] = time.time() - t1
    if "error" in rec:
        log(f"  {target}x: FAILED {rec['error'][:160]}")
    else:
        log(f"  {target}x: reached {rec['speedup']:.2f}x, {task.metric_name} "
            f"{rec['metric_pruned']:.3f} pruned -> {rec['metric']:.3f} fine-tuned, "
            f"{rec['latency_ms']:.2f} ms ({rec['seconds']:.0f} s)")
    return rec


def sweep_configs(budget: Budget) -> list[tuple[str, dict]]:
    """The fixed-strength and pivot sweep of ETP (``--sweep``; our defaults otherwise)."""
    out = [(f"etp s={s:g}", dict(strength=s)) for s in budget.sweep_strengths]
    piv = {"index": dict(distance="index"), "importance": dict(distance="importance"),
           "index-both-ends": dict(distance="index", pivots=[0, -1])}
    out += [(f"etp pivots={p}", dict(strength=2.0, **piv[p])) for p in budget.sweep_pivots]
    return out


def run_all(tasks, method_names, budget: Budget, store: Store, sweep: bool = False,
            dense: bool = True) -> None:
    from tqdm.auto import tqdm
    # seed-major order: a run stopped early still has every task and method at seed 0
    jobs = []
    sweep_task = next((t for t in tasks if t.name == budget.sweep_task), None)
    for i, s in enumerate(budget.seeds):
        jobs += [(t, m, s, None, None) for t in tasks
                 for m in (["dense"] if dense else []) + list(method_names)]
        if i == 0 and sweep and sweep_task is not None:
            jobs += [(sweep_task, "etp", s, label, kw) for label, kw in sweep_configs(budget)]
    for task, method, seed, label, kw in tqdm(jobs, desc="quality benchmark", file=sys.stderr):
        if label is None:
            run_method(task, method, seed, budget, store)
        else:
            run_method(task, method, seed, budget, store, label=label, reg_kw=kw,
                       targets=budget.sweep_targets, sweep=True)
