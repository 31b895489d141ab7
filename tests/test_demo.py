"""`etp-fx demo` end to end on a short schedule: files written, reload in a fresh process agrees."""
import json

from etp_fx.cli import main


def test_demo_writes_its_files_and_reloads(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "2", "--strength", "2", "--out", str(out)]) == 0
    for name in ("model.pt2", "norms.png", "groups.svg", "groups.html", "report.json"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert abs(rep["accuracy_reloaded"] - rep["accuracy_compressed"]) < 1e-3
    assert rep["params_after"] <= rep["params_before"]
    printed = capsys.readouterr().out
    assert "test accuracy %" in printed and "reloaded" in printed
