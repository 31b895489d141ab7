"""Smoke test of the quality benchmark (issue 5): ``--quick`` runs every task and method on a
tiny budget and writes its files. Numbers are not checked (a few batches of training mean
nothing); only that the protocol completes end to end and renders."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("torch_pruning")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
pytest.importorskip("mnist1d")
ROOT = str(Path(__file__).resolve().parents[1])  # `benchmarks` is not an installed package


@pytest.mark.timeout(900)
def test_quality_quick(tmp_path):
    # a fresh process: OMP_WAIT_POLICY must be set before torch loads (pytest has loaded it),
    # or spinning OpenMP threads make this run several times slower on a busy machine
    out = tmp_path / "results"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    res = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(out),
                          "--threads", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = json.loads((out / "runs.json").read_text())
    tasks = {r["task"] for r in runs.values()}
    assert tasks == {"vgg-digits", "resnet-digits", "cnn1d-mnist1d", "llama-stdlib"}
    assert {r["method"] for r in runs.values()} >= {"dense", "etp-paper", "etp", "torque",
                                                     "greg", "groupnorm", "magnitude"}
    text = (out / "results.md").read_text()
    for t in tasks:
        assert (out / f"{t}.png").stat().st_size > 0
        assert f"## {t}" in text
    assert (out / "vgg-digits-sweep.png").exists()
