"""Render ``runs.json``: one PNG per task (metric against reached MACs speed-up, one curve per
method, mean and min..max over seeds), and ``results.md`` with the tables and, per task, whether
target-driven ETP is at least the best baseline at each target (computed here, with the numbers
where it loses)."""
from __future__ import annotations

import os
import statistics
from collections import defaultdict

ORDER = ["dense", "etp-paper", "etp", "torque", "greg", "groupnorm", "magnitude"]
BASELINES = ("greg", "groupnorm", "magnitude")
JUDGED = (4, 8)  # the targets issue 13 judges


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
                       trained=_stats([r.get("metric_trained", r["metric_pruned"]) for r in ok]),
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
        pts = sorted((a["speedup"], a["metric"], a["pruned"][0]) for (t, mm, tg), a in agg.items()
                     if t == task and mm == m and tg != 1 and a["n"])
        if not pts:
            continue
        name = next(a["metric_name"] for (t, mm, _), a in agg.items() if t == task and mm == m)
        xs = [p[0] for p in pts]
        ys = [p[1][0] for p in pts]
        lo = [max(0.0, p[1][0] - p[1][2]) for p in pts]  # float rounding can dip below 0
        hi = [max(0.0, p[1][3] - p[1][0]) for p in pts]
        bars = ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=m)
        # before fine-tuning: the same colour, dotted (what pruning alone leaves)
        ax.plot(xs, [p[2] for p in pts], ls=":", marker=".", alpha=0.6,
                color=bars[0].get_color())
    d = dense_baseline(agg, task)
    if d:
        ax.axhline(d["metric"][0], color="grey", ls="--", lw=1, label="dense (no pruning)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MACs speed-up (reached, etp_fx cost model)")
    ax.set_ylabel(name or "metric")
    if name == "perplexity":
        ax.set_yscale("log")
    ax.set_title(f"{task}{' (ETP sweep, 1 seed)' if sweep else ''}: mean, bars min..max over "
                 "seeds; dotted: before fine-tuning", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lower_is_better(metric_name: str) -> bool:
    return metric_name == "perplexity"


def _cell(a: dict | None) -> str:
    """``trained -> pruned -> fine-tuned`` means (± std over seeds for the last two), reached
    speed-up and latency."""
    if not a:
        return "-"
    if not a["n"]:
        return "failed"
    lat = f", {a['latency']:.2f} ms" if a.get("latency") else ""
    return (f"{a['trained'][0]:.2f} → {a['pruned'][0]:.2f} ± {a['pruned'][1]:.2f} → "
            f"**{a['metric'][0]:.2f} ± {a['metric'][1]:.2f}** ({a['speedup']:.1f}x{lat})")


def _methods(agg: dict, task: str, sweep: bool) -> list[str]:
    return sorted({m for (t, m, _), a in agg.items() if t == task and a["sweep"] == sweep},
                  key=lambda m: (ORDER.index(m) if m in ORDER else 99, m))


def _highest_within(agg: dict, task: str, m: str, targets: list, dense: float | None) -> str:
    ok = [agg[(task, m, t)]["speedup"] for t in targets
          if (task, m, t) in agg and agg[(task, m, t)]["n"] and dense is not None
          and within(agg[(task, m, t)]["metric_name"], agg[(task, m, t)]["metric"][0], dense)]
    return f"{max(ok):.1f}x" if ok else "none of the targets"


def table(agg: dict, task: str, targets: list, sweep: bool = False) -> list[str]:
    d = dense_baseline(agg, task)
    dense = d["metric"][0] if d else None
    head = ["method"] + [f"{t}x: trained → pruned → fine-tuned" for t in targets]
    if not sweep:
        head.append("highest reached speed-up within tolerance")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in _methods(agg, task, sweep):
        if m == "dense":
            continue
        row = [m] + [_cell(agg.get((task, m, t))) for t in targets]
        if not sweep:
            row.append(_highest_within(agg, task, m, targets, dense))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def verdict(agg: dict, task: str, target) -> tuple[bool | None, str]:
    """Whether target-driven ETP's mean fine-tuned metric is at least the best baseline's at
    ``target`` (None when a cell is missing), and the sentence that says it with numbers."""
    e = agg.get((task, "etp", target))
    bases = [(m, agg[(task, m, target)]) for m in BASELINES
             if (task, m, target) in agg and agg[(task, m, target)]["n"]]
    if not e or not e["n"] or not bases:
        return None, f"{target}x: not decided (ETP or every baseline is missing or failed)"
    low = lower_is_better(e["metric_name"])
    name, best = (min if low else max)(bases, key=lambda mb: mb[1]["metric"][0])
    ev, bv = e["metric"][0], best["metric"][0]
    ok = ev <= bv if low else ev >= bv
    nums = (f"ETP {ev:.2f} ± {e['metric'][1]:.2f} (before fine-tuning {e['pruned'][0]:.2f}, "
            f"n={e['n']}) vs best baseline {name} {bv:.2f} ± {best['metric'][1]:.2f} "
            f"(before fine-tuning {best['pruned'][0]:.2f}, n={best['n']})")
    if ok:
        return True, f"{target}x: **yes**, {nums}"
    return False, f"{target}x: **no, ETP loses by {abs(ev - bv):.2f}**: {nums}"


def judged_targets(targets: list) -> list:
    """The targets the verdict is about: 4x and 8x where run, else every target run."""
    return [t for t in targets if t in JUDGED] or list(targets)


def verdict_lines(agg: dict, task: str, targets: list) -> list[str]:
    low = lower_is_better(task_metric(agg, task))
    ask = (f"Is target-driven ETP at least the best baseline (mean fine-tuned "
           f"{'perplexity, lower is better' if low else 'metric, higher is better'})? ")
    return [f"- {ask}{verdict(agg, task, t)[1]}" for t in judged_targets(targets)]


def task_metric(agg: dict, task: str) -> str:
    return next((a["metric_name"] for (t, _, _), a in agg.items() if t == task), "metric")


def _header(meta: dict) -> list[str]:
    inv = meta.get("invocations") or []
    walls = "; ".join(f"{', '.join(i.get('tasks') or [])}: {i.get('wall_seconds')} s"
                      for i in inv) or meta.get("wall_seconds")
    return ["# Quality benchmark results (generated by `python -m benchmarks.quality`)", "",
            f"Mode: {'quick' if meta.get('quick') else 'full'}; budget: `{meta.get('budget')}`; "
            f"regulariser form `{meta.get('reg_form', 'loss')}`; torch threads "
            f"{meta.get('threads')}; wall time per invocation: {walls}.", "",
            "Cells: held-out metric of the trained model → after pruning, before fine-tuning → "
            "**after fine-tuning**, means over seeds (± std for the last two), then the reached "
            "MACs speed-up and the median CPU latency at batch 1 of the final model. "
            "`etp`, `torque` and `greg` train one model per target (their regulariser aims at "
            "it); the others train once and prune that model at every target. Tolerance: "
            "within 1 point of the dense accuracy; for perplexity within 5 % of the dense "
            "perplexity. Dense = the same model trained E + F epochs without a regulariser and "
            "never pruned. Baselines in the verdicts: " + ", ".join(BASELINES) + ".", ""]


def _task_section(runs: dict, agg: dict, task: str, out: str) -> list[str]:
    targets = sorted({r["target"] for r in runs.values() if r["task"] == task
                      and r["target"] != 1 and not r.get("sweep")})
    md: list[str] = []
    if targets:
        plot_task(agg, task, os.path.join(out, f"{task}.png"))
        d = dense_baseline(agg, task)
        md += [f"## {task}", "", f"![{task}]({task}.png)", ""]
        if d:
            md += [f"Dense {d['metric_name']}: {d['metric'][0]:.3f} ± {d['metric'][1]:.3f} "
                   f"(n={d['n']}), latency {d['latency']:.2f} ms.", ""]
        md += verdict_lines(agg, task, targets) + [""] + table(agg, task, targets) + [""]
        errs = [(m, e) for (t, m, tg), a in agg.items() if t == task for e in a["errors"]]
        md += [f"- failed run, {m}: `{e[:200]}`" for m, e in errs[:8]] + [""]
    sweep_targets = sorted({r["target"] for r in runs.values() if r["task"] == task
                            and r["target"] != 1 and r.get("sweep")})
    if sweep_targets:
        plot_task(agg, task, os.path.join(out, f"{task}-sweep.png"), sweep=True)
        md += [f"## {task}: fixed-strength ETP sweep (one seed)", "",
               f"![sweep]({task}-sweep.png)", ""] + table(agg, task, sweep_targets, True) + [""]
    return md


def render(runs: dict, out: str, meta: dict) -> None:
    agg = aggregate(runs)
    tasks = sorted({r["task"] for r in runs.values()})
    md = _header(meta) + ["## Verdicts", ""]
    for task in tasks:
        targets = sorted({r["target"] for r in runs.values() if r["task"] == task
                          and r["target"] != 1 and not r.get("sweep")})
        md += [f"- **{task}**: " + "; ".join(verdict(agg, task, t)[1]
                                             for t in judged_targets(targets))]
    md.append("")
    for task in tasks:
        md += _task_section(runs, agg, task, out)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
