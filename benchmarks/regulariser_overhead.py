"""Step-time overhead of the ETP regulariser on CPU, against torch-pruning's GroupNormPruner.

    python -m benchmarks.regulariser_overhead            # ResNet-18 and ViT-tiny, ~10 min
    python -m benchmarks.regulariser_overhead --models resnet18:32   # batch 32
    python -m benchmarks.regulariser_overhead --quick    # tiny models, seconds (smoke test)

For each model, in one process and round-robin (A B C ... A B C ...), so that a change of
machine load hits every variant alike, it times one SGD training step (forward, loss,
backward, optimizer step):

- ``base``: no regulariser;
- ``etp``: ``+ ExponentialTorque(strength=1e-3)(model)`` in the loss (L1, group units);
- ``etp-l2``: the same with ``norm="l2"``;
- ``etp-every8``, ``etp-every16``: lazy regularisation (``every=k``: one step in k applies
  k times the penalty);
- ``paper``: ``preset="paper"`` (output rows of Conv/Linear weights only);
- ``etp-decoupled``, ``etp-decoupled-l2``: the same penalty as a decoupled proximal update
  (``reg.attach(optimizer)``: soft-thresholding after every ``optimizer.step()``, no loss
  term), at every step; each on its own optimiser over the same weights;
- ``etp-decoupled-fused``, ``etp-decoupled-l2-fused``: the same with the fused update
  (``reg.attach(optimizer, fused=True)``; with SGD and L1 units SGD's step and the update run
  as one compiled loop per weight); ``etp-decoupled-fused-post``: the compiled update after
  the optimiser's own step (an SGD subclass, which is not fused with it); ``base-fused-sgd``:
  the fused SGD step with a strength of 1e-30, i.e. SGD compiled, the fair base for
  ``etp-decoupled-fused``; ``base-adamw``, ``etp-decoupled-fused-adamw``,
  ``base-fused-adamw``: the same three with AdamW (overheads reported against
  ``base-adamw``). Compiles happen in the warm-up and are not timed; not with ``--quick``;
- ``etp-decoupled-every4``: the decoupled update on one step in 4 (4 times the step size),
  for comparison with ``etp-every8`` (not an every-step form);
- ``prox-alone``, ``prox-alone-l2`` (and ``-fused``): the proximal update by itself (``reg.proximal(model,
  lr)``, no forward, backward or optimiser step), reported as its time over ``base``'s: the
  update's own cost, steadier than the difference of two noisy steps;
- ``groupnorm``: ``GroupNormPruner.regularize(model)`` after backward (DepGraph);
- with ``--compile``: ``etp-compiled``, the penalty compiled with ``torch.compile``.

It reports median wall time and median process CPU time per step, and the overhead of each
variant over ``base`` (median over rounds of the per-round ratio), and writes
``docs/regulariser_overhead.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# Sleeping (not spinning) OpenMP waiters: on a shared CPU spinning makes timings meaningless.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/etp_fx_inductor_cache")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resnet18():
    import torchvision
    return torchvision.models.resnet18(num_classes=10)


def vit_tiny(size: int):
    from torchvision.models import VisionTransformer
    # ViT-Ti/16: 12 layers, 3 heads, width 192, MLP 768 (timm's vit_tiny_patch16_224)
    return VisionTransformer(image_size=size, patch_size=16, num_layers=12, num_heads=3,
                             hidden_dim=192, mlp_dim=768, num_classes=10)


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def make_variants(model, x, y, *, compile_: bool, fused: bool = True) -> dict:
    import etp_fx
    from etp_fx.regularise.torque import ExponentialTorque

    g = etp_fx.trace(model, x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    regs = {
        "etp": ExponentialTorque(g, strength=1e-3),
        "etp-l2": ExponentialTorque(g, strength=1e-3, norm="l2"),
        "etp-every8": ExponentialTorque(g, strength=1e-3, every=8),
        "etp-every16": ExponentialTorque(g, strength=1e-3, every=16),
        "paper": ExponentialTorque(g, preset="paper"),
    }

    def step(extra=None, after=None):
        def run():
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            if extra is not None:
                loss = loss + extra(model)
            loss.backward()
            if after is not None:
                after(model)
            opt.step()
        return run

    variants = {"base": step()}
    for k, r in regs.items():
        variants[k] = step(r)
    forms = [("", "l1", 1, False), ("-l2", "l2", 1, False), ("-every4", "l1", 4, False)]
    if fused:
        forms += [("-fused", "l1", 1, True), ("-fused-post", "l1", 1, True),
                  ("-l2-fused", "l2", 1, True)]
    for suffix, norm, every, fuse in forms:
        reg = ExponentialTorque(g, strength=1e-3, norm=norm, model=model, every=every)
        # -fused-post: a subclass of SGD, which the regulariser does not fuse with its update
        sgd = _SeparateSGD if suffix == "-fused-post" else torch.optim.SGD
        own = sgd(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        reg.attach(own, model, fused=fuse)
        variants[f"etp-decoupled{suffix}"] = decoupled_step(model, own, x, y)
        regs[f"etp-decoupled{suffix}"] = reg
        if every == 1 and suffix != "-fused-post":
            variants[f"prox-alone{suffix}"] = lambda reg=reg: reg.proximal(model, 1e-3)
    if fused:  # the same compiled step with a penalty too small to matter: SGD compiled
        reg = ExponentialTorque(g, strength=1e-30, model=model)
        own = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        reg.attach(own, model, fused=True)
        variants["base-fused-sgd"] = decoupled_step(model, own, x, y)
        variants.update(adamw_variants(g, model, x, y))
    try:
        import torch_pruning as tp
        ignored = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        pruner = tp.pruner.GroupNormPruner(
            model, x[:1], importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, ignored_layers=ignored, reg=1e-4)
        variants["groupnorm"] = step(after=pruner.regularize)
    except ImportError:
        print("torch-pruning is not installed: no groupnorm baseline", file=sys.stderr)
    if compile_:
        reg = ExponentialTorque(g, strength=1e-3)
        fn = torch.compile(reg.__call__, fullgraph=True)
        t = time.perf_counter()
        fn(model).backward()
        print(f"  compiling the penalty took {time.perf_counter() - t:.0f} s", file=sys.stderr)
        variants["etp-compiled"] = step(fn)
    units = {k: r.norms.n_units for k, r in regs.items()}
    return variants, units


def adamw_variants(g, model, x, y) -> dict:
    """AdamW: its eager step (``base-adamw``), with the fused update inside it
    (``etp-decoupled-fused-adamw``), and the same compiled step with a negligible strength
    (``base-fused-adamw``)."""
    from etp_fx.regularise.torque import ExponentialTorque

    out = {}
    for name, strength in (("base-adamw", None), ("etp-decoupled-fused-adamw", 1e-3),
                           ("base-fused-adamw", 1e-30)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        if strength is not None:
            ExponentialTorque(g, strength=strength, model=model).attach(opt, model, fused=True)
        out[name] = decoupled_step(model, opt, x, y)
    return out


class _SeparateSGD(torch.optim.SGD):
    """Plain SGD under another type: attach(fused=True) then runs the fused update after the
    optimiser's own step instead of inside it (the ``-fused-post`` variant)."""


