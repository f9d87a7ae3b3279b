"""The checks fused_sam runs before it trusts compiled kernels on the user's machine.

- The native CPU kernels' SIMD build is held to the default build bit for bit when the native backend is
  first made (``native.verify_cpu_capability``); a build that disagrees is not used.
- On a CUDA device, ``auto`` holds each compiled candidate to the reference for the kernels the optimizer
  will launch (``resolve_backend(..., launches)``), once per process and configuration. No GPU here: the
  same code runs on the CPU with the CPU made a checked device and a backend made wrong on purpose.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fused_sam.backends as registry
from fused_sam import FusedSAM
from fused_sam.backends import KernelLaunches, resolve_backend
from fused_sam.backends import native
from fused_sam.backends.reference import ReferenceBackend, telemetry_sums
from fused_sam.selfcheck import as_bits, known_answer_failure
from fused_sam.updates import AdamUpdate

CPU = torch.device("cpu")
NATIVE_MISSING = native.extension_unavailable_reason()
needs_simd_build = pytest.mark.skipif(
    NATIVE_MISSING is not None or len(native.cpu_capabilities() if NATIVE_MISSING is None else ()) < 2,
    reason=f"needs the native extension with a SIMD build this CPU runs ({NATIVE_MISSING or 'default only'})")


@pytest.fixture
def fresh_cpu_self_check(monkeypatch):
    """verify_cpu_capability runs anew, from the build chosen at load; the process's state comes back after."""
    before = native.cpu_capability()
    monkeypatch.setattr(native, "_cpu_self_check", None)
    monkeypatch.delenv("FUSED_SAM_SKIP_SELF_CHECK", raising=False)
    native.set_cpu_capability(native._LOADED_CAPABILITY)
    yield
    native.set_cpu_capability(before)


@needs_simd_build
def test_a_simd_build_that_agrees_is_kept(fresh_cpu_self_check):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outcome = native.verify_cpu_capability()
    best = native.cpu_capabilities()[-1]
    assert outcome == {best: None}
    assert native.cpu_capability() == best


@needs_simd_build
def test_a_simd_build_that_disagrees_is_not_used(fresh_cpu_self_check, monkeypatch):
    """One bit of one operation wrong in the SIMD build only: refused with one warning naming the build and
    the operation, and the default build runs."""
    best = native.cpu_capabilities()[-1]
    real = native._restore_update

    def wrong_in_simd_build(weights, *args):
        real(weights, *args)
        kind = args[9]
        if native.cpu_capability() == best and kind == AdamUpdate.code:
            as_bits(weights.view(-1)[-1:]).add_(1)

    monkeypatch.setattr(native, "_restore_update", wrong_in_simd_build)
    with pytest.warns(RuntimeWarning, match=f"built for {best} disagree with the default build "
                                            r"\(restore_and_update\(AdamUpdate") as record:
        outcome = native.verify_cpu_capability()
    assert len(record) == 1
    assert outcome[best].startswith("restore_and_update(AdamUpdate")
    assert native.cpu_capability() == "default"
    assert native.verify_cpu_capability() is outcome  # once per process


def test_the_self_check_can_be_turned_off(fresh_cpu_self_check, monkeypatch):
    if NATIVE_MISSING is not None:
        pytest.skip(NATIVE_MISSING)
    monkeypatch.setenv("FUSED_SAM_SKIP_SELF_CHECK", "1")
    assert native.verify_cpu_capability() == {}
    assert native.cpu_capability() == native._LOADED_CAPABILITY


class _AdamOffByOneUlp(ReferenceBackend):
    """The reference, but its Adam update writes one weight one ulp off: a wrong kernel of one kind only."""

    name = "adam-off"

    def restore_and_update(self, span, update, scalars, sums=None):
        super().restore_and_update(span, update, scalars, sums)
        if isinstance(update, AdamUpdate):
            span.weights[-1:] = torch.nextafter(span.weights[-1:], torch.full_like(span.weights[-1:], torch.inf))


