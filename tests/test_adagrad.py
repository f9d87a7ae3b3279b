"""Fused Adagrad (torch.optim.Adagrad) through FusedSAM: held to torch.optim.Adagrad itself (rho=0: no
perturbation, so each step is Adagrad's; float64 bit for bit), to the classic SAM class over torch.optim.Adagrad
(rho > 0), and its state to torch.optim's format. The kernels of every backend are held to the reference by the
backend harness (fused_sam.selfcheck.UPDATES holds Adagrad updates)."""
from __future__ import annotations

import copy

import pytest
import torch

from fused_sam import FusedSAM, available_backends
from fused_sam.classic import ClassicSAM
from fused_sam.variants import MomentumSAM

from models import batches, loss_of, mlp, sam_train

SETTINGS = {
    "default": dict(lr=1e-2),
    "decay-wd-init-eps-maximize": dict(lr=5e-2, lr_decay=1e-2, weight_decay=1e-2, initial_accumulator_value=0.1,
                                       eps=1e-6, maximize=True),
}
FLOAT64_BACKENDS = available_backends("cpu", torch.float64)
FLOAT32_BACKENDS = available_backends("cpu", torch.float32)


def adagrad_twins(backend, settings, dtype, steps=8):
    """(torch.optim.Adagrad's model and optimizer, FusedSAM's with rho=0) after ``steps`` steps on the same
    batches from the same weights."""
    plain_model = mlp(dtype)
    fused_model = copy.deepcopy(plain_model)
    plain = torch.optim.Adagrad(plain_model.parameters(), **settings)
    fused = FusedSAM(fused_model.parameters(), torch.optim.Adagrad, rho=0.0, backend=backend, **settings)
    for x, y in batches(plain_model, steps, dtype):
        plain.zero_grad()
        loss_of(plain_model, x, y).backward()
        plain.step()
        loss_of(fused_model, x, y).backward()
        fused.first_step(zero_grad=True)
        loss_of(fused_model, x, y).backward()
        fused.second_step(zero_grad=True)
    return (plain_model, plain), (fused_model, fused)


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("backend", [name for name in FLOAT64_BACKENDS if name in ("reference", "torch")])
def test_float64_steps_are_torch_optim_adagrads_bit_for_bit(backend, settings):
    """The backends whose Adagrad is torch's own operations (addcmul_, sqrt, add_, addcdiv) in torch.optim's
    order: its bits."""
    (plain_model, plain), (fused_model, fused) = adagrad_twins(backend, SETTINGS[settings], torch.float64)
    for p, q in zip(plain_model.parameters(), fused_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(plain.state[p]["sum"], fused.state[q]["sum"])
        assert float(plain.state[p]["step"]) == float(fused.state[q]["step"]) == 8


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("backend", [name for name in FLOAT64_BACKENDS if name not in ("reference", "torch")])
def test_float64_steps_of_the_kernels_match_torch_optim_adagrad(backend, settings):
    """The compiled kernels round sum + d * d as written (CPU and CUDA alike), where torch's AVX2 addcmul_ fuses
    it into one multiply-add: the last bit of the sum may differ, so float64 agreement to 1e-10."""
    (plain_model, plain), (fused_model, fused) = adagrad_twins(backend, SETTINGS[settings], torch.float64)
    for p, q in zip(plain_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fused.state[q]["sum"], plain.state[p]["sum"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_float32_steps_match_torch_optim_adagrad(backend, settings):
    (plain_model, plain), (fused_model, fused) = adagrad_twins(backend, SETTINGS[settings], torch.float32, steps=5)
    for p, q in zip(plain_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.state[q]["sum"], plain.state[p]["sum"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_sam_over_adagrad_matches_the_classic_sam(backend):
    settings = SETTINGS["decay-wd-init-eps-maximize"]
    classic_model = mlp(torch.float64)
    fused_model = copy.deepcopy(classic_model)
    classic = ClassicSAM(classic_model.parameters(), torch.optim.Adagrad, rho=0.05, adaptive=True, **settings)
    fused = FusedSAM(fused_model.parameters(), torch.optim.Adagrad, rho=0.05, adaptive=True, backend=backend,
                     **settings)
    sam_train(classic_model, classic, 6, torch.float64)
    sam_train(fused_model, fused, 6, torch.float64)
    for p, q in zip(classic_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_continues_bit_for_bit():
    """Saved after 3 steps and loaded into a fresh FusedSAM, the run continues exactly as the unbroken one."""
    settings = SETTINGS["decay-wd-init-eps-maximize"]
    model = mlp(torch.float64)
    opt = FusedSAM(model.parameters(), torch.optim.Adagrad, rho=0.05, **settings)
    sam_train(model, opt, 3, torch.float64, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"step", "sum"} <= set(saved_opt["state"][0])
    sam_train(model, opt, 3, torch.float64, seed=2)
    resumed_model = mlp(torch.float64, seed=5)
    resumed_model.load_state_dict(saved_model)
    resumed = FusedSAM(resumed_model.parameters(), torch.optim.Adagrad, rho=0.05, **settings)
    resumed.load_state_dict(saved_opt)
    sam_train(resumed_model, resumed, 3, torch.float64, seed=2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["sum"], resumed.state[q]["sum"])


def test_torch_optim_adagrad_checkpoint_continues_as_sam():
    """A plain torch.optim.Adagrad run's state dict loads into FusedSAM and continues as the classic SAM class
    continues it from the same state."""
    settings = SETTINGS["decay-wd-init-eps-maximize"]
    model = mlp(torch.float64)
    plain = torch.optim.Adagrad(model.parameters(), **settings)
    for x, y in batches(model, 4, torch.float64):
        plain.zero_grad()
        loss_of(model, x, y).backward()
        plain.step()
    fused_model, classic_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = FusedSAM(fused_model.parameters(), torch.optim.Adagrad, rho=0.05, **settings)
    classic = ClassicSAM(classic_model.parameters(), torch.optim.Adagrad, rho=0.05, **settings)
    fused.load_state_dict(copy.deepcopy(plain.state_dict()))
    classic.base_optimizer.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert fused.state_dict()["state"][0]["step"] == 4
    sam_train(fused_model, fused, 4, torch.float64, seed=2)
    sam_train(classic_model, classic, 4, torch.float64, seed=2)
    for p, q in zip(classic_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_the_sum_starts_at_initial_accumulator_value_and_padding_at_zero():
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 5)]
    opt = FusedSAM(params, torch.optim.Adagrad, rho=0.05, initial_accumulator_value=0.25)
    for p in params:
        assert torch.equal(opt.state[p]["sum"], torch.full_like(p, 0.25))
    (segment,) = opt._sam.segments
    flat = segment.state["sum"]
    assert int((flat == 0.25).sum()) == 8 and int((flat == 0).sum()) == flat.numel() - 8


def test_unfused_settings_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="eps > 0"):
        FusedSAM(mlp().parameters(), torch.optim.Adagrad, rho=0.05, eps=0.0)
    with pytest.raises(ValueError, match="MomentumSAM needs a fused base optimizer with a momentum"):
        FusedSAM(mlp().parameters(), torch.optim.Adagrad, rho=0.05, variant=MomentumSAM())
