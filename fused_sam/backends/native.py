"""The native backend: the SAM step's arithmetic as compiled C++/CUDA operators (``torch.ops.fused_sam``).

The operators live in the optional extension ``fused_sam._C`` (built by setup.py from csrc/), registered
with the dispatcher for CPU and, when built with CUDA, for CUDA devices. Each method below is one operator
call, one pass over the span; the step values (``StepScalars``) go in as tensors that the kernels read
themselves, and so do lr and rho when they live on the device (``capturable=True``: float64 tensors passed
as the operators' last argument ``lr_tensor`` / ``rho_tensor``, which replaces the float before it) and
LookSAM's reuse scale (``span.reused`` and ``scalars.reuse_scale`` go in as ``reused`` / ``reuse_scale``), and
the telemetry sums buffers of perturb and restore_update (``sums``, the last argument; None runs the kernels
without telemetry).
Every fused base update is one operator, ``restore_update``, told the base by its description
(fused_sam/updates.py): its code, its state buffers, its float settings and its flags.
Spans with master weights pass their float32 ``master`` in place of the backup (every operator takes both,
exactly one of them set). Without the extension the backend is unavailable and says why.
"""
from __future__ import annotations

import re
import warnings
from typing import Dict, Optional

import torch

from .base import Backend, Hyperparameter, Perturbation, Span, StepScalars, required, self_check_skipped

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C  # registers torch.ops.fused_sam.*
except Exception as exc:  # not built, or built against another torch: the package works without it
    _C = None
    _IMPORT_ERROR: Optional[str] = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None
    # The overloads themselves: calling them skips the OpOverloadPacket's overload resolution on every call.
    _sq_norm_partials = torch.ops.fused_sam.sq_norm_partials.default
    _perturb = torch.ops.fused_sam.perturb.default
    _restore = torch.ops.fused_sam.restore.default
    _restore_update = torch.ops.fused_sam.restore_update.default
    _LOADED_CAPABILITY = _C.cpu_capability()  # the best build this CPU runs, or FUSED_SAM_CPU_CAPABILITY's


def extension_unavailable_reason() -> Optional[str]:
    """None if fused_sam._C is loaded, else why not."""
    if _C is None:
        if "no module named" in str(_IMPORT_ERROR).lower():  # no file: it was never built
            return (
                f"the compiled extension fused_sam._C is not built ({_IMPORT_ERROR}): a plain `pip install .` "
                "builds in an isolated environment where torch is not importable, so it builds no extension (or "
                "the optional build failed: see the install log); install torch first, then reinstall with "
                "`pip install --no-build-isolation .` (until then, auto uses backend 'torch' on CPU)"
            )
        return (
            f"the compiled extension fused_sam._C is built but could not be loaded ({_IMPORT_ERROR}), e.g. "
            "built against another torch version: rebuild it against this torch with "
            "`pip install --no-build-isolation .`"
        )
    return None


def cuda_archs() -> tuple:
    """The CUDA images the extension holds, from the build's -gencode flags: cubins "sm_XY" and PTX
    "compute_XY", e.g. ("sm_75", "sm_80", ..., "compute_120"); () without CUDA kernels."""
    return tuple(a for a in _extension().CUDA_ARCHS.split(",") if a)


def _image_version(arch: str):
    """("sm" or "compute", (major, minor), arch-specific) of "sm_90", "compute_120", "sm_90a"."""
    found = re.fullmatch(r"(sm|compute)_(\d+)(\d)(a?)", arch)
    if found is None:
        raise ValueError(f"not a CUDA image name: {arch!r}")
    return found.group(1), (int(found.group(2)), int(found.group(3))), bool(found.group(4))


def missing_cuda_image_reason(archs, capability) -> Optional[str]:
    """None if one of the images ``archs`` (names as ``cuda_archs()`` gives them) runs on a GPU of compute
    capability ``capability`` (major, minor), else why not. A cubin sm_XY runs on major X with minor >= Y
    (sm_XYa on X.Y only); PTX compute_XY runs on X.Y and newer, compiled by the driver when first loaded."""
    capability = tuple(capability)
    for arch in archs:
        kind, version, specific = _image_version(arch)
        if kind == "compute":
            runs = capability >= version
        elif specific:
            runs = capability == version
        else:
            runs = capability[0] == version[0] and capability[1] >= version[1]
        if runs:
            return None
    major, minor = capability
    return (
        f"fused_sam._C holds no CUDA kernel image for this GPU (compute capability {major}.{minor}); it was built "
        f"for {', '.join(archs) or 'no CUDA architecture'}: rebuild it with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" "
        "(or unset, for every architecture this torch supports) and `pip install --no-build-isolation .`"
    )


def _extension():
    if _C is None:
        raise RuntimeError(extension_unavailable_reason())
    return _C


def cpu_capability() -> str:
    """The instruction set of the CPU kernels in use: 'default' or 'avx2' (AVX-512 CPUs run avx2). Chosen when
    the extension loads: the best one built that this CPU runs, or the one FUSED_SAM_CPU_CAPABILITY names; then
    held to 'default' bit for bit before the native backend first runs (``verify_cpu_capability``)."""
    return _extension().cpu_capability()


