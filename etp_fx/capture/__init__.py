"""Stage 1, capture: a model and example inputs become an ATen-level ``fx.GraphModule`` with a
shape on every node (torch.export, or the fast ``torch.fx`` path that builds the same graph)."""
from .export import as_plain_module, batch_dynamic_shapes, capture
from .fast import check_capture, fast_capture
from .inputs import (check_deterministic, check_model_and_inputs, describe_inputs, eval_mode,
                     flat_inputs, normalize_inputs, untouched)

__all__ = ["capture", "batch_dynamic_shapes", "as_plain_module", "fast_capture",
           "check_capture", "normalize_inputs", "describe_inputs", "eval_mode", "flat_inputs",
           "untouched", "check_model_and_inputs", "check_deterministic"]
