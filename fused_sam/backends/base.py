"""The interface every backend implements.

The optimizer owns the flat buffers and the bookkeeping (which parameters take part, step counts, the
global norm across devices); a backend only does arithmetic over contiguous 1-D slices of those buffers,
called spans. Each method is one pass over a span, so a faster backend is a handful of kernels.

Conventions every backend follows:
- Math in float32 (float64 for float64 parameters); optimizer state is stored in that same dtype.
- Nothing syncs with the host: scalars that change every step (lr, step count) arrive as Python numbers.
- ``partials`` is a 1-D tensor on the span's device holding squared-norm partial sums written by
  ``sq_norm_partials`` for every span on that device (possibly from several dtypes and backends); a
  consumer sums all of it to get ||g||^2 (or ||T*g||^2 for ASAM).
- Padding between parameters inside a span is zero in weights, grads and state, and stays zero.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..updates import AdamUpdate, BaseUpdate, SGDUpdate  # noqa: F401  (re-exported for backends)


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the math and of the optimizer state for parameters of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class Span:
    """Contiguous 1-D slices of one flat segment: the unit every backend operation works on.

    ``state`` maps torch.optim state names ('momentum_buffer', 'exp_avg', 'exp_avg_sq',
    'max_exp_avg_sq') to slices of the segment's state buffers, in ``state_dtype``; a buffer is present
    only once the base update needs it. ``step`` is how many base updates these parameters have had
    before the one being applied.
    """

    weights: torch.Tensor
    grads: torch.Tensor
    backup: torch.Tensor
    state: dict = field(default_factory=dict)
    step: int = 0

    @property
    def numel(self) -> int:
        return self.weights.numel()

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def state_dtype(self) -> torch.dtype:
        return math_dtype(self.weights.dtype)


@dataclass(frozen=True)
class Perturbation:
    """SAM settings of one param group: e = rho * T^2 * g / (||T g|| + eps), T = |w| + eta or 1."""

    rho: float
    adaptive: bool
    eta: float
    normalize: bool
    eps: float


class Backend(ABC):
    """One implementation of the SAM step's arithmetic. Stateless apart from caches."""

    name: str = ""

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
    ) -> None:
        """backup <- w exactly; w <- w + e.

        ``partials`` is None when no group normalizes (USAM everywhere): then e = rho * T^2 * g with no
        finiteness check. Otherwise, if sum(partials) is not finite, e = 0 and, when
        ``nonfinite_count`` (an int32 tensor of one element) is given, it is incremented by one.
        """

    @abstractmethod
    def restore(self, span: Span) -> None:
        """w <- backup exactly (used before a base optimizer that is not fused)."""

    @abstractmethod
    def restore_and_update(self, span: Span, update: BaseUpdate) -> None:
        """w <- backup, then one base-optimizer update of w and ``span.state`` with ``span.grads``.

        ``update`` is an ``SGDUpdate`` or an ``AdamUpdate``; ``span.step`` counts earlier updates (0 on
        the first, where SGD initialises its momentum buffer to the gradient as torch.optim does).
        """
