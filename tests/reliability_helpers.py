"""Shared by the reliability tests (issue 15): atomic checkpoint writes, bitwise comparison of nested state
(model and optimizer state dicts, GradScaler state, generator states), and subprocesses with deadlines."""
from __future__ import annotations

import io
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from fused_sam.selfcheck import as_bits

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def save_checkpoint_atomically(path, obj, before_rename: Optional[Callable[[Path], None]] = None) -> None:
    """torch.save ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new
    one, never a torn one: write a temporary file in the same directory, flush and fsync it, rename it over
    ``path`` (atomic on POSIX), fsync the directory so the rename itself is durable.

    ``before_rename``: a hook for the tests, called with the temporary file's path after it is written."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename(tmp)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assert_bitwise_equal(a, b, where: str = "") -> None:
    """Nested dicts / lists / tuples of tensors and plain values: same structure, same keys, tensors equal
    bit for bit (dtype, shape and every element, NaNs in the same places), numbers equal."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{where}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.is_floating_point():  # compare bits: NaN == NaN, -0.0 != 0.0
            a, b = as_bits(a.contiguous()), as_bits(b.contiguous())
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            raise AssertionError(f"{where}: tensors differ (max |difference| of the bit patterns {diff})")
        return
    if isinstance(a, dict):
        assert isinstance(b, dict), f"{where}: dict vs {type(b).__name__}"
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in only one"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}/{k}")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for k, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{where}[{k}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


def child_env() -> dict:
    """The environment of a worker: the checkout first on the path, one intra-op thread (so a worker and
    the in-process run of the same loop compute alike)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_to_completion(args: list, timeout: float) -> subprocess.CompletedProcess:
    """Run a worker to its end; fail with its output if it fails or outlives ``timeout``."""
    try:
        done = subprocess.run(args, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{args} did not finish within {timeout} s; output: {exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def wait_for_line(proc: subprocess.Popen, predicate: Callable[[str], bool], timeout: float) -> str:
    """Read ``proc``'s stdout until a line satisfies ``predicate``; kill it and fail at the deadline."""
    import queue
    import threading

    lines: "queue.Queue[str]" = queue.Queue()

    def pump():
        for text in proc.stdout:
            lines.put(text.strip())
        lines.put(None)  # the worker closed its stdout: it ended

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            proc.wait()
            raise AssertionError(f"no expected line within {timeout} s; saw {seen[-10:]}; "
                                 f"stderr: {proc.stderr.read() if proc.stderr else ''}")
        if line is None:
            proc.wait()
            raise AssertionError(f"the worker ended ({proc.returncode}) before the expected line; "
                                 f"saw {seen[-10:]}; stderr: {proc.stderr.read() if proc.stderr else ''}")
        seen.append(line)
        if predicate(line):
            return line


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread for the test: on this shared 2-core machine torch's default two threads make a
    tiny model's step 4-10x slower under load, and nothing here depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
