"""FusedSAM under DistributedDataParallel, on CPU: 2 gloo ranks spawned per test, each taking its half of
every batch. Every rank must end bitwise equal to the other and, to 1e-10 in float64, equal to a
single-process computation of the same SAM math on the full batch."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fused_sam import FusedSAM, running_stats_frozen
from fused_sam.classic import ClassicSAM

from distributed_harness import max_distance, needs_gloo, rank_part, run_on_ranks
from models import batches, conv_net, loss_of, mlp

pytestmark = needs_gloo

WORLD_SIZE = 2
STEPS = 12
RHO = 0.05
PERTURB_EPS = 1e-12
TOLERANCE = 1e-10
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
BUCKET_VIEWS = dict(gradient_as_bucket_view=True)


# --- what each rank runs ---------------------------------------------------------------------------

def _sam_step(ddp: DDP, opt: FusedSAM, x, y, m_sharpness: bool) -> float:
    """One paired SAM step; returns the seconds spent in first_step and second_step, the optimizer's own
    share (free of the collectives' jitter). m-sharpness: the first pass inside no_sync, so that each rank
    perturbs with its own local gradient; the second backward is averaged over the ranks either way."""
    with ddp.no_sync() if m_sharpness else nullcontext():
        loss_of(ddp, x, y).backward()
    start = time.perf_counter()
    opt.first_step(zero_grad=True)
    in_optimizer = time.perf_counter() - start
    loss_of(ddp, x, y).backward()
    start = time.perf_counter()
    opt.second_step(zero_grad=True)
    return in_optimizer + time.perf_counter() - start


def rank_half(x, y, rank: int) -> tuple:
    return rank_part(x, y, rank, WORLD_SIZE)


def _fused_sam_over_ddp(base_name: str, ddp_kwargs: dict) -> tuple:
    ddp = DDP(mlp(torch.float64), **ddp_kwargs)
    base, base_kwargs = BASES[base_name]
    return ddp, FusedSAM(ddp.parameters(), base, rho=RHO, perturb_eps=PERTURB_EPS, **base_kwargs)


def _train_every_base(rank: int, ddp_kwargs: dict, m_sharpness: bool) -> dict:
    """Final weights per base optimizer after STEPS SAM steps on this rank's half of every batch."""
    weights = {}
    for base_name in BASES:
        ddp, opt = _fused_sam_over_ddp(base_name, ddp_kwargs)
        for x, y in batches(ddp.module, STEPS, torch.float64):
            _sam_step(ddp, opt, *rank_half(x, y, rank), m_sharpness)
        weights[base_name] = [p.detach().clone() for p in ddp.parameters()]
    return weights


def _rebound_by_backward(ddp: DDP, opt: FusedSAM, x, y) -> list:
    """Per parameter: does a backward leave .grad bound to another tensor than FusedSAM's view?"""
    opt.zero_grad()
    fused_views = {id(p): view for segment in opt._sam.segments for p, view in zip(segment.params, segment.grad_handles)}
    loss_of(ddp, x, y).backward()
    return [p.grad is not fused_views[id(p)] for p in ddp.parameters()]


def _time_and_check_bucket_views(rank: int, rounds: int = 10, steps: int = 20) -> dict:
    """Median milliseconds per SAM step, whole and in the optimizer, with DDP's default and with bucket
    views (in interleaved rounds, so that both see the same machine), and whether a backward rebinds
    .grad on each path."""
    runs = {name: _fused_sam_over_ddp("sgd-momentum", kwargs)
            for name, kwargs in (("default", {}), ("bucket views", BUCKET_VIEWS))}
    x, y = rank_half(*next(batches(runs["default"][0].module, 1, torch.float64)), rank)
    samples = {(name, part): [] for name in runs for part in ("step", "optimizer")}
    for _ in range(rounds):
        for name, (ddp, opt) in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                samples[name, "optimizer"].append(_sam_step(ddp, opt, x, y, m_sharpness=False))
                samples[name, "step"].append(time.perf_counter() - start)
    rebound = {name: _rebound_by_backward(ddp, opt, x, y) for name, (ddp, opt) in runs.items()}
    return {"milliseconds": {key: 1e3 * statistics.median(times) for key, times in samples.items()},
            "grads_rebound": rebound, "weights": _train_every_base(rank, BUCKET_VIEWS, m_sharpness=False)}


def _batchnorm_with_frozen_second_pass(rank: int) -> dict:
    """A BatchNorm network under DDP's default broadcast_buffers=True, the second pass inside
    running_stats_frozen: the final weights, and whether a frozen pass changed this rank's buffers."""
    ddp = DDP(conv_net(torch.float64))
    opt = FusedSAM(ddp.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
    frozen_pass_wrote = False
    for x, y in batches(ddp.module, 4, torch.float64):
        x, y = rank_half(x, y, rank)
        loss_of(ddp, x, y).backward()
        opt.first_step(zero_grad=True)
        before = [b.clone() for b in ddp.buffers()]
        with running_stats_frozen(ddp):
            loss_of(ddp, x, y).backward()
        frozen_pass_wrote |= any(not torch.equal(a, b) for a, b in zip(before, ddp.buffers()))
        opt.second_step(zero_grad=True)
    return {"weights": [p.detach().clone() for p in ddp.parameters()], "frozen_pass_wrote": frozen_pass_wrote}


def _step_zero_over_fused_sam(rank: int) -> str:
    """What the first step of ZeroRedundancyOptimizer(optimizer_class=FusedSAM) says on this rank, and
    whether any weight moved."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = mlp(torch.float64)
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=FusedSAM, base_optimizer=torch.optim.SGD,
                                   rho=RHO, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(batches(model, 1, torch.float64)))

    def closure():
        zero.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    try:
        zero.step(closure)
    except TypeError as exc:
        moved = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        return f"{exc} (weights moved: {moved})"
    return "stepped"


# --- single-process references in float64 ----------------------------------------------------------

def synced_sam_reference(base_name: str) -> list:
    """SAM on the full batch: the mean loss over it is the mean of the ranks' equal-sized half means."""
    model = mlp(torch.float64)
    base, base_kwargs = BASES[base_name]
    opt = ClassicSAM(model.parameters(), base, rho=RHO, perturb_eps=PERTURB_EPS, **base_kwargs)
    for x, y in batches(model, STEPS, torch.float64):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return list(model.parameters())


def m_sharpness_reference(base_name: str) -> list:
    """Per rank r, w + e_r from the gradient of half r alone; the second gradient is the mean over r of the
    gradient of half r at w + e_r; then the base optimizer's step from w."""
    model = mlp(torch.float64)
    params = list(model.parameters())
    base, base_kwargs = BASES[base_name]
    opt = base(params, **base_kwargs)
    for x, y in batches(model, STEPS, torch.float64):
        w = [p.detach().clone() for p in params]
        second_grad = [torch.zeros_like(p) for p in params]
        for x_half, y_half in (rank_half(x, y, rank) for rank in range(WORLD_SIZE)):
            local_grad = torch.autograd.grad(loss_of(model, x_half, y_half), params)
            scale = RHO / (torch.stack([g.norm() for g in local_grad]).norm() + PERTURB_EPS)
            with torch.no_grad():
                torch._foreach_add_(params, local_grad, alpha=scale.item())
            grad_at_perturbed = torch.autograd.grad(loss_of(model, x_half, y_half), params)
            torch._foreach_add_(second_grad, grad_at_perturbed, alpha=1 / WORLD_SIZE)
            with torch.no_grad():
                torch._foreach_copy_(params, w)  # the next half's gradient is taken at w again
        for p, g in zip(params, second_grad):
            p.grad = g
        opt.step()
    return params


def assert_ranks_match(weights_by_rank: list, reference_of) -> None:
    """Every rank bitwise equal to rank 0, and rank 0 within TOLERANCE of the reference, per base."""
    for base_name in BASES:
        ranks = [weights[base_name] for weights in weights_by_rank]
        for rank, weights in enumerate(ranks[1:], start=1):
            assert all(map(torch.equal, weights, ranks[0])), f"{base_name}: rank {rank} differs from rank 0"
        distance = max_distance(ranks[0], reference_of(base_name))
        assert distance <= TOLERANCE, f"{base_name}: {distance:.3g} from the single-process reference"


# --- the tests --------------------------------------------------------------------------------------

def test_synced_sam_matches_full_batch_sam(tmp_path):
    """Default DDP: both backwards are averaged over the ranks, so this is SAM on the full batch."""
    assert_ranks_match(run_on_ranks(_train_every_base, ({}, False), tmp_path), synced_sam_reference)


def test_gradient_as_bucket_view_matches_full_batch_sam(tmp_path):
    """DDP rebinds .grad to its buckets after every backward; FusedSAM copies them into its own buffer."""
    results = run_on_ranks(_time_and_check_bucket_views, (), tmp_path)
    rebound = results[0]["grads_rebound"]
    assert all(rebound["bucket views"]), "DDP left .grad alone: FusedSAM's copy path was not exercised"
    assert not any(rebound["default"]), "DDP's default path rebound .grad"
    assert_ranks_match([r["weights"] for r in results], synced_sam_reference)
    ms = results[0]["milliseconds"]
    for part in ("step", "optimizer"):
        print(f"rank 0, ms per SAM step, {part}: default {ms['default', part]:.3f}, bucket views "
              f"{ms['bucket views', part]:.3f} (x{ms['bucket views', part] / ms['default', part]:.2f})")


def test_m_sharpness_perturbs_with_the_local_gradient(tmp_path):
    """First pass in no_sync: each rank perturbs with its own half's gradient, then the synced second
    gradient. The reference is far from synced SAM, so a synced first gradient would fail this test."""
    assert_ranks_match(run_on_ranks(_train_every_base, ({}, True), tmp_path), m_sharpness_reference)
    for base_name in BASES:
        gap = max_distance(m_sharpness_reference(base_name), synced_sam_reference(base_name))
        assert gap > 1e-6, f"{base_name}: m-sharpness only {gap:.3g} from synced SAM, the test cannot tell them apart"


def test_zero_redundancy_optimizer_is_refused(tmp_path):
    """ZeRO hands each rank's FusedSAM only its partition of the parameters: a partition norm, not SAM,
    and silent. Its first step must fail, before any weight moves, with an error that says why, on every
    rank."""
    for message in run_on_ranks(_step_zero_over_fused_sam, (), tmp_path):
        assert "ZeroRedundancyOptimizer" in message and "not SAM" in message and "fully_shard" in message, message
        assert message.endswith("(weights moved: False)"), message


def test_running_stats_frozen_under_ddp_broadcasting_buffers(tmp_path):
    """DDP (broadcast_buffers=True) gathers the buffers before every forward; when the BatchNorm
    statistics are all of them, freezing must not unregister them. Ranks stay identical, and on rank 0,
    whose buffers DDP broadcasts (the other ranks receive them before each forward), the frozen passes
    write no running statistic."""
    results = run_on_ranks(_batchnorm_with_frozen_second_pass, (), tmp_path)
    assert not results[0]["frozen_pass_wrote"]
    assert all(torch.equal(a, b) for a, b in zip(results[0]["weights"], results[1]["weights"]))
