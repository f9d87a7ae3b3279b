"""The reference backend: the SAM step and the base updates written once, plainly, in PyTorch.

It is the oracle every faster backend is tested against and the fallback on any device. Each operation
works on a whole span with a few torch calls (no per-parameter loop) and never reads a value back to the
host: the step count, GradScaler's scale and found_inf arrive as device tensors (``StepScalars``) and
enter the math as tensors. Formulas follow torch.optim's single-tensor code paths line by line, so results
match torch.optim to rounding; a skipped update (found_inf) leaves the state as it was and w the backup.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..updates import AdagradUpdate, AdamUpdate, SGDUpdate
from .base import Backend, Hyperparameter, Perturbation, Span, StepScalars, check_reuse_inputs, grad_unscale, required


def _math(t: torch.Tensor, span: Span) -> torch.Tensor:
    """``t`` in the span's math dtype (a no-op, no copy, when it already is)."""
    return t.to(span.state_dtype)


def on_device(value: Hyperparameter, device: torch.device) -> torch.Tensor:
    """lr or rho as a float64 0-d tensor on ``device``: the one given (capturable=True), else the Python float.
    One path for both, so that both give the same bits; a float rounds as it would entering torch's ops (a
    double, rounded to the dtype of the tensor it meets)."""
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(value, dtype=torch.float64, device=device)
    return value.reshape(())


def _restore_point(span: Span) -> torch.Tensor:
    """w in the math dtype: the float32 master copy if the span has one, else the backup."""
    return span.master if span.master is not None else _math(span.backup, span)


def telemetry_sums(span: Span, grad_scale: Optional[torch.Tensor], sums: torch.Tensor, has_grads: bool = True) -> None:
    """Row 0 of ``sums`` <- (e.e, e.g2, g2.g2), the other rows 0 (see ``Backend.restore_and_update``): e the
    weights now (w + e, as the model saw it) minus the restore point, g2 the unscaled gradient (zero where
    ``has_grads`` is False: a perturbed span restored without a second gradient)."""
    e = _math(span.weights, span) - _restore_point(span)
    g = _math(span.grads, span) if has_grads else torch.zeros_like(e)
    if grad_scale is not None:
        g = g * grad_unscale(grad_scale).to(g.dtype)
    sums.zero_()
    sums[0].copy_(torch.stack([torch.dot(e, e), torch.dot(e, g), torch.dot(g, g)]))


def perturbation_sums(span: Span, sums: torch.Tensor) -> None:
    """``sums`` <- (e.g, 0, ...) after a perturb (see ``Backend.perturb``): e the weights now minus the
    restore point, g the gradient as given."""
    e = _math(span.weights, span) - _restore_point(span)
    sums.zero_()
    sums[0] = torch.dot(e, _math(span.grads, span))


class ReferenceBackend(Backend):
    name = "reference"
    supports_master_weights = True

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return None

    def sq_norm_partials(self, span: Span, perturbation: Perturbation, out: torch.Tensor) -> None:
        g = _math(span.grads, span)
        if perturbation.adaptive:
            w = span.master if span.master is not None else _math(span.weights, span)
            g = (w.abs() + perturbation.eta) * g
        out.copy_(torch.dot(g, g).reshape(1))

    def perturb(
        self,
        span: Span,
        perturbation: Perturbation,
        partials: Optional[torch.Tensor],
        nonfinite_count: Optional[torch.Tensor],
        scalars: StepScalars,
        sums: Optional[torch.Tensor] = None,
    ) -> None:
        grad_scale = scalars.grad_scale
        if span.master is not None:
            w = span.master
        else:
            span.backup.copy_(span.weights)
            w = _math(span.weights, span)
        rho = on_device(required(scalars, "rho"), span.device)
        scale = rho.to(span.state_dtype)
        if not perturbation.normalize and grad_scale is not None:
            scale = grad_scale.to(span.state_dtype).reciprocal() * scale  # (1 / s) * rho in the math dtype
        finite = None
        if partials is not None:
            total = partials.sum()
            finite = torch.isfinite(total)
            if perturbation.normalize:
                eps = perturbation.eps if grad_scale is None else grad_scale.to(total.dtype) * perturbation.eps
                scale = rho.to(total.dtype) / (total.sqrt() + eps)
            if nonfinite_count is not None:
                nonfinite_count.add_(~finite)
        e = _math(span.grads, span) * scale
        if perturbation.adaptive:
            e *= (w.abs() + perturbation.eta).square()
        if finite is not None:
            e.masked_fill_(~finite, 0.0)
        span.weights.copy_(w + e)
        if sums is not None:
            perturbation_sums(span, sums)

    def restore(self, span: Span) -> None:
        span.weights.copy_(span.master if span.master is not None else span.backup)

    def restore_and_update(self, span: Span, update, scalars: StepScalars, sums: Optional[torch.Tensor] = None) -> None:
        check_reuse_inputs(span, scalars)
        if sums is not None:
            telemetry_sums(span, scalars.grad_scale, sums)
        w = _restore_point(span)
        d = _math(span.grads, span)
        if span.reused is not None:
            d = torch.addcmul(d, span.reused, scalars.reuse_scale.reshape(()).to(d.dtype))
        if scalars.grad_scale is not None:
            d = d * grad_unscale(scalars.grad_scale).to(d.dtype)
        if update.maximize:
            d = -d
        lr = on_device(required(scalars, "lr"), span.device)
        math = UPDATE_MATH.get(type(update))
        if math is None:
            raise TypeError(f"unknown base update {type(update).__name__}")
        w, new_state = math(w, d, span.state, update, required(scalars, "step").reshape(()), lr)
        if scalars.found_inf is not None:  # GradScaler's sum over devices: any non-zero skips
            skip = scalars.found_inf.reshape(()) != 0
            new_state = {name: torch.where(skip, span.state[name], value) for name, value in new_state.items()}
            w = torch.where(skip, _restore_point(span), w)
        for name, value in new_state.items():
            span.state[name].copy_(value)
        if span.master is not None:
            span.master.copy_(w)
        span.weights.copy_(w)


