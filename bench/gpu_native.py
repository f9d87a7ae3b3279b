"""GPU benchmark of the native backend (not a test): SAM step time against the copy-bandwidth floor.

    python bench/gpu_native.py [--iters N] [--dtype fp32|bf16|bf16-master]

Cases: ResNet-50 parameter shapes (161 tensors, 25.6M params) and one 100M-element tensor; SGD with
momentum; the SAM step without forward/backward (first_step + second_step). Methods: FusedSAM with
backend native and reference, and the classic per-tensor SAM. The floor is the step's bytes (40 per
float32 parameter: norm reads g; perturb reads w, g and writes backup, w; restore+update reads backup,
g, buf and writes buf, w; half that for the parameter streams in bf16) over the device copy bandwidth
measured in the same run (read + write counted). bf16-master: bf16 parameters with float32 master weights
(master_weights=True; classic SAM has none, so no classic row): the master (4 bytes) is read where the
backup was, the backup is not written, the update writes the master too: 30 bytes per parameter. Also
times each native operation alone.
Prints medians (CUDA events). Runs in well under a minute on an H100. Without CUDA it says so and exits.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_native import make_opt, resnet50_shapes, sam_step  # noqa: E402

from fused_sam.backends.native import NativeBackend  # noqa: E402
from fused_sam.updates import SGDUpdate  # noqa: E402


def cuda_median_ms(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(numel=256 * 1024 * 1024):
    src = torch.randn(numel, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 20)
    del src, dst
    return 2 * numel * 4 / (ms / 1e3)


def make_params(shapes, dtype):
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype) * 0.05)
        p.grad = torch.randn(s, device="cuda", dtype=dtype) * 1e-3
        params.append(p)
    return params


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "bf16-master"], default="fp32")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_native.py needs a CUDA GPU; none is available here (nothing measured)")
        return 0
    reason = NativeBackend.unavailable_reason(torch.device("cuda"), torch.float32)
    if reason:
        print(f"native CUDA kernels unavailable: {reason}")
        return 1
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    master = args.dtype == "bf16-master"
    t0 = time.perf_counter()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s "
          f"(read+write), parameters {dtype}{' with float32 master weights' if master else ''}")
    pbytes = torch.tensor([], dtype=dtype).element_size()
    if master:  # 5 parameter-dtype streams, the master read twice and written once, momentum read/write
        bytes_per_param = 5 * pbytes + 3 * 4 + 8
        perturb_bytes, sgd_bytes, restore_bytes = 2 * pbytes + 4, 2 * pbytes + 16, pbytes + 4
    else:  # 8 parameter-dtype streams + momentum read/write in float32
        bytes_per_param = 8 * pbytes + 8
        perturb_bytes, sgd_bytes, restore_bytes = 4 * pbytes, 3 * pbytes + 8, 2 * pbytes
    kinds = ("native", "reference") if master else ("native", "reference", "classic")

    cases = [("resnet50", resnet50_shapes()), ("single100m", [(100_000_000,)])]
    rows = []
    for case, shapes in cases:
        n = sum(torch.Size(s).numel() for s in shapes)
        floor_ms = bytes_per_param * n / bw * 1e3
        for kind in kinds:
            opt = make_opt(kind, make_params(shapes, dtype), master_weights=master)
            ms = cuda_median_ms(sam_step(opt), args.iters if kind != "classic" else max(5, args.iters // 3))
            rows.append((f"{case} {kind}", ms, floor_ms / ms * 100))
            del opt
            torch.cuda.empty_cache()
        # each native op alone on this case's flat size
        ops = torch.ops.fused_sam
        w = torch.randn(n, device="cuda", dtype=dtype)
        g, buf = torch.randn_like(w), torch.zeros(n, device="cuda")
        bk, m = (None, torch.randn(n, device="cuda")) if master else (torch.empty_like(w), None)
        step = torch.ones((), device="cuda")  # not the first step: the momentum buffer is read
        u = SGDUpdate(momentum=0.9, weight_decay=5e-4)
        sgd = (u.code, u.flags(), list(u.hyperparameters()))  # restore_update's kind, flags and hyperparameters
        partials = torch.empty(NativeBackend().partials_len(type("S", (), {"numel": n, "device": w.device})()),
                               device="cuda")
        for name, nbytes, fn in (
            ("sq_norm_partials", pbytes, lambda: ops.sq_norm_partials(g, w, m, False, 0.0, partials)),
            ("perturb", perturb_bytes,
             lambda: ops.perturb(w, g, bk, m, partials, None, None, False, 0.0, True, 1e-12, 0.05, None)),
            ("restore_update (SGD)", sgd_bytes,
             lambda: ops.restore_update(w, bk, m, g, [buf], step, None, None, None, None, *sgd, 0.1, None)),
            ("restore", restore_bytes, lambda: ops.restore(w, bk, m)),
        ):
            ms = cuda_median_ms(fn, args.iters)
            rows.append((f"{case} op {name}", ms, nbytes * n / bw * 1e3 / ms * 100))
        del w, g, bk, m, buf, step
        torch.cuda.empty_cache()

    print()
    print(f"{'case':<34} {'median ms':>10} {'% of copy BW':>13}")
    print("-" * 59)
    for name, ms, pct in rows:
        print(f"{name:<34} {ms:>10.3f} {pct:>12.0f}%")
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
