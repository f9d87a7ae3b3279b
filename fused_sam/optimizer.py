"""FusedSAM: Sharpness-Aware Minimization over flat parameter buffers.

A dispatcher: the class keeps the flat storage and says what each step does; the arithmetic goes to a
backend (``fused_sam.backends``) chosen per (device, dtype), the global norm to ``fused_sam.norms``, the
state dict to ``fused_sam.checkpoint``, a variant's own passes to its hooks (``fused_sam.variants``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import torch

from . import capture, checkpoint
from .backends import KernelLaunches, Perturbation, StepScalars, resolve_backend
from .backends.base import Hyperparameter, grad_unscale, perturbation_of
from .distributed import is_dtensor, local_of, refuse_under_zero, shard_group
from .flat import LOW_PRECISION, FlatSegment
from .norms import nonfinite_flag, norm_partials, spans_with_gradients, squared_norm
from .settings import SAM_KEYS, check_options, check_params, check_sam_settings, current_scale, tensor_of
from .step_state import PerDevice, SAMState, without_grad
from .telemetry import Telemetry, reference_sums, telemetry_out, unfused_sums
from .updates import fused_kind, update_from_group
from .variants import StepView, Variant, resolve as resolve_variant

class FusedSAM(torch.optim.Optimizer):
    """SAM (Foret et al., 2021), ASAM and un-normalized SAM, fused over flat parameter buffers.

    A drop-in for the classic PyTorch SAM class: ``first_step``/``second_step``/``step(closure)``,
    ``base_optimizer`` is a class built over the same ``param_groups`` list.

    Args:
        params: tensors or param-group dicts; ``rho``, ``adaptive``, ``eta``, ``normalize`` may be set per group.
        base_optimizer: a ``torch.optim.Optimizer`` class. SGD, Adam and AdamW are fused; any other class
            runs its own ``step()`` after the fused perturb/restore.
        rho: neighbourhood radius. adaptive: ASAM scaling T = |w| + eta. normalize: False gives USAM, e = rho g.
        perturb_eps: SAM's epsilon in rho / (||g|| + perturb_eps).
        mode: "paired" (both gradients of a SAM step from one batch: ``first_step``/``second_step`` or
            ``step(closure)``) or "alternate" (each ``step()`` call takes one half of a SAM step, for
            trainers that call ``step()`` once per batch without a closure).
        capturable: the kernels read lr and rho from device tensors (a param group's own tensor, updated
            in place by LR schedulers, or a copy of a Python float made before each step), as they read
            the step counts and GradScaler's scale, so ``first_step`` and ``second_step`` can be captured
            into a CUDA graph and replayed (see README, "CUDA graphs"). Paired mode, fused base only.
        variant: a ``fused_sam.variants`` object (``Every(k)``, ``Randomly(p)``, ``LookSAM(k)``) that decides
            per step whether SAM's second pass runs (``sam_step_due``); None: SAM at every step.
        telemetry: measure every SAM step on the device, from sums inside its passes: gradient norms,
            the perturbation's norm, the directional derivative, the curvature along e, the cosine of the two
            gradients, the loss gap (see ``telemetry()``). False runs exactly the kernels it runs without.
        skip_nonfinite: without a GradScaler, skip an update whose gradients hold an inf or NaN (w restored
            exactly, state and step counts unchanged; counted in ``skipped_steps``), decided on the device
            from one more read of the gradients (their squared norm, summed over ranks). Under a GradScaler
            its own found_inf decides. False: apply whatever the gradients hold, as torch.optim does.
        master_weights: keep a float32 master copy of bfloat16/float16 parameters (the model keeps its
            low-precision weights for forward and backward). The master copy is SAM's restore point and
            what the base update reads and writes; the weights are its rounding. Parameters in float32 or
            float64 need none and are left as they are; if no parameter is bf16/fp16 this is an error.
        backend: "auto", "reference", or a kernel backend (see ``fused_sam.available_backends``).
        **base_kwargs: passed to ``base_optimizer``, ``eps`` included, as the classic SAM class does.

    Parameters' ``.data`` and ``.grad`` become views into flat buffers. As in torch.optim, a parameter
    whose ``.grad`` is None (``zero_grad()`` sets them so) is not perturbed or updated: it keeps its weight,
    state and step count.
    """

    def __init__(
        self,
        params,
        base_optimizer: type = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        perturb_eps: float = 1e-12,
        mode: str = "paired",
        master_weights: bool = False,
        capturable: bool = False,
        variant: Optional[Variant] = None,
        skip_nonfinite: bool = True,
        telemetry: bool = False,
        backend: str = "auto",
        **base_kwargs,
    ):
        self.variant = resolve_variant(variant)
        check_options(self.variant, base_optimizer, rho, eta, perturb_eps, mode, master_weights, capturable,
                      skip_nonfinite, telemetry, backend)
        refuse_under_zero(FusedSAM)
        groups = check_params(params)
        if master_weights and not any(tensor_of(p).dtype in LOW_PRECISION for g in groups for p in g["params"]):
            raise ValueError(
                "master_weights=True keeps float32 master copies of bfloat16/float16 parameters, and none of "
                "these parameters is bfloat16 or float16 (convert the model first, e.g. model.to(torch.bfloat16))"
            )
        self.master_weights, self.capturable, self.skip_nonfinite = master_weights, capturable, skip_nonfinite
        self.backend_name, self.mode = backend, mode
        self.base_optimizer = None
        self._sam = SAMState(float(perturb_eps))
        self._sam.telemetry = Telemetry() if telemetry else None
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, **base_kwargs)
        defaults[checkpoint.PROGRESS_KEY] = None
        super().__init__(groups, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One param-group list and one state mapping, shared with the base optimizer (LR schedulers may be
        # attached to either; opt.state[p] is opt.base_optimizer.state[p]).
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_kind = fused_kind(base_optimizer)
        if capturable and not self._fused_kind:
            raise ValueError(f"capturable=True needs a fused base optimizer (torch.optim.SGD, Adam or AdamW), got "
                             f"{base_optimizer.__name__}, whose own step() reads found_inf on the host")
        self._build_segments(range(len(self.param_groups)))
        self.variant.check(self.param_groups, self._momentum_states())

    # --- layout -----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "base_optimizer", None) is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        if self._sam.perturbed is not None:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        capture.refuse_if_captured(self._sam, "add_param_group()")
        seen = {id(p): f"a parameter of param group {gi}" for gi, g in enumerate(self.param_groups) for p in g["params"]}
        (group,) = check_params([param_group], seen, len(self.param_groups))
        for key in SAM_KEYS + (checkpoint.PROGRESS_KEY,):
            group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(group)
        self._build_segments([len(self.param_groups) - 1])

    def _build_segments(self, group_indices) -> None:
        """Flatten the given param groups: resolve every backend first, so an error changes nothing."""
        plans = []
        sam = self._sam
        updates = self._base_updates()

        def launches() -> KernelLaunches:  # read only where a backend is checked before use
            return KernelLaunches(tuple(updates), tuple(self._perturbations()), self.capturable,
                                  sam.telemetry is not None)

        for gi in group_indices:
            buckets: Dict[tuple, list] = {}
            for p in self.param_groups[gi]["params"]:
                group = shard_group(p, "a parameter") if is_dtensor(p) else None
                if group is not None and all(group is not known for known, _ in sam.shard_groups):
                    sam.shard_groups.append((group, p.device))
                local = local_of(p)
                # A DTensor whose shard here is empty still has state to save on every rank (DCP).
                if local.numel() > 0 or group is not None:
                    buckets.setdefault((local.device, local.dtype, is_dtensor(p), group), []).append(p)
            for (device, dtype, _, group), params in buckets.items():
                master = self.master_weights and dtype in LOW_PRECISION
                plans.append((gi, params, group, resolve_backend(self.backend_name, device, dtype, master, launches)))
        for gi, params, group, backend in plans:
            segment = FlatSegment(gi, params, self.master_weights)
            segment.backend, segment.shard_group = backend, group
            sam.segments.append(segment)
            if updates:  # state exists from the start, as templates for loading (DCP) need it
                segment.ensure_state(updates[gi].needed_state(), updates[gi].initial_state)
                checkpoint.publish_state(self, segment)
        sam.home_counters()

    def _relayout(self, moved: str) -> None:
        """Parameters were moved or re-typed after construction: flatten them anew, keeping the state."""
        sam = self._sam
        capture.refuse_if_captured(sam, f"{moved} changed storage: re-flattening it")
        if sam.perturbed is not None:
            raise RuntimeError(
                f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
            )
        state = checkpoint.split_saved_state(self.state_dict()["state"], [])[0] if self._fused_kind else None
        masters = checkpoint.masters(sam.segments)
        for segment in sam.segments:
            segment.remove_hooks()
        sam.segments.clear()
        sam.partials_buffers.clear()
        self._build_segments(range(len(self.param_groups)))
        if state is not None:
            checkpoint.load_fused_state(self, state)
        checkpoint.load_masters(sam.segments, masters, keep_edits=True)

    def _weights_taken_in(self) -> List[bool]:
        """At the start of a step: re-flatten parameters moved since the last one, take in weights written
        from outside; per segment, whether its views were intact (else the gradients need linking)."""
        sam = self._sam
        intact = [segment.intact() for segment in sam.segments]
        if not all(intact):
            moved = next(filter(None, (s.storage_moved() for s in sam.segments)), None)
            if moved:
                self._relayout(moved)
                intact = [False] * len(sam.segments)
        for segment in sam.segments:
            segment.sync_from_outside()
        return intact

    def _linked_grads(self, intact: List[bool], what: str) -> List[Optional[List[bool]]]:
        """Link every gradient into the flat buffers; per segment, which parameters have one (None: all).
        Refuses a set that differs from the one a CUDA graph captured for ``what``."""
        sam = self._sam
        active = [None if ok else segment.link_grads() for segment, ok in zip(sam.segments, intact)]
        changed = capture.changed_live_set(sam, what, active)
        if changed is not None:
            if sam.perturbed is not None:
                self._restore_all()
            raise capture.live_set_error(what, changed)
        return active

    # --- per-step settings --------------------------------------------------------------------------

    def _perturbations(self) -> List[Perturbation]:
        """Each param group's SAM settings (rho, a per-step value, comes from ``_step_hyperparameters``)."""
        out = []
        for gi, g in enumerate(self.param_groups):
            check_sam_settings(g, f"param group {gi}")
            if isinstance(g["rho"], torch.Tensor) and not self.capturable:
                raise ValueError(f"rho of param group {gi} is a tensor: that needs FusedSAM(..., capturable=True)")
            out.append(perturbation_of(bool(g["adaptive"]), float(g["eta"]), bool(g["normalize"]),
                                       self._sam.perturb_eps))
        return out

    def _step_hyperparameters(self, name: str) -> Callable[[int, torch.device], Hyperparameter]:
        """``of(group index, device)``: ``name`` (lr or rho) as the kernels take it (``capture.step_values``)."""
        return capture.step_values(self._sam, self.param_groups, name, self.capturable)

    def _base_updates(self, groups: Optional[List[dict]] = None) -> list:
        """The fused base update of each param group (``groups``: settings to read instead of the live
        ones) at this step; empty when the base is not fused. Raises what the update would refuse."""
        if not self._fused_kind:
            return []
        base_cls = type(self.base_optimizer)
        return [update_from_group(self._fused_kind, base_cls, g)
                for g in (self.param_groups if groups is None else groups)]

    def _check_base_settings(self) -> None:
        """Raise now, before first_step moves w, what reading the base update at second_step would refuse."""
        if self._base_updates():
            self._step_hyperparameters("lr")

    def _momentum_states(self) -> Optional[List[Optional[str]]]:
        """Per param group, the fused base's first-moment buffer under its settings (None: it keeps none);
        None when the base is not fused."""
        if not self._fused_kind:
            return None
        return [u.momentum_state if u.momentum_state in u.needed_state() else None for u in self._base_updates()]

    def _view(self, active: list) -> StepView:
        return StepView(self._sam, active, self._perturbations, self._momentum_states,
                        lambda: self._step_hyperparameters("rho"))

    # --- the SAM step ------------------------------------------------------------------------------

    @without_grad
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional["torch.amp.GradScaler"] = None,
                   loss=None) -> None:
        """Save w exactly and move to w + e(w) using the gradients now in ``.grad``.

        A parameter whose ``.grad`` is None is not perturbed (it has no first gradient) but is still
        updated by ``second_step`` if it has a gradient then, as in the classic SAM.

        ``grad_scaler``: the GradScaler whose scale multiplies these gradients. Normalized SAM needs it only
        to scale perturb_eps with the gradient (without it e differs by perturb_eps / ||g||, relatively);
        un-normalized SAM (normalize=False) needs it, and the second step refuses to go on without it.
        Its scale is read on the device, without a host sync.

        ``loss``: with ``telemetry=True``, the loss at w (a tensor, read on the device), so that the step
        records ``loss_gap`` when ``second_step`` is given the loss at w + e.
        """
        sam = self._sam
        if sam.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice; finish the SAM step with second_step() (under a GradScaler: "
                "scaler.step(optimizer)) before the next first_step()"
            )
        capture.note_capture(sam, self.capturable, "first_step()")
        if not self.sam_step_due:
            raise RuntimeError(f"step {sam.completed_steps} is not a SAM step for {self.variant!r} "
                               "(opt.sam_step_due is False): take it with opt.plain_step() after the backward at w")
        grad_scale = current_scale(grad_scaler)
        intact = self._weights_taken_in()
        perturbations = self._perturbations()
        rhos = self._step_hyperparameters("rho")  # before any kernel: a refusal leaves nothing half done
        self._check_base_settings()
        active = self._linked_grads(intact, "first_step()")
        if "sam_step_began" in self.variant.passes:
            self.variant.sam_step_began(StepView(sam, active, lambda: perturbations, self._momentum_states, lambda: rhos))
        self._perturb(spans_with_gradients(sam.segments, active), perturbations, grad_scale, rhos, loss)
        sam.perturbed = active
        for segment in sam.segments:
            segment.mark_grads_seen()
        if zero_grad:
            self.zero_grad()

    def _perturb(self, work: list, perturbations: List[Perturbation], grad_scale: Optional[torch.Tensor],
                 rhos: Callable[[int, torch.device], Hyperparameter], loss=None) -> None:
        """backup <- w, w <- w + e over ``work`` ((segment, span) with a gradient), with the global norm."""
        sam = self._sam
        partials = grad_sq = along_g1 = None
        normalized = any(p.normalize for p in perturbations)
        telemetry = sam.telemetry
        if telemetry is not None:
            telemetry.abandon()  # what an earlier step that ended in an error gathered
        if (normalized or telemetry is not None) and (work or sam.shard_groups):
            partials = norm_partials(sam, work, perturbations)
            if self.variant.needs_norm or telemetry is not None:
                grad_sq = squared_norm(partials, grad_scale)
                if self.variant.needs_norm:
                    self.variant.observe(grad_sq)
            if telemetry is not None:
                along_g1 = {}  # per (device, shard group): each span's e.g1 partials
            if not normalized:  # measured for telemetry only: an un-normalized e does not read it
                partials = None
        counter = sam.nonfinite if partials is not None else None  # incremented once per step
        scales = PerDevice(grad_scale)
        for segment, span in work:
            device = segment.device  # the span's, without making a torch.device per call
            owns_counter = counter is not None and device == counter.device
            device_partials = None if partials is None else partials[device]
            scalars = StepScalars(rho=rhos(segment.group_index, device), grad_scale=scales.on(device))
            args = (span, perturbations[segment.group_index], device_partials, counter if owns_counter else None,
                    scalars)
            if along_g1 is None:
                segment.backend.perturb(*args)
            else:
                segment.backend.perturb(*args, telemetry_out(along_g1, segment, span, columns=None))
            if owns_counter:
                counter = None
        if along_g1 is not None:
            telemetry.start(sam.segments[0].device, sam.completed_steps)
            telemetry.began(grad_sq, along_g1, grad_scale, loss)
        for segment in sam.segments:
            segment.publish_weights()
        sam.perturbed_with_scale = grad_scale is not None
        sam.perturbed_unnormalized = any(not perturbations[segment.group_index].normalize for segment, _ in work)

    @without_grad
    def second_step(self, zero_grad: bool = False, loss=None) -> None:
        """Restore w exactly, then take the base optimizer's step with the gradients taken at w + e.

        Every parameter with a gradient now is updated, also one that had none at ``first_step``; a
        parameter perturbed at ``first_step`` but without a gradient now is restored and not updated.
        Under a GradScaler, finish the step with ``scaler.step(optimizer)`` instead (see ``step``).
        ``loss``: with ``telemetry=True``, the loss at w + e (see ``first_step``).
        """
        self._second_step(None, None, loss)
        if zero_grad:
            self.zero_grad()

    def _second_step(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor], loss=None) -> None:
        """second_step with GradScaler's inputs: the gradients are divided by ``grad_scale`` inside the
        update, and where ``found_inf`` is non-zero the update is skipped (w restored exactly, state and
        step counts unchanged), all decided on the device."""
        sam = self._sam
        if sam.perturbed is None:
            raise RuntimeError("second_step() called before first_step()")
        capture.note_capture(sam, self.capturable, "second_step()")
        intact = [segment.intact() for segment in sam.segments]
        for segment, ok in zip(sam.segments, intact):
            moved = None if ok else segment.storage_moved()
            if moved:
                raise RuntimeError(
                    f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
                )
        active = self._linked_grads(intact, "second_step()")
        problem = sam.scaling_mismatch(grad_scale is not None or found_inf is not None)
        if problem:
            self._restore_all()
            raise RuntimeError(problem + "; the weights were restored to w and not updated")
        if found_inf is None:
            found_inf = self._nonfinite_gradients(spans_with_gradients(sam.segments, active))
        if "sam_update_due" in self.variant.passes:
            self.variant.sam_update_due(self._view(active), found_inf)
        telemetry = sam.telemetry
        if telemetry is None or not telemetry.measuring:
            self._update(active, grad_scale, found_inf)
            return
        sums: Dict[tuple, list] = {}
        self._update(active, grad_scale, found_inf, sums=sums)
        telemetry.finished(sam, sums, grad_scale, found_inf, loss)

    def _update(self, active, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                reuse_scale: Optional[torch.Tensor] = None, sums: Optional[Dict[tuple, list]] = None) -> None:
        """Restore w where it was perturbed and take the base update with the gradients now in the buffers
        (``reuse_scale``: plus that times the variant's stored direction, added inside the kernels); end the
        step. ``sam.perturbed`` says what was perturbed (a plain step: nothing). ``sums`` (telemetry):
        receives per (device, shard group) each span's (rows, 3) sums of e.e, e.g2, g2.g2."""
        sam = self._sam
        scales = PerDevice(grad_scale)
        if self._fused_kind:
            self._fused_update(active, scales, PerDevice(found_inf), PerDevice(reuse_scale, torch.float64), sums)
        else:
            if sums is not None:
                unfused_sums(sam, active, scales, sums)
            self._restore_all()
            self._unfused_base_step(scales, found_inf)
        sam.perturbed = None
        sam.completed_steps += 1
        if sam.telemetry is not None:
            sam.telemetry.tick()
        sam.sam_due = None
        for segment in sam.segments:
            segment.mark_grads_seen()
        # What an LR scheduler's wrapper of step() records; users of first/second_step never call step().
        self._opt_called = self.base_optimizer._opt_called = True

    def _fused_update(self, active, scales: PerDevice, infs: PerDevice, reuses: PerDevice,
                      sums: Optional[Dict[tuple, list]] = None) -> None:
        """The backends' restore-and-update over every span with a gradient; restore only where a perturbed
        parameter has none now. ``sums``: see ``_update``."""
        sam = self._sam
        updates = self._base_updates()
        lrs = self._step_hyperparameters("lr")
        reused_key = self.variant.state_keys[0] if reuses.value is not None else None
        for segment, perturbed, has_grad in zip(sam.segments, sam.perturbed, active):
            update = updates[segment.group_index]
            if segment.ensure_state(update.needed_state(), update.initial_state) or not segment.published:
                capture.refuse_if_captured(sam, "a new optimizer state buffer (momentum or amsgrad turned on)")
                checkpoint.publish_state(self, segment)
            device_scale, device_inf = scales.on(segment.device), infs.on(segment.device)
            lr, device_reuse = lrs(segment.group_index, segment.device), reuses.on(segment.device)
            for first, _, (was_perturbed, updated), span in segment.spans(perturbed, has_grad):
                if updated:
                    if not was_perturbed and span.master is None:  # a plain step, or a gradient that
                        span = dataclasses.replace(span, backup=span.weights)  # appeared only at w + e:
                        # w itself is the restore point (the kernels read each element before writing it)
                    if reused_key is not None:
                        span = dataclasses.replace(span, reused=span.state[reused_key])
                    scalars = StepScalars(step=segment.step_of(first), lr=lr, grad_scale=device_scale,
                                          found_inf=device_inf, reuse_scale=device_reuse)
                    if sums is None:
                        segment.backend.restore_and_update(span, update, scalars)
                    else:
                        out = telemetry_out(sums, segment, span)
                        segment.backend.restore_and_update(span, update, scalars, out)
                elif was_perturbed:
                    if sums is not None:  # e counts in |e|^2, with no second gradient
                        reference_sums(sums, segment, span, None, has_grads=False)
                    segment.backend.restore(span)
            taken = None if device_inf is None else (device_inf.reshape(()) == 0).to(torch.float32)
            segment.advance_steps(has_grad, taken)
            segment.publish_weights()

    def telemetry(self, sync: bool = True) -> Optional[dict]:
        """What the last recorded SAM step measured (``FusedSAM(..., telemetry=True)``), None before one:
        ``step`` (when, 0-based) and ``fused_sam.telemetry.FIELDS`` (README, "Telemetry"). A skipped step
        and a variant's plain step record nothing. ``sync=True``: Python floats, one host synchronisation;
        ``sync=False``: 0-d float64 device tensors, no sync (``step`` NaN before a record, ``loss_gap`` NaN
        when its losses were not given)."""
        telemetry = self._sam.telemetry
        if telemetry is None:
            raise RuntimeError("telemetry() needs FusedSAM(..., telemetry=True)")
        return telemetry.read(sync)

    @property
    def sam_step_due(self) -> bool:
        """Is the step under way a SAM step (first_step, a second backward, second_step) or, for a variant
        that says no, a plain one (``plain_step`` after the one backward at w)? Decided on the host once per
        step, when first asked; always True without a variant."""
        sam = self._sam
        if sam.perturbed is not None:
            return True
        if sam.sam_due is None:
            sam.sam_due = self.variant.sam_due(sam.completed_steps)
        return sam.sam_due

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = False) -> None:
        """The step a variant takes without SAM's second pass: the base update with the gradients at w now
        in ``.grad`` (LookSAM: plus alpha * ||g|| / ||g_v|| times its stored g_v). Under a GradScaler take it
        with ``scaler.step(optimizer)`` instead."""
        self._plain_step(None, None)
        if zero_grad:
            self.zero_grad()

    def _plain_step(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        sam = self._sam
        if sam.perturbed is not None:
            raise RuntimeError("plain_step() between first_step() and second_step(): finish the SAM step")
        if self.sam_step_due:
            raise RuntimeError(f"step {sam.completed_steps} is a SAM step for {self.variant!r} (opt.sam_step_due is "
                               "True): take it with first_step(), a second backward and second_step()")
        active = self._linked_grads(self._weights_taken_in(), "plain_step()")
        work = spans_with_gradients(sam.segments, active)
        norm = None
        if self.variant.needs_norm and work:
            norm = squared_norm(norm_partials(sam, work, self._perturbations()), grad_scale)
            self.variant.observe(norm)
        if found_inf is None:
            found_inf = self._nonfinite_gradients(work, norm)
        view, passes = self._view(active), self.variant.passes
        reuse_scale = None
        if "plain_direction" in passes:
            reuse_scale = self.variant.plain_direction(view, fused=bool(self._fused_kind))
        sam.perturbed = [[self.variant.perturbed_between_steps] * len(segment.params) for segment in sam.segments]
        self._update(active, grad_scale, found_inf, reuse_scale)
        if "plain_step_done" in passes:
            self.variant.plain_step_done(view)

    def _nonfinite_gradients(self, work, norm: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """With ``skip_nonfinite``, the found_inf of an update without a GradScaler (see
        ``fused_sam.norms.nonfinite_flag``), counted in ``skipped_steps``; else None."""
        if not self.skip_nonfinite:
            return None
        found_inf = nonfinite_flag(self._sam, work, len(self.param_groups), norm)
        if found_inf is not None:
            self._sam.skipped += found_inf.to(self._sam.skipped.device, torch.int32)
        return found_inf

    def at_restore_point(self):
        """A context manager holding the weights at w inside the block (evaluation, export): MomentumSAM keeps
        the model at its perturbed point between steps. The perturbed weights come back after the block."""
        return self.variant.at_restore_point(self._sam)

    def _restore_all(self) -> None:
        sam = self._sam
        for segment, perturbed in zip(sam.segments, sam.perturbed):
            for _, _, (was_perturbed,), span in segment.spans(perturbed):
                if was_perturbed:
                    segment.backend.restore(span)
            segment.publish_weights()
        sam.perturbed = None

    def _unfused_base_step(self, scales: PerDevice, found_inf: Optional[torch.Tensor]) -> None:
        """A base optimizer that is not fused steps itself: unscale its gradients in place, and skip it
        when found_inf is set (this reads found_inf on the host: one sync, as GradScaler's own path)."""
        if scales.value is not None:
            for segment in self._sam.segments:
                segment.grads.mul_(grad_unscale(scales.on(segment.device)))
        if found_inf is not None and float(found_inf.sum()) != 0:
            return
        self.base_optimizer.step()

    def _grads_fresh(self) -> bool:
        """True if a backward (or any write to a gradient) happened since the last step or zero_grad."""
        return any(segment.grads_fresh() for segment in self._sam.segments)

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, loss=None):
        """One SAM step, in either closure convention; returns the loss at w.

        - torch.optim's (Lightning's automatic optimization): no backward has run since the last step,
          so the closure is called at w for the first gradient, then at w + e for the second.
        - the classic SAM class's: the first backward already ran, so the closure runs once, at w + e.

        Between ``first_step`` and ``second_step`` this is the second step: the closure, if given, is called
        once (at w + e) and ``second_step`` follows; so a trainer's own ``optimizer.step()`` after a
        hand-written first pass completes the SAM step. With ``mode="alternate"``
        each call is one half of a SAM step: perturb, then restore and update (see the class docstring).

        ``loss`` (telemetry): the loss at w + e of a second step taken here without a closure, e.g.
        ``scaler.step(optimizer, loss=loss)`` (see ``first_step``).
        """
        if self.mode == "alternate":
            return self._half_step(closure)
        grad_scale, found_inf = self._grad_scaler_inputs()
        if not self.sam_step_due:  # the variant's plain step: one gradient, at w
            loss = None
            if closure is not None and not self._grads_fresh():
                with torch.enable_grad():
                    loss = closure()
            self._plain_step(grad_scale, found_inf)
            return loss
        if self._sam.perturbed is not None:  # the rest of a SAM step begun by first_step()
            returned = None
            if closure is not None:
                with torch.enable_grad():
                    returned = closure()
            # a trainer's do-nothing closure (Lightning's manual optimization) returns None: keep ``loss``
            self._second_step(grad_scale, found_inf, loss if returned is None else returned)
            return returned
        if grad_scale is not None or found_inf is not None:
            raise RuntimeError(
                "scaler.step(optimizer) is SAM's second step: run the first scaled backward and "
                "optimizer.first_step() before it (or use FusedSAM(..., mode='alternate'), where each "
                "scaler.step(optimizer) takes one half of a SAM step)"
            )
        if closure is None:
            raise RuntimeError(
                "FusedSAM.step() needs a closure that runs forward and backward; or call first_step() and "
                "second_step() yourself; or construct FusedSAM(..., mode='alternate') for a trainer that calls "
                "step() once per batch"
            )
        loss = None
        if not self._grads_fresh():
            with torch.enable_grad():
                loss = closure()
        self.first_step(zero_grad=True, loss=loss)
        with torch.enable_grad():
            loss_at_perturbed = closure()
        self.second_step(loss=loss_at_perturbed)
        return loss_at_perturbed if loss is None else loss

    def _half_step(self, closure: Optional[Callable]):
        """mode="alternate": perturb, or restore and update, whichever half is next; returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._sam.perturbed is None:
            self.first_step(loss=loss)
        else:
            self.second_step(loss=loss)
        return loss

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's optimizer protocol. In paired mode ``scaler.step(opt)`` sets ``grad_scale`` and
        ``found_inf`` (device tensors) and calls ``step()``, the second step, which always restores w,
        unscales inside the update and skips it on found_inf, without a host sync. In alternate mode
        GradScaler keeps its own path (unscale, read found_inf, skip the call), so that a skipped half is
        taken again with the next batch."""
        return self.mode == "paired"

    def _grad_scaler_inputs(self):
        """(grad_scale, found_inf) that scaler.step(opt) set on this optimizer for this call, else Nones."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and not isinstance(found_inf, torch.Tensor):  # GradScaler's sum over no devices: 0
            found_inf = torch.tensor(float(found_inf))
        if grad_scale is not None and not isinstance(grad_scale, torch.Tensor):
            grad_scale = torch.tensor(float(grad_scale))
        return grad_scale, found_inf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient buffer in one operation each, and as torch.optim: with set_to_none every
        ``.grad`` becomes None, so a parameter the next backward does not reach (frozen, an unrouted
        expert, an unused branch) is neither perturbed nor updated; without it the existing gradients stay
        as zeros and their parameters take a zero-gradient update. A backward accumulates into the flat
        buffer either way (a hook links the view before accumulation).

        Parameters moved since the last step (``model.to(...)`` also moves their ``.grad`` out of the
        buffer) are flattened anew first, so the gradients they hold are the ones zeroed.
        """
        sam = self._sam
        if sam.perturbed is None:
            moved = next(filter(None, (s.storage_moved() for s in sam.segments)), None)
            if moved:
                self._relayout(moved)
        for segment in sam.segments:
            segment.zero_grad(set_to_none)

    @property
    def _opt_called(self) -> bool:
        """LR schedulers set and read this flag on the optimizer; kept in the shared state, so a flag set
        through a wrapper (Lightning's) is seen by a scheduler holding the optimizer itself."""
        return self._sam.opt_called

    @_opt_called.setter
    def _opt_called(self, value: bool) -> None:
        self._sam.opt_called = value

    @property
    def perturbed(self) -> bool:
        """True between first_step and second_step: the weights are at w + e."""
        return self._sam.perturbed is not None

    @property
    def perturb_eps(self) -> float:
        return self._sam.perturb_eps

    @property
    def nonfinite_steps(self) -> int:
        """How many first_steps saw a non-finite gradient norm and did not perturb (reads the device)."""
        counter = self._sam.nonfinite
        return 0 if counter is None else int(counter.item())

    @property
    def skipped_steps(self) -> int:
        """How many updates ``skip_nonfinite`` skipped for an inf or NaN in their gradients (reads the
        device). Steps a GradScaler skips are its own: its scale backs off."""
        counter = self._sam.skipped
        return 0 if counter is None else int(counter.item())

    @torch.no_grad()
    def check_finite(self, weights: bool = True) -> None:
        """Raise ValueError naming the first parameter whose optimizer state, float32 master weight or (with
        ``weights``) weight holds an inf or NaN. One read of every buffer and a host sync: for checkpoints
        and debugging, not every step. ``state_dict()`` runs it on what it exports (no weights), so a
        corrupt state never reaches a checkpoint that ``load_state_dict`` would refuse. With sharded
        parameters every rank takes part and every rank raises alike."""
        checkpoint.check_finite(self, weights)

    @property
    def backends(self) -> Dict[str, str]:
        """Backend name per parameter storage, e.g. {'cuda:0 torch.bfloat16': 'triton'}."""
        return {f"{s.device} {s.dtype}": s.backend.name for s in self._sam.segments}

    def state_dict(self) -> dict:
        """torch.optim-format state (per-parameter tensors, 'step') plus the param groups and SAM's own.

        Everything a resumed run needs is per parameter or per param group, the parts that
        ``torch.distributed.checkpoint`` and ``get_optimizer_state_dict`` keep: with master weights, each
        parameter's state holds its float32 master ('sam_master_weight'); in ``mode="alternate"`` it holds
        the restore point ('sam_restore_point': w, the weight itself outside a SAM step), and each group
        says whether the state dict was taken between the two halves of a step: the model's own state dict
        then holds w + e, and a resumed run restores and updates exactly as the uninterrupted one. For
        DTensor parameters (FSDP2) these tensors are DTensors sharded as the parameter.
        """
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedSAM (or matching torch.optim) state dict; the layouts must match. Everything is
        checked before anything changes: a refused state dict leaves the optimizer as it was. State dicts
        of earlier fused_sam formats load after ``fused_sam.checkpoint.upgrade_state_dict``."""
        checkpoint.load_state_dict(self, state_dict)
