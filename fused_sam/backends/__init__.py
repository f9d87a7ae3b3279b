"""Backend registry: resolves ``backend=`` names to one Backend instance per (device, dtype).

Backends are imported lazily, so ``import fused_sam`` never imports Triton or loads the C++ extension.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..updates import capturing
from .base import Backend, KernelLaunches, Perturbation, Span, StepScalars, self_check_skipped

__all__ = [
    "Backend", "BackendReport", "BackendUnavailable", "KernelLaunches", "Perturbation", "Span", "available_backends",
    "backend_names", "backend_report",
    "StepScalars", "check_backend_name", "resolve_backend",
]

# name -> (module, class); a backend whose module fails to import is unavailable, with that reason.
_REGISTRY: Dict[str, Tuple[str, str]] = {
    "reference": ("fused_sam.backends.reference", "ReferenceBackend"),
    "triton": ("fused_sam.backends.triton", "TritonBackend"),
    "native": ("fused_sam.backends.native", "NativeBackend"),
    "torch": ("fused_sam.backends.torch_ops", "TorchBackend"),
}
# Fastest first, per device type; "reference" runs everywhere and ends every list. On CPU "torch" (stock torch
# ops, chunked and in place) is the fallback when fused_sam._C is not built: faster than the reference and
# than classic SAM. It is not in the CUDA list: not yet measured or run on a GPU.
_AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "native", "reference"),
    "cpu": ("native", "torch", "reference"),
}
_instances: Dict[str, Backend] = {}
# Where ``auto`` holds a compiled backend to the reference before first using it (a known-answer check of the
# kernels the optimizer will launch, once per process and configuration): kernels that no machine of ours
# runs. On a CPU the native kernels' SIMD build is held to their default build instead (NativeBackend).
_SELF_CHECKED_DEVICE_TYPES: Tuple[str, ...] = ("cuda",)
_COMPILED: Tuple[str, ...] = ("triton", "native")
_self_checks: Dict[tuple, Optional[str]] = {}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


def backend_names() -> tuple:
    """Every name ``backend=`` accepts."""
    return ("auto",) + tuple(_REGISTRY)


def check_backend_name(name) -> None:
    if name not in backend_names():
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")


def _load(name: str) -> Tuple[Optional[Backend], Optional[str]]:
    if name in _instances:
        return _instances[name], None
    module_name, class_name = _REGISTRY[name]
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:  # an optional dependency missing or broken: report, never crash auto
        return None, f"{module_name} could not be imported ({type(exc).__name__}: {exc})"
    _instances[name] = cls()
    return _instances[name], None


def _reason(name: str, device: torch.device, dtype: torch.dtype,
            master: bool = False) -> Tuple[Optional[Backend], Optional[str]]:
    backend, reason = _load(name)
    if backend is None:
        return None, reason
    reason = backend.unavailable_reason(device, dtype)
    if reason is None and master and not backend.supports_master_weights:
        reason = "it has no master-weights kernels yet"
    return (None, reason) if reason else (backend, None)


def _self_check_failure(backend: Backend, device: torch.device, dtype: torch.dtype, master: bool,
                        launches: Optional[Callable[[], KernelLaunches]]) -> Optional[str]:
    """None if ``auto`` may use ``backend`` here, else what its known-answer check got wrong."""
    if (launches is None or device.type not in _SELF_CHECKED_DEVICE_TYPES or backend.name not in _COMPILED
            or self_check_skipped() or capturing()):
        return None
    what = launches()
    key = (backend.name, str(device), dtype, master, what.key())
    if key not in _self_checks:
        from ..selfcheck import known_answer_failure

        _self_checks[key] = known_answer_failure(backend, device, dtype, master, what)
    return _self_checks[key]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, master: bool = False,
                    launches: Optional[Callable[[], KernelLaunches]] = None) -> Backend:
    """The backend that runs parameters of ``dtype`` on ``device`` for ``backend=name`` (with a float32
    master copy of the weights if ``master``). For ``auto`` on a CUDA device, ``launches()`` (the updates
    and perturbations the optimizer will run) has each compiled candidate held to the reference first; one
    that fails is passed over with a warning."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            backend, _ = _reason(candidate, device, dtype, master)
            if backend is None:
                continue
            failure = _self_check_failure(backend, device, dtype, master, launches)
            if failure is None:
                return backend
            warnings.warn(
                f"fused_sam: backend {candidate!r} failed its known-answer check on {device} for {dtype} parameters "
                f"({failure}); auto passes it over. `fused-sam check` holds every backend to the reference; "
                "FUSED_SAM_SKIP_SELF_CHECK=1 turns this check off", RuntimeWarning, stacklevel=4)
        return _load("reference")[0]
    check_backend_name(name)
    backend, reason = _reason(name, device, dtype, master)
    if backend is None:
        what = f"{dtype} parameters{' with master weights' if master else ''} on {device}"
        raise BackendUnavailable(f"backend {name!r} is unavailable for {what}: {reason}")
    return backend


