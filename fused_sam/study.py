"""fused-sam study: how much of SAM's benefit the cheaper variants keep, and what they cost.

Two tasks, each trained with SGD-momentum, SAM and every variant in ``fused_sam.variants``, the same epochs,
batches and initial weights per seed:

- ``digits``: scikit-learn's handwritten digits (1797 8x8 images that ship with the package, no download),
  a fixed 60/40 train/test split per seed; an MLP 64 -> 256 -> 10.
- ``noisy``: the demo's label-noise task (10 Gaussian clusters in 64 dimensions, 40% of the training labels
  replaced by another class, clean test labels); an MLP 64 -> 512 -> 10 (``fused_sam.demo.mlp``).

Each method is reported as a paired difference to SGD and to SAM over the same seeds (per seed: the
method's value minus the reference's), with a percentile bootstrap confidence interval over the seeds, for
final test accuracy and the largest Hessian eigenvalue of the training loss at the end (power iteration;
MomentumSAM's at its w, not the perturbed point it keeps between steps). 40 seeds by default; ``--first-seed``
reruns on fresh seeds, the check that a conclusion is not one draw's. Cost is counted exactly, as gradient
evaluations (backward passes) per epoch. Wall time is secondary: within a seed the methods train round-robin,
one epoch each in turn, so that the machine's load falls on all of them alike, and each method's time is
reported as a ratio to SGD's over the same seed. The table is written
as JSON (with every per-seed value) and Markdown, with a plot when matplotlib is installed. Nothing is tuned
per method: every method runs with the demo's settings (SGD lr 0.05, momentum 0.9, batch 32; rho 0.3 for SAM
and every variant; LookSAM's alpha 0.7, fused_sam's default; WhenSharp's threshold from -1 to +1 standard
deviations over the run and delta 0.9).

``--curvature`` also records, each SAM step, telemetry's curvature along the SAM perturbation e
(``FusedSAM(..., telemetry=True)``: kappa = e.(g2 - g1) / |e|^2, the secant curvature of the batch loss over
[w, w + e]), kept on the device and read once per epoch, and checks it at the end of the first, middle and
last epochs (``curvature_check``). MomentumSAM perturbs along its momentum, not the gradient, and records
nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .bench.report import cpu_model
from .demo.mlp import MLPConfig, accuracy, make_data, top_hessian_eigenvalue
from .optimizer import FusedSAM
from .variants import Every, LookSAM, MomentumSAM, Randomly, WhenSharp

# method -> its variant, from the seed and the run's number of steps (None: plain SAM; "sgd" has none)
METHODS = {
    "sgd": None,
    "sam": lambda seed, steps: None,
    "every-5": lambda seed, steps: Every(5),
    "randomly-0.2": lambda seed, steps: Randomly(0.2, seed=seed),
    "looksam-5": lambda seed, steps: LookSAM(5, alpha=0.7),
    "whensharp": lambda seed, steps: WhenSharp(c_start=-1.0, c_end=1.0, total_steps=steps),
    "momentum-sam": lambda seed, steps: MomentumSAM(),
}
REFERENCES = ("sgd", "sam")  # every method is reported as a paired difference to each
COMPARED = ("test_acc", "top_hessian_eigenvalue")  # the per-seed outcomes the differences are taken of


@dataclass
class StudyConfig:
    epochs: int = 30
    seeds: int = 40
    first_seed: int = 0  # seeds first_seed, first_seed + 1, ...: a rerun on fresh seeds replicates the study
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    rho: float = 0.3  # the demo's (fused_sam.demo.mlp.MLPConfig), for both tasks and every method
    power_iters: int = 20
    threads: int = 1  # torch threads while training: every method gets the same one core
    bootstrap_resamples: int = 10_000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    tasks: tuple = ("digits", "noisy")
    backend: str = "auto"  # FusedSAM's backend for every SAM method
    curvature: bool = False  # record telemetry's curvature along e each SAM step and check it (--curvature)
    check_power_iters: int = 100  # power iterations on the batch Hessian in each curvature check

    @classmethod
    def quick(cls) -> "StudyConfig":
        return cls(epochs=2, seeds=2, power_iters=3, bootstrap_resamples=1000, check_power_iters=50)


def digits_task(seed: int) -> Dict[str, torch.Tensor]:
    """scikit-learn's digits, standardized with the training split's statistics."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("the digits task needs scikit-learn: pip install 'fused_sam[study]'") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(30_000 + seed))
    cut = int(0.6 * len(x))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-3)
    return dict(x=(x[train] - mean) / std, y=y[train], x_test=(x[test] - mean) / std, y_test=y[test], hidden=256)


