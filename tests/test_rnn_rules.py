"""nn.LSTM, nn.GRU and nn.RNN: their hidden units are one group (gate rows, recurrent columns,
the next layer's and the consumer's columns), exact to remove under the oracle."""
import itertools

import pytest
import torch
import torch.nn as nn

import etp_fx
from oracle import check_oracle

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


class Seq(nn.Module):
    """Linear -> recurrent module -> Linear on every step's output (or on the last h_n)."""

    def __init__(self, cell: str, batch_first: bool = True, bidirectional: bool = False,
                 layers: int = 1, proj: int = 0, bias: bool = True, use_state: bool = False):
        super().__init__()
        kw = dict(num_layers=layers, batch_first=batch_first, bidirectional=bidirectional,
                  bias=bias)
        if proj:
            kw["proj_size"] = proj
        self.inp = nn.Linear(5, 6)
        self.rnn = CELLS[cell](6, 7, **kw)
        self.use_state = use_state
        width = (proj or 7) * (2 if bidirectional and not use_state else 1)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        y, state = self.rnn(torch.relu(self.inp(x)))
        if self.use_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.out(h[-1])  # the last layer's final state
        return self.out(y)


def _hidden(g, cell="lstm"):
    (grp,) = [grp for grp in g.groups if ("rnn.weight_hh_l0", 0) in
              {(m.name, m.dim) for m in grp.members}]
    return grp


def _members(grp):
    return {(m.name, m.dim): m for m in grp.members}


def test_lstm_export_records_one_op_with_flat_weights():
    g = etp_fx.trace(Seq("lstm").eval(), torch.randn(2, 4, 5))
    ops = [str(n.target) for n in g.module.graph.nodes if n.op == "call_function"]
    assert "aten.lstm.input" in ops and not g.barriers


@pytest.mark.parametrize("cell", list(CELLS))
def test_gate_rows_recurrent_and_consumer_columns_are_one_group(cell):
    torch.manual_seed(0)
    g = etp_fx.trace(Seq(cell, layers=2, bidirectional=True).eval(), torch.randn(2, 4, 5))
    grp = _hidden(g, cell)
    mem = _members(grp)
    assert grp.size == 7 and grp.exact and grp.unit_kind == "neuron"
    # unit j owns rows j, H + j, 2H + j, ... of every gate matrix and bias, both directions
    rows = tuple(range(7)) * GATES[cell]
    for name in ("weight_ih_l0", "weight_hh_l1_reverse", "bias_ih_l1", "bias_hh_l0_reverse"):
        assert mem[(f"rnn.{name}", 0)].coords == rows
    assert mem[("rnn.weight_hh_l0", 1)].coords == tuple(range(7))  # recurrent input
    # the next layer reads Cat(forward H, backward H), and so does the Linear after it
    assert mem[("rnn.weight_ih_l1", 1)].coords == tuple(range(7)) * 2
    assert mem[("out.weight", 1)].coords == tuple(range(7)) * 2
    assert {m.role for m in grp.members} >= {"out", "in", "bias"}
    # the Linear before the RNN is its own group, read by layer 0's input columns
    (inp,) = [x for x in g.groups if x.id == "inp.weight[0]"]
    assert _members(inp)[("rnn.weight_ih_l0_reverse", 1)].coords == tuple(range(6))


def test_lstm_projection_is_a_group_of_its_own():
    g = etp_fx.trace(Seq("lstm", layers=2, proj=3).eval(), torch.randn(2, 4, 5))
    hidden = _hidden(g)
    (proj,) = [grp for grp in g.groups if grp.size == 3]
    assert {("rnn.weight_hr_l0", 1), ("rnn.weight_ih_l0", 0)} <= set(_members(hidden))
    assert {("rnn.weight_hr_l0", 0), ("rnn.weight_hh_l0", 1), ("rnn.weight_ih_l1", 1),
            ("out.weight", 1)} <= set(_members(proj))
    assert hidden.exact and proj.exact


def test_macs_count_every_step_of_every_layer():
    m = Seq("gru", layers=2, bidirectional=True).eval()
    g = etp_fx.trace(m, torch.randn(2, 4, 5))
    steps = 2 * 4
    gru = sum(p.numel() for n, p in m.rnn.named_parameters() if n.startswith("weight"))
    assert g.cost.macs() == steps * (gru + 6 * 5 + 3 * 14)


CASES = [(cell, bf, bi, layers, proj)
         for cell, bf, bi, layers in itertools.product(CELLS, (True, False), (False, True), (1, 2))
         for proj in ((0, 3) if cell == "lstm" else (0,))]


@pytest.mark.parametrize("cell,batch_first,bidirectional,layers,proj", CASES,
                         ids=lambda v: str(v))
def test_compress_matches_the_zeroed_original(cell, batch_first, bidirectional, layers, proj):
    torch.manual_seed(layers + 2 * bidirectional)
    m = Seq(cell, batch_first, bidirectional, layers, proj).eval()
    x = torch.randn(3, 4, 5)
    # a time-major capture keeps a guard on dim 0 (the sequence): a static result there
    small, g, plan = check_oracle(m, x, seed=1, frac=0.4, dynamic_batch=batch_first)
    hidden = _hidden(g)
    assert hidden.id in plan
    kept = {grp.size: grp.size - len(plan[grp.id]) for grp in g.groups if grp.id in plan}
    cols = kept[proj] if proj else kept[7]  # w_hh reads the projected units, if any
    assert small.get_parameter("rnn.weight_hh_l0").shape == (GATES[cell] * kept[7], cols)


@pytest.mark.parametrize("cell", list(CELLS))
def test_final_state_consumer_and_no_bias(cell):
    torch.manual_seed(0)
    m = Seq(cell, layers=2, bias=False, use_state=True).eval()
    x = torch.randn(2, 4, 5)
    _, g, plan = check_oracle(m, x, seed=2, frac=0.4)
    assert _hidden(g, cell).id in plan
    assert ("out.weight", 1) in _members(_hidden(g, cell))


def test_unbatched_input():
    torch.manual_seed(0)
    m = Seq("lstm", layers=2).eval()
    check_oracle(m, torch.randn(4, 5), seed=0, frac=0.4, dynamic_batch=False)


class GivenState(nn.Module):
    """h0 from the caller (the model's interface) or a learned parameter."""

    def __init__(self, learned: bool):
        super().__init__()
        self.inp, self.rnn, self.out = nn.Linear(5, 6), nn.GRU(6, 7, batch_first=True), nn.Linear(7, 3)
        self.h0 = nn.Parameter(torch.randn(1, 1, 7)) if learned else None

    def forward(self, x, h0=None):
        h0 = self.h0.expand(1, x.shape[0], 7).contiguous() if self.h0 is not None else h0
        y, _ = self.rnn(self.inp(x), h0)
        return self.out(y)


def test_a_state_passed_in_freezes_the_hidden_units():
    g = etp_fx.trace(GivenState(False).eval(), (torch.randn(2, 4, 5), torch.randn(1, 2, 7)))
    assert not [grp for grp in g.groups if grp.size == 7]


def test_a_learned_initial_state_is_sliced_with_the_units():
    torch.manual_seed(0)
    m = GivenState(True).eval()
    x = torch.randn(2, 4, 5)
    small, g, plan = check_oracle(m, x, seed=0, frac=0.4, dynamic_batch=False)
    grp = _hidden(g)
    assert ("h0", 2) in _members(grp) and grp.id in plan
    assert small.get_parameter("h0").shape[-1] == grp.size - len(plan[grp.id])
