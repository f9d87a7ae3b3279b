"""The triton backend: the SAM step in three Triton kernel launches per span (at most four).

Launches per span and SAM step, and why not fewer:

1. ``sq_norm_partials`` (first_step, only when a group normalizes): a grid-stride reduction writing one
   float32 partial per program (at most ``MAX_PARTIALS``) into the device's shared partials buffer. The
   norm is global over every span of the device, so nothing may move a weight before all partials are
   written: this is the one grid-wide dependency and it costs a launch boundary. No atomics, so the sum
   is deterministic, and no host sync.
2. ``perturb`` (first_step): every program re-reduces the whole partials buffer itself (a few KiB from
   L2, in a fixed order, so all programs agree bit for bit), computes rho / (sqrt(sum) + eps * s) on the
   device (s: GradScaler's scale, read from its tensor), and writes the exact backup of w and w + e in
   one pass. A separate "finalize the norm" kernel would be a fourth launch and a dependency;
   re-reducing is cheaper than that. With telemetry (``sums``) the kernel's ``TELEMETRY`` variant also
   writes the partial sums of e.g1 from registers (e as written), one per program (``partials_len(span)``
   programs), moving no extra bytes per element.
3. ``restore_and_update`` (second_step): reads backup, the gradient taken at w + e and the optimizer
   state, and writes w and the state in one pass: the restore is fused into the SGD/Adam/AdamW update.
   The step count, GradScaler's scale and found_inf are read from their device tensors by the kernel
   (``StepScalars``); a skipped step (found_inf non-zero) writes w <- backup and leaves the state alone.
   LookSAM's reuse steps fold g + c * g_v into the same pass (``Span.reused``, c read from its tensor).
   With telemetry (``sums``) the kernel's ``TELEMETRY`` variant also reads the perturbed weights and writes
   the partial sums of e.e, e.g2 and g2.g2, one row per program (``partials_len(span)`` programs).
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
as in the unit tests, is still correct but gets scalar accesses.) Perturb and the updates are grid-stride,
capped at ``MAX_STREAM_PROGRAMS`` programs, so what each program computes before streaming (perturb's
partials re-reduction, Adam's float64 bias corrections) is amortised over several blocks on large spans.

Settings are kernel arguments: Python floats, i.e. float32, or, where the math needs float64 (Adam's betas,
eps for float64 partials), their bit patterns as int64 (``float64_bits``), not specialised on. lr and rho
(``StepScalars``) reach every kernel one way (``_hyperparameter_args``): a Python float as its float64 bit
pattern, or with ``capturable=True`` a float64 tensor on the device that the kernels' ``LR_ON_DEVICE`` /
``RHO_ON_DEVICE`` variants load, so a CUDA graph replay sees a scheduler's in-place update. Either way the
kernel holds the same float64 and derives everything from it (SGD's -lr, Adam's step size, AdamW's
1 - lr * wd) in float64, rounded to float32 where the math needs it: the two give the same bits. A new value
neither recompiles nor syncs.
The per-step values on the device (step count, grad scale, found_inf) are tensors the kernels load, so
the step-dependent branches (SGD's first-step momentum initialisation, Adam's bias corrections, the
skip) are taken on the device. Other integers passed are only sizes (Triton may specialise those equal to
1 or divisible by 16, which changes only when the layout does).

Master weights (bfloat16/float16 spans with a float32 ``master``, see ``Span``): the same launches, each
kernel's ``MASTER`` variant. The master is read where w is (the ASAM norm, perturb, the updates); perturb
writes only the rounding of master + e (no backup), the updates write the master and its rounding,
``restore`` rounds the master into the weights. Roundings are to nearest even, as torch's ``.to()``.

float32, bfloat16 and float16 parameters are supported (math and state in float32). float64 is refused:
Triton passes Python floats as float32, too coarse for the float64 math the reference backend does.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .base import Backend, Hyperparameter, Perturbation, Span, StepScalars, check_reuse_inputs, required

try:
    import triton

    from . import triton_kernels as _k
    from .triton_kernels import UPDATE_ARGUMENTS, float64_bits
    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    _k = None
    _IMPORT_ERROR = f"triton is not installed or failed to import ({type(exc).__name__}: {exc})"

BLOCK = 4096
NUM_WARPS = 8
# Options of every launch. enable_fp_fusion=False: no multiply-add contraction (Triton's default fuses
# a * b + c into one fma), so on a GPU each operation rounds as written, as under the interpreter and in the
# reference backend's formulas (the kernels are memory-bound; not yet timed on a GPU with this option).
LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)
MAX_PARTIALS = 512
MAX_STREAM_PROGRAMS = 4096
PARTIALS_BLOCK = 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _rtne_bf16(span: Span) -> bool:
    """Round float32 -> bfloat16 stores by hand: only the interpreter needs it (it truncates)."""
    return span.weights.dtype == torch.bfloat16 and _interpreting()


def _restore_point(span: Span) -> torch.Tensor:
    """Where the kernels' ``restore_ptr`` points: the float32 master if the span has one, else the backup."""
    return span.backup if span.master is None else span.master


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _hyperparameter_args(value: Hyperparameter, unused: torch.Tensor) -> tuple:
    """lr or rho as every kernel takes it: (pointer, float64 bits, ON_DEVICE): a float64 tensor is loaded by
    the kernel (``unused`` stands in for the pointer otherwise), a Python float travels as its bits."""
    if isinstance(value, torch.Tensor):
        return value, 0, True
    return unused, float64_bits(value), False


