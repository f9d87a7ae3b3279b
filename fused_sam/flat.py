"""Flat storage: the parameters of one param group on one (device, dtype) live in one contiguous buffer.

Each parameter's ``.data`` and ``.grad`` become views into the segment's weight and gradient buffers, so
the optimizer touches every parameter with one operation over the buffer. A DTensor parameter (FSDP2)
keeps its local shard where FSDP2 all-gathers it from: the segment holds a copy of the local shards and
writes them back after each step that changes the weights (``publish_weights``), and its ``.grad`` is a
DTensor over the gradient buffer, which FSDP2 accumulates into. Each parameter starts on an
ALIGN-element boundary (aligned vector loads in kernels); the padding is zero and stays zero. Views keep
the parameter's strides (channels_last stays channels_last).
"""
from __future__ import annotations

import ctypes
import math
import operator
import struct
import sys
import weakref
from itertools import groupby
from typing import Callable, Iterator, List, Optional, Sequence

import torch

from .backends.base import Span, math_dtype
from .distributed import as_local_like, is_dtensor, like_dtensor, local_of

ALIGN = 16
LOW_PRECISION = (torch.bfloat16, torch.float16)  # the dtypes master weights apply to
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr

try:  # the compiled extension answers the per-step "are the views still ours?" question ~20x faster
    from ._C import views_intact as _views_intact
except Exception:  # not built, or built against another torch
    _views_intact = None

# CPU flat buffers of at least this many bytes are backed by transparent huge pages where Linux allows it.
HUGE_PAGE_MIN_BYTES = 8 * 2**20
_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14


