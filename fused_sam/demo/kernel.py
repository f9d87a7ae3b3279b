"""Experiment 1: noisy kernel regression, bias and variance of the test prediction over iterations.

Behdin & Mazumder (arXiv 2302.11836) show that for least squares SAM has a lower bias and a higher variance
than gradient descent, so it can reach a smaller prediction error, above all when stopped early. This module
measures that with FusedSAM on synthetic data.

The model. RBF kernel k(x, x') = exp(-(x - x')^2 / (2 l^2)) on n training inputs x_i ~ U[0, 1], fixed for all
noise draws; y = f*(x) + noise, f*(x) = sin(2 pi x) + 0.5 cos(6 pi x). The fit is f(x) = sum_i k(x, x_i) alpha_i,
i.e. f = K alpha on the training points, with the loss (1/2n) ||K alpha - y||^2 started from alpha = 0.

It is trained as what it is, a linear model on the kernel's feature map: with K = U diag(mu) U^T, the features
of the training points are Phi = U diag(sqrt(mu)) (so Phi Phi^T = K) and of a test point
phi(x) = diag(1/sqrt(mu)) U^T k(X, x); the weights w = Phi^T alpha give the same predictions, and the loss is
(1/2n) ||Phi w - y||^2. Gradient descent on w is kernel gradient descent, alpha <- alpha - eta (K alpha - y) / n,
the dynamics the paper analyses; SAM's perturbation and its norm are taken in this feature space (the RKHS).
(Plain gradient descent on alpha itself would be preconditioned by K: for this kernel it moves so slowly along
the small eigen-directions that 400 steps never reach the regime where noise is fitted.) Eigen-directions with
mu < 1e-12 mu_max are dropped: over 400 iterations that changes the predictions by less than 1e-10 (checked
against the recursion on alpha with the full K, see tests/test_demo.py).

GD is plain ``torch.optim.SGD`` (no momentum). USAM is ``FusedSAM(normalize=False)``: e = rho g, which for a
quadratic loss is GD preconditioned by (I + rho H), H = Phi^T Phi / n; its bias/variance split is exact and it is
the setting of the paper's least-squares results. Normalized SAM (``FusedSAM(normalize=True)``) is run as well.

Many noise draws run as one parameter of shape [draws, features]: the loss is the sum of the per-draw losses, so
each row gets its own gradient, and for GD and USAM (no norm) every row follows exactly its own trajectory.
Normalized SAM divides by the norm of the whole parameter, which would couple the draws, so it runs one FusedSAM
per draw. Draws come in antithetic pairs (noise and -noise): GD and USAM are linear in y, so the mean prediction
over the draws is exactly the noise-free one and bias^2 is exact; the variance is a Monte Carlo estimate. The
closed-form bias^2 and variance of GD and USAM are computed too and reported next to the measured ones.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional

import torch

from ..optimizer import FusedSAM

DTYPE = torch.float64


@dataclass
class KernelConfig:
    n: int = 100
    n_test: int = 256  # a grid on [0, 1]: the test risk is the mean over U[0, 1]
    noise_sd: float = 0.5
    length_scale: float = 0.1
    lr: float = 0.8
    rho: float = 10.0  # USAM (normalize=False)
    rho_normalized: float = 0.5  # normalized SAM, a radius in weight space
    iters: int = 200
    draws: int = 512  # noise draws, in antithetic pairs, so even
    draws_normalized: int = 64  # normalized SAM runs one FusedSAM per draw
    early_stop: int = 10  # the iteration reported as "stopped early"
    eig_cutoff: float = 1e-12
    backend: str = "auto"  # FusedSAM's backend

    @classmethod
    def quick(cls) -> "KernelConfig":
        return cls(draws=128, draws_normalized=16)


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x) + 0.5 * torch.cos(6 * math.pi * x)


def rbf(a: torch.Tensor, b: torch.Tensor, length_scale: float) -> torch.Tensor:
    return torch.exp(-((a[:, None] - b[None, :]) ** 2) / (2 * length_scale**2))


def make_problem(cfg: KernelConfig, seed: int) -> Dict[str, torch.Tensor]:
    """Training inputs, test grid, kernel features and the antithetic noise draws, all from ``seed``."""
    if cfg.draws % 2 or cfg.draws_normalized % 2:
        raise ValueError("draws and draws_normalized must be even (antithetic pairs)")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(cfg.n, generator=gen, dtype=DTYPE).sort().values
    x_test = torch.linspace(0, 1, cfg.n_test, dtype=DTYPE)
    K = rbf(x, x, cfg.length_scale)
    mu, U = torch.linalg.eigh(K)
    keep = mu > cfg.eig_cutoff * mu.max()
    mu, U = mu[keep], U[:, keep]
    phi = U * mu.sqrt()  # [n, k], phi @ phi.T == K
    phi_test = rbf(x_test, x, cfg.length_scale) @ U / mu.sqrt()  # [n_test, k]
    half = torch.randn(cfg.draws // 2, cfg.n, generator=gen, dtype=DTYPE)
    noise = torch.cat([half, -half]) * cfg.noise_sd
    y = target(x) + noise  # [draws, n]
    return dict(x=x, x_test=x_test, K=K, phi=phi, phi_test=phi_test, f_test=target(x_test), f_train=target(x), y=y)


def _stats(pred: torch.Tensor, f_test: torch.Tensor):
    """bias^2 and variance of the predictions [draws, n_test], averaged over the test grid."""
    mean = pred.mean(0)
    bias2 = ((mean - f_test) ** 2).mean()
    var = ((pred - mean) ** 2).mean()  # the mean is exact for linear methods on antithetic draws
    return float(bias2), float(var)


def _loss(w: torch.Tensor, phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the rows (draws) of (1/2n) ||phi w_d - y_d||^2."""
    return 0.5 / phi.shape[0] * ((w @ phi.T - y) ** 2).sum()