def _missing_device(device: torch.device) -> Optional[str]:
    """Why no backend can run on ``device`` here (a CUDA device this machine does not have), or None."""
    if device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return "this machine has no CUDA device (torch.cuda.is_available() is False)"
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"there is no {device} here (torch.cuda.device_count() is {torch.cuda.device_count()})"
    return None


def _in_auto_order(device: torch.device) -> List[str]:
    """Every backend name: those ``auto`` tries on this device type first, in its order, then the rest."""
    order = list(_AUTO_ORDER.get(device.type, ("reference",)))
    return order + [name for name in _REGISTRY if name not in order]


class BackendReport(dict):
    """``{backend name: None where it can run, else the sentence saying why not}`` for one device, dtype and
    master-weights choice, in the order ``auto`` tries them (then the backends it never picks there). Printed,
    it reads as a report; ``.available`` lists what can run, ``.auto`` is what ``backend="auto"`` takes."""

    def __init__(self, device: torch.device, dtype: torch.dtype, master: bool, reasons: Dict[str, Optional[str]]):
        super().__init__(reasons)
        self.device, self.dtype, self.master = device, dtype, master
        self.auto_order = tuple(_AUTO_ORDER.get(device.type, ("reference",)))

    @property
    def available(self) -> List[str]:
        return [name for name, reason in self.items() if reason is None]

    @property
    def auto(self) -> Optional[str]:
        return next((name for name in self.auto_order if self.get(name) is None), None)

    def __str__(self) -> str:
        what = f"{self.dtype} parameters{' with float32 master weights' if self.master else ''} on {self.device}"
        lines = [f"fused_sam backends for {what}; backend='auto' tries {', '.join(self.auto_order)} and takes "
                 f"{self.auto or 'none of them'}:"]
        width = max(len(name) for name in self)
        for name, reason in self.items():
            status = "available" if reason is None else f"unavailable: {reason}"
            if name == self.auto:
                status += " (auto's choice)"
            elif name not in self.auto_order and reason is None:
                status += f" (by name only: auto does not try it on {self.device.type})"
            lines.append(f"  {name.ljust(width)}  {status}")
        return "\n".join(lines)

    __repr__ = __str__


def available_backends(device="cpu", dtype: torch.dtype = torch.float32, master: bool = False) -> List[str]:
    """Names of the backends that can run ``dtype`` parameters on ``device`` here (with master weights if
    ``master``), in the order ``auto`` tries them, then any it never picks there (e.g. triton on a CPU,
    under Triton's interpreter); ``backend_report`` says why the others cannot."""
    return backend_report(device, dtype, master).available


def backend_report(device="cpu", dtype: torch.dtype = torch.float32, master: bool = False) -> BackendReport:
    """Every backend, in the order ``auto`` tries them on ``device``: None where it can run ``dtype``
    parameters there, else the sentence saying why not (e.g. that fused_sam._C was not built, and how to
    build it). ``print(fused_sam.backend_report())`` shows it as a report."""
    device = torch.device(device)
    missing = _missing_device(device)
    reasons = {name: missing or _reason(name, device, dtype, master)[1] for name in _in_auto_order(device)}
    return BackendReport(device, dtype, master, reasons)