def decoupled_step(model, opt, x, y):
    """One step whose optimiser applies the regulariser attached to it after the update."""
    def run():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def measure(variants: dict, rounds: int, warmup: int) -> dict:
    for _ in range(warmup):
        for f in variants.values():
            f()
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for _ in range(rounds):
        for k, f in variants.items():
            c, t = time.process_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


def overhead(xs, base) -> float:
    """Median over rounds of (variant / base - 1): robust to slow drifts of machine load."""
    return statistics.median(a / b - 1 for a, b in zip(xs, base))


def run_model(name, model, x, y, rounds, warmup, compile_, only=None, fused=True):
    torch.manual_seed(0)
    variants, units = make_variants(model, x, y, compile_=compile_, fused=fused)
    if only:
        variants = {k: f for k, f in variants.items() if k == "base" or k in only}
        units = {k: n for k, n in units.items() if k in variants}
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params / 1e6:.2f} M params, input {tuple(x.shape)}; "
          f"{len(variants)} variants x {rounds} rounds", file=sys.stderr)
    res = measure(variants, rounds, warmup)
    rows = []
    for k in variants:
        w, c = res["wall"][k], res["cpu"][k]
        rows.append({"variant": k, "wall_ms": 1e3 * statistics.median(w),
                     "cpu_ms": 1e3 * statistics.median(c),
                     "wall_overhead": None if k == "base" else overhead(w, res["wall"]["base"]),
                     "cpu_overhead": None if k == "base" else overhead(c, res["cpu"]["base"]),
                     "alone": k.startswith("prox-alone")})
    pairs = {"fused_vs_compiled_sgd": ("etp-decoupled-fused", "base-fused-sgd"),
             "adamw_fused_vs_eager": ("etp-decoupled-fused-adamw", "base-adamw"),
             "adamw_fused_vs_compiled": ("etp-decoupled-fused-adamw", "base-fused-adamw")}
    extra = {k: overhead(res["cpu"][a], res["cpu"][b]) if a in res["cpu"] and b in res["cpu"]
             else None for k, (a, b) in pairs.items()}
    return {"model": name, "params": n_params, "input": tuple(x.shape), "rows": rows,
            "units": units, "rounds": rounds, **extra}


