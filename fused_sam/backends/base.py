"""The interface every backend implements.

The optimizer owns the flat buffers and the bookkeeping (which parameters take part, step counts, the
global norm across devices); a backend only does arithmetic over contiguous 1-D slices of those buffers,
called spans. Each method is one pass over a span, so a faster backend is a handful of kernels.

Conventions every backend follows:
- Math in float32 (float64 for float64 parameters); optimizer state is stored in that same dtype.
- Nothing syncs with the host. A base update's settings (betas, momentum, ...) and a perturbation's arrive
  as Python numbers in the update or ``Perturbation``; every per-step value arrives in one ``StepScalars``:
  lr and rho as one thing each (a Python float, or a float64 device tensor under capturable=True, decided
  once per optimizer), the step count, GradScaler's scale and found_inf as tensors read by the kernels, never
  by the host.
- ``partials`` is a 1-D tensor on the span's device holding squared-norm partial sums written by
  ``sq_norm_partials`` for every span on that device (possibly from several dtypes and backends); a
  consumer sums all of it to get ||g||^2 (or ||T*g||^2 for ASAM).
- Padding between parameters inside a span is zero in weights, grads and state, and stays zero.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from ..updates import BaseUpdate, remember


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math and of the optimizer state for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Span:
    """Contiguous 1-D slices of one flat segment: the unit every backend operation works on.

    ``state`` maps torch.optim state names ('momentum_buffer', 'exp_avg', 'exp_avg_sq',
    'max_exp_avg_sq') to slices of the segment's state buffers, in ``state_dtype``; a buffer is present
    only once the base update needs it.

    ``master`` (bf16/fp16 parameters with master weights): the float32 master copy of the weights. It is
    the exact restore point and what the norm (ASAM), the perturbation and the update read; the update
    writes it, and ``weights`` receive its rounding (perturb: the rounding of master + e). ``backup`` is
    then None.

    ``reused`` (LookSAM's reuse steps): a direction g_v in ``state_dtype`` that the update adds to the
    gradient, scaled by ``StepScalars.reuse_scale``; None otherwise.
    """

    weights: torch.Tensor
    grads: torch.Tensor
    backup: Optional[torch.Tensor]
    state: dict = field(default_factory=dict)
    master: Optional[torch.Tensor] = None
    reused: Optional[torch.Tensor] = None

    @property
    def numel(self) -> int:
        return self.weights.numel()

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def state_dtype(self) -> torch.dtype:
        return math_dtype(self.weights.dtype)


def grad_unscale(grad_scale: torch.Tensor) -> torch.Tensor:
    """The factor GradScaler's ``unscale_`` multiplies gradients by: 1 / scale in double, rounded to float32."""
    return grad_scale.double().reciprocal().float()


# lr or rho: a Python float, or (capturable=True) a float64 tensor of one element on the span's device, read by
# the kernels so that a replayed CUDA graph sees a scheduler's in-place update. A tensor enters the math exactly
# as the float does (a Python float is a double): the results are the float path's bit for bit.
Hyperparameter = Union[float, torch.Tensor]


@dataclass  # not frozen: a frozen dataclass's __init__ costs ~0.5 us more, twice per SAM step
class StepScalars:
    """The per-step values of one ``perturb`` or ``restore_and_update`` call: every value that may change from
    step to step without recompiling anything, in one object.

    step: float32, one element, on the span's device: how many base updates the span's parameters have
        had before this one (0 on the first, where SGD initialises its momentum buffer to the gradient
        and Adam's bias corrections use step 1). Needed by ``restore_and_update`` only.
    lr: the learning rate (``Hyperparameter``); needed by ``restore_and_update``.
    rho: the perturbation radius (``Hyperparameter``); needed by ``perturb``.
    grad_scale: None, or float32 with one element on the span's device: the gradients are scaled by it
        (GradScaler's scale); the update uses grads * (1 / grad_scale), the reciprocal taken in float32
        as GradScaler's ``unscale_`` does (for ``perturb`` see there).
    found_inf: None, or float32 with one element on the span's device: when non-zero (any non-zero
        value: GradScaler sums it over devices) the update is skipped: w <- backup exactly, state
        untouched. The caller advances the step count only where it is zero.
    reuse_scale: None, or float64 with one element on the span's device, given exactly when the span has
        ``reused``: the update's gradient is d = g + c * g_v (c this value rounded once to the math dtype,
        the sum in the math dtype, then unscaled by grad_scale), computed in registers: ``grads`` is not
        written. LookSAM's reuse step, c = alpha * ||g|| / ||g_v||, in one pass.
    """

    step: Optional[torch.Tensor] = None
    lr: Optional[Hyperparameter] = None
    rho: Optional[Hyperparameter] = None
    grad_scale: Optional[torch.Tensor] = None
    found_inf: Optional[torch.Tensor] = None
    reuse_scale: Optional[torch.Tensor] = None


def required(scalars: StepScalars, name: str):
    """``scalars.<name>``, which the operation cannot run without: a clear error where it is missing."""
    value = getattr(scalars, name)
    if value is None:
        raise ValueError(f"StepScalars.{name} is required here and was not given")
    return value


def check_reuse_inputs(span: Span, scalars: StepScalars) -> None:
    """A reused direction without its scale (or the reverse) would be read as something else: refuse."""
    if (span.reused is None) != (scalars.reuse_scale is None):
        raise ValueError("Span.reused and StepScalars.reuse_scale are given together or not at all")


@dataclass(frozen=True)
class Perturbation:
    """SAM settings of one param group: e = rho * T^2 * g / (||T g|| + eps), T = |w| + eta or 1 (rho, a
    per-step value, arrives in ``StepScalars``)."""

    adaptive: bool
    eta: float
    normalize: bool
    eps: float


_PERTURBATIONS: dict = {}


def perturbation_of(adaptive: bool, eta: float, normalize: bool, eps: float) -> Perturbation:
    """The ``Perturbation`` of these settings, made once per distinct setting: a frozen dataclass costs ~1 us
    to build, and every step reads every param group's."""
    key = (adaptive, eta, normalize, eps)
    found = _PERTURBATIONS.get(key)
    return found if found is not None else remember(_PERTURBATIONS, key, Perturbation(*key))


def self_check_skipped() -> bool:
    """FUSED_SAM_SKIP_SELF_CHECK=1 turns off the checks a backend passes before it is first trusted."""
    return os.environ.get("FUSED_SAM_SKIP_SELF_CHECK", "").strip() == "1"


@dataclass(frozen=True)
class KernelLaunches:
    """What an optimizer will launch on a device: its base updates (none for an unfused base), its param
    groups' perturbations, whether lr and rho come from device tensors (capturable=True), and whether the
    updates write telemetry sums (telemetry=True)."""

    updates: tuple
    perturbations: tuple
    device_hyperparameters: bool = False
    telemetry: bool = False

    def key(self) -> tuple:
        """The kernel instances these launch: flags, not values (a scheduled lr runs the same code)."""
        def flags(item):
            return (type(item).__name__,) + tuple(
                bool(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                for k, v in sorted(vars(item).items()) if k not in ("beta1", "beta2", "eps"))
        return (tuple(sorted({flags(u) for u in self.updates})), tuple(sorted({flags(p) for p in self.perturbations})),
                self.device_hyperparameters, self.telemetry)


class Backend(ABC):
    """One implementation of the SAM step's arithmetic. Stateless apart from caches."""

    name: str = ""
    supports_master_weights: bool = False  # can run spans with a float32 ``master`` (see Span)

    @classmethod
    @abstractmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None if this backend can run spans of this device and dtype, else a sentence saying why not."""

    def partials_len(self, span: Span) -> int:
        """How many squared-norm partials ``sq_norm_partials`` writes for this span."""
        return 1

    @abstractmethod
    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        """Write partial sums of g^2 (ASAM: (T g)^2) into ``out`` (length ``partials_len(span)``)."""

    @abstractmethod
    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
        scalars: StepScalars,
        sums: Optional[torch.Tensor] = None,
    ) -> None:
        """backup <- w exactly; w <- w + e, with rho from ``scalars.rho``.

        ``partials`` is None when no group normalizes (USAM everywhere): then e = rho * T^2 * g with no
        finiteness check. Otherwise, if sum(partials) is not finite, e = 0 and, when
        ``nonfinite_count`` (an int32 tensor of one element) is given, it is incremented by one.

        ``scalars.grad_scale`` (None, or float32 with one element on the span's device): the gradients and so
        the partials are scaled by s. The perturbation is that of the unscaled gradient: normalized,
        e = rho * T^2 * g / (sqrt(total) + eps * s) (the scale cancels; eps is scaled with it);
        un-normalized, e = ((1 / s) * rho) * T^2 * g, that factor in the math dtype.

        ``sums`` (telemetry): None, or a contiguous 1-D tensor of ``partials_len(span)`` elements on the span's
        device, float32 or float64 (float64 whenever the span is), every element of which the call writes:
        partial sums of e * g over the span, e the perturbation as applied ((the weights written, in the math
        dtype) - (the restore point: ``master``, or the weights on entry)), g ``span.grads`` in the math dtype
        as given (scaled, under a GradScaler: the caller unscales). With a non-finite total (e = 0) they may
        hold anything: the optimizer records nothing for that step. Without ``sums`` the backend runs
        exactly the code it runs without telemetry; with it, no more bytes move.
        """

    @abstractmethod
    def restore(self, span: Span) -> None:
        """w <- backup exactly (used before a base optimizer that is not fused)."""

    @abstractmethod
    def restore_and_update(self, span: Span, update: BaseUpdate, scalars: StepScalars,
                           sums: Optional[torch.Tensor] = None) -> None:
        """w <- backup, then one base-optimizer update of w and ``span.state`` with ``span.grads`` (plus
        ``scalars.reuse_scale * span.reused`` when given). ``span.backup`` may be ``span.weights`` itself (a
        step that perturbed nothing restores from w in place): read each element before writing it.

        ``update`` is one of ``fused_sam.updates.FUSED_UPDATES``; ``scalars`` carries the step count, lr and,
        under a GradScaler, the scale to divide the gradients by and the found_inf flag that skips the
        update (then w is the backup exactly and the state is unchanged). The step count is not advanced
        here.

        ``sums`` (telemetry): None, or a contiguous ``(partials_len(span), 3)`` tensor on the span's device,
        float32 or float64 (float64 whenever the span is), every element of which the call writes: per row,
        partial sums of e^2, e * g2 and g2^2 over the span, where e = (the weights as they are on entry, in
        the math dtype) - (the restore point: ``master`` or ``backup``, in the math dtype) and g2 =
        ``span.grads`` in the math dtype times GradScaler's unscale factor (``grad_unscale``) when a scale
        is given: the unscaled gradient, not negated for maximize, without the reused direction. Written
        whatever found_inf says (the caller discards a skipped step's). Without ``sums`` the backend runs
        exactly the code (kernels, bytes moved) it runs without telemetry; with it, one more read of the
        weights.
        """
