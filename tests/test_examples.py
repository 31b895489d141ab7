"""Every example's ``--smoke`` run: offline, on generated data, the whole path in seconds.

Each runs in a fresh interpreter, as a user would run it, and must exit 0, print its
before/after table and write ``report.json`` (and ``model.pt2``, which is loaded back here).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["vgg19_cifar100", "resnet50_imagenet", "bert_sst2", "gat_ppi", "informer_etth1",
            "opt_causal_lm"]
NEEDS = {"bert_sst2": "transformers", "opt_causal_lm": "transformers",
         "gat_ppi": "torch_geometric", "resnet50_imagenet": "torchvision"}


def test_every_example_is_tested_and_listed():
    scripts = {p.stem for p in (ROOT / "examples").glob("*.py") if not p.stem.startswith("_")}
    # the LLM example writes a Hugging Face folder, not a .pt2: its --smoke run is in
    # tests/test_hf_module.py
    assert scripts == set(EXAMPLES) | {"llm_prune_generate"}
    listing = (ROOT / "examples" / "README.md").read_text()
    assert all(f"{name}.py" in listing for name in [*EXAMPLES, "llm_prune_generate"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", EXAMPLES)
def test_smoke_run(name, tmp_path):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=170,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "compressed" in res.stdout and "MACs" in res.stdout, res.stdout[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["example"] == name
    assert report["macs_after"] < report["macs_before"]
    assert report["params_after"] < report["params_before"]
    assert report["groups"] and report["metrics"]
    assert (tmp_path / "model.pt2").is_file()
    import etp_fx
    if name in ("bert_sst2", "opt_causal_lm"):
        # the output is a transformers ModelOutput: torch.export's loader needs its pytree
        # registration, which importing transformers provides (an etp_fx.load limitation)
        import transformers.modeling_outputs  # noqa: F401
    small = etp_fx.load(tmp_path / "model.pt2")
    assert small.meta["etp_report"]["macs_after"] == report["macs_after"]
