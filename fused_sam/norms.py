"""Sums over every flat segment: SAM's global squared gradient norm and the other scalars a step needs.

Each backend writes squared-norm partials for its spans; this module gives each device the global total,
summing the shares of parameters sharded over ranks (FSDP2, HSDP) over their process group, one float64
scalar per group, in one order on every rank, so every rank perturbs with the same norm.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch

from .backends.base import perturbation_of
from .distributed import sum_over_ranks


def spans_with_gradients(segments, active: list) -> list:
    """(segment, span) for every run of parameters that has a gradient (``active``: per segment, a mask
    or None for all)."""
    return [
        (segment, span)
        for segment, mask in zip(segments, active)
        for _, _, (has_grad,), span in segment.spans(mask)
        if has_grad
    ]


def norm_partials(sam, work: list, perturbations: List) -> Dict[torch.device, torch.Tensor]:
    """Squared-norm partials per device of ``work`` ((segment, span) pairs), each under its group's
    perturbation (ASAM: ||T g||^2). With several devices, or parameters sharded over ranks, each device
    gets the global sum as a one-element float64 tensor."""
    layout: Dict[tuple, list] = {}
    for item in work:  # a span is on its segment's device (segment.device: no torch.device made per span)
        segment = item[0]
        layout.setdefault((segment.device, segment.shard_group), []).append(item)
    partials = {}
    for key, items in layout.items():
        buf, outs = _partials_buffer(sam, key, items)
        for (segment, span), out in zip(items, outs):
            segment.backend.sq_norm_partials(span, perturbations[segment.group_index], out)
        partials[key] = buf
    if not sam.shard_groups and len(partials) <= 1:
        return {device: buf for (device, _), buf in partials.items()}
    return global_sum(sam, partials)


def squared_norm(partials: Dict[torch.device, torch.Tensor], grad_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """||g||^2 of the unscaled gradient, a float64 device tensor (one device's partials: with several
    devices or ranks each already holds the total)."""
    total = next(iter(partials.values())).sum(dtype=torch.float64)
    return total if grad_scale is None else total / grad_scale.to(total.device, torch.float64).square()


def nonfinite_flag(sam, work: list, group_count: int, norm: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """1.0 (float32, on the device) if the gradients of ``work`` hold an inf or NaN, read from their squared
    norm (``norm`` if already taken, else one pass; summed over ranks, so every rank decides alike; a norm
    that overflows float32 counts too); None when they do not or there are none here or on other ranks. Off
    a CPU the flag is always a tensor (0.0 when finite): deciding on the host would sync."""
    if not (work or sam.shard_groups):
        return None
    if norm is None:
        plain = perturbation_of(adaptive=False, eta=0.0, normalize=True, eps=sam.perturb_eps)
        partials = next(iter(norm_partials(sam, work, [plain] * group_count).values()))
    else:
        partials = norm.reshape(1)
    if partials.device.type == "cpu":  # summed on the host in double (no sync on a CPU): no tensor op if finite
        if math.isfinite(sum(partials.tolist())):
            return None
        return torch.ones(1, dtype=torch.float32)
    total = partials.sum(dtype=torch.float64) if norm is None else norm
    return (~torch.isfinite(total)).to(torch.float32).reshape(1)


def sum_over_segments(sam, per_segment: Callable) -> torch.Tensor:
    """The float64 sum over every segment of ``per_segment(segment)`` (a 0-d tensor on its device), the
    sharded segments' shares summed over their ranks (the norm's reduction, so every rank agrees)."""
    parts: Dict[tuple, list] = {}
    for segment in sam.segments:
        value = per_segment(segment).to(torch.float64).reshape(1)
        parts.setdefault((segment.device, segment.shard_group), []).append(value)
    totals = global_sum(sam, {key: torch.cat(values) for key, values in parts.items()})
    return next(iter(totals.values())).reshape(())


def global_sum(sam, partials: Dict[tuple, torch.Tensor], width: Optional[int] = None) -> Dict[torch.device, torch.Tensor]:
    """Sum the partials of every (device, shard group) over their first dimension into one float64 total
    (a scalar, or a vector of ``width`` values for (rows, width) partials), the sharded ones over their
    ranks first (one all-reduce per shard group); hand each device the total as a 1-D tensor."""
    shape = () if width is None else (width,)
    reductions = []
    for group, device in sam.shard_groups:  # every rank, every group, in one order: no rank waits alone
        own = [buf.sum(0, dtype=torch.float64).to(device) for (_, g), buf in partials.items() if g is group]
        value = torch.stack(own).sum(0) if own else torch.zeros(shape, dtype=torch.float64, device=device)
        reductions.append((value, sum_over_ranks(value, group)))
    home = sam.segments[0].device if sam.segments else sam.shard_groups[0][1]
    total = torch.zeros(shape, dtype=torch.float64, device=home)
    for (_, group), buf in partials.items():
        if group is None:
            total = total + buf.sum(0, dtype=torch.float64).to(home)
    for value, handle in reductions:
        handle.wait()
        total = total + value.to(home)
    return {device: total.to(device).reshape(-1) for device, _ in partials} or {home: total.reshape(-1)}


def _partials_buffer(sam, key: tuple, items: list) -> tuple:
    """The buffer for the partials of ``items`` (segment, span) on one (device, shard group), and each
    span's slice of it. Kept from step to step while the spans' sizes stay (every norm's partials are read,
    in stream order, before the next norm writes them): a fresh buffer and its slices cost ~3 tensor
    operations a step, ~20-40 us each on a CPU with a cold cache."""
    sizes, dtype = [], torch.float32
    for segment, span in items:
        sizes.append(segment.backend.partials_len(span))
        if segment.dtype == torch.float64:
            dtype = torch.float64
    sizes = tuple(sizes)
    kept = sam.partials_buffers.get(key)
    if kept is None or kept[0] != (sizes, dtype):
        buf = torch.empty(sum(sizes), dtype=dtype, device=key[0])
        outs, start = [], 0
        for n in sizes:
            outs.append(buf if n == buf.numel() else buf[start:start + n])
            start += n
        kept = sam.partials_buffers[key] = ((sizes, dtype), buf, outs)
    return kept[1], kept[2]
