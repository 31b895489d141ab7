"""How long it takes to prune a model: etp_fx (trace + plan + compress) versus torch-pruning.

Run::

    python -m benchmarks.compress_speed                      # every torchvision classifier -> docs/compress_speed.md
    python -m benchmarks.compress_speed --quick              # resnet18 only, one repeat
    python -m benchmarks.compress_speed --models resnet50,densenet121 --repeats 3
    python -m benchmarks.compress_speed --profile resnet50,densenet121   # cProfile of compress

What is timed, per model (random weights, batch 1, 224x224, 299x299 for Inception):

- **ours** = ``etp_fx.trace(model, x)`` + the plan (L1 norm of every unit's ``out`` slices, the
  lowest ``f`` of every exact group removed, at least one unit kept) + ``etp_fx.compress(model,
  x, remove=plan, graph=g)``. ``compress`` is timed with ``verify=True`` (the default: the
  result is run against the zeroed original) and with ``verify=False``; both totals are reported.
- **TP** = ``tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
  pruning_ratio=f, ignored_layers=[classifier])`` + ``.step()``, on a fresh copy of the model (the
  copy is not timed): construction (TP's dependency graph) plus the pruning step, as TP users run
  it.
- ``f`` is the same for both: the fraction at which our plan cuts MACs by 2x (bisection on the
  symbolic cost model, done once per model and not timed). Both then remove the same share of
  units per group, uniformly; they do not prune the same set of groups, so the MACs each
  reaches is reported too (TP's by ``tp.utils.count_ops_and_params``).

Budget: the full run aims at ``--budget-min`` minutes (default 40). Every model is measured once
first (phase 1), in a stratified order (the cheapest model of every family, then the second
cheapest, ...); past 70% of the budget a model gets a light sample (no ``verify=False`` timing),
past 100% it is listed as not run. The time left then buys two more repeats for as many models
as fit, cheapest first (phase 2). Our part of a sample is limited by ``--timeout`` seconds, TP's
by ``ETP_BENCH_TP_TIMEOUT`` (120 s; TP's group building does not finish on Swin or MaxViT): a TP
timeout is a TP failure and keeps our times. Models run in a worker subprocess (``--worker``) so
that a crash or an out-of-memory kill costs one model, not the run; raw samples go to
``.cache/benchmarks/compress_speed.jsonl`` (``--resume`` continues a run, ``--report-only``
rewrites the report from them).
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import os
import pstats
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .common import (CACHE, DOCS, ROOT, add_allow_failures, classifier_of, failure_exit, fmt_s,
                     fmt_x, median, mem_available, param_bytes, plan_at, plan_for_macs,
                     setup_env, short_error, timed, torchvision_model, unit_l1_norms)

TARGET = 2.0            # MACs reduction that fixes the pruning fraction
QUICK_MODELS = ["resnet18"]
FALLBACK_FRAC = 0.3     # TP's ratio when etp_fx failed before finding f
SOFT_SHARE, HARD_SHARE = 0.7, 1.0   # of the budget: light protocol, then no more models
TP_TIMEOUT = float(os.environ.get("ETP_BENCH_TP_TIMEOUT", "120"))  # s, one TP construction + step
MEM_FACTOR = 5          # peak memory ~ this many copies of the weights (model, copies, exports)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("model took longer than its time limit")


# --- one model, in the worker ----------------------------------------------------------------------

def _tp_step(model, x, frac: float):
    import torch_pruning as tp
    clf = classifier_of(model, x)
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=frac,
                                       ignored_layers=[clf] if clf is not None else [])
    pruner.step()
    return time.perf_counter() - t0


def measure(name: str, reps: int, frac: float | None, size: int | None, timeout_s: float,
            write, light: bool = False, tp_timeout_s: float = TP_TIMEOUT) -> None:
    """Measure ``reps`` samples of one model; ``write(record)`` after each sample. ``light``
    (when the run is late): ``compress(verify=False)`` and TP's MACs count are skipped.
    ``timeout_s`` bounds our part of each sample, ``tp_timeout_s`` TP's (torch-pruning can
    take many minutes building the groups of Swin and MaxViT): a TP timeout is recorded as a
    TP failure and our times are kept."""
    import torch
    import etp_fx
    import torch_pruning as tp

    model, x = torchvision_model(name, size=size)
    need = MEM_FACTOR * param_bytes(model)
    if need > mem_available():
        write({"model": name, "skipped": f"needs ~{need / 2**30:.1f} GiB, "
                                         f"{mem_available() / 2**30:.1f} GiB available"})
        return
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for rep in range(reps):
            rec = {"model": name, "rep": rep, "size": int(x.shape[-1])}
            signal.alarm(int(timeout_s))
            try:
                rec["t_trace"], g = timed(etp_fx.trace, model, x)
                if frac is None:  # not timed: fixes the fraction both tools use
                    norms = unit_l1_norms(g, model)
                    _, frac, reached = plan_for_macs(g, norms, TARGET)
                    rec["macs_ratio_plan"] = reached
                rec["frac"] = frac
                rec["groups"] = len(g.groups)
                rec["exact_groups"] = sum(gr.exact for gr in g.groups)
                t_plan, plan = timed(lambda: plan_at(unit_l1_norms(g, model), frac))
                rec["t_plan"] = t_plan
                rec["t_compress_verify"], small = timed(etp_fx.compress, model, x, remove=plan,
                                                        graph=g, verify=True)
                r = small.meta["etp_report"]
                rec.update(macs_before=r["macs_before"], macs_after=r["macs_after"],
                           params_before=r["params_before"], params_after=r["params_after"])
                del small
                if not light:
                    # compress keeps its batch-dynamic capture on the graph: drop it, so this
                    # sample pays for it as the first one did
                    getattr(g, "_captures", {}).clear()
                    rec["t_compress_noverify"], small = timed(etp_fx.compress, model, x,
                                                              remove=plan, graph=g, verify=False)
                    del small
                else:
                    rec["light"] = True
                del g
            except Timeout:
                raise
            except Exception as e:  # noqa: BLE001 - an etp_fx failure is a result
                rec["error"] = short_error(e, 400)
                rec["traceback"] = traceback.format_exc()[-3000:]
            signal.alarm(0)
            gc.collect()
            if frac is None:  # etp_fx failed before fixing the fraction: TP still runs
                frac = rec["frac"] = FALLBACK_FRAC
                rec["frac_fallback"] = True
            if True:
                try:
                    m2 = copy.deepcopy(model)
                    signal.alarm(int(tp_timeout_s))
                    rec["t_tp"] = _tp_step(m2, x, frac)
                    if rep == 0 and not light:
                        try:
                            with torch.no_grad():
                                macs, params = tp.utils.count_ops_and_params(m2, x)
                            rec["tp_macs_after"], rec["tp_params_after"] = int(macs), int(params)
                        except Exception as e:  # noqa: BLE001
                            rec["tp_forward_error"] = short_error(e)
                    del m2
                except Timeout:
                    rec["tp_error"] = f"no result within {tp_timeout_s:.0f} s (stopped)"
                except Exception as e:  # noqa: BLE001
                    rec["tp_error"] = short_error(e)
                finally:
                    signal.alarm(0)
                gc.collect()
            write(rec)
            if "error" in rec and "tp_error" in rec:
                break
    except Timeout:
        write({"model": name, "timeout": timeout_s})
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        del model
        gc.collect()


def warm_up() -> None:
    """One tiny trace, compress and TP step, so the first model does not pay for imports and
    torch.export's first-call set-up."""
    import torch
    import torch.nn as nn
    import etp_fx
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(1, 3, 16, 16)
    g = etp_fx.trace(net, x)
    plan_for_macs(g, unit_l1_norms(g, net), 1.5)
    etp_fx.compress(net, x, remove={g.groups[0].id: [0, 1]}, graph=g)
    _tp_step(copy.deepcopy(net), x, 0.25)


