"""The compressed model in the ecosystem: torch.compile, torch.export, .pt2 files (with their
integrity manifest), and the errors of save and load."""
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

import etp_fx
from etp_fx.io import LoadError, SaveError, load, save
from test_trace_basic import Residual


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = Residual().eval()
    x = torch.randn(2, 3, 8, 8)
    return etp_fx.compress(m, x, remove={"a.weight[0]": [0, 3], "stem.weight[0]": [1]}), x


def test_torch_compile_fullgraph_matches(small):
    gm, x = small
    compiled = torch.compile(gm, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), gm(x), atol=1e-5)


def test_any_batch_size_is_accepted(small):
    gm, x = small
    m = Residual().eval()
    torch.manual_seed(1)
    for b in (1, 5):
        xb = torch.randn(b, 3, 8, 8)
        assert gm(xb).shape == (b, 5)


def test_torch_export_works(small):
    gm, x = small
    ep = torch.export.export(gm, (x,), strict=False)
    assert torch.allclose(ep.module()(x), gm(x))


def test_pt2_round_trip_in_a_fresh_process(small, tmp_path):
    gm, x = small
    path = save(gm, tmp_path / "small.pt2")
    torch.save(x, tmp_path / "x.pt")
    torch.save(gm(x).detach(), tmp_path / "y.pt")
    # the fresh process has neither the test module nor the model class on its path
    code = ("import torch, etp_fx; m = etp_fx.load(%r); x = torch.load(%r); y = torch.load(%r);"
            "assert torch.allclose(m(x), y, atol=1e-6); assert m(x[:1]).shape[0] == 1;"
            "print(m.meta['etp_report']['params_after'])"
            % (str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == gm.meta["etp_report"]["params_after"]


def test_truncated_and_missing_files(small, tmp_path):
    gm, _ = small
    path = save(gm, tmp_path / "m.pt2")
    data = path.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="cut.pt2"):
        load(tmp_path / "cut.pt2")
    with pytest.raises(LoadError, match="no such file"):
        load(tmp_path / "absent.pt2")
    (tmp_path / "text.pt2").write_text("not an archive")
    with pytest.raises(LoadError, match="not a .pt2 archive"):
        load(tmp_path / "text.pt2")


def _members(path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _write(path, members) -> None:
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, data)


def _resign(path) -> None:
    """Recompute the manifest as a forger would (documented format: sha256 of every member,
    then the sha256 of the manifest): only the no-pickle loader stands in the way then."""
    members = [(i, d) for i, d in _members(path) if "/extra/etp_manifest" not in i.filename]
    root = members[0][0].filename.split("/")[0]
    manifest = json.dumps({"format": "etp_fx-manifest/1", "members": {
        i.filename: hashlib.sha256(d).hexdigest() for i, d in members}}).encode()
    members += [(zipfile.ZipInfo(f"{root}/extra/etp_manifest.json"), manifest),
                (zipfile.ZipInfo(f"{root}/extra/etp_manifest.sha256"),
                 hashlib.sha256(manifest).hexdigest().encode())]
    _write(path, members)


def test_saved_file_has_a_manifest_of_every_member(small, tmp_path):
    gm, _ = small
    path = save(gm, tmp_path / "m.pt2")
    members = dict((i.filename, d) for i, d in _members(path))
    manifest = members["m/extra/etp_manifest.json"]
    assert members["m/extra/etp_manifest.sha256"].decode() == hashlib.sha256(manifest).hexdigest()
    listed = json.loads(manifest)["members"]
    assert set(listed) == set(members) - {"m/extra/etp_manifest.json",
                                          "m/extra/etp_manifest.sha256"}
    assert any("weights/" in n for n in listed) and "m/models/model.json" in listed
    for name, digest in listed.items():
        assert hashlib.sha256(members[name]).hexdigest() == digest


@pytest.mark.parametrize("target, edit, phrase", [
    ("weight_0", lambda d: bytes([d[0] ^ 1]) + d[1:], "member m/data/weights/weight_0 does not match"),
    ("model.json", lambda d: d.replace(b'"', b"'", 1), "member m/models/model.json does not match"),
    ("etp_report.json", lambda d: b'{"params_after": 1}', "member m/extra/etp_report.json"),
    ("etp_manifest.json", lambda d: d.replace(b"weight_0", b"weight_9", 1),
     "member m/extra/etp_manifest.json does not match its sha256 in m/extra/etp_manifest.sha256"),
    ("etp_manifest.sha256", lambda d: b"0" * 64, "member m/extra/etp_manifest.json does not match"),
])
def test_a_changed_member_is_named(small, tmp_path, target, edit, phrase):
    gm, _ = small
    path = save(gm, tmp_path / "m.pt2")
    members = _members(path)
    _write(path, [(i, edit(d) if i.filename.endswith("/" + target) else d) for i, d in members])
    with pytest.raises(LoadError, match=r"m\.pt2 was altered after saving") as e:
        load(path)
    assert phrase in str(e.value)


def test_a_file_without_manifest_is_refused_unless_allowed(small, tmp_path):
    gm, x = small
    path = save(gm, tmp_path / "m.pt2")
    _write(path, [(i, d) for i, d in _members(path) if "etp_manifest" not in i.filename])
    with pytest.raises(LoadError, match="has no integrity manifest.*allow_unverified=True"):
        load(path)
    with pytest.warns(UserWarning, match="no integrity manifest"):
        m = load(path, allow_unverified=True)
    assert torch.equal(m(x), gm(x))
    save(m, path, x)  # saved again: checked again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(load(path)(x), gm(x))


def test_save_refuses_before_exporting(small, tmp_path, monkeypatch):
    gm, x = small
    exports = []
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(a))
    (tmp_path / "dir.pt2").mkdir()
    with pytest.raises(SaveError, match="dir.pt2: it is a directory"):
        save(gm, tmp_path / "dir.pt2")
    (tmp_path / "file").write_text("")
    with pytest.raises(SaveError, match="cannot save to .*file/m.pt2"):
        save(gm, tmp_path / "file" / "m.pt2", torch.randn(2, 7))  # wrong inputs too: path first
    assert exports == []


