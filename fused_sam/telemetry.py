"""SAM telemetry: what each SAM step measures about the loss surface, from sums the kernels already make.

A SAM step holds g1 = grad L(w), the perturbation e and g2 = grad L(w + e). Since g2 - g1 = H e + O(|e|^2),
the Rayleigh quotient of the Hessian along e is kappa = (e.g2 - e.g1) / |e|^2 (exact on a quadratic loss).
The pieces come from the passes a step makes anyway:
- |g1| from the norm pass (an extra one where no param group normalizes);
- e.g1 from the perturb pass (``Backend.perturb(..., sums)``), with e as written to the weights: e.g2 and
  e.g1 then see the same e, rounding included, so their difference (often a small part of either, with
  large gradients) carries no rounding mismatch;
- |e|^2, e.g2 and |g2|^2 from the restore-and-update pass (``Backend.restore_and_update(..., sums)``), with
  e read as the weights hold it (16-bit weights minus the float32 master with master weights).
The record is a float64 vector on the first segment's device, written in place each SAM step (kept as it was
when the step is skipped). Off a CPU everything stays on the device (no sync; a CUDA graph replays it) and
the host reads it only in ``read``; on a CPU, where reading costs no sync, the few summed values are read
and the record's formula evaluated on the host (a handful of operations instead of ~25). The sums of
sharded parameters are summed over their ranks in one all-reduce of four float64 values per shard group.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional

import torch

from .backends.base import math_dtype
from .backends.reference import telemetry_sums
from .norms import global_sum

FIELDS = ("grad_norm", "sam_grad_norm", "perturbation_norm", "directional_derivative", "curvature", "cosine",
          "loss_gap")
# The record: [step, *FIELDS, whether loss_gap was measured]
_STEP, _LOSS_KNOWN = 0, len(FIELDS) + 1


class Telemetry:
    """The measurements of the last recorded SAM step and what the step under way has gathered so far.
    Lives in ``SAMState`` (mutated in place, shared with trainer wrappers)."""

    def __init__(self):
        self.record: Optional[torch.Tensor] = None  # made at the first SAM step, on the home device
        # Off a CPU: the completed steps counted on the device, so that a replayed CUDA graph dates its records
        self.clock: Optional[torch.Tensor] = None
        self._began = False  # between first_step and second_step: did first_step measure?
        self._grad_sq: Optional[torch.Tensor] = None
        self._first_scale: Optional[torch.Tensor] = None  # the GradScaler scale first_step knew
        self._along_g1: Dict[tuple, list] = {}  # per (device, shard group): e.g1 partials, g as given
        self._loss: Optional[torch.Tensor] = None

    def start(self, home: torch.device, completed_steps: int) -> None:
        if self.record is None or self.record.device != home:
            self.record = torch.full((len(FIELDS) + 2,), math.nan, dtype=torch.float64, device=home)
            on_host = home.type == "cpu" and HOST_MATH_ON_CPU
            self.clock = None if on_host else torch.full((), float(completed_steps), dtype=torch.float64, device=home)

    def tick(self) -> None:
        """A step was completed (SAM or plain, taken or skipped)."""
        if self.clock is not None:
            self.clock += 1

    def began(self, grad_sq: torch.Tensor, along_g1: Dict[tuple, list], grad_scale: Optional[torch.Tensor],
              loss) -> None:
        """first_step, after the perturb pass: |g1|^2 (unscaled when ``grad_scale`` is known, the global
        float64 total) and, per (device, shard group), the perturb pass's e.g1 partials (one tensor a span)."""
        self._grad_sq, self._along_g1, self._first_scale = grad_sq, along_g1, grad_scale
        self._loss = _as_loss(loss, grad_sq.device)
        self._began = True

    def abandon(self) -> None:
        """Forget what an earlier first_step gathered (its step ended in an error before second_step)."""
        self._began = False
        self._loss = None

    @property
    def measuring(self) -> bool:
        return self._began

    def finished(self, sam, sums: Dict[tuple, list], grad_scale: Optional[torch.Tensor],
                 found_inf: Optional[torch.Tensor], loss) -> None:
        """second_step, after the update: ``sums`` maps (device, shard group) to its spans' (rows, 3) sums.
        Write the record unless the update was skipped or the first gradient was not finite."""
        self._began = False
        parts = {key: torch.cat([_total(sums.get(key), 3, key[0]), _total(self._along_g1.get(key), 1, key[0])])
                 .reshape(1, 4) for key in set(sums) | set(self._along_g1)}
        if len(parts) == 1 and not sam.shard_groups:  # one device, nothing sharded: nothing to sum
            totals = next(iter(parts.values())).reshape(4)
        else:
            totals = next(iter(global_sum(sam, parts, width=4).values()))
        home = self.record.device
        # first_step without the GradScaler's scale measured the scaled gradient: its norm and e.g1 divide by it
        late_scale = grad_scale if grad_scale is not None and self._first_scale is None else None
        second_loss = _as_loss(loss, home)
        losses_known = self._loss is not None and second_loss is not None
        loss_pair = (self._loss, second_loss) if losses_known else None
        self._loss = None
        if self.clock is None:  # on a CPU: read the few values (no sync there) and evaluate on the host
            def value(t, default):
                return default if t is None else t.item()
            inputs = [float(sam.completed_steps - 1), *totals.tolist(), self._grad_sq.item(),
                      value(self._first_scale, 1.0), value(late_scale, 1.0),
                      *(t.item() for t in loss_pair or (_ZERO, _ZERO)), value(found_inf, 0.0) != 0]
            keep, new = _new_record(inputs, _HostMath, losses_known)
            if not keep:
                self.record.copy_(torch.tensor(new, dtype=torch.float64))
            return
        def one(t, default):  # made on the device: a host tensor copied in would not replay in a CUDA graph
            if t is None:
                return torch.full((1,), default, dtype=torch.float64, device=home)
            return t.to(home, torch.float64).reshape(1)
        inputs = torch.cat([(self.clock - 1).reshape(1), totals.to(home), self._grad_sq.to(home).reshape(1),
                            one(self._first_scale, 1.0), one(late_scale, 1.0),
                            *(one(t, 0.0) for t in loss_pair or (None, None)),
                            (one(found_inf, 0.0) != 0).double()])
        keep, new = _new_record(inputs.unbind(), _DeviceMath, losses_known)
        self.record.copy_(torch.where(keep, self.record, torch.stack(new)))

    def read(self, sync: bool) -> Optional[dict]:
        """The last record (see ``FusedSAM.telemetry``)."""
        if self.record is None:
            return None
        if not sync:
            record = self.record.clone()
            return {"step": record[_STEP], **{name: record[i + 1] for i, name in enumerate(FIELDS)}}
        values = self.record.tolist()
        if values[_STEP] != values[_STEP]:  # NaN: every SAM step so far was skipped
            return None
        out = {"step": int(values[_STEP]), **{name: values[i + 1] for i, name in enumerate(FIELDS)}}
        if not values[_LOSS_KNOWN]:
            out["loss_gap"] = None
        return out