def run_worker(tasks: list[dict], raw: Path, size: int | None, timeout_s: float,
               soft_deadline: float = float("inf"), hard_deadline: float = float("inf"),
               warm: bool = True) -> None:
    """Measure the tasks in order. Past ``soft_deadline`` (epoch seconds) a model gets the light
    protocol; past ``hard_deadline`` it is recorded as not run."""
    setup_env()
    if warm:
        warm_up()
    with raw.open("a") as f:
        def write(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()
        for t in tasks:
            now = time.time()
            if now > hard_deadline:
                write({"model": t["model"], "skipped": "time budget spent"} if t.get("phase", 1) == 1
                      else {"model": t["model"], "start": True, "phase": 2, "no_more": True})
                continue
            write({"model": t["model"], "start": True, "phase": t.get("phase", 1)})
            measure(t["model"], t["reps"], t.get("frac"), size, timeout_s, write,
                    light=now > soft_deadline)


# --- the parent: phases, crash recovery -------------------------------------------------------------

def read_raw(raw: Path) -> list[dict]:
    if not raw.exists():
        return []
    out = []
    for line in raw.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def run_tasks(tasks: list[dict], raw: Path, size: int | None, timeout_s: float,
              in_process: bool, soft: float = float("inf"), hard: float = float("inf")) -> None:
    """Run tasks in worker subprocesses; when one dies, record the crash and go on."""
    if in_process:
        run_worker(tasks, raw, size, timeout_s, soft, hard, warm=len(tasks) > 1)
        return
    todo = list(tasks)
    while todo:
        n_before = len(read_raw(raw))
        spec = raw.with_suffix(".tasks.json")
        spec.write_text(json.dumps(todo))
        cmd = [sys.executable, "-m", "benchmarks.compress_speed", "--worker", str(spec),
               "--raw", str(raw), "--timeout", str(timeout_s), "--deadlines", f"{soft},{hard}"
               ] + (["--size", str(size)] if size else [])
        rc = subprocess.call(cmd, cwd=ROOT)
        new = read_raw(raw)[n_before:]
        started = [r["model"] for r in new if r.get("start")]
        if rc == 0 or not started:
            if rc != 0:
                print(f"worker failed before starting (rc={rc})", file=sys.stderr)
            return
        last = started[-1]
        with raw.open("a") as f:
            f.write(json.dumps({"model": last, "crash": f"worker died with rc={rc}"}) + "\n")
        done = set(started)
        todo = [t for t in todo if t["model"] not in done]
        print(f"worker died on {last} (rc={rc}); {len(todo)} tasks left", file=sys.stderr)


def expected_cost(name: str) -> float:
    """A rough cost rank from torchvision's metadata (no download): parameters and GFLOPs."""
    try:
        import torchvision
        meta = list(torchvision.models.get_model_weights(name))[0].meta
        return meta.get("num_params", 0) / 1e6 + 2 * meta.get("_ops", 0.0)
    except Exception:  # noqa: BLE001
        return 100.0


def family(name: str) -> str:
    import re
    return re.sub(r"\d.*$", "", name.split("_")[0])


def stratified_order(models: list[str]) -> list[str]:
    """Cheapest model of every family first, then the second cheapest of every family, ...: a
    run cut short by its budget still covers every architecture family (only the heaviest
    variants drop out), so the median ratio is not biased toward small models only."""
    fams: dict[str, list[str]] = {}
    for m in sorted(models, key=expected_cost):
        fams.setdefault(family(m), []).append(m)
    out: list[str] = []
    for r in range(max((len(v) for v in fams.values()), default=0)):
        out += sorted((v[r] for v in fams.values() if len(v) > r), key=expected_cost)
    return out


def sample_cost(rec: dict) -> float:
    return sum(rec.get(k, 0.0) for k in ("t_trace", "t_plan", "t_compress_verify",
                                         "t_compress_noverify", "t_tp"))


def run_benchmark(models: list[str], raw: Path, budget_s: float, max_reps: int, size: int | None,
                  timeout_s: float, in_process: bool, resume: bool) -> None:
    start = time.time()
    if raw.exists() and not resume:
        raw.unlink()
    raw.parent.mkdir(parents=True, exist_ok=True)
    done = {r["model"] for r in read_raw(raw) if "rep" in r or "timeout" in r or "skipped" in r
            or "crash" in r}
    todo = stratified_order([m for m in models if m not in done])
    # heaviest last: if the run is late, they get the light protocol, or are listed as not run
    soft, hard = start + SOFT_SHARE * budget_s, start + HARD_SHARE * budget_s
    run_tasks([{"model": m, "reps": 1, "phase": 1} for m in todo], raw, size, timeout_s,
              in_process, soft, hard)
    if max_reps <= 1:
        return
    # phase 2: more repeats, cheapest models first, while the budget lasts
    recs = read_raw(raw)
    left = budget_s - (time.time() - start)
    by_model: dict[str, list[dict]] = {}
    for r in recs:
        if "rep" in r:
            by_model.setdefault(r["model"], []).append(r)
    extra = []
    for m in sorted(models, key=lambda m: min((sample_cost(r) for r in by_model.get(m, [])),
                                              default=1e9)):
        samples = by_model.get(m, [])
        if not samples or any("error" in r for r in samples) or "frac" not in samples[0]:
            continue
        more = max_reps - len(samples)
        cost = (sample_cost(samples[0]) + 15) * more   # + model build, untimed copies
        if more <= 0 or cost > left:
            continue
        left -= cost
        extra.append({"model": m, "reps": more, "frac": samples[0]["frac"], "phase": 2})
    if extra:
        run_tasks(extra, raw, size, timeout_s, in_process, float("inf"), start + budget_s)


# --- the report --------------------------------------------------------------------------------------

def summarize(recs: list[dict], models: list[str]) -> list[dict]:
    rows = []
    for m in models:
        mine = [r for r in recs if r.get("model") == m]
        samples = [r for r in mine if "rep" in r]
        row = {"model": m, "n": len(samples)}
        for k in ("t_trace", "t_plan", "t_compress_verify", "t_compress_noverify", "t_tp"):
            row[k] = median([r[k] for r in samples if k in r])
        totals_v = [r["t_trace"] + r["t_plan"] + r["t_compress_verify"] for r in samples
                    if "t_compress_verify" in r]
        totals_nv = [r["t_trace"] + r["t_plan"] + r["t_compress_noverify"] for r in samples
                     if "t_compress_noverify" in r]
        row["ours_verify"] = median(totals_v)
        row["ours_noverify"] = median(totals_nv)
        row["ratio_verify"] = row["ours_verify"] / row["t_tp"] if row["t_tp"] == row["t_tp"] else float("nan")
        row["ratio_noverify"] = row["ours_noverify"] / row["t_tp"] if row["t_tp"] == row["t_tp"] else float("nan")
        first = samples[0] if samples else {}
        for k in ("frac", "macs_before", "macs_after", "params_before", "params_after",
                  "tp_macs_after", "groups", "exact_groups", "size"):
            row[k] = first.get(k)
        row["error"] = next((r["error"] for r in samples if "error" in r), "")
        row["traceback"] = next((r["traceback"] for r in samples if "traceback" in r), "")
        row["tp_error"] = next((r["tp_error"] for r in samples if "tp_error" in r), "")
        row["tp_forward_error"] = first.get("tp_forward_error", "")
        row["light"] = any(r.get("light") for r in samples)
        for key in ("timeout", "skipped", "crash"):
            hit = next((r for r in mine if key in r), None)
            if hit is not None:
                row[key] = hit[key]
        rows.append(row)
    return rows


def _macs_x(before, after) -> str:
    return fmt_x(before / after) + "x" if before and after else "–"


def write_report(rows: list[dict], out: Path, budget_s: float, wall_s: float, quick: bool,
                 profile_md: str | None = None, extra_note: str | None = None) -> Path:
    import platform
    import torch
    try:
        import torch_pruning as tp
        tpv = tp.__version__
    except Exception:  # noqa: BLE001
        tpv = "?"
    ok = [r for r in rows if r["ratio_verify"] == r["ratio_verify"]]
    both = [r for r in ok if r["ratio_noverify"] == r["ratio_noverify"]]
    med_v = median([r["ratio_verify"] for r in ok])
    med_ours = median([r["ours_verify"] for r in ok])
    med_tp = median([r["t_tp"] for r in ok])
    ns = sorted({r["n"] for r in ok})
    lines = [
        "# Compression speed: etp_fx versus torch-pruning",
        "",
        "Generated by `python -m benchmarks.compress_speed" + (" --quick" if quick else "") + "`"
        f" on {platform.machine()} with {torch.get_num_threads()} threads, torch {torch.__version__},"
        f" torch-pruning {tpv}; wall time {wall_s / 60:.1f} min (budget {budget_s / 60:.0f} min)."
        " The machine is shared (2 cores, other jobs running), so absolute times are noisy;"
        " ours and TP's were measured back to back on the same model, and the ratio is what counts.",
        "",
        "- **ours** = `etp_fx.trace` + plan (L1 norm per unit, lowest fraction `f` of every exact"
        " group) + `etp_fx.compress(remove=plan, graph=g)`, with `verify=True` (default) or"
        " `verify=False`.",
        "- **TP** = `tp.pruner.MagnitudePruner(model, x, MagnitudeImportance(p=1), pruning_ratio=f,"
        " ignored_layers=[classifier])` + `.step()` (construction and step, as TP users run it).",
        "- `f` is the fraction at which our plan cuts MACs by 2x; TP removes the same fraction of"
        " every group it finds. `MACs ours`/`MACs TP` are the reductions each actually reached.",
        "- Times are medians over `n` samples (up to 3 where the budget allowed); ratio = ours / TP"
        " (below 1: we are faster). Models run cheapest first within each family, one family"
        " after another, so a run cut by its budget still covers every family.",
        "",
        "## Summary",
        "",
        f"- models measured (ours and TP both ran): {len(ok)} of {len(rows)}; samples per model: "
        f"{', '.join(f'n={n}' for n in ns) or '–'}",
        f"- **median ratio ours/TP (verify=True): {fmt_x(med_v)}** over those {len(ok)} models"
        f" (goal: at most 0.33)",
        f"- on the {len(both)} models where verify=False was timed too: median ratio"
        f" {fmt_x(median([r['ratio_verify'] for r in both]))} with verify=True,"
        f" {fmt_x(median([r['ratio_noverify'] for r in both]))} with verify=False",
        f"- median time per model: ours {fmt_s(med_ours)} s (verify=True), TP {fmt_s(med_tp)} s",
    ]
    if extra_note:
        lines += [f"- {extra_note}"]
    fails = [r for r in rows if r["error"] or r.get("timeout") or r.get("crash")]
    not_run = [r for r in rows if r.get("skipped") and not r["n"]]
    tp_fails = [r for r in rows if r["tp_error"] or r["tp_forward_error"]]
    lines += [f"- etp_fx failures or timeouts: {len(fails)} ({', '.join(r['model'] for r in fails) or 'none'})",
              f"- not run (time budget or memory): {len(not_run)}"
              f" ({', '.join(r['model'] for r in not_run) or 'none'})",
              f"- torch-pruning failures (step or forward after step): {len(tp_fails)}"
              f" ({', '.join(r['model'] for r in tp_fails) or 'none'})", ""]
    lines += ["## Per model", "",
              "| model | n | f | groups (exact) | trace s | plan s | compress s (verify) | compress s (no verify) "
              "| ours s (verify) | ours s (no verify) | TP s | ratio (verify) | ratio (no verify) "
              "| MACs ours | MACs TP |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = ""
        if r.get("skipped"):
            note = f" (skipped: {r['skipped']})"
        elif r.get("timeout"):
            note = f" (timeout after {r['timeout']:.0f} s)"
        elif r.get("crash"):
            note = f" (crash: {r['crash']})"
        elif r["error"]:
            note = " (etp_fx failed, see below)"
        elif r.get("light"):
            note = " (light: run late, verify=False not timed)"
        grp = f"{r['groups']} ({r['exact_groups']})" if r.get("groups") is not None else "–"
        tp_m = _macs_x(r["macs_before"], r["tp_macs_after"])
        if r["tp_error"]:
            tp_m = "TP failed"
        elif r["tp_forward_error"]:
            tp_m = "TP model fails"
        lines.append(
            f"| {r['model']}{note} | {r['n']} | {fmt_x(r['frac'])} | {grp} | {fmt_s(r['t_trace'])} "
            f"| {fmt_s(r['t_plan'])} | {fmt_s(r['t_compress_verify'])} | {fmt_s(r['t_compress_noverify'])} "
            f"| {fmt_s(r['ours_verify'])} | {fmt_s(r['ours_noverify'])} | {fmt_s(r['t_tp'])} "
            f"| {fmt_x(r['ratio_verify'])} | {fmt_x(r['ratio_noverify'])} "
            f"| {_macs_x(r['macs_before'], r['macs_after'])} | {tp_m} |")
    if fails or tp_fails:
        lines += ["", "## Failures", ""]
        for r in fails:
            why = r["error"] or (f"no result within the {r['timeout']:.0f} s limit per model"
                                 if r.get("timeout") else r.get("crash"))
            lines += [f"- **{r['model']}** (etp_fx): {why}"]
            if r["traceback"]:
                tb = [ln for ln in r["traceback"].strip().splitlines() if ln.strip()][-6:]
                lines += ["", "  ```", *["  " + ln for ln in tb], "  ```", ""]
        for r in tp_fails:
            lines += [f"- **{r['model']}** (torch-pruning): {r['tp_error'] or r['tp_forward_error']}"]
    if profile_md:
        lines += ["", profile_md]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compress_speed.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- profiling ---------------------------------------------------------------------------------------

# (label, module, attribute): functions whose inclusive wall time is recorded; the labels nest as
# PHASE_TREE shows. Missing attributes (the library is being edited) are skipped.
PHASES = [
    ("trace", "etp_fx", "trace"),
    ("compress", "etp_fx", "compress"),
    ("capture", "etp_fx.trace", "capture"),
    ("check_runs (eager forward, only when export fails)", "etp_fx.capture", "_check_runs"),
    ("torch.export.export", "torch.export", "export"),
    ("build_graph", "etp_fx.trace", "build_graph"),
    ("_base_graph (re-capture for a dynamic batch)", "etp_fx.surgery.compress", "_base_graph"),
    ("_working_copy (copy of the capture)", "etp_fx.surgery.compress", "_working_copy"),
    ("_compress_traced", "etp_fx.surgery.compress", "_compress_traced"),
    ("plan_folds (interpreter forward)", "etp_fx.surgery.compress", "plan_folds"),
    ("rewrite_module", "etp_fx.surgery.compress", "rewrite_module"),
    ("apply_folds", "etp_fx.surgery.compress", "apply_folds"),
    ("check_shapes (interpreter forward)", "etp_fx.surgery.compress", "check_shapes"),
    ("_report", "etp_fx.surgery.compress", "_report"),
    ("CostModel (sympy)", "etp_fx.graph.cost", "CostModel.__init__"),
]


class PhaseTimer:
    """Wrap library functions to add up their inclusive wall time (no profiler overhead)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self.n: dict[str, int] = {}
        self._undo: list = []

    def __enter__(self):
        import importlib
        for label, mod, attr in PHASES:
            try:
                obj = sys.modules.get(mod) or importlib.import_module(mod)
            except ImportError:
                continue
            *path, last = attr.split(".")
            for a in path:
                obj = getattr(obj, a, None)
            if obj is None or not hasattr(obj, last):
                continue
            fn = getattr(obj, last)
            self._undo.append((obj, last, fn))
            setattr(obj, last, self._wrap(label, fn))
        return self

    def _wrap(self, label, fn):
        def inner(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t
                self.n[label] = self.n.get(label, 0) + 1
        return inner

    def __exit__(self, *exc):
        for obj, last, fn in reversed(self._undo):
            setattr(obj, last, fn)


def _phase_lines(pt: PhaseTimer, wall: float) -> list[str]:
    t, n = pt.t, pt.n
    g = lambda k: t.get(k, 0.0)  # noqa: E731
    inner = ["capture", "check_runs (eager forward, only when export fails)",
             "torch.export.export", "build_graph", "_base_graph (re-capture for a dynamic batch)",
             "_working_copy (copy of the capture)", "_compress_traced", "plan_folds (interpreter forward)",
             "rewrite_module", "apply_folds", "check_shapes (interpreter forward)", "_report",
             "CostModel (sympy)"]
    rest = g("_compress_traced") - sum(g(k) for k in ["plan_folds (interpreter forward)",
                                                       "rewrite_module", "apply_folds",
                                                       "check_shapes (interpreter forward)", "_report"])
    out = ["| phase (inclusive, summed over calls) | calls | seconds | share of wall |",
           "|---|---|---|---|"]
    out.append(f"| trace + compress (wall) | | {wall:.2f} | 100% |")
    for k in ["trace", "compress"] + inner:
        if k in t:
            out.append(f"| {k} | {n[k]} | {t[k]:.2f} | {100 * t[k] / wall:.0f}% |")
    out.append(f"| _compress_traced minus its parts (reference forward when nothing folds, glue) | "
               f"| {rest:.2f} | {100 * rest / wall:.0f}% |")
    return out


def profile_model(name: str, size: int | None = None, top: int = 25, verify: bool = True) -> str:
    """Where trace + compress spend their time on one model: wall-clock phases (wrapped
    functions, no profiler overhead), then cProfile's top functions by own time."""
    import etp_fx
    setup_env()
    warm_up()
    model, x = torchvision_model(name, size=size)
    g = etp_fx.trace(model, x)
    _, frac, _ = plan_for_macs(g, unit_l1_norms(g, model), TARGET)
    plan = plan_at(unit_l1_norms(g, model), frac)
    # 1) phases, wall clock
    with PhaseTimer() as pt:
        t0 = time.perf_counter()
        g = sys.modules["etp_fx"].trace(model, x)
        sys.modules["etp_fx.surgery.compress"].compress(model, x, remove=plan, graph=g, verify=verify)
        wall = time.perf_counter() - t0
    # 2) cProfile
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    g = etp_fx.trace(model, x)
    etp_fx.compress(model, x, remove=plan, graph=g, verify=verify)
    pr.disable()
    t1 = time.perf_counter()
    buf = io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    return "\n".join([f"### {name} (f={frac:.2f}, verify={verify})", "",
                      "Wall-clock phases (one trace + compress, functions wrapped with timers):", "",
                      *_phase_lines(pt, wall), "",
                      f"cProfile, top {top} functions by own time (trace + compress took "
                      f"{t1 - t0:.1f} s under the profiler):", "",
                      "```", _trim(buf.getvalue()).rstrip(), "```", ""])


def _trim(s: str) -> str:
    out = []
    for ln in s.splitlines():
        if not ln.strip() or ln.strip().startswith(("Ordered by", "List reduced")):
            continue
        out.append(ln.replace(str(ROOT) + "/", "").replace(".venv/lib/python3.11/site-packages/", ""))
    return "\n".join(out) + "\n"


# --- CLI ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compress_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="resnet18 only, one repeat, in-process")
    ap.add_argument("--models", help="comma-separated torchvision model names (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="samples per model where affordable")
    ap.add_argument("--budget-min", type=float, default=40.0, help="time budget of the run")
    ap.add_argument("--timeout", type=float, default=600.0, help="per-model limit, seconds")
    ap.add_argument("--size", type=int, help="input resolution (default 224, 299 for inception)")
    ap.add_argument("--out", default=DOCS, help="directory for compress_speed.md")
    ap.add_argument("--raw", help="JSONL file of raw samples (default .cache/benchmarks/...)")
    ap.add_argument("--resume", action="store_true", help="keep the raw samples of a previous run")
    ap.add_argument("--in-process", action="store_true", help="no worker subprocess")
    ap.add_argument("--profile", help="comma-separated models to cProfile (trace + compress)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the raw file")
    ap.add_argument("--wall-min", type=float, help="with --report-only: the run's wall time")
    ap.add_argument("--note", help="a line added to the summary")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--deadlines", help=argparse.SUPPRESS)
    add_allow_failures(ap)
    a = ap.parse_args(argv)
    raw = Path(a.raw) if a.raw else Path(CACHE) / "benchmarks" / (
        "compress_speed_quick.jsonl" if a.quick else "compress_speed.jsonl")
    if a.worker:
        soft, hard = (float(v) for v in (a.deadlines or "inf,inf").split(","))
        run_worker(json.loads(Path(a.worker).read_text()), raw, a.size, a.timeout, soft, hard)
        return 0
    import torchvision
    if a.models:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
    elif a.quick:
        models = QUICK_MODELS
    else:
        models = torchvision.models.list_models(module=torchvision.models)
    reps = 1 if a.quick else a.repeats
    t0 = time.time()
    if not a.report_only:
        run_benchmark(models, raw, a.budget_min * 60, reps, a.size, a.timeout,
                      a.in_process or a.quick, a.resume)
    prof = raw.with_suffix(".profile.md")
    if a.profile:
        parts = ["## Where the time goes (cProfile)", ""]
        for m in a.profile.split(","):
            parts.append(profile_model(m.strip(), a.size))
        prof.write_text("\n".join(parts))
    profile_md = prof.read_text() if prof.exists() else None
    rows = summarize(read_raw(raw), models)
    wall = a.wall_min * 60 if a.wall_min else time.time() - t0
    path = write_report(rows, Path(a.out), a.budget_min * 60, wall, a.quick, profile_md, a.note)
    for r in rows:
        print(f"{r['model']:24s} n={r['n']} ours={fmt_s(r['ours_verify'])}s/"
              f"{fmt_s(r['ours_noverify'])}s TP={fmt_s(r['t_tp'])}s ratio={fmt_x(r['ratio_verify'])}"
              f"/{fmt_x(r['ratio_noverify'])} {r['error'] or r.get('timeout') or r.get('crash') or ''}")
    print(f"wrote {path}")
    return failure_exit(etp_fx_failures(rows), a.allow_failures, "models (etp_fx)")


def etp_fx_failures(rows: list[dict]) -> list[str]:
    """Our failures: an error, a timeout or a crash (torch-pruning's are its results, reported
    in the table; a model not run for lack of time or memory is listed as not run)."""
    return [f"{r['model']}: {r['error'] or r.get('timeout') or r.get('crash')}" for r in rows
            if r["error"] or r.get("timeout") or r.get("crash")]


if __name__ == "__main__":
    sys.exit(main())
