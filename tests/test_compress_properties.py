"""The correctness oracle over generated architectures (hypothesis).

For random architectures and random removal sets in exact groups:
compress(m, x, remove=S)(x) == zero_units(copy(m), g, S)(x) (to 1e-5 of the output's scale),
params drop exactly as the cost model predicts, and removing every unit of a group is refused.
CI runs the ``ci`` profile; ``HYPOTHESIS_PROFILE=soak`` runs 10,000 examples.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import etp_fx
import etp_fx.fold
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
    except etp_fx.fold.FoldError:
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
