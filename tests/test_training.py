"""Training helpers (progress bar, norm history and plot, Hugging Face Trainer) and the
torch-pruning baselines behind one interface."""
import io

import pytest
import torch
import torch.nn as nn

import etp_fx
from etp_fx import baselines
from etp_fx.regularise.torque import ExponentialTorque
from etp_fx.regularise.training import ETPCallback, ETPTrainerMixin, NormHistory, plot_norms, progress


def cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def test_progress_bar_shows_penalty_and_zero_units(batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), strength=0.1)
    with torch.no_grad():  # one dead channel of the first conv, everywhere it lives
        m[0].weight[2].zero_(), m[0].bias[2].zero_(), m[1].weight[2].zero_()
        m[1].bias[2].zero_(), m[3].weight[:, 2].zero_()
    out = io.StringIO()
    bar = progress([(x, y)] * 4, reg, m, every=2, file=out, desc="epoch 0")
    for xb, yb in bar:
        loss = nn.functional.cross_entropy(m(xb), yb) + reg(m)
        loss.backward()
    bar.close()
    assert bar.postfix["zero_units"] == "1/24"
    assert float(bar.postfix["penalty"]) == pytest.approx(reg.last_value.item(), rel=1e-3)
    assert "zero_units=1/24" in out.getvalue() and "penalty=" in out.getvalue()


def test_norm_history_and_the_paper_figure(tmp_path, batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), strength=5.0)
    hist = NormHistory(reg)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    hist.record(m)
    for epoch in range(3):
        for _ in range(3):
            opt.zero_grad()
            (nn.functional.cross_entropy(m(x), y) + reg(m)).backward()
            opt.step()
        hist.record(m, epoch + 1)
    a = hist.array("3.weight[0]")
    assert a.shape == (4, 16) and hist.epochs == [0.0, 1.0, 2.0, 3.0]
    # the exponential force shrinks far units (high index) faster than the pivot
    shrink = a[-1] / a[0]
    assert shrink[-4:].mean() < shrink[:4].mean()
    path = plot_norms(hist, str(tmp_path / "norms.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "norms.png").stat().st_size > 5000
    hist.save(str(tmp_path / "h.json"))
    with pytest.raises(ValueError, match="empty"):
        plot_norms(NormHistory(reg), str(tmp_path / "x.png"))


def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.tensor(i % 2)}
            for i in range(8)]
    return transformers, model, data


@pytest.mark.parametrize("how", ["attach", "mixin"])
def test_hugging_face_trainer_adds_the_penalty(tmp_path, how):
    transformers, model, data = _tiny_bert()
    graph = etp_fx.trace(model, {"input_ids": data[0]["input_ids"][None]})
    reg = ExponentialTorque(graph, strength=0.2, normalize="init")
    hist = NormHistory(reg)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, num_train_epochs=1)
    if how == "attach":
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        ETPCallback(reg, clip=5e-4, history=hist).attach(trainer)
    else:
        class ETPTrainer(ETPTrainerMixin, transformers.Trainer):
            pass
        trainer = ETPTrainer(model=model, args=args, train_dataset=data, etp_reg=reg)
    batch = {"input_ids": torch.stack([d["input_ids"] for d in data[:4]]),
             "labels": torch.stack([d["labels"] for d in data[:4]])}
    model.eval()
    with torch.no_grad():
        plain = model(**batch).loss.item()
        total = trainer.compute_loss(model, batch).item()
    assert total == pytest.approx(plain + reg(model).item(), rel=1e-5)
    assert reg(model).item() == pytest.approx(0.2 * len(reg.unit_sets), rel=1e-3)
    calls = reg.calls
    trainer.train()
    assert reg.calls >= calls + 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("etp_penalty" in h and "etp_zero_units" in h for h in logs)
    assert all(h["loss"] > h["etp_penalty"] > 0 for h in logs)
    if how == "attach":
        assert len(hist) == 1  # recorded at the epoch's end
        with pytest.raises(Exception, match="already has an ETP penalty"):
            ETPCallback(reg).attach(trainer)


