"""FusedSAM: Sharpness-Aware Minimization over flat parameter buffers.

One class and one dispatcher: the optimizer keeps the flat storage and the bookkeeping; the arithmetic of
each step goes to a backend (``fused_sam.backends``) chosen per (device, dtype).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Dict, List, Optional

import torch

from .backends import Perturbation, check_backend_name, resolve_backend
from .flat import FlatSegment, is_dense
from .updates import fused_kind, update_from_group

SAM_KEYS = ("rho", "adaptive", "eta", "normalize")
DEFAULT_EPS = 1e-12
STATE_DICT_FORMAT = 1


def _tensor_of(entry):
    """A param-list entry as a tensor (torch.optim also accepts (name, tensor) pairs)."""
    return entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry


def _check_sam_settings(settings: dict, where: str) -> None:
    rho, eta = settings.get("rho", 0.0), settings.get("eta", 0.0)
    if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
        raise ValueError(f"rho must be a non-negative number, got {rho!r} ({where})")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a non-negative number, got {eta!r} ({where})")


class FusedSAM(torch.optim.Optimizer):
    """SAM (Foret et al., 2021), ASAM and un-normalized SAM, fused over flat parameter buffers.

    A drop-in for the classic PyTorch SAM class: ``first_step``/``second_step``/``step(closure)``,
    ``base_optimizer`` is a class built over the same ``param_groups`` list.

    Args:
        params: tensors or param-group dicts; ``rho``, ``adaptive``, ``eta``, ``normalize`` may be set per group.
        base_optimizer: a ``torch.optim.Optimizer`` class. SGD, Adam and AdamW are fused; any other class
            runs its own ``step()`` after the fused perturb/restore.
        rho: neighbourhood radius. adaptive: ASAM scaling T = |w| + eta. normalize: False gives USAM, e = rho g.
        eps: SAM's epsilon in rho / (||g|| + eps). The base optimizer's own ``eps`` (Adam) is ``base_eps``.
        backend: "auto", "reference", or a kernel backend (see ``fused_sam.available_backends``).
        **base_kwargs: passed to ``base_optimizer``.

    Parameters' ``.data`` and ``.grad`` become views into flat buffers; ``zero_grad`` zeroes the buffer
    and keeps the views, also for ``set_to_none=True``.
    """

    def __init__(
        self,
        params,
        base_optimizer: type = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize: bool = True,
        eps: Optional[float] = None,
        backend: str = "auto",
        **base_kwargs,
    ):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            hint = " (pass the class, not an instance)" if isinstance(base_optimizer, torch.optim.Optimizer) else ""
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass{hint}, got {base_optimizer!r}")
        check_backend_name(backend)
        _check_sam_settings({"rho": rho, "eta": eta}, "constructor")
        if eps is not None and "base_eps" not in base_kwargs and "eps" in inspect.signature(base_optimizer).parameters:
            warnings.warn(
                f"eps={eps} sets SAM's epsilon in rho / (||g|| + eps); the classic SAM passed eps to "
                f"{base_optimizer.__name__}. Pass base_eps= for the base optimizer's epsilon.",
                stacklevel=2,
            )
        self.sam_eps = DEFAULT_EPS if eps is None else eps
        if not isinstance(self.sam_eps, (int, float)) or not self.sam_eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.sam_eps!r}")
        if "base_eps" in base_kwargs:
            base_kwargs["eps"] = base_kwargs.pop("base_eps")

        groups = self._check_params(params)
        self.backend_name = backend
        self.base_optimizer = None
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, **base_kwargs)
        super().__init__(groups, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._fused_kind = fused_kind(base_optimizer)
        self._segments: List[FlatSegment] = []
        self._perturbed: Optional[List[tuple]] = None
        self._nonfinite = None
        self._build_segments(range(len(self.param_groups)))

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
        if p.layout != torch.strided or not is_dense(p):
            raise ValueError(f"{where} is not a dense strided tensor (layout {p.layout}, strides {p.stride()})")

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "base_optimizer", None) is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        if self._perturbed is not None:
            raise RuntimeError("add_param_group() between first_step() and second_step()")
        seen = {id(p): f"a parameter of param group {gi}" for gi, g in enumerate(self.param_groups) for p in g["params"]}
        (group,) = self._check_params([param_group])
        for i, p in enumerate(group["params"]):
            self._check_tensor(_tensor_of(p), f"parameter {i} of the new param group", seen)
        for key in SAM_KEYS:
            group.setdefault(key, self.defaults[key])
        self.base_optimizer.add_param_group(group)
        self._build_segments([len(self.param_groups) - 1])

    def _build_segments(self, group_indices) -> None:
        """Flatten the given param groups: resolve every backend first, so an error changes nothing."""
        plans = []
        for gi in group_indices:
            buckets: Dict[tuple, list] = {}
            for p in self.param_groups[gi]["params"]:
                if p.numel() > 0:
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, dtype), params in buckets.items():
                plans.append((gi, params, resolve_backend(self.backend_name, device, dtype)))
        for gi, params, backend in plans:
            segment = FlatSegment(gi, params)
            segment.backend = backend
            self._segments.append(segment)
        if self._nonfinite is None and self._segments:
            self._nonfinite = torch.zeros(1, dtype=torch.int32, device=self._segments[0].device)

    def _relayout(self, moved: str) -> None:
        """Parameters were moved or re-typed after construction: flatten them anew, keeping the state."""
        if self._perturbed is not None:
            raise RuntimeError(
                f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
            )
        state = self.state_dict()["state"] if self._fused_kind else None
        nonfinite = self.nonfinite_steps
        self._segments = []
        self._nonfinite = None
        self._build_segments(range(len(self.param_groups)))
        self._nonfinite.fill_(nonfinite)
        if state is not None:
            self._load_fused_state(state)

    # --- the SAM step ------------------------------------------------------------------------------

    def _perturbations(self) -> List[Perturbation]:
        out = []
        for gi, g in enumerate(self.param_groups):
            _check_sam_settings(g, f"param group {gi}")
            out.append(Perturbation(float(g["rho"]), bool(g["adaptive"]), float(g["eta"]), bool(g["normalize"]), self.sam_eps))
        return out

    def _base_updates(self) -> list:
        """The fused base update of each param group at this step (empty when the base is not fused)."""
        if not self._fused_kind:
            return []
        base_cls = type(self.base_optimizer)
        return [update_from_group(self._fused_kind, base_cls, g) for g in self.param_groups]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w exactly and move to w + e(w) using the gradients now in ``.grad``."""
        if self._perturbed is not None:
            raise RuntimeError("first_step() called twice; call second_step() before the next first_step()")
        intact = [segment.intact() for segment in self._segments]
        if not all(intact):
            moved = next(filter(None, (s.storage_moved() for s in self._segments)), None)
            if moved:
                self._relayout(moved)
                intact = [False] * len(self._segments)
        perturbations = self._perturbations()
        self._base_updates()  # a base setting second_step() would refuse must fail before w moves
        active = [None if ok else segment.link_grads() for segment, ok in zip(self._segments, intact)]
        work = [
            (segment, span) for segment, act in zip(self._segments, active) for _, _, span in segment.spans(act)
        ]
        partials = None
        if any(p.normalize for p in perturbations) and work:
            partials = self._norm_partials(work, perturbations)
        counter = self._nonfinite if partials is not None else None  # incremented once per step
        for segment, span in work:
            owns_counter = counter is not None and span.device == counter.device
            device_partials = None if partials is None else partials[span.device]
            segment.backend.perturb(
                span, perturbations[segment.group_index], device_partials, counter if owns_counter else None
            )
            if owns_counter:
                counter = None
        self._perturbed = list(zip(self._segments, active))
        if zero_grad:
            self.zero_grad()

    def _norm_partials(self, work, perturbations) -> Dict[torch.device, torch.Tensor]:
        """Squared-norm partials per device; with several devices, each gets the global sum."""
        layout: Dict[torch.device, list] = {}
        for segment, span in work:
            layout.setdefault(span.device, []).append((segment, span, segment.backend.partials_len(span)))
        partials = {}
        for device, items in layout.items():
            dtype = torch.float64 if any(s.dtype == torch.float64 for s, _, _ in items) else torch.float32
            buf = torch.empty(sum(n for _, _, n in items), dtype=dtype, device=device)
            start = 0
            for segment, span, n in items:
                segment.backend.sq_norm_partials(span, perturbations[segment.group_index], buf[start:start + n])
                start += n
            partials[device] = buf
        if len(partials) > 1:
            home = self._nonfinite.device
            total = sum(buf.sum(dtype=torch.float64).to(home) for buf in partials.values())
            partials = {device: total.to(device).reshape(1) for device in partials}
        return partials

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w exactly, then take the base optimizer's step with the gradient taken at w + e."""
        if self._perturbed is None:
            raise RuntimeError("second_step() called before first_step()")
        for segment in self._segments:
            if segment.intact():
                continue
            moved = segment.storage_moved()
            if moved:
                raise RuntimeError(
                    f"{moved} changed storage between first_step() and second_step(); the weights cannot be restored"
                )
            segment.link_grads()
        if self._fused_kind:
            updates = self._base_updates()
            for segment, active in self._perturbed:
                update = updates[segment.group_index]
                segment.ensure_state(update.needed_state())
                for first, stop, span in list(segment.spans(active)):
                    segment.backend.restore_and_update(span, update)
                    segment.mark_updated(first, stop)
        else:
            for segment, active in self._perturbed:
                for _, _, span in segment.spans(active):
                    segment.backend.restore(span)
            self.base_optimizer.step()
        self._perturbed = None
        # What an LR scheduler's wrapper of step() records; users of first/second_step never call step().
        self._opt_called = self.base_optimizer._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Classic SAM usage: the first backward is done; re-evaluate the model at w + e via ``closure``."""
        if closure is None:
            raise RuntimeError(
                "FusedSAM.step() needs a closure that runs forward and backward; "
                "or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient buffer in one operation each; views stay linked even with set_to_none."""
        for segment in self._segments:
            segment.zero_grad()

    @property
    def nonfinite_steps(self) -> int:
        """How many first_steps saw a non-finite gradient norm and did not perturb (reads the device)."""
        return 0 if self._nonfinite is None else int(self._nonfinite.item())

    @property
    def backends(self) -> Dict[str, str]:
        """Backend name per parameter storage, e.g. {'cuda:0 torch.bfloat16': 'triton'}."""
        return {f"{s.device} {s.dtype}": s.backend.name for s in self._segments}

    # --- checkpoints -------------------------------------------------------------------------------

    def _param_index(self) -> Dict[int, int]:
        return {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}

    def state_dict(self) -> dict:
        """torch.optim-format state (per-parameter tensors, 'step') plus the param groups and SAM's own."""
        if self._perturbed is not None:
            raise RuntimeError("state_dict() between first_step() and second_step(): the weights are perturbed")
        if self._fused_kind:
            index = self._param_index()
            state = {}
            for segment in self._segments:
                for i, p in enumerate(segment.params):
                    exported = segment.export_state(i)
                    if exported:
                        state[index[id(p)]] = exported
            base = {"state": state, "param_groups": self._packed_groups(index)}
        else:
            base = self.base_optimizer.state_dict()
        base["sam"] = {"format": STATE_DICT_FORMAT, "eps": self.sam_eps, "nonfinite_steps": self.nonfinite_steps}
        return base

    def _packed_groups(self, index: Dict[int, int]) -> List[dict]:
        return [
            dict({k: v for k, v in g.items() if k != "params"}, params=[index[id(p)] for p in g["params"]])
            for g in self.param_groups
        ]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a FusedSAM (or matching torch.optim) state dict; the layouts must match."""
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        groups = state_dict.get("param_groups")
        if groups is None or "state" not in state_dict:
            raise ValueError("not an optimizer state dict: it needs 'state' and 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}")
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} has {len(group['params'])} parameters, the state dict {len(saved['params'])}"
                )
        sam = state_dict.get("sam", {})
        if self._fused_kind:
            order = [i for g in groups for i in g["params"]]
            self._load_fused_state({new: state_dict["state"][old] for new, old in enumerate(order) if old in state_dict["state"]})
            for saved, group in zip(groups, self.param_groups):
                group.update({k: v for k, v in saved.items() if k != "params"})
        else:
            self.base_optimizer.load_state_dict({"state": state_dict["state"], "param_groups": groups})
            self.param_groups = self.base_optimizer.param_groups
        self.sam_eps = sam.get("eps", self.sam_eps)
        if self._nonfinite is not None:
            self._nonfinite.fill_(int(sam.get("nonfinite_steps", 0)))

    def _load_fused_state(self, state: dict) -> None:
        """Copy per-parameter state (keyed by this optimizer's parameter index) into the flat buffers."""
        index = self._param_index()
        for segment in self._segments:
            segment.set_steps(
                [segment.import_state(i, state.get(index[id(p)], {})) for i, p in enumerate(segment.params)]
            )
