"""Render ``runs.json``: one PNG per task (metric against reached MACs speed-up, one curve per
method, mean and min..max over seeds), and ``results.md`` with the tables."""
from __future__ import annotations

import os
import statistics
from collections import defaultdict

ORDER = ["dense", "etp-paper", "etp", "torque", "greg", "groupnorm", "magnitude"]


def _stats(xs: list[float]) -> tuple[float, float, float, float]:
    """mean, std (0 for one value), min, max"""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0), min(xs), max(xs)


def aggregate(runs: dict) -> dict:
    """``{(task, method, target): {metric: stats, speedup: mean, latency: median, n, errors}}``"""
    groups: dict = defaultdict(list)
    for r in runs.values():
        groups[(r["task"], r["method"], r["target"])].append(r)
    out = {}
    for k, rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        agg = dict(n=len(ok), errors=[r["error"] for r in rs if "error" in r],
                   sweep=rs[0].get("sweep", False), metric_name=rs[0]["metric_name"])
        if ok:
            agg.update(metric=_stats([r["metric"] for r in ok]),
                       pruned=_stats([r["metric_pruned"] for r in ok]),
                       speedup=statistics.fmean(r["speedup"] for r in ok),
                       latency=statistics.median(r["latency_ms"] for r in ok))
        out[k] = agg
    return out


def dense_baseline(agg: dict, task: str):
    """The dense model: trained E + F epochs without a regulariser, never pruned."""
    a = agg.get((task, "dense", 1))
    return a if a and a["n"] else None


def within(task_metric: str, value: float, dense: float) -> bool:
    """Accuracy within 1 point of dense; perplexity within 5 % of dense (ratio <= 1.05)."""
    if task_metric == "perplexity":
        return value <= dense * 1.05
    return value >= dense - 1.0


def plot_task(agg: dict, task: str, path: str, sweep: bool = False) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = sorted({m for (t, m, _), a in agg.items() if t == task and a["sweep"] == sweep},
                     key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))
    name = None
    for m in methods:
        pts = sorted((a["speedup"], a["metric"]) for (t, mm, tg), a in agg.items()
                     if t == task and mm == m and tg != 1 and a["n"])
        if not pts:
            continue
        name = next(a["metric_name"] for (t, mm, _), a in agg.items() if t == task and mm == m)
        xs = [p[0] for p in pts]
        ys = [p[1][0] for p in pts]
        lo = [max(0.0, p[1][0] - p[1][2]) for p in pts]  # float rounding can dip below 0
        hi = [max(0.0, p[1][3] - p[1][0]) for p in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
    d = dense_baseline(agg, task)
    if d:
        ax.axhline(d["metric"][0], color="grey", ls="--", lw=1, label="dense (no pruning)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MACs speed-up (reached, etp_fx cost model)")
    ax.set_ylabel(name or "metric")
    if name == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{task}{' (ETP sweep, 1 seed)' if sweep else ''}: mean, bars min..max over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(a: dict | None, dense_lat: float | None) -> str:
    if not a:
        return "-"
    if not a["n"]:
        return "failed"
    m, sd = a["metric"][0], a["metric"][1]
    lat = f", {a['latency']:.2f} ms" if a.get("latency") else ""
    return f"{m:.2f} ± {sd:.2f} ({a['speedup']:.1f}x{lat})"


def table(agg: dict, task: str, targets: list, sweep: bool = False) -> list[str]:
    methods = sorted({m for (t, m, _), a in agg.items() if t == task and a["sweep"] == sweep},
                     key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))
    d = dense_baseline(agg, task)
    dense = d["metric"][0] if d else None
    head = ["method", "trained, before pruning"] + [f"{t}x" for t in targets]
    if not sweep:
        head.append("highest reached speed-up within tolerance")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        row = [m, _cell(agg.get((task, m, 1)), None)]
        row += [_cell(agg.get((task, m, t)), None) for t in targets]
        if not sweep:
            ok = [agg[(task, m, t)]["speedup"] for t in targets
                  if (task, m, t) in agg and agg[(task, m, t)]["n"] and dense is not None
                  and within(agg[(task, m, t)]["metric_name"], agg[(task, m, t)]["metric"][0], dense)]
            row.append(f"{max(ok):.1f}x" if ok else "none of the targets")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(runs: dict, out: str, meta: dict) -> None:
    agg = aggregate(runs)
    tasks = sorted({r["task"] for r in runs.values()})
    md = ["# Quality benchmark results (generated by `python -m benchmarks.quality`)", "",
          f"Mode: {'quick' if meta.get('quick') else 'full'}; budget: `{meta.get('budget')}`; "
          f"torch threads {meta.get('threads')}; this invocation's wall time "
          f"{meta.get('wall_seconds')} s.", "",
          "Cells: final metric after pruning and fine-tuning, mean ± std over seeds (reached "
          "MACs speed-up, median CPU latency at batch 1 of the final models). The "
          "\"trained\" column is the model after the E training epochs, before pruning (its "
          "latency is the dense model's). Tolerance: within 1 point of the dense accuracy; "
          "for perplexity within 5 % of the dense perplexity. Dense = the same model trained "
          "E + F epochs without a regulariser and never pruned.", ""]
    for task in tasks:
        targets = sorted({r["target"] for r in runs.values() if r["task"] == task
                          and r["target"] != 1 and not r.get("sweep")})
        if targets:
            path = os.path.join(out, f"{task}.png")
            plot_task(agg, task, path)
            d = dense_baseline(agg, task)
            md += [f"## {task}", "", f"![{task}]({task}.png)", ""]
            if d:
                md += [f"Dense {d['metric_name']}: {d['metric'][0]:.3f} ± {d['metric'][1]:.3f} "
                       f"(n={d['n']}), latency {d['latency']:.2f} ms.", ""]
            md += table(agg, task, targets) + [""]
            errs = [(m, e) for (t, m, tg), a in agg.items() if t == task for e in a["errors"]]
            for m, e in errs[:8]:
                md.append(f"- failed run, {m}: `{e[:200]}`")
            md.append("")
        sweep_targets = sorted({r["target"] for r in runs.values() if r["task"] == task
                                and r["target"] != 1 and r.get("sweep")})
        if sweep_targets:
            plot_task(agg, task, os.path.join(out, f"{task}-sweep.png"), sweep=True)
            md += [f"## {task}: ETP strength and pivot sweep (one seed)", "",
                   f"![sweep]({task}-sweep.png)", ""] + table(agg, task, sweep_targets, True) + [""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