def _libc_madvise():
    """libc's madvise through ctypes (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


_MADVISE = _libc_madvise()


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned interior of ``t``'s memory with transparent huge pages
    (madvise(MADV_HUGEPAGE); effective under THP mode "madvise" or "always"). Call it before the memory is
    first written: pages already faulted in stay small. A streaming pass over a large buffer then takes a
    TLB miss per 2 MiB instead of per 4 KiB (~6% of a SAM step over 16M float32 on a 2-core EPYC VM). Advice
    only: False where it does not apply (not a CPU tensor, not Linux, too small, refused)."""
    if _MADVISE is None or t.device.type != "cpu":
        return False
    start = t.data_ptr()
    first = -(-start // _HUGE_PAGE) * _HUGE_PAGE
    last = (start + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if last <= first:
        return False
    return _MADVISE(first, last - first, _MADV_HUGEPAGE) == 0


def flat_zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed flat buffer; a large CPU one is advised to huge pages before its first write."""
    t = torch.empty(numel, dtype=dtype, device=device)
    if numel * t.element_size() >= HUGE_PAGE_MIN_BYTES:
        advise_huge_pages(t)
    return t.zero_()


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _link_before_accumulation(segment_ref, i: int, p: torch.Tensor, handle: torch.Tensor):
    """The gradient hook of parameter ``p`` (the segment's ``i``-th): runs before autograd accumulates its
    gradient, and makes a ``.grad`` of None the segment's zeroed view ``handle``, so autograd adds into the
    flat buffer instead of making a fresh tensor that the step would copy in."""
    def hook(_grad):
        if p.grad is None:
            segment = segment_ref()
            if segment is not None and segment.view_free[i]:
                try:
                    p.grad = handle
                except RuntimeError:  # moved to another dtype or device since the step: re-flattened there
                    return
                segment.view_free[i] = False
    return hook


def _padded(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def is_dense(t: torch.Tensor) -> bool:
    """True if ``t`` covers exactly ``t.numel()`` elements of memory, each once (any dim order)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def merged_master(master: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The float32 master for a 16-bit ``weight``: ``master`` where the weight is still its rounding, else
    the weight itself (it was written from outside)."""
    return torch.where(master.to(weight.dtype) == weight, master, weight.to(torch.float32))


class FlatSegment:
    """The parameters of one param group that share a device and dtype, with their flat buffers.

    Holds the weight, gradient and backup buffers, the optimizer state buffers (created on first use,
    in float32, or float64 for float64 parameters) and a per-parameter count of base updates, on the
    segment's device: a GradScaler's skipped step must not advance it, and whether it was skipped is
    known only there. ``optimizer.state[p]['step']`` is a view of it.

    The host never reads the counts during training. It keeps, per parameter, an id of its update
    history: parameters updated in the same steps share an id and so have equal counts, so a run of them
    reads one count (``spans``).
    """

    def __init__(self, group_index: int, params: Sequence[torch.Tensor], master_weights: bool = False):
        self.group_index = group_index
        self.params: List[torch.Tensor] = list(params)
        self.sharded = is_dtensor(self.params[0])  # DTensor parameters: the buffers hold their local shards
        tensors = self._locals()
        first = tensors[0]
        self.device, self.dtype = first.device, first.dtype
        self.state_dtype = math_dtype(self.dtype)
        # The layout as built: a later .data assignment may change a parameter's shape or strides.
        self.layout = [(t.shape, t.stride()) for t in tensors]
        self.offsets: List[int] = []
        offset = 0
        for t in tensors:
            self.offsets.append(offset)
            offset += _padded(t.numel())
        self.numel = offset
        self.weights = flat_zeros(self.numel, self.dtype, self.device)
        self.grads = flat_zeros(self.numel, self.dtype, self.device)
        # bf16/fp16 with master weights: a float32 master copy is the restore point, so no backup buffer.
        self.has_master = master_weights and self.dtype in LOW_PRECISION
        self.master: Optional[torch.Tensor] = None
        # zeros, not empty: a backup loaded parameter by parameter (a resume) leaves the padding as it was
        self.backup: Optional[torch.Tensor] = (
            None if self.has_master else flat_zeros(self.numel, self.dtype, self.device))
        self.state: dict = {}
        self.steps = torch.zeros(len(self.params), dtype=torch.float32, device=self.device)
        self._step_views = self.steps.unbind()  # made once: a fresh view per step costs a tensor operation
        # What a step adds to the counts: a Python 1 would be wrapped in a new tensor at every step (~40 us
        # on a CPU with a cold cache).
        self._one = torch.ones((), dtype=torch.float32, device=self.device)
        # Update-history ids: None while every parameter shares one history (the usual case), else one id
        # per parameter. Rebuilt from the counts when their version shows an edit through opt.state.
        self._history: Optional[List[int]] = None
        self._steps_version = self.steps._version
        self.published = False  # optimizer.state[p] holds views into this segment's state
        self._whole: Optional[tuple] = None  # (buffers and state names, Span): _whole_span's cache
        self.weight_views = [self.param_view(self.weights, i) for i in range(len(self.params))]
        self.grad_views = [self.param_view(self.grads, i) for i in range(len(self.params))]
        # What each parameter's .grad is while linked: the view, or for a DTensor a DTensor over the view.
        self.grad_handles = (
            [like_dtensor(g, p) for g, p in zip(self.grad_views, self.params)] if self.sharded else self.grad_views
        )
        torch._foreach_copy_(self.weight_views, [t.detach() for t in tensors])
        existing = [(v, local_of(p.grad)) for v, p in zip(self.grad_views, self.params) if p.grad is not None]
        if existing:
            torch._foreach_copy_([v for v, _ in existing], [g for _, g in existing])
        for p, w, g in zip(self.params, self.weight_views, self.grad_handles):
            if not self.sharded:
                p.data = w
            if p.grad is not None:
                p.grad = g
        # Per parameter: is its gradient view zero and not its .grad? Then a backward may accumulate into it.
        self.view_free = [p.grad is None for p in self.params]
        self._hooked = [False] * len(self.params)
        self._hook_handles: list = []
        weakref.finalize(self, _remove_hooks, self._hook_handles)  # a dropped optimizer links nothing more
        if not self.sharded:  # FSDP2 writes a sharded .grad itself: no backward reaches the DTensor parameter
            for i, p in enumerate(self.params):
                if p.requires_grad:
                    self._hook(i)
        self.weight_ptrs = [w.data_ptr() for w in self.weight_views]
        self._packed_weight_ptrs = struct.pack(f"{len(self.weight_ptrs)}P", *self.weight_ptrs)  # views_intact's
        if self.has_master:
            self.master = flat_zeros(self.numel, torch.float32, self.device).copy_(self.weights)
            self.master_views = [self.param_view(self.master, i) for i in range(len(self.params))]
        self._seen_versions = self._versions()
        # Gradients present at construction were not produced after the optimizer last looked at them.
        self.seen_grads_version = -1 if existing else self.grads._version

    def _locals(self) -> List[torch.Tensor]:
        """Each parameter's own tensor: its local shard for a DTensor (looked up anew: FSDP2 may re-pad it)."""
        return list(map(local_of, self.params)) if self.sharded else self.params

    def param_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        shape, stride = self.layout[i]
        return flat.as_strided(shape, stride, flat.storage_offset() + self.offsets[i])

    def _end(self, i: int) -> int:
        return self.offsets[i + 1] if i + 1 < len(self.offsets) else self.numel

    # --- per-step bookkeeping -------------------------------------------------------------------

    def intact(self) -> bool:
        """True if every parameter's data and gradient are still the views into this segment's buffers."""
        if _views_intact is not None and not self.sharded:
            return _views_intact(self.params, self._packed_weight_ptrs, self.grad_views)
        return self.storage_moved() is None and all(map(operator.is_, map(_GRAD, self.params), self.grad_handles))

    def storage_moved(self) -> Optional[str]:
        """Describe the first parameter whose data is no longer its view into this segment (sharded: whose
        local shard changed shape, dtype or device); None if none."""
        if self.sharded:
            for i, t in enumerate(self._locals()):
                if (t.shape, t.stride()) != self.layout[i] or t.dtype != self.dtype or t.device != self.device:
                    return (f"parameter {i} of param group {self.group_index} (local shard {tuple(t.shape)}, "
                            f"now {t.dtype} on {t.device})")
            return None
        if list(map(_DATA_PTR, self.params)) == self.weight_ptrs:
            return None
        for i, (p, ptr) in enumerate(zip(self.params, self.weight_ptrs)):
            if p.data_ptr() != ptr:
                return f"parameter {i} of param group {self.group_index} (shape {tuple(p.shape)}, now {p.dtype} on {p.device})"
        return None

    def _hook(self, i: int) -> None:
        p = self.params[i]
        self._hook_handles.append(p.register_hook(_link_before_accumulation(weakref.ref(self), i, p, self.grad_handles[i])))
        self._hooked[i] = True

    def remove_hooks(self) -> None:
        """Unhook the parameters (a re-layout: the new segment hooks them)."""
        _remove_hooks(self._hook_handles)

    def link_grads(self) -> Optional[List[bool]]:
        """Bring every gradient into the flat buffer; return which parameters have one (None: all do).

        A ``.grad`` replaced by a fresh tensor (``model.zero_grad()``, create_graph, user assignment, a
        parameter unfrozen after construction) is copied into the buffer in one batched copy and the view
        is linked back. The views of parameters without a gradient are left zero (whole-buffer passes, as
        LookSAM's, read them).
        """
        grads = list(map(_GRAD, self.params))
        if all(map(operator.is_, grads, self.grad_handles)):
            return None
        active = [g is not None for g in grads]
        unzeroed = [i for i, g in enumerate(grads) if g is None and not self.view_free[i]]
        if unzeroed:  # the .grad was set to None from outside (model.zero_grad()): the view holds an old one
            torch._foreach_zero_([self.grad_views[i] for i in unzeroed])
            for i in unzeroed:
                self.view_free[i] = True
        stale = [i for i, (g, handle) in enumerate(zip(grads, self.grad_handles)) if g is not None and g is not handle]
        if stale:
            sources = {i: local_of(grads[i]) for i in stale}
            for i, g in sources.items():
                if g.layout != torch.strided:
                    raise RuntimeError(
                        f"FusedSAM does not support sparse gradients (parameter {i} of param group {self.group_index})"
                    )
                shape = self.layout[i][0]
                if g.shape != shape or g.dtype != self.dtype or g.device != self.device:
                    raise RuntimeError(
                        f"gradient of parameter {i} of param group {self.group_index} has shape {tuple(g.shape)}, "
                        f"{g.dtype} on {g.device}; expected {tuple(shape)}, {self.dtype} on {self.device}"
                    )
            torch._foreach_copy_([self.grad_views[i] for i in stale], list(sources.values()))
            for i in stale:
                self.params[i].grad = self.grad_handles[i]
                self.view_free[i] = False
                if not (self._hooked[i] or self.sharded):  # unfrozen since construction: link it from now on
                    self._hook(i)
        return active

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffer in one operation. set_to_none: every ``.grad`` becomes None, as in
        torch.optim (the hook links a parameter's view back when a backward reaches it); else the
        gradients that exist stay, as zeroed views."""
        self.grads.zero_()
        if set_to_none:
            for p in self.params:
                p.grad = None
            self.view_free = [True] * len(self.params)
        else:
            for i, (p, g) in enumerate(zip(self.params, self.grad_handles)):
                if p.grad is not None and p.grad is not g:
                    p.grad = g
                self.view_free[i] = p.grad is None
        self.mark_grads_seen()

    def mark_grads_seen(self) -> None:
        """Remember the gradient buffer's version: any later write to it (a backward) shows as fresh."""
        self.seen_grads_version = self.grads._version

    def grads_fresh(self) -> bool:
        """True if a gradient was written since ``mark_grads_seen``: autograd accumulating into the views
        bumps the buffer's version counter, and a fresh ``.grad`` tensor is not one of the views."""
        if self.grads._version != self.seen_grads_version:
            return True
        if self.intact():
            return False
        return any(g is not None and g is not h for g, h in zip(map(_GRAD, self.params), self.grad_handles))

    def ensure_state(self, names: Sequence[str], initial: Optional[Callable[[str], float]] = None) -> bool:
        """Create the named state buffers that do not exist yet, each parameter's elements ``initial(name)``
        (default 0; the padding stays 0); True if any was created."""
        missing = [name for name in names if name not in self.state]
        for name in missing:
            buf = self.state[name] = flat_zeros(self.numel, self.state_dtype, self.device)
            value = 0.0 if initial is None else initial(name)
            if value != 0:
                for offset, (shape, _) in zip(self.offsets, self.layout):
                    buf[offset:offset + math.prod(shape)].fill_(value)
        return bool(missing)

    def state_views(self, i: int) -> dict:
        """Parameter ``i``'s optimizer state in torch.optim's shape: views into the flat buffers, and
        'step' as a 0-d view of the step counts (in-place edits reach the optimizer)."""
        views = {name: self.exported(i, self.param_view(buf, i)) for name, buf in self.state.items()}
        views["step"] = self._step_views[i]
        return views

    def spans(self, *masks: Optional[Sequence[bool]]) -> Iterator[tuple]:
        """Yield (first, stop, flags, Span) for each non-empty maximal run of parameters with equal mask values and
        update histories (so equal step counts: ``step_of(first)``); ``flags`` holds the run's value of
        each mask (a None mask is all True)."""
        history = self._current_history()
        if history is None and masks.count(None) == len(masks):  # the usual case: one span
            if self.numel:
                yield 0, len(self.params), (True,) * len(masks), self._whole_span()
            return
        columns = [[True] * len(self.params) if m is None else m for m in masks]
        ids = [0] * len(self.params) if history is None else history
        i = 0
        for (*flags, _), run in groupby(zip(*columns, ids)):
            n = sum(1 for _ in run)
            start, stop = self.offsets[i], self._end(i + n - 1)
            if stop > start:  # a run of DTensor parameters whose local shards are all empty has no elements
                yield i, i + n, tuple(flags), self._span(start, stop)
            i += n

    def step_of(self, i: int) -> torch.Tensor:
        """Parameter ``i``'s count of base updates: a 0-d view on the device (the whole run's count)."""
        return self._step_views[i]

    def _whole_span(self) -> Span:
        """The span of the whole segment, made once for the buffers it holds (slicing five buffers costs
        ~20 us per step): remade when any buffer was replaced or added (the cache keeps the buffers it was
        made from alive, so identity is a sound test)."""
        state = self.state
        made_from = (self.weights, self.grads, self.backup, self.master, *state, *state.values())
        cached = self._whole
        if cached is None or len(cached[0]) != len(made_from) or not all(map(operator.is_, cached[0], made_from)):
            cached = self._whole = (made_from, self._span(0, self.numel))
        return cached[1]

    def _span(self, start: int, stop: int) -> Span:
        return Span(
            weights=self.weights[start:stop],
            grads=self.grads[start:stop],
            backup=None if self.backup is None else self.backup[start:stop],
            state={name: buf[start:stop] for name, buf in self.state.items()},
            master=None if self.master is None else self.master[start:stop],
        )

    # --- state export / import (state_dict, re-layout) ---------------------------------------------

    def exported(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like parameter ``i``'s local data, as the state of the parameter: for a DTensor
        parameter, a DTensor sharded as it is (what DCP and ``get_optimizer_state_dict`` expect)."""
        return like_dtensor(local, self.params[i]) if self.sharded else local

    def local_value(self, i: int, value):
        """A loaded state value for parameter ``i`` as a tensor shaped like its local data."""
        if self.sharded and isinstance(value, torch.Tensor):
            return as_local_like(value, self.params[i])
        return value

    def export_state(self, i: int, step: int) -> dict:
        """torch.optim-style state of parameter ``i`` (``step`` base updates so far, read by the caller
        from ``steps``): cloned tensors shaped like the parameter, and 'step' (a CPU tensor); nothing before
        the first update unless state buffers exist (a fused base creates them at construction)."""
        if step == 0 and not self.state:
            return {}
        state = {name: self.exported(i, self.param_view(buf, i).clone()) for name, buf in self.state.items()}
        state["step"] = torch.tensor(float(step), dtype=torch.float32)
        return state

    def import_state(self, i: int, state: dict) -> int:
        """Copy torch.optim-style state into parameter ``i``'s slices; return its step count."""
        shape = self.layout[i][0]
        for buf in self.state.values():
            self.param_view(buf, i).zero_()
        for name, value in state.items():
            if name == "step" or value is None:
                continue
            value = self.local_value(i, value)
            if not isinstance(value, torch.Tensor) or value.shape != shape:
                raise ValueError(
                    f"state {name!r} of parameter {i} of param group {self.group_index} has shape "
                    f"{tuple(getattr(value, 'shape', ()))}, the parameter {tuple(shape)}"
                )
            self.ensure_state([name])
            self.param_view(self.state[name], i).copy_(value)
        if "step" not in state:  # a torch.optim.SGD momentum buffer carries no step: it has had one
            return 1 if any(v is not None for v in state.values()) else 0
        step = state["step"]
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    def backup_of(self, i: int) -> torch.Tensor:
        """A copy of parameter ``i``'s restore point (w while the weights are at w + e): the float32
        master weight with master weights."""
        return self.exported(i, self.param_view(self.backup if self.master is None else self.master, i).clone())

    def current_weight(self, i: int) -> torch.Tensor:
        """A copy of parameter ``i``'s weight: its float32 master with master weights."""
        return self.exported(i, (self.weight_views[i] if self.master is None else self.master_views[i]).clone())

    def set_backup(self, i: int, value: torch.Tensor) -> None:
        value = self.local_value(i, value)
        self.check_shape(i, value, "restore point")
        self.param_view(self.backup if self.master is None else self.master, i).copy_(value)

    def check_shape(self, i: int, value, what: str) -> None:
        shape = self.layout[i][0]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            raise ValueError(
                f"{what} of parameter {i} of param group {self.group_index} has shape "
                f"{tuple(getattr(value, 'shape', ()))}, the parameter {tuple(shape)}"
            )

    # --- weights written from outside: master weights, DTensor local shards ---------------------------

    def _versions(self) -> list:
        return list(map(_VERSION, self.params))

    def sync_from_outside(self) -> None:
        """Take in weights written from outside since the last step (``model.load_state_dict``, DCP, an
        in-place init). Sharded: the local shards are copied in, always: DCP and FSDP2 write them in ways
        no version counter sees. Master weights: where a weight is no longer the rounding of its master,
        the weight wins; unsharded, checked only when a parameter's version counter moved (its in-place
        writes bump it, those through ``.data`` do not)."""
        if self.sharded:
            torch._foreach_copy_(self.weight_views, self._locals())
        elif self.master is None or self._versions() == self._seen_versions:
            return
        if self.master is not None:
            for weight, master in zip(self.weight_views, self.master_views):
                master.copy_(merged_master(master, weight))
            self._seen_versions = self._versions()

    def publish_weights(self) -> None:
        """Sharded: write the flat weights into the local shards, where FSDP2 all-gathers them from."""
        if self.sharded:
            torch._foreach_copy_(self._locals(), self.weight_views)

    def master_of(self, i: int) -> torch.Tensor:
        return self.exported(i, self.master_views[i].clone())

    def set_master(self, i: int, value: torch.Tensor, write_weight: bool = True) -> None:
        """Load parameter ``i``'s master weight (and set its weight to the rounding of it)."""
        self.check_shape(i, value, "master weight")
        self.master_views[i].copy_(value)
        if write_weight:
            self.weight_views[i].copy_(self.master_views[i])

    # --- step counts -------------------------------------------------------------------------------

    def _current_history(self) -> Optional[List[int]]:
        if self.steps._version != self._steps_version:  # edited through optimizer.state[p]['step']
            self._history_from_counts(self.steps.tolist())
        return self._history

    def _history_from_counts(self, counts: List[float]) -> None:
        """Equal counts, one history (a host read; only after an outside edit or a load)."""
        ids = {c: k for k, c in enumerate(dict.fromkeys(counts))}
        self._history = None if len(ids) <= 1 else [ids[c] for c in counts]
        self._steps_version = self.steps._version

    def set_steps(self, steps: List[int]) -> None:
        self.steps.copy_(torch.tensor(steps, dtype=torch.float32))
        self._history_from_counts([float(s) for s in steps])

    def advance_steps(self, updated: Optional[Sequence[bool]], taken: Optional[torch.Tensor]) -> None:
        """Count one base update of the ``updated`` parameters (None: all); ``taken`` (a device tensor,
        1 or 0) is whether it happened, for a GradScaler step that may have been skipped."""
        history = self._current_history()
        increment = self._one if taken is None else taken
        if updated is None or all(updated):
            self.steps.add_(increment)
        else:
            i = 0
            for flag, run in groupby(updated):
                n = sum(1 for _ in run)
                if flag:
                    self.steps[i:i + n] += increment
                i += n
            # The updated parameters now share a history with each other only where they shared one before.
            ids = [0] * len(self.params) if history is None else history
            fresh = {}
            next_id = max(ids) + 1
            history = [fresh.setdefault(h, next_id + len(fresh)) if u else h for h, u in zip(ids, updated)]
            self._history = None if len(set(history)) == 1 else history
        self._steps_version = self.steps._version
