"""DTensor parameters (FSDP2's ``fully_shard``, HSDP, replicated DTensors) and SAM's one cross-rank sum.

A DTensor parameter's local shard is what FusedSAM flattens and updates; the squared gradient norm of a
sharded parameter is a sum over the ranks that hold its shards. Everything here is looked up lazily: a
program that never imported ``torch.distributed.tensor`` has no DTensor, and pays no import for it.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch


def _dtensor_module():
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(t) -> bool:
    module = _dtensor_module()
    return module is not None and isinstance(t, module.DTensor)


def local_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (the very tensor FSDP2 all-gathers from), else
    ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


def shard_group(p, where: str):
    """The process group over which the squared norm of DTensor ``p``'s shards must be summed: the one
    mesh dimension it is sharded over (FSDP2: the mesh; HSDP: the shard dimension, since replicas agree).
    None when ``p`` is replicated on every mesh dimension. Refuses what one sum cannot cover."""
    sharded = []
    for dim, placement in enumerate(p.placements):
        if placement.is_shard():
            sharded.append(dim)
        elif not placement.is_replicate():
            raise ValueError(
                f"{where} is a DTensor with placement {type(placement).__name__} ({placement}) on mesh dimension "
                f"{dim}: FusedSAM supports "
                "sharded (Shard) and replicated (Replicate) parameters, as FSDP2 and HSDP make them"
            )
    if len(sharded) > 1:
        raise ValueError(
            f"{where} is a DTensor sharded over mesh dimensions {sharded} (placements {tuple(p.placements)}, "
            "e.g. tensor parallelism inside FSDP2): FusedSAM sums the gradient norm over one sharded mesh "
            "dimension and does not support this yet"
        )
    return p.device_mesh.get_group(sharded[0]) if sharded else None


def like_dtensor(local: torch.Tensor, p) -> torch.Tensor:
    """``local`` (shaped like ``p``'s local shard) as a DTensor sharded as ``p`` is; shares its memory."""
    module = _dtensor_module()
    return module.DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                     shape=p.shape, stride=p.stride())


def as_local_like(value: torch.Tensor, p) -> torch.Tensor:
    """A loaded state tensor for DTensor ``p``, as this rank's local shard: a DTensor is redistributed to
    ``p``'s sharding if it differs (DCP loads into ``p``'s own, so it does not); a plain tensor is taken to
    be the full tensor and this rank's shard is cut from it."""
    module = _dtensor_module()
    if isinstance(value, module.DTensor):
        if value.device_mesh != p.device_mesh or tuple(value.placements) != tuple(p.placements):
            value = value.redistribute(p.device_mesh, p.placements)
        return value._local_tensor
    if value.shape != p.shape:
        return value  # the caller's shape check names it
    full = value.to(p.device)  # every rank holds it: cut this rank's shard, no communication
    return module.distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)._local_tensor


def sum_over_ranks(value: torch.Tensor, group) -> Optional["torch.distributed.Work"]:
    """Start the all-reduce (sum) of ``value`` in place over ``group``; return its handle.

    SAM's only collective: one device scalar per sharded process group and step. ``wait()`` on the handle
    orders the reduction before later kernels on the device (NCCL: a stream wait, no host sync)."""
    import torch.distributed as dist

    return dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group, async_op=True)


_zero_guard: list = []  # the step pre-hook refusing ZeroRedundancyOptimizer over FusedSAM, once registered


def refuse_under_zero(fused_cls: type) -> None:
    """ZeroRedundancyOptimizer(optimizer_class=FusedSAM) builds one FusedSAM per rank over that rank's
    partition of the parameters: each would perturb with the norm of its partition only, which is not SAM
    and raises no error. Nothing marks such a FusedSAM, but the wrapper's step() runs torch.optim's global
    step pre-hooks before it steps the partition: once ZeRO is loaded (building one needs it), one such
    hook refuses that step, before any weight moves."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None or _zero_guard:
        return

    def refuse(optimizer, args, kwargs):
        if isinstance(optimizer, zero.ZeroRedundancyOptimizer) and isinstance(getattr(optimizer, "optim", None),
                                                                            fused_cls):
            raise TypeError(
                "FusedSAM cannot run inside ZeroRedundancyOptimizer: each rank holds a partition of the "
                "parameters and would perturb with that partition's norm, which is not SAM. To shard the "
                "optimizer state, shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose sharded "
                "parameters FusedSAM perturbs with the global norm; else use DistributedDataParallel "
                "(see docs/distributed.md)"
            )

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    _zero_guard.append(register_optimizer_step_pre_hook(refuse))
