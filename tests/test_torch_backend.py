"""The torch backend (fused_sam/backends/torch_ops.py: stock torch ops, chunked and in place), the CPU
fallback when fused_sam._C is not built: parity with the reference backend operation by operation (every
dtype, master weights, chunk boundaries), master-weight roundings bit for bit, lr and rho on the device,
thread-count-independent norm partials, skipped updates that keep non-finite state bit for bit,
optimizer-level parity with the reference (plain and under a GradScaler with overflows), and that ``auto``
picks it on CPU when the native backend is unavailable. Speed: bench/cpu_fallback.py.
"""
from __future__ import annotations

import pytest
import torch

from fused_sam.selfcheck import (
    as_bits,
    PERTURBATIONS,
    UPDATES,
    check_all_ops,
    check_device_hyperparameters,
    check_master_roundings,
    check_perturb,
    check_restore_and_update,
    check_sq_norm,
    clone_span,
    make_span,
    norm_partials_for,
    step_scalars,
)
from models import mlp
from fused_sam import FusedSAM, available_backends
from fused_sam.backends import native as native_module
from fused_sam.backends import resolve_backend
from fused_sam.backends.torch_ops import CPU_CHUNK, CPU_CHUNK_ONE_THREAD, GPU_CHUNK, NORM_CHUNK, NORM_ROW, TorchBackend

CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
IDS = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
# A small chunk, so that the harness's sizes span many chunks and end in a partial one, cheaply.
SMALL_CHUNK = 8 * NORM_ROW
SMALL = TorchBackend(chunk_numel=SMALL_CHUNK)
DEFAULT = TorchBackend()
# The device path, as other devices take it (no host read: a bitwise select for the skip, the chained formulas
# for the update): on a CPU the scalars are read on the host and torch's fused CPU ops run.
SELECT = TorchBackend(chunk_numel=SMALL_CHUNK, host_scalars=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Single-threaded, as the other backend tests (steadier on a busy machine); the determinism test
    switches thread counts itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- parity with the reference backend, operation by operation -------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("numel", [1, 7, 4097, 100_003])
def test_ops_match_reference(numel, dtype):
    """Sizes below, at and across the small chunk (4097 = one chunk and a bit; 100_003 = 24 chunks and a
    partial one); the default chunk for the smaller ones (one partial chunk)."""
    check_all_ops(SMALL, numel, dtype, CPU, seed=numel % 97)
    check_all_ops(SELECT, numel, dtype, CPU, seed=numel % 83)
    if numel < 10_000:
        check_all_ops(DEFAULT, numel, dtype, CPU, seed=numel % 89)


@pytest.mark.parametrize("threads", [1, 2])
def test_default_chunks(threads):
    """Spans of two default chunks and a bit, of the elementwise ops (the chunk depends on the thread count)
    and of the norm; the full grid runs on the small chunk above, through the same code."""
    torch.set_num_threads(threads)
    chunk = DEFAULT.chunk_numel(CPU)
    assert chunk == (CPU_CHUNK_ONE_THREAD if threads == 1 else CPU_CHUNK)
    numel = 2 * max(chunk, NORM_CHUNK) + 3 * NORM_ROW + 5
    span = make_span(numel, torch.float32, CPU, seed=3)
    check_sq_norm(DEFAULT, span, PERTURBATIONS[1])
    check_perturb(DEFAULT, span, PERTURBATIONS[1], norm_partials_for(span, PERTURBATIONS[1]))
    for update in (UPDATES[1], UPDATES[5]):
        span = make_span(numel, torch.float32, CPU, update, seed=4)
        check_restore_and_update(DEFAULT, span, update, step_scalars(CPU, 3, 1024.0, 0.0))


def test_two_threads_with_master_weights():
    """2 torch threads, bf16 with float32 masters: each op on a chunk of more than torch's grain size (32768)
    is split between them. (A few operations only: every op waits for both threads, slow on a busy machine.)"""
    torch.set_num_threads(2)
    span = make_span(100_003, torch.bfloat16, CPU, seed=8, master=True)
    check_sq_norm(DEFAULT, span, PERTURBATIONS[1])
    check_perturb(DEFAULT, span, PERTURBATIONS[1], norm_partials_for(span, PERTURBATIONS[1]), 1024.0)
    for update in (UPDATES[3], UPDATES[7]):
        span = make_span(100_003, torch.bfloat16, CPU, update, seed=9, master=True)
        check_restore_and_update(DEFAULT, span, update, step_scalars(CPU, 0, 1024.0, 0.0))


def test_chunk_sizes(monkeypatch):
    for threads, chunk in ((1, CPU_CHUNK_ONE_THREAD), (2, CPU_CHUNK), (64, CPU_CHUNK)):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert DEFAULT.chunk_numel(CPU) == chunk and DEFAULT.norm_chunk_numel(CPU) == NORM_CHUNK
    meta = torch.device("meta")
    assert DEFAULT.chunk_numel(meta) == DEFAULT.norm_chunk_numel(meta) == GPU_CHUNK
    assert SMALL.chunk_numel(CPU) == SMALL.norm_chunk_numel(CPU) == SMALL_CHUNK
    assert SMALL.partials_len(make_span(SMALL_CHUNK + 1, torch.float32, CPU)) == 2
    for chunk in (CPU_CHUNK, CPU_CHUNK_ONE_THREAD, NORM_CHUNK, GPU_CHUNK):
        assert chunk % NORM_ROW == 0 and chunk // NORM_ROW < 32768


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS.get)
@pytest.mark.parametrize("numel", [7, 2 * SMALL_CHUNK + 3])
def test_master_weight_spans_match_reference(numel, dtype):
    check_all_ops(SMALL, numel, dtype, CPU, seed=numel, master=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=IDS.get)
