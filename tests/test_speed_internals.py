"""The shortcuts of the trace + compress speed work (docs/compress_speed.md, session 6) give
the results of the plain computations they replace."""
from __future__ import annotations

import copy
import inspect
import random

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.graph import cost as cost_module
from etp_fx.surgery.zero import _positions


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def _plain_positions(coords: tuple[int, ...], gone: list[int]) -> list[int]:
    return [i for i, c in enumerate(coords) if c in set(gone)]


@pytest.mark.parametrize("seed", range(5))
def test_positions_match_the_plain_scan(seed: int) -> None:
    """The block shortcut of zeroed_slices finds what a scan of the coordinates finds, for
    blocks, concat segments, products (repeated units) and units met twice."""
    rng = random.Random(seed)
    for _ in range(400):
        size = rng.randint(1, 7)
        kind = rng.choice(["block", "product", "twice", "scattered"])
        if kind == "block":
            coords = (-1,) * rng.randint(0, 4) + tuple(range(size)) + (-1,) * rng.randint(0, 4)
        elif kind == "product":
            coords = tuple(c for c in range(size) for _ in range(rng.randint(1, 3)))
        elif kind == "twice":
            coords = tuple(range(size)) + (-1,) * rng.randint(0, 2) + tuple(range(size))
        else:
            coords = tuple(rng.choice([-1, *range(size)]) for _ in range(rng.randint(1, 12)))
        gone = sorted(rng.sample(range(size), rng.randint(0, size)))
        assert _positions(coords, gone, tuple(range(size))) == _plain_positions(coords, gone)


def test_cost_formula_walked_and_compiled_agree() -> None:
    """The cost model walks its expression trees for the first evaluations and compiles them
    after: both give the same counts, at full and at reduced widths."""
    g = etp_fx.trace(_cnn(), torch.randn(1, 3, 8, 8))
    cm = g.cost
    rng = random.Random(0)
    widths = [{gr.id: rng.randint(1, gr.size) for gr in g.groups} for _ in range(40)]
    walked = [(cm.params(w), cm.macs(w)) for w in widths[:cost_module._Formula.WALKS]]
    assert cm._macs_fn.fn is None  # still walking
    again = [(cm.params(w), cm.macs(w)) for w in widths]
    assert cm._macs_fn.fn is not None  # compiled by now
    assert again[:len(walked)] == walked
    for w, (params, macs) in zip(widths, again):
        args = cm._args(w)
        assert params == cost_module._compile(cm._params_fn.e)(args)
        assert macs == cost_module._compile(cm._macs_fn.e)(args)


def test_fast_capture_is_compiled_on_first_use() -> None:
    """The fast-path capture generates no code while compress runs on its default path (it
    rewrites working copies); it looks compiled all along: the forward's signature, the input
    spec, copies, printing and calls work, and the result is an ordinary GraphModule."""
    model, x = _cnn(), torch.randn(1, 3, 8, 8)
    g = etp_fx.trace(model, x)
    gm = g.module
    assert gm.meta["etp_capture"] == "fx"
    small = etp_fx.compress(model, x, ratio=0.5, scope="global", graph=g)
    assert "_code" not in gm.__dict__  # no code generated for the capture itself
    lazy = inspect.signature(gm.forward)
    assert gm._in_spec is not None
    twin = copy.deepcopy(gm)
    assert inspect.signature(twin.forward) == lazy
    name = next(iter(lazy.parameters))
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        assert torch.equal(gm(**{name: x}), model(x))  # bound by the signature's name
    assert f"def forward(self, {name})" in gm.code
    assert inspect.signature(gm.forward) == lazy  # the generated forward's signature
    assert isinstance(small, torch.fx.GraphModule)
    assert not isinstance(small, type(gm).__mro__[1])  # not the lazily compiled class
    assert "def forward" in small.code
    assert all(r["passed"] for r in small.meta["etp_report"]["verified"])
