"""The native backend (fused_sam._C, C++/CUDA operators) on CPU: build, parity with the reference backend
(also with float32 master weights for bfloat16/float16 spans, and their roundings bit for bit), argument
checks, determinism, torch.library.opcheck, optimizer-level parity, and torch.compile.

The CPU kernels run the same per-element math (csrc/fused_sam_math.h) the CUDA kernels run, so this file
is what CI checks of that math on machines without a GPU. When the build was asked to compile the CUDA
operators (FUSED_SAM_CUDA=1), ``test_cuda_kernels_registered`` makes a CUDA compile/link failure fail CI.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

from fused_sam.selfcheck import (
    PERTURBATIONS,
    UPDATES,
    check_all_ops,
    check_device_hyperparameters,
    check_master_roundings,
    check_perturb,
    check_restore,
    check_restore_and_update,
    check_sq_norm,
    device_hyperparameter,
    make_span,
    misaligned_span,
    norm_partials_for,
    perturb_scalars,
    restore_point,
    step_scalars,
    with_reused,
)
from models import mlp, sam_train
from fused_sam import BackendUnavailable, FusedSAM
from fused_sam.backends import native as native_module
from fused_sam.backends import resolve_backend
from fused_sam.backends.base import Perturbation, math_dtype
from fused_sam.backends.native import NativeBackend
from fused_sam.backends.reference import ReferenceBackend
from fused_sam.updates import AdamUpdate, SGDUpdate

OPS = ("sq_norm_partials", "perturb", "restore", "restore_update")
# The base updates the op-level tests run restore_update with, by name (their state: make_span's).
OP_UPDATES = {"sgd": SGDUpdate(momentum=0.9), "adam": AdamUpdate()}


def op_name(op: str) -> str:
    """The operator a case of the op-level tests calls: a base update's name stands for restore_update."""
    return "restore_update" if op in OP_UPDATES else op


def restore_update_args(update, weights, backup, master, grads, state, step, grad_scale=None, found_inf=None,
                        lr=0.1, lr_tensor=None, reused=None, reuse_scale=None) -> tuple:
    """torch.ops.fused_sam.restore_update's arguments for ``update`` (``state``: its needed buffers, in order)."""
    return (weights, backup, master, grads, list(state), step, grad_scale, found_inf, reused, reuse_scale,
            update.code, update.flags(), list(update.hyperparameters()), lr, lr_tensor)


def needed(span, update) -> list:
    return [span.state[name] for name in update.needed_state()]
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