@pytest.mark.parametrize("name", ["etp", "greg", "groupnorm", "magnitude"])
def test_baselines_share_one_loop(name, batch):
    pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    kw = {"strength": 1.0, "target_macs": 0.5} if name == "etp" else {"pruning_ratio": 0.5}
    method = baselines.make(name, m, x[:1], **kw)
    p0, macs0 = method.params_and_macs(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    grads = []
    for _ in range(3):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(m(x), y) + method.penalty(m)
        loss.backward()
        before = m[3].weight.grad.clone()
        method.regularize(m)
        grads.append((m[3].weight.grad - before).abs().sum().item())
        opt.step()
    method.epoch_end(m)
    if name in ("greg", "groupnorm"):
        assert all(gd > 0 for gd in grads)  # the regulariser acted on the gradients
    else:
        assert all(gd == 0 for gd in grads)
    assert any(not torch.equal(w0[n], p) for n, p in m.named_parameters())
    m2 = method.step()
    out = m2(x)
    assert out.shape == (16, 4)
    if name == "etp":
        assert method.plan and sum(map(len, method.plan.values())) > 0
        assert method.penalty(m2) == 0.0
    else:
        p1, macs1 = method.params_and_macs(m2)
        assert p1 < p0 and macs1 < macs0


def test_unknown_baseline():
    with pytest.raises(ValueError, match="unknown method 'obd'"):
        baselines.make("obd", cnn(), torch.randn(1, 3, 8, 8))


# --- the target drives the strength: what the helpers show ------------------------------------

def test_progress_shows_the_controlled_strength_and_the_mass_left(batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), target_macs=0.5)  # steps from the bar
    out = io.StringIO()
    bar = progress([(x, y)] * 4, reg, m, every=2, steps=4, file=out)
    assert reg.controller.steps == 4
    for xb, yb in bar:
        (nn.functional.cross_entropy(m(xb), yb) + reg(m)).backward()
    bar.close()
    assert float(bar.postfix["strength"]) == pytest.approx(reg.strength, rel=1e-2)
    assert bar.postfix["left"] == f"{reg.left:.2%}"
    assert "strength=" in out.getvalue() and "left=" in out.getvalue()
    with pytest.raises(etp_fx.RegulariserError, match="built for steps=4"):
        progress([], reg, m, steps=5)
    fixed = ExponentialTorque(reg.graph, strength=0.1)  # a fixed strength, measured against
    bar = progress([(x, y)], fixed, m, target_macs=0.5, file=io.StringIO())
    list(bar)
    assert bar.postfix["strength"] == "0.1" and bar.postfix["left"].endswith("%")


class _Args:
    gradient_accumulation_steps = 2


class _State:
    max_steps, global_step, log_history = 5, 1, []


def test_callback_hands_the_steps_and_logs_the_target(batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), target_macs=0.5)
    cb = ETPCallback(reg)
    cb.on_train_begin(_Args(), _State(), None)
    assert reg.controller.steps == 10  # max_steps x gradient accumulation: calls, not steps
    reg(m)
    logs = {"loss": 1.25}
    cb.on_log(_Args(), _State(), None, logs=logs, model=m)
    assert logs["etp_strength"] == reg.strength and logs["etp_left"] == reg.left
    assert reg.controller._loss.mean == 1.25  # the task loss reaches the controller
    fixed = ExponentialTorque(reg.graph, strength=0.1)
    fixed(m)
    logs = {"loss": 1.0}
    ETPCallback(fixed, target_macs=0.5).on_log(_Args(), _State(), None, logs=logs, model=m)
    assert logs["etp_strength"] == 0.1 and 0 < logs["etp_left"] < 1


def test_etp_baseline_with_a_target_needs_no_strength(batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    method = baselines.make("etp", m, x[:1], target_macs=0.5, steps=3)
    assert method.reg.controller is not None and method.reg.strength == 0.01
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (nn.functional.cross_entropy(m(x), y) + method.penalty(m)).backward()
        opt.step()
    small = method.step()
    rep = small.meta["etp_report"]
    assert rep["macs_after"] <= 0.5 * rep["macs_before"]
    with pytest.raises(etp_fx.RegulariserError, match="steps= goes with a target-driven"):
        baselines.make("etp", m, x[:1], strength=1.0, steps=3)


def test_callback_attaches_the_decoupled_update(batch):
    torch.manual_seed(0)
    m = cnn()
    x, y = batch
    reg = ExponentialTorque(etp_fx.trace(m, x[:1]), target_macs=0.5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    cb = ETPCallback(reg, decoupled=True)
    cb.on_train_begin(_Args(), _State(), None, model=m, optimizer=opt)
    assert reg.controller.steps == 5  # optimiser steps: the hook counts those
    nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    assert reg.calls == 1 and reg.last_value is None  # no loss term
    logs = {"loss": 1.5}
    cb.on_log(_Args(), _State(), None, logs=logs, model=m)
    assert "etp_penalty" not in logs and logs["etp_strength"] == reg.strength
    assert reg.controller._loss.mean == 1.5
    cb.on_train_end(_Args(), _State(), None)
    opt.step()
    assert reg.calls == 1  # detached
    with pytest.raises(etp_fx.RegulariserError, match="optimizer and model"):
        ETPCallback(reg, decoupled=True).on_train_begin(_Args(), _State(), None)


def test_hugging_face_trainer_with_the_decoupled_update(tmp_path):
    transformers, model, data = _tiny_bert()
    graph = etp_fx.trace(model, {"input_ids": data[0]["input_ids"][None]})
    reg = ExponentialTorque(graph, strength=0.2, model=model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, num_train_epochs=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    ETPCallback(reg, decoupled=True).attach(trainer)
    trainer.train()
    assert reg.calls == 2 and reg.last_value is None  # two optimiser steps, no loss term
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("etp_zero_units" in h for h in logs)
