"""Every error etp_fx raises, in one family.

All derive from :class:`Error`, so ``except etp_fx.Error`` catches anything etp_fx refuses; each
is also a ``ValueError`` or ``TypeError`` where that is what it means (bad input), so existing
``except ValueError`` code keeps working. Messages name the input, module, node or file and say
what to do. This module is the bottom of the package: every stage may import it.
"""
from __future__ import annotations

__all__ = ["Error", "InputError", "TraceError", "LayoutError", "DistanceError", "PlanError",
           "SelectionError", "RegulariserError", "RewriteError", "FoldError",
           "VerificationError", "LoadError", "ModelSpecError", "SaveError", "ModelMismatchError"]


class Error(Exception):
    """Base of every error etp_fx raises on purpose."""


class InputError(Error, ValueError):
    """The example inputs do not fit the model; the message says what was given and expected."""


class TraceError(Error, RuntimeError):
    """The model could not be captured; the message names the module and source line."""


class LayoutError(Error, ValueError):
    """Two layouts could not be reconciled (the caller freezes what they touch)."""


class DistanceError(Error, ValueError):
    """A unit graph or pivot set is unusable; the message names the group and what is wrong."""


class PlanError(Error, ValueError):
    """A removal plan does not fit the graph (unknown group, bad index, every unit removed), or
    the model does not match the graph it was traced as."""


class SelectionError(Error, ValueError):
    """A selection cannot be made as asked; the message says why and what is reachable."""


class RegulariserError(Error, ValueError):
    """The regulariser cannot be built or applied as asked; the message says what to change."""


class RewriteError(Error, RuntimeError):
    """The rewritten graph is inconsistent; the message carries the node."""


class FoldError(Error, RuntimeError):
    """Removed units carry input-dependent values into a consumer: removing them would change
    the result. ``groups`` names the groups whose kept constants are to blame, where known."""

    def __init__(self, message: str, groups: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message)
        self.groups = tuple(groups)


class VerificationError(Error, RuntimeError):
    """The compressed model does not compute what the zeroed original computes, or there is
    nothing it could be checked on."""


class LoadError(Error, RuntimeError):
    """A file could not be loaded as an etp_fx model; the message names the file."""


class SaveError(Error, ValueError):
    """A model cannot be saved as asked; the message names the path or input."""


class ModelSpecError(Error, ValueError):
    """A model spec could not be resolved; the message lists the accepted forms."""


class ModelMismatchError(Error, ValueError):
    """A graph is used with a model it was not traced from (other parameter names or shapes)."""


class ModelError(Error, TypeError):
    """The model is of a kind etp_fx cannot capture or prune (not an ``nn.Module``, quantized or
    sparse weights, a forward that is random or stateful); the message says what to do."""


__all__ += ["ModelError"]


class OptionError(Error, ValueError):
    """An option has a value it cannot take; the message names the option and what it takes."""


__all__ += ["OptionError"]


class ModuleOutputError(Error, ValueError):
    """A change cannot be made in the user's own modules (``output="module"``): a width their
    code hard-codes, a constant no bias can carry; the message names the module and suggests
    ``output="graph"``."""


__all__ += ["ModuleOutputError"]
