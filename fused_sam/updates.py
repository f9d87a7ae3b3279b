"""Base-optimizer hyperparameters of one step, read from a torch.optim param group.

Only the exact classes torch.optim.SGD, Adam and AdamW are fused: a subclass may override ``step``, so it
goes through the generic path (fused perturb/restore, then the subclass's own ``step()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

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


@dataclass(frozen=True)
class SGDUpdate:
    """torch.optim.SGD: momentum, dampening, nesterov, weight decay (L2, added to the gradient), maximize."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def needed_state(self) -> tuple:
        return ("momentum_buffer",) if self.momentum != 0 else ()


@dataclass(frozen=True)
class AdamUpdate:
    """torch.optim.Adam / AdamW; ``decoupled`` selects AdamW's weight decay (w *= 1 - lr * wd)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    maximize: bool = False

    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def needed_state(self) -> tuple:
        return self.state_names if self.amsgrad else self.state_names[:2]


BaseUpdate = Union[SGDUpdate, AdamUpdate]


def fused_kind(base_cls: type) -> Optional[str]:
    """'sgd', 'adam' or None (not fused) for a base optimizer class."""
    if base_cls is torch.optim.SGD:
        return "sgd"
    if base_cls in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    return None


def update_from_group(kind: str, base_cls: type, group: dict) -> BaseUpdate:
    """The base update a param group asks for at this step, but its lr: a per-step value, in ``StepScalars``."""
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported by FusedSAM's fused base update")
    if kind == "sgd":
        return SGDUpdate(
            momentum=scalar(group.get("momentum", 0.0), "momentum"),
            dampening=scalar(group.get("dampening", 0.0), "dampening"),
            weight_decay=scalar(group.get("weight_decay", 0.0), "weight_decay"),
            nesterov=bool(group.get("nesterov", False)),
            maximize=bool(group.get("maximize", False)),
        )
    beta1, beta2 = group.get("betas", (0.9, 0.999))
    return AdamUpdate(
        beta1=scalar(beta1, "betas[0]"),
        beta2=scalar(beta2, "betas[1]"),
        eps=scalar(group.get("eps", 1e-8), "eps"),
        weight_decay=scalar(group.get("weight_decay", 0.0), "weight_decay"),
        decoupled=base_cls is torch.optim.AdamW or bool(group.get("decoupled_weight_decay", False)),
        amsgrad=bool(group.get("amsgrad", False)),
        maximize=bool(group.get("maximize", False)),
    )
