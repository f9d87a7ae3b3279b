"""Cheaper SAM: variants that decide per step whether SAM's second pass runs, and what a step without it does.

A variant is passed as ``FusedSAM(..., variant=...)``. Before each step the training loop asks
``opt.sam_step_due``: when True it runs the SAM step as usual (``first_step``, a second backward,
``second_step``); when False it calls ``opt.plain_step()`` after the one backward at w. ``step(closure)``
does this by itself. The decision is taken on the host, from host state only (no device read), once per
step; it is kept until the step completes.

- ``Every(k)``: SAM every k-th step (MosaicML composer's interval SAM); otherwise the base update with the
  gradient at w. Cost per step 1 + 1/k backward passes.
- ``Randomly(p, seed)``: SAM with probability ``p`` (a settable attribute, so it may be scheduled), drawn from
  a seeded generator kept in the state dict, so a run repeats and resumes (RST, Zhao et al. 2022).
- ``LookSAM(k, alpha)`` (Liu et al. 2022): every k-th step a SAM step that also stores g_v, the part of
  the perturbed gradient g_s orthogonal to the gradient g at w: g_v = g_s - (g . g_s / ||g||^2) g. The other
  steps update with g + alpha * (||g|| / ||g_v||) * g_v. One flat buffer per segment for g_v (it also holds
  g during a SAM step).

- ``WhenSharp(c_start, c_end, total_steps, delta)`` (AE-SAM, Jiang et al. 2023): SAM when the squared
  gradient norm ||g||^2 is at least its running mean plus c_t running standard deviations (exponential
  moving averages with factor delta; c_t linear from c_start to c_end over total_steps). The norm is known
  only on the device, and reading it would stall the step: the decision for step t is made on the device
  from step t-1's gradient and copied to the host asynchronously; ``sam_step_due`` waits only if that copy
  has not landed a whole step later. Plain steps then also take the norm (one more pass over the gradients).

- ``MomentumSAM()`` (MSAM, Becker et al. 2024): one forward and backward per step, taken at the perturbed
  point w~ = w - rho * v / ||v|| (v: SGD's momentum buffer, or Adam's first moment); the step restores w,
  takes the base update with that gradient, and perturbs the new w along the new v. Between steps the model
  holds w~ (``opt.at_restore_point()`` gives w for evaluation); the backup buffer holds w, as in SAM.

Every variant works with every backend: the SAM steps are FusedSAM's own, a plain step is the backend's
restore-and-update from w, and LookSAM's extra passes are a few torch operations over the flat buffers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .updates import update_from_group


class Variant:
    """How FusedSAM chooses between a SAM step and a plain step. Subclasses keep their run state in the
    object itself (mutated in place), saved by ``state_dict``."""

    name = "sam"
    needs_norm = False  # does observe() want ||g||^2 at w on plain steps too?

    def check(self, opt) -> None:
        """Raise if this variant cannot run with ``opt``'s settings."""

    def observe(self, sq_norm: torch.Tensor) -> None:
        """The squared norm of this step's gradient at w (a float64 device tensor; ``needs_norm`` variants)."""

    def sam_due(self, step: int) -> bool:
        """Is step ``step`` (0-based count of completed steps) a SAM step?"""
        return True

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


class Every(Variant):
    """SAM on steps 0, k, 2k, ...; the base update with the gradient at w on the others."""

    name = "every"

    def __init__(self, k: int):
        self.k = _positive_int(k, "Every(k): k")

    def sam_due(self, step: int) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"Every({self.k})"


class Randomly(Variant):
    """SAM with probability ``p`` per step, from a generator seeded with ``seed``; ``p`` may be changed
    between steps (a schedule)."""

    name = "randomly"

    def __init__(self, p: float, seed: int = 0):
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"Randomly(p): p must be a probability in [0, 1], got {value!r}")
        self._p = float(value)

    def sam_due(self, step: int) -> bool:
        draw = torch.rand((), generator=self.generator, dtype=torch.float64).item()  # a CPU generator: no device
        return draw < self._p

    def state_dict(self) -> dict:
        return {"p": self._p, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.p = state["p"]
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return f"Randomly(p={self._p})"


class LookSAM(Variant):
    """SAM every k-th step, storing g_v; the others reuse it: g + alpha * (||g|| / ||g_v||) * g_v."""

    name = "looksam"

    def __init__(self, k: int, alpha: float = 0.7):
        self.k = _positive_int(k, "LookSAM(k): k")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"LookSAM(alpha): alpha must be a non-negative number, got {alpha!r}")
        self.alpha = float(alpha)

    def check(self, opt) -> None:
        _plain_sam_only(opt, "LookSAM")  # g_v is defined against g, the direction of plain SAM's e

    def sam_due(self, step: int) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha})"


def _plain_sam_only(opt, name: str) -> None:
    for gi, group in enumerate(opt.param_groups):
        if group["adaptive"] or not group["normalize"]:
            raise ValueError(f"{name} works with plain SAM (adaptive=False, normalize=True); param group {gi} is ASAM "
                             "or un-normalized")