# The instruction sets the CPU kernels are built for (csrc/cpu_kernels.cpp, one build each; x86-64 builds
# both). Tests taking the ``isa`` fixture run once per instruction set this CPU has, the others skipped.
ISAS = ["default", "avx2"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _isa_unusable(name: str):
    """None if the CPU kernels built for ``name`` run here, else why not."""
    if UNAVAILABLE is not None:
        return f"native backend unavailable: {UNAVAILABLE}"
    if name not in _C.CPU_CAPABILITIES_BUILT:
        return f"fused_sam._C has no {name} CPU kernels (built for {', '.join(_C.CPU_CAPABILITIES_BUILT)})"
    if name not in native_module.cpu_capabilities():
        return f"this CPU cannot run the {name} CPU kernels (it runs {', '.join(native_module.cpu_capabilities())})"
    return None


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test with the CPU kernels of one instruction set (skipped where the CPU lacks it)."""
    reason = _isa_unusable(request.param)
    if reason:
        pytest.skip(reason)
    before = native_module.cpu_capability()
    native_module.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        native_module.set_cpu_capability(before)


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


@needs_native
def test_cpu_kernels_built_for_every_isa():
    """x86-64 builds compile the CPU kernels for AVX2 too (whether or not this CPU runs them), and no AVX-512
    build (AVX-512 CPUs run the AVX2 one)."""
    if not X86_64:
        pytest.skip(f"the AVX2 build is x86-64 only, this is {platform.machine()}")
    assert _C.CPU_CAPABILITIES_BUILT == tuple(ISAS)
    usable = native_module.cpu_capabilities()
    assert usable[0] == "default" and set(usable) <= set(ISAS)
    assert native_module.cpu_capability() == usable[-1] or os.environ.get("FUSED_SAM_CPU_CAPABILITY")


@needs_native
def test_set_cpu_capability_refuses_what_the_cpu_lacks():
    before = native_module.cpu_capability()
    with pytest.raises(ValueError, match="'sse9' is not one of default, avx2"):
        native_module.set_cpu_capability("sse9")
    with pytest.raises(ValueError, match="no AVX-512 build: AVX-512 CPUs run the avx2 kernels"):
        native_module.set_cpu_capability("AVX512")
    lacking = [name for name in ISAS if name not in native_module.cpu_capabilities()]
    for name in lacking:
        with pytest.raises(ValueError, match=f"cannot use the '{name}' CPU kernels: (this CPU lacks|this build of "
                                             f"fused_sam._C has no) {name}"):
            native_module.set_cpu_capability(name)
    assert native_module.cpu_capability() == before
    if not lacking:
        pytest.skip("this CPU runs every instruction set built: nothing to refuse")


@needs_native
def test_cpu_capability_environment_variable():
    """FUSED_SAM_CPU_CAPABILITY chooses the kernels at load time; one this CPU cannot run is a warning and the
    best usable kernels run instead. (Two fresh interpreters, side by side.)"""
    code = "from fused_sam.backends import native; print(native.cpu_capability())"
    runs = {value: subprocess.Popen([sys.executable, "-W", "always", "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True,
                                    env=dict(os.environ, FUSED_SAM_CPU_CAPABILITY=value))
            for value in ("default", "sse9")}
    out = {value: run.communicate(timeout=120) for value, run in runs.items()}
    assert all(run.returncode == 0 for run in runs.values()), out
    assert out["default"] == ("default\n", "")
    assert out["sse9"][0] == native_module.cpu_capabilities()[-1] + "\n"
    assert "RuntimeWarning: FUSED_SAM_CPU_CAPABILITY=sse9 is ignored: 'sse9' is not one of" in out["sse9"][1]


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
        assert resolve_backend("auto", CPU, torch.float32).name != "native"  # the next in the CPU order
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
def test_ops_match_reference(numel, dtype, isa):
    check_all_ops(NativeBackend(), numel, dtype, CPU, seed=numel % 97)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_low_precision_conversions_bitwise(dtype, isa):
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
    usam = Perturbation(adaptive=False, eta=0.0, normalize=False, eps=1e-12)
    NativeBackend().perturb(span, usam, None, None, perturb_scalars(CPU, rho=1.0))
    ReferenceBackend().perturb(ref, usam, None, None, perturb_scalars(CPU, rho=1.0))
    nan = ref.weights.isnan()
    assert torch.equal(span.weights.isnan(), nan)  # NaN payloads differ between torch's own paths: not compared
    assert torch.equal(span.weights.view(torch.int16)[~nan], ref.weights.view(torch.int16)[~nan])
    assert torch.equal(span.backup.view(torch.int16), w.view(torch.int16))


@needs_native
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16", "bfloat16-master"])
def test_large_spans_streaming_stores(dtype, master):
    """Spans of CPU_STREAM_MIN_ELEMS+ elements write their output-only buffers with streaming stores (the
    AVX2 and AVX-512 kernels); with master weights every operation writes the weights that way."""
    numel = _C.CPU_STREAM_MIN_ELEMS + 2049  # not a whole number of tiles
    backend = NativeBackend()
    span = make_span(numel, dtype, CPU, seed=4, master=master)
    check_sq_norm(backend, span, PERTURBATIONS[1])
    check_perturb(backend, span, PERTURBATIONS[1], norm_partials_for(span, PERTURBATIONS[1]))
    check_restore(backend, span)
    for update in (UPDATES[1], UPDATES[7]):
        span = make_span(numel, dtype, CPU, update, seed=5, master=master)
        for scalars in (step_scalars(CPU, 2), step_scalars(CPU, 2, grad_scale=1024.0, found_inf=1.0)):
            check_restore_and_update(backend, span, update, scalars)


@needs_native
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16", "bfloat16-master"])
def test_streaming_stores_from_misaligned_starts(isa, dtype, master):
    """Streaming stores need 32-byte aligned vectors: the buffers start 3 elements past an allocation and two
    threads split each span at an unaligned element, so each thread writes its first elements plainly."""
    numel = _C.CPU_STREAM_MIN_ELEMS + 2049
    backend = NativeBackend()
    torch.set_num_threads(2)  # undone by the one_thread fixture
    span = misaligned_span(make_span(numel, dtype, CPU, seed=6, master=master), 3)
    assert span.weights.data_ptr() % 32 != 0
    check_perturb(backend, span, PERTURBATIONS[1], norm_partials_for(span, PERTURBATIONS[1]))
    check_restore(backend, span)
    for update in (UPDATES[1], UPDATES[7]):
        span = misaligned_span(make_span(numel, dtype, CPU, update, seed=7, master=master), 3)
        check_restore_and_update(backend, span, update, step_scalars(CPU, 2))


@needs_native
def test_partials_len_and_bad_arguments():
    backend = NativeBackend()
    span = make_span(3 * CHUNK + 5, torch.float32, CPU)
    assert backend.partials_len(span) == 4
    with pytest.raises(RuntimeError, match="partials"):
        backend.sq_norm_partials(span, PERTURBATIONS[0], torch.empty(3))
    step = torch.zeros(())
    sgd = OP_UPDATES["sgd"]
    with pytest.raises(RuntimeError, match="a state buffer has 5 elements"):
        torch.ops.fused_sam.restore_update(*restore_update_args(sgd, span.weights, span.backup, None, span.grads,
                                                                [torch.zeros(5)], step))
    with pytest.raises(RuntimeError, match="must be Float, got Double"):
        torch.ops.fused_sam.restore_update(*restore_update_args(
            sgd, span.weights, span.backup, None, span.grads, [torch.zeros(span.numel, dtype=torch.float64)], step))
    adam = OP_UPDATES["adam"]
    with pytest.raises(RuntimeError, match="does not run with 1 state buffers"):
        torch.ops.fused_sam.restore_update(*restore_update_args(adam, span.weights, span.backup, None, span.grads,
                                                                [torch.zeros(span.numel)], step))
    with pytest.raises(RuntimeError, match="unknown base update kind 99"):
        torch.ops.fused_sam.restore_update(span.weights, span.backup, None, span.grads, [], step, None, None, None,
                                           None, 99, 0, [], 0.1, None)
    with pytest.raises(RuntimeError, match="takes 3 hyperparameters, got 2"):
        torch.ops.fused_sam.restore_update(span.weights, span.backup, None, span.grads, [], step, None, None, None,
                                           None, sgd.code, 0, [0.0, 0.0], 0.1, None)
    with pytest.raises(RuntimeError, match="takes 2 flags, got the bits 4"):
        torch.ops.fused_sam.restore_update(span.weights, span.backup, None, span.grads, [], step, None, None, None,
                                           None, sgd.code, 4, [0.0, 0.0, 0.0], 0.1, None)


BAD_STEP_SCALARS = [
    (torch.tensor(1.0, dtype=torch.float64), "must be a float32 tensor, got Double"),
    (torch.tensor(1, dtype=torch.int32), "must be a float32 tensor, got Int"),
    (torch.zeros(2), "must have exactly one element, got 2"),
    (torch.zeros(0), "must have exactly one element, got 0"),
]


def _call_with_step_scalar(op: str, name: str, value: torch.Tensor):
    """A call of ``op``, valid but for its step tensor ``name`` set to ``value``."""
    update = OP_UPDATES.get(op)
    span = make_span(100, torch.float32, CPU, update)
    scalars = {"step": torch.zeros(()), "grad_scale": None, "found_inf": None}
    scalars[name] = value
    step, grad_scale, found_inf = scalars.values()
    ops = torch.ops.fused_sam
    if op == "perturb":
        return lambda: ops.perturb(span.weights, span.grads, span.backup, None, None, None, grad_scale, False, 0.0,
                                   False, 1e-12, 0.05, None)
    return lambda: ops.restore_update(*restore_update_args(update, span.weights, span.backup, None, span.grads,
                                                           needed(span, update), step, grad_scale, found_inf))


@needs_native
@pytest.mark.parametrize("bad,message", BAD_STEP_SCALARS, ids=["float64", "int32", "two", "empty"])
@pytest.mark.parametrize("op,name", [("perturb", "grad_scale"), ("sgd", "step"), ("sgd", "grad_scale"),
                                     ("sgd", "found_inf"), ("adam", "step"), ("adam", "grad_scale"),
                                     ("adam", "found_inf")])
def test_bad_step_scalars(op, name, bad, message):
    """The step tensors are validated by name (the wrong-device case needs a GPU: test_native_gpu.py)."""
    with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} {message}"):
        _call_with_step_scalar(op, name, bad)()


# --- lr and rho on the device (capturable=True) -------------------------------------------------------------

# (dtype, master): every dtype the CPU kernels take, and master weights where they exist (bfloat16/float16).
HYPERPARAMETER_CASES = [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                        (torch.float16, False), (torch.bfloat16, True), (torch.float16, True)]
HYPERPARAMETER_IDS = ["float64", "float32", "bfloat16", "float16", "bfloat16-master", "float16-master"]


@needs_native
@pytest.mark.parametrize("dtype,master", HYPERPARAMETER_CASES, ids=HYPERPARAMETER_IDS)
@pytest.mark.parametrize("numel", [1, 7, 4099])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise(numel, dtype, master, isa):
    """lr_tensor / rho_tensor (float64, read by the kernels in place of the floats) give the float path's
    weights, backup, master and state bit for bit, for every perturbation and update variant."""
    check_device_hyperparameters(NativeBackend(), numel, dtype, CPU, seed=numel % 89, master=master)


@needs_native
def test_lr_tensor_is_read_at_each_call():
    """The kernels read the tensor's value when they run (a scheduler updates it in place between steps)."""
    update = UPDATES[5]  # AdamW: lr enters the step size and the decoupled decay
    span = make_span(1000, torch.float32, CPU, update, seed=3)
    span.backup.copy_(span.weights)
    lr = device_hyperparameter(0.5, CPU)
    for value in (1e-3, 0.25, 0.0):
        lr.fill_(value)
        cand, expect = copy.deepcopy(span), copy.deepcopy(span)
        scalars = step_scalars(CPU, 2, lr=value)
        NativeBackend().restore_and_update(expect, update, scalars)
        NativeBackend().restore_and_update(cand, update, dataclasses.replace(scalars, lr=lr))
        assert torch.equal(cand.weights, expect.weights)
        assert all(torch.equal(cand.state[k], expect.state[k]) for k in expect.state)


BAD_HYPERPARAMETERS = [
    (torch.tensor([0.1], dtype=torch.float32), "must be a float64 tensor, got Float"),
    (torch.tensor([1], dtype=torch.int64), "must be a float64 tensor, got Long"),
    (torch.zeros(2, dtype=torch.float64), "must have exactly one element, got 2"),
    (torch.zeros(0, dtype=torch.float64), "must have exactly one element, got 0"),
]


def _call_with_hyperparameter(op: str, value: torch.Tensor, device="cpu"):
    """A call of ``op`` on ``device`` (cpu, or meta for the Meta kernel), valid but for its lr_tensor /
    rho_tensor ``value`` (the float lr / rho 0.0, unused, as the native backend passes it)."""
    update = OP_UPDATES.get(op)
    span = make_span(100, torch.float32, device, update)
    step = torch.zeros((), device=device)
    ops = torch.ops.fused_sam
    if op == "perturb":
        return lambda: ops.perturb(span.weights, span.grads, span.backup, None, None, None, None, False, 0.0, False,
                                   1e-12, 0.0, value)
    return lambda: ops.restore_update(*restore_update_args(update, span.weights, span.backup, None, span.grads,
                                                           needed(span, update), step, lr=0.0, lr_tensor=value))


HYPERPARAMETER_OPS = [("perturb", "rho_tensor"), ("sgd", "lr_tensor"), ("adam", "lr_tensor")]


@needs_native
@pytest.mark.parametrize("bad,message", BAD_HYPERPARAMETERS, ids=["float32", "int64", "two", "empty"])
@pytest.mark.parametrize("op,name", HYPERPARAMETER_OPS)
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_lr_and_rho_tensors(op, name, bad, message, device):
    """lr_tensor / rho_tensor are validated by name, in the CPU kernel and in the Meta kernel (fake tensors)."""
    with pytest.raises(RuntimeError, match=re.escape(f"fused_sam::{op_name(op)}: {name} {message}")):
        _call_with_hyperparameter(op, bad.to(device), device)()


@needs_native
@pytest.mark.parametrize("op,name", HYPERPARAMETER_OPS)
def test_lr_and_rho_tensors_on_another_device(op, name):
    """A tensor on another device than the weights is refused by name (CPU against meta here; CPU against CUDA
    in test_native_gpu.py): the dispatcher picks the Meta kernel for the mixed call, which checks the same."""
    for weights_device, value_device in (("cpu", "meta"), ("meta", "cpu")):
        value = torch.ones(1, dtype=torch.float64, device=value_device)
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} is on {value_device}, the weights "
                                               f"on {weights_device}"):
            _call_with_hyperparameter(op, value, weights_device)()


