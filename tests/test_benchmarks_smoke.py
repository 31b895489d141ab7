"""Smoke tests of the benchmark scripts: each ``--quick`` mode runs in-process on a tiny model,
and the test checks the outcome, not only that files appeared: the exit code (non-zero when a
cell failed), no failed cell in the raw results, and numbers in sane ranges (the MACs target
reached, sizes shrunk, times positive). Timings themselves are not compared (a shared CPU)."""
import subprocess
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, ROOT)


def _samples(raw: Path) -> list[dict]:
    return [json.loads(line) for line in raw.read_text().splitlines() if line.strip()]


def test_compress_speed_quick(tmp_path):
    pytest.importorskip("torch_pruning")
    from benchmarks import compress_speed
    out, raw = tmp_path / "docs", tmp_path / "raw.jsonl"
    rc = compress_speed.main(["--quick", "--models", "squeezenet1_1", "--size", "64",
                              "--out", str(out), "--raw", str(raw)])
    recs = _samples(raw)
    failed = [r for r in recs if {"error", "timeout", "crash", "skipped", "tp_error",
                                  "tp_forward_error"} & set(r)]
    assert not failed, failed
    assert rc == 0
    (s,) = [r for r in recs if "rep" in r]
    assert s["macs_before"] / s["macs_after"] >= 1.95  # the 2x target is reached
    assert s["params_after"] < s["params_before"]
    assert 0 < s["frac"] < 1 and s["exact_groups"] == s["groups"] > 0
    assert 0 < s["tp_macs_after"] < s["macs_before"]  # torch-pruning ran and pruned too
    for k in ("t_trace", "t_plan", "t_compress_verify", "t_compress_noverify", "t_tp"):
        assert 0 < s[k] < 600, (k, s[k])
    text = (out / "compress_speed.md").read_text()
    assert "squeezenet1_1" in text and "median ratio" in text
    assert "etp_fx failures or timeouts: 0 (none)" in text


def test_compress_speed_exits_1_on_a_failed_model(tmp_path, capsys):
    from benchmarks import compress_speed
    raw = tmp_path / "raw.jsonl"
    raw.write_text(json.dumps({"model": "resnet18", "rep": 0, "frac": 0.3, "t_trace": 1.0,
                               "error": "PlanError: boom"}) + "\n")
    argv = ["--report-only", "--models", "resnet18", "--out", str(tmp_path), "--raw", str(raw)]
    assert compress_speed.main(argv) == 1
    assert "FAILED resnet18: PlanError: boom" in capsys.readouterr().err
    assert compress_speed.main(argv + ["--allow-failures"]) == 0


def test_latency_quick(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks import latency
    out, raw = tmp_path / "docs", tmp_path / "lat.json"
    rc = latency.main(["--quick", "--models", "squeezenet1_1", "--out", str(out),
                       "--raw", str(raw)])
    rows = json.loads(raw.read_text())
    assert not [r for r in rows if "error" in r], rows
    assert rc == 0
    assert {r["variant"] for r in rows} == {"original", "2x"}
    for r in rows:
        assert 0 < r["latency_s"] < 10 and r["n"] >= 1
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
    (pruned,) = [r for r in rows if r["variant"] == "2x"]
    assert 1.95 <= pruned["macs_ratio"] < 3 and pruned["params_ratio"] > 1
    assert "efficiency" in (out / "latency.md").read_text()
    assert (out / "latency.png").stat().st_size > 0


def test_hf_exact_share_runs_and_reports_outcomes(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.hf_exact_share", "llama", "t5",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "hf_exact_share.md").read_text()
    assert "| llama | " in text and "| t5 | " in text and "Failures" not in text
    llama = next(line for line in text.splitlines() if line.startswith("| llama | "))
    # hidden width exact; checked at the example and at a draw of another batch and length
    assert "| 100.00 % |" in llama and "example (" in llama and "other batch and shape" in llama
