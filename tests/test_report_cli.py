"""The summary table, DOT and networkx views, SVG/HTML pictures, JSON, and the `etp-fx` command."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import networkx as nx
import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx.cli import SUBCOMMANDS, main
from etp_fx.render import render_html, render_svg, write_html, write_svg
from etp_fx.graph.describe import graph_to_dict, group_shares, short_reason, summary_table

ROOT = Path(__file__).resolve().parents[1]
SVG_NS = "{http://www.w3.org/2000/svg}"


class Tiny(nn.Module):
    """Residual conv stem, a LayerNorm MLP (an approximate group), and a barrier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 12)
        self.norm = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        # a sigmoid before the norm: removed units are 0.5 there, not 0, so the norm's
        # statistics change without them (an approximate group)
        h = self.fc2(torch.relu(self.norm(torch.sigmoid(self.fc1(x.mean(dim=(2, 3)))))))
        return self.head(torch.special.i0e(h))  # i0e has no channel rule: a barrier


TINY_FACTORY = textwrap.dedent("""
    import torch.nn as nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 3), nn.Flatten(), nn.LazyLinear(5))

    def broken():
        raise RuntimeError("no weights here")

    def not_a_model():
        return 42
""")


@pytest.fixture(scope="module")
def tiny():
    return etp_fx.trace(Tiny(), torch.randn(2, 3, 8, 8))


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return etp_fx.trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))


@pytest.fixture()
def factory(tmp_path):
    path = tmp_path / "tiny_models.py"
    path.write_text(TINY_FACTORY)
    return path


# --- summary -----------------------------------------------------------------------------------

def test_summary_columns_and_barriers(tiny):
    text = tiny.summary()
    lines = text.splitlines()
    assert lines[0].split() == ["group", "units", "kind", "members", "exact", "params%", "MACs%", "why"]
    assert set(lines[1]) == {"-"}
    rows = {ln.split()[0]: ln.split() for ln in lines[2:2 + len(tiny.groups)]}
    assert set(rows) == {g.id for g in tiny.groups} == {"stem.weight[0]", "a.weight[0]", "fc1.weight[0]"}
    shares = group_shares(tiny)
    for g in tiny.groups:
        r = rows[g.id]
        assert r[1:5] == [str(g.size), g.unit_kind, str(len(g.members)), "yes" if g.exact else "approx"]
        assert float(r[5]) == pytest.approx(100 * shares[g.id][0], abs=0.01)
        assert float(r[6]) == pytest.approx(100 * shares[g.id][1], abs=0.01)
    assert rows["fc1.weight[0]"][4] == "approx"
    assert "layer_norm normalises over values" in text
    assert "%layer_norm" not in text  # the short form drops the node text
    # a fixed-width table: numbers are right-aligned under their headers
    def ends(ln):
        return [m.end() for m in re.finditer(r"\S+", ln)]
    for ln in lines[2:2 + len(tiny.groups)]:
        assert ends(ln)[1:7] == ends(lines[0])[1:7], ln
    assert "3 groups (1 approximate), 36 prunable units" in text
    assert "1 barrier (ops without a channel rule" in text
    assert any(ln.startswith("  - special_i0e") for ln in lines)


def test_summary_max_rows_and_no_why_column_when_all_exact(resnet18):
    text = summary_table(resnet18, max_rows=3)
    lines = text.splitlines()
    assert lines[0].split() == ["group", "units", "kind", "members", "exact", "params%", "MACs%"]
    assert len([ln for ln in lines if ln.startswith("layer") or ln.startswith("conv1")]) == 3
    assert "... 9 more groups" in text
    assert "12 groups (0 approximate), 2880 prunable units" in text
    assert lines[-1] == "no barriers"
    assert len({len(ln) for ln in lines[2:5]}) == 1  # same width rows


def test_short_reason():
    node = ("call_function[target=torch.ops.aten.layer_norm.default](args = (%x, [8], %w, %b, "
            "1e-05), kwargs = {})")
    reasons = [f"layer_norm normalises over this dim at %ln_{i} : [num_users=1] = {node}" for i in range(3)]
    assert short_reason(reasons) == "layer_norm normalises over this dim (x3)"
    assert short_reason(reasons[:1]) == "layer_norm normalises over this dim"
    assert short_reason(reasons + ["softmax normalises over this dim at %s"], width=20) == "layer_norm normal..."


# --- networkx and DOT --------------------------------------------------------------------------

