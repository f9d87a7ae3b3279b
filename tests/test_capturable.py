"""capturable=True on the CPU: the kernels read lr and rho from device tensors (the per-step path a CUDA
graph replays) and must give what the float path gives, bit for bit, over a scheduled run; the settings
a captured graph cannot honour are refused. The capture itself is tested on a GPU (test_capturable_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from fused_sam import FusedSAM, available_backends

from models import batches, loss_of, mlp

STEPS = 50
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True)),
}
DTYPES = {"reference": torch.float64, "native": torch.float64, "torch": torch.float64, "triton": torch.float32}
BACKENDS = [b for b in ("reference", "native", "torch", "triton") if b in available_backends("cpu", DTYPES[b])]


def scheduled_run(backend: str, base: str, capturable: bool, lr_kind: str, rho_kind: str = "float") -> list:
    """STEPS SAM steps under OneCycleLR (which also cycles momentum / beta1). lr_kind: 'float', or
    'tensor' (a float64 tensor the scheduler writes with fill_); rho_kind likewise."""
    dtype = DTYPES[backend]
    steps = STEPS if backend != "triton" else 12  # the triton interpreter is slow
    model = mlp(dtype)
    cls, kwargs = BASES[base]
    kwargs = dict(kwargs)
    if lr_kind == "tensor":
        kwargs["lr"] = torch.tensor(kwargs["lr"], dtype=torch.float64)
    rho = torch.tensor(0.05, dtype=torch.float64) if rho_kind == "tensor" else 0.05
    opt = FusedSAM(model.parameters(), cls, rho=rho, backend=backend, capturable=capturable, **kwargs)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1 if "sgd" in base else 2e-2, total_steps=steps)
    for x, y in batches(model, steps, dtype):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        schedule.step()
    return [p.detach().clone() for p in model.parameters()] + [
        value.clone() for state in opt.state.values() for value in state.values()
    ]


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_matches_the_float_path_bitwise(backend, base):
    """A float64 tensor lr that OneCycleLR fills in place, a tensor rho, and a Python float lr copied to the
    device before each step: all bit for bit the capturable=False run with float lr. OneCycleLR changes lr
    at every step, so kernels that missed the in-place writes would end elsewhere."""
    expected = scheduled_run(backend, base, capturable=False, lr_kind="float")
    for lr_kind, rho_kind in (("tensor", "tensor"), ("float", "float")):
        result = scheduled_run(backend, base, capturable=True, lr_kind=lr_kind, rho_kind=rho_kind)
        assert all(map(torch.equal, result, expected)), (lr_kind, rho_kind)


def test_settings_a_graph_cannot_honour_are_refused():
    params = list(mlp().parameters())
    with pytest.raises(ValueError, match="capturable=True needs mode='paired'"):
        FusedSAM(params, torch.optim.SGD, lr=0.1, capturable=True, mode="alternate")
    with pytest.raises(ValueError, match="capturable=True needs a fused base optimizer"):
        FusedSAM(mlp().parameters(), torch.optim.RMSprop, lr=0.1, capturable=True)
    with pytest.raises(TypeError, match="capturable must be True or False"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, capturable=1)
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=torch.tensor(0.05))
    x, y = next(batches(model, 1))
    loss_of(model, x, y).backward()
    with pytest.raises(ValueError, match="rho of param group 0 is a tensor: that needs .*capturable=True"):
        opt.first_step()
    with pytest.raises(ValueError, match="rho must be a number or a one-element floating tensor"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, rho=torch.tensor([0.05, 0.1]), capturable=True)


@pytest.mark.slow
def test_torch_compile_of_a_sam_training_step_matches_eager():
    """torch.compile runs a whole SAM training step: Dynamo breaks the graph at each backward() and at
    FusedSAM's steps (run eagerly between the compiled pieces), and the result is eager's to rounding.
    (With mode="reduce-overhead" on a GPU only the compiled pieces become CUDA graphs; see README.)"""
    compiled_model, eager_model = mlp(), mlp()

    def make_step(model):
        opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=torch.tensor(1e-2, dtype=torch.float64),
                       rho=torch.tensor(0.05, dtype=torch.float64), capturable=True, backend="reference")

        def train_step(x, y):
            loss = loss_of(model, x, y)
            loss.backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
            return loss

        return train_step

    compiled, eager = torch.compile(make_step(compiled_model)), make_step(eager_model)
    for x, y in batches(eager_model, 4):
        torch.testing.assert_close(compiled(x, y), eager(x, y))
    for p, q in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