def pct(v):
    return "–" if v is None else f"{100 * v:+.1f} %"


def share(row, key: str) -> str:
    """The overhead column: ``variant / base - 1``, or for an update timed alone its own time
    as a share of the base step (``variant / base``)."""
    v = row[key]
    return f"{100 * (1 + v):.2f} % of base" if row.get("alone") and v is not None else pct(v)


def pct_of(v) -> str:
    return "–" if v is None else f"{100 * (1 + v):.2f} %"


def report(results, args) -> str:
    lines = [
        "# Regulariser overhead on CPU",
        "",
        "Generated by `python -m benchmarks.regulariser_overhead"
        + (" " + " ".join(args.argv) if args.argv else "") + "`.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} logical CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}. One SGD step (momentum, weight decay): forward, "
        "cross-entropy, backward, optimizer step. Variants run round-robin in one process; "
        "the overhead is the median over rounds of `variant / base - 1` (wall clock and "
        "process CPU time).",
        "",
    ]
    summary = []
    for r in results:
        o = {row["variant"]: row["cpu_overhead"] for row in r["rows"]}
        if o.get("etp") is not None and o.get("groupnorm") is not None:
            summary.append(
                f"- {r['model']} (batch {r['input'][0]}): ETP adds {pct(o['etp'])} CPU time per "
                f"step, torch-pruning's GroupNormPruner.regularize {pct(o['groupnorm'])}"
                + (f"; ETP with every=8 {pct(o['etp-every8'])}, every=16 "
                   f"{pct(o.get('etp-every16'))}" if o.get("etp-every8") is not None else "")
                + ".")
        if o.get("etp-decoupled") is not None:
            summary.append(
                f"- {r['model']} (batch {r['input'][0]}): the decoupled update at every step "
                f"(`reg.attach(optimizer)`) adds {pct(o['etp-decoupled'])} CPU time per step "
                f"(L2 units {pct(o.get('etp-decoupled-l2'))}); timed alone it costs "
                f"{pct_of(o.get('prox-alone'))} of a base step (L2 {pct_of(o.get('prox-alone-l2'))})"
                + (f"; the loss-term form {pct(o['etp'])}" if o.get("etp") is not None else "")
                + ".")
        if o.get("etp-decoupled-fused") is not None:
            summary.append(
                f"- {r['model']} (batch {r['input'][0]}): the fused decoupled update at every "
                f"step (`reg.attach(optimizer, fused=True)`, SGD's step and the update in one "
                f"loop) changes the step by {pct(o['etp-decoupled-fused'])} CPU time against "
                f"the eager SGD step, {pct(r.get('fused_vs_compiled_sgd'))} against the same "
                f"compiled SGD step without the penalty (`base-fused-sgd`, itself "
                f"{pct(o.get('base-fused-sgd'))}); the compiled update after SGD's own step "
                f"(`-fused-post`) {pct(o.get('etp-decoupled-fused-post'))}, timed alone "
                f"{pct_of(o.get('prox-alone-fused'))} of a base step; L2 units "
                f"{pct(o.get('etp-decoupled-l2-fused'))}.")
        if r.get("adamw_fused_vs_eager") is not None:
            summary.append(
                f"- {r['model']} (batch {r['input'][0]}), AdamW: the fused update inside "
                f"AdamW's step changes the step by {pct(r['adamw_fused_vs_eager'])} CPU time "
                f"against AdamW's eager step, {pct(r.get('adamw_fused_vs_compiled'))} against "
                f"the same compiled AdamW step without the penalty.")
    if summary:
        lines += ["## Summary", ""] + summary + [""]
    lines += [
        "## How to read this",
        "",
        "The penalty's cost does not depend on the batch: per step it reads every penalised "
        "weight in the forward (one fused reduction per parameter), writes a gradient of the "
        "same size in the backward (one broadcast multiply, `sgn(W) * C`), and autograd adds "
        "that gradient to the task's. That is a few passes over the weights, the same order "
        "of memory traffic as the SGD step itself, so its share is largest where the step "
        "does little arithmetic per weight: small inputs, small batches, CPU. A larger batch "
        "(the `:32` row, when present) divides the share accordingly. `every=k` (lazy "
        "regularisation) divides the cost by k. torch-pruning's `GroupNormPruner.regularize` "
        "gathers and scatters the weights group by group with index copies, several times "
        "the traffic.",
        "",
        "The decoupled update (`reg.attach(optimizer)`) has no forward or backward part: "
        "after `optimizer.step()` it soft-thresholds every penalised weight, `sign(w) * "
        "max(|w| - t, 0)` with a per-unit `t` broadcast over the weight (L2: one norm read "
        "and one scaled write). In eager mode that is four kernels per weight (abs, a "
        "broadcast subtract, clamp, copysign), and CPU kernels with an operand broadcast over "
        "3x3 blocks are slow: several times one read-and-write of the weights (`prox-alone`). "
        "The fused update (`attach(optimizer, fused=True)`, `etp_fx/regularise/fused.py`) "
        "compiles the whole update into one loop per weight that reads and writes each weight "
        "once, with the coefficient as a row part plus a column part of the weight's matrix "
        "view (two short vectors), on one thread.",
        "",
        "Wall-clock times on a shared machine include time the process waited for a core; "
        "the CPU-time columns are steadier.",
        "",
    ]
    for r in results:
        lines += [f"## {r['model']}", "",
                  f"{r['params'] / 1e6:.2f} M parameters, input {r['input']}, "
                  f"{r['rounds']} rounds; penalised units: "
                  + ", ".join(f"{k} {v}" for k, v in r["units"].items()) + ".", "",
                  "| variant | step wall (median) | overhead (wall) | step CPU (median) "
                  "| overhead (CPU) |",
                  "|---|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {row['wall_ms']:.1f} ms | "
                         f"{share(row, 'wall_overhead')} | {row['cpu_ms']:.1f} ms | "
                         f"{share(row, 'cpu_overhead')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, few rounds (smoke test)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--models", default="resnet18,vit_tiny")
    p.add_argument("--compile", action="store_true", help="also time a compiled penalty")
    p.add_argument("--only", default="", help="comma-separated variants to time (base always)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "regulariser_overhead.md"),
                   help="markdown report ('-' for stdout only)")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        models = {"tiny_cnn": (tiny_cnn, 16)}
        rounds = args.rounds or 3
    else:
        builders = {"resnet18": (resnet18, args.size),
                    "vit_tiny": (lambda: vit_tiny(args.size), args.size)}
        models = {}
        for spec in args.models.split(","):  # NAME or NAME:BATCH
            k, _, b = spec.partition(":")
            if k not in builders:
                p.error(f"unknown model {k!r}; use {sorted(builders)}")
            models[spec] = (*builders[k], int(b) if b else args.batch)
        rounds = args.rounds or 15
    results = []
    for name, spec in models.items():
        build, size = spec[0], spec[1]
        batch = spec[2] if len(spec) > 2 else args.batch
        torch.manual_seed(0)
        model = build().train()
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        results.append(run_model(name, model, x, y, rounds, 0 if args.quick else args.warmup,
                                 args.compile, [v for v in args.only.split(",") if v],
                                 fused=not args.quick))
    text = report(results, args)
    print(text)
    if args.out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
