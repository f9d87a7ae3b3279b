"""PNG figures for the demo. matplotlib is optional: ``available()`` says whether these can run."""
from __future__ import annotations

import os
from typing import List


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"gd": "tab:blue", "usam": "tab:red", "sam": "tab:orange", "sgd": "tab:blue", "sgd_2x": "tab:cyan"}


def plot_kernel(result: dict, out_dir: str) -> List[str]:
    plt = _pyplot()
    c, T = result["curves"], result["config"]["iters"]
    rho, rho_n = result["config"]["rho"], result["config"]["rho_normalized"]
    labels = {"gd": "GD (torch.optim.SGD)", "usam": f"USAM, FusedSAM rho={rho:g}, normalize=False"}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("bias2", "variance", "risk"), ("bias$^2$", "variance", "test risk = bias$^2$ + variance")):
        for m in ("gd", "usam"):
            ax.plot(range(T + 1), c[m][key][: T + 1], color=COLORS[m], label=labels[m])
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[2].axvline(result["config"]["early_stop"], color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Kernel regression, {result['config']['draws']} noise draws: SAM has lower bias, higher variance", fontsize=10)
    fig.tight_layout()
    paths = [_save(fig, plt, out_dir, "kernel_bias_variance.png")]

    # normalized SAM against GD on the same draws; the risk ratio; GD with 2x iterations at equal gradients
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(range(T + 1), c["gd_subset"]["risk"][: T + 1], color=COLORS["gd"], label="GD")
    ax.plot(range(T + 1), c["usam_subset"]["risk"], color=COLORS["usam"], label=f"USAM rho={rho:g}")
    ax.plot(range(T + 1), c["sam"]["risk"], color=COLORS["sam"], label=f"normalized SAM rho={rho_n:g}")
    ax.set(title=f"same {result['config']['draws_normalized']} draws: test risk", xlabel="iteration", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    ratio = [u / g for u, g in zip(c["usam"]["risk"], c["gd"]["risk"])]
    ratio2 = [u / c["gd"]["risk"][min(2 * t, 2 * T)] for t, u in enumerate(c["usam"]["risk"])]
    ax.plot(range(T + 1), ratio, color=COLORS["usam"], label="USAM / GD, same iteration")
    ax.plot(range(T + 1), ratio2, color=COLORS["usam"], ls="--", label="USAM / GD at 2x the iterations")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(title="test risk ratio (below 1: SAM better)", xlabel="SAM iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(range(2 * T + 1), c["gd"]["risk"], color=COLORS["gd"], label="GD, 1 gradient / step")
    ax.plot([2 * t for t in range(T + 1)], c["usam"]["risk"], color=COLORS["usam"], label="USAM, 2 gradients / step")
    ax.set(title="equal gradient budget: test risk", xlabel="gradient evaluations", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, plt, out_dir, "kernel_normalized_and_budget.png"))
    return paths


def plot_mlp(result: dict, out_dir: str) -> List[str]:
    plt = _pyplot()
    runs, cfg = result["runs"], result["config"]
    lr, small = cfg["lr"], cfg.get("small_lr")
    labels = {
        "sgd": f"SGD lr={lr:g}", "sam": f"SAM lr={lr:g}, rho={cfg['rho']:g}", "sgd_2x": f"SGD lr={lr:g}, 2x epochs",
        "sgd_small_lr": f"SGD lr={small}", "sam_small_lr": f"SAM lr={small}, rho={cfg['rho']:g}",
    }
    colors = dict(COLORS, sgd_small_lr="tab:purple", sam_small_lr="tab:brown")
    methods = [m for m in labels if m in runs[0]]
    panels = [("test_acc", "test accuracy (clean labels)", ("sgd", "sam", "sgd_2x"))]
    if "sam_small_lr" in methods:
        panels.append(("test_acc", f"test accuracy at lr={small}", ("sgd_small_lr", "sam_small_lr")))
    panels.append(("memorised", "flipped training points fitted to the wrong label", tuple(methods)))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.3 * (len(panels) + 1), 3.6))
    for ax, (key, title, ms) in zip(axes, panels):
        for m in ms:
            if m not in methods:
                continue
            for i, r in enumerate(runs):
                h = r[m]["history"][key]
                ax.plot(range(1, len(h) + 1), h, color=colors[m], alpha=0.8, lw=1, label=labels[m] if i == 0 else None)
        ax.set(title=title, xlabel="epoch")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for j, m in enumerate(methods):
        vals = [r[m]["top_hessian_eigenvalue"] for r in runs]
        ax.scatter([j] * len(vals), vals, color=colors[m], zorder=3, s=14, alpha=0.8)
        ax.hlines(sum(vals) / len(vals), j - 0.3, j + 0.3, color=colors[m], lw=2)  # the mean
    ax.set_xticks(range(len(methods)), [labels[m].replace(", ", "\n") for m in methods], fontsize=7)
    ax.set(title="top Hessian eigenvalue, training loss", yscale="log")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"One-hidden-layer MLP, {int(cfg['label_noise'] * 100)}% flipped labels, {len(runs)} seed(s)", fontsize=10
    )
    fig.tight_layout()
    return [_save(fig, plt, out_dir, "mlp_accuracy_sharpness.png")]


def _save(fig, plt, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
