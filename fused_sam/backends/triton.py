"""The triton backend: the SAM step in three Triton kernel launches per span (at most four).

Launches per span and SAM step, and why not fewer:

1. ``sq_norm_partials`` (first_step, only when a group normalizes): a grid-stride reduction writing one
   float32 partial per program (at most ``MAX_PARTIALS``) into the device's shared partials buffer. The
   norm is global over every span of the device, so nothing may move a weight before all partials are
   written: this is the one grid-wide dependency and it costs a launch boundary. No atomics, so the sum
   is deterministic, and no host sync.
2. ``perturb`` (first_step): every program re-reduces the whole partials buffer itself (a few KiB from
   L2, in a fixed order, so all programs agree bit for bit), computes rho / (sqrt(sum) + eps) on the
   device, and writes the exact backup of w and w + e in one pass. A separate "finalize the norm" kernel
   would be a fourth launch and a dependency; re-reducing is cheaper than that.
3. ``restore_and_update`` (second_step): reads backup, the gradient taken at w + e and the optimizer
   state, and writes w and the state in one pass: the restore is fused into the SGD/Adam/AdamW update.
   With a base optimizer that is not fused, ``restore`` (a copy kernel) runs instead and the base
   optimizer's own step follows.

The fourth "launch" of a step is the optimizer's single ``zero_()`` of the gradient buffer.

Partials layout: the optimizer hands each span a slice of one per-device buffer; this backend writes
``partials_len(span) = min(ceil(numel / BLOCK), MAX_PARTIALS)`` entries there, one per program of the
norm kernel. Its dtype is the buffer's (float64 if any float64 span shares the device); the perturb
kernel re-reduces in that dtype.

Block size: every kernel streams ``BLOCK = 4096`` elements per program (iteration) with 8 warps, 16
elements per thread: four 16-byte vector loads per operand per thread in flight, enough to cover HBM
latency on A100/H100-class parts while keeping the Adam kernel (five streams) well under the register
limit. Spans start on 16-element boundaries and their lengths are multiples of 16 (``flat.ALIGN``
padding); Triton specialises pointers on 16-byte alignment and sizes on divisibility by 16, so the
masked loads and stores compile to 16-byte vector accesses. (A span whose length is not a multiple of 16,
as in the unit tests, is still correct but gets scalar accesses.) Perturb is grid-stride capped at ``PERTURB_MAX_PROGRAMS`` programs so the
partials re-reduction is amortised over several blocks on large spans.

Scalars that change between steps (lr, rho, bias corrections computed on the host in double from the
step count, as torch.optim does) are passed as Python floats, i.e. float32 kernel arguments: a new value
neither recompiles nor syncs. Integers passed are only sizes (Triton may specialise those equal to 1 or
divisible by 16, which changes only when the layout does). The one step-dependent switch is SGD's
first-step momentum initialisation, a ``constexpr`` that compiles a second variant once.

float32, bfloat16 and float16 parameters are supported (math and state in float32). float64 is refused:
Triton passes Python floats as float32, too coarse for the float64 math the reference backend does.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Optional

import torch

from ..updates import AdamUpdate, SGDUpdate
from .base import Backend, Perturbation, Span

try:
    import triton

    from . import triton_kernels as _k
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    _k = None
    _IMPORT_ERROR = f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"

BLOCK = 4096
NUM_WARPS = 8
MAX_PARTIALS = 512
PERTURB_MAX_PROGRAMS = 4096
PARTIALS_BLOCK = 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _rtne_bf16(span: Span) -> bool:
    """Round float32 -> bfloat16 stores by hand: only the interpreter needs it (it truncates)."""
    return span.weights.dtype == torch.bfloat16 and _interpreting()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _f32(x: float) -> float:
    """``x`` rounded to float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device and stream."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        device = torch.device(device)
        if dtype not in SUPPORTED_DTYPES:
            return (f"the triton backend supports float32, bfloat16 and float16 parameters, not {dtype} "
                    "(its kernels take float32 scalars, too coarse for float64 math)")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "CUDA is not available"
            if torch.version.hip is None:
                major, minor = torch.cuda.get_device_capability(device)
                if (major, minor) < (7, 0):
                    return f"Triton needs a GPU of compute capability 7.0 or newer, this one is {major}.{minor}"
                if dtype == torch.bfloat16 and major < 8:
                    return f"bfloat16 kernels need compute capability 8.0 or newer, this GPU is {major}.{minor}"
            return None
        if device.type == "cpu":
            if _interpreting():
                return None
            return ("the triton backend needs CUDA tensors (CPU tensors run only under Triton's interpreter, "
                    "TRITON_INTERPRET=1, which is for tests)")
        return f"the triton backend needs CUDA tensors, not {device.type} tensors"

    # --- first_step ------------------------------------------------------------------------------

    def partials_len(self, span: Span) -> int:
        return max(1, min(_cdiv(span.numel, BLOCK), MAX_PARTIALS))

    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        programs = self.partials_len(span)
        if out.numel() != programs:
            raise ValueError(f"partials slice has {out.numel()} elements, the triton backend writes {programs}")
        with _on(span.device):
            _k.sq_norm_partials_kernel[(programs,)](
                span.grads, span.weights, out, span.numel, float(perturbation.eta),
                ADAPTIVE=bool(perturbation.adaptive), BLOCK=BLOCK, num_warps=NUM_WARPS,
            )

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
    ) -> None:
        has_partials = partials is not None
        has_count = has_partials and nonfinite_count is not None
        programs = max(1, min(_cdiv(span.numel, BLOCK), PERTURB_MAX_PROGRAMS))
        with _on(span.device):
            _k.perturb_kernel[(programs,)](
                span.weights, span.grads, span.backup,
                partials if has_partials else span.grads,
                nonfinite_count if has_count else span.grads,
                span.numel, partials.numel() if has_partials else 0,
                float(perturbation.rho), float(perturbation.eta), float(perturbation.eps),
                HAS_PARTIALS=has_partials, PARTIALS_F64=has_partials and partials.dtype == torch.float64,
                NORMALIZE=bool(perturbation.normalize),
                ADAPTIVE=bool(perturbation.adaptive), HAS_COUNT=has_count,
                BLOCK=BLOCK, PBLOCK=PARTIALS_BLOCK, RTNE_BF16=_rtne_bf16(span), num_warps=NUM_WARPS,
            )

    # --- second_step -----------------------------------------------------------------------------

    def restore(self, span: Span) -> None:
        with _on(span.device):
            _k.copy_kernel[(max(1, _cdiv(span.numel, BLOCK)),)](
                span.backup, span.weights, span.numel, BLOCK=BLOCK, num_warps=NUM_WARPS,
            )

    def restore_and_update(self, span: Span, update) -> None:
        if isinstance(update, SGDUpdate):
            launch = self._sgd
        elif isinstance(update, AdamUpdate):
            launch = self._adam
        else:
            raise TypeError(f"unknown base update {type(update).__name__}")
        with _on(span.device):
            launch(span, update, (max(1, _cdiv(span.numel, BLOCK)),))

    @staticmethod
    def _sgd(span: Span, u: SGDUpdate, grid) -> None:
        has_momentum = u.momentum != 0
        _k.sgd_kernel[grid](
            span.weights, span.backup, span.grads,
            span.state["momentum_buffer"] if has_momentum else span.grads, span.numel,
            -float(u.lr), float(u.weight_decay), float(u.momentum), 1.0 - float(u.dampening),
            MAXIMIZE=bool(u.maximize), HAS_WD=u.weight_decay != 0, HAS_MOMENTUM=has_momentum,
            FIRST=span.step == 0, NESTEROV=bool(u.nesterov),
            BLOCK=BLOCK, RTNE_BF16=_rtne_bf16(span), num_warps=NUM_WARPS,
        )

    @staticmethod
    def _adam(span: Span, u: AdamUpdate, grid) -> None:
        step = span.step + 1
        step_size = u.lr / (1 - u.beta1**step)
        bias_correction2_sqrt = (1 - u.beta2**step) ** 0.5
        # torch.lerp takes its scalar weight in float32 and picks its formula on that value
        lerp_weight = _f32(1 - u.beta1)
        state = span.state
        _k.adam_kernel[grid](
            span.weights, span.backup, span.grads,
            state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"] if u.amsgrad else state["exp_avg_sq"],
            span.numel,
            1 - u.lr * u.weight_decay, float(u.weight_decay), lerp_weight, _f32(1.0 - lerp_weight),
            float(u.beta2), 1 - float(u.beta2), float(bias_correction2_sqrt), float(u.eps), -float(step_size),
            MAXIMIZE=bool(u.maximize), L2_WD=u.weight_decay != 0 and not u.decoupled,
            DECOUPLED_WD=u.weight_decay != 0 and bool(u.decoupled), AMSGRAD=bool(u.amsgrad),
            LERP_SMALL=abs(lerp_weight) < 0.5, BLOCK=BLOCK, RTNE_BF16=_rtne_bf16(span), num_warps=NUM_WARPS,
        )