@needs_native
def test_float64_partials_for_float32_span():
    """The optimizer sums float32 and float64 spans into one float64 partials buffer on a device."""
    span = make_span(2 * CHUNK + 3, torch.float32, CPU)
    out = torch.empty(NativeBackend().partials_len(span), dtype=torch.float64)
    NativeBackend().sq_norm_partials(span, PERTURBATIONS[1], out)
    ref = torch.empty(1, dtype=torch.float64)
    ReferenceBackend().sq_norm_partials(make_span(2 * CHUNK + 3, torch.float64, CPU), PERTURBATIONS[1], ref)
    cand, expect = copy.deepcopy(span), copy.deepcopy(span)
    NativeBackend().perturb(cand, PERTURBATIONS[1], out, None, perturb_scalars(CPU))
    ReferenceBackend().perturb(expect, PERTURBATIONS[1], out, None, perturb_scalars(CPU))
    torch.testing.assert_close(cand.weights, expect.weights, rtol=2e-6, atol=1e-7)


# --- LookSAM's reuse step: reused (g_v) and reuse_scale (c) ---------------------------------------------------
# (The update itself is checked against the reference by check_all_ops: test_ops_match_reference and
# test_master_ops_match_reference.)

REUSE_OPS = ["sgd", "adam"]


def _call_with_reuse(op: str, dtype: torch.dtype, reused, reuse_scale, device="cpu"):
    """A call of ``op`` on 100 ``dtype`` weights on ``device`` (cpu, or meta for the Meta kernel), valid but
    perhaps for its ``reused`` / ``reuse_scale``."""
    update = OP_UPDATES[op]
    span = make_span(100, dtype, device, update)
    step = torch.zeros((), device=device)
    return lambda: torch.ops.fused_sam.restore_update(*restore_update_args(
        update, span.weights, span.backup, None, span.grads, needed(span, update), step, reused=reused,
        reuse_scale=reuse_scale))


