"""Smoke tests of ``fused-sam bench``: it runs end to end on a tiny case, writes its JSON, and every method it
times produces the same weights as classic SAM (so the benchmark never times a broken path)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_sam.bench import cases
from fused_sam.bench.cli import main
from fused_sam.bench.measure import min_bytes_per_param
from fused_sam.bench.methods import OPTIMIZERS, TorchNativeSAM, build, method_names
from fused_sam.bench.report import plot
from fused_sam.bench.runner import Config, run_micro


@pytest.mark.parametrize("name, tensors, numel", [
    ("resnet50", 161, 25_557_032),
    ("vit_b16", 152, 86_567_656),
    ("gpt2", 148, 124_439_808),
    ("single64m", 1, 64 * 2**20),
    ("many_small", 1000, 1_024_000),
])
def test_parameter_sets_match_the_models(name, tensors, numel):
    assert cases.summary(name) == (tensors, numel)


def test_minimum_bytes_model():
    assert min_bytes_per_param("sgd", 4, 4) == 40
    assert min_bytes_per_param("adamw", 4, 4) == 48
    assert min_bytes_per_param("sgd", 2, 4) == 24
    assert min_bytes_per_param("adamw", 2, 4) == 32
    assert min_bytes_per_param("adamw", 2, 2) == 24


def test_default_sets_per_device():
    assert cases.resolve_sets("default", "cpu") == ["resnet50", "many_small", "single16m"]
    assert cases.resolve_sets("all", "cpu") == cases.ALL_SETS
    assert cases.resolve_sets("default", "cpu", quick=True) == ["tiny"]
    with pytest.raises(ValueError):
        cases.resolve_sets("resnet50,nope", "cpu")


def test_triton_interpreter_is_never_timed_on_cpu():
    names = method_names(torch.device("cpu"), torch.float32)
    assert names[:3] == ["classic", "torch-native", "fused:reference"]
    assert "fused:triton" not in names


def expected_bytes(optimizer, dtype, method):
    """The minimum-bytes model of fused_sam/bench/measure.py, written out per case (B/param)."""
    fused_16bit = {"sgd": 24, "adamw": 32}  # bf16 weights, float32 state
    plain = {("sgd", "fp32"): 40, ("adamw", "fp32"): 48, ("sgd", "bf16"): 20, ("adamw", "bf16"): 24}
    if method.endswith("+master"):
        return {"sgd": 30, "adamw": 38}[optimizer]
    base = fused_16bit[optimizer] if dtype == "bf16" and method.startswith("fused:") else plain[(optimizer, dtype)]
    return base + ({"fp32": 4, "bf16": 2}[dtype] if method.endswith("+GradScaler") else 0)


def test_bench_quick_main_writes_json_and_verifies(tmp_path):
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:  # one thread: steadier on a loaded machine; restored for the tests that follow
        rc = main(["--quick", "--out", str(out), "--no-progress", "--dtype", "fp32,bf16", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (out / "results.md").exists()
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] is False
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["cpu_model"]
    rows = data["results"]
    expected = {(o, d, m) for o in ("sgd", "adamw") for d in ("fp32", "bf16")
                for m in method_names(torch.device("cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[d])}
    assert {(r["optimizer"], r["dtype"], r["method"]) for r in rows} == expected
    for r in rows:
        assert r["error"] is None, r
        assert r["verified"], r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["aten_ops"] > 0
        assert r["bytes_per_param"] == expected_bytes(r["optimizer"], r["dtype"], r["method"]), r
    classic = {(r["optimizer"], r["dtype"]): r for r in rows if r["method"] == "classic"}
    for r in rows:
        assert r["speedup_vs_classic"] == pytest.approx(classic[(r["optimizer"], r["dtype"])]["median_ms"] / r["median_ms"])
    e2e = data["e2e"]
    methods = ("plain", "classic", "fused", "fused-every-5", "fused-looksam-5", "fused-msam")
    assert {(r["model"], r["method"]) for r in e2e} == {(m, k) for m in ("cnn", "gpt") for k in methods}
    assert all(r["error"] is None and r["finite"] and r["steps_per_s"] > 0 for r in e2e)
    assert data["copy_bandwidth"]["gbps"] > 0


def test_bench_quick_module_subprocess(tmp_path):
    out = tmp_path / "sub"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fused_sam", "bench", "--quick", "--no-e2e", "--optimizer", "sgd", "--no-plot",
         "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verified" in proc.stdout and "classic" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["results"] and all(r["verified"] for r in data["results"])


class _NoRestore(TorchNativeSAM):
    """A broken SAM: it never restores w, so it takes the base step from w + e."""

    def second_step(self):
        self.base_optimizer.step()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verification_catches_a_broken_method(dtype):
    cfg = Config(device=torch.device("cpu"), sets=["tiny"], optimizers=["sgd"], dtypes=[dtype], warmup=1,
                 repeats=2, methods=["classic", "fused:reference"], flush=False,
                 extra_methods={"broken": lambda params, opt: _NoRestore(params, torch.optim.SGD, **OPTIMIZERS["sgd"][1])})
    rows = {r["method"]: r for r in run_micro(cfg)["rows"]}
    assert rows["classic"]["verified"] and rows["fused:reference"]["verified"]
    assert not rows["broken"]["verified"] and rows["broken"]["max_err_over_tol"] > 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_methods_agree_step_by_step(optimizer):
    torch.manual_seed(0)
    shapes = cases.shapes("tiny")
    w0 = [torch.randn(s) * 0.02 for s in shapes]
    g0 = [torch.randn(s) * 0.01 for s in shapes]
    finals = {}
    for name in method_names(torch.device("cpu"), torch.float32):
        params = [w.clone().requires_grad_(True) for w in w0]
        for p, g in zip(params, g0):
            p.grad = g.clone()
        m = build(name, params, optimizer)
        for _ in range(3):
            m.first_step()
            m.second_step()
        finals[name] = torch.cat([p.detach().reshape(-1) for p in params])
    for name, final in finals.items():
        torch.testing.assert_close(final, finals["classic"], rtol=1e-5, atol=1e-7, msg=name)


def test_plot_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    msg = plot(str(tmp_path / "x.png"), {"rows": [], "copy": {}}, {})
    assert "matplotlib" in msg and not (tmp_path / "x.png").exists()
