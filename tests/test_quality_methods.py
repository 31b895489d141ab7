"""Fast checks of the quality benchmark's protocol (issue 13): one Budget per target shared by
the regulariser and the pruning, heads and MLP neurons only on the language model for every
method, GReg aimed at the ratio it prunes to, a results file that parallel processes share, and
the computed verdict."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")
ROOT = str(Path(__file__).resolve().parents[1])  # `benchmarks` is not an installed package
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import etp_fx  # noqa: E402
from benchmarks.quality import methods as M, report, runner, tasks  # noqa: E402

TINY = runner.Budget(epochs=1, finetune=1, seeds=(0,), targets=(4,), max_batches=2,
                     latency_repeats=1)


@pytest.fixture(scope="module")
def lm():
    # small, but 4x stays reachable with heads and neurons only (the lm_head is kept)
    return tasks.lm_task(hidden=64, heads=8, ffn=256, layers=2, steps_per_epoch=2,
                         val_windows=8)


def test_lm_prunes_heads_and_mlp_neurons_only(lm):
    model = lm.build(0)
    graph = etp_fx.trace(model, lm.example)
    ids = M.prunable_groups(graph, model, lm)
    kinds = {g.id: g.unit_kind for g in graph.groups}
    assert ids and {kinds[i] for i in ids} == {"head", "neuron"}
    assert not any(i.startswith("model.embed_tokens") for i in ids)  # the residual width
    plan = M.selection_for(graph, model, lm, 4).select(graph, model)
    assert plan and set(plan) <= set(ids)


def test_target_driven_etp_prunes_with_the_budget_it_aimed_at(lm, tmp_path):
    store = runner.Store(str(tmp_path / "runs.json"))
    runner.run_method(lm, "etp", 0, TINY, store)
    rec = store.runs["llama-stdlib|etp|0|4"]
    assert "error" not in rec, rec.get("error")
    assert rec["aim"] == 4 and rec["reg"]["aim_macs"] == 0.25 and rec["reg"]["steps"] == 2
    assert rec["reg"]["form"] == M.REG_FORM
    assert rec["speedup"] >= 0.96 * 4
    assert "llama-stdlib|etp|0|1" not in store  # no single trained model: one per target
    model = lm.build(0)
    graph = etp_fx.trace(model, lm.example)
    sel = M.selection_for(graph, model, lm, 4)
    trainer = M.make_trainer("etp", model, graph, lm, selection=sel, steps=2)
    assert trainer.selection is sel and trainer.reg.target == sel


@pytest.mark.parametrize("method", ["greg", "groupnorm"])
def test_torch_pruning_runs_on_the_lm(lm, tmp_path, method):
    store = runner.Store(str(tmp_path / "runs.json"))
    runner.run_method(lm, method, 0, TINY, store)
    rec = store.runs[f"llama-stdlib|{method}|0|4"]
    assert "error" not in rec, rec.get("error")
    assert abs(rec["speedup"] / 4 - 1) < 0.05
    if method == "greg":  # GReg's penalty aimed at the ratio that reaches the target
        assert rec["aim"] == 4 and rec["reg"]["tp_ratio"] == rec["tp_ratio"]
    else:
        assert rec["aim"] is None and "llama-stdlib|groupnorm|0|1" in store


def test_two_writers_share_one_results_file(tmp_path):
    a, b = runner.Store(str(tmp_path / "runs.json")), runner.Store(str(tmp_path / "runs.json"))
    a.add("t1|etp|0|4", {"x": 1})
    b.add("t2|etp|0|4", {"x": 2})  # b never saw a's cell: it must not drop it
    assert set(runner.Store(str(tmp_path / "runs.json")).runs) == {"t1|etp|0|4", "t2|etp|0|4"}


def _rec(method, metric, pruned, target=4, seed=0):
    return dict(task="llama-stdlib", method=method, seed=seed, sweep=False, target=target,
                metric_name="perplexity", metric=metric, metric_pruned=pruned,
                metric_trained=pruned, speedup=float(target), latency_ms=1.0)


def test_verdict_is_computed_lower_perplexity_wins():
    runs = {"a": _rec("etp", 10.0, 30.0), "b": _rec("magnitude", 9.0, 50.0),
            "c": _rec("greg", 11.0, 40.0), "d": _rec("etp", 12.0, 60.0, target=8),
            "e": _rec("groupnorm", 12.5, 70.0, target=8)}
    agg = report.aggregate(runs)
    ok, text = report.verdict(agg, "llama-stdlib", 4)
    assert ok is False and "loses by 1.00" in text and "magnitude 9.00" in text
    assert "before fine-tuning 30.00" in text
    ok8, text8 = report.verdict(agg, "llama-stdlib", 8)
    assert ok8 is True and "groupnorm 12.50" in text8
    assert report.verdict(agg, "vgg-digits", 4)[0] is None
