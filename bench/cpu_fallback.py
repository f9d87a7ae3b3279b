"""CPU benchmark of the fallbacks used when fused_sam._C is not built (not a test): classic SAM against
FusedSAM with backend "reference" and backend "torch" (and "native" too, when it is built and asked for).

    python bench/cpu_fallback.py [--threads N] [--rounds N] [--optimizers sgd,adamw] [--native] [--quick]
                                 [--no-reference] [--chunks 262144,4194304]

ResNet-50 parameter shapes (161 float32 tensors, 25,557,032 elements), one SAM step without forward and
backward (first_step + second_step), with SGD (lr 0.01, momentum 0.9, weight decay 5e-4) and with AdamW
(lr 1e-3, weight decay 1e-2), as ``fused-sam bench`` configures them. Every method gets its own copy of
the parameters. The methods are timed in interleaved rounds (one step each per round, the order rotating
from round to round) so that a change in the machine's load hits all of them alike; the table gives the
median, the spread (interquartile range over the median) and the speed-up over classic, median against
median. Target (issue 14): the torch backend >= 1.3x classic for both optimizers. ``--chunks`` adds the
torch backend with other chunk sizes (rows "torch@N"), to check the choice of CPU_CHUNK on a machine.

Timings on a machine shared with other work are noisy, and more so with several threads: every op of a
multi-threaded torch loop waits for all its threads, so a core taken by another process stalls each op
(classic SAM's per-tensor loop is hit too). The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fused_sam import FusedSAM
from fused_sam.bench.cases import shapes as parameter_set
from fused_sam.backends.torch_ops import TorchBackend
from fused_sam.classic import ClassicSAM

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
RHO = 0.05


def make_params(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen) * 0.05)
        p.grad = torch.randn(s, generator=gen) * 1e-3
        params.append(p)
    return params


def make_step(method, shapes, optimizer):
    base, kwargs = OPTIMIZERS[optimizer]
    params = make_params(shapes)
    if method == "classic":
        opt = ClassicSAM(params, base, rho=RHO, **kwargs)  # torch.optim's default on CPU: the for-loop
    elif method.startswith("torch@"):  # the torch backend with another chunk size
        opt = FusedSAM(params, base, rho=RHO, backend="torch", **kwargs)
        backend = TorchBackend(chunk_numel=int(method.split("@")[1]))
        for segment in opt._sam.segments:
            segment.backend = backend
    else:
        opt = FusedSAM(params, base, rho=RHO, backend=method, **kwargs)

    def step():
        opt.first_step()
        opt.second_step()
    return step


def quartiles(times):
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return q[0], q[1], q[2]


def run(optimizer, methods, shapes, rounds, warmup):
    steps = {m: make_step(m, shapes, optimizer) for m in methods}
    for _ in range(warmup):
        for m in methods:
            steps[m]()
    times = {m: [] for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            t0 = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--optimizers", default="sgd,adamw")
    ap.add_argument("--set", default="resnet50", help="parameter set of fused_sam.bench.cases (default resnet50)")
    ap.add_argument("--native", action="store_true", help="also time backend 'native' (if built)")
    ap.add_argument("--no-reference", action="store_true", help="leave the (slow) reference backend out")
    ap.add_argument("--chunks", default="", help="comma list of other chunk sizes to time the torch backend with")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up step (smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, warmup = (3, 1) if args.quick else (args.rounds, args.warmup)
    methods = ["classic"] + ([] if args.no_reference else ["reference"]) + ["torch"]
    methods += ["native"] if args.native else []
    methods += [f"torch@{int(c)}" for c in args.chunks.split(",") if c.strip()]
    shapes = parameter_set(args.set)
    numel = sum(torch.Size(s).numel() for s in shapes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.2f} at start; {args.set}: {len(shapes)} tensors, {numel:,} float32 parameters; "
          f"{rounds} interleaved rounds; torch backend chunk {TorchBackend().chunk_numel(torch.device('cpu')):,} "
          "elements")
    failed = False
    print(f"{'optimizer':<8} {'method':<14} {'median ms':>10} {'IQR/med':>8} {'vs classic':>11}")
    for optimizer in args.optimizers.split(","):
        times = run(optimizer, methods, shapes, rounds, warmup)
        classic = statistics.median(times["classic"])
        for m in methods:
            q1, med, q3 = quartiles(times[m])
            speedup = classic / med
            print(f"{optimizer:<8} {m:<14} {med * 1e3:>10.1f} {(q3 - q1) / med:>7.0%} {speedup:>10.2f}x")
        failed |= classic / statistics.median(times["torch"]) < 1.3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at end; target: torch >= 1.30x classic: {'missed' if failed else 'met'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
