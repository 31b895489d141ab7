"""CPU latency of the original model versus the compressed one, at 2x, 4x and 8x fewer MACs.

Run::

    python -m benchmarks.latency                         # resnet50 -> docs/latency.md, docs/latency.png
    python -m benchmarks.latency --models resnet50,mobilenet_v2
    python -m benchmarks.latency --quick                 # resnet18 at 64x64, batch 1, 2x, eager only

What is measured, per model (random weights, 224x224):

- the plan: units of every exact group ranked by the L1 norm of their ``out`` slices, the lowest
  fraction of every group removed, the fraction found by bisection on the symbolic cost model so
  that MACs drop by at least 2x, 4x and 8x (``--round-to N`` keeps a multiple of N units);
- for each batch size (1 and 32) the compressed models are built with ``etp_fx.compress`` for
  that input shape (the result is traced for static shapes); ``verify=True`` at the first batch
  size, ``verify=False`` at the others (same plan, same rewrite; verification at batch 32 costs
  two more forward passes per model on a slow CPU);
- latency of the original ``nn.Module`` and of each compressed ``GraphModule`` under
  ``torch.no_grad()``, in eager mode and under ``torch.compile`` (inductor, default mode), on
  ``--threads`` threads (2). Calls are interleaved round-robin (original, 2x, 4x, 8x, original,
  ...) so that a change of machine load hits all of them alike; the table gives medians;
- **efficiency** = measured speed-up / MACs ratio (1.0: latency falls as fast as MACs).
  Torch-Pruning's README reports 0.57 on resnet50; the goal here is 0.8.

The ``original (fx)`` row (first batch size, eager) is the original model passed through the same
pipeline with nothing removed (``compress(remove={})``): it separates the cost of running an exported ATen graph in
eager mode from the effect of pruning.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from .common import (CACHE, DOCS, add_allow_failures, failure_exit, fmt_x, median,
                     plan_for_macs, setup_env, short_error,
                     time_calls, torchvision_model, unit_l1_norms)

import torch  # noqa: E402  (after common: OMP_WAIT_POLICY)

QUICK = dict(models="resnet18", size=32, batches="1", targets="2", compile=False, budget=0.3,
             fx_baseline=False)


def _ms(x: float) -> str:
    return "–" if x is None or math.isnan(x) else (f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}")


def bench_model(name: str, size: int | None, batches: list[int], targets: list[float],
                modes: list[str], round_to: int, budget_s: float, log,
                fx_baseline: bool = True) -> list[dict]:
    import etp_fx
    model, x1 = torchvision_model(name, size=size)
    s = int(x1.shape[-1])
    g = etp_fx.trace(model, x1)
    norms = unit_l1_norms(g, model)
    plans = {}
    for t in targets:
        plan, frac, reached = plan_for_macs(g, norms, t, round_to=round_to)
        plans[t] = (plan, frac, reached)
        log(f"{name}: target {t:g}x -> f={frac:.3f}, MACs {reached:.2f}x")
    rows = []
    for bs in batches:
        torch.manual_seed(1)
        x = torch.randn(bs, 3, s, s)
        variants: dict[str, torch.nn.Module] = {"original": model}
        info: dict[str, dict] = {"original": {"macs_ratio": 1.0, "params_ratio": 1.0}}
        try:
            if fx_baseline and bs == batches[0]:
                variants["original (fx)"] = etp_fx.compress(model, x, remove={}, graph=g,
                                                            verify=False)
                info["original (fx)"] = {"macs_ratio": 1.0, "params_ratio": 1.0}
        except Exception as e:  # noqa: BLE001
            log(f"{name} b{bs}: compress(remove={{}}) failed: {short_error(e)}")
        for t, (plan, frac, _) in plans.items():
            key = f"{t:g}x"
            try:
                t0 = time.perf_counter()
                # verified at the first batch size; the others run the same plan and rewrite
                small = etp_fx.compress(model, x, remove=plan, graph=g, verify=bs == batches[0])
                r = small.meta["etp_report"]
                variants[key] = small
                info[key] = {"macs_ratio": r["macs_before"] / r["macs_after"],
                             "params_ratio": r["params_before"] / r["params_after"],
                             "frac": frac, "compress_s": time.perf_counter() - t0}
            except Exception as e:  # noqa: BLE001 - a failure is a result
                rows.append({"model": name, "batch": bs, "variant": key, "error": short_error(e, 300)})
                log(f"{name} b{bs} {key}: compress failed: {short_error(e)}")
        for mode in modes:
            fns = {}
            compile_s = {}
            for k, m in variants.items():
                if mode == "eager":
                    fns[k] = m
                elif k != "original (fx)":
                    c = torch.compile(m, dynamic=False)
                    t0 = time.perf_counter()
                    try:
                        with torch.no_grad():
                            c(x)
                    except Exception as e:  # noqa: BLE001
                        rows.append({"model": name, "batch": bs, "variant": k, "mode": mode,
                                     "error": short_error(e, 300)})
                        log(f"{name} b{bs} {k}: torch.compile failed: {short_error(e)}")
                        continue
                    compile_s[k] = time.perf_counter() - t0
                    fns[k] = c
            calls = {k: (lambda m=m: m(x)) for k, m in fns.items()}
            with torch.no_grad():
                # repeats from a first timing of the original: ~budget_s seconds per variant
                t_one = time_calls({"original": calls["original"]}, 1, warmup=1)["original"][0] \
                    if "original" in calls else 0.1
                reps = int(min(30, max(3, budget_s / max(t_one, 1e-4))))
                times = time_calls(calls, reps, warmup=1,
                                   budget_s=budget_s * len(calls))
            base = median(times.get("original", [float("nan")]))
            for k, ts in times.items():
                med = median(ts)
                mr = info[k]["macs_ratio"]
                sp = base / med
                rows.append({"model": name, "batch": bs, "mode": mode, "variant": k,
                             "macs_ratio": mr, "params_ratio": info[k]["params_ratio"],
                             "frac": info[k].get("frac"), "latency_s": med, "n": len(ts),
                             "all_s": ts, "speedup": sp, "efficiency": sp / mr if k not in (
                                 "original", "original (fx)") else float("nan"),
                             "compile_s": compile_s.get(k), "compress_s": info[k].get("compress_s")})
                log(f"{name} b{bs} {mode:7s} {k:14s} MACs {mr:5.2f}x  {med * 1e3:8.1f} ms (n={len(ts)})"
                    f"  speed-up {sp:5.2f}  eff {sp / mr:4.2f}")
            torch._dynamo.reset()
    return rows


# --- report --------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [r for r in rows if "speedup" in r and r["variant"] not in ("original", "original (fx)")]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    top = max([r["macs_ratio"] for r in pts] + [2.0]) * 1.1
    xs = [1, top]
    ax.plot(xs, xs, "k-", lw=1, label="ideal (speed-up = MACs ratio)")
    ax.plot(xs, [0.8 * v for v in xs], "k:", lw=1, label="goal, 0.8 x MACs ratio")
    ax.plot(xs, [0.57 * v for v in xs], "k--", lw=1, label="Torch-Pruning README, 0.57")
    markers = {"eager": "o", "compile": "s"}
    colors = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    series = sorted({(r["model"], r["mode"], r["batch"]) for r in pts})
    for i, (m, mode, bs) in enumerate(series):
        sel = sorted((r for r in pts if (r["model"], r["mode"], r["batch"]) == (m, mode, bs)),
                     key=lambda r: r["macs_ratio"])
        c = colors.setdefault((m, bs), palette[len(colors) % len(palette)])
        ax.plot([r["macs_ratio"] for r in sel], [r["speedup"] for r in sel],
                marker=markers.get(mode, "^"), color=c, ls="-" if mode == "eager" else "-.",
                label=f"{m}, batch {bs}, {mode}")
    ax.set_xlabel("MACs ratio (original / compressed)")
    ax.set_ylabel("measured speed-up (latency original / compressed)")
    ax.set_xlim(1, top)
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"etp_fx on CPU ({torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, argv_text: str, wall_s: float, args) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "latency.png")
    pruned = [r for r in rows if "efficiency" in r and not math.isnan(r["efficiency"])]
    lines = [
        "# Latency: original versus compressed (CPU)",
        "",
        f"Generated by `python -m benchmarks.latency{argv_text}` on {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; wall time {wall_s / 60:.1f} min. "
        "The machine is shared with other jobs (2 cores), so absolute latencies are noisy; the "
        "variants of one (model, batch, mode) were timed interleaved, round-robin, and the ratios "
        f"are what counts. `OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}` "
        "(the benchmarks default to PASSIVE: on an oversubscribed CPU, spinning OpenMP threads "
        "made a resnet50 forward 10x slower; on an idle machine ACTIVE is faster, and the "
        "fixed cost per op that PASSIVE adds, waking the threads, lowers the efficiency of the "
        "small compressed models).",
        "",
        "- plan: L1 norm of each unit's `out` slices, the lowest fraction `f` of every exact group "
        "removed, `f` bisected on the cost model to reach the MACs target"
        + (f"; kept widths rounded up to a multiple of {args.round_to}" if args.round_to > 1 else "") + ";",
        "- `speed-up` = latency(original `nn.Module`) / latency(compressed); `efficiency` = "
        "speed-up / MACs ratio (1.0 is ideal; Torch-Pruning's README reports 0.57 on resnet50; "
        "goal 0.8);",
        "- `original (fx)`: nothing removed, through the same export and rewrite (eager only): the "
        "cost of running the ATen graph instead of the `nn.Module`;",
        "- torch.compile: inductor, default mode, `dynamic=False`; `compile s` is the first call "
        "(inductor cache in `.cache/inductor`, so a rerun is faster).",
        "",
        "![speed-up versus MACs ratio](latency.png)",
        "",
        "## Summary",
        "",
    ]
    if pruned:
        lines.append(f"- median efficiency over all points: **{fmt_x(median([r['efficiency'] for r in pruned]))}**")
        for mode in sorted({r["mode"] for r in pruned}):
            for bs in sorted({r["batch"] for r in pruned}):
                sel = [r for r in pruned if r["mode"] == mode and r["batch"] == bs]
                if sel:
                    lines.append(f"- {mode}, batch {bs}: efficiency "
                                 + ", ".join(f"{r['variant']} {fmt_x(r['efficiency'])}" for r in
                                             sorted(sel, key=lambda r: (r["model"], r["macs_ratio"])))
                                 + (f" ({', '.join(sorted({r['model'] for r in sel}))})"))
    errs = [r for r in rows if "error" in r]
    if errs:
        lines.append(f"- failures: {len(errs)} (see below)")
    lines.append("")
    for m in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {m}", "",
                  "| batch | mode | variant | f | MACs ratio | params ratio | latency ms | n | speed-up "
                  "| efficiency | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["model"] != m or "speedup" not in r:
                continue
            lines.append(
                f"| {r['batch']} | {r['mode']} | {r['variant']} | {fmt_x(r['frac'])} "
                f"| {fmt_x(r['macs_ratio'])} | {fmt_x(r['params_ratio'])} | {_ms(r['latency_s'])} "
                f"| {r['n']} | {fmt_x(r['speedup'])} | {fmt_x(r['efficiency'])} "
                f"| {fmt_x(r['compile_s'], 0) if r['compile_s'] else '–'} |")
        lines.append("")
    if errs:
        lines += ["## Failures", ""]
        for r in errs:
            lines.append(f"- {r['model']} batch {r['batch']} {r['variant']} {r.get('mode', 'compress')}: "
                         f"{r['error']}")
        lines.append("")
    path = out / "latency.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="resnet18 at 64x64, batch 1, 2x, eager only (a smoke test)")
    ap.add_argument("--models", help="comma-separated torchvision models (default resnet50)")
    ap.add_argument("--size", type=int, help="input resolution (default 224, 299 for inception)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,32)")
    ap.add_argument("--targets", help="MACs reduction targets (default 2,4,8)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--no-fx-baseline", action="store_true", help="skip the 'original (fx)' row")
    ap.add_argument("--round-to", type=int, default=1, help="keep a multiple of N units per group")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, help="seconds of timing per variant (default 20)")
    ap.add_argument("--out", default=DOCS, help="directory for latency.md and latency.png")
    ap.add_argument("--raw", help="JSON of the rows (default .cache/benchmarks/latency.json)")
    add_allow_failures(ap)
    a = ap.parse_args(argv)
    setup_env(a.threads)
    q = QUICK if a.quick else {}
    models = (a.models or q.get("models") or "resnet50").split(",")
    size = a.size or q.get("size")
    batches = [int(b) for b in (a.batches or q.get("batches") or "1,32").split(",")]
    targets = [float(t) for t in (a.targets or q.get("targets") or "2,4,8").split(",")]
    modes = ["eager"] if a.no_compile or (a.quick and q.get("compile") is False) else ["eager", "compile"]
    budget = a.budget or q.get("budget") or 20.0
    raw = Path(a.raw) if a.raw else Path(CACHE) / "benchmarks" / (
        "latency_quick.json" if a.quick else "latency.json")
    t0 = time.time()
    rows: list[dict] = []
    for m in models:
        rows += bench_model(m.strip(), size, batches, targets, modes, a.round_to, budget,
                            lambda s: print(s, flush=True),
                            fx_baseline=not a.no_fx_baseline and q.get("fx_baseline", True))
        raw.parent.mkdir(parents=True, exist_ok=True)
        raw.write_text(json.dumps(rows, indent=1))
    argv_text = (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    path = write_report(rows, Path(a.out), argv_text, time.time() - t0, a)
    print(f"wrote {path}")
    failed = [f"{r['model']} batch {r['batch']} {r['variant']} {r.get('mode', 'compress')}: "
              f"{r['error']}" for r in rows if "error" in r]
    return failure_exit(failed, a.allow_failures, "variants")


if __name__ == "__main__":
    sys.exit(main())