_SCALE = torch.tensor([0.5], dtype=torch.float64)
# (what, the weights' dtype, reused, reuse_scale, the error)
BAD_REUSE = [
    ("float64-reused", torch.float32, torch.zeros(100, dtype=torch.float64), _SCALE,
     "reused must be Float, got Double"),
    ("bfloat16-reused", torch.bfloat16, torch.zeros(100, dtype=torch.bfloat16), _SCALE,
     "reused must be Float, got BFloat16"),
    ("float32-reused-float64-weights", torch.float64, torch.zeros(100), _SCALE, "reused must be Double, got Float"),
    ("short-reused", torch.float32, torch.zeros(99), _SCALE, "reused has 99 elements, the weights 100"),
    ("strided-reused", torch.float32, torch.zeros(200)[::2], _SCALE, "reused must be a contiguous 1-D tensor"),
    ("float32-scale", torch.float32, torch.zeros(100), torch.tensor([0.5]),
     "reuse_scale must be a float64 tensor, got Float"),
    ("two-scales", torch.float32, torch.zeros(100), torch.zeros(2, dtype=torch.float64),
     "reuse_scale must have exactly one element, got 2"),
    ("only-reused", torch.float32, torch.zeros(100), None,
     "pass both reused and reuse_scale or neither, got only reused"),
    ("only-scale", torch.float32, None, _SCALE, "pass both reused and reuse_scale or neither, got only reuse_scale"),
]


