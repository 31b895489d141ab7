"""The correctness oracle over generated architectures (hypothesis).

For random architectures and random removal sets in exact groups:
compress(m, x, remove=S)(x) == zero_units(copy(m), g, S)(x) (to 1e-5 of the output's scale),
params drop exactly as the cost model predicts, and removing every unit of a group is refused.
CI runs the ``ci`` profile; ``HYPOTHESIS_PROFILE=soak`` runs 10,000 examples.
"""
import copy
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import etp_fx
import etp_fx.surgery.fold
from oracle import check_oracle
from strategies import architectures, removal_plan

EXAMPLES = int(os.environ.get("ETP_FX_ORACLE_EXAMPLES", "0")) or None
# ETP_FX_ORACLE_COUNTER=path: one line per example run (and its outcome), so that a long soak
# shows how many examples it has actually run
COUNTER = os.environ.get("ETP_FX_ORACLE_COUNTER")


def _count(what: str) -> None:
    if COUNTER:
        with open(COUNTER, "a") as f:
            f.write(what + "\n")


@settings(max_examples=EXAMPLES or settings().max_examples * 5 if os.environ.get(
    "HYPOTHESIS_PROFILE", "ci") == "ci" else settings().max_examples)
@given(arch=architectures(), data=st.data())
def test_compress_matches_zeroed_original(arch, data):
    model, x = arch.model.eval(), arch.x
    g = etp_fx.trace(model, x)
    plan = removal_plan(data.draw, g)
    if not plan:
        _count("empty")
        return  # nothing prunable in this architecture: the graph tests cover it
    keep_constants = data.draw(st.booleans(), label="keep_constants")
    # a static result reuses the trace's capture; a batch-dynamic one captures again
    dynamic_batch = data.draw(st.booleans(), label="dynamic_batch")
    try:
        check_oracle(model, x, plan=plan, keep_constants=keep_constants,
                     dynamic_batch=dynamic_batch)
    except etp_fx.FoldError:
        # with kept constants, a removed unit may carry an input-dependent value into a weight
        # (a query head whose shared values still flow): compress must refuse, never guess;
        # with everything zeroed this cannot happen
        _count("folderror")
        assert keep_constants
    except BaseException:
        _count("fail")
        raise
    else:
        _count("ok")


@given(arch=architectures(), data=st.data())
@settings(max_examples=20)
def test_removing_every_unit_is_refused(arch, data):
    g = etp_fx.trace(arch.model.eval(), arch.x)
    if not g.groups:
        return
    grp = data.draw(st.sampled_from(g.groups))
    with pytest.raises(etp_fx.PlanError, match="keep at least one unit"):
        etp_fx.compress(arch.model, arch.x, remove={grp.id: list(range(grp.size))}, graph=g,
                        allow_approximate=True)


def test_soak_finding_fold_map_holds_for_every_batch():
    """Found by the 10,000-example soak: a kept bias folded through a matmul with a raw weight
    (no bias to fold into) becomes a constant map; its rows, identical in exact arithmetic,
    differed by rounding, so the map kept the traced batch of 2 and broadcast a batch of 1 up
    to 2. The map must be one row, whatever the batch."""
    from strategies import B, Spec, build
    arch = build(Spec("token", input_shape=(1, 5), seed=3093, ids=12, blocks=[
        B("embed", vocab=12, out=15, c_out=15),
        B("linear", out=11, act="silu", bias=True, c_out=11),
        B("raw", op="matmul", out=10, act="relu", c_out=10),
        B("head", head="mean_linear", classes=2),
    ]))
    model, x = arch[0].eval(), arch[1]
    plan = {"blocks.0.emb.weight[1]": [0], "blocks.1.fc.weight[0]": [6], "blocks.2.weight[1]": [0]}
    small, g, _ = check_oracle(model, x, plan=plan, keep_constants=True, dynamic_batch=True)
    zeroed = etp_fx.zero_units(copy.deepcopy(model), g, plan, keep_constants=True)
    x3 = torch.cat([x, x.flip(1), x])
    with torch.no_grad():
        torch.testing.assert_close(small(x3), zeroed(x3), rtol=1e-5, atol=1e-5)


def test_a_symbolic_batch_times_heads_size_stays_symbolic():
    """Found by the zoo oracle (vit_b_16): nn.MultiheadAttention views q as
    ``[T, batch * heads, head_dim]``; removing heads rewrote that symbolic entry into the traced
    batch's number, and the batch-dynamic result failed at any other batch size. The entry is
    now scaled by the kept share of the heads."""
    vt = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    m = vt.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=4, hidden_dim=32,
                          mlp_dim=64, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    g = etp_fx.trace(m, x)
    heads = next(grp for grp in g.groups if grp.unit_kind == "head")
    plan = {heads.id: [1, 2]}
    small = etp_fx.compress(m, x, remove=plan, graph=g)
    zeroed = etp_fx.zero_units(copy.deepcopy(m), g, plan)
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(small(xb), zeroed(xb), rtol=1e-5, atol=1e-5)