def test_master_roundings_bitwise(dtype):
    check_master_roundings(SMALL, CPU, dtype)
    check_master_roundings(DEFAULT, CPU, dtype)


@pytest.mark.parametrize("dtype, master", [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                                           (torch.bfloat16, True), (torch.float16, True)],
                         ids=["fp64", "fp32", "bf16", "bf16-master", "fp16-master"])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise(dtype, master):
    check_device_hyperparameters(SMALL, 2 * SMALL_CHUNK + 5, dtype, CPU, master=master)


@pytest.mark.parametrize("update", UPDATES, ids=str)
@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_skipped_update_keeps_nonfinite_state_bitwise(update, master):
    """found_inf skips: w is the restore point and the state keeps its bits even when it holds NaN, inf and
    -0.0 and the gradients are non-finite (a select, not arithmetic)."""
    span = make_span(3 * SMALL_CHUNK + 1, torch.bfloat16 if master else torch.float32, CPU, update, seed=11,
                     master=master)
    if span.backup is not None:
        span.backup.copy_(span.weights)
    span.grads[::5] = float("inf")
    span.grads[1::7] = float("nan")
    for buf in span.state.values():
        buf[::3] = float("nan")
        buf[1::3] = -0.0
        buf[2::9] = float("-inf")
    before = clone_span(span)
    span.weights.fill_(float("nan"))
    SMALL.restore_and_update(span, update, step_scalars(CPU, 3, 1024.0, 1.0))

    expected = before.master.to(span.weights.dtype) if master else before.backup
    assert torch.equal(as_bits(span.weights), as_bits(expected))
    if master:
        assert torch.equal(as_bits(span.master), as_bits(before.master))
    for name, buf in before.state.items():
        assert torch.equal(as_bits(span.state[name]), as_bits(buf)), name


def test_scratch_serves_spans_of_any_size_in_turn():
    """The scratch cache grows and is reused across spans of different sizes and dtypes."""
    backend = TorchBackend(chunk_numel=SMALL_CHUNK)
    for numel, dtype in [(5, torch.float32), (3 * SMALL_CHUNK + 1, torch.float32), (9, torch.float32),
                         (SMALL_CHUNK, torch.bfloat16), (2 * SMALL_CHUNK - 1, torch.float64), (3, torch.float64)]:
        check_all_ops(backend, numel, dtype, CPU, seed=numel)


def test_chunk_size_is_checked():
    with pytest.raises(ValueError, match="multiple"):
        TorchBackend(chunk_numel=1000)


# --- the squared norm: deterministic, whatever the thread count -------------------------------------------


@pytest.mark.parametrize("perturbation", PERTURBATIONS[:2], ids=["sam", "asam"])
def test_norm_partials_independent_of_thread_count(perturbation):
    span = make_span(3 * NORM_CHUNK + 12_345, torch.float32, CPU, seed=1)
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        out = torch.empty(DEFAULT.partials_len(span))
        DEFAULT.sq_norm_partials(span, perturbation, out)
        results.append(out)
    assert len(results[0]) == 4
    for out in results[1:]:
        assert torch.equal(out, results[0])


# --- optimizer level ------------------------------------------------------------------------------------

