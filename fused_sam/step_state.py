"""What FusedSAM changes after construction, kept in one object that is never rebound."""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional

import torch

from .flat import FlatSegment


class SAMState:
    """Everything FusedSAM changes after construction, in one object that is never rebound.

    Trainer wrappers (Lightning's LightningOptimizer) copy the optimizer's ``__dict__`` and run its
    methods on the copy; both then hold this same object, so a re-layout, the perturbed phase and the
    counters are seen alike through the optimizer and through any wrapper. (A variant keeps its own run
    state in the variant object, shared the same way.)
    """

    def __init__(self, perturb_eps: float):
        self.perturb_eps = perturb_eps
        self.segments: List[FlatSegment] = []
        # DTensor parameters sharded over a process group: (group, device), in parameter order, so every
        # rank reduces the same groups in the same order, also a rank whose local shards are all empty.
        self.shard_groups: list = []
        # Per (device, shard group): the squared-norm partials buffer, kept while its spans' sizes stay.
        self.partials_buffers: Dict[tuple, tuple] = {}
        # Between first_step and second_step: per segment, which parameters had a gradient and were
        # perturbed (None: all of them). None outside a SAM step.
        self.perturbed: Optional[List[Optional[List[bool]]]] = None
        # Between first_step and second_step: did first_step know the GradScaler's scale, and did it
        # perturb an un-normalized group (whose e = rho * g would carry the scale without it)?
        self.perturbed_with_scale = False
        self.perturbed_unnormalized = False
        self.nonfinite: Optional[torch.Tensor] = None  # device counter of first_steps with a non-finite norm
        self.skipped: Optional[torch.Tensor] = None  # device counter of updates skip_nonfinite skipped
        self.completed_steps = 0  # SAM and plain steps taken: what a variant decides from
        self.sam_due: Optional[bool] = None  # the variant's decision for the step under way, once asked
        self.opt_called = False  # what LR schedulers check: has a step been taken since they were built?
        # capturable=True: per (param group, hyperparameter, device), the float64 tensor a Python float lr or
        # rho is written into before each step (eagerly; under capture a float is refused).
        self.device_hyperparameters: Dict[tuple, torch.Tensor] = {}
        self.captured = False  # a step was captured into a CUDA graph: the buffers must stay where they are
        # Per captured half ("first_step()", "second_step()"): which parameters had a gradient (per segment),
        # so the graph perturbs and updates those on every replay.
        self.captured_live: Dict[str, list] = {}
        self.telemetry = None  # fused_sam.telemetry.Telemetry with telemetry=True

    def home_counters(self) -> None:
        """The step counters live on the first segment's device (made there, or moved after a re-layout)."""
        if not self.segments:
            return
        home = self.segments[0].device
        for name in ("nonfinite", "skipped"):
            counter = getattr(self, name)
            if counter is None:
                setattr(self, name, torch.zeros(1, dtype=torch.int32, device=home))
            elif counter.device != home:
                setattr(self, name, counter.to(home))

    def scaling_mismatch(self, scaler_step: bool) -> Optional[str]:
        """Why this second step cannot be taken with the scaling first_step saw, or None."""
        if scaler_step and self.perturbed_unnormalized and not self.perturbed_with_scale:
            return ("scaler.step(optimizer) after a first_step() that perturbed an un-normalized group "
                    "(normalize=False) without its scale: e = rho * g carried the GradScaler's scale; call "
                    "first_step(grad_scaler=scaler)")
        if not scaler_step and self.perturbed_with_scale:
            return ("first_step(grad_scaler=...) says the gradients are scaled: finish the SAM step with "
                    "scaler.step(optimizer), not second_step()/step(), so that they are unscaled")
        return None


class PerDevice:
    """One small tensor (GradScaler's scale or found_inf: float32; LookSAM's reuse scale: float64), copied
    once to each device asking."""

    def __init__(self, value: Optional[torch.Tensor], dtype: torch.dtype = torch.float32):
        self.value = None if value is None else value.detach().reshape(()).to(dtype)
        self._copies: Dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> Optional[torch.Tensor]:
        if self.value is None or self.value.device == device:
            return self.value
        if device not in self._copies:
            self._copies[device] = self.value.to(device, non_blocking=True)
        return self._copies[device]


def without_grad(method: Callable) -> Callable:
    """``@torch.no_grad()`` for the step methods, as torch's does it (grad mode off, the caller's restored),
    at ~0.4 us a call instead of ~2 us (torch's decorator builds three context-manager objects per call)."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return method(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(enabled)
    return wrapper
