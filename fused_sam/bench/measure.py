"""Measurements: step timing, copy bandwidth, the minimum-bytes model, launch / op counts, extra memory.

Minimum-bytes model (bytes a SAM step must move at least, per parameter; P = bytes of one parameter
element, S = bytes of one optimizer-state element):

  first_step   read g for the norm                                       P
               read w, g; write backup, w (w + e)                         4P
  second_step  SGD-momentum: read backup, g, buf; write w, buf            3P + 2S
               AdamW:        read backup, g, m, v; write w, m, v          3P + 4S

  SGD-momentum: 8P + 2S   fp32: 40 B/param    bf16 params, fp32 state: 24   bf16 params and state: 20
  AdamW:        8P + 4S   fp32: 48 B/param    bf16 params, fp32 state: 32   bf16 params and state: 24

A step that decides whether to skip its update reads every gradient once more (P more): under a GradScaler
(the ``+GradScaler`` methods), GradScaler's inf check, after which the unscaling update reads only the
scale and found_inf scalars; without one, FusedSAM's ``skip_nonfinite`` guard (the default: every
``fused:`` method), a norm pass over the second gradients. SGD-momentum fp32 44 B/param (1.10x), AdamW fp32
52 (1.08x). classic and torch-native check nothing and are charged without it. A skipped step (found_inf)
only restores w: read backup, write w (2P) after the first step.

With float32 master weights (``+master`` methods, bf16/fp16 parameters; M = 4 bytes of a master element):

  first_step   read g for the norm; read master, g; write w (master + e)  3P + M
  second_step  read master, g, state; write master, w, state              2P + 2M + 2nS

  bf16 + master: SGD-momentum 30 B/param, AdamW 38 (against 24 and 32 without, 40 and 48 in float32), plus
  P for the skip decision.

The restore is exact (w comes back from the backup, not w - e), so second_step reads the backup and never
the perturbed w; the perturbed w is simply overwritten. AdamW's decoupled weight decay scales the restored
w, so it costs no extra traffic. Scalars (norm, step counts) are ignored. FusedSAM keeps optimizer state in
float32 for bf16 parameters; torch.optim keeps it in the parameter dtype; each method is charged the
bytes of its own state dtype.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MASTER_BYTES = 4  # a float32 master weight
# A row whose IQR / median over rounds exceeds this is flagged noisy (--noise-threshold).
NOISE_THRESHOLD = 0.10


def min_bytes_per_param(optimizer: str, param_bytes: int, state_bytes: int, inf_check: bool = False,
                        master: bool = False) -> int:
    """The minimum-bytes model above, per parameter element (``inf_check``: the step reads every gradient once
    more to decide whether to skip its update)."""
    n_state = {"sgd": 1, "adamw": 2}[optimizer]
    if master:  # the float32 master replaces the backup and is read and written in its place
        first = 3 * param_bytes + MASTER_BYTES
        second = 2 * param_bytes + 2 * MASTER_BYTES + 2 * n_state * state_bytes
    else:
        first = 5 * param_bytes
        second = 3 * param_bytes + 2 * n_state * state_bytes
    return first + second + (param_bytes if inf_check else 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Writes a buffer larger than the last-level cache before each timed step, so every method starts
    cold (as triton.testing.do_bench does). 256 MiB on CUDA, 64 MiB on CPU."""

    def __init__(self, device: torch.device, nbytes: Optional[int] = None):
        if nbytes is None:
            nbytes = 256 * 2**20 if device.type == "cuda" else 64 * 2**20
        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device) if nbytes else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


def time_steps(step: Callable[[], None], device: torch.device, repeats: int,
               flush: Optional[CacheFlusher] = None) -> List[float]:
    """Seconds per call of ``step``, ``repeats`` times: CUDA events on CUDA, perf_counter on CPU."""
    times = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            if flush:
                flush()
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            if flush:
                flush()
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return times


