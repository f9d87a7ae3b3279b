"""What ``telemetry=True`` costs a SAM step on the CPU (not a test): the optimizer step alone (first_step +
second_step, no forward or backward) with telemetry off and on, side by side in interleaved rounds.

    python bench/telemetry_cost.py [--backend native] [--threads N] [--rounds 5] [--iters 10]
    python bench/telemetry_cost.py --device cuda --backend auto     # on a GPU (bench/gpu_check.sh)

Sets: ResNet-50 parameter shapes (161 tensors, 25.6 M float32 parameters) and 1000 tensors of 1,000
elements; bases SGD with momentum and AdamW. Telemetry adds one read of the perturbed weights to the
restore-and-update pass (4 bytes per float32 parameter: SGD-momentum 44 -> 48 B/param, AdamW 52 -> 56, the
skip_nonfinite guard's read of g included) and a few tensor operations per step on small tensors (the sums'
partials, the record). Prints one line per
case: the medians over rounds of each round's median step time, and the ratio on/off.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from cpu_native import make_params, median_time, sam_step  # bench/ is this script's directory
from fused_sam import FusedSAM
from fused_sam.bench.cases import resnet50_shapes

SETS = {"resnet50": resnet50_shapes, "1000x1k": lambda: [(1000,)] * 1000}
BASES = {"sgd-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}
# docs/bench.md's floor with the skip_nonfinite guard's read of g (P = 4 bytes more), and telemetry's read of w + e
BYTES_PER_PARAM = {"sgd-momentum": (44, 48), "adamw": (52, 56)}


def on_device(p: torch.nn.Parameter, device: torch.device) -> torch.nn.Parameter:
    if device.type == "cpu":
        return p
    moved = torch.nn.Parameter(p.detach().to(device))
    moved.grad = p.grad.to(device)
    return moved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="native")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"backend {args.backend} on {device}, {args.threads} threads, {args.rounds} interleaved rounds of "
          f"{args.iters} steps")
    print(f"{'set':10} {'base':13} {'off ms':>8} {'on ms':>8} {'on/off':>7}  bytes/param off -> on")
    for set_name, shapes in SETS.items():
        for base_name, (cls, kwargs) in BASES.items():
            steps = {}
            for telemetry in (False, True):
                params = [on_device(p, device) for p in make_params(shapes())]
                opt = FusedSAM(params, cls, rho=0.05, backend=args.backend, telemetry=telemetry, **kwargs)
                step = sam_step(opt)
                steps[telemetry] = lambda step=step: (step(), synchronize())
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for telemetry, step in steps.items():
                    times[telemetry].append(median_time(step, args.iters))
            off, on = (statistics.median(times[t]) * 1e3 for t in (False, True))
            before, after = BYTES_PER_PARAM[base_name]
            print(f"{set_name:10} {base_name:13} {off:8.2f} {on:8.2f} {on / off:7.3f}  {before} -> {after} "
                  f"(x{after / before:.3f})")


if __name__ == "__main__":
    main()
