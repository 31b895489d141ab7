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
