"""FusedSAM over FSDP2 (``fully_shard``) and HSDP, on CPU: gloo ranks spawned per test, each taking its
part of every batch. Each rank updates only its shards, yet the result must be SAM on the unsharded
model: every rank perturbs with the norm of the whole gradient, summed over the shards by one all-reduce.
The reference is FusedSAM itself on the unsharded model and the full batch (float64 to 1e-10, float32
to 1e-5); a run whose ranks used only their own shards' norm is shown to miss it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fused_sam import FusedSAM
from fused_sam.variants import Every, LookSAM, MomentumSAM, WhenSharp

from distributed_harness import max_distance, needs_gloo, rank_part, run_on_ranks
from models import batches, loss_of

pytestmark = needs_gloo

STEPS = 10
RHO = 0.05
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5}


class Awkward(nn.Module):
    """Sizes FSDP2 shards unevenly over 2 and 4 ranks (7, 5 and 3 rows), and a one-element temperature
    whose shard is empty on every rank but the first."""

    def __init__(self, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(10, 7), nn.Linear(7, 5), nn.Linear(5, 3)])
        self.temperature = nn.Parameter(torch.ones(1))
        self.to(dtype)

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x) * self.temperature


def _sharded(dtype: torch.dtype, mesh_shape: tuple = ()) -> nn.Module:
    """Awkward with each layer and the root fully_shard-ed: on the default 1-D mesh (FSDP), or on a
    (replicate, shard) mesh (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard")) if mesh_shape else None
    model = Awkward(dtype)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(model, opt, rank: int, world_size: int, steps: int, dtype, start: int = 0) -> None:
    for x, y in list(batches(model.layers, start + steps, dtype))[start:]:
        x, y = rank_part(x, y, rank, world_size)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def _full_weights(model) -> list:
    return [p.full_tensor().clone() for p in model.parameters()]  # a collective: every rank calls it


def _fsdp_runs(rank: int, world_size: int, dtype, mesh_shape: tuple, local_norm: bool) -> dict:
    """Final full weights per base optimizer after STEPS SAM steps on this rank's part of every batch.
    local_norm: skip the sum over ranks, so that each rank perturbs with its own shards' norm."""
    if local_norm:
        import fused_sam.norms

        fused_sam.norms.sum_over_ranks = lambda value, group: _NoWait()
    weights = {}
    for base_name, (base, base_kwargs) in BASES.items():
        model = _sharded(dtype, mesh_shape)
        opt = FusedSAM(model.parameters(), base, rho=RHO, **base_kwargs)
        _train(model, opt, rank, world_size, STEPS, dtype)
        weights[base_name] = _full_weights(model)
    return weights


class _NoWait:
    def wait(self) -> None:
        pass


def unsharded_reference(base_name: str, dtype) -> list:
    """FusedSAM on the whole model and the full batch (the mean of the ranks' equal-part means)."""
    model = Awkward(dtype)
    base, base_kwargs = BASES[base_name]
    opt = FusedSAM(model.parameters(), base, rho=RHO, **base_kwargs)
    _train(model, opt, 0, 1, STEPS, dtype)
    return [p.detach() for p in model.parameters()]


def assert_sam_on_the_whole_model(results: list, dtype) -> None:
    """The full weights (every rank's shards, gathered) within the tolerance of SAM on the whole model."""
    for base_name in BASES:
        distance = max_distance(results[0][base_name], unsharded_reference(base_name, dtype))
        assert distance <= TOLERANCES[dtype], f"{base_name}: {distance:.3g} from SAM on the unsharded model"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_fsdp2_is_sam_on_the_unsharded_model(tmp_path, dtype):
    assert_sam_on_the_whole_model(run_on_ranks(_fsdp_runs, (2, dtype, (), False), tmp_path), dtype)


def test_fsdp2_with_rank_local_norms_would_fail(tmp_path):
    """The same run with each rank's norm over its own shards only (what SAM implementations that call
    torch.norm on their local parameters compute): far outside the tolerance the test above holds."""
    results = run_on_ranks(_fsdp_runs, (2, torch.float64, (), True), tmp_path)
    for base_name in BASES:
        distance = max_distance(results[0][base_name], unsharded_reference(base_name, torch.float64))
        print(f"{base_name}: rank-local norms end {distance:.3g} from SAM on the unsharded model")
        assert distance > 1e3 * TOLERANCES[torch.float64], f"{base_name}: a local norm came within {distance:.3g}"


def test_hsdp_sums_over_the_shard_dimension_only(tmp_path):
    """2 x 2 mesh on 4 ranks: FSDP2 shards over the second dimension and all-reduces gradients over the
    first. Summing the norm over all 4 ranks would count every shard twice and miss the reference."""
    assert_sam_on_the_whole_model(run_on_ranks(_fsdp_runs, (4, torch.float64, (2, 2), False), tmp_path, 4),
                                  torch.float64)


# --- checkpoints: torch.distributed.checkpoint with get/set_optimizer_state_dict ---------------------

SAVED_AT, RESUMED_FOR = 3, 4  # batches before the checkpoint, batches after it


def _alternate_halves(model, opt, rank: int, batch_range: range, dtype) -> None:
    """mode='alternate': one half of a SAM step per batch, as a trainer calling step() once per batch."""
    all_batches = list(batches(model.layers, batch_range.stop, dtype))
    for x, y in (all_batches[i] for i in batch_range):
        loss_of(model, *rank_part(x, y, rank, 2)).backward()
        opt.step()
        opt.zero_grad()


def _continue(model, opt, rank: int, mode: str, start: int, steps: int, dtype) -> None:
    if mode == "alternate":
        _alternate_halves(model, opt, rank, range(start, start + steps), dtype)
    else:
        _train(model, opt, rank, 2, steps, dtype, start=start)


def _checkpointed_run(rank: int, base_name: str, mode: str, master: bool, phase: str, checkpoint_dir: str) -> dict:
    """phase 'save': SAVED_AT batches, a DCP checkpoint, RESUMED_FOR more. phase 'resume': fresh model
    and optimizer, load the checkpoint, the same RESUMED_FOR batches. Returns the full final weights and
    optimizer state. In alternate mode SAVED_AT is odd: the checkpoint falls between two halves. master:
    bfloat16 parameters with float32 master weights, which only the optimizer's state holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    base, base_kwargs = BASES[base_name]
    dtype = torch.bfloat16 if master else torch.float32
    model = _sharded(dtype)
    opt = FusedSAM(model.parameters(), base, rho=RHO, mode=mode, master_weights=master, **base_kwargs)
    between_halves = False
    if phase == "save":
        _continue(model, opt, rank, mode, 0, SAVED_AT, dtype)
        between_halves = opt.perturbed
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=checkpoint_dir)
    else:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=checkpoint_dir)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        between_halves = opt.perturbed
    _continue(model, opt, rank, mode, SAVED_AT, RESUMED_FOR, dtype)
    state = {
        (fqn, key): value.full_tensor() if hasattr(value, "full_tensor") else value  # full_tensor: a collective
        for fqn, entry in sorted(get_optimizer_state_dict(model, opt)["state"].items())
        for key, value in sorted(entry.items())
    }
    return {"weights": _full_weights(model), "state": state, "between_halves": between_halves}


@pytest.mark.parametrize("base_name, mode, master", [
    ("sgd-momentum", "paired", False), ("adamw", "paired", False), ("adamw", "alternate", False),
    ("adamw", "alternate", True),
], ids=["sgd-momentum", "adamw", "adamw-alternate", "adamw-alternate-bf16-master"])
def test_dcp_checkpoint_resumes_bitwise(tmp_path, base_name, mode, master):
    """A sharded DCP checkpoint (model and optimizer, through get/set_optimizer_state_dict) saved on 2 ranks
    and loaded on 2 fresh ranks continues exactly as the run that saved it, also between the two halves of
    an alternate-mode SAM step (the optimizer's state carries w, the model w + e) and with float32 master
    weights of bfloat16 parameters (the model holds only their rounding)."""
    checkpoint = str(tmp_path / "checkpoint")
    uninterrupted = run_on_ranks(_checkpointed_run, (base_name, mode, master, "save", checkpoint), tmp_path / "save")
    resumed = run_on_ranks(_checkpointed_run, (base_name, mode, master, "resume", checkpoint), tmp_path / "resume")
    assert uninterrupted[0]["between_halves"] == resumed[0]["between_halves"] == (mode == "alternate")
    for rank in range(2):
        assert all(map(torch.equal, uninterrupted[rank]["weights"], resumed[rank]["weights"])), rank
        a, b = uninterrupted[rank]["state"], resumed[rank]["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rank
    assert any(key[1] in ("momentum_buffer", "exp_avg") for key in uninterrupted[0]["state"])
    assert master == any(key[1] == "sam_master_weight" for key in uninterrupted[0]["state"])


# --- placements ---------------------------------------------------------------------------------------

def _replicated_and_refused(rank: int) -> dict:
    """A replicated DTensor model trained on the full batch on both ranks (no sum over ranks may happen:
    each rank holds every element), and what FusedSAM says to placements it cannot serve."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    model = Awkward(torch.float64)
    weights = [nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])) for p in model.parameters()]
    opt = FusedSAM(weights, torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
    for x, y in batches(model.layers, STEPS, torch.float64):
        for _ in range(2):
            with torch.no_grad():
                for p, w in zip(model.parameters(), weights):
                    p.copy_(w.to_local())
            model.zero_grad()
            loss_of(model, x, y).backward()
            for p, w in zip(model.parameters(), weights):
                if w.grad is None:  # FusedSAM copies it into its flat buffer and links a DTensor over that
                    w.grad = DTensor.from_local(p.grad.clone(), mesh, [Replicate()], run_check=False)
                else:
                    w.grad.to_local().copy_(p.grad)
            opt.first_step() if not opt.perturbed else opt.second_step()
    messages = {}
    grid = init_device_mesh("cpu", (1, 2))
    for name, placements, on in (("partial", [Partial()], mesh), ("two shard dims", [Shard(0), Shard(1)], grid)):
        try:
            FusedSAM([nn.Parameter(DTensor.from_local(torch.zeros(4, 4), on, placements))], torch.optim.SGD, lr=0.1)
            messages[name] = "built"
        except ValueError as exc:
            messages[name] = str(exc)
    return {"weights": [w.to_local().clone() for w in weights], "messages": messages}


def test_replicated_dtensors_and_refused_placements(tmp_path):
    """Replicated DTensor parameters: every rank holds all of the gradient, so its own norm is the global
    one (a sum over the ranks would double it and miss the reference). Partial placements and sharding
    over two mesh dimensions are refused by name."""
    results = run_on_ranks(_replicated_and_refused, (), tmp_path)
    model = Awkward(torch.float64)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
    _train(model, opt, 0, 1, STEPS, torch.float64)
    reference = list(model.parameters())
    for result in results:
        assert max_distance(result["weights"], reference) <= TOLERANCES[torch.float64]
        assert "Partial" in result["messages"]["partial"], result["messages"]
        assert "sharded over mesh dimensions [0, 1]" in result["messages"]["two shard dims"], result["messages"]


# --- GradScaler ---------------------------------------------------------------------------------------

SKIPPED_AT = 2


def _an_overflow_on_one_rank(rank: int, scaled: bool) -> dict:
    """Paired SAM over FSDP2, with a GradScaler or with skip_nonfinite alone; at batch SKIPPED_AT only rank
    1's shard of one gradient is made infinite after the second backward. Per batch: the scale after the
    step (None without a scaler), and whether the weights were left exactly as before the SAM step (a
    skipped step restores w)."""
    model = _sharded(torch.float32)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
    steps = []
    for i, (x, y) in enumerate(batches(model.layers, 4, torch.float32)):
        x, y = rank_part(x, y, rank, 2)
        before = _full_weights(model)
        loss = loss_of(model, x, y)
        (scaler.scale(loss) if scaled else loss).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        loss = loss_of(model, x, y)
        (scaler.scale(loss) if scaled else loss).backward()
        if i == SKIPPED_AT and rank == 1:
            model.layers[0].bias.grad.to_local()[0] = float("inf")
        if scaled:
            scaler.step(opt)
            scaler.update()
        else:
            opt.second_step(zero_grad=True)
        steps.append((scaler.get_scale() if scaled else None, all(map(torch.equal, before, _full_weights(model)))))
    return {"steps": steps, "skipped_steps": opt.skipped_steps}


@pytest.mark.parametrize("scaled", [True, False], ids=["gradscaler", "skip_nonfinite"])
def test_every_rank_skips_when_one_shard_overflows(tmp_path, scaled):
    """GradScaler's inf check runs on the DTensor gradients, and skip_nonfinite sums the gradients' squared
    norm over the ranks, so a non-finite value in one rank's shard is seen by all: every rank skips that
    SAM step (w restored exactly, also the shards of rank 0, whose gradients were finite), lowers its scale
    alike or counts it; the other steps update."""
    results = run_on_ranks(_an_overflow_on_one_rank, (scaled,), tmp_path)
    for result in results:
        assert [kept for _, kept in result["steps"]] == [i == SKIPPED_AT for i in range(4)], result["steps"]
        if scaled:
            assert [scale for scale, _ in result["steps"]] == [1024.0, 1024.0, 512.0, 512.0]
            assert result["skipped_steps"] == 0  # GradScaler's own skip
        else:
            assert result["skipped_steps"] == 1


def _unsharded_checkpoint_into_fsdp2(rank: int) -> list:
    """A single-process run's model and optimizer state dicts (plain tensors, the whole model) loaded into
    an FSDP2 model and FusedSAM, which cut each rank's shard from them; then 4 more SAM steps."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    base, base_kwargs = BASES["adamw"]
    single = Awkward(torch.float64)
    single_opt = FusedSAM(single.parameters(), base, rho=RHO, **base_kwargs)
    _train(single, single_opt, 0, 1, SAVED_AT, torch.float64)
    model = _sharded(torch.float64)
    opt = FusedSAM(model.parameters(), base, rho=RHO, **base_kwargs)
    set_model_state_dict(model, single.state_dict(), options=StateDictOptions(full_state_dict=True))
    opt.load_state_dict(single_opt.state_dict())
    _train(model, opt, rank, 2, RESUMED_FOR, torch.float64, start=SAVED_AT)
    return _full_weights(model)


def test_an_unsharded_checkpoint_loads_into_fsdp2(tmp_path):
    """Optimizer state saved without sharding (full tensors) loads into FusedSAM over FSDP2 and continues
    as the single-process run does, to 1e-10 in float64."""
    results = run_on_ranks(_unsharded_checkpoint_into_fsdp2, (), tmp_path)
    model = Awkward(torch.float64)
    opt = FusedSAM(model.parameters(), BASES["adamw"][0], rho=RHO, **BASES["adamw"][1])
    _train(model, opt, 0, 1, SAVED_AT + RESUMED_FOR, torch.float64)
    assert max_distance(results[0], list(model.parameters())) <= TOLERANCES[torch.float64]


# --- variants: the decision, the reuse and the momentum perturbation use the norm summed over ranks --------

VARIANT_STEPS = 12
VARIANTS = {
    "every-3": lambda: Every(3),
    "looksam-3": lambda: LookSAM(3, alpha=0.7),
    "whensharp": lambda: WhenSharp(c_start=-0.5, c_end=0.5, total_steps=VARIANT_STEPS),
    "momentum": MomentumSAM,
}


def _variant_run(model, variant_name: str, rank: int, world_size: int) -> tuple:
    """(full weights at w, which steps were SAM steps) after VARIANT_STEPS steps of SGD-momentum."""
    base, base_kwargs = BASES["sgd-momentum"]
    opt = FusedSAM(model.parameters(), base, rho=RHO, variant=VARIANTS[variant_name](), **base_kwargs)
    decisions = []
    for x, y in batches(model.layers, VARIANT_STEPS, torch.float64):
        x, y = rank_part(x, y, rank, world_size)
        loss_of(model, x, y).backward()
        decisions.append(opt.sam_step_due)
        if decisions[-1]:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.plain_step(zero_grad=True)
    with opt.at_restore_point():  # MomentumSAM holds w - rho v / ||v|| between steps
        weights = _full_weights(model) if world_size > 1 else [p.detach().clone() for p in model.parameters()]
    return weights, decisions


def _variants_over_fsdp2(rank: int) -> dict:
    return {name: _variant_run(_sharded(torch.float64), name, rank, 2) for name in VARIANTS}


def test_variants_over_fsdp2_follow_the_unsharded_run(tmp_path):
    """Every variant over FSDP2 on 2 ranks ends where it ends on the unsharded model (float64, 1e-10), with
    the same SAM/plain decisions on every rank: LookSAM's dot products and reuse norm, AE-SAM's ||g||^2 and
    MSAM's ||v|| are all sums over the ranks."""
    results = run_on_ranks(_variants_over_fsdp2, (), tmp_path)
    for name in VARIANTS:
        expected, expected_decisions = _variant_run(Awkward(torch.float64), name, 0, 1)
        for rank, result in enumerate(results):
            weights, decisions = result[name]
            assert decisions == expected_decisions, f"{name}, rank {rank}: {decisions} vs {expected_decisions}"
            assert max_distance(weights, expected) <= TOLERANCES[torch.float64], f"{name}, rank {rank}"
        mixed = not all(expected_decisions) and any(expected_decisions)  # MSAM: one backward, every step
        assert mixed if name != "momentum" else not any(expected_decisions), f"{name}: {expected_decisions}"