@needs_native
@pytest.mark.parametrize("op", REUSE_OPS)
@pytest.mark.parametrize("what,dtype,reused,reuse_scale,message", BAD_REUSE, ids=[case[0] for case in BAD_REUSE])
def test_bad_reuse_arguments(op, what, dtype, reused, reuse_scale, message):
    """reused / reuse_scale are validated by name (dtype, size, layout, both or neither), in the CPU kernel and
    in the Meta kernel (fake tensors)."""
    on_meta = tuple(None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                    for t in (reused, reuse_scale))
    for device, args in (("cpu", (reused, reuse_scale)), ("meta", on_meta)):
        with pytest.raises(RuntimeError, match=re.escape(f"fused_sam::{op_name(op)}: {message}")):
            _call_with_reuse(op, dtype, *args, device)()


@needs_native
@pytest.mark.parametrize("op", REUSE_OPS)
@pytest.mark.parametrize("name", ["reused", "reuse_scale"])
def test_reuse_arguments_on_another_device(op, name):
    """reused / reuse_scale on another device than the weights are refused by name (CPU against meta here; CPU
    against CUDA in test_native_gpu.py)."""
    for weights_device, other_device in (("cpu", "meta"), ("meta", "cpu")):
        args = {"reused": torch.zeros(100), "reuse_scale": torch.ones(1, dtype=torch.float64)}
        args = {key: value.to(other_device if key == name else weights_device) for key, value in args.items()}
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} is on {other_device}, the weights "
                                               f"on {weights_device}"):
            _call_with_reuse(op, torch.float32, args["reused"], args["reuse_scale"], weights_device)()


# --- master weights ---------------------------------------------------------------------------------------

MASTER_DTYPES = [torch.bfloat16, torch.float16]
MASTER_IDS = ["bfloat16", "float16"]


@needs_native
def test_auto_picks_native_for_master_weights():
    for dtype in MASTER_DTYPES:
        assert resolve_backend("auto", CPU, dtype, master=True).name == "native"
        assert resolve_backend("native", CPU, dtype, master=True).name == "native"


@needs_native
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
@pytest.mark.parametrize("numel", SIZES)
def test_master_ops_match_reference(numel, dtype, isa):
    """Spans with a float32 master instead of a backup: perturb leaves the master as it is, the weights are
    its exact rounding after every update, a skipped update rounds the master again."""
    check_all_ops(NativeBackend(), numel, dtype, CPU, seed=numel % 97, master=True)


@needs_native
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
def test_master_roundings_bitwise(dtype, isa):
    check_master_roundings(NativeBackend(), CPU, dtype)


def restore_point_call(op: str, weights: torch.Tensor, backup, master):
    """A call of ``op`` on ``weights``, valid but perhaps for its restore point (``backup``, ``master``)."""
    n = weights.numel()
    g = torch.zeros(n, dtype=weights.dtype, device=weights.device)
    moment = torch.zeros(n, device=weights.device)
    step = torch.zeros((), device=weights.device)
    ops = torch.ops.fused_sam
    return {
        "sq_norm_partials": lambda: ops.sq_norm_partials(g, weights, master, True, 0.0,
                                                         torch.empty(1, device=weights.device)),
        "perturb": lambda: ops.perturb(weights, g, backup, master, None, None, None, True, 0.0, False, 1e-12, 0.05,
                                       None),
        "restore": lambda: ops.restore(weights, backup, master),
        "sgd": lambda: ops.restore_update(*restore_update_args(SGDUpdate(), weights, backup, master, g, [], step)),
        "adam": lambda: ops.restore_update(*restore_update_args(AdamUpdate(), weights, backup, master, g,
                                                                [moment, moment.clone()], step)),
    }[op]


# Every operator (restore_update with two bases) as restore_point_call names them.
RESTORE_POINT_OPS = ("sq_norm_partials", "perturb", "restore", "sgd", "adam")


_BF16 = torch.zeros(100, dtype=torch.bfloat16)
# (what, weights, backup, master, the error); sq_norm_partials takes no backup, so only the master cases.
BAD_RESTORE_POINTS = [
    ("float64-master", _BF16, None, torch.zeros(100, dtype=torch.float64), "master must be Float, got Double"),
    ("bfloat16-master", _BF16, None, torch.zeros(100, dtype=torch.bfloat16), "master must be Float, got BFloat16"),
    ("short-master", _BF16, None, torch.zeros(99), "master has 99 elements, the weights 100"),
    ("strided-master", _BF16, None, torch.zeros(200)[::2], "master must be a contiguous 1-D tensor"),
    ("float32-weights", torch.zeros(100), None, torch.zeros(100),
     "master weights are for bfloat16 or float16 weights, got Float weights"),
    ("both", _BF16, _BF16.clone(), torch.zeros(100), "pass exactly one of backup and master, got both"),
    ("neither", _BF16, None, None, "pass exactly one of backup and master, got neither"),
]


@needs_native
@pytest.mark.parametrize("op", RESTORE_POINT_OPS)
@pytest.mark.parametrize("what,weights,backup,master,message", BAD_RESTORE_POINTS,
                         ids=[case[0] for case in BAD_RESTORE_POINTS])