def cpu_capabilities() -> tuple:
    """The instruction sets of the CPU kernels built into the extension that this CPU runs, in increasing order."""
    return _extension().cpu_capabilities()


def set_cpu_capability(name: str) -> None:
    """Runs the CPU kernels built for ``name`` ('default', 'avx2') from now on, in this process.
    ValueError for an unknown name, or one this build or this CPU lacks."""
    _extension().set_cpu_capability(name)


# The outcome of verify_cpu_capability, once per process: instruction set -> None (agrees with 'default') or the
# first operation in which it did not.
_cpu_self_check: Optional[Dict[str, Optional[str]]] = None


def verify_cpu_capability() -> Dict[str, Optional[str]]:
    """Holds the SIMD build of the CPU kernels in use to the 'default' build, bit for bit, on awkward sizes,
    every operation and dtype (fused_sam.selfcheck.cpu_isa_disagreement; 110-140 ms on 2 idle CPU cores,
    once per process). A build that disagrees is not used: the next one down is checked and used instead, with one
    warning that names the build and the operation. Returns what was checked: instruction set -> None, or
    the case it got wrong. FUSED_SAM_SKIP_SELF_CHECK=1 skips it (returns {})."""
    global _cpu_self_check
    if _cpu_self_check is not None:
        return _cpu_self_check
    from ..selfcheck import cpu_isa_disagreement

    outcome: Dict[str, Optional[str]] = {}
    _cpu_self_check = outcome  # the check itself makes NativeBackend instances
    if self_check_skipped():
        return outcome
    usable = cpu_capabilities()
    chosen = "default"
    for isa in reversed(usable[: usable.index(_LOADED_CAPABILITY) + 1]):
        if isa == "default":
            break
        outcome[isa] = cpu_isa_disagreement(isa)
        if outcome[isa] is None:
            chosen = isa
            break
        warnings.warn(
            f"fused_sam: the native CPU kernels built for {isa} disagree with the default build ({outcome[isa]}): "
            "not using them; FUSED_SAM_CPU_CAPABILITY=default or backend='torch' avoids this check; please "
            "report it with the output of `fused-sam check --json`", RuntimeWarning, stacklevel=3)
    # A build chosen by hand since the load (set_cpu_capability) stays, unless it is one that disagreed.
    if cpu_capability() == _LOADED_CAPABILITY or outcome.get(cpu_capability()):
        set_cpu_capability(chosen)
    return outcome


def _float_or_tensor(value: Hyperparameter) -> tuple:
    """lr or rho as the operators take it: (the float, None), or (0.0, the float64 tensor), which the kernels
    read in place of the float."""
    return (0.0, value) if isinstance(value, torch.Tensor) else (value, None)


class NativeBackend(Backend):
    name = "native"
    supports_master_weights = True

    def __init__(self):
        if _C is not None:
            verify_cpu_capability()

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = extension_unavailable_reason()
        if reason:
            return reason
        device = torch.device(device)
        if dtype not in _SUPPORTED_DTYPES:
            return f"the native kernels support float32, float64, bfloat16 and float16 parameters, not {dtype}"
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if not _C.WITH_CUDA:
                return (
                    "fused_sam._C was built without CUDA kernels (torch without CUDA or no nvcc at build time, "
                    "or FUSED_SAM_CUDA=0); rebuild with FUSED_SAM_CUDA=1 to get them"
                )
            if not torch.cuda.is_available():  # nothing to check against: torch's own error says why
                return None
            return missing_cuda_image_reason(cuda_archs(), torch.cuda.get_device_capability(device))
        return f"the native kernels run on CPU and CUDA devices, not {device.type}"

    def partials_len(self, span: Span) -> int:
        n = span.numel
        if span.device.type == "cuda":
            blocks = -(-n // _C.CUDA_NORM_BLOCK_ELEMS)
            return max(1, min(blocks, _C.CUDA_NORM_MAX_BLOCKS))
        return max(1, -(-n // _C.CPU_NORM_CHUNK))

    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        _sq_norm_partials(span.grads, span.weights, span.master, perturbation.adaptive, perturbation.eta, out)

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
        scalars: StepScalars,
        sums: Optional[torch.Tensor] = None,
    ) -> None:
        rho, rho_tensor = _float_or_tensor(required(scalars, "rho"))
        _perturb(
            span.weights, span.grads, span.backup, span.master, partials,
            nonfinite_count if partials is not None else None, scalars.grad_scale,
            perturbation.adaptive, perturbation.eta, perturbation.normalize, perturbation.eps, rho, rho_tensor, sums,
        )

    def restore(self, span: Span) -> None:
        _restore(span.weights, span.backup, span.master)

    def restore_and_update(self, span: Span, update, scalars: StepScalars, sums: Optional[torch.Tensor] = None) -> None:
        lr, lr_tensor = _float_or_tensor(required(scalars, "lr"))
        _restore_update(
            span.weights, span.backup, span.master, span.grads, [span.state[name] for name in update.needed_state()],
            required(scalars, "step"), scalars.grad_scale, scalars.found_inf, span.reused, scalars.reuse_scale,
            update.code, update.flags(), update.hyperparameters(), lr, lr_tensor, sums,
        )
