"""The fused base updates, each described once: what it fuses and what it needs, read from a param group.

A fused base update is a frozen dataclass, a subclass of ``BaseUpdate``, whose fields are its settings (its
torch.optim group key and default in each field's metadata), and whose class attributes say which torch.optim
classes it fuses, which state buffers it keeps (torch.optim's names, in the order the kernels take them) and
its code in the compiled operators (csrc/fused_sam_math.h's FUSED_SAM_BASE_KINDS). Everything else reads this
description: ``update_from_group`` and the optimizer's checks and checkpoints, the backends (the reference's
and each kernel backend's per-element math is keyed by the class), the compiled operator's arguments (the
float settings in declaration order as ``hyperparameters()``, the bool ones as bits of ``flags()``).
docs/adding_a_base.md says how to add one.

Only the exact classes listed in ``fuses`` are fused: a subclass may override ``step``, so it goes through the
generic path (fused perturb/restore, then the subclass's own ``step()``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Optional, Tuple

import torch


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph (never before CUDA is
    initialized: that check is a flag, where is_available() costs ~10 us per call)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def scalar(value, name: str) -> float:
    """A hyperparameter as a Python float. Tensor values are read once per step (a sync if on a GPU)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"hyperparameter {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.is_cuda and capturing():
            raise RuntimeError(f"hyperparameter {name!r} is a CUDA tensor, read on the host at every step, which a "
                               "CUDA graph cannot capture: only lr and rho may be tensors under capture")
        return float(value.item())
    return float(value)


def setting(default, key: str, index: Optional[int] = None, set_by: Optional[type] = None):
    """A field of a base update: ``default``, read from the param group's ``key`` (element ``index`` of it, for
    a tuple such as Adam's betas); a bool ``set_by`` a base class is True for that class (AdamW's decoupled
    weight decay)."""
    return field(default=default, metadata=dict(key=key, index=index, set_by=set_by))


@dataclass(frozen=True)
class BaseUpdate:
    """One fused base update's settings at one step (lr, a per-step value, comes in ``StepScalars``)."""

    name: ClassVar[str]  # as the backends name it ("sgd")
    code: ClassVar[int]  # its index in csrc/fused_sam_math.h's FUSED_SAM_BASE_KINDS
    fuses: ClassVar[Tuple[type, ...]]  # the torch.optim classes it replaces
    state_names: ClassVar[Tuple[str, ...]]  # torch.optim's names of its state buffers, in the kernels' order
    momentum_state: ClassVar[Optional[str]] = None  # the buffer holding its momentum (MomentumSAM's direction)
    nonnegative_state: ClassVar[Tuple[str, ...]] = ()  # buffers that hold only values >= 0 (second moments)
    step_in_state: ClassVar[bool] = False  # torch.optim keeps a 'step' in each parameter's state
    float_settings: ClassVar[Tuple[str, ...]] = ()  # set by @fused_base: the float fields, in declaration order
    flag_settings: ClassVar[Tuple[str, ...]] = ()  # and the bool ones
    group_keys: ClassVar[tuple] = ()  # and per field (name, group key, index, set_by, is bool)
    read_keys: ClassVar[tuple] = ()  # and the group keys it reads

    def needed_state(self) -> Tuple[str, ...]:
        """The state buffers these settings read and write (a prefix of ``state_names``)."""
        return self.state_names

    def initial_state(self, name: str) -> float:
        """The value a state buffer starts from (torch.optim's initialisation)."""
        return 0.0

    def hyperparameters(self) -> Tuple[float, ...]:
        """The float settings, in declaration order: the compiled operator's ``hyperparameters``."""
        return tuple(getattr(self, name) for name in self.float_settings)

    def flags(self) -> int:
        """The bool settings as bits, the i-th declared bool in bit i: the compiled operator's ``flags``."""
        bits = 0
        for i, name in enumerate(self.flag_settings):
            if getattr(self, name):
                bits |= 1 << i
        return bits


def fused_base(cls: type) -> type:
    """Declares a fused base update: ``cls`` as a frozen dataclass, its settings' order recorded once (so that
    nothing reads dataclass fields at each step, which torch.compile cannot trace)."""
    cls = dataclass(frozen=True)(cls)
    cls.float_settings = tuple(f.name for f in fields(cls) if f.type in ("float", float))
    cls.flag_settings = tuple(f.name for f in fields(cls) if f.type in ("bool", bool))
    cls.group_keys = tuple((f.name, f.metadata["key"], f.metadata["index"], f.metadata["set_by"],
                            f.name in cls.flag_settings) for f in fields(cls))
    cls.read_keys = ("differentiable",) + tuple(dict.fromkeys(key for _, key, _, _, _ in cls.group_keys))
    return cls


