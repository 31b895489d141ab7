"""Helpers shared by the examples: command line, timing, the before/after table, the report.

Nothing here is specific to etp_fx; each example reads top to bottom without it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# the examples run as scripts (python examples/x.py): make `import etp_fx` work from a checkout
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def parser(description: str, *, data_help: str, epochs: int, lr: float, batch_size: int,
           strength: float | None, target_macs: float | None = None,
           target_params: float | None = None) -> argparse.ArgumentParser:
    """The options every example has; an example adds its own with ``add_argument``."""
    p = argparse.ArgumentParser(description=description.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help=data_help)
    p.add_argument("--smoke", action="store_true",
                   help="run offline on generated data with a tiny model (seconds): checks the "
                        "whole path, says nothing about accuracy")
    p.add_argument("--out", default=None, help="output folder (report.json, model.pt2); "
                                               "default ./<example>-out")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--strength", type=float, default=strength,
                   help="a fixed ETP strength (an L1 decay rate), for experts; by default the "
                        "target (--target-macs / --target-params) drives the strength")
    p.add_argument("--target-macs", type=float, default=target_macs,
                   help="share of the dense model's MACs to keep, in (0, 1]")
    p.add_argument("--target-params", type=float, default=target_params,
                   help="share of the dense model's parameters to keep (instead of MACs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-save", action="store_true", help="do not write model.pt2")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (real data)")
    return p


def finish_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """Check ``--data`` / ``--smoke`` and make the output folder."""
    if not args.smoke and not args.data:
        raise SystemExit(f"{name}: give --data PATH (your dataset) or --smoke (generated data)")
    args.out = Path(args.out or f"{name}-out")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.workers = 0
    return args


def smoke_dir(args: argparse.Namespace) -> Path:
    """A fresh folder under ``--out`` for generated smoke data."""
    return Path(tempfile.mkdtemp(prefix="smoke-data-", dir=args.out))


@contextmanager
def timed(label: str, times: dict[str, float]) -> Iterator[None]:
    """Record the wall time of a block in ``times[label]`` (seconds)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        times[label] = time.perf_counter() - t


def table(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table: the first row is the header, columns after the first right-aligned."""
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i])
                       for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def before_after(rep: dict, metrics: list[tuple[str, float, float]]) -> str:
    """The before/after table from a compress report and ``(metric name, dense, compressed)``."""
    rows = [("", "dense", "compressed", "ratio"),
            ("params", f"{rep['params_before']:,}", f"{rep['params_after']:,}",
             f"{rep['params_before'] / max(rep['params_after'], 1):.2f}x"),
            ("MACs", f"{rep['macs_before']:,}", f"{rep['macs_after']:,}",
             f"{rep['macs_before'] / max(rep['macs_after'], 1):.2f}x")]
    for name, a, b in metrics:
        rows.append((name, f"{a:.4g}", f"{b:.4g}", ""))
    return table(rows)


def group_changes(rep: dict, limit: int = 12) -> str:
    """Which groups shrank, old -> new width, and how exact each removal is."""
    rows = [("group", "old", "new", "exactness")]
    items = list(rep["groups"].items())
    for gid, g in items[:limit]:
        rows.append((gid, str(g["old"]), str(g["new"]), g["exactness"]))
    more = f"\n... and {len(items) - limit} more groups" if len(items) > limit else ""
    return table(rows) + more


def log_epoch(epoch: int, label: str, task: Any, reg: Any, model: Any, extra: str = "") -> None:
    """One line per epoch: the task loss, the penalty and how many units are already near zero."""
    left = f"mass left {reg.left:.1%}, strength {reg.strength:.3g}, " if reg.left is not None \
        else ""
    print(f"epoch {epoch}: {label} {task.item():.4f}, penalty {float(reg.last_value):.3g}, "
          f"{extra}{left}near-zero units {reg.near_zero(model)}/{reg.norms.n_units}")


def target(args: argparse.Namespace, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``compress`` target from ``--target-params`` / ``--target-macs`` (params first), or
    ``default`` when neither was given (``--target-macs``'s default when ``default`` is None)."""
    if args.target_params is not None:
        return {"target_params": args.target_params}
    if default is not None and args.target_macs is None:
        return default
    return {"target_macs": args.target_macs}


def regulariser(args: argparse.Namespace, graph: Any, steps: int | None,
                default: dict[str, Any] | None = None, **kw: Any) -> Any:
    """The ETP regulariser: target-driven (the target of :func:`target` and the number of
    training ``steps``: no strength to tune) unless ``--strength`` fixes the strength.
    ``steps`` may be None when a Hugging Face ``ETPCallback`` hands it over at the start."""
    import etp_fx

    if args.strength is not None:
        return etp_fx.ExponentialTorque(graph, strength=args.strength, **kw)
    return etp_fx.ExponentialTorque(graph, steps=steps, **target(args, default), **kw)


def describe(reg: Any) -> str:
    """How the strength is set, for the log: fixed, or the target driving it."""
    if reg.controller is None:
        return f"fixed strength {reg.strength:g}"
    last = reg.controller.last
    state = "" if last is None else (f"; now {last.strength:.3g}, {last.left:.1%} of the "
                                     f"unit-norm mass left in the units it removes")
    return f"strength driven by {reg.target!r}{state}"


def publish(args: argparse.Namespace, name: str, small: Any, metrics: list[tuple[str, float, float]],
            times: dict[str, float], extra: dict[str, Any] | None = None) -> dict:
    """Print the before/after and group tables, save ``model.pt2`` (unless ``--no-save``) and
    write ``report.json``; returns the compress report."""
    import etp_fx

    rep = small.meta["etp_report"]
    print(before_after(rep, metrics))
    print(group_changes(rep))
    if not args.no_save:
        with timed("save", times):
            etp_fx.save(small, args.out / "model.pt2")
    path = write_report(args.out, name, rep, metrics, times, extra)
    print(f"wrote {path}" + ("" if args.no_save else f" and {args.out / 'model.pt2'}"))
    return rep


def write_report(out: Path, name: str, rep: dict, metrics: list[tuple[str, float, float]],
                 times: dict[str, float], extra: dict[str, Any] | None = None) -> Path:
    """Write ``out/report.json``: sizes, metrics, timings, the groups that changed."""
    data = {"example": name,
            **{k: rep[k] for k in ("params_before", "params_after", "macs_before", "macs_after")},
            "macs_speedup": rep["macs_before"] / max(rep["macs_after"], 1),
            "metrics": {m: {"dense": a, "compressed": b} for m, a, b in metrics},
            "seconds": {k: round(v, 3) for k, v in times.items()},
            "groups": {gid: {k: v for k, v in g.items() if k != "removed"}
                       for gid, g in rep["groups"].items()},
            **(extra or {})}
    path = out / "report.json"
    path.write_text(json.dumps(data, indent=1, default=str))
    return path


def limit_threads(smoke: bool) -> None:
    """Smoke runs use one intra-op thread (``ETP_EXAMPLES_THREADS`` overrides): on a small,
    shared CPU, tiny ops on several threads spin-wait on each other (a 5x slower smoke run)."""
    import torch
    n = os.environ.get("ETP_EXAMPLES_THREADS") or ("1" if smoke else None)
    if n:
        torch.set_num_threads(int(n))