def _train(
    make_opt: Callable, sam: bool, prob: Dict[str, torch.Tensor], iters: int, tick: Callable, subset: int
) -> Dict[str, Dict[str, list]]:
    """GD or USAM on all draws at once; bias^2/variance over all draws ("all") and over the first ``subset``
    antithetic draws ("subset", the draws normalized SAM runs on)."""
    phi, phi_test, f_test, y = prob["phi"], prob["phi_test"], prob["f_test"], prob["y"]
    rows = _subset_rows(y.shape[0], subset)
    w = torch.zeros(y.shape[0], phi.shape[1], dtype=DTYPE, requires_grad=True)
    opt = make_opt([w])

    def closure():
        opt.zero_grad()
        loss = _loss(w, phi, y)
        loss.backward()
        return loss

    out: dict = {"all": dict(bias2=[], variance=[], train_loss=[]), "subset": dict(bias2=[], variance=[])}
    for t in range(iters + 1):
        with torch.no_grad():
            pred = w @ phi_test.T
            for key, p in (("all", pred), ("subset", pred[rows])):
                b, v = _stats(p, f_test)
                out[key]["bias2"].append(b)
                out[key]["variance"].append(v)
            out["all"]["train_loss"].append(float(_loss(w, phi, y)) / y.shape[0])
        if t == iters:
            break
        closure()
        if sam:
            opt.step(closure)
        else:
            opt.step()
        tick()
    out["backends"] = getattr(opt, "backends", None)  # FusedSAM's, per (device, dtype)
    return out


