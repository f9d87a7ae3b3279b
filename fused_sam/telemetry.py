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
Everything stays on the device: a record is a float64 vector written in place each SAM step (kept as it
was when the step is skipped), read by the host only in ``read``. The sums of sharded parameters are summed
over their ranks in one all-reduce of four float64 values per shard group.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

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
        self.clock: Optional[torch.Tensor] = None  # completed steps, counted on the device (CUDA graphs)
        self.sums_buffers: Dict[tuple, tuple] = {}
        self._began = False  # between first_step and second_step: did first_step measure?
        self._grad_sq: Optional[torch.Tensor] = None
        self._first_scaled = False
        self._along_g1: Dict[tuple, torch.Tensor] = {}
        self._loss: Optional[torch.Tensor] = None

    def start(self, home: torch.device, completed_steps: int) -> None:
        if self.record is None or self.record.device != home:
            self.record = torch.full((len(FIELDS) + 2,), float("nan"), dtype=torch.float64, device=home)
            self.clock = torch.full((), float(completed_steps), dtype=torch.float64, device=home)

    def tick(self) -> None:
        """A step was completed (SAM or plain, taken or skipped)."""
        if self.clock is not None:
            self.clock += 1

    def began(self, grad_sq: torch.Tensor, along_g1: Dict[tuple, torch.Tensor], grad_scale: Optional[torch.Tensor],
              loss) -> None:
        """first_step, after the perturb pass: keep |g1|^2 (unscaled, the global float64 total) and e.g1 per
        (device, shard group) from the perturb pass's partials (``along_g1``, of the gradient as given)."""
        self._along_g1 = {}
        for key, partials in along_g1.items():
            total = partials.sum(dtype=torch.float64)
            if grad_scale is not None:
                total = total / grad_scale.to(total.device, torch.float64).reshape(())
            self._along_g1[key] = total
        self._grad_sq = grad_sq
        self._first_scaled = grad_scale is not None
        self._loss = _as_loss(loss, grad_sq.device)
        self._began = True

    def abandon(self) -> None:
        """The SAM step under way ends without a record (restored for an error, or a plain step)."""
        self._began = False
        self._loss = None

    @property
    def measuring(self) -> bool:
        return self._began

    def sums_buffer(self, key: tuple, sizes: tuple, dtype: torch.dtype) -> tuple:
        """The (rows, 3) sums buffer of one (device, shard group) and each span's slice of it; kept while
        the spans' sizes stay."""
        kept = self.sums_buffers.get(key)
        if kept is None or kept[0] != (sizes, dtype):
            buf = torch.empty(sum(sizes), 3, dtype=dtype, device=key[0])
            outs, start = [], 0
            for n in sizes:
                outs.append(buf[start:start + n])
                start += n
            kept = self.sums_buffers[key] = ((sizes, dtype), buf, outs)
        return kept[1], kept[2]

    def finished(self, sam, sums: Dict[tuple, torch.Tensor], grad_scale: Optional[torch.Tensor],
                 found_inf: Optional[torch.Tensor], loss) -> None:
        """second_step, after the update: ``sums`` maps (device, shard group) to its (rows, 3) sums. Write
        the record unless the update was skipped or the first gradient was not finite."""
        self._began = False
        parts = {}
        for key in set(sums) | set(self._along_g1):
            device = key[0]
            here = sums[key].sum(0, dtype=torch.float64) if key in sums else torch.zeros(3, dtype=torch.float64,
                                                                                       device=device)
            along = self._along_g1.get(key)
            if along is None:
                along = torch.zeros((), dtype=torch.float64, device=device)
            parts[key] = torch.cat([here, along.reshape(1)]).reshape(1, 4)
        home = self.record.device
        totals = global_sum(sam, parts, width=4)
        e_sq, e_g2, g2_sq, e_g1 = next(iter(totals.values())).to(home).unbind()
        grad_sq = self._grad_sq.to(home)
        if grad_scale is not None and not self._first_scaled:
            # first_step did not know the GradScaler's scale: its norm and e.g1 were of the scaled gradient
            scale = grad_scale.to(home, torch.float64).reshape(())
            grad_sq, e_g1 = grad_sq / scale.square(), e_g1 / scale
        e_norm, g2_norm = e_sq.sqrt(), g2_sq.sqrt()
        loss_gap = torch.full((), float("nan"), dtype=torch.float64, device=home)
        second_loss = _as_loss(loss, home)
        known = torch.zeros((), dtype=torch.float64, device=home)
        if self._loss is not None and second_loss is not None:
            loss_gap, known = second_loss - self._loss.to(home), known + 1
        self._loss = None
        step = self.clock - 1  # the update just taken ticked the clock
        new = torch.stack([step, grad_sq.sqrt(), g2_norm, e_norm, e_g1, (e_g2 - e_g1) / e_sq,
                           e_g2 / (e_norm * g2_norm), loss_gap, known])
        keep = ~torch.isfinite(grad_sq)
        if found_inf is not None:
            keep = keep | (found_inf.to(home).reshape(()) != 0)
        self.record.copy_(torch.where(keep, self.record, new))

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


def _as_loss(loss, device: torch.device) -> Optional[torch.Tensor]:
    """A loss as a float64 0-d tensor on ``device`` (a tensor is read on the device, not synced)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar (one element), got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(()).to(device, torch.float64)
    return torch.tensor(float(loss), dtype=torch.float64, device=device)
