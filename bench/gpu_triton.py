"""GPU benchmark of the triton backend (not a test): the fused SAM step against the memory-bandwidth floor.

    python bench/gpu_triton.py            # on a CUDA machine, well under two minutes on an H100
    python bench/gpu_triton.py --sweep    # also time a few (BLOCK, num_warps) configurations
    python bench/gpu_triton.py --smoke    # tiny sizes; without a GPU on CPU tensors via TRITON_INTERPRET=1

What is timed: the SAM step without forward/backward, ``first_step(); second_step()`` (gradients stay in
the buffers), for FusedSAM(backend="triton"), FusedSAM(backend="reference") and ClassicSAM (the classic
per-tensor loop), SGD with momentum, on

1. ResNet-50 parameter shapes (161 tensors, 25,557,032 parameters; built here, no torchvision), and
2. one tensor of 100M elements,

in float32 (and, for triton and reference, bfloat16 parameters with float32 momentum, without and with
float32 master weights). Medians over CUDA event timings of single steps.

Byte model (minimum traffic of one SAM step with SGD momentum, per parameter, float32 everything):
norm: read g (4 B); first_step: read g, w, write backup, w (16 B); second_step: read backup, g, buf,
write w, buf (20 B); total 40 B. With bfloat16 weights and gradients and a float32 momentum buffer:
2 + 8 + 14 = 24 B; with float32 master weights too (perturb reads the master instead of w and writes no
backup, the update reads and writes the master and writes w): 2 + 8 + 20 = 30 B. "GB/s" is that byte count
over the median time; "of copy" divides it by the device-to-device copy bandwidth measured in the same run
(a large ``copy_``, read + write bytes counted), so 100% means the step runs at the speed of a plain copy of
the same bytes.

A second table times each triton operation alone on the 100M tensor against its own byte count, for
float32 weights and for bfloat16 weights with a float32 master.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from fused_sam import FusedSAM  # noqa: E402
from fused_sam.bench.cases import resnet50_shapes  # noqa: E402
from fused_sam.backends import triton as triton_backend  # noqa: E402
from fused_sam.backends.base import Perturbation, Span, StepScalars  # noqa: E402
from fused_sam.classic import ClassicSAM  # noqa: E402
from fused_sam.updates import SGDUpdate  # noqa: E402

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
RHO = 0.05


def bytes_per_param(dtype: torch.dtype, master: bool = False) -> int:
    """SGD-momentum SAM step: norm (g) + perturb (g, w, backup, w) + update (backup, g, buf, w, buf); with
    a float32 master: norm (g) + perturb (master, g, w) + update (master, g, buf, master, w, buf)."""
    p = torch.tensor([], dtype=dtype).element_size()
    if master:
        return p + (4 + 2 * p) + (4 * 4 + 2 * p)
    return p + 4 * p + 3 * p + 2 * 4


def cases(smoke: bool):
    if smoke:
        return {"resnet50-like (tiny)": [(16, 3, 3, 3), (16,), (16,), (32, 16, 1, 1), (10, 32), (10,)],
                "single 5k": [(5000,)]}
    return {"resnet50": resnet50_shapes(), "single 100M": [(100_000_000,)]}


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=gen, device=device) * 0.05).to(dtype))
        p.grad = (torch.randn(s, generator=gen, device=device) * 1e-3).to(dtype)
        params.append(p)
    return params


class Timer:
    """Median wall time of ``fn`` in milliseconds: CUDA events per call on a GPU, perf_counter on CPU."""

    def __init__(self, device, smoke):
        self.cuda = device.type == "cuda"
        self.iters, self.budget = (2, 1.0) if smoke else (50, 1.5)

    def __call__(self, fn):
        fn()  # compile / allocate
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        once = time.perf_counter() - start
        iters = max(3, min(self.iters, int(self.budget / max(once, 1e-6))))
        for _ in range(min(3, iters)):
            fn()
        if not self.cuda:
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in events)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def copy_bandwidth(device, timer, smoke) -> float:
    """GB/s of a device-to-device copy, bytes read + written."""
    n = (1 << 20) if smoke else (1 << 28)  # 1 GiB of float32 on a GPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * 4 * n / (ms * 1e-3) / 1e9


def build(method, shapes, device, dtype, master=False):
    params = make_params(shapes, device, dtype)
    if method == "classic":
        opt = ClassicSAM(params, torch.optim.SGD, rho=RHO, **SGD_KW)
    else:
        opt = FusedSAM(params, torch.optim.SGD, rho=RHO, backend=method, master_weights=master, **SGD_KW)
    return params, opt


def sam_step(opt):
    opt.first_step()
    opt.second_step()


def check_parity(shapes, device, dtype, master=False):
    """Two SAM steps with triton and with reference from identical parameters: same weights."""
    results = []
    for method in ("reference", "triton"):
        params, opt = build(method, shapes, device, dtype, master)
        sam_step(opt)
        sam_step(opt)
        results.append([p.detach().float() for p in params])
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)


def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_steps(device, timer, copy_gbs, smoke):
    rows = []
    for case, shapes in cases(smoke).items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        configs = [("triton", torch.float32, False), ("reference", torch.float32, False),
                   ("classic", torch.float32, False), ("triton", torch.bfloat16, False),
                   ("reference", torch.bfloat16, False), ("triton", torch.bfloat16, True),
                   ("reference", torch.bfloat16, True)]
        classic_ms = None
        for method, dtype, master in configs:
            params, opt = build(method, shapes, device, dtype, master)
            ms = timer(lambda: sam_step(opt))
            del params, opt
            free(device)
            gbs = bytes_per_param(dtype, master) * numel / (ms * 1e-3) / 1e9
            if method == "classic":
                classic_ms = ms
            rows.append(dict(case=case, tensors=len(shapes), numel=numel, method=method,
                             dtype=str(dtype)[6:] + ("+master" if master else ""), ms=ms, gbs=gbs,
                             of_copy=gbs / copy_gbs))
        for r in rows:
            if r["case"] == case and classic_ms:
                r["vs_classic"] = classic_ms / r["ms"]
        print(f"  timed {case}", flush=True)
    return rows


def op_bytes(dtype: torch.dtype, master: bool) -> dict:
    """Bytes per element each operation moves (SGD momentum, not the first step; float32 state)."""
    p = torch.tensor([], dtype=dtype).element_size()
    if master:  # the master (4 B) is read instead of a backup; perturb writes no backup; the update writes it
        return {"sq_norm_partials": p, "perturb": 4 + 2 * p, "restore_and_update": 4 * 4 + 2 * p, "restore": 4 + p}
    return {"sq_norm_partials": p, "perturb": 4 * p, "restore_and_update": 3 * p + 2 * 4, "restore": 2 * p}


def run_ops(device, timer, copy_gbs, smoke):
    """Each triton operation alone on one large span, against its byte count: float32 weights, and
    bfloat16 weights with a float32 master."""
    n = 5000 if smoke else 100_000_000
    backend = triton_backend.TritonBackend()
    pert = Perturbation(adaptive=False, eta=0.0, normalize=True, eps=1e-12)
    update = SGDUpdate(**{k: v for k, v in SGD_KW.items() if k != "lr"})
    # not the first step: the buffer is read
    scalars = StepScalars(step=torch.ones((), device=device), lr=SGD_KW["lr"])
    perturb_scalars = StepScalars(rho=RHO)
    count = torch.zeros(1, dtype=torch.int32, device=device)
    rows = []
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(n, device=device, generator=gen)
        g = torch.randn(n, device=device, generator=gen).to(dtype)
        span = Span(weights=w.to(dtype), grads=g, backup=None if master else torch.empty_like(w),
                    state={"momentum_buffer": torch.zeros_like(w)}, master=w if master else None)
        partials = torch.empty(backend.partials_len(span), device=device)
        backend.sq_norm_partials(span, pert, partials)
        ops = {
            "sq_norm_partials": lambda: backend.sq_norm_partials(span, pert, partials),
            "perturb": lambda: backend.perturb(span, pert, partials, count, perturb_scalars),
            "restore_and_update": lambda: backend.restore_and_update(span, update, scalars),
            "restore": lambda: backend.restore(span),
        }
        for name, nbytes in op_bytes(dtype, master).items():
            ms = timer(ops[name])
            gbs = nbytes * n / (ms * 1e-3) / 1e9
            rows.append(dict(op=name, span=str(dtype)[6:] + ("+master" if master else ""), bytes=nbytes, ms=ms,
                             gbs=gbs, of_copy=gbs / copy_gbs))
        del w, g, span
        free(device)
    return rows


def run_sweep(device, timer, copy_gbs, smoke):
    """The fused float32 step on both cases for a few (BLOCK, num_warps) settings of the triton backend."""
    saved = triton_backend.BLOCK, triton_backend.NUM_WARPS
    rows = []
    try:
        for block, warps in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8)):
            triton_backend.BLOCK, triton_backend.NUM_WARPS = block, warps
            for case, shapes in cases(smoke).items():
                numel = sum(torch.Size(s).numel() for s in shapes)
                params, opt = build("triton", shapes, device, torch.float32)
                ms = timer(lambda: sam_step(opt))
                del params, opt
                free(device)
                gbs = 40 * numel / (ms * 1e-3) / 1e9
                rows.append(dict(block=block, warps=warps, case=case, ms=ms, gbs=gbs, of_copy=gbs / copy_gbs))
    finally:
        triton_backend.BLOCK, triton_backend.NUM_WARPS = saved
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes; on CPU through TRITON_INTERPRET=1 without a GPU")
    ap.add_argument("--sweep", action="store_true", help="also time a few (BLOCK, num_warps) settings")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    elif args.smoke:
        device, name = torch.device("cpu"), "CPU (Triton interpreter)"
    else:
        sys.exit("no CUDA GPU: run with --smoke to check the script on CPU")
    reason = triton_backend.TritonBackend.unavailable_reason(device, torch.float32)
    if reason:
        sys.exit(f"triton backend unavailable: {reason}")
    import triton
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}", flush=True)

    timer = Timer(device, args.smoke)
    parity_shapes = cases(args.smoke)["resnet50-like (tiny)" if args.smoke else "resnet50"]
    for dtype, master in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        check_parity(parity_shapes, device, dtype, master)
    print("parity: triton matches reference after two steps (float32, bfloat16, bfloat16 + master)", flush=True)
    copy_gbs = copy_bandwidth(device, timer, args.smoke)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    steps = run_steps(device, timer, copy_gbs, args.smoke)
    ops = run_ops(device, timer, copy_gbs, args.smoke)
    sweep = run_sweep(device, timer, copy_gbs, args.smoke) if args.sweep else []

    print(f"\nSAM step (first_step + second_step, SGD momentum), {name}, copy {copy_gbs:.0f} GB/s")
    print(f"{'case':<22}{'method':<11}{'dtype':<17}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'vs classic':>12}")
    for r in steps:
        vs = f"{r['vs_classic']:.1f}x" if "vs_classic" in r else "-"
        print(f"{r['case']:<22}{r['method']:<11}{r['dtype']:<17}{r['ms']:>9.3f}{r['gbs']:>8.0f}"
              f"{r['of_copy']:>8.0%}{vs:>12}")
    print(f"\ntriton operations alone, one span of {5000 if args.smoke else 100_000_000:,} elements")
    print(f"{'op':<20}{'span':<17}{'B/elem':>7}{'ms':>9}{'GB/s':>8}{'of copy':>9}")
    for r in ops:
        print(f"{r['op']:<20}{r['span']:<17}{r['bytes']:>7}{r['ms']:>9.3f}{r['gbs']:>8.0f}{r['of_copy']:>8.0%}")
    if sweep:
        print("\ntriton float32 step by (BLOCK, num_warps)")
        print(f"{'BLOCK':>6}{'warps':>6}  {'case':<22}{'ms':>9}{'GB/s':>8}{'of copy':>9}")
        for r in sweep:
            print(f"{r['block']:>6}{r['warps']:>6}  {r['case']:<22}{r['ms']:>9.3f}{r['gbs']:>8.0f}{r['of_copy']:>8.0%}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
