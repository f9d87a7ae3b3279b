"""Experiment 2: a one-hidden-layer ReLU network trained on noisy labels, SGD against SAM.

Behdin & Mazumder (arXiv 2302.11836) show that, under conditions, SAM reaches a smaller prediction error than
gradient descent for a one-hidden-layer network, and that SAM's solutions are flatter. This module measures both
with FusedSAM on a synthetic problem: 10 Gaussian clusters in 64 dimensions (centres ~ N(0, I), points = centre
+ sd * N(0, I)); a fraction of the training labels is replaced by a different, uniformly drawn class; the test
labels are clean. An MLP 64 -> hidden -> 10 with ReLU is trained by mini-batch SGD with momentum, and by
FusedSAM (normalized SAM, the same base SGD with momentum, the same epochs, batches and seed).

Flatness is the largest eigenvalue of the Hessian of the training loss (on the noisy training labels, the loss
that was minimised) at the final weights, by power iteration with Hessian-vector products (torch.autograd).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ..optimizer import FusedSAM


@dataclass
class MLPConfig:
    classes: int = 10
    dim: int = 64
    cluster_sd: float = 2.0
    n_train: int = 2000
    n_test: int = 2000
    label_noise: float = 0.4
    hidden: int = 512
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    rho: float = 0.3
    epochs: int = 30
    power_iters: int = 30
    seeds: int = 3  # the demo repeats the whole experiment for seed, seed+1, ...
    equal_budget: bool = True  # also train SGD for 2x the epochs (SAM uses two gradients per step)
    small_lr: Optional[float] = 0.01  # also train SGD and SAM at this step size (None: skip)
    backend: str = "auto"  # FusedSAM's backend

    @classmethod
    def quick(cls) -> "MLPConfig":
        return cls(epochs=15, power_iters=20, seeds=1, equal_budget=False, small_lr=None)


def make_data(cfg: MLPConfig, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    centres = torch.randn(cfg.classes, cfg.dim, generator=gen)

    def sample(m):
        labels = torch.randint(cfg.classes, (m,), generator=gen)
        return centres[labels] + cfg.cluster_sd * torch.randn(m, cfg.dim, generator=gen), labels

    x, y_clean = sample(cfg.n_train)
    x_test, y_test = sample(cfg.n_test)
    flip = torch.rand(cfg.n_train, generator=gen) < cfg.label_noise
    shift = torch.randint(1, cfg.classes, (cfg.n_train,), generator=gen)  # a different class, uniformly
    y = torch.where(flip, (y_clean + shift) % cfg.classes, y_clean)
    return dict(x=x, y=y, y_clean=y_clean, flipped=flip, x_test=x_test, y_test=y_test)


def make_model(cfg: MLPConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.classes))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def top_hessian_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int = 30, seed: int = 0) -> float:
    """Largest eigenvalue of the Hessian of the mean cross-entropy on (x, y), by power iteration with HVPs.

    Power iteration finds the eigenvalue of largest magnitude; at the end of training the Hessian's top
    eigenvalue is positive and dominant, which the returned Rayleigh quotient then estimates.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen) for p in params]
    norm = torch.sqrt(sum((u * u).sum() for u in v))
    v = [u / norm for u in v]
    eig = 0.0
    for _ in range(iters):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        eig = float(sum((h * u).sum() for h, u in zip(hv, v)))  # Rayleigh quotient, |v| = 1
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        v = [h / norm for h in hv]
    return eig