def telemetry_out(sums: Dict[tuple, list], segment, span, rows: Optional[int] = None,
                  columns: Optional[int] = 3) -> torch.Tensor:
    """A fresh sums tensor for ``span`` ((rows, columns), or (rows,) for ``columns=None``; rows: the backend's
    ``partials_len``), listed in ``sums`` under the span's (device, shard group)."""
    rows = segment.backend.partials_len(span) if rows is None else rows
    shape = (rows,) if columns is None else (rows, columns)
    out = torch.empty(shape, dtype=math_dtype(span.weights.dtype), device=span.device)
    sums.setdefault((span.device, segment.shard_group), []).append(out)
    return out


def reference_sums(sums: Dict[tuple, list], segment, span, grad_scale: Optional[torch.Tensor],
                   has_grads: bool = True) -> None:
    """The restore pass's sums of ``span``, taken by the reference: where no backend pass takes them (a
    perturbed span restored without a second gradient: ``has_grads`` False)."""
    telemetry_sums(span, grad_scale if has_grads else None, telemetry_out(sums, segment, span, 1), has_grads)


def unfused_sums(sam, active: list, scales, sums: Dict[tuple, list]) -> None:
    """The restore pass's sums before a base optimizer that is not fused restores and steps itself
    (``active``: per segment, which parameters have a gradient now)."""
    for segment, perturbed, has_grad in zip(sam.segments, sam.perturbed, active):
        for _, _, (was_perturbed, updated), span in segment.spans(perturbed, has_grad):
            if not (was_perturbed or updated):
                continue
            if not was_perturbed and span.master is None:  # w itself is the restore point
                span = dataclasses.replace(span, backup=span.weights)
            reference_sums(sums, segment, span, scales.on(segment.device), has_grads=updated)


