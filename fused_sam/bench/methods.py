"""The SAM implementations the benchmark compares, behind one small interface.

- ``classic``: ``fused_sam.classic.ClassicSAM``, the per-tensor loop of the widely used PyTorch SAM class,
  with its base optimizer built with torch.optim's defaults (foreach on CUDA, a for-loop on CPU), as
  users run it today.
- ``torch-native``: ``TorchNativeSAM`` below, the strongest SAM we know how to write with stock PyTorch:
  ``torch._foreach_norm`` for the gradient norm, ``_foreach`` ops for the backup and the perturbation,
  an exact restore by ``_foreach_copy_``, and the base optimizer with ``fused=True`` (``foreach=True``
  where the fused kernel is unavailable for that device and dtype; probed at run time).
- ``fused:<backend>``: ``fused_sam.FusedSAM(..., backend=<backend>)`` for every backend that
  ``fused_sam.available_backends(device, dtype)`` lists.
- ``fused:<backend>+GradScaler``: the same, its second step taken by a ``torch.amp.GradScaler`` as in a
  mixed-precision loop: ``first_step(grad_scaler=...)``, ``scaler.step(opt)`` (GradScaler's inf check over
  the gradients, then the unscaling update) and ``scaler.update()``. The scale stays 1, so the results
  are those of ``fused:<backend>``.
- ``fused:<backend>+master`` (bf16/fp16 parameters, backends with master-weights kernels):
  ``FusedSAM(..., master_weights=True)``, float32 master weights in place of the backup.
- ``fused:<backend>+capturable``: ``FusedSAM(..., capturable=True)`` with lr and rho as float64 tensors on
  the device, as a CUDA-graph user keeps them, taken eagerly: what the capturable path costs without a
  graph (the kernels load lr and rho instead of taking them as arguments).

Every method exposes ``first_step()``, ``second_step()``, ``params`` and ``info`` (a dict of what it
runs, for the report), and ``held_tensors()`` (every tensor it keeps between steps, for the memory
accounting).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from ..classic import ClassicSAM
from ..optimizer import FusedSAM

# Hyperparameters used by every method (the values only matter for verification, not for speed).
RHO = 0.05
SAM_EPS = 1e-12
OPTIMIZERS: Dict[str, tuple] = {
    "sgd": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}
# Optimizer state tensors per parameter that torch.optim keeps (in the parameter's dtype).
STATE_TENSORS = {"sgd": 1, "adamw": 2}

# torch-native: read the norm back to the host (one sync) and add alpha * g in place, instead of
# materialising e = scale * g, when the set is at least this large. On CPU a "sync" costs nothing, so it
# always syncs; on CUDA the sync (~tens of microseconds) is cheaper than writing and reading e only for
# large sets.
NATIVE_SYNC_MIN_NUMEL = 8 * 2**20

_BASE_IMPL_CACHE: Dict[tuple, str] = {}


def base_impl(base_cls: type, device: torch.device, dtype: torch.dtype) -> str:
    """'fused' if ``base_cls(..., fused=True)`` runs on this device and dtype here, else 'foreach'."""
    key = (base_cls, str(device), dtype)
    if key not in _BASE_IMPL_CACHE:
        impl = "foreach"
        try:
            p = torch.zeros(8, device=device, dtype=dtype, requires_grad=True)
            p.grad = torch.ones_like(p)
            kwargs = OPTIMIZERS["sgd"][1] if base_cls is torch.optim.SGD else {}
            opt = base_cls([p], fused=True, **kwargs)
            opt.step()
            opt.step()
            impl = "fused"
        except Exception:  # not supported for this device / dtype / torch version
            pass
        _BASE_IMPL_CACHE[key] = impl
    return _BASE_IMPL_CACHE[key]


class TorchNativeSAM:
    """SAM with stock PyTorch at its best: a handful of multi-tensor (_foreach) launches per step.

    first_step:  norms = _foreach_norm(g); n = ||norms||; backup <- w (_foreach_copy_);
                 w += (rho / (n + eps)) * g   (one _foreach_add_ with a host scalar, or
                 _foreach_mul + _foreach_add_ without a sync; see NATIVE_SYNC_MIN_NUMEL)
    second_step: w <- backup (_foreach_copy_, exact); base_optimizer.step() (fused=True / foreach=True)
    """

    def __init__(self, params: Sequence[torch.Tensor], base_cls: type, rho: float = RHO, eps: float = SAM_EPS,
                 sync: Optional[bool] = None, **base_kwargs):
        self.params = list(params)
        self.rho, self.eps = rho, eps
        self.backups = [torch.empty_like(p) for p in self.params]
        device, dtype = self.params[0].device, self.params[0].dtype
        impl = base_impl(base_cls, device, dtype)
        self.base_optimizer = base_cls(self.params, **base_kwargs, **{impl: True})
        if sync is None:
            sync = device.type == "cpu" or sum(p.numel() for p in self.params) >= NATIVE_SYNC_MIN_NUMEL
        self.sync = sync
        self.info = {"base": f"{base_cls.__name__}({impl}=True)", "sync": sync}

    @torch.no_grad()
    def first_step(self) -> None:
        grads = [p.grad for p in self.params]
        try:
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch: no dtype argument
            norms = [n.float() for n in torch._foreach_norm(grads, 2)]
        norm = torch.linalg.vector_norm(torch.stack(norms))
        scale = self.rho / (norm + self.eps)
        torch._foreach_copy_(self.backups, self.params)
        if self.sync:
            torch._foreach_add_(self.params, grads, alpha=float(scale))
        else:
            torch._foreach_add_(self.params, torch._foreach_mul(grads, scale.to(grads[0].dtype)))

    @torch.no_grad()
    def second_step(self) -> None:
        torch._foreach_copy_(self.params, self.backups)
        self.base_optimizer.step()

    def held_tensors(self) -> List[torch.Tensor]:
        return self.backups + _optimizer_state_tensors(self.base_optimizer)


class _Wrapped:
    """ClassicSAM / FusedSAM with the common interface."""

    def __init__(self, opt, params, info, held):
        self.opt, self.params, self.info, self._held = opt, params, info, held
        self.steps = 0

    def first_step(self) -> None:
        self.opt.first_step()

    def second_step(self) -> None:
        self.opt.second_step()
        self.steps += 1

    def final_weights(self) -> torch.Tensor:
        """The weights to verify, as one float32 vector: the float32 masters when the optimizer keeps them."""
        state = self.opt.state_dict()["state"] if isinstance(self.opt, FusedSAM) else {}
        masters = {i: s["sam_master_weight"] for i, s in state.items() if "sam_master_weight" in s}
        tensors = [masters[i] for i in sorted(masters)] if masters else self.params
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def held_tensors(self) -> List[torch.Tensor]:
        return self._held(self.opt)

    @property
    def checks_gradients(self) -> bool:
        """Whether a step reads every gradient once more to decide whether to skip its update (FusedSAM's
        skip_nonfinite guard): the minimum-bytes model charges it."""
        return isinstance(self.opt, FusedSAM) and self.opt.skip_nonfinite


class _GradScaled(_Wrapped):
    """FusedSAM whose second step a GradScaler takes (scale 1, never growing: the numbers stay plain)."""

    def __init__(self, opt, params, info, held):
        super().__init__(opt, params, info, held)
        self.scaler = torch.amp.GradScaler(params[0].device.type, init_scale=1.0, growth_interval=2**30)
        self.scaler.scale(torch.ones((), device=params[0].device))  # creates the scale tensor

    checks_gradients = True  # GradScaler's inf check

    def first_step(self) -> None:
        self.opt.first_step(grad_scaler=self.scaler)

    def second_step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()
        self.steps += 1


def _optimizer_state_tensors(opt: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _fused_held(opt: FusedSAM) -> List[torch.Tensor]:
    held = []
    for segment in opt._sam.segments:  # the flat buffers: weights, grads, backup or master, state (with padding)
        restore_point = segment.backup if segment.master is None else segment.master
        held += [segment.weights, segment.grads, restore_point] + list(segment.state.values())
    return held


def method_names(device: torch.device, dtype: torch.dtype, only: Optional[Sequence[str]] = None) -> List[str]:
    """The methods to run on this device and dtype: classic, torch-native, fused:<each available backend>.

    Triton's interpreter (TRITON_INTERPRET=1, used by the tests on machines without a GPU) is not a speed
    measurement, so the triton backend is left out on CPU unless asked for by name.
    """
    from ..backends import available_backends

    names = ["classic", "torch-native"]
    for backend in available_backends(device, dtype):
        if backend == "triton" and device.type != "cuda" and not (only and "fused:triton" in only):
            continue
        names += [f"fused:{backend}", f"fused:{backend}+GradScaler", f"fused:{backend}+capturable"]
        if dtype in (torch.bfloat16, torch.float16) and backend in available_backends(device, dtype, master=True):
            names.append(f"fused:{backend}+master")
    if only:
        low_precision = dtype in (torch.bfloat16, torch.float16)
        unknown = [m for m in only if m not in names and (low_precision or not m.endswith("+master"))]
        if unknown:
            raise ValueError(f"method(s) {', '.join(unknown)} not available here; available: {', '.join(names)}")
        names = [m for m in names if m in only]
    return names


def default_method_names(device: torch.device, dtype: torch.dtype) -> List[str]:
    """What ``fused-sam bench`` times without --full or --methods: classic SAM, the best stock-PyTorch SAM,
    and FusedSAM with the backend ``backend="auto"`` picks for this device and dtype."""
    from ..backends import resolve_backend

    return ["classic", "torch-native", f"fused:{resolve_backend('auto', torch.device(device), dtype).name}"]


def build(name: str, params: Sequence[torch.Tensor], optimizer: str):
    """A method over ``params`` (tensors with ``.grad`` set) with the base optimizer ``optimizer``."""
    base_cls, kwargs = OPTIMIZERS[optimizer]
    params = list(params)
    if name == "classic":
        opt = ClassicSAM(params, base_cls, rho=RHO, perturb_eps=SAM_EPS, **kwargs)
        # foreach=None: torch.optim picks foreach on CUDA and its per-tensor for-loop on CPU.
        impl = "foreach" if params[0].device.type == "cuda" else "for-loop"
        info = {"base": f"{base_cls.__name__}(default: {impl})"}
        return _Wrapped(opt, params, info, lambda o: _optimizer_state_tensors(o.base_optimizer))
    if name == "torch-native":
        return TorchNativeSAM(params, base_cls, **kwargs)
    if name.startswith("fused:"):
        backend, variant = (name.split(":", 1)[1].split("+") + [""])[:2]
        scaled = variant == "GradScaler"
        if variant == "capturable":  # lr and rho where a CUDA graph reads them
            on_device = dict(device=params[0].device, dtype=torch.float64)
            kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"], **on_device), rho=torch.tensor(RHO, **on_device),
                          capturable=True)
        opt = FusedSAM(params, base_cls, **{"rho": RHO, **kwargs}, backend=backend,
                       master_weights=variant == "master")  # SAM eps: its default, 1e-12
        info = {"base": base_cls.__name__, "backends": opt.backends}
        return (_GradScaled if scaled else _Wrapped)(opt, params, info, _fused_held)
    raise ValueError(f"unknown method {name!r}")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
