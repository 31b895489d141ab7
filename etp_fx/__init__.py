"""etp_fx: structured pruning as torch.fx compiler passes, built around Exponential Torque Pruning."""
from .capture import InputError, TraceError
from .depgraph import ChannelGroup, DependencyGraph, Member
from .rules import rule
from .trace import trace

__version__ = "0.1.0"
__all__ = ["trace", "DependencyGraph", "ChannelGroup", "Member", "rule", "TraceError",
           "InputError"]