def _total(partials: Optional[list], width: int, device: torch.device) -> torch.Tensor:
    """The float64 sum over the rows of a (device, shard group)'s partials (one tensor a span), or zeros."""
    if not partials:
        return torch.zeros(width, dtype=torch.float64, device=device)
    return torch.cat(partials).sum(0, dtype=torch.float64).reshape(width)


# Evaluate the record's formula on the host where the sums live on a CPU (no sync to avoid there); False
# makes a CPU run take the device path, as a GPU does (the tests compare the two).
HOST_MATH_ON_CPU = True
_ZERO = torch.zeros((), dtype=torch.float64)


def _new_record(inputs, ops, losses_known: bool):
    """(keep the old record?, the new record) from the step's inputs (Python floats or 0-d tensors): the
    one formula of every field, written once for both kinds of number."""
    step, e_sq, e_g2, g2_sq, e_g1, grad_sq, first_scale, late_scale, loss, perturbed_loss, skipped = inputs
    grad_sq, e_g1 = ops.div(grad_sq, late_scale * late_scale), ops.div(e_g1, first_scale * late_scale)
    e_norm, g2_norm = ops.sqrt(e_sq), ops.sqrt(g2_sq)
    new = [step, ops.sqrt(grad_sq), g2_norm, e_norm, e_g1, ops.div(e_g2 - e_g1, e_sq), ops.div(e_g2, e_norm * g2_norm),
           perturbed_loss - loss if losses_known else ops.nan(step), ops.one(step) if losses_known else 0 * step]
    # a skipped update (found_inf) or a first gradient that was not finite (no perturbation) records nothing
    keep = ops.either(skipped != 0, ops.not_finite(grad_sq))
    return keep, new


class _HostMath:
    """IEEE float64 arithmetic on Python floats, as a device computes it (x / 0 is inf or NaN, not an error)."""

    @staticmethod
    def div(a: float, b: float) -> float:
        try:
            return a / b
        except ZeroDivisionError:
            return math.nan if a == 0 or a != a else math.copysign(math.inf, a) * math.copysign(1.0, b)

    sqrt = staticmethod(lambda x: math.sqrt(x) if x == x else x)
    nan = staticmethod(lambda like: math.nan)
    one = staticmethod(lambda like: 1.0)
    either = staticmethod(lambda a, b: a or b)
    not_finite = staticmethod(lambda x: not math.isfinite(x))


class _DeviceMath:
    div = staticmethod(torch.div)
    sqrt = staticmethod(torch.sqrt)
    nan = staticmethod(lambda like: torch.full_like(like, math.nan))
    one = staticmethod(torch.ones_like)
    either = staticmethod(torch.logical_or)
    not_finite = staticmethod(lambda x: ~torch.isfinite(x))


def _as_loss(loss, device: torch.device) -> Optional[torch.Tensor]:
    """A loss as a float64 0-d tensor on ``device`` (a tensor is read on the device, not synced)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(()).to(device, torch.float64)
    return torch.tensor(float(loss), dtype=torch.float64, device=device)