def test_to_networkx_is_the_bipartite_group_parameter_graph(tiny):
    G = tiny.to_networkx()
    groups = {n for n, d in G.nodes(data=True) if d["kind"] == "group"}
    assert groups == {g.id for g in tiny.groups}
    assert nx.is_bipartite(G)
    for g in tiny.groups:
        assert G.nodes[g.id]["size"] == g.size and G.nodes[g.id]["exact"] == g.exact
        for m in g.members:
            assert G.nodes[m.name]["kind"] == ("buffer" if m.is_buffer else "param")
            assert G.edges[g.id, m.name]["dim"] == m.dim
            assert G.edges[g.id, m.name]["role"] == m.role
    assert G.edges["stem.weight[0]", "a.weight"]["role"] == "in"
    assert G.edges["a.weight[0]", "a.weight"]["role"] == "out"


def test_to_dot(tiny):
    dot = tiny.to_dot()
    assert dot.startswith("graph etp_fx {") and dot.rstrip().endswith("}")
    G = tiny.to_networkx()
    assert dot.count(" -- ") == G.number_of_edges()
    assert '"fc1.weight[0]" [shape=box, style=filled, fillcolor=khaki' in dot
    assert '"stem.weight[0]" [shape=box, style=filled, fillcolor=palegreen' in dot
    assert '"bn.running_mean" [shape=ellipse];' in dot
    assert dot.count("[") - dot.count("]") == 0


# --- pictures ----------------------------------------------------------------------------------

def _svg_groups(root):
    return [g for g in root.iter(f"{SVG_NS}g") if g.get("class") == "grp"]


def test_write_svg_is_well_formed_and_draws_every_group(resnet18, tmp_path):
    removed = {"layer1.0.conv1.weight[0]": [0, 1, 2, 63], "conv1.weight[0]": range(32, 64)}
    path = write_svg(resnet18, tmp_path / "r18.svg", removed=removed, title="resnet18 & <friends>")
    assert path == tmp_path / "r18.svg"
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG_NS}svg"
    assert float(root.get("width")) > 400 and float(root.get("height")) > 600
    grps = _svg_groups(root)
    assert [g.get("data-gid") for g in grps] == [g.id for g in resnet18.groups]
    texts = " ".join("".join(t.itertext()) for t in root.iter(f"{SVG_NS}text"))
    assert "resnet18 & <friends>" in texts
    rows = {t.text: "".join(c.text for c in t) for t in root.iter(f"{SVG_NS}text") if len(t)}
    assert rows["conv1"] == "weight[64,3,7,7]"
    assert rows["layer1.0.bn1"] == "weight[64] bias[64]"
    assert rows["fc"] == "weight[1000,512] bias[1000]"
    assert "layer4.1.conv2" in rows
    assert "4 removed" in texts and "32 removed" in texts
    red = [r for r in root.iter(f"{SVG_NS}rect") if r.get("fill") == "#d32f2f"]
    assert len(red) >= 1 + 2 + 1  # legend + two runs in layer1.0.conv1 + one run in conv1
    # a marker per (group, module) pair: every member's module is on the group's lane
    G = resnet18.to_networkx()
    for svg_g, grp in zip(grps, resnet18.groups):
        owners = {n.rpartition(".")[0] for n in G.neighbors(grp.id)}
        marks = [e for e in svg_g if e.tag in (f"{SVG_NS}circle", f"{SVG_NS}path", f"{SVG_NS}rect")
                 and e.get("class") not in ("conn", "box")]
        assert len(marks) == len(owners)  # the bar sits in its own <g>


def test_svg_colours_exactness_and_lists_barriers(tiny):
    root = ET.fromstring(render_svg(tiny))
    boxes = {g.get("data-gid"): next(r for r in g.iter(f"{SVG_NS}rect") if r.get("class") == "box")
             for g in _svg_groups(root)}
    assert boxes["stem.weight[0]"].get("fill") == "#d5efd6"   # exact: green
    assert boxes["fc1.weight[0]"].get("fill") == "#fff3b0"    # approximate: yellow
    texts = [("".join(t.itertext()), t.get("class")) for t in root.iter(f"{SVG_NS}text")]
    assert any(s.startswith("special_i0e") and c == "rm" for s, c in texts)
    assert any(s.startswith("headweight[3,6]") and c == "frz" for s, c in texts)  # frozen by the barrier
    tips = [t.text for t in root.iter(f"{SVG_NS}title")]
    assert any("approximate: layer_norm normalises over values that removed units do not zero" in t for t in tips)


def test_removed_is_checked(tiny):
    with pytest.raises(etp_fx.PlanError, match="no group 'nope'"):
        render_svg(tiny, removed={"nope": [0]})
    with pytest.raises(ValueError, match=r"8 units \(0..7\); indices \[8\] are out of range"):
        render_svg(tiny, removed={"stem.weight[0]": [8]})


