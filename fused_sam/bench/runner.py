"""The optimizer-step benchmark: every method on the same parameters and gradients, side by side.

For each (parameter set, base optimizer, dtype) the runner draws weights w0 and gradients g once (seeded),
then for each method: copies w0 and g into fresh tensors, builds the method, runs ``warmup`` SAM steps
(first_step + second_step, no forward/backward; the gradients stay g), times ``repeats`` steps, runs one
step under an aten-op counter (and, on CUDA, one under torch.profiler and one for the memory peak), and
keeps the final weights. Every method runs exactly the same number of steps, so the final weights must
agree: each method is compared with ``classic`` (the "verified" column). A method that fails the check
is reported, never silently timed.
"""
from __future__ import annotations

import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import cases
from .measure import (
    CacheFlusher, copy_bandwidth, count_cuda_kernels, count_ops, min_bytes_per_param, storage_bytes, summarize,
    sync, time_steps,
)
from .methods import STATE_TENSORS, build, method_names

# Final weights a (a method's) and b (classic's) agree when, for 32/64-bit parameters, every element has
# |a - b| <= atol + rtol * |b| (rtol, atol below); for 16-bit parameters, whose every step rounds and whose
# state torch.optim keeps in 16 bits (FusedSAM in float32), when ||a - b|| <= rtol * ||b - w0||: the two
# trajectories differ by at most that fraction of the distance travelled.
TOLERANCE = {
    torch.float32: (1e-4, 1e-6),
    torch.float64: (1e-9, 1e-12),
    torch.bfloat16: (3e-2, None),
    torch.float16: (1e-2, None),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
W_SCALE, G_SCALE = 0.02, 0.01


@dataclass
class Config:
    device: torch.device
    sets: List[str]
    optimizers: List[str]
    dtypes: List[str]
    warmup: int
    repeats: int
    methods: Optional[List[str]] = None  # None: all available
    flush: bool = True
    kernels: bool = True  # count GPU kernels with torch.profiler (CUDA)
    seed: int = 0
    extra_methods: Dict[str, Callable] = field(default_factory=dict)  # name -> build(params, optimizer) (tests)


def draw(shapes: Sequence[tuple], device: torch.device, dtype: torch.dtype, seed: int):
    """Weights ~ N(0, 0.02^2) and gradients ~ N(0, 0.01^2), drawn in float32 and rounded to ``dtype``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    w = [(torch.randn(s, generator=gen, device=device) * W_SCALE).to(dtype) for s in shapes]
    g = [(torch.randn(s, generator=gen, device=device) * G_SCALE).to(dtype) for s in shapes]
    return w, g


def compare(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, w0: Optional[torch.Tensor] = None) -> float:
    """Error over tolerance (see TOLERANCE): <= 1 means a and b agree; inf if a is not finite."""
    rtol, atol = TOLERANCE[dtype]
    if not bool(torch.isfinite(a).all()):
        return math.inf
    if atol is None:  # 16-bit: normwise, relative to the distance travelled from w0
        travelled = float(torch.linalg.vector_norm(b - w0)) if w0 is not None else float(torch.linalg.vector_norm(b))
        return float(torch.linalg.vector_norm(a - b)) / (rtol * max(travelled, 1e-30))
    return float(((a - b).abs() / (atol + rtol * b.abs())).max())


def float32_classic(w0, g0, optimizer: str, steps: int) -> torch.Tensor:
    """``classic`` run in float32 from the (16-bit) starting weights and gradients: what float32 master
    weights must reproduce."""
    params = [w.float().requires_grad_(True) for w in w0]
    for p, g in zip(params, g0):
        p.grad = g.float()
    method = build("classic", params, optimizer)
    for _ in range(steps):
        method.first_step()
        method.second_step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def run_method(name: str, w0, g0, optimizer: str, cfg: Config, flush: Optional[CacheFlusher]):
    """One method on one case: (row of measurements, final weights as one float32 vector)."""
    device = cfg.device
    dtype = w0[0].dtype
    sync(device)
    mem_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    params = [w.clone().requires_grad_(True) for w in w0]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    method = cfg.extra_methods[name](params, optimizer) if name in cfg.extra_methods else build(name, params, optimizer)

    def step():
        method.first_step()
        method.second_step()

    for _ in range(cfg.warmup):
        step()
    sync(device)
    times = time_steps(step, device, cfg.repeats, flush)
    row = dict(method=name, **summarize(times), info=dict(getattr(method, "info", {})))

    numel = sum(p.numel() for p in params)
    elsize = params[0].element_size()
    baseline = numel * elsize * (2 + STATE_TENSORS[optimizer])  # params + grads + torch.optim state
    held = list(params) + [p.grad for p in params] + method.held_tensors()
    counter = count_ops(step, track_memory=device.type != "cuda")
    row["aten_ops"] = counter.ops
    row["top_ops"] = dict(sorted(counter.names.items(), key=lambda kv: -kv[1])[:8])
    if device.type == "cuda":
        counts = count_cuda_kernels(step, device) if cfg.kernels else {"kernels": None, "copies": None}
        row["kernels"], row["gpu_copies"] = counts["kernels"], counts["copies"]
        if not cfg.kernels:
            step()  # keep the number of steps the same with and without the profiler
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        row["extra_bytes"] = torch.cuda.max_memory_allocated(device) - mem_before - baseline
        row["memory_how"] = "cuda max_memory_allocated during a step - memory before - params/grads/state"
    else:
        row["kernels"] = None
        persistent = storage_bytes(held) - baseline
        transient = counter.transient_peak_bytes
        row["extra_bytes"] = None if transient is None else persistent + transient
        row["extra_persistent_bytes"] = persistent
        row["extra_transient_bytes"] = transient
        row["memory_how"] = "held storages - params/grads/state + host malloc peak during a step (mallinfo2)"

    # FusedSAM keeps optimizer state in float32 for 16-bit parameters; torch.optim in the parameter dtype.
    fused = name.startswith("fused:")
    row["state_bytes_per_elem"] = 4 if fused and dtype in (torch.bfloat16, torch.float16) else elsize
    row["bytes_per_param"] = min_bytes_per_param(optimizer, elsize, row["state_bytes_per_elem"],
                                                 grad_scaler=name.endswith("+GradScaler"),
                                                 master=name.endswith("+master"))
    row["gbps"] = row["bytes_per_param"] * numel / (row["median_ms"] / 1e3) / 1e9
    if hasattr(method, "final_weights"):
        final, row["steps"] = method.final_weights(), method.steps
    else:
        final = torch.cat([p.detach().reshape(-1).float() for p in params])
    del method, params, held, counter
    return row, final


def run_micro(cfg: Config, progress=None, on_case: Optional[Callable[[dict], None]] = None) -> Dict[str, object]:
    """All cases of ``cfg``; returns {'copy': copy-bandwidth dict, 'rows': [...]}. ``on_case`` gets that dict
    after every (set, optimizer, dtype) case, so partial results survive an interrupted run."""
    device = cfg.device
    copy = copy_bandwidth(device, nbytes=(16 * 2**20 if cfg.sets == cases.QUICK_SETS else None))
    flush = CacheFlusher(device) if cfg.flush else None
    rows = []
    plan = []
    for set_name in cfg.sets:
        for optimizer in cfg.optimizers:
            for dtype_name in cfg.dtypes:
                names = method_names(device, DTYPES[dtype_name], cfg.methods) + list(cfg.extra_methods)
                plan.append((set_name, optimizer, dtype_name, names))
    total = sum(len(p[3]) for p in plan)
    bar = progress(total=total, desc="SAM step", unit="run") if progress else None
    for set_name, optimizer, dtype_name, names in plan:
        dtype = DTYPES[dtype_name]
        shapes = cases.shapes(set_name)
        w0, g0 = draw(shapes, device, dtype, cfg.seed)
        numel = sum(w.numel() for w in w0)
        case_rows, finals = [], {}
        for name in names:
            if bar:
                bar.set_postfix_str(f"{set_name} {optimizer} {dtype_name} {name}")
            base = dict(set=set_name, tensors=len(shapes), numel=numel, optimizer=optimizer, dtype=dtype_name)
            t0 = time.perf_counter()
            try:
                row, final = run_method(name, w0, g0, optimizer, cfg, flush)
                finals[name] = final
                row["error"] = None
            except Exception as exc:  # report and go on: one broken method must not hide the others
                row = dict(method=name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            row["seconds"] = time.perf_counter() - t0  # wall time of this method's whole run
            case_rows.append(dict(base, **row))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if bar:
                bar.update(1)
        ref_name = "classic" if "classic" in finals else next(iter(finals), None)
        w0_flat = torch.cat([w.reshape(-1).float() for w in w0])
        by_name = {r["method"]: r for r in case_rows}
        for r in case_rows:
            if r.get("error"):
                r["verified"] = False
                continue
            if r["method"].endswith("+master"):  # float32 masters: held to classic SAM run in float32
                r["verified_against"] = "classic in float32"
                reference = float32_classic(w0, g0, optimizer, r["steps"])
                err = compare(finals[r["method"]], reference, torch.float32)
            else:
                r["verified_against"] = ref_name
                err = compare(finals[r["method"]], finals[ref_name], dtype, w0_flat)
            r["max_err_over_tol"] = err
            r["verified"] = err <= 1.0
            r["pct_of_copy"] = 100.0 * r["gbps"] / copy["gbps"]
            for label, other in (("speedup_vs_classic", "classic"), ("speedup_vs_torch_native", "torch-native")):
                o = by_name.get(other)
                r[label] = o["median_ms"] / r["median_ms"] if o and not o.get("error") else None
        rows += case_rows
        del finals, w0, g0, w0_flat
        if on_case:
            on_case({"copy": copy, "rows": rows})
    if bar:
        bar.close()
    return {"copy": copy, "rows": rows}