def _subset_rows(draws: int, subset: int) -> torch.Tensor:
    """The first subset/2 antithetic pairs: rows i and draws/2 + i."""
    half = subset // 2
    return torch.tensor(list(range(half)) + list(range(draws // 2, draws // 2 + half)))


def exact_curves(cfg: KernelConfig, prob: Dict[str, torch.Tensor], rho: float, iters: int) -> Dict[str, list]:
    """Closed-form bias^2 and variance of GD (rho=0) / USAM on alpha: alpha <- alpha - eta (I + rho K/n)(K alpha - y)/n."""
    K, n = prob["K"], cfg.n
    K_test = rbf(prob["x_test"], prob["x"], cfg.length_scale)
    step = cfg.lr * (torch.eye(n, dtype=DTYPE) + rho * K / n)
    A = torch.zeros(n, n, dtype=DTYPE)  # alpha_t = A_t y
    eye = torch.eye(n, dtype=DTYPE)
    bias2, var = [], []
    for t in range(iters + 1):
        S = K_test @ A
        bias2.append(float(((S @ prob["f_train"] - prob["f_test"]) ** 2).mean()))
        var.append(float(cfg.noise_sd**2 * (S**2).sum() / S.shape[0]))
        A = A - step @ (K @ A - eye) / n
    return dict(bias2=bias2, variance=var)


def _with_risk(curves: Dict[str, list]) -> Dict[str, list]:
    curves["risk"] = [b + v for b, v in zip(curves["bias2"], curves["variance"])]
    return curves


def run_kernel(cfg: Optional[KernelConfig] = None, seed: int = 0, progress: bool = True) -> dict:
    """Run GD (2x the iterations, for the equal-gradient comparison), USAM and normalized SAM; return the curves."""
    from tqdm.auto import tqdm

    cfg = cfg or KernelConfig()
    torch.manual_seed(seed)
    prob = make_problem(cfg, seed)
    total = 2 * cfg.iters + cfg.iters + cfg.draws_normalized * cfg.iters
    bar = tqdm(total=total, desc="kernel regression", unit="it", disable=not progress, leave=False)
    tick = lambda: bar.update(1)  # noqa: E731

    gd = _train(lambda p: torch.optim.SGD(p, lr=cfg.lr), False, prob, 2 * cfg.iters, tick, cfg.draws_normalized)
    usam_opt = lambda p: FusedSAM(  # noqa: E731
        p, torch.optim.SGD, rho=cfg.rho, normalize=False, lr=cfg.lr, backend=cfg.backend
    )
    usam = _train(usam_opt, True, prob, cfg.iters, tick, cfg.draws_normalized)
    # Normalized SAM, one optimizer per draw (a shared norm would couple the draws), on the subset's draws.
    rows = _subset_rows(cfg.draws, cfg.draws_normalized).tolist()
    preds = torch.stack([_train_normalized(cfg, prob, prob["y"][d : d + 1], tick) for d in rows], 1)
    sam_b, sam_v = zip(*(_stats(p, prob["f_test"]) for p in preds))  # preds: [iters+1, draws, n_test]
    sam = dict(bias2=list(sam_b), variance=list(sam_v))
    bar.close()

    exact_gd = _with_risk(exact_curves(cfg, prob, 0.0, 2 * cfg.iters))
    exact_usam = _with_risk(exact_curves(cfg, prob, cfg.rho, cfg.iters))
    curves = {
        "gd": _with_risk(gd["all"]), "usam": _with_risk(usam["all"]),
        # normalized SAM and, on the same (fewer) draws, GD and USAM
        "sam": _with_risk(sam), "gd_subset": _with_risk(gd["subset"]), "usam_subset": _with_risk(usam["subset"]),
    }
    return dict(
        config=asdict(cfg), seed=seed, features=int(prob["phi"].shape[1]),
        fused_sam_backends=usam["backends"],
        optimizers={
            "gd": f"torch.optim.SGD(lr={cfg.lr}), run for {2 * cfg.iters} iterations",
            "usam": f"FusedSAM(base SGD, lr={cfg.lr}, rho={cfg.rho}, normalize=False)",
            "sam": f"FusedSAM(base SGD, lr={cfg.lr}, rho={cfg.rho_normalized}, normalize=True), one per draw",
        },
        curves=curves, exact={"gd": exact_gd, "usam": exact_usam}, summary=summarize(cfg, curves),
    )


def _train_normalized(cfg: KernelConfig, prob: Dict[str, torch.Tensor], y: torch.Tensor, tick: Callable) -> torch.Tensor:
    """Normalized SAM on one draw; returns its test predictions at every iteration, [iters+1, n_test]."""
    phi, phi_test = prob["phi"], prob["phi_test"]
    w = torch.zeros(1, phi.shape[1], dtype=DTYPE, requires_grad=True)
    opt = FusedSAM([w], torch.optim.SGD, rho=cfg.rho_normalized, normalize=True, lr=cfg.lr, backend=cfg.backend)

    def closure():
        opt.zero_grad()
        loss = _loss(w, phi, y)
        loss.backward()
        return loss

    preds = []
    for t in range(cfg.iters + 1):
        with torch.no_grad():
            preds.append((w @ phi_test.T)[0].clone())
        if t == cfg.iters:
            break
        closure()
        opt.step(closure)
        tick()
    return torch.stack(preds)


def _best(curve: list, upto: int) -> dict:
    i = min(range(upto + 1), key=curve.__getitem__)
    return {"iteration": i, "risk": curve[i]}


def _ordered(low: list, high: list) -> bool:
    """low[t] <= high[t] at every common iteration (up to rounding)."""
    return all(a <= b + 1e-12 * max(1.0, abs(b)) for a, b in zip(low, high))


def _runs(flags: list) -> list:
    """[[first, last], ...]: the ranges of indices where flags is true."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append([start, i - 1])
            start = None
    return out


def _first_violation(low: list, high: list) -> Optional[int]:
    """The first iteration where low[t] <= high[t] fails, or None."""
    return next((t for t, (a, b) in enumerate(zip(low, high)) if a > b + 1e-12 * max(1.0, abs(b))), None)


def summarize(cfg: KernelConfig, curves: Dict[str, Dict[str, list]]) -> dict:
    T, t0 = cfg.iters, cfg.early_stop
    c = curves
    methods = ("gd", "usam", "sam", "gd_subset", "usam_subset")
    return {
        "early_stop_iteration": t0,
        "risk_at_early_stop": {m: c[m]["risk"][t0] for m in methods},
        "risk_final": {m: c[m]["risk"][T] for m in methods},
        "bias2_final": {m: c[m]["bias2"][T] for m in methods},
        "variance_final": {m: c[m]["variance"][T] for m in methods},
        "best_risk": {m: _best(c[m]["risk"], T) for m in methods},
        # equal gradient budget: SAM takes two gradients per step, so GD gets 2x the iterations
        "equal_budget": {
            "gd_risk_at_2x_early_stop": c["gd"]["risk"][2 * t0],
            "gd_risk_at_2x_final": c["gd"]["risk"][2 * T],
            "gd_best_within_2x": _best(c["gd"]["risk"], 2 * T),
        },
        "usam_bias_le_gd_every_iter": _ordered(c["usam"]["bias2"], c["gd"]["bias2"][: T + 1]),
        "usam_variance_ge_gd_every_iter": _ordered(c["gd"]["variance"][: T + 1], c["usam"]["variance"]),
        # normalized SAM against GD on the same draws
        "sam_bias_le_gd_every_iter": _ordered(c["sam"]["bias2"], c["gd_subset"]["bias2"][: T + 1]),
        "sam_variance_ge_gd_every_iter": _ordered(c["gd_subset"]["variance"][: T + 1], c["sam"]["variance"]),
        "sam_bias_first_above_gd": _first_violation(c["sam"]["bias2"], c["gd_subset"]["bias2"][: T + 1]),
        "sam_variance_first_below_gd": _first_violation(c["gd_subset"]["variance"][: T + 1], c["sam"]["variance"]),
        # where SAM's risk is below GD's (the same iteration), as ranges of iterations
        "usam_risk_below_gd_iterations": _runs([u < g for u, g in zip(c["usam"]["risk"], c["gd"]["risk"])]),
        "sam_risk_below_gd_iterations": _runs([u < g for u, g in zip(c["sam"]["risk"], c["gd_subset"]["risk"])]),
        "usam_risk_below_gd_at_2x_iterations": _runs(
            [u < c["gd"]["risk"][2 * t] for t, u in enumerate(c["usam"]["risk"])]
        ),
    }
