"""etp_fx: structured pruning as torch.fx compiler passes, built around Exponential Torque Pruning."""
from .capture import InputError, TraceError
from .depgraph import ChannelGroup, DependencyGraph, Member
from .rules import rule
from .trace import trace
from .zero import zero_units
from .compress import compress, VerificationError
from .plan import PlanError
from .io import LoadError, load, save
from .torque import ExponentialTorque, RegulariserError, Torque
from .training import ETPCallback, ETPTrainerMixin, NormHistory, plot_norms, progress
from .distance import DistanceError
from .select import ElementClipping, SelectionError, clip_small_weights
from . import baselines, distance, select
from .render import write_html, write_svg
from .report import graph_to_dict, summary_table

__version__ = "0.1.0"
__all__ = [
    # trace and inspect
    "trace", "DependencyGraph", "ChannelGroup", "Member", "rule", "TraceError", "InputError",
    "summary_table", "graph_to_dict", "write_svg", "write_html",
    # compress
    "zero_units", "compress", "VerificationError", "PlanError", "save", "load", "LoadError",
    # regularise and select
    "ExponentialTorque", "Torque", "RegulariserError", "DistanceError", "select",
    "SelectionError", "ElementClipping", "clip_small_weights", "distance", "baselines",
    # train
    "NormHistory", "plot_norms", "progress", "ETPCallback", "ETPTrainerMixin",
]