class _SumsWithoutTheUnscale(ReferenceBackend):
    """The reference, but its telemetry sums take the scaled gradient: only telemetry is wrong."""

    name = "sums-scaled"

    def restore_and_update(self, span, update, scalars, sums=None):
        if sums is not None:
            telemetry_sums(span, None, sums)
        super().restore_and_update(span, update, scalars)


@pytest.fixture
def cpu_checked_like_cuda(monkeypatch):
    """The CPU treated as a device whose compiled backends auto checks first, with a candidate ahead of the
    usual ones; returns a function that installs a backend instance as that candidate."""
    monkeypatch.setattr(registry, "_SELF_CHECKED_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(registry, "_self_checks", {})
    monkeypatch.delenv("FUSED_SAM_SKIP_SELF_CHECK", raising=False)

    def install(backend):
        monkeypatch.setitem(registry._instances, backend.name, backend)
        monkeypatch.setitem(registry._REGISTRY, backend.name, ("unused", "unused"))
        monkeypatch.setitem(registry._AUTO_ORDER, "cpu", (backend.name,) + registry._AUTO_ORDER["cpu"])
        monkeypatch.setattr(registry, "_COMPILED", registry._COMPILED + (backend.name,))

    return install


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(dtype)


def test_auto_passes_over_a_backend_that_fails_its_known_answer_check(cpu_checked_like_cuda):
    cpu_checked_like_cuda(_AdamOffByOneUlp())
    with pytest.warns(RuntimeWarning, match=r"backend 'adam-off' failed its known-answer check on cpu for "
                                            r"torch.float32 parameters \(.*AdamUpdate\(.*amsgrad=True"):
        opt = FusedSAM(_model().parameters(), torch.optim.AdamW, lr=1e-3, amsgrad=True)
    assert "adam-off" not in opt.backends.values()
    usual = next(name for name in registry._AUTO_ORDER["cpu"][1:] if registry._reason(name, CPU, torch.float32)[0])
    assert list(opt.backends.values()) == [usual]


def test_auto_checks_only_the_kernels_the_optimizer_launches(cpu_checked_like_cuda):
    """An SGD optimizer launches no Adam kernel: the candidate is kept for it, and checked once."""
    cpu_checked_like_cuda(_AdamOffByOneUlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True)
        FusedSAM(_model().parameters(), torch.optim.SGD, lr=0.05, momentum=0.8, nesterov=True)
    assert set(opt.backends.values()) == {"adam-off"}
    assert len(registry._self_checks) == 1  # same kernels (lr, momentum values differ): one check


def test_a_right_candidate_is_kept_also_under_capturable(cpu_checked_like_cuda):
    cpu_checked_like_cuda(type("Right", (ReferenceBackend,), {"name": "right"})())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = FusedSAM(_model().parameters(), torch.optim.Adam, lr=1e-3, capturable=True)
    assert set(opt.backends.values()) == {"right"}
    (key,) = registry._self_checks
    assert key[-1][-2] is True  # the lr/rho-from-device-tensor kernels were among those checked


def test_the_known_answer_check_can_be_turned_off(cpu_checked_like_cuda, monkeypatch):
    cpu_checked_like_cuda(_AdamOffByOneUlp())
    monkeypatch.setenv("FUSED_SAM_SKIP_SELF_CHECK", "1")
    opt = FusedSAM(_model().parameters(), torch.optim.Adam, lr=1e-3)
    assert set(opt.backends.values()) == {"adam-off"}


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True)])
def test_known_answer_check_passes_every_cpu_backend(dtype, master):
    launches = KernelLaunches(
        updates=(AdamUpdate(weight_decay=0.1, decoupled=True, amsgrad=True),),
        perturbations=(registry.Perturbation(True, 0.01, True, 1e-12),), device_hyperparameters=True, telemetry=True)
    for name in registry.available_backends(CPU, dtype, master):
        backend = resolve_backend(name, CPU, dtype, master)
        assert known_answer_failure(backend, CPU, dtype, master, launches) is None, name
    assert "AdamUpdate(" in known_answer_failure(_AdamOffByOneUlp(), CPU, dtype, master, launches)
    assert "telemetry sums" in known_answer_failure(_SumsWithoutTheUnscale(), CPU, dtype, master, launches)
