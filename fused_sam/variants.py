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
restore-and-update from w, and a variant's own passes (LookSAM's g_v, MomentumSAM's perturbation along the
momentum) are hooks FusedSAM calls at fixed points of a step (``Variant``), written here with the backends'
norm and perturb and a few torch operations over the flat buffers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, List, Optional

import torch

from .backends.base import StepScalars
from .flat import LOW_PRECISION
from .norms import norm_partials, spans_with_gradients, sum_over_segments

LOOKSAM_KEY = "sam_looksam_gv"  # LookSAM's g_v, a per-parameter state buffer (holds g during a SAM step)


class StepView:
    """What a variant's passes see of the step under way.

    sam: the optimizer's flat state (its ``segments``; ``fused_sam.norms`` sums over it, across ranks).
    active: per segment, which parameters have a gradient now (None: all).
    perturbations: each param group's SAM settings.
    momentum_states: per param group, the fused base's first-moment buffer ('momentum_buffer', 'exp_avg'),
        None where the group keeps none; None altogether when the base optimizer is not fused.
    rhos: ``of(group index, device)``, each group's rho as the kernels take it (``StepScalars.rho``).
    The last three are read from the param groups when first asked: most steps' hooks never ask.
    """

    def __init__(self, sam, active: list, perturbations: Callable[[], list],
                 momentum_states: Callable[[], Optional[List[Optional[str]]]], rhos: Callable[[], Callable]):
        self.sam, self.active = sam, active
        self._read_perturbations, self._read_momentum_states, self._read_rhos = perturbations, momentum_states, rhos

    @functools.cached_property
    def perturbations(self) -> list:
        return self._read_perturbations()

    @functools.cached_property
    def momentum_states(self) -> Optional[List[Optional[str]]]:
        return self._read_momentum_states()

    @functools.cached_property
    def rhos(self) -> Callable:
        return self._read_rhos()


class Variant:
    """How FusedSAM chooses between a SAM step and a plain step, and the extra passes a variant makes.
    Subclasses keep their run state in the object itself (mutated in place), saved by ``state_dict``."""

    name = "sam"
    needs_norm = False  # does observe() want ||g||^2 at w on plain steps too?
    passes: frozenset = frozenset()  # the step hooks this class defines (set per subclass: FusedSAM calls only these)
    state_keys: tuple = ()  # per-parameter flat state buffers the variant keeps (saved with the optimizer's)
    # Does the model hold perturbed weights between steps, the backup w (MomentumSAM)? And does it now?
    moves_between_steps = False
    perturbed_between_steps = False

    def check(self, groups: List[dict], momentum_states: Optional[List[Optional[str]]]) -> None:
        """Raise if this variant cannot run with these param groups and base optimizer (``momentum_states``
        as in ``StepView``)."""

    def observe(self, sq_norm: torch.Tensor) -> None:
        """The squared norm of this step's gradient at w (a float64 device tensor; ``needs_norm`` variants)."""

    def sam_due(self, step: int) -> bool:
        """Is step ``step`` (0-based count of completed steps) a SAM step?"""
        return True

    def sam_step_began(self, view: StepView) -> None:
        """first_step, before the weights move: the gradients at w are in the flat buffers."""

    def sam_update_due(self, view: StepView, found_inf: Optional[torch.Tensor]) -> None:
        """second_step, before the update: the gradients at w + e are in the flat buffers; ``found_inf`` (a
        device tensor, or None) is set when the update will be skipped."""

    def plain_direction(self, view: StepView, fused: bool) -> Optional[torch.Tensor]:
        """A plain step, before the update. May return c (a float64 device tensor) so that the fused update
        uses g + c * (the variant's first state buffer); with ``fused`` False it changes ``.grad`` itself."""
        return None

    def plain_step_done(self, view: StepView) -> None:
        """A plain step, after the update."""

    def state_loaded(self) -> None:
        """The optimizer's state was loaded: forget what was derived from the old buffers."""

    @contextlib.contextmanager
    def at_restore_point(self, sam):
        """Hold the weights at w inside the block where the variant keeps them perturbed between steps."""
        if not self.perturbed_between_steps:
            yield
            return
        held = [segment.weights.clone() for segment in sam.segments]
        for segment in sam.segments:
            segment.weights.copy_(segment.backup)
            segment.publish_weights()
        try:
            yield
        finally:
            for segment, weights in zip(sam.segments, held):
                segment.weights.copy_(weights)
                segment.publish_weights()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.passes = frozenset(hook for hook in _STEP_HOOKS if getattr(cls, hook) is not getattr(Variant, hook))


