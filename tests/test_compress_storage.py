"""A compressed model is really smaller: no tensor keeps a larger storage alive."""
import torch

from oracle import check_oracle
from test_compress import perturbed
from test_trace_basic import Residual


def test_every_tensor_owns_exactly_its_bytes():
    # keep_constants=True makes constant maps (zero-padded convs) as well as bias folds
    small, _, _ = check_oracle(perturbed(Residual()), torch.randn(2, 3, 8, 8), keep_constants=True)
    assert small.meta["etp_report"]["folds"]
    tensors = dict(small.named_parameters()) | dict(small.named_buffers())
    oversized = {name: (t.untyped_storage().nbytes(), t.numel() * t.element_size())
                 for name, t in tensors.items()
                 if t.untyped_storage().nbytes() != t.numel() * t.element_size()}
    assert not oversized, f"tensors holding more storage than their size: {oversized}"
