"""`etp-fx demo` end to end on a short schedule: files written, reload in a fresh process agrees,
and by default the MACs target drives the strength and decides what compress removes."""
import json

from etp_fx.cli import main


def test_demo_writes_its_files_and_reloads(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "2", "--out", str(out)]) == 0
    for name in ("model.pt2", "norms.png", "groups.svg", "groups.html", "report.json"):
        assert (out / name).stat().st_size > 0, name
    rep = json.loads((out / "report.json").read_text())
    assert abs(rep["accuracy_reloaded"] - rep["accuracy_compressed"]) < 1e-3
    # target-driven by default: no strength given, a quarter of the MACs kept
    assert rep["selection"] == {"target_macs": 0.25}
    assert rep["macs_after"] <= 0.25 * rep["macs_before"]
    assert rep["strength_final"] > 0 and 0 <= rep["mass_left"] <= 1
    printed = capsys.readouterr().out
    assert "test accuracy %" in printed and "reloaded" in printed
    assert "strength driven by the target 25% of the MACs" in printed