@fused_base
class SGDUpdate(BaseUpdate):
    """torch.optim.SGD: momentum, dampening, nesterov, weight decay (L2, added to the gradient), maximize."""

    name = "sgd"
    code = 0
    fuses = (torch.optim.SGD,)
    state_names = ("momentum_buffer",)
    momentum_state = "momentum_buffer"

    momentum: float = setting(0.0, "momentum")
    dampening: float = setting(0.0, "dampening")
    weight_decay: float = setting(0.0, "weight_decay")
    nesterov: bool = setting(False, "nesterov")
    maximize: bool = setting(False, "maximize")

    def needed_state(self) -> tuple:
        return self.state_names if self.momentum != 0 else ()


@fused_base
class AdamUpdate(BaseUpdate):
    """torch.optim.Adam / AdamW; ``decoupled`` selects AdamW's weight decay (w *= 1 - lr * wd)."""

    name = "adam"
    code = 1
    fuses = (torch.optim.Adam, torch.optim.AdamW)
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    momentum_state = "exp_avg"
    nonnegative_state = ("exp_avg_sq", "max_exp_avg_sq")
    step_in_state = True

    beta1: float = setting(0.9, "betas", 0)
    beta2: float = setting(0.999, "betas", 1)
    eps: float = setting(1e-8, "eps")
    weight_decay: float = setting(0.0, "weight_decay")
    decoupled: bool = setting(False, "decoupled_weight_decay", set_by=torch.optim.AdamW)
    amsgrad: bool = setting(False, "amsgrad")
    maximize: bool = setting(False, "maximize")

    def needed_state(self) -> tuple:
        return self.state_names if self.amsgrad else self.state_names[:2]


@fused_base
class AdagradUpdate(BaseUpdate):
    """torch.optim.Adagrad: the running sum of squared gradients ('sum', from initial_accumulator_value), lr
    decayed by the step count (lr / (1 + step * lr_decay)), weight decay (L2, added to the gradient), maximize."""

    name = "adagrad"
    code = 2
    fuses = (torch.optim.Adagrad,)
    state_names = ("sum",)
    nonnegative_state = ("sum",)
    step_in_state = True

    lr_decay: float = setting(0.0, "lr_decay")
    weight_decay: float = setting(0.0, "weight_decay")
    initial_accumulator_value: float = setting(0.0, "initial_accumulator_value")
    eps: float = setting(1e-10, "eps")
    maximize: bool = setting(False, "maximize")

    def __post_init__(self):
        if not self.eps > 0:  # a parameter's padding (zero gradient, zero sum) would divide 0 by 0
            raise ValueError(f"FusedSAM fuses torch.optim.Adagrad with eps > 0, got eps={self.eps!r}")

    def initial_state(self, name: str) -> float:
        return self.initial_accumulator_value


# Every fused base update, in the order of their codes.
FUSED_UPDATES: Tuple[type, ...] = (SGDUpdate, AdamUpdate, AdagradUpdate)


def fused_kind(base_cls: type) -> Optional[type]:
    """The base update class that fuses ``base_cls``, or None (not fused)."""
    return next((kind for kind in FUSED_UPDATES if base_cls in kind.fuses), None)


# Base updates already read, by (class, base class, the group's raw values): a step reads each group's
# settings twice, and building the frozen dataclass costs more than the rest of the step's host work per group.
# Only plain values are kept: a tensor may change in place (a key holding one hashes by identity, so it finds
# no entry and is read afresh).
_READ: dict = {}


def _plain(values: tuple) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor) or (type(value) is tuple and any(isinstance(v, torch.Tensor) for v in value)):
            return False
    return True


def update_from_group(kind: type, base_cls: type, group: dict) -> BaseUpdate:
    """The base update (of class ``kind``) a param group asks for at this step; its lr is a per-step value,
    in ``StepScalars``. Settings held as plain numbers are read once per distinct value."""
    key = (kind, base_cls, tuple(map(group.get, kind.read_keys)))
    try:
        update = _READ.get(key)
    except TypeError:  # an unhashable setting (betas as a list): read it every time
        return _read_update(kind, base_cls, group)
    if update is None:
        update = _read_update(kind, base_cls, group)
        if _plain(key[2]):
            remember(_READ, key, update)
    return update


def remember(cache: dict, key, value):
    """``cache[key] = value`` in a cache of what was read from settings, by their values, holding at most 256:
    settings scheduled through many values keep the recent ones only."""
    if len(cache) >= 256:
        cache.clear()
    cache[key] = value
    return value


def _read_update(kind: type, base_cls: type, group: dict) -> BaseUpdate:
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported by FusedSAM's fused base update")
    values = {}
    for name, key, index, set_by, is_bool in kind.group_keys:
        value = group.get(key)
        if value is not None and index is not None:
            value, label = value[index], f"{key}[{index}]"
        else:
            label = key
        if is_bool:
            values[name] = base_cls is set_by or bool(value)
        elif value is not None:
            values[name] = scalar(value, label)
    return kind(**values)
