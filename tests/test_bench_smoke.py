"""Smoke tests of ``fused-sam bench``: it runs end to end on a tiny case, writes its JSON, every method it
times produces the same weights as classic SAM (so the benchmark never times a broken path), and a timing
that cannot be true, or that varies too much from round to round, is flagged in the table and the JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fused_sam.bench import cases, e2e, runner
from fused_sam.bench.cli import main
from fused_sam.bench.measure import NOISE_THRESHOLD, min_bytes_per_param, round_order, row_flags, summarize
from fused_sam.bench.methods import OPTIMIZERS, TorchNativeSAM, build, method_names
from fused_sam.bench.report import e2e_table, plot, provenance, ratio
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
    assert min_bytes_per_param("sgd", 4, 4, inf_check=True) == 44
    assert min_bytes_per_param("adamw", 2, 4, inf_check=True, master=True) == 40


def test_default_sets_per_device():
    assert cases.resolve_sets("default", "cpu") == ["resnet50", "many_small"]
    assert cases.resolve_sets("default", "cuda") == ["resnet50", "gpt2", "many_small"]
    assert cases.resolve_sets("default", "cpu", full=True) == ["resnet50", "many_small", "single16m"]
    assert cases.resolve_sets("default", "cuda", full=True) == cases.ALL_SETS
    assert cases.resolve_sets("all", "cpu") == cases.ALL_SETS
    assert cases.resolve_sets("default", "cpu", quick=True) == ["tiny"]
    with pytest.raises(ValueError):
        cases.resolve_sets("resnet50,nope", "cpu")


def test_triton_interpreter_is_never_timed_on_cpu():
    names = method_names(torch.device("cpu"), torch.float32)
    assert names[:2] == ["classic", "torch-native"] and "fused:reference" in names
    assert "fused:triton" not in names


def expected_bytes(optimizer, dtype, method):
    """The minimum-bytes model of fused_sam/bench/measure.py, written out per case (B/param). Every fused
    method reads the gradients once more to decide whether to skip its update (the skip_nonfinite guard, or
    GradScaler's inf check); classic and torch-native check nothing."""
    fused_16bit = {"sgd": 24, "adamw": 32}  # bf16 weights, float32 state
    plain = {("sgd", "fp32"): 40, ("adamw", "fp32"): 48, ("sgd", "bf16"): 20, ("adamw", "bf16"): 24}
    check = {"fp32": 4, "bf16": 2}[dtype] if method.startswith("fused:") else 0
    if method.endswith("+master"):
        return {"sgd": 30, "adamw": 38}[optimizer] + check
    base = fused_16bit[optimizer] if dtype == "bf16" and method.startswith("fused:") else plain[(optimizer, dtype)]
    return base + check


def test_bench_quick_full_main_writes_json_and_verifies(tmp_path):
    """--quick --full: every method and every end-to-end method, on the tiny set and models."""
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:  # one thread: steadier on a loaded machine; restored for the tests that follow
        rc = main(["--quick", "--full", "--out", str(out), "--no-progress", "--dtype", "fp32,bf16", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (out / "results.md").exists()
    data = json.loads((out / "results.json").read_text())
    assert data["partial"] is False
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and env["cpu_model"]
    assert env["torch_threads"] == 1 and data["config"]["threads"] == 1 and env["cores_available"] >= 1
    assert len(env["load_average_before"]) == 3 and len(env["load_average_after"]) == 3
    assert data["config"]["rounds"] == 3 and data["config"]["noise_threshold"] == NOISE_THRESHOLD
    rows = data["results"]
    expected = {(o, d, m) for o in ("sgd", "adamw") for d in ("fp32", "bf16")
                for m in method_names(torch.device("cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[d])}
    assert {(r["optimizer"], r["dtype"], r["method"]) for r in rows} == expected
    for r in rows:
        assert r["error"] is None, r
        assert r["verified"], r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["aten_ops"] > 0
        assert len(r["rounds_ms"]) == 3 and isinstance(r["flags"], list)
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["bytes_per_param"] == expected_bytes(r["optimizer"], r["dtype"], r["method"]), r
    classic = {(r["optimizer"], r["dtype"]): r for r in rows if r["method"] == "classic"}
    for r in rows:
        assert r["speedup_vs_classic"] == pytest.approx(classic[(r["optimizer"], r["dtype"])]["median_ms"] / r["median_ms"])
    e2e = data["e2e"]
    methods = ("plain", "classic", "fused", "fused-every-5", "fused-looksam-5", "fused-msam")
    assert {(r["model"], r["method"]) for r in e2e} == {(m, k) for m in ("cnn", "gpt") for k in methods}
    for r in e2e:
        assert r["error"] is None and r["finite"] and r["steps_per_s"] > 0 and len(r["rounds_ms"]) == 3, r
    copy = data["copy_bandwidth"]
    assert copy["gbps_min"] <= copy["gbps"] <= copy["gbps_max"] and len(copy["cases"]) == 4
    for case in copy["cases"]:  # the bandwidth is also timed between the rounds, not only around them
        assert len(case["gbps_rounds"]) == 3 and "after each of its 3 rounds" in case["how"], case


def test_bench_quick_module_subprocess(tmp_path):
    """`python -m fused_sam bench --quick`: the default three methods on the tiny set; the headline table
    (within 100 columns) says every case verified."""
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "fused_sam", "bench", "--quick", "--no-e2e", "--optimizer", "sgd", "--no-plot",
         "--no-progress", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "results.json").read_text())
    auto = data["auto_backend"]["fp32"]
    assert [r["method"] for r in data["results"]] == ["classic", "torch-native", f"fused:{auto}"]
    assert all(r["verified"] for r in data["results"])
    table = proc.stdout[proc.stdout.index("SAM optimizer step"):proc.stdout.index("wrote ")]
    assert all(len(line) <= 100 for line in table.splitlines()), table
    header = next(line for line in table.splitlines() if line.startswith("set "))
    (row,) = [line for line in table.splitlines() if line.startswith("tiny ")]
    assert row[header.index("verified"):].split()[0] == "yes", table
    assert f"fused: fused:{auto} (the backend auto picks here)" in table


@pytest.mark.parametrize("grid", ["default", "full"])
def test_bench_default_and_full_grids_verify_on_the_tiny_set(tmp_path, grid):
    """The default grid (three methods) and --full's (every method) without --quick's settings, on the
    tiny set: every row verified, the headline says so, and results.md carries every method's row."""
    out = tmp_path / grid
    threads = torch.get_num_threads()
    try:
        rc = main(["--sets", "tiny", "--no-e2e", "--rounds", "2", "--no-progress", "--threads", "1", "--out",
                   str(out)] + (["--full"] if grid == "full" else []))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    expected = method_names(torch.device("cpu"), torch.float32)
    if grid == "default":
        expected = ["classic", "torch-native", f"fused:{data['auto_backend']['fp32']}"]
    for optimizer in ("sgd", "adamw"):
        assert [r["method"] for r in data["results"] if r["optimizer"] == optimizer] == expected
    assert all(r["verified"] for r in data["results"])
    md = (out / "results.md").read_text()
    assert md.count("| tiny |") == 2 * len(expected)
    assert "commit " in md or "(installed, not a git checkout)" in md


def test_a_noisy_denominator_gives_a_range_not_a_bare_ratio(tmp_path, monkeypatch, capsys):
    """classic's rounds timed at 50, 500, 100, 1000 and 200 ms, the fused step's at 1 ms: the median ratio
    (200x) would be a number the noise made; the table prints what is known, the quartiles' ratios."""
    names, rounds = {}, {}
    real_start = runner.start

    def start(name, *args, **kwargs):
        run = real_start(name, *args, **kwargs)
        names[run.step] = name
        return run

    def fake_time_steps(step, device, repeats, flush=None):
        for _ in range(repeats):  # the steps still run, so the final weights still verify
            step()
        name = names[step]
        rounds[name] = rounds.get(name, -1) + 1
        seconds = [0.05, 0.5, 0.1, 1.0, 0.2][rounds[name]] if name == "classic" else 0.001
        return [seconds] * repeats

    monkeypatch.setattr(runner, "start", start)
    monkeypatch.setattr(runner, "time_steps", fake_time_steps)
    out = tmp_path / "noisy"
    threads = torch.get_num_threads()
    try:
        main(["--quick", "--no-e2e", "--optimizer", "sgd", "--methods", "classic,fused:reference", "--rounds", "5",
              "--no-plot", "--no-progress", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    (row,) = [line for line in text.splitlines() if line.startswith("tiny ")]
    assert "100-500x" in row.split() and "200x" not in text, text
    assert row.split()[3] == "200[1]"  # classic's time, marked: its note says why
    assert "[1] tiny sgd fp32 classic: noisy: IQR/median 2.000 > 0.1" in text
    md_row = next(line for line in (out / "results.md").read_text().splitlines() if "fused:reference" in line)
    assert "| 100-500x |" in md_row and "200x" not in md_row


def test_ratio_is_a_number_only_when_both_times_are_steady():
    steady = dict(median_ms=2.0, q1_ms=1.98, q3_ms=2.02, spread=0.02)
    fast = dict(median_ms=0.5, q1_ms=0.49, q3_ms=0.51, spread=0.04)
    assert ratio(steady, fast, 0.1)["text"] == "4.00x" and not ratio(steady, fast, 0.1)["noisy"]
    noisy_fast = dict(fast, q1_ms=0.25, q3_ms=1.0, spread=1.5)
    assert ratio(steady, noisy_fast, 0.1) == dict(value=4.0, noisy=True, low=1.98, high=2.02 / 0.25,
                                                  text="1.98-8.08x")
    assert ratio(steady, dict(fast, error="boom"), 0.1) is None and ratio(None, fast, 0.1) is None


def test_results_md_names_the_commit_or_else_the_version():
    env = {"git_commit": None, "fused_sam": "9.9.9"}
    assert provenance(env) == "fused_sam 9.9.9 (installed, not a git checkout)"
    assert provenance(dict(env, git_commit="abc123")) == "fused_sam commit abc123"


def test_pytest_benchmark_suites_run(tmp_path):
    """The pytest-benchmark suites in bench/ (docs/bench.md) on tiny sets: every method's step verifies
    against classic SAM and records its bytes model; the end-to-end suite runs too."""
    repo = Path(__file__).resolve().parent.parent
    report = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(repo / "bench"), "--benchmark-only", "--sam-quick", "-q",
         "-p", "no:cacheprovider", f"--benchmark-json={report}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = [b for b in json.loads(report.read_text())["benchmarks"] if b["name"].startswith("test_sam_step")]
    assert steps and all(b["extra_info"]["bytes_per_param"] > 0 for b in steps)
    fused = [b for b in steps if "fused:" in b["name"]]
    classic = [b for b in steps if "classic" in b["name"]]
    assert fused and classic
    # a fused step also reads the gradients to decide on skipping; classic SAM does not
    assert min(b["extra_info"]["bytes_per_param"] for b in fused if "fp32" in b["name"] and "sgd" in b["name"]) == 44
    assert {b["extra_info"]["bytes_per_param"] for b in classic if "fp32" in b["name"] and "sgd" in b["name"]} == {40}


class _NoRestore(TorchNativeSAM):
    """A broken SAM: it never restores w, so it takes the base step from w + e."""

    def second_step(self):
        self.base_optimizer.step()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_verification_catches_a_broken_method(dtype):
    cfg = Config(device=torch.device("cpu"), sets=["tiny"], optimizers=["sgd"], dtypes=[dtype], warmup=1,
                 repeats=1, rounds=2, methods=["classic", "fused:reference"], flush=False,
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


def test_impossible_timing_is_flagged_in_table_and_json(tmp_path, monkeypatch, capsys):
    """Every SAM step timed at 1 ns: far faster than the bytes it must move allow, at any copy bandwidth."""
    def one_nanosecond(step, device, repeats, flush=None):
        for _ in range(repeats):  # the steps still run, so the final weights still verify
            step()
        return [1e-9] * repeats

    monkeypatch.setattr(runner, "time_steps", one_nanosecond)
    out = tmp_path / "impossible"
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--no-e2e", "--optimizer", "sgd", "--methods", "classic,fused:reference", "--no-plot",
                   "--no-progress", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0  # flagged, reported, not fatal
    text = capsys.readouterr().out
    (row,) = [line for line in text.splitlines() if line.startswith("tiny ")]
    assert row.split()[2].endswith("[1]") and row.split()[3].endswith("[2]")  # fused's time, classic's
    data = json.loads((out / "results.json").read_text())
    stream = data["copy_bandwidth"]["stream"]
    assert f"[1] tiny sgd fp32 fused:reference: impossible: faster than the memory allows, its bytes at " in text
    assert f"[2] tiny sgd fp32 classic: impossible: faster than the memory allows" in text
    rows = data["results"]
    assert len(rows) == 2
    for r in rows:
        assert r["verified"] and r["pct_of_copy"] > 100
        (flag,) = r["flags"]
        assert flag.startswith(f"impossible: faster than the memory allows, its bytes at {r['pct_of_copy']:.0f}% "
                               f"of the {stream} bandwidth (the {stream}'s fastest passes: ")
    assert "impossible:" in (out / "results.md").read_text()


def test_sam_faster_than_the_plain_step_is_flagged(monkeypatch):
    """End to end, a SAM step timed at 0.13x the plain step is impossible; momentum-SAM (one forward and
    backward per step, like plain) is not held to that."""
    seconds = {"plain": 1.0, "fused-msam": 0.9}
    last = []  # the time the fake step of the method just run "took"

    def fake_prepare(kind, method, device, quick, warmup):
        return e2e.Trainer(lambda: last.append(seconds.get(method, 0.13)), 1, 100, "fake", lambda: 1.0)

    def fake_time_steps(sample, device, repeats):
        sample()
        return [last[-1]] * repeats

    monkeypatch.setattr(e2e, "prepare", fake_prepare)
    monkeypatch.setattr(e2e, "time_steps", fake_time_steps)
    rows = {r["method"]: r for r in e2e.run_e2e(torch.device("cpu"), warmup=0, repeats=1, rounds=3, quick=True,
                                                models=["cnn"])}
    assert rows["plain"]["flags"] == [] and rows["fused-msam"]["flags"] == []
    assert rows["classic"]["x_plain"] == pytest.approx(0.13)
    assert rows["classic"]["flags"] == ["impossible: SAM step 0.13x a plain step, whose work it all does too"]
    assert rows["fused-every-5"]["flags"] == rows["classic"]["flags"]
    text = e2e_table(list(rows.values()))
    (row,) = [line for line in text.splitlines() if line.startswith("cnn") and " classic " in line]
    assert row.split()[-2:] == ["0.130x", "[1]"]
    assert "[1] cnn classic: impossible: SAM step 0.13x a plain step" in text


def test_a_large_spread_over_rounds_is_flagged_noisy():
    stats = summarize([0.010, 0.010, 0.020, 0.011, 0.030])  # seconds per step, one value per round
    assert stats["median_ms"] == pytest.approx(11.0) and stats["spread"] == pytest.approx(10 / 11)
    assert row_flags(stats) == ["noisy: IQR/median 0.909 > 0.1"]
    assert row_flags(stats, threshold=1.0) == []


def test_a_clean_sample_gets_no_flag():
    stats = summarize([0.0100, 0.0101, 0.0099, 0.0100, 0.0102])
    assert stats["spread"] < NOISE_THRESHOLD
    assert row_flags(stats, pct_of_copy=85.0, x_plain=2.05) == []
    assert row_flags(stats, pct_of_copy=101.0) == [
        "impossible: faster than the memory allows, its bytes at 101% of the copy bandwidth (the copy's fastest "
        "passes: 100%)"]


def test_a_step_within_the_spread_of_the_copy_passes_is_not_impossible():
    """A step at the memory limit lands within the copy passes' own spread: over their median but not past
    their fastest quarter is believable; past it is not."""
    from fused_sam.bench import measure

    stats = summarize([0.0100, 0.0101, 0.0099, 0.0100, 0.0102])
    assert row_flags(stats, pct_of_copy=103.0, copy_limit_pct=108.0) == []
    assert row_flags(stats, pct_of_copy=109.0, copy_limit_pct=108.0) == [
        "impossible: faster than the memory allows, its bytes at 109% of the copy bandwidth (the copy's fastest "
        "passes: 108%)"]
    meter = measure.CopyMeter(torch.device("cpu"), nbytes=2**20, repeats=3)
    # 11 passes; sorted: 1.0 1.2 1.5 2.0 2.0 2.0 2.0 2.5 2.8 3.0 3.0: median 2.0, first quartile halfway
    # between the 3rd and 4th (1.75 s)
    window = meter.window([1.0, 1.5, 2.0, 2.0], [2.0, 2.5, 3.0, 3.0], [[1.2, 2.0, 2.8]])
    assert window["gbps"] == pytest.approx(meter.gbps(2.0))
    assert window["gbps_fast"] == pytest.approx(meter.gbps(1.75))


def test_round_order_moves_every_method():
    names = ["a", "b", "c", "d"]
    orders = [round_order(names, r) for r in range(4)]
    assert all(sorted(o) == names for o in orders)
    assert {o[0] for o in orders} == set(names)  # each method leads a round
    predecessors = {(o[i - 1], o[i]) for o in orders for i in range(1, len(o))}
    assert ("a", "b") in predecessors and ("c", "b") in predecessors  # b does not always follow a


@pytest.mark.parametrize("slow", ["copy", "in-place add"])
def test_memory_meter_takes_the_faster_stream_and_counts_its_bytes(monkeypatch, slow):
    """The reference "% copy" divides by is the faster of a copy and an in-place add (a CPU copy pays an
    uncounted read for ownership): slow one down and the meter must take the other, and count its bytes."""
    import time

    from fused_sam.bench import measure

    op, factor = measure.STREAMS[slow]
    monkeypatch.setitem(measure.STREAMS, slow, (lambda dst, src: (time.sleep(0.01), op(dst, src)), factor))
    meter = measure.CopyMeter(torch.device("cpu"), nbytes=2**20, repeats=3)
    other = next(name for name in measure.STREAMS if name != slow)
    assert meter.stream == other and meter.probe[other] > meter.probe[slow]
    assert meter.gbps(1.0) == pytest.approx(measure.STREAMS[other][1] * 2**20 / 1e9)
    window = meter.window(meter.sample(), meter.sample(), [meter.round_sample(), meter.round_sample()])
    assert window["stream"] == other and other in window["how"] and len(window["gbps_rounds"]) == 2


def test_memory_window_pools_the_passes_of_the_whole_case():
    """A case's bandwidth is the median over every pass timed before, between the rounds and after: seven
    rounds' passes at half the time do not outvote the 40 around the case, and each part keeps its own."""
    from fused_sam.bench import measure

    meter = measure.CopyMeter(torch.device("cpu"), nbytes=2**20, repeats=3)
    window = meter.window([2.0] * 20, [2.0] * 20, [[1.0] * 3] * 7)
    assert window["gbps"] == pytest.approx(meter.gbps(2.0))
    assert window["gbps_rounds"] == [pytest.approx(meter.gbps(1.0))] * 7
    assert window["gbps_before"] == window["gbps_after"] == pytest.approx(meter.gbps(2.0))
    assert "20 passes before the case, 3 after each of its 7 rounds and 20 after it" in window["how"]
    assert meter.window([1.0] * 3, [3.0] * 3, [[2.0] * 3] * 3)["gbps"] == pytest.approx(meter.gbps(2.0))