def test_bad_restore_points(op, what, weights, backup, master, message):
    """The master is validated by name: dtype, size, layout, the weights' dtype, and exactly one restore point
    (the wrong-device case needs a GPU: test_native_gpu.py). Nothing is written before the checks."""
    if op == "sq_norm_partials" and what in ("both", "neither"):
        pytest.skip("sq_norm_partials takes no backup")
    tensors = (weights.clone(), backup, master)
    on_meta = tuple(None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                    for t in tensors)
    for args in (tensors, on_meta):  # the CPU kernel, then the Meta kernel (fake tensors)
        with pytest.raises(RuntimeError, match=re.escape(f"fused_sam::{op_name(op)}: {message}")):
            restore_point_call(op, *args)()


# --- determinism -----------------------------------------------------------------------------------------

# The spans the determinism tests take norms of: float32/float64, bfloat16 with and without master weights.
NORM_SPANS = pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False),
                                                      (torch.float64, False), (torch.bfloat16, True)],
                                     ids=["float32", "bfloat16", "float64", "bfloat16-master"])


@needs_native
@NORM_SPANS
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_partials_bitwise_across_thread_counts(dtype, master, adaptive, isa):
    backend = NativeBackend()
    span = make_span(7 * CHUNK + 1234, dtype, CPU, seed=3, master=master)
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
            backend.perturb(cand, perturbation, out, None, perturb_scalars(CPU))
            update = dataclasses.replace(copy.deepcopy(cand),
                                         state={"momentum_buffer": torch.ones(span.numel, dtype=state_dtype)})
            backend.restore_and_update(update, UPDATES[3], step_scalars(CPU, 1))
            results.append((out, cand.weights, update.weights, restore_point(update),
                            update.state["momentum_buffer"]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_native
@NORM_SPANS
@pytest.mark.parametrize("adaptive", [False, True])
def test_norm_partial_of_a_chunk_is_the_same_read_alone_or_with_others(dtype, master, adaptive, isa):
    """The CPU norm reads four chunks at a time (more memory bandwidth per thread); each chunk's partial must
    be the one that chunk gives alone (a span of one chunk), bit for bit: 9 chunks and a tail, one thread
    (two groups of four, then singles) and two (other groups)."""
    backend = NativeBackend()
    span = make_span(9 * CHUNK + 77, dtype, CPU, seed=5, master=master)
    perturbation = PERTURBATIONS[1] if adaptive else PERTURBATIONS[0]
    state_dtype = math_dtype(dtype)
    alone = []
    for start in range(0, span.numel, CHUNK):
        stop = min(span.numel, start + CHUNK)
        piece = dataclasses.replace(
            span, weights=span.weights[start:stop], grads=span.grads[start:stop],
            master=None if span.master is None else span.master[start:stop],
            backup=None if span.backup is None else span.backup[start:stop], state={})
        out = torch.empty(1, dtype=state_dtype)
        backend.sq_norm_partials(piece, perturbation, out)
        alone.append(out)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            together = torch.empty(backend.partials_len(span), dtype=state_dtype)
            backend.sq_norm_partials(span, perturbation, together)
            assert torch.equal(together, torch.cat(alone)), n
    finally:
        torch.set_num_threads(threads)


def _every_op_outputs(dtype: torch.dtype) -> list:
    """Every CPU operation's outputs on one span (2 chunks and a tail, with inf and NaN in it): norms, perturb,
    SGD, Adam with AMSGrad, LookSAM's reuse, master weights (bfloat16/float16)."""
    master = dtype in MASTER_DTYPES
    span = make_span(2 * CHUNK + 1001, dtype, CPU, UPDATES[7], seed=11, master=master)
    span.grads[5], span.grads[40000] = math.inf, math.nan
    outputs = []
    for perturbation in PERTURBATIONS[:2]:
        out = torch.empty(NativeBackend().partials_len(span), dtype=math_dtype(dtype))
        NativeBackend().sq_norm_partials(span, perturbation, out)
        cand = copy.deepcopy(span)
        NativeBackend().perturb(cand, perturbation, out, torch.zeros(1, dtype=torch.int32), perturb_scalars(CPU))
        outputs += [out, cand.weights]
    reuse = dataclasses.replace(step_scalars(CPU, 2), reuse_scale=torch.tensor([0.7], dtype=torch.float64))
    for update in (UPDATES[3], UPDATES[7]):
        base = make_span(2 * CHUNK + 1001, dtype, CPU, update, seed=12, master=master)
        for cand, scalars in ((copy.deepcopy(base), step_scalars(CPU, 2, grad_scale=8.0, found_inf=0.0)),
                              (with_reused(copy.deepcopy(base), seed=13), reuse)):
            if cand.backup is not None:
                cand.backup.copy_(cand.weights)
            NativeBackend().restore_and_update(cand, update, scalars)
            outputs += [cand.weights, restore_point(cand), *cand.state.values()]
    return outputs


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_isas_agree_bitwise(dtype):
    """Every instruction set's kernels give the same bits (no FMA contraction anywhere; the norm's lanes are the
    same on every ISA; NaN written as c10 writes it)."""
    usable = native_module.cpu_capabilities()
    if len(usable) < 2:
        pytest.skip(f"this CPU runs only the {usable[0]} CPU kernels")
    before = native_module.cpu_capability()
    results = {}
    try:
        for name in usable:
            native_module.set_cpu_capability(name)
            results[name] = _every_op_outputs(dtype)
    finally:
        native_module.set_cpu_capability(before)
    for name in usable[1:]:
        for a, b in zip(results["default"], results[name]):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


# --- torch.library.opcheck -------------------------------------------------------------------------------


def _opcheck_cases():
    n = 1000
    gen = torch.Generator().manual_seed(0)

    def t(scale=1.0):
        return torch.randn(n, generator=gen) * scale

    def scalar(value):
        return torch.tensor(float(value))

    def hyper(value):
        return torch.tensor([0.0, float(value)], dtype=torch.float64)[1]

    w, g, bk = t(), t(), t()
    master, g16 = t(), g.bfloat16()  # a float32 master and bfloat16 gradients: the master-weights cases
    w16 = master.bfloat16()
    partials = torch.tensor([float(g.square().sum())])
    step = torch.tensor([0.0, 3.0])[1]  # a 0-d view with a storage offset, as the optimizer passes it

    def perturb_case(w, g, backup, master, partials, count, grad_scale, rho, adaptive, eta, normalize, eps,
                     rho_tensor=None):
        return "perturb", (w, g, backup, master, partials, count, grad_scale, adaptive, eta, normalize, eps, rho,
                           rho_tensor)

    def sgd_case(w, backup, master, g, buf, step, grad_scale, found_inf, lr, momentum, dampening, weight_decay,
                 nesterov, maximize, lr_tensor=None, reused=None, reuse_scale=None):
        update = SGDUpdate(momentum, dampening, weight_decay, nesterov, maximize)
        return "restore_update", restore_update_args(update, w, backup, master, g, [] if buf is None else [buf],
                                                     step, grad_scale, found_inf, lr, lr_tensor, reused, reuse_scale)

    def adam_case(w, backup, master, g, m, v, vmax, step, grad_scale, found_inf, lr, beta1, beta2, eps,
                  weight_decay, decoupled, maximize, lr_tensor=None, reused=None, reuse_scale=None):
        update = AdamUpdate(beta1, beta2, eps, weight_decay, decoupled, vmax is not None, maximize)
        state = [m, v] + ([] if vmax is None else [vmax])
        return "restore_update", restore_update_args(update, w, backup, master, g, state, step, grad_scale,
                                                     found_inf, lr, lr_tensor, reused, reuse_scale)

    return [
        ("sq_norm_partials", (g, w, None, False, 0.0, torch.empty(1))),
        ("sq_norm_partials", (g, w, None, True, 0.01, torch.empty(1, dtype=torch.float64))),
        ("sq_norm_partials", (g16, w16, master, True, 0.01, torch.empty(1))),
        perturb_case(w.clone(), g, bk.clone(), None, partials, torch.zeros(1, dtype=torch.int32), None, 0.05, False,
                     0.0, True, 1e-12),
        perturb_case(w.clone(), g, bk.clone(), None, torch.tensor([math.inf]), torch.zeros(1, dtype=torch.int32),
                     scalar(1024), 0.05, True, 0.01, True, 1e-12),
        perturb_case(w.clone(), g, bk.clone(), None, None, None, scalar(0.125), 0.05, True, 0.0, False, 1e-12),
        perturb_case(w16.clone(), g16, None, master, partials, torch.zeros(1, dtype=torch.int32), scalar(1024), 0.05,
                     True, 0.01, True, 1e-12),
        ("restore", (w.clone(), bk, None)),
        ("restore", (w16.clone(), None, master)),
        sgd_case(w.clone(), bk, None, g, t(), step, None, None, 0.1, 0.9, 0.0, 1e-4, True, False),
        sgd_case(w.clone(), bk, None, g, None, scalar(0), scalar(1024), scalar(0), 0.1, 0.0, 0.0, 0.0, False,
                         True),
        sgd_case(w.clone(), bk, None, g, t(), step, scalar(1024), scalar(1), 0.1, 0.9, 0.0, 0.0, False,
                         False),
        sgd_case(w16.clone(), None, master.clone(), g16, t(), step, None, None, 0.1, 0.9, 0.0, 1e-4, True,
                         False),
        adam_case(w.clone(), bk, None, g, t(0.1), t(0.1).abs(), t(0.1).abs(), step, None, None, 1e-3, 0.9,
                          0.999, 1e-8, 0.01, True, False),
        adam_case(w.clone(), bk, None, g, t(0.1), t(0.1).abs(), None, scalar(0), scalar(512), scalar(0), 1e-3,
                          0.9, 0.999, 1e-8, 0.01, False, True),
        adam_case(w.clone().bfloat16(), bk.bfloat16(), None, g16, t(0.1), t(0.1).abs(), None, step,
                          scalar(2.0**-3), scalar(math.nan), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False),
        adam_case(w16.clone(), None, master.clone(), g16, t(0.1), t(0.1).abs(), t(0.1).abs(), step,
                          scalar(2.0**-3), scalar(0), 1e-3, 0.9, 0.999, 1e-8, 0.01, True, False),
        # lr / rho as float64 tensors (capturable=True; the floats 0.0, unused), a 0-d view like the step
        perturb_case(w.clone(), g, bk.clone(), None, partials, torch.zeros(1, dtype=torch.int32), scalar(1024),
                     0.0, True, 0.01, True, 1e-12, hyper(0.05)),
        perturb_case(w16.clone(), g16, None, master, None, None, scalar(0.125), 0.0, False, 0.0, False, 1e-12,
                     hyper(0.05)),
        sgd_case(w.clone(), bk, None, g, t(), step, scalar(1024), scalar(0), 0.0, 0.9, 0.1, 1e-4, False,
                         True, hyper(0.1)),
        sgd_case(w16.clone(), None, master.clone(), g16, t(), step, None, None, 0.0, 0.9, 0.0, 1e-4, True,
                         False, hyper(0.1)),
        adam_case(w.clone(), bk, None, g, t(0.1), t(0.1).abs(), t(0.1).abs(), step, None, None, 0.0,
                          0.9, 0.999, 1e-8, 0.01, True, False, hyper(1e-3)),
        adam_case(w16.clone(), None, master.clone(), g16, t(0.1), t(0.1).abs(), None, step, scalar(2.0**-3),
                          scalar(0), 0.0, 0.9, 0.999, 1e-8, 0.01, False, True, hyper(1e-3)),
        # LookSAM's reuse step: reused (g_v, in the math dtype) and reuse_scale (float64, a 0-d view)
        sgd_case(w.double(), bk.double(), None, g.double(), t().double(), step, scalar(1024), scalar(0), 0.1,
                         0.9, 0.0, 1e-4, True, False, None, t().double(), hyper(0.7)),
        sgd_case(w16.clone(), None, master.clone(), g16, None, step, None, None, 0.0, 0.0, 0.0, 1e-4,
                         False, True, hyper(0.1), t(), hyper(0.7)),
        adam_case(w.clone(), bk, None, g, t(0.1), t(0.1).abs(), t(0.1).abs(), step, scalar(512), scalar(0),
                          1e-3, 0.9, 0.999, 1e-8, 0.01, True, False, None, t(), hyper(0.7)),
        adam_case(w16.clone(), None, master.clone(), g16, t(0.1), t(0.1).abs(), None, step, scalar(2.0**-3),
                          scalar(1), 1e-3, 0.9, 0.999, 1e-8, 0.01, False, True, None, t(), hyper(0.7)),
    ]


@needs_native
@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.fused_sam, name).default, args)


