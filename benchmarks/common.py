"""Helpers shared by ``benchmarks.compress_speed`` and ``benchmarks.latency``.

- :func:`torchvision_model`: a randomly initialised torchvision classifier (never downloads
  weights) and its example input (224x224, 299x299 for Inception).
- :func:`unit_l1_norms`, :func:`plan_at`, :func:`plan_for_macs`: the benchmark's plan builder.
  Units of every exact group are ranked by the L1 norm of their ``out`` member slices (the
  weights that write the unit, aggregated per unit through ``Member.coords``); the lowest-norm
  fraction of every group is removed, at least one unit is always kept, and the fraction that
  reaches a MACs reduction target is found by bisection on ``graph.cost.macs`` (no compression
  needed to evaluate a candidate).
- :func:`classifier_of`: the last Conv/Linear module to run (torch-pruning's ``ignored_layers``).
- :func:`time_calls`, :func:`median`: timing.
- :func:`add_allow_failures`, :func:`failure_exit`: every benchmark exits non-zero when a cell
  failed, unless ``--allow-failures`` says failures are expected.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Mapping, Sequence

# On a shared, oversubscribed CPU, OpenMP threads that spin while waiting for each other make a
# forward pass up to 10x slower (measured: resnet50 0.45 s -> 4.7 s at 2 threads, load 7 on 2
# cores). Sleeping waiters keep timings sane; this must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
CACHE = os.path.join(ROOT, ".cache")


def setup_env(threads: int | None = 2) -> None:
    """Inductor cache shared with the tests; a fixed number of intra-op threads."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(CACHE, "inductor"))
    if threads:
        torch.set_num_threads(threads)


# --- models ---------------------------------------------------------------------------------------

def input_size(name: str) -> int:
    return 299 if "inception" in name else 224


def torchvision_model(name: str, size: int | None = None, batch: int = 1, seed: int = 0
                      ) -> tuple[nn.Module, torch.Tensor]:
    """``(model in eval mode, example input)`` with random weights (``weights=None``)."""
    import torchvision
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception: init_weights default changes
        model = torchvision.models.get_model(name, weights=None).eval()
    s = size or input_size(name)
    return model, torch.randn(batch, 3, s, s)


def classifier_of(model: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The last ``nn.Conv*``/``nn.Linear`` to run on ``x``: its outputs are the model's
    interface (torch-pruning must be told to leave it alone)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def mem_available() -> int:
    """Bytes of memory the kernel says are available (``MemAvailable``), or a huge number."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 60


# --- the plan builder ----------------------------------------------------------------------------

def unit_l1_norms(graph, model: nn.Module, exact_only: bool = True) -> dict[str, torch.Tensor]:
    """``{group id: L1 norm of each unit}`` over the group's ``out`` member slices.

    ``member.coords[i]`` says which unit index ``i`` of the member's dim belongs to (-1: another
    group's), so a member whose dim mixes several groups (concat, heads) is aggregated right.
    A group with no ``out`` member falls back to every parameter member."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for grp in graph.groups:
            if exact_only and not grp.exact:
                continue
            members = [m for m in grp.members if "out" in m.roles and not m.is_buffer]
            if not members:
                members = [m for m in grp.members if not m.is_buffer]
            norms = torch.zeros(grp.size, dtype=torch.float64)
            for m in members:
                p = tensors.get(m.name)
                if p is None:
                    continue
                p = p.detach()
                per_index = p.abs().transpose(0, m.dim).reshape(p.shape[m.dim], -1).sum(1)
                coords = torch.as_tensor(m.coords, dtype=torch.long)
                ok = coords >= 0
                norms.index_add_(0, coords[ok], per_index[ok].to(torch.float64))
            out[grp.id] = norms
    return out


def _n_removed(size: int, frac: float, round_to: int) -> int:
    """Units to remove from a group of ``size`` at ``frac``: at least one unit kept, and the kept
    count rounded up to a multiple of ``round_to`` (when the group is that wide)."""
    k = min(size - 1, max(0, int(math.floor(frac * size + 1e-9))))
    if round_to > 1 and size >= round_to:
        kept = size - k
        kept = min(size, int(math.ceil(kept / round_to)) * round_to)
        k = size - kept
    return k


def plan_at(norms: Mapping[str, torch.Tensor], frac: float, round_to: int = 1
            ) -> dict[str, list[int]]:
    """Remove the ``frac`` lowest-norm units of every group in ``norms`` (ties: lower index)."""
    plan = {}
    for gid, n in norms.items():
        k = _n_removed(len(n), frac, round_to)
        if k > 0:
            order = torch.argsort(n, stable=True)
            plan[gid] = sorted(order[:k].tolist())
    return plan


def widths_at(norms: Mapping[str, torch.Tensor], frac: float, round_to: int = 1) -> dict[str, int]:
    return {gid: len(n) - _n_removed(len(n), frac, round_to) for gid, n in norms.items()}


def plan_for_macs(graph, norms: Mapping[str, torch.Tensor], target: float, round_to: int = 1,
                  iters: int = 40) -> tuple[dict[str, list[int]], float, float]:
    """The smallest fraction whose plan cuts MACs by at least ``target`` (e.g. 2.0 for 2x),
    found by bisection on ``graph.cost.macs``. Returns ``(plan, fraction, reached MACs ratio)``;
    when no fraction reaches the target, the plan at the largest fraction (one unit kept per
    group) and the ratio it reaches."""
    cost = graph.cost
    m0 = cost.macs()

    def ratio(f: float) -> float:
        return m0 / max(cost.macs(widths_at(norms, f, round_to)), 1)

    lo, hi = 0.0, 1.0 - 1e-9
    if ratio(hi) < target:
        return plan_at(norms, hi, round_to), hi, ratio(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if ratio(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-5:
            break
    return plan_at(norms, hi, round_to), hi, ratio(hi)


# --- timing ----------------------------------------------------------------------------------------

def median(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def timed(fn: Callable, *a, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t, r


def time_calls(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
               budget_s: float | None = None) -> dict[str, list[float]]:
    """Time several callables round-robin (A B C A B C ...) so that a change of machine load
    hits them alike. ``budget_s`` stops early (after at least 3 rounds, or after 1 round when
    even that exceeded the budget)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        if budget_s is not None and (r + 1 >= 3 or spent > budget_s) and \
                spent * (r + 2) / (r + 1) > budget_s:
            break
    return out


def fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_x(x: float | None, nd: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{nd}f}"


def short_error(e: BaseException, limit: int = 160) -> str:
    s = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
    return s if len(s) <= limit else s[:limit - 1] + "…"


# --- exit codes ------------------------------------------------------------------------------------

def add_allow_failures(ap: argparse.ArgumentParser) -> None:
    """The ``--allow-failures`` flag every benchmark takes."""
    ap.add_argument("--allow-failures", action="store_true",
                    help="exit 0 even when some cells failed (they are still reported); "
                         "without it a failed cell makes the exit code 1")


def failure_exit(failures: Sequence[str], allow: bool, what: str = "cells") -> int:
    """The benchmark's exit code: 1 when ``failures`` is not empty (each is printed to stderr,
    so a run that looks finished cannot hide them), 0 when it is empty or ``allow`` is set."""
    if not failures:
        return 0
    print(f"{len(failures)} failed {what}{' (allowed by --allow-failures)' if allow else ''}:",
          file=sys.stderr)
    for f in failures[:20]:
        print(f"  FAILED {f}", file=sys.stderr)
    if len(failures) > 20:
        print(f"  ... and {len(failures) - 20} more", file=sys.stderr)
    return 0 if allow else 1
