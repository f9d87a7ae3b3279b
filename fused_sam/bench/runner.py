"""The optimizer-step benchmark: every method on the same parameters and gradients, side by side.

For each (parameter set, base optimizer, dtype) case the runner draws weights w0 and gradients g once
(seeded), builds every method on its own copies of w0 and g and runs ``warmup`` SAM steps (first_step +
second_step, no forward/backward; the gradients stay g). Then it times the methods round-robin: in each of
``rounds`` rounds every method takes ``repeats`` timed steps, in an order that changes from round to round
(measure.round_order), so a burst of load from other processes slows every method alike instead of
whichever one happened to run then. A method's time is the median over rounds of its per-round medians,
and its spread is the IQR / median over rounds. The memory bandwidth that "% of memory bandwidth" divides
by is measured just before the rounds, after each and after the last. Last, each method runs one step under
an aten-op counter (and, on CUDA, one under torch.profiler and one for the memory peak), and its final
weights are kept. Every method
runs exactly the same number of steps, so the final weights must agree: each method is compared with
``classic`` (the "verified" column). A method that fails the check is reported, never silently timed.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import cases
from .measure import (
    NOISE_THRESHOLD, CacheFlusher, CopyMeter, count_cuda_kernels, count_ops, min_bytes_per_param, round_order,
    row_flags, storage_bytes, summarize, sync, time_steps,
)
from .methods import STATE_TENSORS, build, default_method_names, method_names

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
    repeats: int  # timed steps per method per round
    rounds: int = 5
    methods: Optional[List[str]] = None  # None: every method available (full) or the default three (not full)
    full: bool = True
    flush: bool = True
    kernels: bool = True  # count GPU kernels with torch.profiler (CUDA)
    seed: int = 0
    noise_threshold: float = NOISE_THRESHOLD
    extra_methods: Dict[str, Callable] = field(default_factory=dict)  # name -> build(params, optimizer) (tests)


@dataclass
class _Run:
    """One method of a case, built and warmed up, alive while the rounds interleave it with the others."""
    name: str
    method: object
    params: List[torch.Tensor]
    step: Callable[[], None]
    cuda_bytes: int  # CUDA memory its construction and warmup left allocated
    round_times: List[float] = field(default_factory=list)  # seconds per step, median of each round


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


def start(name: str, w0, g0, optimizer: str, cfg: Config) -> _Run:
    """Builds method ``name`` on fresh copies of w0 and g0 and takes its warmup steps."""
    device = cfg.device
    sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
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
    after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    return _Run(name, method, params, step, after - before)


def finish(run: _Run, optimizer: str, cfg: Config):
    """A timed method's row (time over rounds, op counts, memory, bytes model) and its final weights as one
    float32 vector."""
    device, name, method, params, step = cfg.device, run.name, run.method, run.params, run.step
    dtype = params[0].dtype
    row = dict(method=name, **summarize(run.round_times), rounds_ms=[t * 1e3 for t in run.round_times],
               info=dict(getattr(method, "info", {})))

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
        level = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        row["extra_bytes"] = run.cuda_bytes + torch.cuda.max_memory_allocated(device) - level - baseline
        row["memory_how"] = ("cuda memory the method's build and warmup left allocated + its peak above that "
                             "during a step - params/grads/state")
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
                                                 inf_check=getattr(method, "checks_gradients", False),
                                                 master=name.endswith("+master"))
    row["gbps"] = row["bytes_per_param"] * numel / (row["median_ms"] / 1e3) / 1e9
    if hasattr(method, "final_weights"):
        final, row["steps"] = method.final_weights(), method.steps
    else:
        final = torch.cat([p.detach().reshape(-1).float() for p in params])
    return row, final


def _error_row(name: str, exc: Exception) -> dict:
    """A method that raised: reported with its error, so one broken method does not hide the others."""
    return dict(method=name, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def run_case(set_name: str, optimizer: str, dtype_name: str, names: List[str], cfg: Config, meter: CopyMeter,
             flush: Optional[CacheFlusher], tick: Optional[Callable[[], None]] = None):
    """One (set, optimizer, dtype) case, its methods interleaved round by round: (rows, copy window).
    ``tick()`` is called after each method's build and warmup, its block of each round and its last step
    (``case_units`` calls in all), for a progress bar."""
    tick = tick or (lambda: None)
    device, dtype = cfg.device, DTYPES[dtype_name]
    shapes = cases.shapes(set_name)
    w0, g0 = draw(shapes, device, dtype, cfg.seed)
    failed, runs = {}, {}
    for name in names:
        try:
            runs[name] = start(name, w0, g0, optimizer, cfg)
        except Exception as exc:
            failed[name] = _error_row(name, exc)
        tick()
    before, during = meter.sample(), []
    for r in range(cfg.rounds):
        for name in round_order(list(runs), r):
            try:
                times = time_steps(runs[name].step, device, cfg.repeats, flush)
                runs[name].round_times.append(statistics.median(times))
            except Exception as exc:
                failed[name] = _error_row(name, exc)
                del runs[name]
            tick()
        during.append(meter.round_sample())
    window = meter.window(before, meter.sample(), during)
    done, finals = {}, {}
    for name, run in runs.items():
        try:
            done[name], finals[name] = finish(run, optimizer, cfg)
            done[name]["error"] = None
        except Exception as exc:
            failed[name] = _error_row(name, exc)
        tick()
    del runs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = dict(set=set_name, tensors=len(shapes), numel=sum(w.numel() for w in w0), optimizer=optimizer,
                dtype=dtype_name)
    rows = [dict(base, **(done.get(name) or failed[name])) for name in names]

    ref_name = "classic" if "classic" in finals else next(iter(finals), None)
    w0_flat = torch.cat([w.reshape(-1).float() for w in w0])
    by_name = {r["method"]: r for r in rows}
    for r in rows:
        r["flags"] = []
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
        r["copy_gbps"] = window["gbps"]
        r["pct_of_copy"] = 100.0 * r["gbps"] / window["gbps"]
        r["flags"] = row_flags(r, cfg.noise_threshold, pct_of_copy=r["pct_of_copy"],
                               copy_limit_pct=100.0 * window["gbps_fast"] / window["gbps"], stream=window["stream"])
        for label, other in (("speedup_vs_classic", "classic"), ("speedup_vs_torch_native", "torch-native")):
            o = by_name.get(other)
            r[label] = o["median_ms"] / r["median_ms"] if o and not o.get("error") else None
    return rows, dict(window, set=set_name, optimizer=optimizer, dtype=dtype_name)


def case_units(names: Sequence[str], rounds: int) -> int:
    """The progress ticks of one case (see run_case)."""
    return len(names) * (rounds + 2)


def copy_summary(windows: List[dict]) -> Dict[str, object]:
    """The run's memory bandwidth: the median over the cases' windows, with their range, and what it is (the
    stream, its buffer, the threads it ran on: ``reference``)."""
    gbps = [w["gbps"] for w in windows]
    threads = torch.get_num_threads()
    reference = f"{windows[0]['stream']}, {windows[0]['bytes'] / 2**20:.0f} MiB, {threads} thread{'s' * (threads != 1)}"
    if windows[0].get("device_type") == "cuda":
        reference = f"{windows[0]['stream']}, {windows[0]['bytes'] / 2**20:.0f} MiB, on the GPU"
    return {"bytes": windows[0]["bytes"], "gbps": statistics.median(gbps), "gbps_min": min(gbps),
            "gbps_max": max(gbps), "stream": windows[0]["stream"], "threads": threads, "reference": reference,
            "how": f"each case: median of the {windows[0]['stream']} passes timed before it, after each of its "
                   "rounds and after it; here: the median over cases", "cases": windows}


def method_plan(cfg: Config) -> List[tuple]:
    """(set, optimizer, dtype, method names) per case, in the order they run."""
    def names(dtype_name):
        dtype = DTYPES[dtype_name]
        if cfg.methods or cfg.full:
            return method_names(cfg.device, dtype, cfg.methods)
        return default_method_names(cfg.device, dtype)

    return [(set_name, optimizer, dtype_name, names(dtype_name) + list(cfg.extra_methods))
            for set_name in cfg.sets for optimizer in cfg.optimizers for dtype_name in cfg.dtypes]


def run_micro(cfg: Config, progress=None, on_case: Optional[Callable[[dict], None]] = None) -> Dict[str, object]:
    """All cases of ``cfg``; returns {'copy': copy_summary(), 'rows': [...], 'auto': {dtype: the backend auto
    picks}}. ``on_case`` gets that dict after
    every (set, optimizer, dtype) case, so partial results survive an interrupted run. ``progress``: tqdm, for
    a bar per case that also says about how long the cases after it will take."""
    device = cfg.device
    meter = CopyMeter(device, nbytes=(16 * 2**20 if cfg.sets == cases.QUICK_SETS else None))
    flush = CacheFlusher(device) if cfg.flush else None
    plan = method_plan(cfg)
    from ..backends import resolve_backend

    auto = {d: resolve_backend("auto", device, DTYPES[d]).name for d in cfg.dtypes}
    rows, windows, seconds_per_unit = [], [], {}  # set -> seconds per progress tick of its cases so far
    for i, (set_name, optimizer, dtype_name, names) in enumerate(plan):
        units = case_units(names, cfg.rounds)
        bar = None
        if progress:
            bar = progress(total=units, desc=f"case {i + 1}/{len(plan)} {set_name} {optimizer} {dtype_name}",
                           unit="step")
            if seconds_per_unit and i + 1 < len(plan):  # each later case at its set's rate so far, else the median
                median = statistics.median(r for rates in seconds_per_unit.values() for r in rates)
                later = sum(case_units(p[3], cfg.rounds) * statistics.median(seconds_per_unit.get(p[0], [median]))
                            for p in plan[i + 1:])
                bar.set_postfix_str(f"then ~{later:.0f} s for the {len(plan) - i - 1} case(s) after it")
        t0 = time.perf_counter()
        case_rows, window = run_case(set_name, optimizer, dtype_name, names, cfg, meter, flush,
                                     tick=(lambda: bar.update(1)) if bar else None)
        seconds_per_unit.setdefault(set_name, []).append((time.perf_counter() - t0) / units)
        if bar:
            bar.close()
        rows += case_rows
        windows.append(dict(window, device_type=device.type))
        if on_case:
            on_case({"copy": copy_summary(windows), "rows": rows, "auto": auto})
    return {"copy": copy_summary(windows), "rows": rows, "auto": auto}