def test_opcheck_covers_every_op():
    assert {name for name, _ in _opcheck_cases()} == set(OPS)


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


def masters_of(opt) -> torch.Tensor:
    """The optimizer's float32 master weights, flattened in parameter order."""
    saved = {i: s["sam_master_weight"] for i, s in opt.state_dict()["state"].items()}
    return torch.cat([saved[i].reshape(-1) for i in sorted(saved)])


@needs_native
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base,kwargs", [
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
], ids=["adamw", "sgd"])
def test_twin_models_with_master_weights(base, kwargs, adaptive, dtype):
    """16-bit parameters with float32 masters: native's masters follow the reference backend's, and its
    weights are exactly their rounding."""
    model = mlp(dtype)
    twin = copy.deepcopy(model)
    sam = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=0.01 if adaptive else 0.0, master_weights=True)
    opt = FusedSAM(model.parameters(), base, backend="native", **sam, **kwargs)
    ref = FusedSAM(twin.parameters(), base, backend="reference", **sam, **kwargs)
    assert set(opt.backends.values()) == {"native"} and set(ref.backends.values()) == {"reference"}
    for m, o in ((model, opt), (twin, ref)):
        sam_train(m, o, steps=4, dtype=dtype)
    masters = masters_of(opt)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), masters.to(dtype))
    torch.testing.assert_close(masters, masters_of(ref), rtol=1e-5, atol=1e-6)


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
@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_ops_under_torch_compile_fullgraph(master):
    """The operators trace into a graph (mutations functionalised, the master's too) and run from it."""
    def step(w, g, bk, m, buf, partials, count, step, grad_scale, found_inf):
        torch.ops.fused_sam.sq_norm_partials(g, w, m, True, 0.01, partials)
        torch.ops.fused_sam.perturb(w, g, bk, m, partials, count, grad_scale, True, 0.01, True, 1e-12, 0.05, None)
        torch.ops.fused_sam.restore_update(*restore_update_args(SGDUpdate(momentum=0.9), w, bk, m, g, [buf], step,
                                                                grad_scale, found_inf))

    gen = torch.Generator().manual_seed(0)
    w, g, restore_point, buf = (torch.randn(5000, generator=gen) for _ in range(4))
    if master:
        w, g, bk, m = restore_point.bfloat16(), g.bfloat16(), None, restore_point
    else:
        bk, m = restore_point, None
    args = [w, g, bk, m, buf, torch.empty(1), torch.zeros(1, dtype=torch.int32)]
    args += [torch.tensor(1.0), torch.tensor(1024.0), torch.tensor(0.0)]
    expect = [None if a is None else a.clone() for a in args]
    step(*expect)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(*args)
    for a, b in zip(args, expect):
        assert (a is None and b is None) or torch.equal(a, b)


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