def noisy_task(seed: int) -> Dict[str, torch.Tensor]:
    cfg = MLPConfig()
    data = make_data(cfg, seed)
    return dict(x=data["x"], y=data["y"], x_test=data["x_test"], y_test=data["y_test"], hidden=cfg.hidden)


TASKS = {"digits": digits_task, "noisy": noisy_task}


def check_epochs(epochs: int) -> Tuple[int, ...]:
    """The epochs (1-based) at whose end the curvature is checked: the first, the middle and the last."""
    return tuple(sorted({1, (epochs + 1) // 2, epochs}))


class Run:
    """One method on one task and seed, trained an epoch at a time so that runs can be interleaved."""

    def __init__(self, task: Dict[str, torch.Tensor], method: str, seed: int, cfg: StudyConfig):
        self.task, self.method, self.seed, self.cfg = task, method, seed, cfg
        x = task["x"]
        torch.manual_seed(seed)  # the same initial weights for every method
        self.model = nn.Sequential(nn.Linear(x.shape[1], task["hidden"]), nn.ReLU(), nn.Linear(task["hidden"], 10))
        if method == "sgd":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        else:
            steps = cfg.epochs * -(-len(x) // cfg.batch_size)
            self.opt = FusedSAM(self.model.parameters(), torch.optim.SGD, rho=cfg.rho, lr=cfg.lr,
                                momentum=cfg.momentum, variant=METHODS[method](seed, steps),
                                telemetry=cfg.curvature, backend=cfg.backend)
        self.batches = torch.Generator().manual_seed(20_000 + seed)  # the same batches for every method
        self.backward_passes, self.seconds, self.epochs, self.steps = 0, 0.0, 0, 0
        self.recording = cfg.curvature and method != "sgd"
        self.curvature: List[dict] = []  # per epoch: the median and mean over its SAM steps, and their count
        self.checks: List[dict] = []

    def epoch(self) -> None:
        x, y, opt, loss_fn = self.task["x"], self.task["y"], self.opt, nn.functional.cross_entropy
        checking = self.recording and self.epochs + 1 in check_epochs(self.cfg.epochs)
        measured, last_sam_step = [], None
        start = time.perf_counter()
        for idx in torch.randperm(len(x), generator=self.batches).split(self.cfg.batch_size):
            xb, yb = x[idx], y[idx]
            loss_fn(self.model(xb), yb).backward()
            self.backward_passes += 1
            if self.method == "sgd":
                opt.step()
                opt.zero_grad()
            elif opt.sam_step_due:
                if checking:
                    w = [p.detach().clone() for p in self.model.parameters()]
                opt.first_step(zero_grad=True)
                if checking:  # e as the weights hold it
                    last_sam_step = (self.steps, w, [p.detach() - a for p, a in zip(self.model.parameters(), w)],
                                     xb, yb)
                loss_fn(self.model(xb), yb).backward()
                self.backward_passes += 1
                opt.second_step(zero_grad=True)
                if self.recording:  # kept on the device: no host sync per step
                    record = opt.telemetry(sync=False)
                    measured.append(torch.stack([record["step"], record["curvature"]]))
            else:
                opt.plain_step(zero_grad=True)
            self.steps += 1
        self.seconds += time.perf_counter() - start
        self.epochs += 1
        if self.recording:
            self.curvature.append(_per_epoch(torch.stack(measured).tolist() if measured else []))
        if last_sam_step is not None:
            step, w, e, xb, yb = last_sam_step
            record = opt.telemetry()
            check = curvature_check(self.model, w, e, xb, yb, record["curvature"], self.cfg.check_power_iters,
                                    self.seed)
            self.checks.append(dict(epoch=self.epochs, step=step, telemetry_step=record["step"], **check))

    def result(self) -> dict:
        model, task = self.model, self.task
        # MomentumSAM keeps the model at its perturbed point between steps; the trained weights are w
        held_at_w = self.opt.at_restore_point() if isinstance(self.opt, FusedSAM) else contextlib.nullcontext()
        with held_at_w:
            out = dict(
                seed=self.seed,
                test_acc=accuracy(model, task["x_test"], task["y_test"]),
                top_hessian_eigenvalue=top_hessian_eigenvalue(model, task["x"], task["y"], self.cfg.power_iters,
                                                              self.seed),
                gradient_evaluations_per_epoch=self.backward_passes / self.epochs,
                seconds=self.seconds,
            )
        if self.recording:
            out.update(curvature=self.curvature, curvature_checks=self.checks)
        return out


def _per_epoch(records: List[List[float]]) -> dict:
    """One epoch's (step, curvature) records, one per SAM step: a skipped step leaves the record as it was
    (the same step again) and a NaN step means nothing was recorded yet, so each step counts once."""
    by_step = {int(step): kappa for step, kappa in records if not math.isnan(step)}
    values = list(by_step.values())
    if not values:
        return dict(sam_steps=0, median=None, mean=None)
    return dict(sam_steps=len(values), median=statistics.median(values), mean=statistics.fmean(values))


def _batch_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False):
    params = list(model.parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, params, create_graph=create_graph)


def batch_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int, seed: int) -> float:
    """lambda_max, the most positive eigenvalue of the Hessian of the mean cross-entropy on (x, y), by power
    iteration with Hessian-vector products. Power iteration finds the eigenvalue of largest magnitude; when
    that one is negative (a batch Hessian can be dominated by a negative direction), a second iteration on
    H - lambda I, whose eigenvalues are all >= 0, finds lambda_max - lambda. Each estimate is a Rayleigh
    quotient, so it approaches its eigenvalue from below."""
    params = list(model.parameters())
    grads = _batch_gradient(model, x, y, create_graph=True)

    def largest(shift: float) -> float:
        gen = torch.Generator().manual_seed(seed)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        eig = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((u * u).sum() for u in v))
            v = [u / norm for u in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            hv = [h - shift * u for h, u in zip(hv, v)]
            eig = float(sum((h * u).sum() for h, u in zip(hv, v)))  # Rayleigh quotient, |v| = 1
            v = hv
        return eig

    top = largest(0.0)
    return top if top >= 0 else top + largest(top)


def curvature_check(model: nn.Module, w: List[torch.Tensor], e: List[torch.Tensor], x: torch.Tensor,
                    y: torch.Tensor, recorded: float, power_iters: int, seed: int) -> dict:
    """Check a recorded curvature against autograd, at the weights w, the perturbation e and the batch (x, y)
    of the SAM step that recorded it (``model`` gives the architecture; it is not changed).

    kappa = e.(g2 - g1) / |e|^2 is the batch loss's secant curvature over [w, w + e]: it equals the
    Hessian's Rayleigh quotient along e only to first order in |e| (and a ReLU network's gradient jumps
    where a unit switches, which no Hessian sees), so at the study's rho = 0.3 it is not bounded by any
    Hessian eigenvalue at w. Hence three numbers, all on the same batch and weights:
    - ``recomputed``: e.(g2 - g1) / |e|^2 from autograd's gradients at w and w + e in float64, which the
      recorded value must equal;
    - ``rayleigh_quotient``: q = e'He / |e|^2, the first-order curvature along e (H the batch loss's
      Hessian at w, autograd's Hessian-vector product), which kappa approaches as rho -> 0;
    - ``batch_top_eigenvalue``: lambda_max of that same H (``batch_top_eigenvalue``); q <= lambda_max is a
      theorem, up to the power iteration's shortfall.
    Their ratios say how the curvature along e compares with the sharpest direction.
    """
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p, value in zip(probe.parameters(), w):
            p.copy_(value)
    grads = _batch_gradient(probe, x, y, create_graph=True)
    hvp = torch.autograd.grad(grads, list(probe.parameters()), grad_outputs=e)
    e_sq = float(sum((u.double() * u.double()).sum() for u in e))
    quotient = float(sum((h.double() * u.double()).sum() for h, u in zip(hvp, e))) / e_sq
    top = batch_top_eigenvalue(probe, x, y, power_iters, seed)
    exact = probe.double()
    g1 = _batch_gradient(exact, x.double(), y)
    with torch.no_grad():
        for p, u in zip(exact.parameters(), e):
            p.add_(u.double())  # exactly w + e as the float32 weights held it
    g2 = _batch_gradient(exact, x.double(), y)
    recomputed = float(sum((u.double() * (b - a)).sum() for u, a, b in zip(e, g1, g2))) / e_sq
    return dict(curvature=recorded, recomputed=recomputed, rayleigh_quotient=quotient, batch_top_eigenvalue=top,
                curvature_over_top=recorded / top, rayleigh_quotient_over_top=quotient / top)


def train_seed(task: Dict[str, torch.Tensor], seed: int, cfg: StudyConfig, methods: Sequence[str]) -> Dict[str, dict]:
    """Every method on one task and seed, round-robin one epoch at a time, the order rotated each epoch so
    that no method always runs first or last (load changes and cache state then fall on all alike)."""
    runs = [Run(task, method, seed, cfg) for method in methods]
    for epoch in range(cfg.epochs):
        shift = epoch % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.epoch()
    return {run.method: run.result() for run in runs}


def bootstrap_interval(values: Sequence[float], resamples: int, seed: int, confidence: float) -> Tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, `resamples` times,
    from numpy's default generator seeded with `seed`: the same values give the same interval)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or len(data) < 2:
        raise ValueError(f"a bootstrap interval over seeds needs at least 2 values, got {len(data)}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples} and {confidence}")
    idx = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def summarize(runs: Dict[str, Dict[str, List[dict]]], cfg: StudyConfig) -> dict:
    """Per task and method: means and per-seed values, paired differences to SGD and SAM with bootstrap
    intervals, the exact gradient-evaluation count and the interleaved wall time as a ratio to SGD's."""
    def interval(values):
        lo, hi = bootstrap_interval(values, cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence)
        return dict(mean=statistics.fmean(values), ci=[lo, hi], per_seed=list(values))

    summary = {}
    for task, per_method in runs.items():
        seeds = [r["seed"] for r in per_method["sgd"]]
        for method, results in per_method.items():
            if [r["seed"] for r in results] != seeds:
                raise ValueError(f"{task}/{method}: seeds {[r['seed'] for r in results]}, SGD's are {seeds}: "
                                 "paired differences need the same seeds in the same order")
        sgd_evals = statistics.fmean(r["gradient_evaluations_per_epoch"] for r in per_method["sgd"])
        summary[task] = {}
        for method, results in per_method.items():
            entry = {key: dict(mean=statistics.fmean(r[key] for r in results), per_seed=[r[key] for r in results])
                     for key in COMPARED + ("gradient_evaluations_per_epoch",)}
            entry["gradient_evaluations_vs_sgd"] = entry["gradient_evaluations_per_epoch"]["mean"] / sgd_evals
            entry["wall_time_vs_sgd"] = interval(
                [r["seconds"] / s["seconds"] for r, s in zip(results, per_method["sgd"])])
            for ref in REFERENCES:
                if ref != method:
                    entry[f"minus_{ref}"] = {
                        key: interval([r[key] - b[key] for r, b in zip(results, per_method[ref])])
                        for key in COMPARED}
            curvature = _curvature_summary(results)
            if curvature is not None:
                entry["curvature"] = curvature
            summary[task][method] = entry
    return summary


def _spread(values: List[float]) -> dict:
    return dict(mean=statistics.fmean(values), min=min(values), max=max(values), median=statistics.median(values))


def _curvature_summary(results: List[dict]) -> Optional[dict]:
    """Per epoch, the per-seed medians of the curvature along e over the seeds; per check epoch, the checks'
    ratios over the seeds. None where nothing was recorded (SGD, MomentumSAM, a run without --curvature)."""
    per_seed = [r.get("curvature") for r in results]
    if any(c is None for c in per_seed) or all(e["median"] is None for c in per_seed for e in c):
        return None
    by_epoch = []
    for epoch in zip(*per_seed):
        medians = [e["median"] for e in epoch if e["median"] is not None]
        by_epoch.append(_spread(medians) if medians else None)
    checks = {}
    for r in results:
        for check in r["curvature_checks"]:
            checks.setdefault(check["epoch"], []).append(check)
    return dict(by_epoch=by_epoch, checks=[
        dict(epoch=epoch, **{key: _spread([c[key] for c in found]) for key in
                             ("curvature", "batch_top_eigenvalue", "curvature_over_top", "rayleigh_quotient_over_top")})
        for epoch, found in sorted(checks.items())])


def run_study(cfg: StudyConfig, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    if cfg.seeds < 2:
        raise ValueError(f"the study's intervals are over seeds: it needs at least 2, got {cfg.seeds}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    load_before, start = _load(), time.perf_counter()
    try:
        runs: Dict[str, Dict[str, List[dict]]] = {task: {m: [] for m in METHODS} for task in cfg.tasks}
        plan = [(task, seed) for task in cfg.tasks for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds)]
        for task, seed in tqdm(plan, desc="study", unit="seed", disable=not progress, leave=False):
            for method, result in train_seed(TASKS[task](seed), seed, cfg, list(METHODS)).items():
                runs[task][method].append(result)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    return dict(config=asdict(cfg), torch=torch.__version__, python=platform.python_version(),
                machine=dict(platform=platform.platform(), processor=cpu_model(), cpus=os.cpu_count(),
                             niceness=os.nice(0) if hasattr(os, "nice") else None,
                             load_average_before=load_before, load_average_after=_load()),
                threads=cfg.threads, seconds=seconds,
                bootstrap=dict(method="percentile bootstrap of the mean over seeds, paired by seed",
                               resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                               confidence=cfg.confidence, generator="numpy.random.default_rng"),
                runs=runs, summary=summarize(runs, cfg))


def _load() -> Optional[List[float]]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _fmt(entry: dict, spec: str) -> str:
    """mean [lo, hi], starred when the interval excludes 0 (the difference is resolved)."""
    lo, hi = entry["ci"]
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{entry['mean']:{spec}} [{lo:{spec}}, {hi:{spec}}]{star}"


def markdown(result: dict) -> str:
    cfg, boot = result["config"], result["bootstrap"]
    first, last = cfg["first_seed"], cfg["first_seed"] + cfg["seeds"] - 1
    lines = [f"{cfg['seeds']} seeds ({first}-{last}), {cfg['epochs']} epochs; differences are paired by seed "
             f"(method minus SGD, method minus SAM), mean [{boot['confidence']:.0%} percentile bootstrap interval "
             f"over the seeds, {boot['resamples']} resamples]; * marks an interval that excludes 0. Wall time: "
             f"the methods interleaved epoch by epoch within each seed, {result['threads']} thread(s), on a shared machine "
             "(load average " + _load_text(result) + ").", ""]
    for task, per_method in result["summary"].items():
        lines += [f"**{task}**", "",
                  "| method | test accuracy | minus SGD | minus SAM | top Hessian eigenvalue | minus SGD | minus SAM "
                  "| gradient evaluations / epoch (x SGD) | wall time, x SGD (shared machine) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method, s in per_method.items():
            acc, eig = s["test_acc"], s["top_hessian_eigenvalue"]
            cells = [method, f"{acc['mean']:.4f}"]
            cells += [_fmt(s[f"minus_{ref}"]["test_acc"], "+.4f") if f"minus_{ref}" in s else "" for ref in REFERENCES]
            cells.append(f"{eig['mean']:#.3g}")
            cells += [_fmt(s[f"minus_{ref}"]["top_hessian_eigenvalue"], "+#.3g") if f"minus_{ref}" in s else ""
                      for ref in REFERENCES]
            wall = s["wall_time_vs_sgd"]
            cells.append(f"{s['gradient_evaluations_per_epoch']['mean']:.1f} ({s['gradient_evaluations_vs_sgd']:.2f}x)")
            cells.append(f"{wall['mean']:.2f}x [{wall['ci'][0]:.2f}, {wall['ci'][1]:.2f}]")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if any("curvature" in s for per_method in result["summary"].values() for s in per_method.values()):
        lines += curvature_markdown(result)
    return "\n".join(lines)


def curvature_markdown(result: dict) -> List[str]:
    epochs = check_epochs(result["config"]["epochs"])
    head = ", ".join(str(e) for e in epochs)
    lines = ["**curvature along e** (telemetry's kappa = e.(g2 - g1) / \\|e\\|^2 per SAM step; per seed the median "
             "over an epoch's SAM steps, then the mean over the seeds, min-max over the seeds in brackets). The "
             f"checks at the end of epochs {head}, at the last SAM step's weights and batch: kappa and its "
             "first-order part q = e'He / \\|e\\|^2 over lambda_max, the top eigenvalue of that batch's Hessian "
             f"({result['config']['check_power_iters']} power iterations); median over the seeds [min, max]. "
             "MomentumSAM records nothing (its e follows the momentum).", ""]

    def cell(spread: Optional[dict], spec: str, centre: str = "mean") -> str:
        if spread is None:
            return ""
        return f"{spread[centre]:{spec}} [{spread['min']:{spec}}, {spread['max']:{spec}}]"

    for task, per_method in result["summary"].items():
        lines += [f"**{task}**", "",
                  "| method | " + " | ".join(f"kappa, epoch {e}" for e in epochs) + " | "
                  + " | ".join(f"kappa / lambda_max, epoch {e}" for e in epochs) + " | "
                  + " | ".join(f"q / lambda_max, epoch {e}" for e in epochs) + " |",
                  "| --- " * (1 + 3 * len(epochs)) + "|"]
        for method, s in per_method.items():
            if "curvature" not in s:
                continue
            c = s["curvature"]
            cells = [method] + [cell(c["by_epoch"][e - 1], "#.3g") for e in epochs]
            checks = {check["epoch"]: check for check in c["checks"]}
            for key in ("curvature_over_top", "rayleigh_quotient_over_top"):
                cells += [cell(checks[e][key], ".2f", "median") if e in checks else "" for e in epochs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _load_text(result: dict) -> str:
    before, after = result["machine"]["load_average_before"], result["machine"]["load_average_after"]
    if before is None:
        return "unknown"
    return f"{before[0]:.1f} before, {after[0]:.1f} after"


def plot(result: dict, path: str) -> Optional[str]:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["summary"])
    conf = f"{result['bootstrap']['confidence']:.0%}"
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        same_cost: Dict[float, int] = {}
        for method, s in result["summary"][task].items():
            cost = s["gradient_evaluations_vs_sgd"]
            nth = same_cost[round(cost, 2)] = same_cost.get(round(cost, 2), -1) + 1
            cost += 0.02 * nth  # methods of the same cost side by side, not on top of each other
            diff = s["minus_sgd"]["test_acc"] if "minus_sgd" in s else dict(mean=0.0, ci=[0.0, 0.0])
            ax.errorbar(cost, diff["mean"], yerr=[[diff["mean"] - diff["ci"][0]], [diff["ci"][1] - diff["mean"]]],
                        fmt="o", capsize=3, label=method)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"{task} ({result['config']['seeds']} seeds)")
        ax.set_xlabel("gradient evaluations per epoch, x SGD")
        ax.set_ylabel(f"test accuracy minus SGD's ({conf} interval)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curvature(result: dict, path: str) -> Optional[str]:
    """The curvature along e over training, per task and recording method: the mean over the seeds of each
    epoch's median, shaded between the seeds' lowest and highest (a linear axis: it can be negative)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["summary"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, s in result["summary"][task].items():
            if "curvature" not in s:
                continue
            points = [(epoch, spread) for epoch, spread in enumerate(s["curvature"]["by_epoch"], 1) if spread]
            epochs = [p for p, _ in points]
            line, = ax.plot(epochs, [c["mean"] for _, c in points], label=method)
            ax.fill_between(epochs, [c["min"] for _, c in points], [c["max"] for _, c in points],
                            color=line.get_color(), alpha=0.15)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"{task} ({result['config']['seeds']} seeds, rho {result['config']['rho']})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("curvature along e (median over the epoch)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fused-sam study", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=StudyConfig.epochs,
                        help=f"epochs per run (default {StudyConfig.epochs})")
    parser.add_argument("--seeds", type=int, default=StudyConfig.seeds,
                        help=f"seeds per task and method, at least 2 (default {StudyConfig.seeds})")
    parser.add_argument("--first-seed", type=int, default=StudyConfig.first_seed,
                        help="the first seed (default 0); a rerun with fresh seeds checks that the conclusions hold")
    parser.add_argument("--tasks", default=",".join(StudyConfig.tasks), help="comma list among digits, noisy")
    parser.add_argument("--threads", type=int, default=StudyConfig.threads,
                        help=f"torch threads while training (default {StudyConfig.threads})")
    parser.add_argument("--backend", default=StudyConfig.backend,
                        help=f"FusedSAM's backend for the SAM methods (default {StudyConfig.backend})")
    parser.add_argument("--curvature", action="store_true",
                        help="also record the curvature along the SAM perturbation each SAM step (telemetry), "
                             "check it against autograd at the first, middle and last epochs, and plot it")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 seeds: checks that everything runs")
    parser.add_argument("--out", default="study_out", help="output folder (default: ./study_out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds: the intervals are over seeds, so at least 2 are needed")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.quick:
        cfg = StudyConfig.quick()
    else:
        cfg = StudyConfig(epochs=args.epochs, seeds=args.seeds)
    cfg.threads, cfg.first_seed = args.threads, args.first_seed
    cfg.backend, cfg.curvature = args.backend, args.curvature
    cfg.tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose among {list(TASKS)}")
    result = run_study(cfg, progress=not args.no_progress)
    result["command"] = " ".join(["fused-sam study"] + argv)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(result)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(table)
    figures = [plot(result, os.path.join(args.out, "study.png"))]
    if cfg.curvature:
        figures.append(plot_curvature(result, os.path.join(args.out, "study_curvature.png")))
    print(table)
    written = [os.path.basename(f) for f in figures if f]
    print(f"took {result['seconds'] / 60:.1f} min; wrote {args.out}/study.json, study.md"
          + (", " + ", ".join(written) if written else " (no plot: pip install matplotlib)"))
    return 0
