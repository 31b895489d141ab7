"""FSDP2 (``fully_shard``) on CPU (gloo, 2 processes): parameters are DTensors sharded along
dim 0, unevenly where the rows do not split in two; the regulariser reduces unit norms across
the shards, so the penalty, its gradients, the unit norms and a target's first measurement
equal those of one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import etp_fx
from gloo import data, gloo_group, run_two_ranks
from etp_fx.regularise.torque import ExponentialTorque

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):  # pragma: no cover - torch older than 2.6
    pytest.skip("torch.distributed.fsdp.fully_shard is not available", allow_module_level=True)


def make_model():
    torch.manual_seed(0)  # no BatchNorm: its batch statistics would differ by design
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 7, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(7 * 6 * 6, 9), nn.ReLU(),
                         nn.Linear(9, 4))


def shard(model, mesh):
    """FSDP2 on every Conv and Linear layer, then on the whole model."""
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fsdp.fully_shard(m, mesh=mesh)
    fsdp.fully_shard(model, mesh=mesh)


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def two_ranks(worker, tmp_path):
    """What rank 0 of ``worker`` saved, after both ranks ran."""
    out = str(tmp_path / "rank0.pt")
    run_two_ranks(worker, out)
    return torch.load(out)


def regularisers(graph):
    return {"l1": ExponentialTorque(graph, strength=0.5),
            "l2": ExponentialTorque(graph, strength=0.5, norm="l2", normalize="init"),
            "target": ExponentialTorque(graph, target_macs=0.5, steps=10, strength=0.5)}


def step(model, reg, x, y):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y) + reg(model)
    loss.backward()
    return loss.detach()


def _worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh
        model = make_model()
        x, y = data()
        regs = regularisers(etp_fx.trace(model, x[:1]))  # traced before sharding
        shard(model, init_device_mesh("cpu", (world,)))
        assert type(model[5].weight).__name__ == "DTensor"
        half = len(x) // world
        sl = slice(rank * half, (rank + 1) * half)
        got = {}
        for name, reg in regs.items():
            loss = step(model, reg, x[sl], y[sl])
            dist.all_reduce(loss)
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            norms = {k: v.clone() for k, v in reg.unit_norms(model, "l2").items()}
            got[name] = {"loss": loss / world, "grads": grads, "norms": norms,
                         "zero": reg.near_zero(model, 0.05), "left": reg.left}
        if rank == 0:
            torch.save(got, out)


@needs_gloo
def test_fsdp2_two_processes_match_one(tmp_path):
    got = two_ranks(_worker, tmp_path)

    model = make_model()
    x, y = data()
    for name, reg in regularisers(etp_fx.trace(model, x[:1])).items():
        loss = step(model, reg, x, y)
        ours = got[name]
        assert ours["loss"].item() == pytest.approx(loss.item(), rel=1e-5), name
        assert reg.value(model).item() > 0.1  # the penalty is a real part of the loss
        for n, p in model.named_parameters():
            torch.testing.assert_close(ours["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
        for gid, v in reg.unit_norms(model, "l2").items():
            torch.testing.assert_close(ours["norms"][gid], v, rtol=1e-5, atol=1e-7)
        assert ours["zero"] == reg.near_zero(model, 0.05)
        if name == "target":
            assert ours["left"] == pytest.approx(reg.left, rel=1e-6)


# --- the decoupled (proximal) update on sharded parameters -------------------------------------

def decoupled_regs(graph, model):
    return {"l1": ExponentialTorque(graph, strength=2.0, model=model),
            "l2": ExponentialTorque(graph, strength=40.0, norm="l2", model=model)}


def decoupled_step(model, reg, x, y):
    """One SGD step with the regulariser attached (the update after ``opt.step()``)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reg.attach(opt, model)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    reg.detach()


def _decoupled_worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        x, y = data()
        half = len(x) // world
        sl = slice(rank * half, (rank + 1) * half)
        got = {}
        for name in ("l1", "l2"):
            model = make_model()
            reg = decoupled_regs(etp_fx.trace(model, x[:1]), model)[name]
            shard(model, mesh)
            decoupled_step(model, reg, x[sl], y[sl])
            got[name] = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(got, out)


@needs_gloo
def test_fsdp2_decoupled_update_matches_one_process(tmp_path):
    got = two_ranks(_decoupled_worker, tmp_path)
    x, y = data()
    for name in ("l1", "l2"):
        model = make_model()
        reg = decoupled_regs(etp_fx.trace(model, x[:1]), model)[name]
        decoupled_step(model, reg, x, y)
        zeros = 0
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[name][n], p.detach(), rtol=1e-4, atol=1e-6)
            zeros += int((p == 0).sum())
        assert zeros > 0, name  # the update is strong enough to matter
