"""DistributedDataParallel on CPU (gloo, 2 processes): the ETP penalty gives the same loss and
the same gradients as one process on the whole batch."""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import etp_fx
from gloo import data, gloo_group, run_two_ranks
from etp_fx.regularise.torque import ExponentialTorque


def make_model():
    torch.manual_seed(0)  # no BatchNorm: its batch statistics would differ by design
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def step(model, reg, x, y):
    loss = nn.functional.cross_entropy(model(x), y) + reg(model)
    loss.backward()
    return loss.detach()


def _worker(rank, world, port, out):
    with gloo_group(rank, world, port):
        model = make_model()
        x, y = data()
        g = etp_fx.trace(model, x[:1])
        reg = ExponentialTorque(g, strength=0.5, norm="l2", normalize="init")
        ddp = nn.parallel.DistributedDataParallel(model)
        half = len(x) // world
        sl = slice(rank * half, (rank + 1) * half)
        loss = step(ddp, reg, x[sl], y[sl])  # the regulariser unwraps DDP to name parameters
        dist.all_reduce(loss)
        if rank == 0:
            torch.save({"loss": loss / world,
                        "grads": {n: p.grad for n, p in model.named_parameters()}}, out)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_processes_match_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    run_two_ranks(_worker, out)
    got = torch.load(out)

    model = make_model()
    x, y = data()
    reg = ExponentialTorque(etp_fx.trace(model, x[:1]), strength=0.5, norm="l2",
                            normalize="init")
    loss = step(model, reg, x, y)
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert reg(model).item() > 0.1  # the penalty is a real part of the loss
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6)
