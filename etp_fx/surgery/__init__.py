"""Stage 4, surgery: plans, zeroing, the FX rewrite into smaller tensors, constant folding,
verification against the zeroed original, and :func:`compress` that runs them in order."""
from .compress import compress
from .zero import zero_units

__all__ = ["compress", "zero_units"]
