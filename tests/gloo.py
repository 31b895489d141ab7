"""Two CPU processes joined by gloo, for the DDP and FSDP2 tests."""
import contextlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
    mp.spawn(worker, args=(2, port, out), nprocs=2, join=True)
