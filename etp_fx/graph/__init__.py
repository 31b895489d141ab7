"""Stage 2, graph: the channel algebra, the per-op rule table, the dependency graph of coupled
channels, its cost model and unit distances, and :func:`trace` (capture + build)."""
from . import distance, rules
from .cost import CostModel
from .depgraph import ChannelGroup, DependencyGraph, Member, build_graph
from .describe import graph_to_dict, summary_table
from .rules import rule
from .signature import check_model_matches, signature_of, structure_of
from .trace import trace, trace_args

__all__ = ["trace", "trace_args", "build_graph", "DependencyGraph", "ChannelGroup", "Member",
           "CostModel", "rule", "rules", "distance", "summary_table", "graph_to_dict",
           "check_model_matches", "signature_of", "structure_of"]
