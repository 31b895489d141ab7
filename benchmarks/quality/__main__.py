"""``python -m benchmarks.quality [--quick] [--out DIR] [--tasks ...] [--methods ...]``

Exits with 1 when any (task, method, seed, target) cell of ``runs.json`` failed, unless
``--allow-failures`` is given."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.common import DOCS, add_allow_failures, failure_exit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny budget (a smoke run, <= 5 min)")
    p.add_argument("--out", default=os.path.join(DOCS, "results"), help="output folder")
    p.add_argument("--tasks", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--no-sweep", action="store_true", help="skip the strength/pivot sweep")
    p.add_argument("--sweep-task", default=None, help="task of the strength/pivot sweep")
    p.add_argument("--sweep-strengths", nargs="+", type=float, default=None)
    p.add_argument("--sweep-only", action="store_true", help="run only the sweep")
    p.add_argument("--render-only", action="store_true", help="only render runs.json")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_allow_failures(p)
    a = p.parse_args(argv)

    import torch
    torch.set_num_threads(a.threads)
    from . import report, runner, tasks, methods
    from dataclasses import replace
    budget = runner.QUICK if a.quick else runner.FULL
    if a.seeds:
        budget = replace(budget, seeds=tuple(a.seeds))
    if a.sweep_strengths:
        budget = replace(budget, sweep_strengths=tuple(a.sweep_strengths), sweep_pivots=())
    if a.sweep_task:
        budget = replace(budget, sweep_task=a.sweep_task)
    os.makedirs(a.out, exist_ok=True)
    store = runner.Store(os.path.join(a.out, "runs.json"))
    t0 = time.time()
    if not a.render_only:
        names = a.tasks or tasks.ALL_TASKS
        runner.log(f"building tasks {names}")
        ts = tasks.make_tasks(names, a.quick)
        runner.run_all(ts, [] if a.sweep_only else a.methods or list(methods.ALL_METHODS),
                       budget, store, sweep=not a.no_sweep, dense=not a.sweep_only)
    meta_path = os.path.join(a.out, "meta.json")
    if a.render_only and os.path.exists(meta_path):  # keep the run's own record
        with open(meta_path) as f:
            meta = json.load(f)
    else:
        meta = dict(quick=a.quick, budget=budget.__dict__, threads=a.threads,
                    wall_seconds=round(time.time() - t0, 1), torch=torch.__version__)
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=1, default=str)
    report.render(store.runs, a.out, meta)
    runner.log(f"done in {time.time() - t0:.0f} s; wrote {a.out}")
    failed = [f"{key}: {rec['error'][:200]}" for key, rec in store.runs.items() if "error" in rec]
    return failure_exit(failed, a.allow_failures, "cells (task|method|seed|target)")


if __name__ == "__main__":
    sys.exit(main())
