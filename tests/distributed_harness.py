"""Spawning CPU ranks for the distributed tests: a gloo group per test on a free port, a timeout on every
collective and a deadline on the whole spawn, so a hang fails the test instead of CI.

Jobs are module-level functions, which a spawned process imports by name (spawn hands it the parent's
sys.path, so the test modules, ``models`` and the checkout's fused_sam import as in pytest).
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 120  # for a whole spawn; gloo's own timeout (60 s) ends a rank stuck in a collective first

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def _rank_main(rank: int, world_size: int, backend: str, port: int, out_dir: Path, job, job_args: tuple) -> None:
    """Join the group, run ``job(rank, *job_args)`` and save what it returns for the test to read."""
    torch.set_num_threads(1)  # several ranks on two cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.save(job(rank, *job_args), out_dir / f"rank{rank}.pt")
        # Rank 0 hosts the store every rank's group creation rendezvous through: none may exit (taking the
        # store with it) while another still sets up a group of its own, e.g. a mesh's size-1 dimension.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skips the interpreter's teardown of torch (seconds on two cores); nothing is left to clean up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(job, job_args: tuple, out_dir: Path, world_size: int = 2, backend: str = "gloo") -> list:
    """``job(rank, *job_args)`` on ``world_size`` spawned ranks; what each returned, by rank (moved to the
    CPU when the test reads it).

    A rank that raises fails the test with its traceback (its peers, waiting in a collective, are
    stopped at once); ranks still running at the deadline are killed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("rank*.pt"):
        stale.unlink()
    context = mp.spawn(_rank_main, args=(world_size, backend, _free_port(), out_dir, job, job_args),
                       nprocs=world_size, join=False)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=1):
            if time.monotonic() >= deadline:
                pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False, map_location="cpu") for rank in range(world_size)]


def rank_part(x, y, rank: int, world_size: int) -> tuple:
    """The part of a full batch that ``rank`` trains on (the parts are equal in size)."""
    return x.chunk(world_size)[rank], y.chunk(world_size)[rank]


def max_distance(weights_a, weights_b) -> float:
    return max((a.detach() - b.detach()).abs().max().item() for a, b in zip(weights_a, weights_b))