# The per-element math of each fused base update, as torch.optim's single-tensor code writes it: the new w and
# the new state buffers (fresh tensors) from w, the descent direction d (the gradient, unscaled, negated for
# maximize), the state (torch.optim's names; the buffers ``needed_state()`` names), the step count before this
# update (a 0-d float32 tensor) and lr (a 0-d float64 tensor).

def _sgd(w: torch.Tensor, d: torch.Tensor, state: dict, u: SGDUpdate, step: torch.Tensor, lr: torch.Tensor):
    if u.weight_decay != 0:
        d = d.add(w, alpha=u.weight_decay)
    new_state = {}
    if u.momentum != 0:
        buf = state["momentum_buffer"]
        buf = torch.where(step == 0, d, buf.mul(u.momentum).add_(d, alpha=1 - u.dampening))
        new_state["momentum_buffer"] = buf
        d = d.add(buf, alpha=u.momentum) if u.nesterov else buf
    return torch.addcmul(w, d, (-lr).to(w.dtype)), new_state


def _adam(w: torch.Tensor, d: torch.Tensor, state: dict, u: AdamUpdate, step: torch.Tensor, lr: torch.Tensor):
    if u.weight_decay != 0:
        if u.decoupled:
            w = w * (1 - lr * u.weight_decay).to(w.dtype)
        else:
            d = d.add(w, alpha=u.weight_decay)
    exp_avg = torch.lerp(state["exp_avg"], d, 1 - u.beta1)
    exp_avg_sq = state["exp_avg_sq"].mul(u.beta2).addcmul_(d, d, value=1 - u.beta2)
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    # The bias corrections from the step count on the device, in double as torch.optim computes them in
    # Python, each rounded once to the math dtype.
    t = step.double() + 1
    neg_step_size = (-lr / (1 - torch.pow(u.beta1, t))).to(w.dtype)
    bias_correction2_sqrt = (1 - torch.pow(u.beta2, t)).sqrt().to(w.dtype)
    second_moment = exp_avg_sq
    if u.amsgrad:
        second_moment = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = second_moment
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(u.eps)
    return w + neg_step_size * (exp_avg / denom), new_state


def _adagrad(w: torch.Tensor, d: torch.Tensor, state: dict, u: AdagradUpdate, step: torch.Tensor, lr: torch.Tensor):
    if u.weight_decay != 0:
        d = d.add(w, alpha=u.weight_decay)
    # torch.optim's clr = lr / (1 + (step - 1) * lr_decay) after its step += 1: the count before it, in double
    neg_clr = (-(lr / (1 + step.double() * u.lr_decay))).to(w.dtype)
    total = state["sum"].addcmul(d, d)
    std = total.sqrt().add_(u.eps)
    return w + (neg_clr * d) / std, {"sum": total}  # addcdiv(w, d, std, value=-clr), that value a tensor


# base update class -> its math
UPDATE_MATH = {SGDUpdate: _sgd, AdamUpdate: _adam, AdagradUpdate: _adagrad}
