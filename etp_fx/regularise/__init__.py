"""Stage 3, regularise: unit sets and their norms, the ETP and Torque penalties, which units to
remove (selection), and training helpers."""
from . import select
from .clipping import ElementClipping, clip_small_weights
from .norms import UnitNorms, unit_norms
from .selection import Budget, Plan, Ratio, Selection, Threshold, selection_from
from .torque import ExponentialTorque, Torque
from .training import ETPCallback, ETPTrainerMixin, NormHistory, plot_norms, progress
from .units import UnitSet, paper_unit_sets, unit_sets_from_graph

__all__ = ["ExponentialTorque", "Torque", "UnitSet", "UnitNorms", "unit_norms",
           "unit_sets_from_graph", "paper_unit_sets", "select", "clip_small_weights",
           "ElementClipping", "ETPCallback", "ETPTrainerMixin", "NormHistory", "plot_norms",
           "progress", "Selection", "Budget", "Ratio", "Threshold", "Plan", "selection_from"]
