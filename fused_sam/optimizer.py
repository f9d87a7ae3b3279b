"""FusedSAM: Sharpness-Aware Minimization over flat parameter buffers.

One class and one dispatcher: the optimizer keeps the flat storage and the bookkeeping; the arithmetic of
each step goes to a backend (``fused_sam.backends``) chosen per (device, dtype).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional

import torch

from .backends import KernelLaunches, Perturbation, StepScalars, check_backend_name, resolve_backend
from .backends.base import Hyperparameter, grad_unscale
from .distributed import is_dtensor, local_of, shard_group, sum_over_ranks
from .flat import LOW_PRECISION, FlatSegment, is_dense, merged_master
from .updates import capturing as _capturing, fused_kind, scalar, update_from_group
from .variants import LookSAM, MomentumSAM, Variant, orthogonal_part, resolve as resolve_variant, reuse_coefficient

SAM_KEYS = ("rho", "adaptive", "eta", "normalize")
MODES = ("paired", "alternate")
# 1: SAM's epsilon was saved as 'eps'; 2: master weights and restore point under 'sam'; 3: both per parameter;
# 4: SAM's progress (the 'sam' entry's counters and variant state) also in each param group (PROGRESS_KEY)
STATE_DICT_FORMAT = 4
MASTER_KEY, RESTORE_KEY = "sam_master_weight", "sam_restore_point"  # per-parameter state SAM adds
BETWEEN_HALVES_KEY = "sam_between_halves"  # in each saved param group: taken between the halves of a step
# In each saved param group, a copy of the 'sam' entry: torch.distributed.checkpoint's get/set_optimizer_state_dict
# (the FSDP2 path) keep only 'state' and 'param_groups', and a variant decides from the step count. Live groups
# hold it as None: with flatten_optimizer_state_dict=True those helpers load only the keys live groups have.
PROGRESS_KEY = "sam_progress"
SAVED_GROUP_KEYS = (BETWEEN_HALVES_KEY, PROGRESS_KEY)  # in saved groups, not settings: never loaded into live ones
LOOKSAM_KEY = "sam_looksam_gv"  # LookSAM's g_v, a per-parameter state buffer (holds g during a SAM step)
# What the classic SAM classes keep per parameter in their own state (the last w, the last e): leftovers of a
# step, not optimizer state. Their state dicts load with these dropped.
CLASSIC_KEYS = ("old_p", "e_w")


def _tensor_of(entry):
    """A param-list entry as a tensor (torch.optim also accepts (name, tensor) pairs)."""
    return entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry


def _check_sam_settings(settings: dict, where: str) -> None:
    rho, eta = settings.get("rho", 0.0), settings.get("eta", 0.0)
    if isinstance(rho, torch.Tensor):  # capturable=True: its value lives on the device and is not read
        if rho.numel() != 1 or not rho.is_floating_point():
            raise ValueError(f"rho must be a number or a one-element floating tensor, got {rho!r} ({where})")
    elif not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
        raise ValueError(f"rho must be a non-negative number, got {rho!r} ({where})")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a non-negative number, got {eta!r} ({where})")


def _saved_progress(state_dict: dict):
    """The state dict's 'sam' entry; from a param group when only 'state' and 'param_groups' came through
    (torch.distributed.checkpoint's helpers keep those, format 4 copies the entry into each group)."""
    saved = state_dict.get("sam")
    if saved is None:
        groups = state_dict.get("param_groups") or [{}]
        saved = groups[0].get(PROGRESS_KEY) if isinstance(groups[0], dict) else None
    return saved or {}


def _refuse_partitioning_wrapper() -> None:
    """ZeroRedundancyOptimizer(optimizer_class=FusedSAM) builds one FusedSAM per rank over that rank's
    partition of the parameters: each would perturb with the norm of its partition only, which is not SAM
    and raises no error. The wrapper gives no other sign of itself than being the caller, so look there."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:  # never imported, so not the caller (and importing it here would cost a second)
        return
    frame = sys._getframe(2)  # the caller of FusedSAM.__init__
    for _ in range(4):
        if frame is None:
            return
        if isinstance(frame.f_locals.get("self"), zero.ZeroRedundancyOptimizer):
            raise TypeError(
                "FusedSAM cannot run inside ZeroRedundancyOptimizer: each rank would hold a partition of the "
                "parameters and perturb with that partition's norm, which is not SAM. To shard the optimizer "
                "state, shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose sharded "
                "parameters FusedSAM perturbs with the global norm; else use DistributedDataParallel "
                "(see docs/distributed.md)"
            )
        frame = frame.f_back


def _current_scale(grad_scaler) -> Optional[torch.Tensor]:
    """The scale a GradScaler multiplies losses by now, as its device tensor (no sync); None if disabled."""
    if grad_scaler is None:
        return None
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    if not grad_scaler.is_enabled():
        return None
    scale = grad_scaler._get_scale_async()
    if scale is None:
        raise RuntimeError("grad_scaler has not scaled a loss yet: call scaler.scale(loss).backward() first")
    return scale


class _PerDevice:
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


class _SAMState:
    """Everything FusedSAM changes after construction, in one object that is never rebound.

    Trainer wrappers (Lightning's LightningOptimizer) copy the optimizer's ``__dict__`` and run its
    methods on the copy; both then hold this same object, so a re-layout, the perturbed phase and the
    counters are seen alike through the optimizer and through any wrapper.
    """

    def __init__(self, perturb_eps: float):
        self.perturb_eps = perturb_eps
        self.segments: List[FlatSegment] = []
        # DTensor parameters sharded over a process group: (group, device), in parameter order, so every
        # rank reduces the same groups in the same order, also a rank whose local shards are all empty.
        self.shard_groups: list = []
        # Between first_step and second_step: per segment, which parameters had a gradient and were
        # perturbed (None: all of them). None outside a SAM step.
        self.perturbed: Optional[List[Optional[List[bool]]]] = None
        self.nonfinite: Optional[torch.Tensor] = None  # device counter of first_steps with a non-finite norm
        self.skipped: Optional[torch.Tensor] = None  # device counter of updates skip_nonfinite skipped
        # Between first_step and second_step: did first_step know the GradScaler's scale, and did it
        # perturb an un-normalized group (whose e = rho * g would carry the scale without it)?
        self.perturbed_with_scale = False
        self.perturbed_unnormalized = False
        self.opt_called = False  # what LR schedulers check: has a step been taken since they were built?
        # capturable=True: per (param group, hyperparameter, device), the float64 tensor a Python float lr or
        # rho is written into before each step (eagerly; under capture a float is refused).
        self.device_hyperparameters: Dict[tuple, torch.Tensor] = {}
        self.captured = False  # a step was captured into a CUDA graph: the buffers must stay where they are
        # Per captured half ("first_step()", "second_step()"): which parameters had a gradient (per segment),
        # so the graph perturbs and updates those on every replay.
        self.captured_live: Dict[str, list] = {}
        self.completed_steps = 0  # SAM and plain steps taken: what a variant decides from
        self.sam_due: Optional[bool] = None  # the variant's decision for the step under way, once asked
        self.momentum_perturbed = False  # MomentumSAM: the weights are w - rho v / ||v||, the backup holds w
        # LookSAM: ||g_v||^2 (float64, on the first segment's device), taken when g_v is stored; None after a
        # load, then taken again from the loaded g_v.
        self.looksam_gv_sq: Optional[torch.Tensor] = None
        # Per (device, shard group): the squared-norm partials buffer, kept while its spans' sizes stay.
        self.partials_buffers: Dict[tuple, tuple] = {}


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
        backend: str = "auto",
        **base_kwargs,
    ):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            hint = " (pass the class, not an instance)" if isinstance(base_optimizer, torch.optim.Optimizer) else ""
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass{hint}, got {base_optimizer!r}")
        check_backend_name(backend)
        _check_sam_settings({"rho": rho, "eta": eta}, "constructor")
        if "base_eps" in base_kwargs:
            raise TypeError("base_eps= is gone: eps= goes to the base optimizer, SAM's own epsilon is perturb_eps=")
        if isinstance(perturb_eps, bool) or not isinstance(perturb_eps, (int, float)) or not perturb_eps > 0:
            raise ValueError(f"perturb_eps must be a positive number, got {perturb_eps!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(master_weights, bool):
            raise TypeError(f"master_weights must be True or False, got {master_weights!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        if capturable and mode != "paired":
            raise ValueError("capturable=True needs mode='paired': in alternate mode each step() call is one half "
                             "of a SAM step, chosen on the host, and a captured graph would replay one half forever")

        _refuse_partitioning_wrapper()
        groups = self._check_params(params)
        if master_weights and not any(
            _tensor_of(p).dtype in LOW_PRECISION for g in groups for p in g["params"]
        ):
            raise ValueError(
                "master_weights=True keeps float32 master copies of bfloat16/float16 parameters, and none of "
                "these parameters is bfloat16 or float16 (convert the model first, e.g. model.to(torch.bfloat16))"
            )
        self.master_weights = master_weights
        self.capturable = capturable
        self.skip_nonfinite = skip_nonfinite
        self.variant = resolve_variant(variant)
        if type(self.variant) is not Variant and (mode != "paired" or capturable):
            raise ValueError(f"variant={self.variant!r} needs mode='paired' and capturable=False: it decides on the "
                             "host, per step, whether the second pass runs")
        self.backend_name = backend
        self.mode = mode
        self.base_optimizer = None
        self._sam = _SAMState(float(perturb_eps))
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, **base_kwargs)
        defaults[PROGRESS_KEY] = None
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
        self.variant.check(self)

    # --- construction -----------------------------------------------------------------------------

    @staticmethod
    def _check_params(params) -> List[dict]:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or dicts, got a single tensor")
        groups = list(params)
        if not groups:
            raise ValueError("FusedSAM got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        seen: Dict[int, str] = {}
        for gi, group in enumerate(groups):
            if not isinstance(group, dict) or "params" not in group:
                raise TypeError(f"param group {gi} must be a dict with a 'params' entry")
            entries = group["params"]
            entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
            group = groups[gi] = dict(group, params=entries)
            _check_sam_settings(group, f"param group {gi}")
            for i, entry in enumerate(entries):
                FusedSAM._check_tensor(_tensor_of(entry), f"parameter {i} of param group {gi}", seen)
        if not any(entries for entries in (g["params"] for g in groups)):
            raise ValueError("FusedSAM got an empty parameter list")
        return groups

    @staticmethod
    def _check_tensor(p, where: str, seen: Dict[int, str]) -> None:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where} is a {type(p).__name__}, not a tensor")
        if id(p) in seen:
            raise ValueError(f"{where} is the same tensor as {seen[id(p)]}; pass each parameter once")
        seen[id(p)] = where
        if p.is_complex():
            raise TypeError(f"{where} is complex ({p.dtype}); FusedSAM supports real floating-point parameters")
        if not p.is_floating_point():
            raise TypeError(f"{where} has dtype {p.dtype}; FusedSAM supports floating-point parameters")
        if is_dtensor(p):
            shard_group(p, where)  # refuses placements one sum over ranks cannot cover
        local = local_of(p)
        if local.layout != torch.strided or not is_dense(local):
            raise ValueError(f"{where} is not a dense strided tensor (layout {local.layout}, strides {local.stride()})")

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "base_optimizer", None) is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        if self._sam.perturbed is not None:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        self._refuse_if_captured("add_param_group()")
        seen = {id(p): f"a parameter of param group {gi}" for gi, g in enumerate(self.param_groups) for p in g["params"]}
        (group,) = self._check_params([param_group])
        for i, p in enumerate(group["params"]):
            self._check_tensor(_tensor_of(p), f"parameter {i} of the new param group", seen)
        for key in SAM_KEYS + (PROGRESS_KEY,):
            group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(group)
        self._build_segments([len(self.param_groups) - 1])

    def _build_segments(self, group_indices) -> None:
        """Flatten the given param groups: resolve every backend first, so an error changes nothing."""
        plans = []
        sam = self._sam
        updates = self._base_updates()

        def launches() -> KernelLaunches:  # read only where a backend is checked before use
            return KernelLaunches(tuple(updates), tuple(self._perturbations()), self.capturable)

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
                self._publish_state(segment)
        home = sam.segments[0].device if sam.segments else None
        if home is not None:
            for name in ("nonfinite", "skipped"):
                counter = getattr(sam, name)
                if counter is None:
                    setattr(sam, name, torch.zeros(1, dtype=torch.int32, device=home))
                elif counter.device != home:
                    setattr(sam, name, counter.to(home))

    def _refuse_if_captured(self, what: str) -> None:
        if self._sam.captured:
            raise RuntimeError(
                f"{what} after a SAM step was captured into a CUDA graph: it would move FusedSAM's flat buffers, "
                "which the graph reads and writes by address; build a new optimizer (and capture anew) instead"
            )

    def _relayout(self, moved: str) -> None:
        """Parameters were moved or re-typed after construction: flatten them anew, keeping the state."""
        self._refuse_if_captured(f"{moved} changed storage: re-flattening it")
        sam = self._sam
        if sam.perturbed is not None:
            raise RuntimeError(
                f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
            )
        state = self._split_saved_state(self.state_dict()["state"], {}, [])[0] if self._fused_kind else None
        masters = self._masters()
        for segment in sam.segments:
            segment.remove_hooks()
        sam.segments.clear()
        sam.partials_buffers.clear()
        self._build_segments(range(len(self.param_groups)))
        if state is not None:
            self._load_fused_state(state)
        self._load_masters(masters, keep_edits=True)

    # --- the SAM step ------------------------------------------------------------------------------

    def _perturbations(self) -> List[Perturbation]:
        """Each param group's SAM settings (rho, a per-step value, comes from ``_step_hyperparameters``)."""
        out = []
        for gi, g in enumerate(self.param_groups):
            _check_sam_settings(g, f"param group {gi}")
            if isinstance(g["rho"], torch.Tensor) and not self.capturable:
                raise ValueError(f"rho of param group {gi} is a tensor: that needs FusedSAM(..., capturable=True)")
            out.append(Perturbation(bool(g["adaptive"]), float(g["eta"]), bool(g["normalize"]), self._sam.perturb_eps))
        return out

    def _step_hyperparameters(self, name: str) -> Callable[[int, torch.device], Hyperparameter]:
        """``of(group index, device)``: ``name`` (lr or rho) of a param group on a device it has parameters on,
        as the kernels take it: a Python float, or with capturable=True a float64 tensor on that device. Every
        value is read (and checked) now."""
        if self.capturable:
            keys = dict.fromkeys((segment.group_index, segment.device) for segment in self._sam.segments)
            on_device = {(gi, device): self._hyperparameter_on(gi, name, device) for gi, device in keys}
            return lambda gi, device: on_device[gi, device]
        values = [value if type(value) is float else scalar(value, name)
                  for value in (g[name] for g in self.param_groups)]
        return lambda gi, device: values[gi]

    def _hyperparameter_on(self, gi: int, name: str, device: torch.device) -> torch.Tensor:
        """capturable=True: param group ``gi``'s ``name`` (lr or rho) as a float64 one-element tensor on
        ``device``, read by the kernels. A tensor-valued setting is used itself (a scheduler's in-place
        update reaches a replayed graph); a Python float is written into a buffer kept for it, which under
        capture would freeze its value into the graph, so it is refused there."""
        value = self.param_groups[gi][name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} of param group {gi} must be a number or a one-element floating tensor")
            if value.device != device and _capturing():
                raise RuntimeError(f"{name} of param group {gi} is a tensor on {value.device}, the parameters on "
                                   f"{device}: a CUDA graph cannot read it there; create it on {device}")
            return value.detach().reshape(1).to(device=device, dtype=torch.float64)
        if _capturing():
            raise RuntimeError(
                f"{name} of param group {gi} is a Python float ({value!r}): a CUDA graph would replay it frozen, "
                f"and a scheduler's later change would be silently ignored. Make it a tensor on {device} and "
                f"update it in place, e.g. group[{name!r}] = torch.tensor({value!r}, device={str(device)!r}) "
                "before capturing (LR schedulers then write it with fill_)"
            )
        key = (gi, name, device)
        buffer = self._sam.device_hyperparameters.get(key)
        if buffer is None:
            buffer = self._sam.device_hyperparameters[key] = torch.empty(1, dtype=torch.float64, device=device)
        return buffer.fill_(float(value))

    def _base_updates(self) -> list:
        """The fused base update of each param group at this step (empty when the base is not fused)."""
        if not self._fused_kind:
            return []
        base_cls = type(self.base_optimizer)
        return [update_from_group(self._fused_kind, base_cls, g) for g in self.param_groups]

    def _linked_grads(self, intact: List[bool]) -> List[Optional[List[bool]]]:
        """Link every gradient into the flat buffers; per segment, which parameters have one (None: all)."""
        return [None if ok else segment.link_grads() for segment, ok in zip(self._sam.segments, intact)]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, grad_scaler: Optional["torch.amp.GradScaler"] = None) -> None:
        """Save w exactly and move to w + e(w) using the gradients now in ``.grad``.

        A parameter whose ``.grad`` is None is not perturbed (it has no first gradient) but is still
        updated by ``second_step`` if it has a gradient then, as in the classic SAM.

        ``grad_scaler``: the GradScaler whose scale multiplies these gradients. Normalized SAM needs it only
        to scale perturb_eps with the gradient (without it e differs by perturb_eps / ||g||, relatively);
        un-normalized SAM (normalize=False) needs it, and the second step refuses to go on without it.
        Its scale is read on the device, without a host sync.
        """
        sam = self._sam
        if sam.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice; finish the SAM step with second_step() (under a GradScaler: "
                "scaler.step(optimizer)) before the next first_step()"
            )
        self._note_capture("first_step()")
        if not self.sam_step_due:
            raise RuntimeError(f"step {sam.completed_steps} is not a SAM step for {self.variant!r} "
                               "(opt.sam_step_due is False): take it with opt.plain_step() after the backward at w")
        grad_scale = _current_scale(grad_scaler)
        intact = self._weights_taken_in()
        perturbations = self._perturbations()
        rhos = self._step_hyperparameters("rho")  # before any kernel: a refusal leaves nothing half done
        if self._base_updates():  # a base setting second_step() would refuse must fail before w moves
            self._step_hyperparameters("lr")
        active = self._linked_grads(intact)
        self._check_captured_live_set("first_step()", active)
        work = self._spans_with_gradients(active)
        if isinstance(self.variant, LookSAM):  # g, kept until second_step makes g_v of it
            for segment in sam.segments:
                segment.ensure_state([LOOKSAM_KEY])
                segment.state[LOOKSAM_KEY].copy_(segment.grads)
        partials = None
        if any(p.normalize for p in perturbations) and (work or sam.shard_groups):
            partials = self._norm_partials(work, perturbations)
            if self.variant.needs_norm:
                self.variant.observe(self._squared_norm(partials, grad_scale))
        counter = sam.nonfinite if partials is not None else None  # incremented once per step
        scales = _PerDevice(grad_scale)
        for segment, span in work:
            owns_counter = counter is not None and span.device == counter.device
            device_partials = None if partials is None else partials[span.device]
            scalars = StepScalars(rho=rhos(segment.group_index, span.device), grad_scale=scales.on(span.device))
            segment.backend.perturb(span, perturbations[segment.group_index], device_partials,
                                    counter if owns_counter else None, scalars)
            if owns_counter:
                counter = None
        for segment in sam.segments:
            segment.publish_weights()
        sam.perturbed = active
        sam.perturbed_with_scale = grad_scale is not None
        sam.perturbed_unnormalized = any(not perturbations[segment.group_index].normalize for segment, _ in work)
        for segment in sam.segments:
            segment.mark_grads_seen()
        if zero_grad:
            self.zero_grad()

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

    def _spans_with_gradients(self, active) -> list:
        """(segment, span) for every run of parameters that has a gradient (``active``: per segment)."""
        return [
            (segment, span)
            for segment, mask in zip(self._sam.segments, active)
            for _, _, (has_grad,), span in segment.spans(mask)
            if has_grad
        ]

    @staticmethod
    def _squared_norm(partials: Dict[torch.device, torch.Tensor], grad_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """||g||^2 of the unscaled gradient, a float64 device tensor (one device's partials: with several
        devices or ranks each already holds the total)."""
        total = next(iter(partials.values())).sum(dtype=torch.float64)
        return total if grad_scale is None else total / grad_scale.to(total.device, torch.float64).square()

    def _norm_partials(self, work, perturbations) -> Dict[torch.device, torch.Tensor]:
        """Squared-norm partials per device. With several devices, or parameters sharded over ranks, each
        device gets the global sum: the sharded parameters' share is summed over the ranks of their
        process group, one float64 scalar per group (HSDP: the shard dimension only; replicas agree)."""
        layout: Dict[tuple, list] = {}
        for segment, span in work:
            layout.setdefault((span.device, segment.shard_group), []).append((segment, span))
        partials = {}
        for key, items in layout.items():
            buf, outs = self._partials_buffer(key, items)
            for (segment, span), out in zip(items, outs):
                segment.backend.sq_norm_partials(span, perturbations[segment.group_index], out)
            partials[key] = buf
        if not self._sam.shard_groups and len(partials) <= 1:
            return {device: buf for (device, _), buf in partials.items()}
        return self._global_sum(partials)

    def _partials_buffer(self, key: tuple, items: list) -> tuple:
        """The buffer for the partials of ``items`` (segment, span) on one (device, shard group), and each
        span's slice of it. Kept from step to step while the spans' sizes stay (every norm's partials are read,
        in stream order, before the next norm writes them): a fresh buffer and its slices cost ~3 tensor
        operations a step, ~20-40 us each on a CPU with a cold cache."""
        sizes = tuple(segment.backend.partials_len(span) for segment, span in items)
        dtype = torch.float64 if any(segment.dtype == torch.float64 for segment, _ in items) else torch.float32
        kept = self._sam.partials_buffers.get(key)
        if kept is None or kept[0] != (sizes, dtype):
            buf = torch.empty(sum(sizes), dtype=dtype, device=key[0])
            outs, start = [], 0
            for n in sizes:
                outs.append(buf if n == buf.numel() else buf[start:start + n])
                start += n
            kept = self._sam.partials_buffers[key] = ((sizes, dtype), buf, outs)
        return kept[1], kept[2]

    def _global_sum(self, partials: Dict[tuple, torch.Tensor]) -> Dict[torch.device, torch.Tensor]:
        """Sum the partials of every (device, shard group) into one float64 total, the sharded ones over
        their ranks first; hand each device the total as a one-element tensor."""
        sam = self._sam
        reductions = []
        for group, device in sam.shard_groups:  # every rank, every group, in one order: no rank waits alone
            own = [buf.sum(dtype=torch.float64).to(device) for (_, g), buf in partials.items() if g is group]
            value = torch.stack(own).sum() if own else torch.zeros((), dtype=torch.float64, device=device)
            reductions.append((value, sum_over_ranks(value, group)))
        home = sam.segments[0].device if sam.segments else sam.shard_groups[0][1]
        total = torch.zeros((), dtype=torch.float64, device=home)
        for (_, group), buf in partials.items():
            if group is None:
                total = total + buf.sum(dtype=torch.float64).to(home)
        for value, handle in reductions:
            handle.wait()
            total = total + value.to(home)
        return {device: total.to(device).reshape(1) for device, _ in partials} or {home: total.reshape(1)}

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then take the base optimizer's step with the gradients taken at w + e.

        Every parameter with a gradient now is updated, also one that had none at ``first_step``; a
        parameter perturbed at ``first_step`` but without a gradient now is restored and not updated.
        Under a GradScaler, finish the step with ``scaler.step(optimizer)`` instead (see ``step``).
        """
        self._second_step(None, None)
        if zero_grad:
            self.zero_grad()

    def _second_step(self, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor]) -> None:
        """second_step with GradScaler's inputs: the gradients are divided by ``grad_scale`` inside the
        update, and where ``found_inf`` is non-zero the update is skipped (w restored exactly, state and
        step counts unchanged), all decided on the device."""
        sam = self._sam
        if sam.perturbed is None:
            raise RuntimeError("second_step() called before first_step()")
        self._note_capture("second_step()")
        intact = [segment.intact() for segment in sam.segments]
        for segment, ok in zip(sam.segments, intact):
            moved = None if ok else segment.storage_moved()
            if moved:
                raise RuntimeError(
                    f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
                )
        active = self._linked_grads(intact)
        self._check_captured_live_set("second_step()", active)
        problem = self._scaling_mismatch(grad_scale is not None or found_inf is not None)
        if problem:
            self._restore_all()
            raise RuntimeError(problem + "; the weights were restored to w and not updated")
        if found_inf is None:
            found_inf = self._nonfinite_gradients(self._spans_with_gradients(active))
        if isinstance(self.variant, LookSAM):
            self._store_orthogonal_part(found_inf)
        self._update(active, grad_scale, found_inf)

    def _update(self, active, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                reuse_scale: Optional[torch.Tensor] = None) -> None:
        """Restore w where it was perturbed and take the base update with the gradients now in the buffers
        (``reuse_scale``, a fused LookSAM reuse step: plus that times g_v, added inside the kernels); end the
        step. ``sam.perturbed`` says what was perturbed (a plain step: nothing)."""
        sam = self._sam
        scales, infs, reuses = (_PerDevice(grad_scale), _PerDevice(found_inf),
                                  _PerDevice(reuse_scale, torch.float64))
        if self._fused_kind:
            updates = self._base_updates()
            lrs = self._step_hyperparameters("lr")
            for segment, perturbed, has_grad in zip(sam.segments, sam.perturbed, active):
                update = updates[segment.group_index]
                if segment.ensure_state(update.needed_state(), update.initial_state) or not segment.published:
                    self._refuse_if_captured("a new optimizer state buffer (momentum or amsgrad turned on)")
                    self._publish_state(segment)
                device_scale, device_inf = scales.on(segment.device), infs.on(segment.device)
                lr, device_reuse = lrs(segment.group_index, segment.device), reuses.on(segment.device)
                for first, _, (was_perturbed, updated), span in segment.spans(perturbed, has_grad):
                    if updated:
                        if not was_perturbed and span.master is None:  # a plain step, or a gradient that
                            span = dataclasses.replace(span, backup=span.weights)  # appeared only at w + e:
                            # w itself is the restore point (the kernels read each element before writing it)
                        if device_reuse is not None:
                            span = dataclasses.replace(span, reused=span.state[LOOKSAM_KEY])
                        scalars = StepScalars(step=segment.step_of(first), lr=lr, grad_scale=device_scale,
                                              found_inf=device_inf, reuse_scale=device_reuse)
                        segment.backend.restore_and_update(span, update, scalars)
                    elif was_perturbed:
                        segment.backend.restore(span)
                taken = None if device_inf is None else (device_inf.reshape(()) == 0).to(torch.float32)
                segment.advance_steps(has_grad, taken)
                segment.publish_weights()
        else:
            self._restore_all()
            self._unfused_base_step(scales, found_inf)
        sam.perturbed = None
        sam.completed_steps += 1
        sam.sam_due = None
        for segment in sam.segments:
            segment.mark_grads_seen()
        # What an LR scheduler's wrapper of step() records; users of first/second_step never call step().
        self._opt_called = self.base_optimizer._opt_called = True

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
        active = self._linked_grads(self._weights_taken_in())
        work = self._spans_with_gradients(active)
        squared_norm = None
        if self.variant.needs_norm and work:
            squared_norm = self._squared_norm(self._norm_partials(work, self._perturbations()), grad_scale)
            self.variant.observe(squared_norm)
        if found_inf is None:
            found_inf = self._nonfinite_gradients(work, squared_norm)
        reuse_scale = None
        if isinstance(self.variant, LookSAM):
            reuse_scale = self._reuse_scale(active)
            if not self._fused_kind:  # the base optimizer reads .grad: add the reused component there
                self._add_reused_component(reuse_scale, active)
                reuse_scale = None
        sam.perturbed = [[sam.momentum_perturbed] * len(segment.params) for segment in sam.segments]
        self._update(active, grad_scale, found_inf, reuse_scale)
        if isinstance(self.variant, MomentumSAM):
            self._perturb_along_momentum(active)

    def _nonfinite_gradients(self, work, squared_norm: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """With ``skip_nonfinite``, the found_inf of an update without a GradScaler: 1.0 (float32, on the
        device) if the gradients about to be applied hold an inf or NaN, read from their squared norm (one
        pass; summed over ranks, so every rank skips alike; a norm that overflows float32 counts too, as in
        first_step), and counted in ``skipped_steps``; else None. Off a CPU found_inf is always a tensor
        (0.0 when finite): deciding on the host would sync."""
        sam = self._sam
        if not self.skip_nonfinite or not (work or sam.shard_groups):
            return None
        if squared_norm is None:
            plain = Perturbation(adaptive=False, eta=0.0, normalize=True, eps=sam.perturb_eps)
            partials = next(iter(self._norm_partials(work, [plain] * len(self.param_groups)).values()))
        else:
            partials = squared_norm.reshape(1)
        if partials.device.type == "cpu":  # summed on the host in double (no sync on a CPU): no tensor op if finite
            if math.isfinite(sum(partials.tolist())):
                return None
            found_inf = torch.ones(1, dtype=torch.float32)
        else:
            total = partials.sum(dtype=torch.float64) if squared_norm is None else squared_norm
            found_inf = (~torch.isfinite(total)).to(torch.float32).reshape(1)
        sam.skipped += found_inf.to(sam.skipped.device, torch.int32)
        return found_inf

    def _perturb_along_momentum(self, active) -> None:
        """MomentumSAM: backup <- w, w <- w - rho * v / (||v|| + perturb_eps), v the base optimizer's momentum
        (SGD's buffer, Adam's first moment), its norm global. The backends' own norm and perturb, over spans
        whose 'gradient' is the momentum (same dtype: float32/float64 parameters only). Only the parameters
        this step updated (``active``, per segment) move; the others' backup is their weight, so the next
        step's restore leaves them as they are."""
        sam = self._sam
        name = self._fused_kind.momentum_state
        perturbations = self._perturbations()
        rhos = self._step_hyperparameters("rho")
        work = []
        for segment, mask in zip(sam.segments, active):
            for _, _, (updated,), span in segment.spans(mask):
                if updated:
                    work.append((segment, dataclasses.replace(span, grads=span.state[name])))
                else:
                    span.backup.copy_(span.weights)
        partials = self._norm_partials(work, perturbations)
        for segment, span in work:
            scalars = StepScalars(rho=-rhos(segment.group_index, span.device))  # against the momentum
            segment.backend.perturb(span, perturbations[segment.group_index], partials[span.device], None, scalars)
            segment.publish_weights()
        sam.momentum_perturbed = True

    @contextmanager
    def at_restore_point(self):
        """Hold the weights at w inside the block (evaluation, export): MomentumSAM keeps the model at its
        perturbed point between steps. The perturbed weights come back after the block."""
        sam = self._sam
        if not sam.momentum_perturbed:
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

    # --- LookSAM's extra passes over the flat buffers ----------------------------------------------

    def _sum_over_segments(self, per_segment) -> torch.Tensor:
        """The float64 sum over every segment of ``per_segment(segment)`` (a 0-d tensor on its device), the
        sharded segments' shares summed over their ranks (the norm's reduction, so every rank agrees)."""
        parts: Dict[tuple, list] = {}
        for segment in self._sam.segments:
            value = per_segment(segment).to(torch.float64).reshape(1)
            parts.setdefault((segment.device, segment.shard_group), []).append(value)
        totals = self._global_sum({key: torch.cat(values) for key, values in parts.items()})
        return next(iter(totals.values())).reshape(())

    def _store_orthogonal_part(self, found_inf: Optional[torch.Tensor]) -> None:
        """LookSAM's SAM step: g_v = g_s - (g . g_s / ||g||^2) g, g (from first_step) in the g_v buffer and
        g_s in the gradients. A skipped (found_inf) step stores g_v = 0: nothing is reused until the next. So
        does a step whose g or g_s holds an inf or NaN (then g . g_s is not finite): a g_v built from it would
        write NaN into the weights at every reuse step (a non-finite g at w is otherwise harmless: no
        perturbation, counted in nonfinite_steps)."""
        g_dot_gs = self._sum_over_segments(lambda s: torch.dot(s.state[LOOKSAM_KEY], s.grads.to(s.state_dtype)))
        g_sq = self._sum_over_segments(lambda s: torch.dot(s.state[LOOKSAM_KEY], s.state[LOOKSAM_KEY]))
        discard = ~(torch.isfinite(g_dot_gs) & torch.isfinite(g_sq))
        if found_inf is not None:
            discard = discard | (found_inf.to(discard.device).reshape(()) != 0)
        for segment in self._sam.segments:
            stored = segment.state[LOOKSAM_KEY]
            g_v = orthogonal_part(segment.grads.to(segment.state_dtype), stored, g_dot_gs.to(segment.device),
                                  g_sq.to(segment.device))
            stored.copy_(torch.where(discard.to(segment.device), torch.zeros_like(g_v), g_v))
        self._sam.looksam_gv_sq = self._stored_gv_sq()

    def _stored_gv_sq(self) -> torch.Tensor:
        return self._sum_over_segments(lambda s: torch.dot(s.state[LOOKSAM_KEY], s.state[LOOKSAM_KEY]))

    def _reuse_scale(self, active) -> torch.Tensor:
        """LookSAM's reuse step: alpha * ||g|| / ||g_v|| (float64, on the device), ||g|| from the backends'
        norm pass over the gradients at w, ||g_v|| as taken when g_v was stored. The gradients may carry a
        GradScaler's scale: so does the coefficient, and the update unscales g + c * g_v as a whole."""
        sam = self._sam
        if sam.looksam_gv_sq is None:
            sam.looksam_gv_sq = self._stored_gv_sq()
        work = self._spans_with_gradients(active)
        if not work:
            return torch.zeros((), dtype=torch.float64, device=sam.segments[0].device)
        partials = self._norm_partials(work, self._perturbations())
        g_sq = next(iter(partials.values())).sum(dtype=torch.float64)
        return reuse_coefficient(self.variant.alpha, g_sq, sam.looksam_gv_sq.to(g_sq.device))

    def _add_reused_component(self, coefficient: torch.Tensor, active) -> None:
        """LookSAM's reuse step for a base optimizer that is not fused: g <- g + coefficient * g_v in .grad,
        where there is a gradient (the other views stay zero, for the next backward to accumulate into)."""
        for segment, mask in zip(self._sam.segments, active):
            factor = coefficient.to(segment.device, segment.state_dtype)
            for _, _, (has_grad,), span in segment.spans(mask):
                if not has_grad:
                    continue
                g_v = span.state[LOOKSAM_KEY]
                if span.grads.dtype == g_v.dtype:
                    span.grads.addcmul_(g_v, factor)  # one pass, in place
                else:  # 16-bit gradients: the sum in float32, rounded once
                    span.grads.copy_(span.grads.to(g_v.dtype).addcmul_(g_v, factor))

    def _check_captured_live_set(self, what: str, active: list) -> None:
        """A captured graph perturbs and updates the parameters that had a gradient when it was captured, on
        every replay. Record them under capture; refuse an eager step after capture whose set differs (a
        parameter frozen, or reached by no backward, since): the graph would update it."""
        sam = self._sam
        if _capturing():
            sam.captured_live[what] = active
        elif what in sam.captured_live and sam.captured_live[what] != active:
            changed = next((f"parameter {i} of param group {segment.group_index}"
                            for segment, now, then in zip(sam.segments, active, sam.captured_live[what])
                            for i in range(len(segment.params))
                            if (now is None or now[i]) != (then is None or then[i])), None)
            if changed is None:  # None (every parameter) against a list of all True: the same set
                return
            if sam.perturbed is not None:
                self._restore_all()
            raise RuntimeError(
                f"{what}: the parameters with a gradient are not those a CUDA graph captured ({changed} changed): "
                "a replay would perturb and update exactly the captured ones, a frozen parameter included. "
                "Capture the step anew (with a new FusedSAM) after freezing or unfreezing parameters"
            )

    def _note_capture(self, what: str) -> None:
        """Under CUDA graph capture: refuse unless capturable (a float lr and rho would replay frozen); else
        remember it, so that what would move the buffers the graph uses is refused from now on."""
        if not _capturing():
            return
        if not self.capturable:
            raise RuntimeError(
                f"{what} is being captured into a CUDA graph, but this FusedSAM was built with capturable=False: "
                "its lr and rho are kernel arguments and would replay frozen (a scheduler's changes silently "
                "ignored). Build it with FusedSAM(..., capturable=True) and make lr a tensor on the device"
            )
        self._sam.captured = True

    def _scaling_mismatch(self, scaler_step: bool) -> Optional[str]:
        """Why this second step cannot be taken with the scaling first_step saw, or None."""
        sam = self._sam
        if scaler_step and sam.perturbed_unnormalized and not sam.perturbed_with_scale:
            return ("scaler.step(optimizer) after a first_step() that perturbed an un-normalized group "
                    "(normalize=False) without its scale: e = rho * g carried the GradScaler's scale; call "
                    "first_step(grad_scaler=scaler)")
        if not scaler_step and sam.perturbed_with_scale:
            return ("first_step(grad_scaler=...) says the gradients are scaled: finish the SAM step with "
                    "scaler.step(optimizer), not second_step()/step(), so that they are unscaled")
        return None

    def _restore_all(self) -> None:
        sam = self._sam
        for segment, perturbed in zip(sam.segments, sam.perturbed):
            for _, _, (was_perturbed,), span in segment.spans(perturbed):
                if was_perturbed:
                    segment.backend.restore(span)
            segment.publish_weights()
        sam.perturbed = None

    def _unfused_base_step(self, scales: "_PerDevice", found_inf: Optional[torch.Tensor]) -> None:
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
    def step(self, closure: Optional[Callable] = None):
        """One SAM step, in either closure convention; returns the loss at w.

        - torch.optim's (Lightning's automatic optimization): no backward has run since the last step,
          so the closure is called at w for the first gradient, then at w + e for the second.
        - the classic SAM class's: the first backward already ran, so the closure runs once, at w + e.

        Between ``first_step`` and ``second_step`` this is the second step: the closure, if given, is called
        once (at w + e) and ``second_step`` follows; so a trainer's own ``optimizer.step()`` after a
        hand-written first pass completes the SAM step. With ``mode="alternate"``
        each call is one half of a SAM step: perturb, then restore and update (see the class docstring).
        """
        sam = self._sam
        if self.mode == "alternate":
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if sam.perturbed is None:
                self.first_step()
            else:
                self.second_step()
            return loss
        grad_scale, found_inf = self._grad_scaler_inputs()
        if not self.sam_step_due:  # the variant's plain step: one gradient, at w
            loss = None
            if closure is not None and not self._grads_fresh():
                with torch.enable_grad():
                    loss = closure()
            self._plain_step(grad_scale, found_inf)
            return loss
        if sam.perturbed is not None:  # the rest of a SAM step begun by first_step()
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._second_step(grad_scale, found_inf)
            return loss
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
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss_at_perturbed = closure()
        self.second_step()
        return loss_at_perturbed if loss is None else loss

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
        sam = self._sam
        index = self._param_index()
        bad: List[tuple] = []  # (segment, buffer name, flat buffer, non-finite count, its sum over ranks)
        for segment in sam.segments:
            buffers = dict(segment.state)
            if segment.master is not None:
                buffers[MASTER_KEY] = segment.master
            if weights:
                buffers["weight"] = segment.weights
            for name, buf in buffers.items():
                count = (~torch.isfinite(buf)).sum(dtype=torch.float64)
                handle = sum_over_ranks(count, segment.shard_group) if segment.shard_group is not None else None
                bad.append((segment, name, buf, count, handle))
        if not self._fused_kind:  # the base optimizer's own state, per parameter
            for p, entry in self.state.items():
                for name, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        raise ValueError(f"parameter {index[id(p)]} (shape {tuple(p.shape)}) holds non-finite "
                                         f"value(s) in its {name!r}: resume from an earlier checkpoint")
        for segment, name, buf, count, handle in bad:
            if handle is not None:
                handle.wait()
            if count.item() == 0:
                continue
            for i, p in enumerate(segment.params):
                view = segment.param_view(buf, i)
                if view.numel() and not bool(torch.isfinite(view).all()):
                    break
            else:  # the non-finite values are in another rank's shard
                raise ValueError(f"{int(count.item())} non-finite value(s) in the optimizer's {name!r} buffers "
                                 "(in another rank's shard)")
            raise ValueError(
                f"parameter {index[id(p)]} (param group {segment.group_index}, shape {tuple(p.shape)}) holds "
                f"{int((~torch.isfinite(view)).sum())} non-finite value(s) in its {name!r}: an edit through "
                "opt.state, a load that bypassed load_state_dict, or memory gone bad (training itself skips "
                "non-finite gradients). Resume from an earlier checkpoint."
            )

    @property
    def backends(self) -> Dict[str, str]:
        """Backend name per parameter storage, e.g. {'cuda:0 torch.bfloat16': 'triton'}."""
        return {f"{s.device} {s.dtype}": s.backend.name for s in self._sam.segments}

    # --- optimizer state ---------------------------------------------------------------------------

    def _publish_state(self, segment: FlatSegment) -> None:
        """Point ``self.state[p]`` of the segment's parameters at views into its flat state buffers.

        Each entry dict is updated in place, so one a user holds stays current.
        """
        for i, p in enumerate(segment.params):
            entry = self.state[p]
            entry.clear()
            entry.update(segment.state_views(i))
        segment.published = True

    def _param_index(self) -> Dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

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
        sam = self._sam
        if sam.perturbed is not None and self.mode != "alternate":
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        index = self._param_index()
        self.check_finite(weights=False)
        if self._fused_kind:
            state = {}
            for segment in sam.segments:
                counts = segment.steps.tolist()
                for i, p in enumerate(segment.params):
                    exported = segment.export_state(i, int(counts[i]))
                    if exported:
                        state[index[id(p)]] = exported
            base = {"state": state, "param_groups": self._packed_groups(index)}
        else:
            base = self.base_optimizer.state_dict()
            base["state"] = {k: dict(v) for k, v in base["state"].items()}  # entries are the live state dicts
        for pid, value in self._masters().items():
            base["state"].setdefault(index[pid], {})[MASTER_KEY] = value
        if self.mode == "alternate" or isinstance(self.variant, MomentumSAM):
            for pid, value in self._restore_points().items():
                base["state"].setdefault(index[pid], {})[RESTORE_KEY] = value
            for group in base["param_groups"]:
                group[BETWEEN_HALVES_KEY] = sam.perturbed is not None or sam.momentum_perturbed
        entries = sorted({k for s in base["state"].values() for k in s if k in (MASTER_KEY, RESTORE_KEY)})
        base["sam"] = {"format": STATE_DICT_FORMAT, "perturb_eps": sam.perturb_eps, "nonfinite_steps": self.nonfinite_steps,
                       "skipped_steps": self.skipped_steps, "completed_steps": sam.completed_steps,
                       "variant": dict(self.variant.state_dict(), name=self.variant.name), "entries": entries}
        for group in base["param_groups"]:
            group[PROGRESS_KEY] = base["sam"]
        return base

    def _restore_points(self) -> Dict[int, torch.Tensor]:
        """Per parameter id, the weight a second half would restore: w (its backup) if it was perturbed,
        else the weight itself (restoring it is a no-op)."""
        sam = self._sam
        masks = sam.perturbed if sam.perturbed is not None else [[sam.momentum_perturbed] * len(s.params)
                                                                  for s in sam.segments]
        return {
            id(p): segment.backup_of(i) if mask is None or mask[i] else segment.current_weight(i)
            for segment, mask in zip(sam.segments, masks)
            for i, p in enumerate(segment.params)
        }

    def _packed_groups(self, index: Dict[int, int]) -> List[dict]:
        return [
            dict({k: v for k, v in g.items() if k != "params"}, params=[index[id(p)] for p in g["params"]])
            for g in self.param_groups
        ]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedSAM (or matching torch.optim) state dict; the layouts must match."""
        sam = self._sam
        if sam.perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        self._check_loadable(state_dict)  # everything that could fail, before anything changes
        groups = state_dict["param_groups"]
        saved_sam = _saved_progress(state_dict)
        order = [i for g in groups for i in g["params"]]
        state, masters, restore_point = self._split_saved_state(state_dict["state"], saved_sam, groups)
        if not isinstance(self.variant, LookSAM):  # a LookSAM run continued without LookSAM: g_v is not needed
            state = {k: {n: v for n, v in s.items() if n != LOOKSAM_KEY} for k, s in state.items()}
        momentum = isinstance(self.variant, MomentumSAM)
        if restore_point is not None and self.mode != "alternate" and not momentum:
            raise ValueError("this state dict was taken between the two halves of a mode='alternate' SAM step; "
                             "load it into FusedSAM(..., mode='alternate')")
        if restore_point is not None:
            self._check_restore_point(restore_point, order)
        groups = [{k: v for k, v in g.items() if k not in SAVED_GROUP_KEYS} for g in groups]
        if self._fused_kind:
            self._load_fused_state({new: state[old] for new, old in enumerate(order) if old in state})
            for saved, group in zip(groups, self.param_groups):
                group.update({k: v for k, v in saved.items() if k != "params"})
        else:
            base = self.base_optimizer
            sam_settings = [{k: g[k] for k in SAM_KEYS + (PROGRESS_KEY,) if k in g} for g in self.param_groups]
            base.load_state_dict({"state": state, "param_groups": groups})
            # torch.optim rebinds its state and param_groups: refill the shared objects instead.
            loaded_state, loaded_groups = base.state, base.param_groups
            for loaded, settings in zip(loaded_groups, sam_settings):  # a torch.optim state dict has no rho
                for key, value in settings.items():
                    loaded.setdefault(key, value)
            self.state.clear()
            self.state.update(loaded_state)
            self.param_groups[:] = loaded_groups
            base.state, base.param_groups = self.state, self.param_groups
        sam.perturb_eps = float(saved_sam.get("perturb_eps", saved_sam.get("eps", sam.perturb_eps)))
        sam.completed_steps, sam.sam_due = int(saved_sam.get("completed_steps", 0)), None
        saved_variant = dict(saved_sam.get("variant", {}))
        if saved_variant.pop("name", None) == self.variant.name:
            self.variant.load_state_dict(saved_variant)
        for counter, key in ((sam.nonfinite, "nonfinite_steps"), (sam.skipped, "skipped_steps")):
            if counter is not None:
                counter.fill_(int(saved_sam.get(key, 0)))
        if masters is not None:
            if not self.master_weights:
                raise ValueError("this state dict holds float32 master weights: load it into "
                                 "FusedSAM(..., master_weights=True)")
            ids = [id(p) for g in self.param_groups for p in g["params"]]
            # Between the halves of an alternate-mode step the model's weights are w + e: leave them be.
            self._load_masters({ids[new]: masters[old] for new, old in enumerate(order) if old in masters},
                               write_weights=restore_point is None)
        if restore_point is not None:
            self._load_restore_point({new: restore_point[old] for new, old in enumerate(order) if old in restore_point})
            if momentum:  # the model holds w - rho v / ||v||, the backup w: between steps, not inside one
                sam.perturbed, sam.momentum_perturbed = None, True
        elif momentum:
            sam.momentum_perturbed = False
        sam.looksam_gv_sq = None  # the loaded g_v's norm is taken at the next reuse step

    def _check_loadable(self, state_dict) -> None:
        """Refuse, with an error that says what is wrong, a state dict that cannot be loaded whole: not an
        optimizer state dict, another layout, another optimizer's state, values of the wrong shape or dtype,
        non-finite values, a newer format. Runs before ``load_state_dict`` changes anything, so a refused
        state dict leaves the optimizer (and the model's weights) as they were."""
        if not (isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict)
                and isinstance(state_dict.get("param_groups"), (list, tuple))):
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        merged = []
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise ValueError(f"param group {gi} of the state dict has no 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} has {len(group['params'])} parameters, the state dict {len(saved['params'])}"
                )
            merged.append(dict(group, **{k: v for k, v in saved.items() if k != "params" and k not in SAVED_GROUP_KEYS}))
            _check_sam_settings(merged[-1], f"param group {gi} of the state dict")
        order = [i for g in groups for i in g["params"]]
        if len(set(order)) != len(order):
            twice = next(i for i in order if order.count(i) > 1)
            raise ValueError(f"the state dict's param groups list parameter {twice!r} more than once")
        unlisted = [k for k in saved_state if k not in set(order)]
        if unlisted:
            raise ValueError(f"the state dict has state for parameter {unlisted[0]!r}, which no param group lists "
                             f"(they list {order[:8]}{'...' if len(order) > 8 else ''}): a corrupt state dict")
        saved_sam = _saved_progress(state_dict)
        if not isinstance(saved_sam, dict):
            raise ValueError(f"the state dict's 'sam' entry is a {type(saved_sam).__name__}, not a dict")
        fmt = saved_sam.get("format", 1)
        if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt > STATE_DICT_FORMAT:
            raise ValueError(f"this state dict has format {fmt!r}, newer than this fused_sam reads "
                             f"({STATE_DICT_FORMAT}): it was saved by a newer fused_sam")
        entries = saved_sam.get("entries", []) if fmt >= 4 else []  # older formats kept them elsewhere
        if not (isinstance(entries, (list, tuple)) and all(isinstance(k, str) for k in entries)):
            raise ValueError(f"the state dict's sam['entries'] must be a list of key names, got {entries!r}")
        lost = [k for k in entries if not any(isinstance(s, dict) and k in s for s in saved_state.values())]
        if lost:
            raise ValueError(f"this state dict was saved with {lost} in its per-parameter state and has lost them "
                             "(torch.distributed.checkpoint's get/set_optimizer_state_dict with "
                             "flatten_optimizer_state_dict=True keep only the keys opt.state[p] shows): save it "
                             "with flatten_optimizer_state_dict=False or opt.state_dict()")
        for key in ("completed_steps", "nonfinite_steps", "skipped_steps"):
            value = saved_sam.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"the state dict's sam[{key!r}] must be a non-negative integer, got {value!r}")
        eps = saved_sam.get("perturb_eps", saved_sam.get("eps", self._sam.perturb_eps))
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"the state dict's perturb_eps must be a positive number, got {eps!r}")
        if any(not isinstance(s, dict) for s in saved_state.values()):
            bad = next(k for k, s in saved_state.items() if not isinstance(s, dict))
            raise ValueError(f"the state of parameter {bad!r} is a {type(saved_state[bad]).__name__}, not a dict")
        masters = self._split_saved_state(saved_state, saved_sam, groups)[1]
        if masters and not self.master_weights:
            raise ValueError("this state dict holds float32 master weights: load it into "
                             "FusedSAM(..., master_weights=True)")
        params = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]
        where = {id(p): (segment, i) for segment in self._sam.segments for i, p in enumerate(segment.params)}
        kind = self._fused_kind
        needed = [update_from_group(kind, type(self.base_optimizer), g).needed_state()
                  if kind else () for g in merged]
        kept = kind.state_names if kind else ()
        base_name = type(self.base_optimizer).__name__
        checks = []  # (tensor, what): values whose finiteness is read in one go at the end

        def check_value(value, what: str, new: int):
            segment, i = where.get(id(params[new][1]), (None, None))
            if segment is not None:
                value = segment.local_value(i, value)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{what} is a {type(value).__name__}, not a tensor")
            if not value.is_floating_point():
                raise ValueError(f"{what} has dtype {value.dtype}; optimizer state must be floating-point")
            shape = local_of(params[new][1]).shape if segment is None else segment.layout[i][0]
            if value.shape != shape:
                raise ValueError(f"{what} has shape {tuple(value.shape)}, the parameter {tuple(shape)}")
            checks.append((value, what))

        for new, old in enumerate(order):
            entry = saved_state.get(old)
            if entry is None:
                continue
            gi = params[new][0]
            names = [n for n, v in entry.items() if v is not None and n not in CLASSIC_KEYS]
            label = f"parameter {old!r} (param group {gi})"
            for name in names:
                what = f"state {name!r} of {label}"
                if name == "step":
                    step = entry[name]
                    count = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
                    if isinstance(count, bool) or not isinstance(count, (int, float)) or not (
                            math.isfinite(count) and count >= 0 and count == int(count)):
                        raise ValueError(f"{what} must be a non-negative whole number, got {step!r}")
                elif name in (MASTER_KEY, RESTORE_KEY, LOOKSAM_KEY):
                    check_value(entry[name], what, new)
                elif kind:
                    if name not in kept:
                        raise ValueError(
                            f"{what}: {base_name} does not keep {name!r} (FusedSAM over {base_name} keeps "
                            f"{', '.join(map(repr, kept + ('step',)))}): is this another optimizer's state dict?")
                    check_value(entry[name], what, new)
            if kind:
                base_names = [n for n in names if n in kept or n == "step"]
                stepped = (float(entry["step"]) > 0 if "step" in entry and entry["step"] is not None
                           else bool(base_names))
                if kind.step_in_state and base_names and "step" not in base_names:
                    raise ValueError(f"the state of {label} lacks 'step' ({base_name}'s update reads it)")
                lacking = [n for n in needed[gi] if n not in base_names]
                if stepped and lacking:
                    raise ValueError(f"the state of {label} has taken steps but lacks {lacking[0]!r}, which "
                                     f"{base_name} with these settings needs: a corrupt or mismatched state dict")
        for source, what in ((saved_sam.get("master_weights"), "master weight"),  # format 2 kept these under 'sam'
                             (saved_sam.get("restore_point"), "restore point")):
            if isinstance(source, dict):
                for new, old in enumerate(order):
                    if source.get(old) is not None:
                        check_value(source[old], f"{what} of parameter {old!r}", new)
        by_device: Dict[torch.device, list] = {}
        for k, (value, _) in enumerate(checks):
            by_device.setdefault(value.device, []).append(k)
        bad = []
        for indices in by_device.values():  # one read back per device
            finite = torch.stack([torch.isfinite(checks[k][0]).all() for k in indices]).cpu()
            bad += [indices[j] for j in (~finite).nonzero().flatten().tolist()]
        if bad:
            raise ValueError(f"non-finite values in {checks[min(bad)][1]}: a corrupt checkpoint (or one saved after "
                             "training diverged)")
        saved_variant = dict(saved_sam.get("variant") or {})
        if saved_variant.pop("name", None) == self.variant.name:
            try:
                copy.deepcopy(self.variant).load_state_dict(saved_variant)
            except Exception as exc:
                raise ValueError(f"the state dict's variant state does not load into {self.variant!r}: "
                                 f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _split_saved_state(saved_state: dict, saved_sam: dict, groups: List[dict]) -> tuple:
        """(base optimizer state, master weights or None, restore point or None), each keyed as saved.
        Format 2 kept the last two under 'sam'."""
        state = {k: {n: v for n, v in s.items() if n not in (MASTER_KEY, RESTORE_KEY) + CLASSIC_KEYS}
                 for k, s in saved_state.items()}
        masters = {k: s[MASTER_KEY] for k, s in saved_state.items() if MASTER_KEY in s} or saved_sam.get("master_weights")
        restore_point = saved_sam.get("restore_point")
        if any(g.get(BETWEEN_HALVES_KEY) for g in groups):
            restore_point = {k: s[RESTORE_KEY] for k, s in saved_state.items() if RESTORE_KEY in s}
        return state, masters, restore_point

    def _masters(self) -> Dict[int, torch.Tensor]:
        """Copies of the float32 master weights, by id of their parameter."""
        return {
            id(p): segment.master_of(i)
            for segment in self._sam.segments if segment.master is not None
            for i, p in enumerate(segment.params)
        }

    def _load_masters(self, masters: Dict[int, torch.Tensor], keep_edits: bool = False,
                      write_weights: bool = True) -> None:
        """Set master weights by id of their parameter, and the weights to their rounding if write_weights.
        keep_edits: only where the weight is still the rounding of the given master (a re-layout, where
        the weights themselves are current)."""
        for segment in self._sam.segments:
            if segment.master is None:
                continue
            for i, p in enumerate(segment.params):
                value = masters.get(id(p))
                if value is None:
                    continue
                value = segment.local_value(i, value)
                segment.check_shape(i, value, "master weight")
                value = value.to(device=segment.device, dtype=torch.float32)
                if keep_edits:
                    value = merged_master(value, segment.weight_views[i])
                segment.set_master(i, value, write_weights)
            if write_weights:
                segment.publish_weights()

    def _check_restore_point(self, restore_point: dict, order: list) -> None:
        """Refuse, before anything is loaded, a mid-step state dict without w for a parameter held here."""
        index = self._param_index()
        missing = [order[index[id(p)]] for segment in self._sam.segments for p in segment.params
                   if order[index[id(p)]] not in restore_point]
        if missing:
            raise ValueError(
                f"this state dict was taken between the two halves of a SAM step but holds no restore point (w) "
                f"for parameters {missing[:5]}: the weights cannot be restored (was it loaded into a template "
                "without them? build the template from FusedSAM(..., mode='alternate'))"
            )

    def _load_restore_point(self, restore_point: dict) -> None:
        """Resume between the halves of an alternate-mode SAM step: w of each perturbed parameter."""
        index = self._param_index()
        masks = []
        for segment in self._sam.segments:
            mask = [index[id(p)] in restore_point for p in segment.params]
            for i, p in enumerate(segment.params):
                if mask[i]:
                    segment.set_backup(i, restore_point[index[id(p)]])
            masks.append(None if all(mask) else mask)
        self._sam.perturbed = masks

    def _load_fused_state(self, state: dict) -> None:
        """Copy per-parameter state (keyed by this optimizer's parameter index) into the flat buffers."""
        index = self._param_index()
        for segment in self._sam.segments:
            segment.set_steps(
                [segment.import_state(i, state.get(index[id(p)], {})) for i, p in enumerate(segment.params)]
            )
            self._publish_state(segment)