_STEP_HOOKS = ("sam_step_began", "sam_update_due", "plain_direction", "plain_step_done")


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
    state_keys = (LOOKSAM_KEY,)

    def __init__(self, k: int, alpha: float = 0.7):
        self.k = _positive_int(k, "LookSAM(k): k")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"LookSAM(alpha): alpha must be a non-negative number, got {alpha!r}")
        self.alpha = float(alpha)
        # ||g_v||^2 (float64, on the first segment's device), taken when g_v is stored; None after a load,
        # then taken again from the loaded g_v.
        self.gv_sq: Optional[torch.Tensor] = None

    def check(self, groups, momentum_states) -> None:
        _plain_sam_only(groups, "LookSAM")  # g_v is defined against g, the direction of plain SAM's e

    def sam_due(self, step: int) -> bool:
        return step % self.k == 0

    def sam_step_began(self, view: StepView) -> None:
        for segment in view.sam.segments:  # g, kept until the update makes g_v of it
            segment.ensure_state([LOOKSAM_KEY])
            segment.state[LOOKSAM_KEY].copy_(segment.grads)

    def sam_update_due(self, view: StepView, found_inf: Optional[torch.Tensor]) -> None:
        """g_v = g_s - (g . g_s / ||g||^2) g, g (from first_step) in the g_v buffer and g_s in the gradients.
        A skipped (found_inf) step stores g_v = 0: nothing is reused until the next. So does a step whose g
        or g_s holds an inf or NaN (then g . g_s is not finite): a g_v built from it would write NaN into the
        weights at every reuse step (a non-finite g at w is otherwise harmless: no perturbation, counted in
        nonfinite_steps)."""
        sam = view.sam
        g_dot_gs = sum_over_segments(sam, lambda s: torch.dot(s.state[LOOKSAM_KEY], s.grads.to(s.state_dtype)))
        g_sq = sum_over_segments(sam, lambda s: torch.dot(s.state[LOOKSAM_KEY], s.state[LOOKSAM_KEY]))
        discard = ~(torch.isfinite(g_dot_gs) & torch.isfinite(g_sq))
        if found_inf is not None:
            discard = discard | (found_inf.to(discard.device).reshape(()) != 0)
        for segment in sam.segments:
            stored = segment.state[LOOKSAM_KEY]
            g_v = orthogonal_part(segment.grads.to(segment.state_dtype), stored, g_dot_gs.to(segment.device),
                                  g_sq.to(segment.device))
            stored.copy_(torch.where(discard.to(segment.device), torch.zeros_like(g_v), g_v))
        self.gv_sq = _stored_sq_norm(sam)

    def plain_direction(self, view: StepView, fused: bool) -> Optional[torch.Tensor]:
        """The reuse step's c = alpha * ||g|| / ||g_v|| (float64, on the device), ||g|| from the backends'
        norm pass over the gradients at w, ||g_v|| as taken when g_v was stored. The gradients may carry a
        GradScaler's scale: so does c, and the update unscales g + c * g_v as a whole. For a base optimizer
        that reads .grad, g <- g + c * g_v there instead."""
        sam = view.sam
        if self.gv_sq is None:
            self.gv_sq = _stored_sq_norm(sam)
        work = spans_with_gradients(sam.segments, view.active)
        if not work:
            return torch.zeros((), dtype=torch.float64, device=sam.segments[0].device)
        g_sq = next(iter(norm_partials(sam, work, view.perturbations).values())).sum(dtype=torch.float64)
        coefficient = reuse_coefficient(self.alpha, g_sq, self.gv_sq.to(g_sq.device))
        if fused:
            return coefficient
        for segment, span in work:  # the other views stay zero, for the next backward to accumulate into
            factor = coefficient.to(segment.device, segment.state_dtype)
            g_v = span.state[LOOKSAM_KEY]
            if span.grads.dtype == g_v.dtype:
                span.grads.addcmul_(g_v, factor)  # one pass, in place
            else:  # 16-bit gradients: the sum in float32, rounded once
                span.grads.copy_(span.grads.to(g_v.dtype).addcmul_(g_v, factor))
        return None

    def state_loaded(self) -> None:
        self.gv_sq = None

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha})"


def _stored_sq_norm(sam) -> torch.Tensor:
    return sum_over_segments(sam, lambda s: torch.dot(s.state[LOOKSAM_KEY], s.state[LOOKSAM_KEY]))


def _plain_sam_only(groups: List[dict], name: str) -> None:
    for gi, group in enumerate(groups):
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

    def check(self, groups, momentum_states) -> None:
        _plain_sam_only(groups, "WhenSharp (AE-SAM)")

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
    moves_between_steps = True

    def __init__(self):
        self.perturbed_between_steps = False  # the weights are w - rho v / ||v||, the backup holds w

    def check(self, groups, momentum_states) -> None:
        _plain_sam_only(groups, "MomentumSAM")
        if momentum_states is None:
            raise ValueError("MomentumSAM needs a fused base optimizer (SGD with momentum, Adam, AdamW): it perturbs "
                             "along the base optimizer's momentum, which it reads from the flat state buffers")
        for gi, (group, state) in enumerate(zip(groups, momentum_states)):
            if state is None:
                raise ValueError(f"MomentumSAM needs a fused base optimizer with a momentum (SGD with momentum > 0, "
                                 f"Adam, AdamW); param group {gi} keeps none")
            dtype = next((p.dtype for p in group["params"] if p.dtype in LOW_PRECISION), None)
            if dtype is not None:
                raise ValueError(f"MomentumSAM supports float32 and float64 parameters, not {dtype} (its "
                                 "perturbation reads the float32 momentum where the kernels read gradients)")

    def sam_due(self, step: int) -> bool:
        return False

    def plain_step_done(self, view: StepView) -> None:
        """backup <- w, w <- w - rho * v / (||v|| + perturb_eps), v the base optimizer's momentum, its norm
        global: the backends' own norm and perturb, over spans whose 'gradient' is the momentum (same dtype:
        float32/float64 parameters only). Only the parameters this step updated move; the others' backup is
        their weight, so the next step's restore leaves them as they are."""
        sam = view.sam
        perturbations = view.perturbations
        work = []
        for segment, mask in zip(sam.segments, view.active):
            name = view.momentum_states[segment.group_index]
            for _, _, (updated,), span in segment.spans(mask):
                if updated:
                    work.append((segment, dataclasses.replace(span, grads=span.state[name])))
                else:
                    span.backup.copy_(span.weights)
        partials = norm_partials(sam, work, perturbations)
        for segment, span in work:
            scalars = StepScalars(rho=-view.rhos(segment.group_index, span.device))  # against the momentum
            segment.backend.perturb(span, perturbations[segment.group_index], partials[span.device], None, scalars)
            segment.publish_weights()
        self.perturbed_between_steps = True

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
