"""etp_fx: structured pruning as torch.fx compiler passes, built around Exponential Torque Pruning.

The package follows the pipeline, each stage importing only the ones before it:
``capture`` -> ``graph`` -> ``regularise`` -> ``surgery`` -> the face (io, render, cli, demo,
baselines). ``docs/design.md`` has the map.
"""
from .errors import (DistanceError, Error, FoldError, InputError, LoadError, ModelError,
                     ModelMismatchError, ModuleOutputError, OptionError, PlanError, RegulariserError, SaveError,
                     SelectionError, TraceError, VerificationError)
from .graph import ChannelGroup, DependencyGraph, Member, distance, graph_to_dict, rule, \
    rules, summary_table, trace
from .regularise import Budget, ETPCallback, ETPTrainerMixin, ElementClipping, \
    ExponentialTorque, NormHistory, Plan, Ratio, Selection, Threshold, Torque, \
    clip_small_weights, plot_norms, progress, select, selection_from
from .surgery import compress, zero_units
from .surgery.module_output import apply_widths, compress_module
from .io import load, save
from .render import write_html, write_svg
from . import baselines, hf
from .hf import from_pretrained, save_pretrained
from .version import __version__  # noqa: F401 - the package version

__all__ = [
    # trace and inspect
    "trace", "DependencyGraph", "ChannelGroup", "Member", "rule", "rules",
    "summary_table", "graph_to_dict", "write_svg", "write_html",
    # compress
    "zero_units", "compress", "Selection", "Budget", "Ratio", "Threshold", "Plan",
    "selection_from", "save", "load",
    # keep the model's class (Hugging Face: generate, save_pretrained)
    "compress_module", "apply_widths", "save_pretrained", "from_pretrained", "hf",
    # regularise and select
    "ExponentialTorque", "Torque", "select", "ElementClipping", "clip_small_weights",
    "distance", "baselines",
    # train
    "NormHistory", "plot_norms", "progress", "ETPCallback", "ETPTrainerMixin",
    # errors: every one derives from etp_fx.Error
    "Error", "InputError", "TraceError", "PlanError", "SelectionError", "RegulariserError",
    "DistanceError", "FoldError", "VerificationError", "LoadError", "SaveError",
    "ModelMismatchError", "ModelError", "ModuleOutputError", "OptionError",
]
