"""The SAM mixed-precision plugin, built on the MixedPrecision class of whichever Lightning package the
user has (``lightning.pytorch`` or ``pytorch_lightning``): see ``fused_sam.lightning``. This module imports
neither."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .optimizer import FusedSAM


def build_sam_mixed_precision(mixed_precision: type, do_nothing_closure: Callable) -> type:
    """SAMMixedPrecision as a subclass of ``mixed_precision`` (that package's MixedPrecision);
    ``do_nothing_closure``: the closure that package's LightningOptimizer passes for ``opt.step()``."""

    class SAMMixedPrecision(mixed_precision):
        """Lightning's mixed precision (``"16-mixed"`` with a GradScaler, or ``"bf16-mixed"``) taking paired
        SAM steps with a FusedSAM optimizer: both passes on the same batch.

        Lightning's own MixedPrecision runs the training closure once and then calls ``scaler.step``, which
        leaves FusedSAM only ``mode="alternate"``. Here each optimizer step runs the closure (training_step,
        zero_grad, scaled backward) at w, ``first_step(grad_scaler=scaler)``, the closure again at w + e,
        ``scaler.unscale_``, ``on_before_optimizer_step`` and gradient clipping, ``scaler.step`` (restore w,
        update; skipped with w restored exactly after an overflow) and ``scaler.update``. With bf16 there is
        no scaler: the second step is ``optimizer.step()``.

        - ``on_before_optimizer_step`` and gradient clipping run once per step, on the gradient at w + e,
          unscaled: the one the update uses. The gradient at w only sets the perturbation, whose length rho
          clipping by norm would not change anyway.
        - ``training_step`` returning None at w skips the step (no second pass, no scaler update), as
          Lightning does; returning None at w + e restores w and skips the update.
        - BatchNorm running statistics are updated by both passes, as with FusedSAM under Lightning in full
          precision (see README, "PyTorch Lightning").
        - A variant's plain step (``opt.sam_step_due`` False) runs the closure once.
        - Manual optimization: ``opt.step(closure=...)`` is a paired SAM step (the closure must zero the
          gradients, forward and ``manual_backward``); after ``opt.optimizer.first_step(grad_scaler=...)``
          by hand, ``opt.step()`` finishes the step.

        Refused: an optimizer that is not a FusedSAM in paired mode, and ``accumulate_grad_batches > 1``
        (only the last micro-batch would be evaluated at w + e).
        """

        def __init__(self, precision: str, device: str, scaler: Optional["torch.amp.GradScaler"] = None) -> None:
            if scaler is None and precision == "16-mixed":  # lightning < 2.4 builds a CUDA one whatever the device
                scaler = torch.amp.GradScaler(device)
            super().__init__(precision, device, scaler)

        def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
            if not isinstance(optimizer, FusedSAM):
                raise TypeError(
                    f"{type(self).__name__} takes SAM steps with a fused_sam.FusedSAM optimizer; got "
                    f"{type(optimizer).__name__}. For other optimizers use Lightning's own precision setting"
                )
            if optimizer.mode != "paired":
                raise ValueError(
                    f"{type(self).__name__} runs both SAM passes itself: construct FusedSAM in paired mode (the "
                    f"default), not mode={optimizer.mode!r}"
                )
            automatic = model.automatic_optimization
            if automatic and model.trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"{type(self).__name__} with accumulate_grad_batches="
                    f"{model.trainer.accumulate_grad_batches}: Lightning runs the earlier micro-batches outside the "
                    "optimizer step, so only the last one would be evaluated at w + e (not SAM). Use "
                    "accumulate_grad_batches=1 and a larger batch, or manual optimization"
                )
            if optimizer.perturbed or not optimizer.sam_step_due:  # first_step by hand, or a variant's plain step
                loss = closure()
                if loss is None and automatic:
                    return None
                self._finish_step(optimizer, model, **kwargs)
                return loss
            if closure is do_nothing_closure:
                raise RuntimeError(
                    f"opt.step() without a closure under {type(self).__name__}: pass opt.step(closure=...) whose "
                    "closure zeroes the gradients, runs the forward and manual_backward (it runs at w and at w + e), "
                    "or call opt.optimizer.first_step(grad_scaler=...) after the first backward yourself"
                )
            loss = closure()
            if loss is None and automatic:  # training_step returned None: Lightning skips the step
                return None
            optimizer.first_step(zero_grad=True, grad_scaler=self.scaler)
            if closure() is None and automatic:  # None at w + e: back to w exactly, no update, no scaler step
                optimizer._restore_all()
                return None
            self._finish_step(optimizer, model, **kwargs)
            return loss

        def _finish_step(self, optimizer: FusedSAM, model: Any, **kwargs: Any) -> None:
            """The hooks and clipping on the gradient now in .grad (unscaled), then the update."""
            if self.scaler is None:
                self._after_closure(model, optimizer)
                optimizer.step(**kwargs)
                return
            self.scaler.unscale_(optimizer)
            self._after_closure(model, optimizer)
            self.scaler.step(optimizer, **kwargs)
            self.scaler.update()

        def clip_gradients(self, *args: Any, **kwargs: Any) -> None:
            # MixedPrecision refuses clipping for an optimizer that unscales inside step() (FusedSAM does). Here
            # scaler.unscale_ ran before the clipping, so step() does not unscale again: skip that refusal.
            super(mixed_precision, self).clip_gradients(*args, **kwargs)

    SAMMixedPrecision.__qualname__ = "SAMMixedPrecision"  # the key of its scaler state in Lightning's checkpoints
    return SAMMixedPrecision
