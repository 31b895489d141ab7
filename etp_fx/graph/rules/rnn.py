"""Channel rules for the recurrent ops ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` record in the
export graph: ``aten.lstm.input``, ``aten.gru.input``, ``aten.rnn_tanh.input``,
``aten.rnn_relu.input``, each with the flat list of weights of every layer and direction.

One op call runs every layer and both directions with one hidden size (the op reads it off the
weights and the initial state), so the hidden units of one module are one group ``H``:

- the gate blocks: ``weight_ih`` and ``weight_hh`` rows and both biases are ``Cat(H, .., H)``,
  one ``H`` per gate (LSTM i, f, g, o; GRU r, z, n; RNN one), so unit ``j`` owns rows
  ``j, H + j, 2H + j, ...``;
- the recurrent input: ``weight_hh`` columns (``proj_size``: the ``P`` projected units, which
  ``weight_hr`` writes from ``H``, are a group of their own);
- the next layer's ``weight_ih`` columns, ``Cat(H, H)`` when bidirectional, like the output's
  feature dim, read by whatever consumes the output;
- the initial states' last dim (a zeros tensor made in the graph is resized with it; a state
  passed in is the model's interface, which freezes the group).

Exact: a removed unit's gate pre-activations are 0 (rows and biases zeroed), so an RNN emits
``act(0) = 0``; a GRU ``h = (1 - z) n + z h' = h' / 2`` and an LSTM ``c = c' / 2``,
``h = tanh(c) / 2``, both 0 from a zero initial state. Whatever the state, it reaches kept
units only through zeroed ``weight_hh`` and next-layer ``weight_ih`` columns.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..layout import Cat, Term
from .aten import contracts
from .table import RuleContext, ZeroContext, rule

__all__ = ["GATES", "recurrent"]

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _kind(node: fx.Node) -> str:
    return node.target.__name__.split(".")[0]


def _states(node: fx.Node) -> list[Any]:
    """The initial states: ``[h0, c0]`` for an LSTM, ``[h0]`` otherwise."""
    hx = node.args[1]
    return list(hx) if isinstance(hx, (list, tuple)) else [hx]


def _layout(node: fx.Node) -> dict[str, Any]:
    """Layers, directions, biases and projection of an RNN call, read off its arguments."""
    _, _, params, has_biases, num_layers, _, _, bidirectional, batch_first = node.args[:9]
    states = _states(node)
    proj = len(states) == 2 and states[0].meta["val"].shape[-1] != states[1].meta["val"].shape[-1]
    per = 2 + 2 * bool(has_biases) + int(proj)
    return {"params": list(params), "biases": bool(has_biases), "layers": int(num_layers),
            "dirs": 2 if bidirectional else 1, "proj": proj, "per": per,
            "batch_first": bool(batch_first)}


def _couple_layer(ctx: RuleContext, ws: list[Any], rows: Term, h: Term, out: Term,
                  inp: Term, lay: dict[str, Any]) -> None:
    """One layer and direction: ``[w_ih, w_hh, (b_ih, b_hh), (w_hr)]``."""
    w_ih, w_hh = ws[0], ws[1]
    for w in (w_ih, w_hh):
        ctx.same(ctx.dims(w)[0], rows)
        ctx.role(w, 0, "out")
        # a weight computed in the graph (weight norm, say) must itself be zero there
        contracts(ctx, [ctx.dims(w)[1]], [(w, 1)], "a recurrent layer")
    ctx.same(ctx.dims(w_ih)[1], inp)
    ctx.role(w_ih, 1, "in")
    ctx.same(ctx.dims(w_hh)[1], out)
    ctx.role(w_hh, 1, "in")
    if lay["biases"]:
        for b in ws[2:4]:
            ctx.same(ctx.dims(b)[0], rows)
            ctx.role(b, 0, "bias")
    if lay["proj"]:
        w_hr = ws[-1]
        ctx.same(ctx.dims(w_hr)[0], out)
        ctx.role(w_hr, 0, "out")
        ctx.same(ctx.dims(w_hr)[1], h)
        ctx.role(w_hr, 1, "in")


def _couple_states(ctx: RuleContext, node: fx.Node, x_batch: Term | None, h: Term,
                   out: Term) -> None:
    """h0 (and c0) ~ h_n (and c_n): [layers x directions, (batch,) units]."""
    for i, s in enumerate(_states(node)):
        sd, yd = ctx.dims(s), ctx.out(i + 1)
        ctx.same_all(sd, yd)
        ctx.same(sd[-1], out if i == 0 else h)
        ctx.freeze([sd[0]], "layers x directions of a recurrent state")
        if x_batch is not None and len(sd) == 3:
            ctx.same(sd[1], x_batch)


def _rnn_zero(z: ZeroContext, node: fx.Node) -> Any:
    # output and h_n are zero at removed units from zero initial states (c0 for an LSTM, whose
    # h is tanh(c) / 2; with a projection the removed rows of w_hr zero h anyway); an RNN's
    # act(0) is 0 whatever the state
    kind, lay = _kind(node), _layout(node)
    flags = [z.of(s) or [False] for s in _states(node)]
    from_zero = all(bool(f[-1]) for f in flags)
    out_zero = kind.startswith("rnn") or lay["proj"] or from_zero
    n = len(z.shape(node.args[0]))
    y = [False] * (n - 1) + [bool(out_zero)]
    states = [[False] * (len(z.shape(s)) - 1) + [bool(from_zero)] for s in _states(node)]
    return (y, *states)


def _rnn_macs(c: Any, node: fx.Node) -> Any:
    # every time step of every sequence runs each layer's matrices once: w_ih, w_hh (and w_hr)
    steps: Any = 1
    for t in c.dims(node.args[0])[:-1]:
        steps = steps * c.size(t)
    per_step: Any = 0
    for w in _layout(node)["params"]:
        if len(c.dims(w) or []) == 2:
            per_step = per_step + c.numel(w)
    return steps * per_step


@rule(torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.rnn_tanh.input,
      torch.ops.aten.rnn_relu.input, zero=_rnn_zero, cost=_rnn_macs)
def recurrent(ctx: RuleContext, node: fx.Node) -> None:
    # rows of every w_ih, w_hh, b_ih, b_hh = Cat(H x gates); w_hh cols ~ H (or P); layer 0's
    # w_ih cols ~ x[-1], layer l's ~ y features = Cat(H, H) bidirectional; h0[-1] ~ H (or P),
    # c0[-1] ~ H; y[:-1] ~ x[:-1]
    x, lay = node.args[0], _layout(node)
    xd, y = ctx.dims(x), ctx.out(0)
    states = _states(node)
    w_hh0 = lay["params"][1]
    h = ctx.fresh(ctx.shape(w_hh0)[0] // GATES[_kind(node)], "recurrent hidden units")
    out = ctx.fresh(ctx.shape(states[0])[-1], "recurrent projection") if lay["proj"] else h
    rows = Cat((h,) * GATES[_kind(node)]) if GATES[_kind(node)] > 1 else h
    feats = Cat((out,) * lay["dirs"]) if lay["dirs"] > 1 else out
    ctx.same_all(xd[:-1], y[:-1])
    ctx.same(y[-1], feats)
    for layer in range(lay["layers"]):
        for d in range(lay["dirs"]):
            i = (layer * lay["dirs"] + d) * lay["per"]
            ws = lay["params"][i:i + lay["per"]]
            _couple_layer(ctx, ws, rows, h, out, xd[-1] if layer == 0 else feats, lay)
    batch = None if len(xd) == 2 else xd[0 if lay["batch_first"] else 1]
    _couple_states(ctx, node, batch, h, out)
