"""`fused-sam study`: its statistics against independent computations, and `--quick` runs every method and
counts the costs as the variants say (the accuracy numbers are the study's to report, not this test's to
judge)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import random
import statistics

import numpy as np
import pytest
import torch

from fused_sam.study import TASKS, Run, StudyConfig, batch_top_eigenvalue, bootstrap_interval, main, summarize


def _percentile(sorted_values, q):
    """Linear interpolation between the closest ranks (numpy's default quantile), written out."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def test_bootstrap_interval_of_a_constant_is_that_point():
    assert bootstrap_interval([0.0125] * 7, resamples=500, seed=3, confidence=0.95) == pytest.approx((0.0125, 0.0125))


def test_bootstrap_interval_matches_a_resampling_loop_written_out():
    values = [0.413, 0.4721, 0.3899, 0.5237, 0.4412, 0.4655, 0.4018, 0.4983, 0.4307, 0.4577]
    lo, hi = bootstrap_interval(values, resamples=999, seed=11, confidence=0.9)
    # the same draws (numpy's generator, same seed and shape), then means and percentiles by hand
    draws = np.random.default_rng(11).integers(0, len(values), size=(999, len(values))).tolist()
    means = sorted(sum(values[i] for i in row) / len(row) for row in draws)
    assert (lo, hi) == pytest.approx((_percentile(means, 0.05), _percentile(means, 0.95)), abs=1e-12)
    assert min(values) < lo < statistics.fmean(values) < hi < max(values)
    assert bootstrap_interval(values, 999, 11, 0.9) == (lo, hi)  # a fixed seed: the same interval again


def test_bootstrap_interval_of_a_large_sample_is_the_normal_one():
    """For n = 400 draws the percentile interval of the mean is close to mean +- 1.96 s / sqrt(n)."""
    gen = random.Random(5)
    values = [gen.gauss(1.0, 2.0) for _ in range(400)]
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    lo, hi = bootstrap_interval(values, resamples=20_000, seed=0, confidence=0.95)
    mean = statistics.fmean(values)
    assert lo == pytest.approx(mean - half, abs=0.1 * half) and hi == pytest.approx(mean + half, abs=0.1 * half)


def test_bootstrap_interval_rejects_a_single_seed():
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_interval([0.5], resamples=100, seed=0, confidence=0.95)


def _run(seed, acc, eig=1.0, evals=10.0, seconds=1.0):
    return dict(seed=seed, test_acc=acc, top_hessian_eigenvalue=eig, gradient_evaluations_per_epoch=evals,
                seconds=seconds)


def test_differences_are_paired_by_seed():
    """The seeds differ far more than the methods do; SAM is SGD + 0.1 on every seed, the variant SGD + a
    known per-seed amount: the paired differences and their intervals are exactly those amounts."""
    sgd = [0.3, 0.9, 0.5, 0.7]
    shift = [0.02, -0.01, 0.05, 0.00]
    runs = {"task": {
        "sgd": [_run(s, a, eig=10.0 + s, seconds=2.0) for s, a in enumerate(sgd)],
        "sam": [_run(s, a + 0.1, eig=4.0 + s, evals=20.0, seconds=3.0) for s, a in enumerate(sgd)],
        "every-5": [_run(s, a + d, eig=10.0 + s, evals=12.0, seconds=2.0 + s)
                    for s, (a, d) in enumerate(zip(sgd, shift))],
    }}
    cfg = StudyConfig(bootstrap_resamples=1000)
    summary = summarize(runs, cfg)["task"]
    sam = summary["sam"]["minus_sgd"]["test_acc"]
    assert sam["per_seed"] == pytest.approx([0.1] * 4) and sam["ci"] == pytest.approx([0.1, 0.1])
    assert summary["sam"]["minus_sgd"]["top_hessian_eigenvalue"]["ci"] == pytest.approx([-6.0, -6.0])
    variant = summary["every-5"]
    assert variant["minus_sgd"]["test_acc"]["per_seed"] == pytest.approx(shift)
    assert variant["minus_sgd"]["test_acc"]["mean"] == pytest.approx(statistics.fmean(shift))
    assert variant["minus_sam"]["test_acc"]["per_seed"] == pytest.approx([d - 0.1 for d in shift])
    expected = bootstrap_interval(shift, cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence)
    assert variant["minus_sgd"]["test_acc"]["ci"] == pytest.approx(list(expected))
    assert variant["test_acc"]["per_seed"] == pytest.approx([a + d for a, d in zip(sgd, shift)])
    assert variant["gradient_evaluations_vs_sgd"] == pytest.approx(1.2)
    assert variant["wall_time_vs_sgd"]["per_seed"] == pytest.approx([1.0, 1.5, 2.0, 2.5])  # per seed, to SGD's
    assert "minus_sgd" not in summary["sgd"] and "minus_sam" not in summary["sam"]


def test_differences_refuse_unpaired_seeds():
    runs = {"task": {"sgd": [_run(0, 0.5), _run(1, 0.6)], "sam": [_run(1, 0.6), _run(0, 0.5)]}}
    with pytest.raises(ValueError, match="same seeds"):
        summarize(runs, StudyConfig(bootstrap_resamples=100))


def test_quick_study_runs_every_method_and_counts_its_backward_passes(tmp_path):
    pytest.importorskip("sklearn")
    assert main(["--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert (tmp_path / "study.md").read_text().count("| sam |") == 2
    assert result["threads"] == 1 and result["config"]["seeds"] == 2 and result["seconds"] > 0
    assert result["bootstrap"]["resamples"] == StudyConfig.quick().bootstrap_resamples
    assert result["command"] == f"fused-sam study --quick --out {tmp_path} --no-progress"
    for task in ("digits", "noisy"):
        summary = result["summary"][task]
        cost = {m: s["gradient_evaluations_per_epoch"]["mean"] for m, s in summary.items()}
        steps = cost["sgd"]  # one backward per step
        assert cost["sam"] == 2 * steps
        for every_fifth in ("every-5", "looksam-5"):  # SAM on steps 0, 5, 10, ... of the run
            assert steps * 1.2 - 1 <= cost[every_fifth] <= steps * 1.2 + 1, (task, every_fifth, cost)
        assert steps < cost["randomly-0.2"] < 2 * steps and steps < cost["whensharp"] <= 2 * steps
        assert cost["momentum-sam"] == steps
        for method, s in summary.items():
            runs = result["runs"][task][method]
            assert [r["seed"] for r in runs] == [0, 1]
            assert s["test_acc"]["per_seed"] == [r["test_acc"] for r in runs]
            assert all(0 <= a <= 1 for a in s["test_acc"]["per_seed"]), (task, method)
            assert s["wall_time_vs_sgd"]["per_seed"] == pytest.approx(
                [r["seconds"] / b["seconds"] for r, b in zip(runs, result["runs"][task]["sgd"])])
            for ref in ("sgd", "sam"):
                if ref != method:
                    diff = s[f"minus_{ref}"]["test_acc"]
                    assert diff["per_seed"] == pytest.approx(
                        [r["test_acc"] - b["test_acc"] for r, b in zip(runs, result["runs"][task][ref])])
                    assert diff["ci"][0] <= diff["mean"] <= diff["ci"][1]
                    assert "top_hessian_eigenvalue" in s[f"minus_{ref}"]


def test_study_refuses_a_single_seed(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--seeds", "1", "--out", str(tmp_path)])
    assert "at least 2" in capsys.readouterr().err


def test_curvature_is_recorded_every_sam_step_and_is_the_secant_autograd_computes(tmp_path):
    """``--curvature`` on the quick config. Every SAM step's curvature is counted once, per epoch; at each
    check the recorded kappa is autograd's e.(g2 - g1) / |e|^2 (float64) at the weights, e and batch of the
    step that recorded it, and the first-order curvature along that e, e'He / |e|^2, is at most the top
    eigenvalue of the same batch Hessian (a Rayleigh quotient; 2% for the power iteration's shortfall).
    kappa itself is a secant over |e| = rho = 0.3 and has no such bound (see the small-rho test)."""
    pytest.importorskip("sklearn")
    argv = ["--quick", "--curvature", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert "curvature along e" in (tmp_path / "study.md").read_text()
    epochs = result["config"]["epochs"]
    for task in ("digits", "noisy"):
        runs, summary = result["runs"][task], result["summary"][task]
        assert "curvature" not in runs["sgd"][0] and "curvature" not in summary["sgd"]
        # MomentumSAM perturbs along its momentum: telemetry records nothing
        assert all(e["sam_steps"] == 0 for r in runs["momentum-sam"] for e in r["curvature"])
        assert "curvature" not in summary["momentum-sam"]
        steps = summary["sgd"]["gradient_evaluations_per_epoch"]["mean"]
        for method in ("sam", "every-5", "randomly-0.2", "looksam-5", "whensharp"):
            for run in runs[method]:
                sam_steps = round((run["gradient_evaluations_per_epoch"] - steps) * epochs)
                assert sum(e["sam_steps"] for e in run["curvature"]) == sam_steps, (task, method)
                for e in run["curvature"]:  # positive on these tasks early in training
                    assert math.isfinite(e["median"]) and e["median"] > 0, (task, method, e)
                    assert math.isfinite(e["mean"]) and e["mean"] > 0, (task, method, e)
                assert [c["epoch"] for c in run["curvature_checks"]] == [1, 2]
                for check in run["curvature_checks"]:
                    assert check["telemetry_step"] == check["step"]
                    assert check["curvature"] == pytest.approx(check["recomputed"], rel=1e-3, abs=1e-4)
                    top = check["batch_top_eigenvalue"]
                    assert top > 0 and check["rayleigh_quotient"] <= 1.02 * top, (task, method, check)
            by_epoch = summary[method]["curvature"]["by_epoch"]
            assert [e["mean"] for e in by_epoch] == pytest.approx(
                [statistics.fmean(r["curvature"][i]["median"] for r in runs[method]) for i in range(epochs)])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "study_curvature.png").stat().st_size > 0


@pytest.mark.parametrize("task", ["digits", "noisy"])
def test_at_a_small_rho_the_curvature_is_the_hessian_rayleigh_quotient_below_its_top_eigenvalue(task):
    """As rho -> 0 the secant kappa becomes e'He / |e|^2 (H the batch Hessian at w), a Rayleigh quotient:
    at rho = 1e-3 it is within 3% of it and at most the same batch Hessian's top eigenvalue."""
    if task == "digits":
        pytest.importorskip("sklearn")
    cfg = dataclasses.replace(StudyConfig.quick(), rho=1e-3, curvature=True)
    run = Run(TASKS[task](0), "sam", 0, cfg)
    for _ in range(cfg.epochs):
        run.epoch()
    assert len(run.checks) == 2
    for check in run.checks:
        assert check["curvature"] == pytest.approx(check["rayleigh_quotient"], rel=0.03)
        assert 0 < check["curvature"] <= 1.02 * check["batch_top_eigenvalue"]


def _exact_hessian_eigenvalues(model, x, y):
    """Every eigenvalue of the Hessian of the mean cross-entropy, from the full Hessian (torch.func)."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))


@pytest.mark.parametrize("seed", [0, 11])  # seed 11: the eigenvalue of largest magnitude is negative (-2.7)
def test_batch_top_eigenvalue_is_the_most_positive_one(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    eigenvalues = _exact_hessian_eigenvalues(model, x, y)
    if seed == 11:
        assert -eigenvalues[0] > 2 * eigenvalues[-1] > 0
    assert batch_top_eigenvalue(model, x, y, 300, seed=0) == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
