"""What SAM costs under DDP and FSDP2 on CPU ranks (gloo): time per training step, split into the part
that computes and the part that waits on communication, for a plain step and a SAM step.

Each rank trains an MLP (4 x Linear(width, width), float32) on its part of every batch. Per configuration
(DDP or FSDP2, plain SGD-momentum step or FusedSAM) it measures, in interleaved rounds so that every
configuration sees the same machine:
- the whole training step (forward, backward, optimizer; SAM: two of each, and the perturbation);
- the same step's compute alone: the same model, unwrapped, in one process on this rank's batch part;
- the communication share: the difference (collectives, waiting for the slower rank, the wrappers' hooks);
- the time spent in the optimizer's calls (SAM: first_step and second_step), against the same calls on the
  unwrapped model (FSDP2: each rank updates its shards only, but FusedSAM copies them in and out);
- SAM's own collective under FSDP2, alone: the all-reduce of one float64 scalar.

Usage: python bench/distributed_cpu.py [--ranks 2] [--width 512] [--batch 64] [--rounds 5] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fused_sam import FusedSAM

LR = dict(lr=0.01, momentum=0.9)


def mlp(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(layer for _ in range(4) for layer in (nn.Linear(width, width), nn.Tanh())))


def wrapped(kind: str, width: int):
    model = mlp(width)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        return fully_shard(model)
    return model  # "local": the compute alone


def step_fn(model, sam: bool):
    params = list(model.parameters())
    if sam:
        opt = FusedSAM(params, torch.optim.SGD, rho=0.05, **LR)

        def step(x, y) -> float:
            nn.functional.mse_loss(model(x), y).backward()
            start = time.perf_counter()
            opt.first_step(zero_grad=True)
            in_optimizer = time.perf_counter() - start
            nn.functional.mse_loss(model(x), y).backward()
            start = time.perf_counter()
            opt.second_step(zero_grad=True)
            return in_optimizer + time.perf_counter() - start
    else:
        opt = torch.optim.SGD(params, **LR)

        def step(x, y) -> float:
            nn.functional.mse_loss(model(x), y).backward()
            start = time.perf_counter()
            opt.step()
            opt.zero_grad()
            return time.perf_counter() - start
    return step


def rank_main(rank: int, world: int, port: int, args, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    x = torch.randn(args.batch // world, args.width, generator=torch.Generator().manual_seed(rank))
    y = torch.randn(args.batch // world, args.width, generator=torch.Generator().manual_seed(100 + rank))
    configs = {(kind, sam): step_fn(wrapped(kind, args.width), sam)
               for kind in ("ddp", "fsdp2", "local") for sam in (False, True)}
    samples = {key: [] for key in configs}
    in_optimizer = {key: [] for key in configs}
    scalar = torch.zeros((), dtype=torch.float64)
    samples["sam all-reduce"] = []
    for _ in range(args.rounds):
        for key, step in configs.items():
            step(x, y)  # warm-up of this round
            dist.barrier()
            start = time.perf_counter()
            spent = sum(step(x, y) for _ in range(args.steps))
            samples[key].append((time.perf_counter() - start) / args.steps)
            in_optimizer[key].append(spent / args.steps)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(scalar)
        samples["sam all-reduce"].append((time.perf_counter() - start) / args.steps)
    if rank == 0:
        torch.save({"step": {key: 1e3 * statistics.median(v) for key, v in samples.items()},
                    "optimizer": {key: 1e3 * statistics.median(v) for key, v in in_optimizer.items()}}, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fused_sam_distributed_{os.getpid()}.pt"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.ranks, port, args, out), nprocs=args.ranks)
    results = torch.load(out)
    ms, opt_ms = results["step"], results["optimizer"]
    out.unlink()
    params = sum(p.numel() for p in mlp(args.width).parameters())
    print(f"{args.ranks} gloo ranks, 1 thread each, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"MLP {params / 1e6:.2f}M float32 parameters, {args.batch // args.ranks} samples per rank; "
          f"medians of {args.rounds} rounds x {args.steps} steps, ms per training step (rank 0)")
    print("| wrapper | step | whole step | compute alone | communication and waiting | SAM / plain | in the optimizer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in ("ddp", "fsdp2"):
        for sam in (False, True):
            whole, alone = ms[kind, sam], ms["local", sam]
            ratio = f"x{whole / ms[kind, False]:.2f}" if sam else ""
            print(f"| {kind} | {'SAM' if sam else 'plain'} | {whole:.2f} | {alone:.2f} | {whole - alone:.2f} | {ratio} "
                  f"| {opt_ms[kind, sam]:.2f} (alone {opt_ms['local', sam]:.2f}) |")
    print(f"SAM's own collective under FSDP2 (all-reduce of one float64), alone: {ms['sam all-reduce']:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
