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
        import fused_sam.optimizer

        fused_sam.optimizer.sum_over_ranks = lambda value, group: _NoWait()
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
    for base_name in BASES:
        for rank, weights in enumerate(results[1:], start=1):
            assert all(map(torch.equal, weights[base_name], results[0][base_name])), f"{base_name}: rank {rank}"
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
        assert distance > 1e3 * TOLERANCES[torch.float64], f"{base_name}: a local norm came within {distance:.3g}"


def test_hsdp_sums_over_the_shard_dimension_only(tmp_path):
    """2 x 2 mesh on 4 ranks: FSDP2 shards over the second dimension and all-reduces gradients over the
    first. Summing the norm over all 4 ranks would count every shard twice and miss the reference."""
    assert_sam_on_the_whole_model(run_on_ranks(_fsdp_runs, (4, torch.float64, (2, 2), False), tmp_path, 4),
                                  torch.float64)
