"""etp_fx: structured pruning as torch.fx compiler passes, built around Exponential Torque Pruning."""
from .capture import InputError, TraceError
from .depgraph import ChannelGroup, DependencyGraph, Member
from .rules import rule
from .trace import trace
from .zero import zero_units
from .compress import compress, VerificationError
from .plan import PlanError
from .io import LoadError, load, save

__version__ = "0.1.0"
__all__ = ["save", "load", "LoadError", "trace", "zero_units", "compress", "VerificationError", "PlanError", "DependencyGraph", "ChannelGroup", "Member", "rule", "TraceError",
           "InputError"]
