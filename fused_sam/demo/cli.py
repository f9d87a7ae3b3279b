"""fused-sam demo: SAM against gradient descent on synthetic problems, run with FusedSAM.

  kernel  noisy kernel regression: bias^2, variance and test risk over iterations (GD, USAM, normalized SAM)
  mlp     one-hidden-layer ReLU network on noisy labels: test accuracy and sharpness (SGD, SAM)
  all     both (the default)

Writes DIR/demo.json (all the numbers) and, when matplotlib is installed, PNG figures into DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

import torch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fused-sam demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("experiment", nargs="?", default="all", choices=["kernel", "mlp", "all"])
    p.add_argument("--quick", action="store_true", help="smaller settings that finish in well under a minute")
    p.add_argument("--out", default="demo_out", help="output folder (default: ./demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, noise and initialisation (default 0)")
    p.add_argument(
        "--backend", default="auto", help="FusedSAM backend: auto (default), native, torch, reference, triton"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the models are tiny)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}"


def _backends(r: dict) -> str:
    return ", ".join(sorted(set((r.get("fused_sam_backends") or {}).values()))) or "?"


def kernel_table(r: dict) -> str:
    cfg, s = r["config"], r["summary"]
    T, t0 = cfg["iters"], cfg["early_stop"]
    rows = [
        f"Kernel regression: n={cfg['n']}, RBF l={cfg['length_scale']}, noise sd {cfg['noise_sd']}, step {cfg['lr']}, "
        f"{T} iterations, {cfg['draws']} noise draws (seed {r['seed']}; FusedSAM backend {_backends(r)})",
        f"  {'method':<34}{'risk@' + str(t0):>10}{'best risk (iter)':>20}{'risk@' + str(T):>10}"
        f"{'bias2@' + str(T):>11}{'var@' + str(T):>9}",
    ]

    def row(name, m):
        b = s["best_risk"][m]
        return (
            f"  {name:<34}{_f(s['risk_at_early_stop'][m]):>10}{_f(b['risk']) + ' (' + str(b['iteration']) + ')':>20}"
            f"{_f(s['risk_final'][m]):>10}{_f(s['bias2_final'][m], 5):>11}{_f(s['variance_final'][m]):>9}"
        )

    rows.append(row("GD (torch.optim.SGD)", "gd"))
    rows.append(row(f"USAM (FusedSAM rho={cfg['rho']:g}, unnormalized)", "usam"))
    e = s["equal_budget"]
    rows.append(
        f"  {'GD at equal gradients (2x iters)':<34}{_f(e['gd_risk_at_2x_early_stop']):>10}"
        f"{_f(e['gd_best_within_2x']['risk']) + ' (' + str(e['gd_best_within_2x']['iteration']) + ')':>20}"
        f"{_f(e['gd_risk_at_2x_final']):>10}"
    )
    rows.append(f"  on the same {cfg['draws_normalized']} draws (normalized SAM runs one optimizer per draw):")
    rows.append(row("  GD", "gd_subset"))
    rows.append(row(f"  USAM rho={cfg['rho']:g}", "usam_subset"))
    rows.append(row(f"  normalized SAM rho={cfg['rho_normalized']:g}", "sam"))
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    rows.append(
        f"  USAM bias2 <= GD at every iteration: {yes(s['usam_bias_le_gd_every_iter'])}; "
        f"variance >= GD: {yes(s['usam_variance_ge_gd_every_iter'])}"
    )
    rows.append(
        f"  normalized SAM bias2 <= GD at every iteration: {yes(s['sam_bias_le_gd_every_iter'])}; "
        f"variance >= GD: {yes(s['sam_variance_ge_gd_every_iter'])}"
    )
    return "\n".join(rows)


def mlp_table(r: dict) -> str:
    cfg, s = r["config"], r["summary"]
    seeds = [x["seed"] for x in r["runs"]]
    rows = [
        f"One-hidden-layer MLP: {cfg['classes']} Gaussian clusters in {cfg['dim']}-d, {cfg['n_train']} training points, "
        f"{int(cfg['label_noise'] * 100)}% flipped labels, hidden {cfg['hidden']}, batch {cfg['batch_size']}, "
        f"momentum {cfg['momentum']}, {cfg['epochs']} epochs, seeds {seeds} (FusedSAM backend {_backends(r)})",
        "  mean over seeds, [min, max] where shown. last5: mean test accuracy of the last 5 epochs. best: the best",
        "  epoch's test accuracy (an oracle). clean/flipped fitted: training points predicted as their training label.",
        f"  {'method':<28}{'final test acc':>22}{'last5':>7}{'best':>7}{'clean fit':>10}{'flipped fit':>12}"
        f"{'top Hessian eig':>24}",
    ]
    lr, small = cfg["lr"], cfg.get("small_lr")
    names = {
        "sgd": f"SGD lr={lr:g}", "sam": f"SAM lr={lr:g} rho={cfg['rho']:g}", "sgd_2x": f"SGD lr={lr:g}, 2x epochs",
        "sgd_small_lr": f"SGD lr={small}", "sam_small_lr": f"SAM lr={small} rho={cfg['rho']:g}",
    }
    for m in names:
        if m not in s:
            continue
        v = s[m]
        rng = lambda k, d: f"{_f(v[k]['mean'], d)} [{_f(v[k]['min'], d)}, {_f(v[k]['max'], d)}]"  # noqa: E731
        rows.append(
            f"  {names[m]:<28}{rng('final_test_acc', 3):>22}{_f(v['last5_test_acc']['mean'], 3):>7}"
            f"{_f(v['best_test_acc']['mean'], 3):>7}{_f(v['final_fit_clean']['mean'], 3):>10}"
            f"{_f(v['final_memorised']['mean'], 3):>12}{rng('top_hessian_eigenvalue', 2):>24}"
        )
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    rows.append(
        f"  lr={lr:g}: SAM final accuracy above SGD on every seed: {yes(s['sam_final_acc_above_sgd_every_seed'])}; "
        f"SAM flatter on every seed: {yes(s['sam_sharpness_below_sgd_every_seed'])}"
    )
    if "small_lr_sam_final_acc_above_sgd_every_seed" in s:
        rows.append(
            f"  lr={small}: SAM final accuracy above SGD on every seed: "
            f"{yes(s['small_lr_sam_final_acc_above_sgd_every_seed'])}"
        )
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .kernel import KernelConfig, run_kernel
    from .mlp import MLPConfig, run_mlp
    from . import plots

    torch.set_num_threads(max(1, args.threads))
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    results = {"quick": args.quick, "seed": args.seed, "backend": args.backend, "torch": torch.__version__}
    tables = []
    start = time.perf_counter()
    if args.experiment in ("kernel", "all"):
        cfg = KernelConfig.quick() if args.quick else KernelConfig()
        cfg.backend = args.backend
        results["kernel"] = run_kernel(cfg, args.seed, progress)
        tables.append(kernel_table(results["kernel"]))
    if args.experiment in ("mlp", "all"):
        cfg = MLPConfig.quick() if args.quick else MLPConfig()
        cfg.backend = args.backend
        results["mlp"] = run_mlp(cfg, args.seed, progress)
        tables.append(mlp_table(results["mlp"]))
    results["seconds"] = time.perf_counter() - start
    print("\n\n".join(tables))

    path = os.path.join(args.out, "demo.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nnumbers: {path}")
    if args.no_plots:
        print("plots: skipped (--no-plots)")
    elif not plots.available():
        print("plots: skipped (matplotlib is not installed; pip install matplotlib)")
    else:
        written = []
        if "kernel" in results:
            written += plots.plot_kernel(results["kernel"], args.out)
        if "mlp" in results:
            written += plots.plot_mlp(results["mlp"], args.out)
        print("plots: " + ", ".join(written))
    print(f"time: {results['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
