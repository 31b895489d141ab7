"""docs/rules.md runs as written.

Its ```python blocks are executed in order in one namespace; a ```text block right after a
python block is what that block prints (summary tables are compared column by column on the
structural fields, so a change of a cost formula does not break the doc); then the before/after
behaviour the page describes is asserted on the namespace.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "rules.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def doc_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall(DOC.read_text(encoding="utf-8"))]


@pytest.fixture(scope="module")
def doc_run():
    """Run the page once: (namespace, [(code, printed, expected text or None)])."""
    from etp_fx.graph.rules import RULES
    try:
        torch.ops.mylib.channel_scale
        pytest.skip("mylib::channel_scale is already registered in this process")
    except (AttributeError, RuntimeError):
        pass
    ns: dict = {"__name__": "rules_doc"}
    runs = []
    blocks = doc_blocks()
    for i, (lang, body) in enumerate(blocks):
        if lang != "python":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(body, f"{DOC.name}[block {i}]", "exec"), ns)  # noqa: S102
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        runs.append((body, out.getvalue(), nxt[1] if nxt and nxt[0] == "text" else None))
    yield ns, runs
    RULES.pop(torch.ops.mylib.channel_scale, None)


def _table_fields(text: str) -> list[tuple[str, ...]]:
    """The structural part of a summary: group rows (id, units, kind, members, exact), the
    count line up to its totals, barrier lines."""
    lines = text.strip().splitlines()
    out = []
    for ln in lines[2:]:
        if ln.startswith("  - ") or ln in ("no barriers",) or "barrier" in ln:
            out.append((ln.rstrip(),))
        elif "prunable unit" in ln:
            out.append((ln.split(";")[0],))
        else:
            out.append(tuple(ln.split()[:5]))
    return [tuple(lines[0].split())] + out


def test_doc_has_code_and_outputs():
    langs = [lang for lang, _ in doc_blocks()]
    assert langs.count("python") >= 4
    assert langs.count("text") >= 3


def test_printed_output_matches_the_doc(doc_run):
    _, runs = doc_run
    checked = 0
    for code, printed, expected in runs:
        if expected is None:
            continue
        checked += 1
        if expected.lstrip().startswith("group "):
            assert _table_fields(printed) == _table_fields(expected), (code, printed)
        else:
            assert printed.strip() == expected.strip(), (code, printed)
    assert checked >= 3


def test_without_the_rule_the_op_is_a_barrier(doc_run):
    ns, _ = doc_run
    before = ns["before"]
    assert [g.id for g in before.groups] == ["conv2.weight[0]"]
    assert any("channel_scale" in b for b in before.barriers)
    assert any("barrier" in r for r in before.frozen_reasons["conv1.weight[0]"])
    assert "channel_scale" in before.summary()


def test_with_the_rule_the_channels_are_prunable(doc_run):
    ns, _ = doc_run
    after = ns["after"]
    assert after.barriers == []
    grp = after["conv1.weight[0]"]
    assert grp.exact and grp.size == 16
    assert {(m.name, m.dim, m.role) for m in grp.members} == {
        ("conv1.weight", 0, "out"), ("conv1.bias", 0, "bias"), ("scale.weight", 0, "affine"),
        ("conv2.weight", 1, "in")}
    # the custom op still runs and trains with its autograd registration
    net, x = ns["net"], ns["x"]
    net(x).sum().backward()
    assert net.scale.weight.grad is not None and net.scale.weight.grad.shape == (16,)


def test_compress_slices_the_custom_ops_weight(doc_run):
    ns, _ = doc_run
    small, net, x = ns["small"], ns["net"], ns["x"]
    assert tuple(small.scale.weight.shape) == (12,)
    keep = [i for i in range(16) if i not in (0, 1, 2, 3)]
    assert torch.equal(small.scale.weight.detach(), net.scale.weight.detach()[keep])
    assert small(x).shape == net(x).shape


def test_cost_keyword_counts_the_ops_macs(doc_run):
    ns, _ = doc_run
    assert ns["with_cost"].cost.macs() - ns["after"].cost.macs() == 2 * 16 * 16 * 16
