"""Long runs (issue 15, item 4).

- Drift: thousands of SAM steps of a small float64 model stay within 1e-9 of the classic per-tensor oracle
  (``fused_sam.classic.ClassicSAM`` with torch.optim's own step), with SGD-momentum and AdamW, on the
  backend ``auto`` picks here, on the reference, and on the torch backend (the fallback without the
  compiled extension: torch's fused SGD/Adam kernels on CPU). Default: 500 steps; ``-m slow``: 10,000.
- Memory: after a warm-up, running more steps of every kind of loop (SGD, AdamW+amsgrad, GradScaler, LookSAM,
  Randomly, WhenSharp, MomentumSAM, bf16 with master weights, capturable=True, mode="alternate") leaves the
  number of Python objects of every type (gc census), the number of live tensors and the host RSS where
  they were.

The loops run with one intra-op thread: on this shared 2-core machine torch's default two threads make a
tiny model's step 4-10x slower under load, and nothing here depends on the thread count.
"""
from __future__ import annotations

import collections
import gc
import os

import pytest
import torch

from fused_sam import FusedSAM
from fused_sam.classic import ClassicSAM
from fused_sam.variants import LookSAM, MomentumSAM, Randomly, WhenSharp

from models import loss_of, mlp
from reliability_helpers import one_thread, rss_bytes  # noqa: F401 (a fixture)

BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
DRIFT_BOUND = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(dtype, n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=gen).to(dtype), torch.randint(0, 3, (n,), generator=gen)


def batch(data, step, size=16):
    x, y = data
    i = (step * size) % len(x)
    return x[i:i + size], y[i:i + size]


def sam_step(model, opt, x, y):
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)


def max_distance(a, b) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def drift_run(steps, base, backend, rho=0.05, oracle_rho=0.05, check_every=250):
    """FusedSAM and the classic oracle side by side on the same float64 batches; the largest distance
    between their weights seen at the checks (every ``check_every`` steps and at the end)."""
    cls, kwargs = BASES[base]
    data = dataset(torch.float64)
    fused_model, oracle_model = mlp(torch.float64), mlp(torch.float64)
    fused = FusedSAM(fused_model.parameters(), cls, rho=rho, backend=backend, **kwargs)
    oracle = ClassicSAM(oracle_model.parameters(), cls, rho=oracle_rho, **kwargs)
    start = [p.detach().clone() for p in fused_model.parameters()]
    worst = 0.0
    for step in range(steps):
        x, y = batch(data, step)
        sam_step(fused_model, fused, x, y)
        sam_step(oracle_model, oracle, x, y)
        if (step + 1) % check_every == 0 or step + 1 == steps:
            worst = max(worst, max_distance(fused_model, oracle_model))
    moved = max((p - s).abs().max().item() for p, s in zip(fused_model.parameters(), start))
    return worst, moved


DRIFT_BACKENDS = ["auto", "reference", "torch"]


@pytest.mark.parametrize("backend, steps", [("auto", 500), ("reference", 200), ("torch", 500)])
@pytest.mark.parametrize("base", list(BASES))
def test_float64_drift_from_the_classic_oracle_stays_below_1e9(base, backend, steps):
    worst, moved = drift_run(steps, base, backend, check_every=100)
    assert moved > 0.1, "the run hardly trained: the drift bound would say nothing"
    assert worst < DRIFT_BOUND, f"FusedSAM drifted {worst:.3e} from the classic oracle"


def test_the_drift_check_sees_a_small_difference():
    """The bound is tight enough to matter: rho 0.05 against 0.0505 (1%) drifts past it within 100 steps."""
    worst, _ = drift_run(100, "sgd-momentum", "auto", rho=0.05, oracle_rho=0.0505, check_every=50)
    assert worst > 100 * DRIFT_BOUND


@pytest.mark.slow
@pytest.mark.parametrize("backend", DRIFT_BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
def test_10000_steps_float64_stay_within_1e9_of_the_classic_oracle(base, backend):
    worst, moved = drift_run(10_000, base, backend, check_every=1000)
    assert moved > 0.1
    assert worst < DRIFT_BOUND, f"FusedSAM drifted {worst:.3e} from the classic oracle over 10,000 steps"


# --- memory and objects -----------------------------------------------------------------------------------

SGD_M = BASES["sgd-momentum"]
ADAMW_AMS = (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2, amsgrad=True))
LOOPS = {  # name: (base, FusedSAM keywords (variant: a factory), dtype, loop)
    "sgd-momentum": (SGD_M, {}, torch.float32, "paired"),
    "adamw-amsgrad": (ADAMW_AMS, {}, torch.float32, "closure"),
    "gradscaler": (SGD_M, {}, torch.float32, "scaler"),
    "looksam": (SGD_M, dict(variant=lambda: LookSAM(3)), torch.float32, "closure"),
    "randomly": (ADAMW_AMS, dict(variant=lambda: Randomly(0.5)), torch.float32, "closure"),
    "whensharp": (SGD_M, dict(variant=WhenSharp), torch.float32, "closure"),
    "momentum-sam": (SGD_M, dict(variant=MomentumSAM), torch.float32, "closure"),
    "bf16-master": (ADAMW_AMS, dict(master_weights=True), torch.bfloat16, "paired"),
    "capturable": (ADAMW_AMS, dict(capturable=True), torch.float32, "paired"),
    "alternate": (SGD_M, dict(mode="alternate"), torch.float32, "alternate"),
}