def _stream_grid(span: Span) -> tuple:
    """Programs of the grid-stride kernels that stream the span (perturb, the updates)."""
    return (max(1, min(_cdiv(span.numel, BLOCK), MAX_STREAM_PROGRAMS)),)


def _on(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device and stream."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class TritonBackend(Backend):
    name = "triton"
    supports_master_weights = True

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
        weights = span.weights if span.master is None else span.master  # ASAM's T = |w| + eta reads the master
        if out.numel() != programs:
            raise ValueError(f"partials slice has {out.numel()} elements, the triton backend writes {programs}")
        with _on(span.device):
            _k.sq_norm_partials_kernel[(programs,)](
                span.grads, weights, out, span.numel, float(perturbation.eta),
                ADAPTIVE=bool(perturbation.adaptive), BLOCK=BLOCK, **LAUNCH_OPTIONS,
            )

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
        scalars: StepScalars,
        sums: Optional[torch.Tensor] = None,
    ) -> None:
        if sums is not None:
            self._check_sums(span, sums, (self.partials_len(span),))
        has_partials = partials is not None
        has_count = has_partials and nonfinite_count is not None
        unused = span.grads  # stands in for the pointers a variant never reads
        grad_scale = scalars.grad_scale
        rho_ptr, rho_bits, rho_on_device = _hyperparameter_args(required(scalars, "rho"), unused)
        with _on(span.device):
            _k.perturb_kernel[self._grid(span, sums)](
                span.weights, span.grads, _restore_point(span),
                partials if has_partials else unused,
                nonfinite_count if has_count else unused,
                unused if grad_scale is None else grad_scale, rho_ptr, unused if sums is None else sums,
                span.numel, partials.numel() if has_partials else 0, rho_bits,
                float(perturbation.eta), float64_bits(perturbation.eps),
                HAS_PARTIALS=has_partials, NORMALIZE=bool(perturbation.normalize),
                ADAPTIVE=bool(perturbation.adaptive), HAS_COUNT=has_count, HAS_GRAD_SCALE=grad_scale is not None,
                RHO_ON_DEVICE=rho_on_device, MASTER=span.master is not None, TELEMETRY=sums is not None,
                BLOCK=BLOCK, PBLOCK=PARTIALS_BLOCK, RTNE_BF16=_rtne_bf16(span), **LAUNCH_OPTIONS,
            )

    # --- second_step -----------------------------------------------------------------------------

    def restore(self, span: Span) -> None:
        with _on(span.device):
            _k.copy_kernel[(max(1, _cdiv(span.numel, BLOCK)),)](
                _restore_point(span), span.weights, span.numel, BLOCK=BLOCK,
                # only a float32 master is rounded; a backup is copied bit for bit
                RTNE_BF16=span.master is not None and _rtne_bf16(span), **LAUNCH_OPTIONS,
            )

    def restore_and_update(self, span: Span, update, scalars: StepScalars, sums: Optional[torch.Tensor] = None) -> None:
        arguments = UPDATE_ARGUMENTS.get(update.name)
        if arguments is None:
            raise TypeError(f"unknown base update {type(update).__name__}")
        check_reuse_inputs(span, scalars)
        if sums is not None:
            self._check_sums(span, sums, (self.partials_len(span), 3))
        unused = span.grads  # stands in for the pointers a variant never reads
        reused = unused if span.reused is None else span.reused
        lr_ptr, lr_bits, lr_on_device = _hyperparameter_args(required(scalars, "lr"), unused)
        device_scalars = (
            required(scalars, "step"),
            unused if scalars.grad_scale is None else scalars.grad_scale,
            unused if scalars.found_inf is None else scalars.found_inf,
            lr_ptr,
            unused if scalars.reuse_scale is None else scalars.reuse_scale,
            unused if sums is None else sums,
        )
        variant = dict(HAS_GRAD_SCALE=scalars.grad_scale is not None, HAS_FOUND_INF=scalars.found_inf is not None,
                       LR_ON_DEVICE=lr_on_device, REUSE=span.reused is not None, MASTER=span.master is not None,
                       TELEMETRY=sums is not None, BLOCK=BLOCK, RTNE_BF16=_rtne_bf16(span), **LAUNCH_OPTIONS)
        kernel, state, values, flags = arguments(update, [span.state[name] for name in update.needed_state()], unused)
        with _on(span.device):
            getattr(_k, kernel)[self._grid(span, sums)](
                span.weights, _restore_point(span), span.grads, reused, *state, *device_scalars, span.numel, lr_bits,
                *values, **flags, **variant,
            )

    def _grid(self, span: Span, sums: Optional[torch.Tensor]) -> tuple:
        """With telemetry, program k writes row k of the sums: one program per row, partials_len(span) of them,
        striding over the blocks as the norm kernel does (perturb and the updates are elementwise: the same
        bits whatever the grid). Without it, the streaming grid."""
        return (self.partials_len(span),) if sums is not None else _stream_grid(span)

    def _check_sums(self, span: Span, sums: torch.Tensor, shape: tuple) -> None:
        """The kernels write row k at sums + k * (its width) in the buffer's dtype: refuse a buffer laid out
        otherwise (``shape``: partials_len rows, and the row's width for a 2-D buffer)."""
        if sums.shape != shape or not sums.is_contiguous():
            raise ValueError(f"sums must be a contiguous {shape} tensor for this span (partials_len rows), "
                             f"not {'a non-contiguous ' if not sums.is_contiguous() else ''}{tuple(sums.shape)}")
        if sums.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sums must be float32 or float64, not {sums.dtype}")
        if sums.device != span.device:
            raise ValueError(f"sums are on {sums.device}, the span on {span.device}")
