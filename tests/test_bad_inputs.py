"""The bad-input table: what etp_fx says when it is given something it cannot work with.

One row per bad input, across ``trace``, ``compress`` (and the selection values), ``zero_units``,
the regulariser (``ExponentialTorque``), ``save``, ``load`` and the ``etp-fx`` command. Each row
is ``(id, call, expected types, phrase)``: ``call(ctx)`` must raise an exception that is an
instance of every expected type (an ``etp_fx.Error`` subclass, and ``ValueError`` or
``TypeError`` where that is what it means) whose message matches the phrase (a regex, searched).

Command-line rows run ``etp_fx.cli.main`` in process: the row passes when the command exits
with 2 and prints exactly one line, ``etp-fx CMD: error: ...``, and no traceback; the call
then raises :class:`ExitedWith2` carrying that line, so the table checks it like the others.
"""
from __future__ import annotations

import contextlib
import copy
import io
import re
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx import (DistanceError, Error, InputError, LoadError, ModelMismatchError, PlanError,
                    RegulariserError, SaveError, SelectionError)
from etp_fx.cli import main as cli_main


class ExitedWith2(Exception):
    """The command exited with 2 and printed one error line (the line is the message)."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


class _RandomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + torch.rand(1))


def _with_int_parameter() -> nn.Module:
    m = _net()
    m[7].register_parameter("steps", nn.Parameter(torch.zeros(3, dtype=torch.int64),
                                                  requires_grad=False))
    return m


def _with_random_hook() -> nn.Module:
    m = _net()
    m[3].register_forward_hook(lambda mod, args, out: out + torch.randn_like(out))
    return m


def _with_nan_weight() -> nn.Module:
    m = _net()
    with torch.no_grad():
        m[0].weight[0, 0, 0, 0] = float("nan")
    return m


FACTORY = textwrap.dedent("""
    import torch.nn as nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 5))
""")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Models, graphs and files the rows misuse (built once)."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    model, x = _net(), torch.randn(2, 3, 8, 8)
    graph = etp_fx.trace(model, x)
    other = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    small = etp_fx.compress(model, x, ratio=0.5)
    good = etp_fx.save(small, tmp / "good.pt2")
    data = good.read_bytes()
    files = {"text.pt2": b"not an archive", "empty.pt2": b"", "cut.pt2": data[: len(data) // 2]}
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    (tmp / "a_dir.pt2").mkdir()
    (tmp / "a_file").write_text("")
    torch.export.save(torch.export.export(small, (x,)), str(tmp / "no_manifest.pt2"))
    with zipfile.ZipFile(tmp / "other.zip", "w") as z:
        z.writestr("hello.txt", "hi")
    _flip_member(good, tmp / "flipped.pt2", "weight_0")
    (tmp / "factory.py").write_text(FACTORY)
    gid = graph.groups[0].id
    return SimpleNamespace(tmp=tmp, model=model, x=x, graph=graph, gid=gid,
                           size=graph[gid].size, other=other,
                           other_graph=etp_fx.trace(other, torch.randn(2, 4)),
                           small=small, good=good, factory=f"{tmp / 'factory.py'}:make")


def _flip_member(src: Path, dst: Path, member: str) -> None:
    """A copy of ``src`` with one bit of ``member`` flipped (and a valid zip CRC)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/" + member):
                data = bytes([data[0] ^ 1]) + data[1:]
            zout.writestr(info, data)


