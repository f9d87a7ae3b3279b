"""Keep SAM's second forward pass (at w + e) out of the normalization layers' running statistics.

The classic helpers set every BatchNorm's momentum to 0 for that pass. That is not exact:
num_batches_tracked still counts the pass (so momentum=None, the cumulative average, still moves) and
0 * NaN is NaN (a non-finite batch statistic at w + e still lands in the running stats). Here every
normalization layer that tracks running statistics has tracking turned off for the second pass. A
training forward then normalizes with the batch's own statistics, as the forward at w does, and writes no
running statistic. That is enough for BatchNorm (incl. SyncBatchNorm), whose buffers stay registered, so
DistributedDataParallel, which broadcasts the module's buffers before every forward, keeps finding them.
InstanceNorm updates any running buffers it holds whatever the flag says: its buffers are set aside too.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parameter import is_lazy

_STASH = "_fused_sam_running_stats"
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")

__all__ = ["disable_running_stats", "enable_running_stats", "running_stats_frozen"]


def _freeze(model: nn.Module) -> List[nn.Module]:
    """Freeze every tracking norm layer of ``model``; return those frozen by this call."""
    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
    for m in layers:
        if any(is_lazy(getattr(m, name)) for name in _BUFFERS):
            # Its running buffers get their shape at the first forward, which would then be the one at w + e.
            raise ValueError(f"{type(m).__name__} is not initialized yet: run a forward pass before freezing "
                             "its running statistics")
    for m in layers:
        set_aside = () if isinstance(m, _BatchNorm) else _BUFFERS  # see the module docstring
        setattr(m, _STASH, {name: getattr(m, name) for name in set_aside})
        for name in set_aside:
            setattr(m, name, None)
        m.track_running_stats = False
    return layers


def _thaw(layers) -> None:
    """Give back the stashed buffers and turn tracking on again; layers with nothing stashed are skipped."""
    for m in layers:
        stash = m.__dict__.pop(_STASH, None)
        if stash is None:  # already restored, e.g. by an enable_running_stats call inside the context
            continue
        for name, buffer in stash.items():
            setattr(m, name, buffer)
        m.track_running_stats = True


def disable_running_stats(model: nn.Module) -> None:
    """Stop the next forward passes from touching running statistics (call before SAM's second pass).

    Covers every ``_NormBase`` module (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants once initialized,
    InstanceNorm with track_running_stats=True) that tracks running statistics now. Until
    ``enable_running_stats``, a training forward normalizes with the batch's (instance's) own statistics
    and updates no running statistic; in eval mode BatchNorm keeps reading (not writing) its running
    statistics. BatchNorm's buffers stay registered; InstanceNorm's running_mean, running_var and
    num_batches_tracked are set aside on the module (absent from ``state_dict()`` and ``buffers()``; do not
    move, cast or save such a model meanwhile). Layers with tracking off are left alone. Calling it again while frozen changes nothing. Raises ValueError, changing nothing, if a
    lazy norm layer has not run its first forward yet.
    """
    _freeze(model)


def enable_running_stats(model: nn.Module) -> None:
    """Undo ``disable_running_stats``: give back the same buffer tensors and turn tracking on again.

    Only layers that ``disable_running_stats`` froze are touched, so a layer that had tracking off stays
    off. Without a prior disable (or called twice) it does nothing.
    """
    _thaw([m for m in model.modules() if hasattr(m, _STASH)])


@contextlib.contextmanager
def running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """``with running_stats_frozen(model): loss_fn(model(x), y).backward()`` for SAM's second pass.

    Freezes as ``disable_running_stats`` does and, on exit, even by an exception, restores exactly the
    layers this block froze: nested blocks restore nothing until the outermost one exits.
    """
    layers = _freeze(model)
    try:
        yield
    finally:
        _thaw(layers)