def test_save_errors_name_the_input_and_leave_no_file(small, tmp_path):
    gm, x = small
    with pytest.raises(SaveError, match=r"example inputs \(Tensor\(2, 7, 8, 8\) float32\).*Give "
                                        r"example_inputs the model runs on"):
        save(gm, tmp_path / "m.pt2", torch.randn(2, 7, 8, 8))
    with pytest.raises(SaveError, match="give example_inputs="):
        save(torch.nn.Linear(3, 2), tmp_path / "m.pt2")
    with pytest.raises(SaveError, match="takes a torch.nn.Module .* got dict"):
        save({"weight": torch.zeros(2)}, tmp_path / "m.pt2")
    with pytest.raises(SaveError, match="example_inputs must be a tensor"):
        save(torch.nn.Linear(3, 2), tmp_path / "m.pt2", "not a tensor")
    assert list(tmp_path.iterdir()) == []  # no file, no staging folder
    path = save(torch.nn.Linear(3, 2), tmp_path / "new" / "folder" / "m.pt2", torch.randn(2, 3))
    assert load(path)(torch.randn(5, 3)).shape == (5, 2)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/etp_fx_pwned",))


def test_pickled_objects_are_never_loaded(small, tmp_path):
    gm, _ = small
    path = save(gm, tmp_path / "m.pt2")
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(evil, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                first = next(iter(cfg["config"].values()))
                first["use_pickle"] = True
                target = first["path_name"]
                data = json.dumps(cfg).encode()
            zout.writestr(item, data)
    with zipfile.ZipFile(evil, "a") as z:  # replace that weight by a pickle of a payload
        import io
        buf = io.BytesIO()
        torch.save(Evil(), buf)
        names = [n for n in z.namelist() if n.endswith("/" + target)]
    with zipfile.ZipFile(evil) as zin:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
    with zipfile.ZipFile(evil, "w") as zout:
        for i, data in items:
            zout.writestr(i, buf.getvalue() if i.filename in names else data)
    if os.path.exists("/tmp/etp_fx_pwned"):
        os.remove("/tmp/etp_fx_pwned")
    with pytest.raises(LoadError, match="was altered after saving"):  # the manifest sees it
        load(evil)
    _resign(evil)  # a forger recomputes the hashes: the no-pickle loader refuses it still
    with pytest.raises(LoadError, match="pickled Python object"):
        load(evil)
    assert not os.path.exists("/tmp/etp_fx_pwned")


TYPES_MODULE = '''
import dataclasses, torch, torch.utils._pytree as pytree

@dataclasses.dataclass
class Out:
    logits: torch.Tensor

pytree.register_dataclass(Out, serialized_type_name="outtypes.Out")

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)

    def forward(self, x):
        return Out(self.b(torch.relu(self.a(x))))
'''


def test_output_types_must_be_imported_before_loading(tmp_path):
    # a model returning its own pytree type (as Hugging Face models return a ModelOutput)
    (tmp_path / "outtypes.py").write_text(TYPES_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import outtypes
        small = etp_fx.compress(outtypes.Net().eval(), torch.randn(2, 4), ratio=0.5)
        save(small, tmp_path / "m.pt2")
    finally:
        sys.path.remove(str(tmp_path))
    load_code = "import etp_fx; print(type(etp_fx.load('m.pt2')(__import__('torch').randn(3, 4))).__name__)"
    cold = subprocess.run([sys.executable, "-c", load_code], cwd=tmp_path, capture_output=True, text=True)
    assert cold.returncode != 0 and "`import outtypes` before etp_fx.load" in cold.stderr
    warm = subprocess.run([sys.executable, "-c", "import outtypes; " + load_code], cwd=tmp_path,
                          capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert warm.stdout.strip() == "Out"
