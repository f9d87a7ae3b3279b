"""Twin-model parity: FusedSAM against the classic per-tensor SAM with torch.optim's own base step."""
from __future__ import annotations

import copy

import pytest
import torch

from fused_sam import FusedSAM
from fused_sam.classic import ClassicSAM

from models import batches, conv_net, loss_of, mlp, sam_train

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "sgd-dampening-maximize": (torch.optim.SGD, dict(lr=0.01, momentum=0.5, dampening=0.2, maximize=True)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True, betas=(0.8, 0.99))),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
    "rmsprop-fallback": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def assert_twins_close(model_a, model_b, dtype):
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def run_twins(make_model, base, sam_kwargs, dtype, steps=20, groups=None, closure_api=False):
    cls, kwargs = BASES[base]
    classic_model = make_model(dtype)
    fused_model = copy.deepcopy(classic_model)
    params_of = groups or (lambda m: m.parameters())
    classic = ClassicSAM(params_of(classic_model), cls, **sam_kwargs, **kwargs)
    fused = FusedSAM(params_of(fused_model), cls, backend="reference", **sam_kwargs, **kwargs)
    sam_train(classic_model, classic, steps, dtype)
    sam_train(fused_model, fused, steps, dtype, closure_api=closure_api)
    assert_twins_close(classic_model, fused_model, dtype)
    return fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
def test_mlp_matches_classic(base, adaptive, dtype):
    run_twins(mlp, base, dict(rho=0.05, adaptive=adaptive), dtype)


@pytest.mark.parametrize("base", ["sgd-momentum-wd", "sgd-nesterov", "adamw", "adam-amsgrad"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_conv_batchnorm_matches_classic(base, adaptive):
    run_twins(conv_net, base, dict(rho=0.05, adaptive=adaptive), torch.float32)


@pytest.mark.parametrize("sam_kwargs", [
    dict(rho=0.5, adaptive=True, eta=0.01),   # ASAM paper's form
    dict(rho=0.05, normalize=False),          # USAM
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asam_eta_and_usam_match_classic(sam_kwargs, dtype):
    run_twins(mlp, "sgd-momentum-wd", sam_kwargs, dtype)


@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adamw-amsgrad"])
def test_param_groups_with_their_own_lr_and_rho(base):
    lr = BASES[base][1]["lr"]

    def groups(m):
        return [
            {"params": list(m[0].parameters()), "lr": 2 * lr, "rho": 0.1},
            {"params": list(m[2].parameters()), "rho": 0.01, "adaptive": True},
            {"params": list(m[4].parameters()), "weight_decay": 0.0},
        ]
    run_twins(mlp, base, dict(rho=0.05), torch.float32, groups=groups)


def test_step_with_closure_matches_two_calls_and_returns_loss():
    fused = run_twins(mlp, "sgd-momentum-wd", dict(rho=0.05), torch.float32, closure_api=True)
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = torch.randn(4, 10), torch.randint(0, 3, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    loss = opt.step(lambda: (lambda out: (out.backward(), out)[1])(torch.nn.functional.cross_entropy(model(x), y)))
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert fused.nonfinite_steps == 0


def test_frozen_parameter_is_neither_perturbed_nor_updated():
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-2)
    classic = ClassicSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-2)
    sam_train(model, fused, 5)
    sam_train(twin, classic, 5)
    assert torch.equal(model[0].weight, frozen)
    assert_twins_close(twin, model, torch.float32)


def test_thousand_tiny_tensors_match_classic():
    torch.manual_seed(0)
    shapes = [(1,), (3,), (17,), (2, 5)] * 250
    fused_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    classic_params = [torch.nn.Parameter(p.detach().clone()) for p in fused_params]
    fused = FusedSAM(fused_params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    classic = ClassicSAM(classic_params, torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    targets = [torch.randn(s) for s in shapes]
    for opt, params in ((fused, fused_params), (classic, classic_params)):
        for _ in range(3):
            for stage in (opt.first_step, opt.second_step):
                sum(((p - t) ** 2 * p).sum() for p, t in zip(params, targets)).backward()
                stage(zero_grad=True)
    for a, b in zip(fused_params, classic_params):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_channels_last_parameters_keep_their_layout():
    model = conv_net().to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    strides = [p.stride() for p in model.parameters()]
    fused = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    assert [p.stride() for p in model.parameters()] == strides
    classic = ClassicSAM(twin.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    sam_train(model, fused, 5)
    sam_train(twin, classic, 5)
    assert_twins_close(twin, model, torch.float32)
    loss_of(model, *next(batches(model, 1))).backward()  # into the flat buffer's views
    assert [p.grad.stride() for p in model.parameters()] == strides


def test_parameter_joining_late_gets_its_own_step_count():
    """A parameter frozen for the first steps starts Adam's bias correction at its own first update."""
    model, twin = mlp(), mlp()
    for m in (model, twin):
        m[2].weight.requires_grad_(False)
    fused = FusedSAM(model.parameters(), torch.optim.Adam, lr=1e-2)
    classic = ClassicSAM(twin.parameters(), torch.optim.Adam, lr=1e-2)
    for m, opt in ((model, fused), (twin, classic)):
        sam_train(m, opt, 2, seed=1)
        m[2].weight.requires_grad_(True)
        sam_train(m, opt, 3, seed=2)
    assert_twins_close(twin, model, torch.float32)
    steps = [s["step"].item() for s in fused.state_dict()["state"].values()]
    assert steps == [5, 5, 3, 5, 5, 5]
