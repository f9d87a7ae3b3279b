"""fused-sam study: how much of SAM's benefit the cheaper variants keep, and what they cost.

Two tasks, each trained with SGD-momentum, SAM and every variant in ``fused_sam.variants``, the same epochs,
batches and initial weights per seed:

- ``digits``: scikit-learn's handwritten digits (1797 8x8 images that ship with the package, no download),
  a fixed 60/40 train/test split per seed; an MLP 64 -> 256 -> 10.
- ``noisy``: the demo's label-noise task (10 Gaussian clusters in 64 dimensions, 40% of the training labels
  replaced by another class, clean test labels); an MLP 64 -> 512 -> 10 (``fused_sam.demo.mlp``).

Reported per task and method (mean, min and max over the seeds): final test accuracy, wall-clock seconds
per epoch, gradient evaluations (backward passes) per epoch, and the largest Hessian eigenvalue of the
training loss at the end (power iteration). The table is written as JSON and Markdown, with a plot of
accuracy against gradient evaluations when matplotlib is installed. Nothing is tuned per method: every
method runs with the demo's settings (SGD lr 0.05, momentum 0.9, batch 32; rho 0.3 for SAM and every
variant; LookSAM's alpha 0.7, fused_sam's default; WhenSharp's threshold from -1 to +1 standard
deviations over the run and delta 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

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


@dataclass
class StudyConfig:
    epochs: int = 30
    seeds: int = 3
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    rho: float = 0.3  # the demo's (fused_sam.demo.mlp.MLPConfig), for both tasks and every method
    power_iters: int = 20
    tasks: tuple = ("digits", "noisy")

    @classmethod
    def quick(cls) -> "StudyConfig":
        return cls(epochs=2, seeds=1, power_iters=3)


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


def train(task: Dict[str, torch.Tensor], method: str, seed: int, cfg: StudyConfig) -> dict:
    x, y = task["x"], task["y"]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], task["hidden"]), nn.ReLU(), nn.Linear(task["hidden"], 10))
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    else:
        steps = cfg.epochs * -(-len(x) // cfg.batch_size)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=cfg.rho, lr=cfg.lr, momentum=cfg.momentum,
                       variant=METHODS[method](seed, steps))
    gen = torch.Generator().manual_seed(20_000 + seed)  # the same batches for every method
    loss_fn = nn.functional.cross_entropy
    backward_passes, seconds = 0, 0.0
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            xb, yb = x[idx], y[idx]
            loss_fn(model(xb), yb).backward()
            backward_passes += 1
            if method == "sgd":
                opt.step()
                opt.zero_grad()
            elif opt.sam_step_due:
                opt.first_step(zero_grad=True)
                loss_fn(model(xb), yb).backward()
                backward_passes += 1
                opt.second_step(zero_grad=True)
            else:
                opt.plain_step(zero_grad=True)
        seconds += time.perf_counter() - start
    return dict(
        test_acc=accuracy(model, task["x_test"], task["y_test"]),
        seconds_per_epoch=seconds / cfg.epochs,
        gradient_evaluations_per_epoch=backward_passes / cfg.epochs,
        top_hessian_eigenvalue=top_hessian_eigenvalue(model, x, y, cfg.power_iters, seed),
    )


def run_study(cfg: StudyConfig, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    plan = [(task, seed, method) for task in cfg.tasks for seed in range(cfg.seeds) for method in METHODS]
    runs: Dict[str, Dict[str, List[dict]]] = {task: {m: [] for m in METHODS} for task in cfg.tasks}
    tasks = {}
    for task, seed, method in tqdm(plan, desc="study", unit="run", disable=not progress, leave=False):
        if (task, seed) not in tasks:
            tasks[task, seed] = TASKS[task](seed)
        runs[task][method].append(train(tasks[task, seed], method, seed, cfg))
    summary = {
        task: {
            method: {key: _spread([r[key] for r in results]) for key in results[0]}
            for method, results in per_method.items()
        }
        for task, per_method in runs.items()
    }
    return dict(config=asdict(cfg), torch=torch.__version__, threads=torch.get_num_threads(),
                runs=runs, summary=summary)


def _spread(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def markdown(result: dict) -> str:
    lines = []
    for task, per_method in result["summary"].items():
        lines += [f"**{task}** ({result['config']['seeds']} seeds, {result['config']['epochs']} epochs)", "",
                  "| method | test accuracy, mean (min-max) | s / epoch | gradient evaluations / epoch "
                  "| top Hessian eigenvalue, mean (min-max) |", "| --- | --- | --- | --- | --- |"]
        for method, s in per_method.items():
            acc, eig = s["test_acc"], s["top_hessian_eigenvalue"]
            lines.append(f"| {method} | {acc['mean']:.4f} ({acc['min']:.4f}-{acc['max']:.4f}) "
                         f"| {s['seconds_per_epoch']['mean']:.3f} | {s['gradient_evaluations_per_epoch']['mean']:.1f} "
                         f"| {eig['mean']:.2f} ({eig['min']:.2f}-{eig['max']:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: str) -> Optional[str]:
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
            cost, acc = s["gradient_evaluations_per_epoch"]["mean"], s["test_acc"]
            ax.errorbar(cost, acc["mean"], yerr=[[acc["mean"] - acc["min"]], [acc["max"] - acc["mean"]]], fmt="o",
                        capsize=3, label=method)
        ax.set_title(task)
        ax.set_xlabel("gradient evaluations per epoch")
        ax.set_ylabel("test accuracy (mean, min-max over seeds)")
        ax.grid(alpha=0.3)
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
                        help=f"seeds per task and method (default {StudyConfig.seeds})")
    parser.add_argument("--tasks", default=",".join(StudyConfig.tasks), help="comma list among digits, noisy")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed: checks that everything runs")
    parser.add_argument("--out", default="study_out", help="output folder (default: ./study_out)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = StudyConfig.quick() if args.quick else StudyConfig(epochs=args.epochs, seeds=args.seeds)
    cfg.tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose among {list(TASKS)}")
    result = run_study(cfg, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    table = markdown(result)
    with open(os.path.join(args.out, "study.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "study.md"), "w") as f:
        f.write(table)
    figure = plot(result, os.path.join(args.out, "study.png"))
    print(table)
    print(f"wrote {args.out}/study.json, study.md" + (", study.png" if figure else " (no plot: pip install matplotlib)"))
    return 0
