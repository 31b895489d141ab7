"""The correctness oracle shared by the compress tests: compress(m, x, S)(x) == zero_units(copy(m), g, S)(x)."""
import copy
import random

import torch
import torch.utils._pytree as pytree

import etp_fx


def random_plan(graph, frac=0.3, seed=0, exact_only=True):
    """Remove a random ``frac`` of the units (at least one, never all) of every exact group."""
    rng = random.Random(seed)
    plan = {}
    for grp in graph.groups:
        if exact_only and not grp.exact:
            continue
        k = min(grp.size - 1, max(1, int(frac * grp.size)))
        plan[grp.id] = sorted(rng.sample(range(grp.size), k))
    return plan


def leaves(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _close(ref: list, got: list, atol: float) -> bool:
    """Every output within ``atol`` of its scale (shapes must match)."""
    for r, o in zip(ref, got):
        assert r.shape == o.shape
        if float((r - o).abs().max()) > atol * max(float(r.abs().max()), 1e-6):
            return False
    return True


def check_oracle(model, inputs, plan=None, frac=0.3, seed=0, keep_constants=False, atol=1e-5, **kw):
    """Compress and compare with the zeroed original; return (small model, graph, plan)."""
    model = model.eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    g = etp_fx.trace(model, args)
    plan = random_plan(g, frac, seed) if plan is None else plan
    small = etp_fx.compress(model, args, remove=plan, graph=g, keep_constants=keep_constants, **kw)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=keep_constants).eval()
    with torch.no_grad():
        ref, got = leaves(zeroed(*args)), leaves(small(*args))
    assert len(ref) == len(got)
    if not _close(ref, got, atol):
        # float32 rounding amplified by an ill-conditioned op (a LayerNorm over 2 features)?
        # then in float64 both must agree to 1e-9 of the output's scale
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        with torch.no_grad():
            ref, got = leaves(zeroed.double()(*args64)), leaves(copy.deepcopy(small).double()(*args64))
        assert _close(ref, got, 1e-9), "differs in float32 and in float64"
    widths = {gid: g[gid].size - len(u) for gid, u in plan.items()}
    assert sum(p.numel() for n, p in small.named_parameters() if not n.startswith("_etp_bias_")) \
        == g.cost.params(widths)
    return small, g, plan