class Loops:
    """Every loop of LOOPS over its own small model, stepped together."""

    def __init__(self, backend="auto", names=tuple(LOOPS)):
        self.runs = []
        for name in names:
            (cls, kwargs), sam, dtype, loop = LOOPS[name]
            sam = dict(sam)
            if "variant" in sam:  # a fresh variant per optimizer (they keep run state)
                sam["variant"] = sam["variant"]()
            model = mlp(dtype)
            opt = FusedSAM(model.parameters(), cls, rho=0.05, backend=backend, **sam, **kwargs)
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5) if loop == "scaler" else None
            self.runs.append((model, opt, scaler, loop, dtype))
        self.data = dataset(torch.float32)

    def step(self, step: int) -> None:
        x, y = batch(self.data, step)
        for model, opt, scaler, loop, dtype in self.runs:
            xd = x.to(dtype)

            def loss():
                return loss_of(model, xd, y).float()

            if loop == "paired":
                loss().backward()
                opt.first_step(zero_grad=True)
                loss().backward()
                opt.second_step(zero_grad=True)
            elif loop == "closure":
                def closure():
                    opt.zero_grad()
                    value = loss()
                    value.backward()
                    return value
                opt.step(closure)
            elif loop == "scaler":
                scaler.scale(loss()).backward()
                if step % 17 == 3:  # an overflow now and then: the skip path runs too
                    model[0].weight.grad[0, 0] = float("inf")
                opt.first_step(zero_grad=True, grad_scaler=scaler)
                scaler.scale(loss()).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
            else:
                loss().backward()
                opt.step()
                opt.zero_grad()

    def finite(self) -> bool:
        return all(torch.isfinite(p).all() for model, *_ in self.runs for p in model.parameters())


def census():
    """(objects per type, live tensors, RSS bytes), after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    counts = collections.Counter(type(o).__name__ for o in objects)
    tensors = sum(1 for o in objects if type(o) is torch.Tensor or type(o) is torch.nn.Parameter)
    del objects
    return counts, tensors, rss_bytes()


def growth(before, after) -> dict:
    return {k: after[k] - before[k] for k in set(before) | set(after) if after[k] != before[k]}


def assert_flat(loops, warmup, steps, rss_slack=512 * 1024):
    for step in range(warmup):
        loops.step(step)
    census()  # the census's own first-time allocations (caches it fills) happen here
    counts, tensors, rss = census()
    for step in range(warmup, warmup + steps):
        loops.step(step)
    counts_after, tensors_after, rss_after = census()
    grown = growth(counts, counts_after)
    assert loops.finite()
    assert tensors_after == tensors, f"{tensors_after - tensors} more live tensors after {steps} steps"
    assert sum(max(0, v) for v in grown.values()) <= 5, f"objects accumulate over {steps} steps: {grown}"
    assert rss_after - rss < rss_slack, f"RSS grew {(rss_after - rss) / 2**20:.2f} MiB over {steps} steps"


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")


@needs_proc
def test_memory_and_objects_are_flat_after_warmup():
    """Every loop kind, 40 steps of warm-up, then 120 more: no type of Python object grows (a per-step leak
    would show as >= 120), no tensor stays alive, RSS stays within 0.5 MiB."""
    assert_flat(Loops(), warmup=40, steps=120)


@needs_proc
def test_census_sees_a_leak_of_one_object_per_step():
    """The control: the same census, with one small tensor kept per step, fails."""
    loops = Loops(names=["sgd-momentum"])
    kept = []
    original = loops.step

    def leaky(step):
        original(step)
        kept.append(torch.zeros(4))

    loops.step = leaky
    with pytest.raises(AssertionError, match="more live tensors"):
        assert_flat(loops, warmup=5, steps=20)


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_memory_and_objects_stay_flat_over_2000_steps(backend):
    assert_flat(Loops(backend), warmup=200, steps=2000, rss_slack=1024 * 1024)
