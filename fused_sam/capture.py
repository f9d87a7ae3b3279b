"""CUDA graphs (``capturable=True``): what a captured SAM step needs kept as it was when captured.

A graph replays kernels on fixed addresses and with the arguments they had: the flat buffers must not
move, a Python float lr or rho would replay frozen, and the parameters that take part are those that had
a gradient at capture. These checks refuse, with what to do instead, what would make a replay wrong.
"""
from __future__ import annotations

from .updates import capturing


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
