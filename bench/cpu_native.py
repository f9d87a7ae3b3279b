"""CPU benchmark of the native backend (not a test): the SAM step against the memory-bandwidth floor.

    python bench/cpu_native.py [--threads N] [--iters N] [--quick]

1. ResNet-50 parameter shapes (161 tensors, 25,557,032 float32 parameters), SGD with momentum: the SAM
   step without forward/backward (first_step + second_step) for backend native and reference. The floor is
   40 bytes/param (norm: read g; perturb: read w, g, write backup, w; restore+update: read backup, g, buf,
   write buf, w) divided by the copy bandwidth measured in this run (a large tensor copy, read + write
   bytes counted). Target: native within 1.15x of the floor.
2. The same step with bfloat16 parameters and float32 master weights (master_weights=True): the floor is
   30 bytes/param (norm: read g; perturb: read master, g, write w; restore+update: read master, g, buf,
   write buf, master, w; g and w are 2 bytes).
3. 1000 tensors of 1,000 elements: native FusedSAM against the classic per-tensor loop (ClassicSAM).
   Target: >= 30x faster.
4. Each native operation alone on the ResNet-50 buffer, against its own byte floor; the float32 rows, then
   the bfloat16 rows with a float32 master.
5. The ResNet-50 SAM step (SGD with momentum, 40 B/param; AdamW, 48 B/param) with the CPU kernels of each
   instruction set this CPU runs (--isa), in interleaved rounds.

Prints a table of medians. Runs in about two minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fused_sam import FusedSAM
from fused_sam.backends import native
from fused_sam.backends.native import NativeBackend
from fused_sam.bench.cases import resnet50_shapes
from fused_sam.classic import ClassicSAM
from fused_sam.updates import SGDUpdate


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen) * 0.05).to(dtype))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        params.append(p)
    return params


def median_time(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(numel=64 * 1024 * 1024, iters=9):
    """Bytes per second of a large float32 tensor copy, read + write counted."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), iters)
    return 2 * numel * 4 / t


def sam_step(opt):
    def step():
        opt.first_step()
        opt.second_step()
    return step


