"""The native backend (fused_sam._C, C++/CUDA operators) on CPU: build, parity with the reference backend,
determinism, torch.library.opcheck, optimizer-level parity, and torch.compile.

The CPU kernels run the same per-element math (csrc/fused_sam_math.h) the CUDA kernels run, so this file
is what CI checks of that math on machines without a GPU. When the build was asked to compile the CUDA
operators (FUSED_SAM_CUDA=1), ``test_cuda_kernels_registered`` makes a CUDA compile/link failure fail CI.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from backend_harness import PERTURBATIONS, REFERENCE, TOLERANCE, UPDATES, check_all_ops, clone_span, make_span
from fused_sam import BackendUnavailable, FusedSAM
from fused_sam.backends import native as native_module
from fused_sam.backends import resolve_backend
from fused_sam.backends.base import Perturbation, math_dtype
from fused_sam.backends.native import NativeBackend
from fused_sam.backends.reference import ReferenceBackend

OPS = ("sq_norm_partials", "perturb", "restore", "restore_sgd", "restore_adam")
CPU = torch.device("cpu")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_C = native_module._C
UNAVAILABLE = NativeBackend.unavailable_reason(CPU, torch.float32)
CUDA_REQUESTED = os.environ.get("FUSED_SAM_CUDA") == "1" or bool(_C is not None and _C.CUDA_REQUIRED_AT_BUILD)
NATIVE_REQUESTED = CUDA_REQUESTED or os.environ.get("FUSED_SAM_NATIVE") == "1"



@pytest.fixture(autouse=True)
def one_thread():
    """Tests run single-threaded (faster and steadier on a busy CI machine); the determinism test switches
    between 1 and 2 threads itself, and the multi-threaded kernels are covered there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


needs_native = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"native backend unavailable: {UNAVAILABLE}")
CHUNK = _C.CPU_NORM_CHUNK if _C is not None else 1 << 15


# --- build -----------------------------------------------------------------------------------------------


def test_extension_loaded_when_requested():
    if not NATIVE_REQUESTED:
        pytest.skip("neither FUSED_SAM_NATIVE=1 nor FUSED_SAM_CUDA=1 is set: the extension is optional here")
    assert _C is not None, f"the build was required but fused_sam._C is missing: {UNAVAILABLE}"


def test_cuda_kernels_registered():
    """A build with FUSED_SAM_CUDA=1 must have compiled and linked the CUDA kernels (no GPU needed)."""
    if not CUDA_REQUESTED:
        pytest.skip(
            "the CUDA operators were not required for this build (FUSED_SAM_CUDA=1 was set neither at build time "
            "nor in this environment), so their absence is allowed; CI builds with FUSED_SAM_CUDA=1"
        )
    assert _C is not None, f"FUSED_SAM_CUDA=1 but fused_sam._C is missing: {UNAVAILABLE}"
    assert _C.WITH_CUDA, "FUSED_SAM_CUDA=1 but fused_sam._C was built without its CUDA kernels"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_sam::{op}", "CUDA"), op
    assert NativeBackend.unavailable_reason(torch.device("cuda"), torch.float32) is None


@needs_native
def test_cpu_and_meta_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_sam::{op}", "CPU"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_sam::{op}", "Meta"), op


def test_unavailable_reasons(monkeypatch):
    monkeypatch.setattr(native_module, "_C", None)
    monkeypatch.setattr(native_module, "_IMPORT_ERROR", "ImportError: no module named fused_sam._C")
    reason = NativeBackend.unavailable_reason(CPU, torch.float32)
    assert reason and "fused_sam._C" in reason and "ImportError" in reason
    from fused_sam.backends import _instances  # the registry's cache of backend instances
    saved = dict(_instances)
    _instances.pop("native", None)
    try:
        with pytest.raises(BackendUnavailable, match="fused_sam._C"):
            resolve_backend("native", CPU, torch.float32)
        assert resolve_backend("auto", CPU, torch.float32).name == "reference"
    finally:
        _instances.clear()
        _instances.update(saved)


