"""etp_fx: structured pruning as torch.fx compiler passes, built around Exponential Torque Pruning.

The package follows the pipeline, each stage importing only the ones before it:
``capture`` -> ``graph`` -> ``regularise`` -> ``surgery`` -> the face (io, render, cli, demo,
baselines). ``docs/design.md`` has the map.
"""
from .errors import (DistanceError, Error, FoldError, InputError, LoadError, ModelError, ModelMismatchError,
                     PlanError, RegulariserError, SaveError, SelectionError, TraceError,
                     VerificationError)
from .graph import ChannelGroup, DependencyGraph, Member, distance, graph_to_dict, rule, \
    rules, summary_table, trace
from .regularise import Budget, Plan, Ratio, Selection, Threshold, selection_from, ETPCallback, ETPTrainerMixin, ElementClipping, ExponentialTorque, \
    NormHistory, Torque, clip_small_weights, plot_norms, progress, select
from .surgery import compress, zero_units
from .io import load, save
from .render import write_html, write_svg
from . import baselines
from .version import __version__  # noqa: F401 - the package version

__all__ = [
    # trace and inspect
    "trace", "DependencyGraph", "ChannelGroup", "Member", "rule", "rules",
    "summary_table", "graph_to_dict", "write_svg", "write_html",
    # compress
    "zero_units", "compress", "Selection", "Budget", "Ratio", "Threshold", "Plan", "selection_from", "save", "load",
    # regularise and select
    "ExponentialTorque", "Torque", "select", "ElementClipping", "clip_small_weights",
    "distance", "baselines",
    # train
    "NormHistory", "plot_norms", "progress", "ETPCallback", "ETPTrainerMixin",
    # errors: every one derives from etp_fx.Error
    "Error", "InputError", "TraceError", "PlanError", "SelectionError", "RegulariserError",
    "DistanceError", "FoldError", "VerificationError", "LoadError", "SaveError",
    "ModelMismatchError", "ModelError",
]