def summarize(times: List[float]) -> Dict[str, float]:
    """median, quartiles, min and max, in milliseconds, and the spread IQR / median."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    median = statistics.median(ms)
    return {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "spread": (q3 - q1) / median,
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def round_order(names: Sequence[str], round_index: int) -> List[str]:
    """The order of ``names`` in one round: led by each method in turn, walking the list forwards in even rounds
    and backwards in odd ones, so every method takes every position and no method always follows the same
    one (a method that heats the CPU or fills the cache must not always slow down, or speed up, the next)."""
    n = len(names)
    direction = -1 if round_index % 2 else 1
    return [names[(round_index + direction * i) % n] for i in range(n)]


def row_flags(stats: Dict[str, float], threshold: float = NOISE_THRESHOLD, pct_of_copy: Optional[float] = None,
              copy_limit_pct: float = 100.0, x_plain: Optional[float] = None, stream: str = "copy") -> List[str]:
    """Why a row's numbers cannot be trusted, one string per reason (empty: none). ``stats`` is a summarize()
    dict; ``pct_of_copy``: the step's minimum-bytes bandwidth over the copy bandwidth (the median of the copy
    passes), impossible past ``copy_limit_pct``: what the fastest quarter of those passes reached (see
    CopyMeter.window), as a step must move at least those bytes and a step at the memory limit lands within
    the passes' own spread; ``x_plain``: a SAM step's time over the plain step's (below 1 is impossible: a SAM
    step does all of the plain step's work and more); ``stream``: what the bandwidth was measured with."""
    out = []
    if stats["spread"] > threshold:
        out.append(f"noisy: IQR/median {stats['spread']:.3f} > {threshold:g}")
    if pct_of_copy is not None and pct_of_copy > copy_limit_pct:
        out.append(f"impossible: faster than the memory allows, its bytes at {pct_of_copy:.0f}% of the {stream} "
                   f"bandwidth (the {stream}'s fastest passes: {copy_limit_pct:.0f}%)")
    if x_plain is not None and x_plain < 1:
        out.append(f"impossible: SAM step {x_plain:.2f}x a plain step, whose work it all does too")
    return out


# The streams CopyMeter may time: (what it does, bytes it must move per byte of the buffer).
STREAMS = {
    "copy": (lambda dst, src: dst.copy_(src), 2),
    # dst += src: its writes land on lines it has just read. A CPU's copy pays a hidden read of the
    # destination (read for ownership) that this does not: on the 2-core CI VM the copy reached 13.8 GB/s
    # and this 22.5 GB/s, so "% of copy" let a step that rewrites what it reads show 100-150%.
    "in-place add": (lambda dst, src: dst.add_(src), 3),
}


class CopyMeter:
    """Memory bandwidth from one large streaming operation (bytes it must read + write per second): the
    faster of a copy and an in-place add on this device, chosen once by a short probe. The runner times it
    before each case, after each of its rounds and after it, so a step's "% copy" compares the step with
    the memory speed of the same stretch of time on a machine whose load changes during the run."""

    ROUND_PASSES = 3  # timed passes after each round (after one untimed pass)

    def __init__(self, device: torch.device, nbytes: Optional[int] = None, repeats: int = 20):
        if nbytes is None:
            nbytes = 1024 * 2**20 if device.type == "cuda" else 128 * 2**20
        self.device, self.nbytes, self.repeats = device, nbytes, repeats
        self.src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        self.dst = torch.zeros_like(self.src)
        self.probe = {name: self._gbps(name, statistics.median(self._time(name, 5))) for name in STREAMS}
        self.stream = max(self.probe, key=self.probe.get)

    def _time(self, name: str, repeats: int, untimed: int = 3) -> List[float]:
        op = STREAMS[name][0]
        for _ in range(untimed):
            op(self.dst, self.src)
        sync(self.device)
        return time_steps(lambda: op(self.dst, self.src), self.device, repeats)

    def _gbps(self, name: str, seconds: float) -> float:
        return STREAMS[name][1] * self.nbytes / seconds / 1e9

    def sample(self) -> List[float]:
        """Seconds per pass of the chosen stream, ``repeats`` passes after 3 untimed ones."""
        return self._time(self.stream, self.repeats)

    def round_sample(self) -> List[float]:
        """The few passes timed after a round (``ROUND_PASSES``, after one untimed pass)."""
        return self._time(self.stream, self.ROUND_PASSES, untimed=1)

    def gbps(self, seconds: float) -> float:
        return self._gbps(self.stream, seconds)

    def window(self, before: List[float], after: List[float], rounds: Sequence[List[float]] = ()) -> Dict[str, object]:
        """The bandwidth of a case: the median of every pass timed before it, after each of its ``rounds``
        and after it; each part's own median is kept too (``gbps_rounds`` per round), to show how much
        the memory speed moved, and ``gbps_fast``, the bandwidth of the fastest quarter of all passes (their
        first quartile in time): past it, a step's share of the bandwidth is flagged impossible."""
        during = [t for passes in rounds for t in passes]
        between = f", {len(rounds[0])} after each of its {len(rounds)} rounds" if rounds else ""
        parts = f"{len(before)} passes before the case{between} and {len(after)} after it"
        passes = before + during + after
        fast = statistics.quantiles(passes, n=4, method="inclusive")[0] if len(passes) >= 2 else passes[0]
        return {"bytes": self.nbytes, "gbps": self.gbps(statistics.median(passes)), "gbps_fast": self.gbps(fast),
                "gbps_before": self.gbps(statistics.median(before)), "gbps_after": self.gbps(statistics.median(after)),
                "gbps_rounds": [self.gbps(statistics.median(passes)) for passes in rounds],
                "stream": self.stream, "probe_gbps": self.probe,
                "how": f"{self.stream}: median of {parts}"}