@needs_native
def test_unavailable_reasons_for_devices_and_dtypes():
    assert NativeBackend.unavailable_reason(CPU, torch.float32) is None
    assert "int32" in NativeBackend.unavailable_reason(CPU, torch.int32)
    assert "meta" in NativeBackend.unavailable_reason(torch.device("meta"), torch.float32)
    cuda_reason = NativeBackend.unavailable_reason(torch.device("cuda"), torch.float32)
    if _C.WITH_CUDA:
        assert cuda_reason is None
    else:
        assert "without CUDA kernels" in cuda_reason
    assert resolve_backend("auto", CPU, torch.float32).name == "native"


# --- parity with the reference backend, operation by operation -------------------------------------------

SIZES = [1, 7, CHUNK - 1, CHUNK + 1, 100_003]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("numel", SIZES)
def test_ops_match_reference(numel, dtype):
    check_all_ops(NativeBackend(), numel, dtype, CPU, seed=numel % 97)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_conversions_bitwise(dtype):
    """w + 1.0 * g (USAM, rho=1) rounds the same float32 sum the reference rounds: the conversions to and
    from bfloat16/float16 (incl. inf, NaN, subnormals, overflow, ties) must match torch's bit for bit."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny,
                            info.tiny / 4, info.eps, 1.0, -1.0, 65504.0, 3.0e38])
    w = torch.cat([special, torch.randn(4093, generator=torch.Generator().manual_seed(1)) * 100]).to(dtype)
    g = torch.cat([special.flip(0) / 3, torch.randn(4093, generator=torch.Generator().manual_seed(2))]).to(dtype)
    g[-100:] = w[-100:]  # exact doubling, and sums of equal magnitude
    span = make_span(w.numel(), dtype, CPU)
    span.weights.copy_(w)
    span.grads.copy_(g)
    ref = copy.deepcopy(span)
    usam = Perturbation(rho=1.0, adaptive=False, eta=0.0, normalize=False, eps=1e-12)
    NativeBackend().perturb(span, usam, None, None)
    ReferenceBackend().perturb(ref, usam, None, None)
    nan = ref.weights.isnan()
    assert torch.equal(span.weights.isnan(), nan)  # NaN payloads differ between torch's own paths: not compared
    assert torch.equal(span.weights.view(torch.int16)[~nan], ref.weights.view(torch.int16)[~nan])
    assert torch.equal(span.backup.view(torch.int16), w.view(torch.int16))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_spans_streaming_stores(dtype):
    """Spans of CPU_STREAM_MIN_ELEMS+ elements take the streaming-store path (tiles staged on the stack)."""
    numel = _C.CPU_STREAM_MIN_ELEMS + 2049  # not a whole number of tiles
    backend = NativeBackend()
    tol = TOLERANCE[dtype]
    span = make_span(numel, dtype, CPU, seed=4)
    out = torch.empty(backend.partials_len(span))
    backend.sq_norm_partials(span, PERTURBATIONS[0], out)
    cand, ref = clone_span(span), clone_span(span)
    backend.perturb(cand, PERTURBATIONS[0], out, None)
    REFERENCE.perturb(ref, PERTURBATIONS[0], out, None)
    assert torch.equal(cand.backup, span.weights)
    torch.testing.assert_close(cand.weights, ref.weights, rtol=tol[0], atol=tol[1])
    cand.weights.fill_(math.nan)
    backend.restore(cand)
    assert torch.equal(cand.weights, span.weights)
    for update in (UPDATES[1], UPDATES[7]):
        base = make_span(numel, dtype, CPU, update, step=2, seed=5)
        base.backup.copy_(base.weights)
        base.weights.fill_(math.nan)
        cand, ref = clone_span(base), clone_span(base)
        backend.restore_and_update(cand, update)
        REFERENCE.restore_and_update(ref, update)
        torch.testing.assert_close(cand.weights, ref.weights, rtol=tol[0], atol=tol[1])
        for k in ref.state:
            torch.testing.assert_close(cand.state[k], ref.state[k], rtol=2e-6, atol=1e-7)


@needs_native
def test_partials_len_and_bad_arguments():
    backend = NativeBackend()
    span = make_span(3 * CHUNK + 5, torch.float32, CPU)
    assert backend.partials_len(span) == 4
    with pytest.raises(RuntimeError, match="partials"):
        backend.sq_norm_partials(span, PERTURBATIONS[0], torch.empty(3))
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        torch.ops.fused_sam.restore_sgd(span.weights, span.backup, span.grads, torch.zeros(5), 0.1, 0.9, 0.0, 0.0,
                                        False, False, True)
    with pytest.raises(RuntimeError, match="must be Float, got Double"):
        torch.ops.fused_sam.restore_sgd(span.weights, span.backup, span.grads,
                                        torch.zeros(span.numel, dtype=torch.float64), 0.1, 0.9, 0.0, 0.0,
                                        False, False, True)


@needs_native
def test_float64_partials_for_float32_span():
    """The optimizer sums float32 and float64 spans into one float64 partials buffer on a device."""
    span = make_span(2 * CHUNK + 3, torch.float32, CPU)
    out = torch.empty(NativeBackend().partials_len(span), dtype=torch.float64)
    NativeBackend().sq_norm_partials(span, PERTURBATIONS[1], out)
    ref = torch.empty(1, dtype=torch.float64)
    ReferenceBackend().sq_norm_partials(make_span(2 * CHUNK + 3, torch.float64, CPU), PERTURBATIONS[1], ref)
    cand, expect = copy.deepcopy(span), copy.deepcopy(span)
    NativeBackend().perturb(cand, PERTURBATIONS[1], out, None)
    ReferenceBackend().perturb(expect, PERTURBATIONS[1], out, None)
    torch.testing.assert_close(cand.weights, expect.weights, rtol=2e-6, atol=1e-7)


# --- determinism -----------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_partials_bitwise_across_thread_counts(dtype, adaptive):
    backend = NativeBackend()
    span = make_span(7 * CHUNK + 1234, dtype, CPU, seed=3)
    perturbation = PERTURBATIONS[1] if adaptive else PERTURBATIONS[0]
    state_dtype = math_dtype(dtype)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            out = torch.empty(backend.partials_len(span), dtype=state_dtype)
            backend.sq_norm_partials(span, perturbation, out)
            cand = copy.deepcopy(span)
            backend.perturb(cand, perturbation, out, None)
            update = copy.deepcopy(cand)
            update.state = {"momentum_buffer": torch.ones(span.numel, dtype=state_dtype)}
            update.step = 1
            backend.restore_and_update(update, UPDATES[3])
            results.append((out, cand.weights, update.weights, update.state["momentum_buffer"]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- torch.library.opcheck -------------------------------------------------------------------------------


def _opcheck_cases():
    n = 1000
    gen = torch.Generator().manual_seed(0)

    def t(scale=1.0):
        return torch.randn(n, generator=gen) * scale

    w, g, bk = t(), t(), t()
    partials = torch.tensor([float(g.square().sum())])
    return [
        ("sq_norm_partials", (g, w, False, 0.0, torch.empty(1))),
        ("sq_norm_partials", (g, w, True, 0.01, torch.empty(1, dtype=torch.float64))),
        ("perturb", (w.clone(), g, bk.clone(), partials, torch.zeros(1, dtype=torch.int32), 0.05, False, 0.0, True,
                     1e-12)),
        ("perturb", (w.clone(), g, bk.clone(), torch.tensor([math.inf]), torch.zeros(1, dtype=torch.int32), 0.05,
                     True, 0.01, True, 1e-12)),
        ("perturb", (w.clone(), g, bk.clone(), None, None, 0.05, True, 0.0, False, 1e-12)),
        ("restore", (w.clone(), bk)),
        ("restore_sgd", (w.clone(), bk, g, t(), 0.1, 0.9, 0.0, 1e-4, True, False, False)),
        ("restore_sgd", (w.clone(), bk, g, None, 0.1, 0.0, 0.0, 0.0, False, True, True)),
        ("restore_adam", (w.clone(), bk, g, t(0.1), t(0.1).abs(), t(0.1).abs(), 1e-3, 0.9, 0.999, 1e-8, 0.01,
                          True, False, 1e-2, 0.1)),
        ("restore_adam", (w.clone(), bk, g, t(0.1), t(0.1).abs(), None, 1e-3, 0.9, 0.999, 1e-8, 0.01, False, True,
                          1e-2, 0.1)),
        ("restore_adam", (w.clone().bfloat16(), bk.bfloat16(), g.bfloat16(), t(0.1), t(0.1).abs(), None, 1e-3, 0.9,
                          0.999, 1e-8, 0.0, False, False, 1e-2, 0.1)),
    ]


@needs_native
@pytest.mark.parametrize("case", range(11))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fused_sam, name).default, args)


def test_opcheck_covers_every_op():
    assert {name for name, _ in _opcheck_cases()} == set(OPS)
    assert len(_opcheck_cases()) == 11


# --- the optimizer: twin models, native against reference ------------------------------------------------

CONFIGS = [
    ("sgd_momentum", torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd_nesterov_wd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("sgd_plain_wd", torch.optim.SGD, dict(lr=0.05, weight_decay=1e-3, dampening=0.0)),
    ("adam", torch.optim.Adam, dict(lr=1e-3)),
    ("adam_amsgrad_wd", torch.optim.Adam, dict(lr=1e-3, amsgrad=True, weight_decay=1e-2)),
    ("adamw_amsgrad", torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, weight_decay=1e-2)),
]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def _train(model, opt, data, steps):
    x, y = data
    for i in range(steps):
        xb, yb = x[i % 4::4], y[i % 4::4]
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.first_step(zero_grad=True)
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.second_step(zero_grad=True)


@needs_native
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("name,base,kwargs", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_twin_models_native_matches_reference(name, base, kwargs, adaptive):
    model = _mlp()
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 12, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    sam = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=0.01 if adaptive else 0.0)
    opt = FusedSAM(model.parameters(), base, backend="native", **sam, **kwargs)
    ref = FusedSAM(twin.parameters(), base, backend="reference", **sam, **kwargs)
    assert set(opt.backends.values()) == {"native"} and set(ref.backends.values()) == {"reference"}
    _train(model, opt, data, 20)
    _train(twin, ref, data, 20)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state, ref_state = opt.state_dict()["state"], ref.state_dict()["state"]
    assert state.keys() == ref_state.keys()
    for k in state:
        for key in state[k]:
            torch.testing.assert_close(state[k][key], ref_state[k][key], rtol=1e-5, atol=1e-6)


@needs_native
def test_nonfinite_gradient_skips_perturbation():
    model = _mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, backend="native", lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    next(model.parameters()).grad[0, 0] = math.inf
    opt.first_step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert opt.nonfinite_steps == 1
    opt.second_step()


# --- torch.compile -------------------------------------------------------------------------------------


def _compile_unusable() -> str | None:
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1)
        fn(torch.randn(8))
    except Exception as exc:  # noqa: BLE001 - any failure to compile means "not usable here"
        return f"torch.compile is unusable on this machine ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
    return None


@needs_native
def test_ops_under_torch_compile_fullgraph():
    """The operators trace into a graph (mutations functionalised) and run from it."""
    def step(w, g, bk, buf, partials, count):
        torch.ops.fused_sam.sq_norm_partials(g, w, False, 0.0, partials)
        torch.ops.fused_sam.perturb(w, g, bk, partials, count, 0.05, False, 0.0, True, 1e-12)
        torch.ops.fused_sam.restore_sgd(w, bk, g, buf, 0.1, 0.9, 0.0, 0.0, False, False, False)

    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(5000, generator=gen) for _ in range(4)] + [torch.empty(1), torch.zeros(1, dtype=torch.int32)]
    expect = [a.clone() for a in args]
    step(*expect)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*args)
    for a, b in zip(args, expect):
        assert torch.equal(a, b)


@needs_native
def test_compiled_model_trains_with_native_backend():
    reason = _compile_unusable()
    if reason:
        pytest.skip(reason)
    model = _mlp()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 12, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    opt = FusedSAM(model.parameters(), torch.optim.SGD, backend="native", lr=0.05, momentum=0.9)
    ref = FusedSAM(twin.parameters(), torch.optim.SGD, backend="reference", lr=0.05, momentum=0.9)
    _train(compiled, opt, data, 4)
    _train(twin, ref, data, 4)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
