"""The reference backend: the SAM step and the base updates written once, plainly, in PyTorch.

It is the oracle every faster backend is tested against and the fallback on any device. Each operation
works on a whole span with a few torch calls (no per-parameter loop) and never reads a value back to the
host. Formulas follow torch.optim's single-tensor code paths line by line, so results match torch.optim
to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..updates import AdamUpdate, SGDUpdate
from .base import Backend, Perturbation, Span


def _math(t: torch.Tensor, span: Span) -> torch.Tensor:
    """``t`` in the span's math dtype (a no-op, no copy, when it already is)."""
    return t.to(span.state_dtype)


class ReferenceBackend(Backend):
    name = "reference"

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        g = _math(span.grads, span)
        if perturbation.adaptive:
            g = (_math(span.weights, span).abs() + perturbation.eta) * g
        out.copy_(torch.dot(g, g).reshape(1))

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
    ) -> None:
        span.backup.copy_(span.weights)
        w = _math(span.weights, span)
        scale = perturbation.rho
        finite = None
        if partials is not None:
            total = partials.sum()
            finite = torch.isfinite(total)
            if perturbation.normalize:
                scale = perturbation.rho / (total.sqrt() + perturbation.eps)
            if nonfinite_count is not None:
                nonfinite_count.add_(~finite)
        e = _math(span.grads, span) * scale
        if perturbation.adaptive:
            e *= (w.abs() + perturbation.eta).square()
        if finite is not None:
            e.masked_fill_(~finite, 0.0)
        span.weights.copy_(w + e)

    def restore(self, span: Span) -> None:
        span.weights.copy_(span.backup)

    def restore_and_update(self, span: Span, update) -> None:
        w = _math(span.backup, span)
        d = _math(span.grads, span)
        if update.maximize:
            d = -d
        if isinstance(update, SGDUpdate):
            w = self._sgd(w, d, span, update)
        elif isinstance(update, AdamUpdate):
            w = self._adam(w, d, span, update)
        else:
            raise TypeError(f"unknown base update {type(update).__name__}")
        span.weights.copy_(w)

    @staticmethod
    def _sgd(w: torch.Tensor, d: torch.Tensor, span: Span, u: SGDUpdate) -> torch.Tensor:
        if u.weight_decay != 0:
            d = d.add(w, alpha=u.weight_decay)
        if u.momentum != 0:
            buf = span.state["momentum_buffer"]
            if span.step == 0:
                buf.copy_(d)
            else:
                buf.mul_(u.momentum).add_(d, alpha=1 - u.dampening)
            d = d.add(buf, alpha=u.momentum) if u.nesterov else buf
        return w.add(d, alpha=-u.lr)

    @staticmethod
    def _adam(w: torch.Tensor, d: torch.Tensor, span: Span, u: AdamUpdate) -> torch.Tensor:
        if u.weight_decay != 0:
            if u.decoupled:
                w = w * (1 - u.lr * u.weight_decay)
            else:
                d = d.add(w, alpha=u.weight_decay)
        exp_avg, exp_avg_sq = span.state["exp_avg"], span.state["exp_avg_sq"]
        exp_avg.lerp_(d, 1 - u.beta1)
        exp_avg_sq.mul_(u.beta2).addcmul_(d, d, value=1 - u.beta2)
        step = span.step + 1
        step_size = u.lr / (1 - u.beta1**step)
        bias_correction2_sqrt = (1 - u.beta2**step) ** 0.5
        second_moment = exp_avg_sq
        if u.amsgrad:
            second_moment = span.state["max_exp_avg_sq"]
            torch.maximum(second_moment, exp_avg_sq, out=second_moment)
        denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(u.eps)
        return w.addcdiv(exp_avg, denom, value=-step_size)
