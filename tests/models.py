"""Small models and a training loop shared by the optimizer tests: the twins must see identical data."""
from __future__ import annotations

import torch
from torch import nn


def mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def conv_net(dtype=torch.float32, seed=0) -> nn.Module:
    """Convolutions without bias before BatchNorm: such a bias has a zero gradient up to rounding noise,
    which Adam would amplify to unit-size steps and make any two implementations diverge."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    ).to(dtype)


def batches(model: nn.Module, steps: int, dtype=torch.float32, seed=1):
    """Deterministic (input, target) batches shaped for ``model``."""
    gen = torch.Generator().manual_seed(seed)
    conv = isinstance(model[0], nn.Conv2d)
    for _ in range(steps):
        shape = (8, 3, 6, 6) if conv else (8, 10)
        yield torch.randn(shape, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def sam_train(model, opt, steps: int, dtype=torch.float32, seed=1, closure_api=False) -> None:
    """SAM training with the classic two-call usage (or step(closure))."""
    for x, y in batches(model, steps, dtype, seed):
        loss_of(model, x, y).backward()
        if closure_api:
            opt.step(lambda: loss_of(model, x, y).backward())
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
