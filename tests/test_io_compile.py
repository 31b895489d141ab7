"""The compressed model in the ecosystem: torch.compile, torch.export, .pt2 files."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import etp_fx
from etp_fx.io import LoadError, load, save
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
    with pytest.raises(LoadError):
        load(evil)
    assert not os.path.exists("/tmp/etp_fx_pwned")
