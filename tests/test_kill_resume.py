"""Kill and resume (issue 15, item 2): a training run in a subprocess is killed with SIGKILL (no clean exit,
no atexit, no flush) at a seeded random step after its last checkpoint, and a fresh process resumes from
that checkpoint; the resumed run must end bitwise equal (weights, optimizer state, GradScaler state) to an
uninterrupted run.

The worker (``kill_resume_worker.py``) trains eight configs side by side, each checkpointing atomically
(temporary file, fsync, rename, fsync of the directory) at its own interval: SGD-momentum, AdamW (amsgrad,
step(closure)), LookSAM, Randomly, WhenSharp, GradScaler("cpu") with injected overflows, bf16 with float32
master weights, and mode="alternate" (checkpoints between the halves of a SAM step). The default test kills
the worker while one config's checkpoint is half written: that config must resume from its previous
checkpoint (atomicity), the others from their last. The slow test kills a free-running worker at random
moments, several times in a row.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import kill_resume_worker as worker
from reliability_helpers import TESTS, assert_bitwise_equal, child_env, run_to_completion, wait_for_line

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals (SIGKILL)")

WORKER = str(TESTS / "kill_resume_worker.py")
STEPS = 24
TIMEOUT_S = 180  # per worker process; a worker takes ~10 s here (most of it importing torch)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Every config trained straight through, in this process, with the worker's own loop (one thread, as
    the worker runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return worker.train(tmp_path_factory.mktemp("straight"), list(worker.CONFIGS), STEPS)
    finally:
        torch.set_num_threads(threads)


def start_worker(out, *extra):
    return subprocess.Popen([sys.executable, WORKER, str(out), "--steps", str(STEPS), *extra], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sigkill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the worker ended with {proc.returncode}, not by SIGKILL"


def load(path):
    return torch.load(path, weights_only=False)


def checkpoint_steps(name: str, last: int) -> list:
    """The steps (counted as steps done) at which ``name`` has checkpointed after running ``last`` steps."""
    every = worker.CONFIGS[name].every
    return [s for s in range(every, last + 1, every)]


@pytest.mark.slow
def test_worker_alone_matches_the_in_process_run(uninterrupted, tmp_path):
    """The comparisons here need the worker to compute as this process does: an uninterrupted worker run
    (its own process) ends bitwise where the in-process run does (a diagnostic for the tests below)."""
    run_to_completion([sys.executable, WORKER, str(tmp_path), "--steps", str(STEPS), "--configs", "sgd-momentum,adamw"],
                      TIMEOUT_S)
    for name in ("sgd-momentum", "adamw"):
        assert_bitwise_equal(uninterrupted[name], load(tmp_path / f"{name}.final.pt"), name)


def test_sigkill_during_a_checkpoint_write_resumes_bitwise(uninterrupted, tmp_path):
    """Kill at a seeded random step while one config's checkpoint is half written; resume all eight configs
    in a fresh process; each ends bitwise equal to the uninterrupted run, and the config whose write was
    torn resumed from its previous checkpoint."""
    rng = random.Random(15)
    victim = rng.choice(sorted(worker.CONFIGS))
    every = worker.CONFIGS[victim].every
    # a checkpoint of the victim that is not its first (there must be a previous one), before the end
    kill_at = rng.choice([s for s in range(2 * every - 1, STEPS - 1) if (s + 1) % every == 0])
    proc = start_worker(tmp_path, "--pause-in-write", f"{victim}@{kill_at}")
    line = wait_for_line(proc, lambda text: text.startswith("PAUSED"), TIMEOUT_S)
    sigkill(proc)

    torn = line.split(maxsplit=1)[1]
    with pytest.raises(Exception):  # the half-written temporary file is not a checkpoint...
        load(torn)
    # ...and the checkpoint it was replacing is intact: the previous one
    assert load(tmp_path / f"{victim}.pt")["step"] == kill_at + 1 - every
    for name in worker.CONFIGS:
        done = kill_at + 1 if list(worker.CONFIGS).index(name) < list(worker.CONFIGS).index(victim) else kill_at
        expected = ([0] + checkpoint_steps(name, done))[-1]
        if name == victim:
            expected = kill_at + 1 - every
        path = tmp_path / f"{name}.pt"
        assert (load(path)["step"] if path.exists() else 0) == expected, name
        assert not (tmp_path / f"{name}.final.pt").exists()

    run_to_completion([sys.executable, WORKER, str(tmp_path), "--steps", str(STEPS), "--resume"], TIMEOUT_S)
    for name in worker.CONFIGS:
        resumed = load(tmp_path / f"{name}.final.pt")
        assert_bitwise_equal(uninterrupted[name], resumed, name)


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw", "randomly", "gradscaler", "bf16-master", "alternate"])
def test_the_comparison_sees_a_resume_that_loses_state(uninterrupted, tmp_path, name):
    """The bitwise comparison can fail: resuming from a checkpoint whose optimizer state (for the GradScaler
    config: the scaler's state) is replaced by a fresh one's ends elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        worker.train(tmp_path, [name], STEPS // 2)
        ckpt = load(tmp_path / f"{name}.pt")
        if name == "gradscaler":
            ckpt["scaler"] = torch.amp.GradScaler("cpu", **worker.SCALER).state_dict()
        else:
            ckpt["opt"] = worker.Run(name, "auto").opt.state_dict()
        torch.save(ckpt, tmp_path / f"{name}.pt")
        lossy = worker.train(tmp_path, [name], STEPS, resume=True)[name]
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(AssertionError):
        assert_bitwise_equal(uninterrupted[name], lossy, name)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_repeated_sigkill_at_random_moments_resumes_bitwise(uninterrupted, tmp_path, seed):
    """A free-running worker killed at a random moment (anywhere: inside a step, inside a checkpoint write,
    between them) after its first checkpoint landed, resumed, killed again, ... three times; then run to the
    end. Each config ends bitwise equal to the uninterrupted run."""
    rng = random.Random(seed)
    kills = 0
    for _ in range(3):
        proc = start_worker(tmp_path, "--resume", "--announce")
        try:
            line = wait_for_line(proc, lambda text: text.startswith(("CKPT", "DONE")), TIMEOUT_S)
            if line == "DONE":  # resumed from the last checkpoints: nothing left to kill
                break
            time.sleep(rng.uniform(0.0, 1.0))
        finally:
            if proc.poll() is None:
                sigkill(proc)
                kills += 1
        for stale in tmp_path.glob("*.tmp*"):  # what a torn write leaves: a temporary file, never a checkpoint
            stale.unlink()
        for final in tmp_path.glob("*.final.pt"):  # the worker may have reached the end before the kill
            final.unlink()
    assert kills >= 1, "every worker finished before it could be killed: lengthen the run"
    run_to_completion([sys.executable, WORKER, str(tmp_path), "--steps", str(STEPS), "--resume"], TIMEOUT_S)
    for name in worker.CONFIGS:
        assert_bitwise_equal(uninterrupted[name], load(tmp_path / f"{name}.final.pt"), name)