# --- counting dispatched aten ops, and tracking memory allocated by them --------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _load_mallinfo():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _MallInfo2
        fn()
        return fn
    except Exception:  # not glibc >= 2.33
        return None


_MALLINFO = _load_mallinfo()


def host_bytes_in_use() -> Optional[int]:
    """Bytes malloc has handed out and not taken back (glibc mallinfo2: uordblks + hblkhd), or None."""
    if _MALLINFO is None:
        return None
    info = _MALLINFO()
    return info.uordblks + info.hblkhd


class OpCounter(TorchDispatchMode):
    """Counts aten operations dispatched while active. With ``track_memory`` it also samples the host
    allocator (glibc mallinfo2) after every op and keeps the peak: the CPU counterpart of
    torch.cuda.max_memory_allocated, at op granularity (scratch space allocated and freed inside one op
    is not seen)."""

    def __init__(self, track_memory: bool = False):
        super().__init__()
        self.ops = 0
        self.names: Dict[str, int] = {}
        self.track = track_memory and _MALLINFO is not None
        self.start_bytes = host_bytes_in_use() if self.track else None
        self.peak_bytes = self.start_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        name = str(func.overloadpacket)
        self.names[name] = self.names.get(name, 0) + 1
        if self.track:
            self.peak_bytes = max(self.peak_bytes, host_bytes_in_use())
        return out

    @property
    def transient_peak_bytes(self) -> Optional[int]:
        """Peak host bytes in use above the level when counting started (None if not tracked)."""
        return None if self.start_bytes is None else self.peak_bytes - self.start_bytes


def count_ops(step: Callable[[], None], track_memory: bool = False) -> OpCounter:
    gc.collect()
    counter = OpCounter(track_memory=track_memory)
    with counter:
        step()
    return counter


def count_cuda_kernels(step: Callable[[], None], device: torch.device) -> Dict[str, Optional[int]]:
    """GPU work of one call of ``step``, from torch.profiler: {'kernels': kernel launches, 'copies': memcpy and
    memset activities}; None values if the profiler could not count them."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(device)
        events = prof.events()
        gpu = [e.name for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
        copies = sum(1 for n in gpu if n.startswith(("Memcpy", "Memset")))
        kernels = len(gpu) - copies
        if not gpu:  # no device events recorded: count the launch calls the host made
            kernels = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                                                          "cudaLaunchKernelExC"))
            copies = sum(1 for e in events if e.name in ("cudaMemcpyAsync", "cudaMemsetAsync"))
        return {"kernels": kernels or None, "copies": copies}
    except Exception:
        return {"kernels": None, "copies": None}


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
