"""Two CPU processes joined by gloo, for the DDP and FSDP2 tests."""
import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The batch every rank and the single process train on: 8 images 3x6x6, 4 classes."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This process's membership of the group, left together with the others."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        # both ranks leave together: a rank that tears gloo down while the other is still in
        # a collective can abort the process ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


def run_two_ranks(worker, out: str) -> None:
    """``worker(rank, world, port, out)`` in two processes on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_then_exit, args=(worker, 2, port, out), nprocs=2, join=True)


def _then_exit(rank: int, worker, world: int, port: int, out: str) -> None:
    """Run the worker; once it has returned (its results written, the group left), end the
    process at once. The interpreter's own teardown can meet gloo's background threads and
    abort ("terminate called without an active exception": seen once in CI after both ranks
    had finished); a failure inside the worker still raises and fails the test."""
    worker(rank, world, port, out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
