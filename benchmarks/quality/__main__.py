"""``python -m benchmarks.quality [--quick] [--out DIR] [--tasks ...] [--methods ...]``

Two processes may share one ``--out`` folder when split by ``--tasks`` (cells are merged into
``runs.json`` under a file lock; the process that finishes last renders every task), e.g.::

    python -m benchmarks.quality --tasks llama-stdlib &
    python -m benchmarks.quality --tasks vgg-digits resnet-digits cnn1d-mnist1d; wait
    python -m benchmarks.quality --render-only      # optional: render once more

Exits with 1 when any (task, method, seed, target) cell of ``runs.json`` failed, unless
``--allow-failures`` is given."""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.common import DOCS, add_allow_failures, failure_exit


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budget (a smoke run, <= 5 min)")
    p.add_argument("--out", default=os.path.join(DOCS, "results"), help="output folder")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--targets", nargs="+", type=float, default=None,
                   help="MACs speed-ups (default 4 8)")
    p.add_argument("--budget-scope", choices=("global", "group"), default=None,
                   help="how our methods' Budget spreads the removal (default: "
                        "methods.BUDGET_SCOPE)")
    p.add_argument("--reg-form", choices=("loss", "decoupled"), default=None,
                   help="how etp/torque apply the regulariser (default: methods.REG_FORM)")
    p.add_argument("--sweep", action="store_true",
                   help="also run the fixed-strength/pivot sweep of ETP (off by default)")
    p.add_argument("--no-sweep", action="store_true", help=argparse.SUPPRESS)  # the old default
    p.add_argument("--sweep-task", default=None, help="task of the strength/pivot sweep")
    p.add_argument("--sweep-strengths", nargs="+", type=float, default=None)
    p.add_argument("--sweep-only", action="store_true", help="run only the sweep")
    p.add_argument("--render-only", action="store_true", help="only render runs.json")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_allow_failures(p)
    return p.parse_args(argv)


def budget_of(a: argparse.Namespace):
    from dataclasses import replace
    from . import runner
    budget = runner.QUICK if a.quick else runner.FULL
    if a.seeds:
        budget = replace(budget, seeds=tuple(a.seeds))
    if a.targets:
        budget = replace(budget, targets=tuple(int(t) if t == int(t) else t for t in a.targets))
    if a.sweep_strengths:
        budget = replace(budget, sweep_strengths=tuple(a.sweep_strengths), sweep_pivots=())
    if a.sweep_task:
        budget = replace(budget, sweep_task=a.sweep_task)
    return budget


def record_meta(out: str, a: argparse.Namespace, budget, names: list[str], seconds: float) -> dict:
    """``meta.json``: the mode and budget, and one entry per invocation (merged under the
    results lock, so parallel processes keep each other's entries)."""
    import torch
    from . import methods, runner
    path = os.path.join(out, "meta.json")
    with runner.locked(os.path.join(out, "runs.json")):
        meta = runner.read_json(path)
        meta.update(quick=a.quick, budget=budget.__dict__, threads=a.threads,
                    reg_form=methods.REG_FORM, budget_scope=methods.BUDGET_SCOPE,
                    torch=torch.__version__)
        meta.setdefault("invocations", []).append(
            dict(tasks=names, methods=a.methods, seeds=list(budget.seeds), threads=a.threads,
                 reg_form=methods.REG_FORM, budget_scope=methods.BUDGET_SCOPE,
                 wall_seconds=round(seconds, 1),
                 finished=time.strftime("%Y-%m-%d %H:%M:%S")))
        runner.write_json(path, meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    import torch
    torch.set_num_threads(a.threads)
    from . import methods, report, runner, tasks
    if a.reg_form:
        methods.REG_FORM = a.reg_form
    if a.budget_scope:
        methods.BUDGET_SCOPE = a.budget_scope
    budget = budget_of(a)
    os.makedirs(a.out, exist_ok=True)
    store = runner.Store(os.path.join(a.out, "runs.json"))
    t0 = time.time()
    if a.render_only:
        meta = runner.read_json(os.path.join(a.out, "meta.json"))
    else:
        names = a.tasks or tasks.ALL_TASKS
        runner.log(f"building tasks {names}; regulariser form {methods.REG_FORM}")
        ts = tasks.make_tasks(names, a.quick)
        runner.run_all(ts, [] if a.sweep_only else a.methods or list(methods.ALL_METHODS),
                       budget, store, sweep=a.sweep or a.sweep_only, dense=not a.sweep_only)
        meta = record_meta(a.out, a, budget, names, time.time() - t0)
    runs = store.reload()
    report.render(runs, a.out, meta)
    runner.log(f"done in {time.time() - t0:.0f} s; wrote {a.out}")
    failed = [f"{key}: {rec['error'][:200]}" for key, rec in runs.items() if "error" in rec]
    return failure_exit(failed, a.allow_failures, "cells (task|method|seed|target)")


if __name__ == "__main__":
    sys.exit(main())