def test_write_html_is_self_contained(tiny, tmp_path):
    path = write_html(tiny, tmp_path / "t.html", removed={"a.weight[0]": [1, 2]})
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    svg = page[page.index("<svg"):page.index("</svg>") + len("</svg>")]
    assert len(_svg_groups(ET.fromstring(svg))) == len(tiny.groups)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)   # nothing fetched
    assert "<script src" not in page and "<link" not in page
    assert 'id="q"' in page and "<script>" in page and "<style>" in page
    tbody = page[page.index("<tbody>"):page.index("</tbody>")]
    assert tbody.count("<tr ") == len(tiny.groups)
    for g in tiny.groups:
        assert f"<td>{g.id}</td>" in tbody
    assert "special_i0e" in page


def test_empty_graph_still_draws():
    m = nn.Sequential(nn.Linear(4, 3))
    g = etp_fx.trace(m, torch.randn(2, 4))
    assert g.groups == []
    assert _svg_groups(ET.fromstring(render_svg(g))) == []
    assert "0 groups" in render_html(g)


def test_docs_picture_is_committed_and_small():
    svg = ROOT / "docs" / "inspect_smallnet.svg"
    assert svg.stat().st_size < 200_000
    ET.parse(svg)
    assert "inspect_smallnet.svg" in (ROOT / "docs" / "inspect.md").read_text()


def test_docs_inspect_code_runs(tmp_path, monkeypatch, capsys):
    doc = (ROOT / "docs" / "inspect.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "inspect.md", "exec"), {"__name__": "inspect_doc"})  # noqa: S102
    out = capsys.readouterr().out
    shown = doc[doc.index("```text\n") + 8:]
    shown = shown[:shown.index("```")]
    ids = lambda s: [ln.split()[0] for ln in s.splitlines()[2:] if ln.split() and "." in ln.split()[0]]
    assert ids(out) == ids(shown)
    assert (tmp_path / "inspect_smallnet.svg").exists() and (tmp_path / "inspect_smallnet.html").exists()


# --- JSON --------------------------------------------------------------------------------------

def test_graph_to_dict(tiny):
    d = json.loads(json.dumps(graph_to_dict(tiny)))
    assert [g["id"] for g in d["groups"]] == [g.id for g in tiny.groups]
    assert d["params"] == tiny.cost.params() and d["macs"] == tiny.cost.macs()
    fc1 = next(g for g in d["groups"] if g["id"] == "fc1.weight[0]")
    assert not fc1["exact"] and fc1["inexact_reasons"][0].startswith("layer_norm normalises")
    assert "[num_users" not in json.dumps(d)
    stem = next(g for g in d["groups"] if g["id"] == "stem.weight[0]")
    assert {"name": "a.weight", "dim": 1, "role": "in", "roles": ["in"], "is_buffer": False,
            "indices": 8, "length": 8} in stem["members"]
    assert d["barriers"] and "head.weight[0]" in d["frozen"]


# --- CLI, in process ---------------------------------------------------------------------------

def test_cli_has_one_function_per_subcommand():
    assert "inspect" in SUBCOMMANDS
    assert SUBCOMMANDS["inspect"].run.__name__ == "cmd_inspect"


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"], ["--version"]])
def test_cli_help(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "etp-fx" in out
    if argv == ["inspect", "--help"]:
        for opt in ("--input-shape", "--svg", "--html", "--json", "--max-rows", "examples:"):
            assert opt in out


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["nonsense"], "invalid choice"),
    (["inspect"], "required: spec"),
    (["inspect", "torchvision:resnet18", "--max-rows", "-1"], "expected a number >= 0"),
    (["inspect", "resnet18"], "unknown model spec 'resnet18'"),
    (["inspect", "torchvision:no_such_net"], "torchvision has no model 'no_such_net'"),
    (["inspect", "no_such_pkg_xyz:make", "--input-shape", "1,3"], "No module named 'no_such_pkg_xyz'"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,three"], "bad --input-shape '1,three'"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,0,8"], "every size must be a positive"),
    (["inspect", "torchvision:resnet18", "--input-shape", "1,3,32"], "does not run on the example inputs"),
    (["inspect", "/no/such/dir/models.py:make", "--input-shape", "1,3"], "no such file"),
    (["inspect", "torchvision:resnet18", "--svg", "/no/such/dir/x.svg"], "no such directory"),
    (["inspect", "torchvision:resnet18", "--json", "/no/such/dir/x.json"], "no such directory"),
])
def test_cli_user_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    if argv and argv[0] == "inspect" and len(argv) > 1 and not argv[1].startswith("-") \
            and "--max-rows" not in argv:
        assert err.startswith("etp-fx inspect: error: ")


def test_cli_factory_errors(factory, capsys):
    spec = f"{factory}:broken"
    assert main(["inspect", spec, "--input-shape", "1,3,8,8"]) == 2
    assert "calling broken() failed: RuntimeError: no weights here" in capsys.readouterr().err
    assert main(["inspect", f"{factory}:not_a_model", "--input-shape", "1,3,8,8"]) == 2
    assert "returned int, not a torch.nn.Module" in capsys.readouterr().err
    assert main(["inspect", f"{factory}:missing", "--input-shape", "1,3,8,8"]) == 2
    assert "has no callable 'missing'" in capsys.readouterr().err
    assert main(["inspect", f"{factory}:make"]) == 2
    assert "give --input-shape" in capsys.readouterr().err


