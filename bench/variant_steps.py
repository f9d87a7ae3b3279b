"""The optimizer's share of a variant's step: a SAM step, a plain step (Every/Randomly/WhenSharp between SAM
steps), LookSAM's reuse step and a MomentumSAM step, on the same parameters and gradients (no forward or
backward), against the bytes each must move.

Bytes per parameter element (P parameter bytes, S state bytes, n state buffers: SGD-momentum 1, AdamW 2):

  SAM step       norm P; perturb: read w, g, write backup, w 4P; restore + update 3P + 2nS
  plain step     restore + update from w itself: read w, g, state; write w, state          3P + 2nS
  LookSAM reuse  norm of g P; update with g + c g_v: read w, g, g_v, state; write w, state 4P + S + 2nS
  MomentumSAM    update 3P + 2nS; norm of the new momentum S; perturb along it: read w, v,
                 write backup, w 3P + S                                                   6P + 2S + 2nS
                 (floor: the update writes w straight to the backup and sums the momentum's norm as
                 it goes, the perturbation then reads backup and v and writes w: 5P + S + 2nS)

The "floor" column is the least a step of that kind must move; "% copy" is the bytes of the passes the
optimizer runs over the time, against the memory bandwidth of a large stream (a copy, or an in-place add
where that is faster: fused_sam.bench.measure.CopyMeter) measured in the same window. Methods interleave
round-robin; medians over rounds.

Usage: python bench/variant_steps.py [--device cpu|cuda] [--set resnet50] [--rounds 7] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from fused_sam import FusedSAM
from fused_sam.bench import cases
from fused_sam.bench.measure import CopyMeter, round_order, summarize, sync, time_steps
from fused_sam.bench.runner import draw
from fused_sam.variants import Every, LookSAM, MomentumSAM

NEVER_AGAIN = 10**9  # Every(k) / LookSAM(k) with this k: one SAM step, then only plain / reuse steps
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}


def bytes_per_param(kind: str, optimizer: str, p: int, s: int) -> tuple:
    """(bytes the implementation moves, the floor) per parameter element, from the model above."""
    n = {"sgd": 1, "adamw": 2}[optimizer]
    update = 3 * p + 2 * n * s
    return {
        "sam": (5 * p + update, 5 * p + update),
        "plain": (update, update),
        "looksam-reuse": (p + update + s, p + update + s),
        "momentum": (update + s + 3 * p + s, update + 2 * p + s),
    }[kind]


def build(kind: str, optimizer: str, weights, grads):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    base, kwargs = BASES[optimizer]
    variant = {"sam": None, "plain": Every(NEVER_AGAIN), "looksam-reuse": LookSAM(NEVER_AGAIN),
               "momentum": MomentumSAM()}[kind]
    opt = FusedSAM(params, base, rho=0.05, variant=variant, **kwargs)
    if kind in ("plain", "looksam-reuse"):  # the one SAM step (LookSAM: it stores g_v); then the timed kind
        opt.first_step()
        opt.second_step()

    def step():
        if kind == "sam":
            opt.first_step()
            opt.second_step()
        else:
            opt.plain_step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", default="resnet50", choices=sorted(cases.SETS))
    parser.add_argument("--optimizer", default="sgd,adamw")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    weights, grads = draw(cases.shapes(args.set), device, torch.float32, seed=0)
    numel = sum(w.numel() for w in weights)
    meter = CopyMeter(device)
    print(f"{args.set}: {len(weights)} tensors, {numel:,} float32 elements, {device} "
          f"({torch.get_num_threads()} threads), backend auto; medians over {args.rounds} rounds")
    print(f"{'optimizer':9} {'step':14} {'median ms':>10} {'spread':>7} {'B/param':>8} {'floor':>6} "
          f"{'x floor':>8} {'% copy':>7}")
    for optimizer in args.optimizer.split(","):
        kinds = ["sam", "plain", "looksam-reuse", "momentum"]
        steps = {kind: build(kind, optimizer, weights, grads) for kind in kinds}
        for step in steps.values():  # warm up
            step()
        sync(device)
        before, during = meter.sample(), []
        per_round = {kind: [] for kind in kinds}
        for r in range(args.rounds):
            for kind in round_order(kinds, r):
                per_round[kind].append(statistics.median(time_steps(steps[kind], device, args.repeats)))
            during.append(meter.round_sample())
        gbps = meter.window(before, meter.sample(), during)["gbps"]
        for kind in kinds:
            stats = summarize(per_round[kind])
            moved, floor = bytes_per_param(kind, optimizer, 4, 4)
            pct = 100 * moved * numel / (stats["median_ms"] / 1e3) / 1e9 / gbps
            print(f"{optimizer:9} {kind:14} {stats['median_ms']:10.2f} {stats['spread']:7.2f} {moved:8d} {floor:6d} "
                  f"{moved / floor:8.2f} {pct:6.0f}%")
    print(f"memory bandwidth {gbps:.1f} GB/s ({meter.stream})")


if __name__ == "__main__":
    main()
