"""Stage 1, capture: a model and example inputs become an ATen-level ``fx.GraphModule`` with a
shape on every node (torch.export, or the fast ``torch.fx`` path that builds the same graph).

A capture keeps every input dim the model allows dynamic when asked (:mod:`.dynamic`), takes
the original's call forms (:mod:`.calls`: positional or keyword, optional masks,
``use_cache=False`` for Hugging Face models) and behaves like a plain module (:mod:`.plain`).
"""
from .calls import CallForm, bind_call, bound_inputs
from .compare import Comparison, compare_outputs, interface_difference, outputs_agree
from .dynamic import another_shape
from .export import batch_dynamic_shapes, capture
from .fast import check_capture, fast_capture
from .inputs import (check_deterministic, check_model_and_inputs, describe_inputs, eval_mode,
                     flat_inputs, normalize_inputs, untouched)
from .plain import as_plain_module

__all__ = ["capture", "batch_dynamic_shapes", "as_plain_module", "fast_capture",
           "check_capture", "normalize_inputs", "describe_inputs", "eval_mode", "flat_inputs",
           "untouched", "check_model_and_inputs", "check_deterministic", "outputs_agree",
           "CallForm", "bind_call", "bound_inputs", "another_shape", "Comparison",
           "compare_outputs", "interface_difference"]