def train(
    cfg: MLPConfig, data: Dict[str, torch.Tensor], seed: int, sam: bool, epochs: int, bar=None,
    lr: Optional[float] = None,
) -> dict:
    """Train one network; returns per-epoch accuracies and the final sharpness."""
    model = make_model(cfg, seed)
    lr = cfg.lr if lr is None else lr
    if sam:
        opt = FusedSAM(
            model.parameters(), torch.optim.SGD, rho=cfg.rho, lr=lr, momentum=cfg.momentum, backend=cfg.backend
        )
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    x, y = data["x"], data["y"]
    gen = torch.Generator().manual_seed(20_000 + seed)  # the same batches for SGD and SAM
    loss_fn = nn.functional.cross_entropy
    hist: Dict[str, List[float]] = {"test_acc": [], "train_acc_noisy": [], "fit_clean": [], "memorised": [], "train_loss": []}
    flipped = data["flipped"]
    for _ in range(epochs):
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            xb, yb = x[idx], y[idx]

            def closure():
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            loss = closure()
            if sam:
                opt.step(closure)
            else:
                opt.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(1)
        hist["train_loss"].append(total / len(x))
        hist["test_acc"].append(accuracy(model, data["x_test"], data["y_test"]))
        hist["train_acc_noisy"].append(float((pred == y).float().mean()))
        hist["fit_clean"].append(float((pred[~flipped] == y[~flipped]).float().mean()))  # unflipped points fitted
        hist["memorised"].append(float((pred[flipped] == y[flipped]).float().mean()))  # flipped: the wrong label fitted
        if bar is not None:
            bar.update(1)
    best = max(range(epochs), key=hist["test_acc"].__getitem__)
    return dict(
        history=hist,
        backends=opt.backends if sam else None,
        final_test_acc=hist["test_acc"][-1],
        last5_test_acc=sum(hist["test_acc"][-5:]) / len(hist["test_acc"][-5:]),
        best_test_acc=hist["test_acc"][best],
        best_epoch=best + 1,
        final_memorised=hist["memorised"][-1],
        final_fit_clean=hist["fit_clean"][-1],
        top_hessian_eigenvalue=top_hessian_eigenvalue(model, x, y, cfg.power_iters, seed),
    )


def run_mlp(cfg: Optional[MLPConfig] = None, seed: int = 0, progress: bool = True) -> dict:
    """SGD and SAM (and SGD with 2x the epochs, if cfg.equal_budget) for seeds seed .. seed + cfg.seeds - 1."""
    from tqdm.auto import tqdm

    cfg = cfg or MLPConfig()
    runs = [("sgd", False, cfg.epochs, None), ("sam", True, cfg.epochs, None)]
    if cfg.equal_budget:
        runs.append(("sgd_2x", False, 2 * cfg.epochs, None))
    if cfg.small_lr is not None:
        runs += [("sgd_small_lr", False, cfg.epochs, cfg.small_lr), ("sam_small_lr", True, cfg.epochs, cfg.small_lr)]
    total = cfg.seeds * sum(r[2] for r in runs)
    bar = tqdm(total=total, desc="one-hidden-layer MLP", unit="epoch", disable=not progress, leave=False)
    per_seed = []
    for s in range(seed, seed + cfg.seeds):
        data = make_data(cfg, s)
        per_seed.append({"seed": s, **{name: train(cfg, data, s, sam, e, bar, lr) for name, sam, e, lr in runs}})
    bar.close()
    methods = [r[0] for r in runs]
    return dict(
        config=asdict(cfg), seed=seed, fused_sam_backends=per_seed[0]["sam"]["backends"],
        optimizers={
            "sgd": f"torch.optim.SGD(lr={cfg.lr}, momentum={cfg.momentum}), {cfg.epochs} epochs",
            "sam": f"FusedSAM(base SGD, lr={cfg.lr}, momentum={cfg.momentum}, rho={cfg.rho}), {cfg.epochs} epochs",
            "sgd_2x": f"torch.optim.SGD as sgd, {2 * cfg.epochs} epochs (SAM's gradient budget)",
            "sgd_small_lr": f"as sgd with lr={cfg.small_lr}",
            "sam_small_lr": f"as sam with lr={cfg.small_lr}",
        },
        runs=per_seed, summary=summarize(per_seed, methods),
    )


def summarize(per_seed: List[dict], methods: List[str]) -> dict:
    keys = (
        "final_test_acc", "last5_test_acc", "best_test_acc", "final_fit_clean", "final_memorised", "top_hessian_eigenvalue",
    )
    out = {}
    for m in methods:
        out[m] = {}
        for k in keys:
            vals = [r[m][k] for r in per_seed]
            out[m][k] = {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals), "values": vals}
    out["sam_final_acc_above_sgd_every_seed"] = all(r["sam"]["final_test_acc"] > r["sgd"]["final_test_acc"] for r in per_seed)
    out["sam_sharpness_below_sgd_every_seed"] = all(
        r["sam"]["top_hessian_eigenvalue"] < r["sgd"]["top_hessian_eigenvalue"] for r in per_seed
    )
    if "sam_small_lr" in methods:
        out["small_lr_sam_final_acc_above_sgd_every_seed"] = all(
            r["sam_small_lr"]["final_test_acc"] > r["sgd_small_lr"]["final_test_acc"] for r in per_seed
        )
    return out
