"""The demo (`fused-sam demo`): runs end to end, and the measured directions are the ones the paper predicts.

One `fused-sam demo all --quick` run (fixed seed) is shared by the tests below; each asserts one direction on
its JSON. A direction that fails here is a finding to report, not a threshold to loosen.
"""
import builtins
import json
import os

import pytest
import torch

from fused_sam.demo import cli, kernel


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's models are tiny: one thread is fastest, and much faster on a busy machine (the CLI does this)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        assert cli.main(["all", "--quick", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out / "demo.json") as fh:
        return out, json.load(fh)


def test_cli_writes_json_and_plots(quick_run):
    out, result = quick_run
    assert result["quick"] is True and {"kernel", "mlp"} <= set(result)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed")
    for name in ("kernel_bias_variance.png", "kernel_normalized_and_budget.png", "mlp_accuracy_sharpness.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_usam_bias_lower_and_variance_higher_at_every_iteration(quick_run):
    c = quick_run[1]["kernel"]["curves"]
    T = quick_run[1]["kernel"]["config"]["iters"]
    gd, usam = c["gd"], c["usam"]
    assert len(usam["bias2"]) == T + 1
    for t in range(T + 1):
        assert usam["bias2"][t] <= gd["bias2"][t] + 1e-12, t
        assert usam["variance"][t] >= gd["variance"][t] - 1e-12, t
    # and strictly so once training has started
    assert usam["bias2"][5] < 0.9 * gd["bias2"][5]
    assert usam["variance"][5] > 1.1 * gd["variance"][5]


def test_kernel_usam_wins_when_stopped_early(quick_run):
    s = quick_run[1]["kernel"]["summary"]
    assert s["early_stop_iteration"] == 10
    assert s["risk_at_early_stop"]["usam"] < 0.85 * s["risk_at_early_stop"]["gd"]


def test_kernel_fused_sam_matches_closed_form(quick_run):
    """FusedSAM's USAM (and SGD's GD) follow the closed-form kernel-gradient-descent recursion on alpha."""
    r = quick_run[1]["kernel"]
    for m in ("gd", "usam"):
        measured, exact = r["curves"][m], r["exact"][m]
        for b, e in zip(measured["bias2"], exact["bias2"]):  # antithetic draws: the bias is exact
            assert b == pytest.approx(e, rel=1e-8, abs=1e-12)
        T = r["config"]["iters"]
        # the variance is a Monte Carlo estimate over the draws
        assert measured["variance"][T] == pytest.approx(exact["variance"][T], rel=0.2)


@pytest.mark.parametrize("rho", [0.0, 10.0])
def test_kernel_features_reproduce_kernel_gradient_descent(rho):
    """FusedSAM(normalize=False) on the feature-space weights (rho=0: GD) gives the predictions of
    alpha <- alpha - eta (I + rho K/n)(K alpha - y)/n with the full kernel matrix, for every noise draw."""
    cfg = kernel.KernelConfig(draws=4, draws_normalized=2)
    prob = kernel.make_problem(cfg, seed=3)
    K, n, y = prob["K"], cfg.n, prob["y"]
    K_test = kernel.rbf(prob["x_test"], prob["x"], cfg.length_scale)
    w = torch.zeros(y.shape[0], prob["phi"].shape[1], dtype=kernel.DTYPE, requires_grad=True)
    opt = kernel.FusedSAM([w], torch.optim.SGD, rho=rho, normalize=False, lr=cfg.lr)
    alpha = torch.zeros(y.shape[0], n, dtype=kernel.DTYPE)
    step = torch.eye(n, dtype=kernel.DTYPE) + rho * K / n

    def closure():
        opt.zero_grad()
        loss = kernel._loss(w, prob["phi"], y)
        loss.backward()
        return loss

    for _ in range(60):
        closure()
        opt.step(closure)
        alpha = alpha - cfg.lr * ((alpha @ K - y) / n) @ step
        with torch.no_grad():
            torch.testing.assert_close(w @ prob["phi_test"].T, alpha @ K_test.T, rtol=0, atol=1e-9)


def test_mlp_sam_beats_sgd_on_noisy_labels(quick_run):
    s = quick_run[1]["mlp"]["summary"]
    assert s["sam"]["final_test_acc"]["mean"] > s["sgd"]["final_test_acc"]["mean"] + 0.02
    assert s["sam_final_acc_above_sgd_every_seed"]


def test_mlp_sam_is_flatter(quick_run):
    s = quick_run[1]["mlp"]["summary"]
    assert s["sam"]["top_hessian_eigenvalue"]["mean"] < s["sgd"]["top_hessian_eigenvalue"]["mean"]
    assert s["sam_sharpness_below_sgd_every_seed"]


def test_cli_without_matplotlib_prints_the_table_and_skips_plots(tmp_path, monkeypatch, capsys):
    tiny = kernel.KernelConfig(iters=20, draws=8, draws_normalized=2)
    monkeypatch.setattr(kernel.KernelConfig, "quick", classmethod(lambda cls: tiny))
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    threads = torch.get_num_threads()
    try:
        assert cli.main(["kernel", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Kernel regression" in printed and "USAM" in printed
    assert "plots: skipped (matplotlib is not installed" in printed
    assert json.loads((tmp_path / "demo.json").read_text())["kernel"]["config"]["iters"] == 20
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]


def test_fused_sam_dispatches_demo(tmp_path, monkeypatch):
    from fused_sam import cli as top

    seen = {}
    monkeypatch.setattr(cli, "main", lambda argv: seen.setdefault("argv", argv) and 0)
    assert top.main(["demo", "kernel", "--quick"]) == 0
    assert seen["argv"] == ["kernel", "--quick"]
