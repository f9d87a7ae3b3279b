"""Host time of one SAM step over many tiny tensors: what FusedSAM's Python and operator dispatch cost when
the kernels have almost nothing to do (1000 float32 tensors of 16 elements, native CPU backend, 1 thread),
beside one torch fused step over the same tensors. Prints one JSON line of medians (us).

Compare two trees by interleaving processes, so that the machine's load falls on both alike:

    for i in 1 2 3 4 5; do
        PYTHONPATH=/path/to/before python bench/host_step.py before
        PYTHONPATH=$PWD python bench/host_step.py after
    done
"""
import json
import sys

import torch

from cpu_native import median_time, sam_step  # bench/ is this script's directory
from fused_sam import FusedSAM

COUNT, SIZE, STEPS = 1000, 16, 300
BASES = {"sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9)), "adamw": (torch.optim.AdamW, dict(lr=1e-3))}


def with_grads() -> list:
    params = [torch.nn.Parameter(torch.randn(SIZE)) for _ in range(COUNT)]
    for p in params:
        p.grad = torch.randn(SIZE)
    return params


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {"label": sys.argv[1] if len(sys.argv) > 1 else ""}
    for name, (cls, kwargs) in BASES.items():
        opt = FusedSAM(with_grads(), cls, rho=0.05, backend="native", **kwargs)
        result[f"sam_{name}_us"] = median_time(sam_step(opt), STEPS) * 1e6
        result[f"torch_fused_{name}_us"] = median_time(cls(with_grads(), fused=True, **kwargs).step, 100) * 1e6
    print(json.dumps(result))


if __name__ == "__main__":
    main()
