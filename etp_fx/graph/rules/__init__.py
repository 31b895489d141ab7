"""The per-op channel-rule table (the one extension point) and the built-in ATen rules."""
from .table import RULES, Rule, RuleContext, ZeroContext, aten_ops, lookup, rule
from . import aten as _aten  # noqa: F401 - fills RULES
from . import rnn as _rnn  # noqa: F401 - fills RULES (LSTM, GRU, RNN)

__all__ = ["RULES", "Rule", "RuleContext", "ZeroContext", "aten_ops", "lookup", "rule"]
