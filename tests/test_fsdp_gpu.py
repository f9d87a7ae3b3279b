"""FSDP2 on one CUDA GPU (world size 1, NCCL): the CUDA path of the sharded step (the kernel backends over
local shards, the norm's all-reduce on the device) against FusedSAM on the unsharded model. Runs where
CUDA and NCCL are available (bench/gpu_check.sh); the CPU tests cover 2 and 4 ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from fused_sam import FusedSAM

from distributed_harness import max_distance, run_on_ranks
from test_distributed_fsdp import BASES, RHO, STEPS, Awkward, _train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not dist.is_available() or not dist.is_nccl_available(),
    reason="needs a CUDA GPU and NCCL",
)


def _on_one_gpu(rank: int, base_name: str, dtype, master: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base, base_kwargs = BASES[base_name]
    mesh = init_device_mesh("cuda", (1,))
    runs = {}
    for sharded in (True, False):
        model = Awkward(dtype).cuda()
        if sharded:
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = FusedSAM(model.parameters(), base, rho=RHO, master_weights=master, **base_kwargs)
        _train(model, opt, 0, 1, STEPS, dtype)
        runs[sharded] = {"weights": [(p.full_tensor() if sharded else p).detach().float().cpu() for p in model.parameters()],
                         "backends": sorted(set(opt.backends.values()))}
    return runs


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)], ids=["fp32", "bf16-master"])
def test_fully_shard_on_one_gpu_matches_the_unsharded_model(tmp_path, base_name, dtype, master):
    (runs,) = run_on_ranks(_on_one_gpu, (base_name, dtype, master), tmp_path, world_size=1, backend="nccl")
    assert runs[True]["backends"] == runs[False]["backends"] and "reference" not in runs[True]["backends"]
    # One rank: the sharded run's norm is the unsharded one, up to the float64 sum of the partials.
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert max_distance(runs[True]["weights"], runs[False]["weights"]) <= tolerance
