"""Cross-check against torch-pruning: the same partition of Conv/Linear output channels.

The unit of comparison is one output index of one Conv/Linear weight that runs on the example
input (``benchmarks.zoo_sweep.out_channel_weights``), the final classifier excluded (its outputs
are the model's interface; torch-pruning is told to keep them). Each group, ours or
torch-pruning's, becomes a *block*: the frozenset of ``(weight name, index ranges)`` of the
output indices it removes. Blocks that touch no such index (ours: groups living only in, say, an
attention head dim of ``in_proj_weight``; a bare parameter, not a Linear) are dropped. The two
sets of blocks must be equal: the same layers coupled, at the same indices.

Torch-pruning builds its graph by autograd tracing and groups by ``get_all_groups``; we build ours
from torch.export's ATen graph, so agreement here is an independent check of both.

Where we deliberately differ:

- ``nn.MultiheadAttention`` (vit_b_16): torch-pruning prunes it as one module whose ``embed_dim``
  is both the residual width and the q/k/v width (``MultiheadAttentionPruner`` cuts the same
  indices from ``in_proj_weight`` rows, columns and ``out_proj``), because the module has one
  ``embed_dim``. We rewrite the graph, so the q/k/v width is free: our heads and head-dims of
  ``in_proj_weight`` are separate groups. ``in_proj_weight`` is not a Linear module and is not
  compared; ``out_proj`` rows are, and TP's MHA out-pruning is mapped onto them. With that, the
  partitions are equal.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import etp_fx  # noqa: E402
from benchmarks.zoo_sweep import (  # noqa: E402
    describe_blocks, our_blocks, out_channel_weights, torchvision_model, tp_result, used_modules)

tp = pytest.importorskip("torch_pruning")
pytest.importorskip("torchvision")


def partitions(name: str, size: int):
    """(our blocks, torch-pruning's blocks, the compared weights) of one torchvision model."""
    model, args, kwargs = torchvision_model(name, size)
    targets = out_channel_weights(model, used_modules(model, args, kwargs))
    inner = dict(list(targets.items())[:-1])  # the last Conv/Linear to run is the classifier
    ours = our_blocks(etp_fx.trace(model, args, kwargs=kwargs), inner)
    theirs = tp_result(model, args, kwargs, targets).blocks
    return ours, theirs, inner


def _check(name: str) -> None:
    # the coupling does not depend on the resolution; a CNN at 64x64 is 12x cheaper to run
    ours, theirs, inner = partitions(name, 224 if name.startswith("vit") else 64)
    assert ours == theirs, (
        f"{name}: only ours {describe_blocks(ours - theirs)}; only torch-pruning "
        f"{describe_blocks(theirs - ours)}")
    # and the blocks cover every non-classifier output channel exactly once
    seen: dict[str, int] = {}
    for b in ours:
        for w, rs in b:
            seen[w] = seen.get(w, 0) + sum(s - a for a, s in rs)
    assert seen == {w: t[1] for w, t in inner.items()}


# about 40 s of CPU for the four on 2 cores; resnet50 adds only the bottleneck block
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_large", "densenet121", "vit_b_16"])
def test_partition_matches_torch_pruning(name):
    _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50"])
def test_partition_matches_torch_pruning_slow(name):
    _check(name)
