"""What FusedSAM accepts: its parameters, SAM's per-group settings, a GradScaler. Each check raises an
error that says what is wrong before anything is built or moved."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .backends import check_backend_name
from .distributed import is_dtensor, local_of, shard_group
from .flat import is_dense
from .variants import Variant

SAM_KEYS = ("rho", "adaptive", "eta", "normalize")  # SAM's settings, per param group
MODES = ("paired", "alternate")


def tensor_of(entry):
    """A param-list entry as a tensor (torch.optim also accepts (name, tensor) pairs)."""
    return entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry


def check_sam_settings(settings: dict, where: str) -> None:
    rho, eta = settings.get("rho", 0.0), settings.get("eta", 0.0)
    if isinstance(rho, torch.Tensor):  # capturable=True: its value lives on the device and is not read
        if rho.numel() != 1 or not rho.is_floating_point():
            raise ValueError(f"rho must be a number or a one-element floating tensor, got {rho!r} ({where})")
    elif not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho >= 0:
        raise ValueError(f"rho must be a non-negative number, got {rho!r} ({where})")
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not eta >= 0:
        raise ValueError(f"eta must be a non-negative number, got {eta!r} ({where})")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_params(params, seen: Optional[Dict[int, str]] = None, first_index: int = 0) -> List[dict]:
    """Param groups as dicts with a 'params' list, every tensor checked (``seen``: the tensors already
    held, by id, with where they are; ``first_index``: the index the first of these groups will have)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or dicts, got a single tensor")
    groups = list(params)
    if not groups:
        raise ValueError("FusedSAM got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    seen = {} if seen is None else seen
    for gi, group in enumerate(groups, first_index):
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"param group {gi} must be a dict with a 'params' entry")
        entries = group["params"]
        entries = [entries] if isinstance(entries, torch.Tensor) else list(entries)
        group = groups[gi - first_index] = dict(group, params=entries)
        check_sam_settings(group, f"param group {gi}")
        for i, entry in enumerate(entries):
            _check_tensor(tensor_of(entry), f"parameter {i} of param group {gi}", seen)
    if not any(entries for entries in (g["params"] for g in groups)):
        raise ValueError("FusedSAM got an empty parameter list")
    return groups


def check_options(variant, base_optimizer, rho, eta, perturb_eps, mode, master_weights, capturable,
                  skip_nonfinite, telemetry, backend) -> None:
    """FusedSAM's constructor arguments, each refused with what to do instead."""
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        hint = " (pass the class, not an instance)" if isinstance(base_optimizer, torch.optim.Optimizer) else ""
        raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass{hint}, got {base_optimizer!r}")
    check_backend_name(backend)
    check_sam_settings({"rho": rho, "eta": eta}, "constructor")
    if isinstance(perturb_eps, bool) or not isinstance(perturb_eps, (int, float)) or not perturb_eps > 0:
        raise ValueError(f"perturb_eps must be a positive number, got {perturb_eps!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for value, name in ((master_weights, "master_weights"), (capturable, "capturable"),
                        (skip_nonfinite, "skip_nonfinite"), (telemetry, "telemetry")):
        check_flag(value, name)
    if capturable and mode != "paired":
        raise ValueError("capturable=True needs mode='paired': in alternate mode each step() call is one half "
                         "of a SAM step, chosen on the host, and a captured graph would replay one half forever")
    if type(variant) is not Variant and (mode != "paired" or capturable):
        raise ValueError(f"variant={variant!r} needs mode='paired' and capturable=False: it decides on the "
                         "host, per step, whether the second pass runs")


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


def current_scale(grad_scaler) -> Optional[torch.Tensor]:
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
