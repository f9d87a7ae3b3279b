"""Why master_weights=True: SAM training with bf16 parameters, with and without float32 master weights,
against the same run in float32. Prints a table (one row per seed and run): final training loss, test
accuracy, and how far the weights moved from the float32 run's path (the displacement from each run's own
start, relative to the float32 run's displacement).

Usage: python bench/master_weights.py [--steps 300] [--seeds 3] [--lr 3e-4] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from fused_sam import FusedSAM


def task(seed: int, device):
    """A teacher network labels Gaussian inputs: 4 classes, 32 features; train and test sets."""
    gen = torch.Generator().manual_seed(1000 + seed)
    teacher = [torch.randn(32, 64, generator=gen), torch.randn(64, 4, generator=gen)]

    def sample(n):
        x = torch.randn(n, 32, generator=gen)
        return x.to(device), (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1).to(device)

    return sample(4096), sample(2048)


def student(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 4))


def train(net, dtype, master, data, steps, lr, device):
    model = copy.deepcopy(net).to(device=device, dtype=dtype)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=lr, weight_decay=1e-2, master_weights=master)
    (x, y), gen = data, torch.Generator().manual_seed(0)
    loss_fn = nn.functional.cross_entropy
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen).to(device)
        xb, yb = x[idx].to(dtype), y[idx]
        loss_fn(model(xb), yb).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(xb), yb).backward()
        opt.second_step(zero_grad=True)
    if master:
        saved = {i: s["sam_master_weight"] for i, s in opt.state_dict()["state"].items()}
        weights = [saved[i] for i in sorted(saved)]
    else:
        weights = [p.detach() for p in model.parameters()]
    return model, torch.cat([w.reshape(-1).double().cpu() for w in weights])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"SAM(AdamW, lr={args.lr}, rho=0.05), {args.steps} steps, batch 64, MLP 32-128-128-4, on {device}")
    print("| seed | run | train loss | test acc | weight path error vs fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for seed in range(args.seeds):
        train_set, test_set = task(seed, device)
        net = student(seed)
        runs = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16 + master": (torch.bfloat16, True)}
        starts = {name: torch.cat([p.detach().to(dtype).reshape(-1).double() for p in net.parameters()])
                  for name, (dtype, _) in runs.items()}
        moved = {}
        for name, (dtype, master) in runs.items():
            model, weights = train(net, dtype, master, train_set, args.steps, args.lr, device)
            moved[name] = weights - starts[name]
            with torch.no_grad():
                loss = nn.functional.cross_entropy(model(train_set[0].to(dtype)).float(), train_set[1]).item()
                acc = (model(test_set[0].to(dtype)).argmax(1) == test_set[1]).float().mean().item()
            error = (moved[name] - moved["fp32"]).norm() / moved["fp32"].norm()
            print(f"| {seed} | {name} | {loss:.4f} | {acc:.3f} | {error.item():.3f} |")


if __name__ == "__main__":
    main()
