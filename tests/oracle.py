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
    for r, o in zip(ref, got):
        scale = max(float(r.abs().max()), 1e-6)
        assert r.shape == o.shape
        assert float((r - o).abs().max()) <= atol * scale, (float((r - o).abs().max()), scale)
    widths = {gid: g[gid].size - len(u) for gid, u in plan.items()}
    assert sum(p.numel() for n, p in small.named_parameters() if not n.startswith("_etp_bias_")) \
        == g.cost.params(widths)
    return small, g, plan