class WhenSharp(Variant):
    """AE-SAM: SAM when ||g||^2 >= mu + c_t * sigma (running mean and standard deviation of ||g||^2),
    decided from the previous step's gradient, on the device, read by the host one step later."""

    name = "whensharp"
    needs_norm = True

    def __init__(self, c_start: float = -1.0, c_end: float = 1.0, total_steps: int = 1, delta: float = 0.9):
        for value, what in ((c_start, "c_start"), (c_end, "c_end")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"WhenSharp({what}) must be a number, got {value!r}")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
            raise ValueError(f"WhenSharp(delta) must be in [0, 1), got {delta!r}")
        self.c_start, self.c_end, self.delta = float(c_start), float(c_end), float(delta)
        self.total_steps = _positive_int(total_steps, "WhenSharp(total_steps)")
        self.observed = 0
        self.stats: Optional[torch.Tensor] = None  # (mean, variance), float64 on the gradients' device
        self._decision: Optional[torch.Tensor] = None  # the next step's decision, on the host once copied
        self._landed: Optional[torch.cuda.Event] = None

    def check(self, opt) -> None:
        _plain_sam_only(opt, "WhenSharp (AE-SAM)")

    def threshold(self, step: int) -> float:
        """c_t: linear from c_start (step 0) to c_end (step total_steps), then c_end."""
        return self.c_start + (self.c_end - self.c_start) * min(step, self.total_steps) / self.total_steps

    def observe(self, sq_norm: torch.Tensor) -> None:
        sq_norm = sq_norm.reshape(()).to(torch.float64)
        if self.stats is None or self.stats.device != sq_norm.device:
            self.stats = torch.zeros(2, dtype=torch.float64, device=sq_norm.device)
        mean = self.stats[0] * self.delta + (1 - self.delta) * sq_norm
        variance = self.stats[1] * self.delta + (1 - self.delta) * (sq_norm - mean).square()
        # A non-finite norm (an overflow, routine under fp16 GradScaler training) would poison the statistics
        # for the rest of the run: keep them, and take a SAM step next (the safe choice), on the device.
        finite = torch.isfinite(sq_norm)
        self.stats.copy_(torch.where(finite, torch.stack([mean, variance]), self.stats))
        due = (sq_norm >= mean + self.threshold(self.observed) * variance.sqrt()) | ~finite
        self.observed += 1
        if sq_norm.is_cuda:
            if self._decision is None:
                self._decision = torch.zeros((), dtype=torch.bool, pin_memory=True)
                self._landed = torch.cuda.Event()
            self._decision.copy_(due, non_blocking=True)
            self._landed.record()
        else:
            self._decision = due.clone()

    def sam_due(self, step: int) -> bool:
        if self._decision is None:
            return True  # nothing seen yet: the first step is a SAM step
        if self._landed is not None and not self._landed.query():
            self._landed.synchronize()  # the device is more than a step behind: wait for the copy
        return bool(self._decision)

    def state_dict(self) -> dict:
        return {"observed": self.observed, "stats": None if self.stats is None else self.stats.cpu(),
                "decision": None if self._decision is None else bool(self.sam_due(0))}

    def load_state_dict(self, state: dict) -> None:
        self.observed = state["observed"]
        self.stats = None if state["stats"] is None else state["stats"].clone()
        self._decision = None if state["decision"] is None else torch.tensor(state["decision"])
        self._landed = None

    def __repr__(self) -> str:
        return f"WhenSharp(c_start={self.c_start}, c_end={self.c_end}, total_steps={self.total_steps}, delta={self.delta})"


class MomentumSAM(Variant):
    """MSAM: every step is one backward at w - rho * v / ||v||; see the module docstring."""

    name = "momentum"

    def check(self, opt) -> None:
        _plain_sam_only(opt, "MomentumSAM")
        kind = opt._fused_kind
        if kind is None or kind.momentum_state is None:
            raise ValueError("MomentumSAM needs a fused base optimizer with a momentum (SGD with momentum, Adam, "
                             "AdamW): it perturbs along the base optimizer's momentum, which it reads from the flat "
                             "state buffers")
        for gi, group in enumerate(opt.param_groups):
            if kind.momentum_state not in update_from_group(kind, type(opt.base_optimizer), group).needed_state():
                raise ValueError(f"MomentumSAM needs {type(opt.base_optimizer).__name__} to keep a momentum (e.g. SGD "
                                 f"with momentum > 0); param group {gi} keeps no {kind.momentum_state!r}")
        for segment in opt._sam.segments:
            if segment.dtype != segment.state_dtype:
                raise ValueError(f"MomentumSAM supports float32 and float64 parameters, not {segment.dtype} (its "
                                 "perturbation reads the float32 momentum where the kernels read gradients)")

    def sam_due(self, step: int) -> bool:
        return False

    def __repr__(self) -> str:
        return "MomentumSAM()"


def orthogonal_part(g_s: torch.Tensor, g: torch.Tensor, g_dot_gs: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """g_s minus its projection on g: g_s - (g . g_s / ||g||^2) g (zero projection when g is zero)."""
    coefficient = torch.where(g_sq > 0, g_dot_gs / g_sq, torch.zeros_like(g_sq))
    return g_s - coefficient.to(g_s.dtype) * g


def reuse_coefficient(alpha: float, g_sq: torch.Tensor, gv_sq: torch.Tensor) -> torch.Tensor:
    """alpha * ||g|| / ||g_v||, zero when g_v is (nothing to reuse)."""
    return torch.where(gv_sq > 0, alpha * g_sq.sqrt() / gv_sq.sqrt(), torch.zeros_like(gv_sq))


def resolve(variant: Optional[Variant]) -> Variant:
    if variant is None:
        return Variant()
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a fused_sam.variants.Variant (Every, Randomly, LookSAM, WhenSharp, "
                        "MomentumSAM), "
                        f"got {variant!r}")
    return variant
