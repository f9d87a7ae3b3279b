"""CUDA graphs (``capturable=True``): what a captured SAM step needs kept as it was when captured.

A graph replays kernels on fixed addresses and with the arguments they had: the flat buffers must not
move, a Python float lr or rho would replay frozen, and the parameters that take part are those that had
a gradient at capture. These checks refuse, with what to do instead, what would make a replay wrong; and
``step_values`` hands the kernels lr and rho as they read them (a float, or under capturable a device tensor).
"""
from __future__ import annotations

import torch

from .updates import capturing, scalar


def note_capture(sam, capturable: bool, what: str) -> None:
    """Under CUDA graph capture: refuse unless capturable (a float lr and rho would replay frozen); else
    remember it, so that what would move the buffers the graph uses is refused from now on."""
    if not capturing():
        return
    if not capturable:
        raise RuntimeError(
            f"{what} is being captured into a CUDA graph, but this FusedSAM was built with capturable=False: "
            "its lr and rho are kernel arguments and would replay frozen (a scheduler's changes silently "
            "ignored). Build it with FusedSAM(..., capturable=True) and make lr a tensor on the device"
        )
    sam.captured = True


def refuse_if_captured(sam, what: str) -> None:
    if sam.captured:
        raise RuntimeError(
            f"{what} after a SAM step was captured into a CUDA graph: it would move FusedSAM's flat buffers, "
            "which the graph reads and writes by address; build a new optimizer (and capture anew) instead"
        )


def changed_live_set(sam, what: str, active: list):
    """A captured graph perturbs and updates the parameters that had a gradient when it was captured, on
    every replay. Record them under capture; after capture, the first parameter whose having a gradient
    differs from then (frozen, or reached by no backward since), as words, else None."""
    if capturing():
        sam.captured_live[what] = active
        return None
    if what not in sam.captured_live or sam.captured_live[what] == active:
        return None
    # None (every parameter) against a list of all True is the same set
    return next((f"parameter {i} of param group {segment.group_index}"
                 for segment, now, then in zip(sam.segments, active, sam.captured_live[what])
                 for i in range(len(segment.params))
                 if (now is None or now[i]) != (then is None or then[i])), None)


def live_set_error(what: str, changed: str) -> RuntimeError:
    return RuntimeError(
        f"{what}: the parameters with a gradient are not those a CUDA graph captured ({changed} changed): "
        "a replay would perturb and update exactly the captured ones, a frozen parameter included. "
        "Capture the step anew (with a new FusedSAM) after freezing or unfreezing parameters"
    )


def step_values(sam, groups: list, name: str, capturable: bool):
    """``of(group index, device)``: ``name`` (lr or rho) of a param group on a device it has parameters on,
    as the kernels take it: a Python float, or with capturable=True a float64 tensor on that device. Every
    value is read (and checked) now."""
    if capturable:
        keys = dict.fromkeys((segment.group_index, segment.device) for segment in sam.segments)
        on_device = {(gi, device): _value_on(sam, groups, gi, name, device) for gi, device in keys}
        return lambda gi, device: on_device[gi, device]
    values = [g[name] for g in groups]
    for gi, value in enumerate(values):
        if type(value) is not float:
            values[gi] = scalar(value, name)
    return lambda gi, device: values[gi]


def _value_on(sam, groups: list, gi: int, name: str, device: torch.device) -> torch.Tensor:
    """capturable=True: param group ``gi``'s ``name`` (lr or rho) as a float64 one-element tensor on
    ``device``, read by the kernels. A tensor-valued setting is used itself (a scheduler's in-place update
    reaches a replayed graph); a Python float is written into a buffer kept for it, which under capture
    would freeze its value into the graph, so it is refused there."""
    value = groups[gi][name]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} of param group {gi} must be a number or a one-element floating tensor")
        if value.device != device and capturing():
            raise RuntimeError(f"{name} of param group {gi} is a tensor on {value.device}, the parameters on "
                               f"{device}: a CUDA graph cannot read it there; create it on {device}")
        return value.detach().reshape(1).to(device=device, dtype=torch.float64)
    if capturing():
        raise RuntimeError(
            f"{name} of param group {gi} is a Python float ({value!r}): a CUDA graph would replay it frozen, "
            f"and a scheduler's later change would be silently ignored. Make it a tensor on {device} and "
            f"update it in place, e.g. group[{name!r}] = torch.tensor({value!r}, device={str(device)!r}) "
            "before capturing (LR schedulers then write it with fill_)"
        )
    key = (gi, name, device)
    buffer = sam.device_hyperparameters.get(key)
    if buffer is None:
        buffer = sam.device_hyperparameters[key] = torch.empty(1, dtype=torch.float64, device=device)
    return buffer.fill_(float(value))
