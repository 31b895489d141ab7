"""Smoke test of the benchmark scripts: each ``--quick`` mode runs in-process on a tiny model
and writes its report. Numbers are not checked (timings on a shared CPU mean nothing here)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, ROOT)


def test_compress_speed_quick(tmp_path):
    pytest.importorskip("torch_pruning")
    from benchmarks import compress_speed
    out = tmp_path / "docs"
    assert compress_speed.main(["--quick", "--models", "squeezenet1_1", "--size", "64",
                                "--out", str(out), "--raw", str(tmp_path / "raw.jsonl")]) == 0
    text = (out / "compress_speed.md").read_text()
    assert "squeezenet1_1" in text and "median ratio" in text
    assert (tmp_path / "raw.jsonl").exists()


def test_latency_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import latency
    out = tmp_path / "docs"
    assert latency.main(["--quick", "--models", "squeezenet1_1", "--out", str(out), "--raw", str(tmp_path / "lat.json")]) == 0
    assert "efficiency" in (out / "latency.md").read_text()
    assert (out / "latency.png").stat().st_size > 0