TWIN_CASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4), {}),
    "sgd-nesterov-asam": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), dict(adaptive=True, rho=0.5)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2), {}),
    "adam-amsgrad-maximize": (torch.optim.Adam, dict(lr=1e-3, amsgrad=True, maximize=True, weight_decay=1e-3), {}),
}


@pytest.mark.parametrize("case", list(TWIN_CASES))
def test_twin_models_match_the_reference_backend(case):
    """Two copies of a model, one per backend, trained side by side for a few SAM steps: weights and
    optimizer state agree to float32 rounding."""
    base, kwargs, sam = TWIN_CASES[case]
    models = {"torch": mlp(), "reference": mlp()}  # the same seed: the same weights
    opts = {name: FusedSAM(m.parameters(), base, backend=name, **{"rho": 0.05, **sam}, **kwargs)
            for name, m in models.items()}
    assert set(opts["torch"].backends.values()) == {"torch"}
    data = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 10, generator=data), torch.randn(16, 3, generator=data)
        for name, model in models.items():
            def loss():
                return torch.nn.functional.mse_loss(model(x), y)
            loss().backward()
            opts[name].first_step(zero_grad=True)
            loss().backward()
            opts[name].second_step(zero_grad=True)
    for p, q in zip(models["torch"].parameters(), models["reference"].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state_t, state_r = opts["torch"].state_dict()["state"], opts["reference"].state_dict()["state"]
    assert state_t.keys() == state_r.keys()
    for i in state_t:
        for name, value in state_t[i].items():
            torch.testing.assert_close(value, state_r[i][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("base, kwargs", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
                                          (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2))], ids=["sgd", "adamw"])
def test_twin_models_under_a_grad_scaler_match_the_reference_backend(base, kwargs):
    """The mixed-precision loop (scaled backward, first_step(grad_scaler=), scaler.step, scaler.update) with
    infs injected into the first pass, the second, and both: the same weights, state and scales as the
    reference backend's run."""
    overflows = {1: (True, True), 3: (True, False), 4: (False, True)}
    runs = {}
    for backend in ("torch", "reference"):
        model = mlp()
        opt = FusedSAM(model.parameters(), base, rho=0.1, backend=backend, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        data = torch.Generator().manual_seed(2)
        scales = []
        for step in range(6):
            x, y = torch.randn(8, 10, generator=data), torch.randint(0, 3, (8,), generator=data)
            for inf_here, call in zip(overflows.get(step, (False, False)), ("first", "second")):
                scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
                if inf_here:
                    model[0].weight.grad[1, 2] = float("inf")
                if call == "first":
                    opt.first_step(zero_grad=True, grad_scaler=scaler)
                else:
                    scaler.step(opt)
                    scaler.update()
                    opt.zero_grad()
            scales.append(scaler.get_scale())
        runs[backend] = (model, opt, scales)
    (model_t, opt_t, scales_t), (model_r, opt_r, scales_r) = runs["torch"], runs["reference"]
    assert scales_t == scales_r
    for p, q in zip(model_t.parameters(), model_r.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state_t, state_r = opt_t.state_dict()["state"], opt_r.state_dict()["state"]
    for i in state_t:
        for name, value in state_t[i].items():
            torch.testing.assert_close(value, state_r[i][name], rtol=1e-5, atol=1e-7)


# --- auto and the reasons -------------------------------------------------------------------------------


def test_auto_picks_torch_when_native_is_unavailable(monkeypatch):
    monkeypatch.setattr(native_module, "_C", None)
    monkeypatch.setattr(native_module, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'fused_sam._C'")
    from fused_sam.backends import _instances  # the registry's cache of backend instances
    monkeypatch.setattr("fused_sam.backends._instances", {k: v for k, v in _instances.items() if k != "native"})
    for dtype in DTYPES:
        assert resolve_backend("auto", CPU, dtype).name == "torch"
    assert resolve_backend("auto", CPU, torch.bfloat16, master=True).name == "torch"
    assert "native" not in available_backends("cpu") and "torch" in available_backends("cpu")
    opt = FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert set(opt.backends.values()) == {"torch"}
    reason = native_module.NativeBackend.unavailable_reason(CPU, torch.float32)
    assert "fused_sam._C" in reason and "--no-build-isolation" in reason


def test_unavailable_only_for_other_dtypes():
    for dtype in DTYPES:
        assert TorchBackend.unavailable_reason(CPU, dtype) is None
        assert TorchBackend.unavailable_reason(torch.device("meta"), dtype) is None
    assert "int32" in TorchBackend.unavailable_reason(CPU, torch.int32)