def make_opt(kind, params, master_weights=False):
    kw = dict(rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    if kind == "classic":
        return ClassicSAM(params, torch.optim.SGD, **kw)
    return FusedSAM(params, torch.optim.SGD, backend=kind, master_weights=master_weights, **kw)


def isa_rows(shapes, isas, iters, bw, n):
    """The native ResNet-50 SAM step per instruction set: for each base optimizer, rounds in which every ISA
    takes its timed steps in turn (so a busy machine slows them alike); median over the rounds."""
    rows = []
    before = native.cpu_capability()
    bases = [("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4), 40),
             ("adamw", torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2), 48)]
    try:
        for name, base, kw, bytes_per in bases:
            opt = FusedSAM(make_params(shapes), base, backend="native", rho=0.05, **kw)
            times = {isa: [] for isa in isas}
            for _ in range(max(3, iters // 3)):
                for isa in isas:
                    native.set_cpu_capability(isa)
                    times[isa].append(median_time(sam_step(opt), 3, warmup=1))
            for isa in isas:
                t = statistics.median(times[isa])
                rows.append((f"resnet50 SAM step, {name}, {isa}", t, t / (bytes_per * n / bw)))
            del opt
    finally:
        native.set_cpu_capability(before)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--iters", type=int, default=25, help="timed iterations per native row (median reported)")
    ap.add_argument("--quick", action="store_true", help="a few iterations only (smoke run)")
    ap.add_argument("--isa", default=None,
                    help="comma list of CPU kernel builds to compare (default: every one this CPU runs)")
    args = ap.parse_args(argv)
    reason = NativeBackend.unavailable_reason(torch.device("cpu"), torch.float32)
    if reason:
        print(f"native backend unavailable: {reason}")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = 3 if args.quick else args.iters
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {iters} timed iterations per row; "
          f"CPU kernels {native.cpu_capability()} (this CPU runs {', '.join(native.cpu_capabilities())})")

    bw = copy_bandwidth(iters=5 if args.quick else 9)
    shapes = resnet50_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    floor = 40 * n / bw
    print(f"copy bandwidth {bw / 1e9:.2f} GB/s (read+write); ResNet-50: {len(shapes)} tensors, {n:,} params; "
          f"floor 40 B/param = {floor * 1e3:.2f} ms")

    rows = []
    # 1. ResNet-50 SAM step.
    results = {}
    for kind in ("native", "reference", "classic"):
        if kind == "classic" and args.quick:
            continue
        opt = make_opt(kind, make_params(shapes))
        t = median_time(sam_step(opt), max(3, iters // (3 if kind != "native" else 1)))
        results[kind] = t
        rows.append((f"resnet50 SAM step, {kind}", t, t / floor))
        del opt

    # 2. The same with bfloat16 parameters and float32 master weights.
    floor_master = 30 * n / bw
    opt = make_opt("native", make_params(shapes, dtype=torch.bfloat16), master_weights=True)
    t_master = median_time(sam_step(opt), iters)
    del opt
    rows.append(("resnet50 SAM step, native bf16+master", t_master, t_master / floor_master))

    # 3. 1000 x 1k tensors, native vs classic.
    small = [(1000,)] * 1000
    n_small = 1000 * 1000
    floor_small = 40 * n_small / bw
    t_native_small = median_time(sam_step(make_opt("native", make_params(small))), iters * 2)
    t_classic_small = median_time(sam_step(make_opt("classic", make_params(small))), max(3, iters // 2))
    rows.append(("1000x1k SAM step, native", t_native_small, t_native_small / floor_small))
    rows.append(("1000x1k SAM step, classic", t_classic_small, t_classic_small / floor_small))

    # 4. Native operations alone on a ResNet-50-sized flat buffer.
    ops = torch.ops.fused_sam
    w, g = torch.randn(n), torch.randn(n)
    bk, buf = torch.empty(n), torch.zeros(n)
    master, w16, g16 = torch.randn(n), torch.empty(n, dtype=torch.bfloat16), g.bfloat16()
    step = torch.ones(())  # not the first step: the momentum buffer is read
    u = SGDUpdate(momentum=0.9, weight_decay=5e-4)
    sgd = (u.code, u.flags(), list(u.hyperparameters()))  # restore_update's kind, flags and hyperparameters
    partials = torch.empty(NativeBackend().partials_len(type("S", (), {"numel": n, "device": torch.device("cpu")})()))
    op_rows = [
        ("op sq_norm_partials", 4, lambda: ops.sq_norm_partials(g, w, None, False, 0.0, partials)),
        ("op perturb", 16,
         lambda: ops.perturb(w, g, bk, None, partials, None, None, False, 0.0, True, 1e-12, 0.05, None)),
        ("op restore_update (SGD, momentum)", 20,
         lambda: ops.restore_update(w, bk, None, g, [buf], step, None, None, None, None, *sgd, 0.1, None)),
        ("op restore", 8, lambda: ops.restore(w, bk, None)),
        ("op sq_norm_partials ASAM, master", 6,
         lambda: ops.sq_norm_partials(g16, w16, master, True, 0.01, partials)),
        ("op perturb, master", 8,
         lambda: ops.perturb(w16, g16, None, master, partials, None, None, False, 0.0, True, 1e-12, 0.05, None)),
        ("op restore_update (SGD, momentum), master", 20,
         lambda: ops.restore_update(w16, None, master, g16, [buf], step, None, None, None, None, *sgd, 0.1, None)),
        ("op restore, master", 6, lambda: ops.restore(w16, None, master)),
    ]
    for name, bytes_per, fn in op_rows:
        t = median_time(fn, iters)
        rows.append((name, t, t / (bytes_per * n / bw)))

    # 5. The step per instruction set.
    isas = args.isa.split(",") if args.isa else list(native.cpu_capabilities())
    rows += isa_rows(shapes, isas, iters, bw, n)

    print()
    print(f"{'case':<42} {'median ms':>10} {'x floor':>8}")
    print("-" * 62)
    for name, t, ratio in rows:
        print(f"{name:<42} {t * 1e3:>10.2f} {ratio:>8.2f}")
    print()
    ratio = results["native"] / floor
    speedup = t_classic_small / t_native_small
    print(f"ResNet-50 native SAM step: {ratio:.2f}x the 40 B/param floor (target <= 1.15): "
          f"{'OK' if ratio <= 1.15 else 'MISSED'}")
    print(f"1000x1k native vs classic: {speedup:.1f}x faster (target >= 30): {'OK' if speedup >= 30 else 'MISSED'}")
    if "reference" in results:
        print(f"ResNet-50 native vs reference: {results['reference'] / results['native']:.1f}x faster")
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