def _cli(*argv: str) -> None:
    """Run the command in process; raise ExitedWith2(line) when it refused as it should."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli_main([str(a) for a in argv])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()
             and not ln.startswith("wrote ")]
    assert "Traceback" not in err.getvalue(), err.getvalue()
    if rc == 2 and len(lines) == 1 and re.match(r"etp-fx \w+: error: ", lines[0]):
        raise ExitedWith2(lines[0])
    raise AssertionError(f"exit {rc}, stderr {err.getvalue()!r}")


def _compress_cli(c, *options: str) -> None:
    _cli("compress", c.factory, "--input-shape", "1,3,8,8", *options)


def _out(c, name: str = "out.pt2") -> tuple[str, str]:
    return "-o", str(c.tmp / name)


def _all(c) -> list[int]:
    return list(range(c.size))


@dataclass
class Row:
    id: str
    call: object
    types: tuple
    phrase: str


def _rows() -> list[Row]:
    nan, C = float("nan"), etp_fx.compress
    return [
        # --- trace ------------------------------------------------------------------------------
        Row("trace/str-inputs", lambda c: etp_fx.trace(c.model, "x"), (InputError,),
            "example_inputs must be a tensor, a tuple"),
        Row("trace/wrong-channels", lambda c: etp_fx.trace(c.model, torch.randn(2, 5, 8, 8)),
            (InputError,), r"does not run on the example inputs \(Tensor\(2, 5, 8, 8\)"),
        Row("trace/wrong-rank", lambda c: etp_fx.trace(c.model, torch.randn(2, 3)),
            (InputError,), "does not run on the example inputs"),
        Row("trace/int-inputs", lambda c: etp_fx.trace(c.model, c.x.int()), (InputError,),
            "int32"),
        Row("trace/unknown-kwarg", lambda c: etp_fx.trace(c.model, c.x, kwargs={"bogus": 1}),
            (InputError,), "bogus"),
        Row("trace/two-inputs-for-one", lambda c: etp_fx.trace(c.model, [c.x, c.x]),
            (InputError,), "does not run on the example inputs"),
        Row("trace/unknown-capture", lambda c: etp_fx.trace(c.model, c.x, capture="bogus"),
            (Error, ValueError), "capture.*'bogus'"),
        Row("trace/not-a-module", lambda c: etp_fx.trace("model", c.x), (Error, TypeError),
            r"torch\.nn\.Module"),
        Row("trace/nan-inputs", lambda c: etp_fx.trace(c.model, torch.full((2, 3, 8, 8), nan)),
            (InputError,), "(?i)nan"),
        Row("trace/batch-0", lambda c: etp_fx.trace(c.model, torch.randn(0, 3, 8, 8)),
            (InputError,), "batch of size 0"),
        # --- compress: the selection -------------------------------------------------------------
        Row("compress/no-selection", lambda c: C(c.model, c.x), (SelectionError,),
            "give exactly one of"),
        Row("select/meta-weights", lambda c: etp_fx.select.by_budget(
            c.graph, copy.deepcopy(c.model).to("meta"), macs=0.5), (SelectionError, ValueError),
            "on the meta device.*etp_fx.Plan"),
        Row("compress/ratio=1.5", lambda c: C(c.model, c.x, ratio=1.5), (SelectionError,),
            r"ratio .* \[0, 1\); got 1.5"),
        Row("compress/ratio=-0.1", lambda c: C(c.model, c.x, ratio=-0.1), (SelectionError,),
            r"\[0, 1\)"),
        Row("compress/target_macs=0", lambda c: C(c.model, c.x, target_macs=0),
            (SelectionError,), r"\(0, 1\]; got 0"),
        Row("compress/target_params=2", lambda c: C(c.model, c.x, target_params=2),
            (SelectionError,), r"\(0, 1\]; got 2"),
        Row("compress/threshold=-1", lambda c: C(c.model, c.x, threshold=-1), (SelectionError,),
            "threshold must be a finite number >= 0, got -1"),
        Row("compress/threshold=nan", lambda c: C(c.model, c.x, threshold=nan),
            (SelectionError,), "threshold must be a finite number >= 0, got nan"),
        Row("compress/two-selections", lambda c: C(c.model, c.x, ratio=0.5, threshold=0.1),
            (SelectionError,), r"exactly one of .*\['threshold', 'ratio'\]"),
        Row("compress/scope-with-threshold", lambda c: C(c.model, c.x, threshold=0.1,
                                                          scope="global"),
            (SelectionError,), r"unknown option\(s\) \['scope'\] for Threshold"),
        Row("compress/value-and-keyword", lambda c: C(c.model, c.x, etp_fx.Ratio(0.5),
                                                       ratio=0.5),
            (SelectionError,), "not both"),
        Row("compress/selection-is-a-string", lambda c: C(c.model, c.x, "half"),
            (SelectionError,), "a selection is etp_fx.Budget, Ratio, Threshold or Plan; got str"),
        Row("compress/round_to=0", lambda c: C(c.model, c.x, ratio=0.5, round_to=0),
            (SelectionError,), "round_to must be a positive integer"),
        Row("compress/norm=l3", lambda c: C(c.model, c.x, ratio=0.5, norm="l3"),
            (SelectionError,), "norm must be one of"),
        Row("compress/unreachable-macs", lambda c: C(c.model, c.x, target_macs=0.0001),
            (SelectionError,), "out of reach"),
        Row("selection/budget-both", lambda c: etp_fx.Budget(macs=0.5, params=0.5),
            (SelectionError,), "exactly one of macs= or params="),
        Row("selection/ratio-scope", lambda c: etp_fx.Ratio(0.5, scope="everywhere"),
            (SelectionError,), "scope must be 'group' or 'global'"),
        Row("selection/relative-threshold>1", lambda c: etp_fx.Threshold(2, relative=True),
            (SelectionError,), r"relative threshold .* \[0, 1\]"),
        Row("selection/min_keep=0", lambda c: etp_fx.Ratio(0.5, min_keep=0), (SelectionError,),
            "min_keep must be an integer >= 1"),
        Row("selection/normalize", lambda c: etp_fx.Budget(macs=0.5, normalize="median"),
            (SelectionError,), "normalize must be 'mean', 'max' or None"),
        # --- compress: plans ---------------------------------------------------------------------
        Row("plan/unknown-group", lambda c: C(c.model, c.x, remove={"nope": [0]}), (PlanError,),
            "no group 'nope'"),
        Row("plan/index-out-of-range", lambda c: C(c.model, c.x, remove={c.gid: [99]}),
            (PlanError,), r"has 8 units \(0..7\); indices \[99\] are out of range"),
        Row("plan/negative-index", lambda c: C(c.model, c.x, remove={c.gid: [-1]}),
            (PlanError,), "out of range"),
        Row("plan/every-unit", lambda c: C(c.model, c.x, remove={c.gid: _all(c)}), (PlanError,),
            "removing all 8 units"),
        Row("plan/string-indices", lambda c: etp_fx.Plan({c.gid: "12"}), (PlanError,),
            "unit indices must be a list of ints, got '12'"),
        Row("plan/float-index", lambda c: etp_fx.Plan({c.gid: [1.7]}), (PlanError,),
            r"must be integers, got \[1.7\]"),
        Row("plan/bool-index", lambda c: etp_fx.Plan({c.gid: [True]}), (PlanError,),
            r"must be integers, got \[True\]"),
        Row("plan/2d-tensor", lambda c: etp_fx.Plan({c.gid: torch.tensor([[1]])}),
            (PlanError,), "list of ints"),
        Row("plan/not-a-dict", lambda c: C(c.model, c.x, remove=[1, 2]), (PlanError,),
            "a plan is a dict"),
        # --- compress: the model and inputs ------------------------------------------------------
        Row("compress/graph-of-another-model",
            lambda c: C(c.model, c.x, graph=c.other_graph, ratio=0.5), (ModelMismatchError,),
            "traced from a different model"),
        Row("compress/wrong-input-shape", lambda c: C(c.model, torch.randn(2, 5, 8, 8),
                                                       ratio=0.5),
            (InputError,), "does not run on the example inputs"),
        Row("compress/nan-inputs", lambda c: C(c.model, torch.full((2, 3, 8, 8), nan),
                                                ratio=0.5),
            (InputError,), "(?i)nan"),
        Row("compress/batch-0", lambda c: C(c.model, torch.randn(0, 3, 8, 8), ratio=0.5),
            (InputError,), "batch of size 0"),
        Row("compress/not-a-module", lambda c: C("model", c.x, ratio=0.5), (Error, TypeError),
            r"torch\.nn\.Module"),
        Row("compress/integer-parameter", lambda c: C(_with_int_parameter(), c.x, ratio=0.5),
            (Error, TypeError), "float"),
        Row("compress/meta-weights", lambda c: C(_net().to("meta"), c.x.to("meta"), ratio=0.5),
            (Error, TypeError), "meta device"),
        Row("compress/verify=-1", lambda c: C(c.model, c.x, ratio=0.5, verify=-1),
            (Error, ValueError), "verify must be"),
        Row("compress/verify=nan", lambda c: C(c.model, c.x, ratio=0.5, verify=nan),
            (Error, ValueError), "verify must be"),
        Row("compress/verify-str", lambda c: C(c.model, c.x, ratio=0.5, verify="1e-5"),
            (Error, ValueError), "verify must be"),
        Row("compress/random-forward", lambda c: C(_RandomForward().eval(), torch.randn(2, 4),
                                                    ratio=0.5),
            (Error,), "(?i)random|nondetermin"),
        Row("compress/random-forward-hook", lambda c: C(_with_random_hook(), c.x, ratio=0.5),
            (Error,), "(?i)random|nondetermin"),
        # --- zero_units --------------------------------------------------------------------------
        Row("zero_units/unknown-group", lambda c: etp_fx.zero_units(_net(), c.graph, {"x": [0]}),
            (PlanError,), "no group 'x'"),
        Row("zero_units/out-of-range", lambda c: etp_fx.zero_units(_net(), c.graph,
                                                                   {c.gid: [8]}),
            (PlanError,), r"indices \[8\] are out of range"),
        Row("zero_units/every-unit", lambda c: etp_fx.zero_units(_net(), c.graph,
                                                                 {c.gid: _all(c)}),
            (PlanError,), "keep at least one unit"),
        Row("zero_units/other-model", lambda c: etp_fx.zero_units(c.other, c.graph,
                                                                  {c.gid: [0]}),
            (ModelMismatchError,), r"different model .* etp_fx\.trace\(model, example_inputs\)"),
        Row("zero_units/not-a-dict", lambda c: etp_fx.zero_units(_net(), c.graph, [0, 1]),
            (PlanError,), r"must be a dict \{group_id: \[unit indices\]\}, got list"),
        Row("zero_units/string-indices", lambda c: etp_fx.zero_units(_net(), c.graph,
                                                                     {c.gid: "12"}),
            (PlanError,), "list of ints"),
        Row("zero_units/float-index", lambda c: etp_fx.zero_units(_net(), c.graph,
                                                                  {c.gid: [0.0]}),
            (PlanError,), "must be integers"),
        Row("zero_units/not-a-module", lambda c: etp_fx.zero_units("model", c.graph,
                                                                   {c.gid: [0]}),
            (Error, TypeError), r"torch\.nn\.Module"),
        # --- the regulariser ---------------------------------------------------------------------
        Row("torque/no-strength", lambda c: etp_fx.ExponentialTorque(c.graph),
            (RegulariserError,), "give strength="),
        Row("torque/strength=-1", lambda c: etp_fx.ExponentialTorque(c.graph, strength=-1),
            (RegulariserError,), "strength must be a finite number >= 0, got -1"),
        Row("torque/strength=nan", lambda c: etp_fx.ExponentialTorque(c.graph, strength=nan),
            (RegulariserError,), "strength must be a finite number >= 0, got nan"),
        Row("torque/strength=True", lambda c: etp_fx.ExponentialTorque(c.graph, strength=True),
            (RegulariserError,), "strength must be"),
        Row("torque/norm=linf", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1,
                                                                   norm="linf"),
            (RegulariserError,), "norm must be 'l1' or 'l2'"),
        Row("torque/every=0", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1, every=0),
            (RegulariserError,), "every must be an integer >= 1"),
        Row("torque/preset", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1,
                                                                preset="fast"),
            (RegulariserError,), "preset must be None or 'paper'"),
        Row("torque/paper-with-norm", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, preset="paper", norm="l2"), (RegulariserError,),
            "preset='paper' fixes"),
        Row("torque/normalize", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1,
                                                                   normalize="bogus"),
            (RegulariserError,), "normalize must be 'decay', 'init' or None"),
        Row("torque/base=0", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1, base=0),
            (RegulariserError,), "base must be > 0"),
        Row("torque/units", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1,
                                                               units="bogus"),
            (RegulariserError,), "units must be 'group' or 'producer'"),
        Row("torque/include", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1,
                                                                 include="bogus"),
            (RegulariserError,), r"include: unknown group ids or unit kinds \['bogus'\]"),
        Row("torque/unknown-pivot-group", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, pivots={"nope": [0]}), (DistanceError,),
            r"unknown group ids \['nope'\]"),
        Row("torque/pivot-out-of-range", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, pivots=[99]), (DistanceError,), "pivot 99 is out of range"),
        Row("torque/unknown-distance", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, distance="bogus"), (DistanceError,), "unknown distance 'bogus'"),
        Row("torque/no-units", lambda c: etp_fx.ExponentialTorque(
            etp_fx.trace(nn.Linear(3, 2), torch.randn(2, 3)), strength=1),
            (RegulariserError,), "empty unit graph"),
        Row("torque/other-model", lambda c: etp_fx.ExponentialTorque(c.graph, strength=1)(c.other),
            (ModelMismatchError,), "traced from a different model"),
        Row("torque/nan-weights", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, model=_with_nan_weight()), (FloatingPointError,),
            r"non-finite values in parameters \['0.weight'\]"),
        Row("torque/nan-weights-at-call", lambda c: etp_fx.ExponentialTorque(
            c.graph, strength=1, normalize=None)(_with_nan_weight()), (FloatingPointError,),
            "the penalty is nan at step 1"),
        # --- save --------------------------------------------------------------------------------
        Row("save/to-a-directory", lambda c: etp_fx.save(c.small, c.tmp / "a_dir.pt2"),
            (SaveError,), "a_dir.pt2: it is a directory"),
        Row("save/under-a-file", lambda c: etp_fx.save(c.small, c.tmp / "a_file" / "m.pt2"),
            (SaveError,), "cannot save to .*a_file/m.pt2.*folder you can write to"),
        Row("save/wrong-inputs", lambda c: etp_fx.save(c.small, c.tmp / "s.pt2",
                                                       torch.randn(2, 5, 8, 8)),
            (SaveError,), r"torch\.export failed on the example inputs \(Tensor\(2, 5, 8, 8\)"),
        Row("save/not-a-module", lambda c: etp_fx.save(c.small.state_dict(), c.tmp / "s.pt2"),
            (SaveError,), "takes a torch.nn.Module"),
        Row("save/no-inputs", lambda c: etp_fx.save(_net(), c.tmp / "s.pt2"), (SaveError,),
            "give example_inputs="),
        Row("save/str-inputs", lambda c: etp_fx.save(_net(), c.tmp / "s.pt2", "x"),
            (SaveError,), "example_inputs must be a tensor"),
        # --- load --------------------------------------------------------------------------------
        Row("load/missing-file", lambda c: etp_fx.load(c.tmp / "absent.pt2"), (LoadError,),
            "absent.pt2: no such file"),
        Row("load/a-directory", lambda c: etp_fx.load(c.tmp / "a_dir.pt2"), (LoadError,),
            "a_dir.pt2 is not a file"),
        Row("load/not-a-zip", lambda c: etp_fx.load(c.tmp / "text.pt2"), (LoadError,),
            r"text.pt2 is not a \.pt2 archive"),
        Row("load/empty-file", lambda c: etp_fx.load(c.tmp / "empty.pt2"), (LoadError,),
            r"empty.pt2 is not a \.pt2 archive"),
        Row("load/truncated", lambda c: etp_fx.load(c.tmp / "cut.pt2"), (LoadError,),
            r"cut.pt2 is not a \.pt2 archive"),
        Row("load/changed-weight", lambda c: etp_fx.load(c.tmp / "flipped.pt2"), (LoadError,),
            "flipped.pt2 was altered after saving: member .*weight_0 does not match"),
        Row("load/no-manifest", lambda c: etp_fx.load(c.tmp / "no_manifest.pt2"), (LoadError,),
            "no_manifest.pt2 has no integrity manifest"),
        Row("load/some-other-zip", lambda c: etp_fx.load(c.tmp / "other.zip"), (LoadError,),
            "other.zip has no integrity manifest"),
        Row("load/other-zip-unverified", lambda c: _load_unverified(c.tmp / "other.zip"),
            (LoadError,), "other.zip could not be read as a torch.export archive"),
        # --- the command line --------------------------------------------------------------------
        Row("cli/ratio=1.5", lambda c: _compress_cli(c, "--ratio", "1.5", *_out(c)),
            (ExitedWith2,), r"compress: error: --ratio 1.5: .*\[0, 1\)"),
        Row("cli/ratio=-1", lambda c: _compress_cli(c, "--ratio", "-1", *_out(c)),
            (ExitedWith2,), "--ratio -1: "),
        Row("cli/threshold=nan", lambda c: _compress_cli(c, "--threshold", "nan", *_out(c)),
            (ExitedWith2,), "--threshold nan: threshold must be a finite number"),
        Row("cli/threshold=-1", lambda c: _compress_cli(c, "--threshold", "-1", *_out(c)),
            (ExitedWith2,), "--threshold -1: "),
        Row("cli/target-macs=2", lambda c: _compress_cli(c, "--target-macs", "2", *_out(c)),
            (ExitedWith2,), r"--target-macs 2: .*\(0, 1\]"),
        Row("cli/unreachable-target", lambda c: _compress_cli(c, "--target-macs", "0.0001",
                                                              *_out(c)),
            (ExitedWith2,), "out of reach"),
        Row("cli/out-in-missing-dir", lambda c: _compress_cli(c, "--ratio", "0.5", "-o",
                                                              "/no/such/dir/x.pt2"),
            (ExitedWith2,), "no such directory"),
        Row("cli/out-is-a-directory", lambda c: _compress_cli(c, "--ratio", "0.5", "-o",
                                                              c.tmp / "a_dir.pt2"),
            (ExitedWith2,), "it is a directory"),
        Row("cli/report-path-is-a-directory", lambda c: _report_dir_cli(c), (ExitedWith2,),
            "cannot write report .*it is a directory"),
        Row("cli/missing-pt2", lambda c: _cli("compress", c.tmp / "absent.pt2", "--input-shape",
                                              "1,3,8,8", "--ratio", "0.5", *_out(c)),
            (ExitedWith2,), "absent.pt2: no such file"),
        Row("cli/corrupt-pt2", lambda c: _cli("compress", c.tmp / "cut.pt2", "--input-shape",
                                              "1,3,8,8", "--ratio", "0.5", *_out(c)),
            (ExitedWith2,), r"is not a \.pt2 archive"),
        Row("cli/pt2-without-shape", lambda c: _cli("compress", c.good, "--ratio", "0.5",
                                                    *_out(c)),
            (ExitedWith2,), "give --input-shape for a .pt2 model"),
        Row("cli/missing-weights", lambda c: _compress_cli(c, "--ratio", "0.5", "--weights",
                                                           "/nope.pt", *_out(c)),
            (ExitedWith2,), "--weights '/nope.pt': no such file"),
        Row("cli/unknown-spec", lambda c: _cli("inspect", "resnet18"), (ExitedWith2,),
            "unknown model spec 'resnet18'"),
        Row("cli/zero-size-shape", lambda c: _cli("inspect", c.factory, "--input-shape", "1,0"),
            (ExitedWith2,), "every size must be a positive integer"),
        Row("cli/wrong-shape-deep-error", lambda c: _cli("inspect", c.factory, "--input-shape",
                                                         "1,5,8,8"),
            (ExitedWith2,), "does not run on the example inputs .* Give example inputs"),
        Row("cli/svg-in-missing-dir", lambda c: _cli("inspect", c.factory, "--input-shape",
                                                     "1,3,8,8", "--svg", "/no/such/d/x.svg"),
            (ExitedWith2,), "cannot write SVG .*no such directory"),
        Row("cli/demo-target", lambda c: _cli("demo", "--target-macs", "0"), (ExitedWith2,),
            r"\(0, 1\]"),
        Row("cli/demo-out-is-a-file", lambda c: _cli("demo", "--out", c.tmp / "a_file"),
            (ExitedWith2,), "it exists and is not a directory"),
    ]


def _load_unverified(path: Path):
    with pytest.warns(UserWarning, match="no integrity manifest"):
        return etp_fx.load(path, allow_unverified=True)


def _report_dir_cli(c) -> None:
    (c.tmp / "rep.json").mkdir(exist_ok=True)
    _compress_cli(c, "--ratio", "0.5", "-o", c.tmp / "rep.pt2")


ROWS = _rows()


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS])
def test_bad_input(ctx, row: Row):
    with pytest.raises(Exception) as info:
        row.call(ctx)
    e = info.value
    assert isinstance(e, row.types), f"{type(e).__name__} ({e}) is not {row.types}"
    assert re.search(row.phrase, str(e)), f"{row.phrase!r} not in {str(e)!r}"


def test_the_table_is_large_and_ids_are_unique():
    ids = [r.id for r in ROWS]
    assert len(ids) == len(set(ids))
    assert len(ROWS) >= 50
    covered = {i.split("/")[0] for i in ids}
    assert {"trace", "compress", "plan", "selection", "zero_units", "torque", "save", "load",
            "cli"} <= covered