def test_cli_inspect_writes_everything(factory, tmp_path, capsys):
    svg, page, js = tmp_path / "m.svg", tmp_path / "m.html", tmp_path / "m.json"
    rc = main(["inspect", f"{factory}:make", "--input-shape", "2x3x8x8", "--max-rows", "1",
               "--svg", str(svg), "--html", str(page), "--json", str(js)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.splitlines()[0].split()[:3] == ["group", "units", "kind"]
    assert "0.weight[0]" in cap.out and "... 1 more groups" in cap.out
    for p in (svg, page, js):
        assert p.stat().st_size > 0 and "wrote" in cap.err and str(p) in cap.err
    ET.parse(svg)
    d = json.loads(js.read_text())
    assert [g["id"] for g in d["groups"]] == ["0.weight[0]", "3.weight[0]"]


def test_cli_json_to_stdout(factory, capsys):
    assert main(["inspect", f"{factory}:make", "--input-shape", "1,3,8,8", "--json", "-"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["units"] == 12 and len(d["groups"]) == 2


# --- the console script ------------------------------------------------------------------------

def test_console_script(factory, tmp_path):
    exe = Path(sys.executable).with_name("etp-fx")
    if not exe.exists():
        pytest.skip("the etp-fx console script is not installed in this environment")
    proc = subprocess.run(
        [str(exe), "inspect", f"{factory}:make", "--input-shape", "1,3,8,8", "--max-rows", "1",
         "--svg", str(tmp_path / "r.svg"), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "0.weight[0]" in proc.stdout and "... 1 more groups" in proc.stdout
    assert "2 groups (0 approximate), 12 prunable units" in proc.stdout
    assert "wrote SVG" in proc.stderr and "wrote JSON" in proc.stderr
    ET.parse(tmp_path / "r.svg")
    assert len(json.loads((tmp_path / "r.json").read_text())["groups"]) == 2


# --- large models (slow) -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, n_groups", [("resnet50", 37), ("densenet121", 120)])
def test_large_models_draw(name, n_groups, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    g = etp_fx.trace(torchvision.models.get_model(name), torch.randn(1, 3, 64, 64))
    assert len(g.groups) == n_groups
    root = ET.parse(write_svg(g, tmp_path / f"{name}.svg")).getroot()
    assert len(_svg_groups(root)) == n_groups
    # readable: the picture grows down, not across
    assert float(root.get("width")) < 1600
    write_html(g, tmp_path / f"{name}.html")


def test_cli_compress_writes_pt2_and_report(tmp_path, capsys):
    from etp_fx.cli import main
    out = tmp_path / "small.pt2"
    assert main(["compress", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                 "--target-macs", "0.5", "-o", str(out)]) == 0
    report = json.loads((tmp_path / "small.json").read_text())
    assert report["macs_after"] <= 0.5 * report["macs_before"]
    import etp_fx
    m = etp_fx.load(out)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.parametrize("argv,msg", [
    (["compress", "torchvision:resnet18", "--target-macs", "2", "-o", "x.pt2"], "(0, 1]"),
    (["compress", "torchvision:resnet18", "--ratio", "0.5", "--weights", "/nope.pt", "-o", "x.pt2"], "no such file"),
    (["demo", "--target-macs", "0"], "(0, 1]"),
    (["bench", "zoo_sweep"], None),
])
def test_cli_new_subcommand_errors(argv, msg, capsys, tmp_path, monkeypatch):
    from etp_fx.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and (msg is None or msg in err)


def test_cli_bench_passes_the_benchmark_exit_code_on(tmp_path, monkeypatch, capsys):
    # a failed cell makes the benchmark exit 1, and `etp-fx bench` with it (it returned 0)
    pytest.importorskip("matplotlib")
    from etp_fx.cli import main
    rec = dict(task="vgg-digits", method="dense", base_method="dense", seed=0, sweep=False,
               metric_name="accuracy %", target=1, metric=80.0, metric_pruned=80.0,
               speedup=1.0, latency_ms=1.0, seconds=0.1)
    failed = dict(rec, method="etp", base_method="etp", target=2, error="AssertionError: x")
    for k in ("metric", "speedup", "latency_ms"):
        del failed[k]
    runs = {"vgg-digits|dense|0|1": rec, "vgg-digits|etp|0|2": failed}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    monkeypatch.chdir(ROOT)
    argv = ["bench", "quality", "--render-only", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert "FAILED vgg-digits|etp|0|2: AssertionError: x" in capsys.readouterr().err
    assert main(argv + ["--allow-failures"]) == 0
