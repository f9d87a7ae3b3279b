"""SAM telemetry (``FusedSAM(..., telemetry=True)``) against independent computations.

On a quadratic loss L = 1/2 w'Aw - b'w every field has a closed form (g2 - g1 = A e, so the curvature is
e'Ae / |e|^2 exactly), computed here in float64 from the formulas of the SAM paper; on a small MLP the
curvature converges to the Hessian's Rayleigh quotient along e (autograd's Hessian-vector product) linearly
in rho. Telemetry must not change a single bit of the training, and every backend must agree with the
reference.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fused_sam import FusedSAM, available_backends, telemetry
from fused_sam.telemetry import FIELDS
from fused_sam.variants import Every, LookSAM, MomentumSAM

from models import batches, loss_of, mlp

BACKENDS = available_backends("cpu", torch.float64)
RHOS = (0.07, 0.02)  # two param groups, each its own rho
SETTINGS = {
    "sam": dict(),
    "asam": dict(adaptive=True, eta=0.01),
    "usam": dict(normalize=False),
}
BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01)),  # not fused: the sums come from the reference
}


class Quadratic:
    """L(w) = 1/2 w'Aw - b'w over the concatenation of two parameters (5 and 3 elements), float64."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        self.a = m @ m.T / 8 + torch.eye(8, dtype=torch.float64)
        self.b = torch.randn(8, generator=gen, dtype=torch.float64)
        self.params = [nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64)),
                       nn.Parameter(torch.randn(3, 1, generator=gen, dtype=torch.float64))]

    def loss_at(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * w @ self.a @ w - self.b @ w

    def loss(self) -> torch.Tensor:
        return self.loss_at(torch.cat([p.reshape(-1) for p in self.params]))

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def expected_fields(q: Quadratic, setting: dict, eps: float = 1e-12) -> dict:
    """Every telemetry field of a SAM step from the current weights, from the paper's formulas."""
    w = q.flat()
    g1 = q.a @ w - q.b
    rho = torch.tensor([RHOS[0]] * 5 + [RHOS[1]] * 3, dtype=torch.float64)
    t = w.abs() + setting["eta"] if setting.get("adaptive") else torch.ones_like(w)
    norm = (t * g1).norm()
    e = rho * t.square() * g1
    if setting.get("normalize", True):
        e = e / (norm + eps)
    g2 = q.a @ (w + e) - q.b
    return dict(grad_norm=norm, sam_grad_norm=g2.norm(), perturbation_norm=e.norm(), directional_derivative=e @ g1,
                curvature=(e @ q.a @ e) / (e @ e), cosine=(e @ g2) / (e.norm() * g2.norm()),
                loss_gap=q.loss_at(w + e) - q.loss_at(w))


def assert_fields(got: dict, expected: dict, tol: float) -> None:
    for name in FIELDS:
        want = float(expected[name])
        assert got[name] == pytest.approx(want, rel=tol, abs=tol), f"{name}: {got[name]!r} vs {want!r}"


@pytest.fixture(params=["host", "device"])
def record_math(request, monkeypatch):
    """The record's formula evaluated on the host (a CPU's path) or with device ops (a GPU's path)."""
    monkeypatch.setattr(telemetry, "HOST_MATH_ON_CPU", request.param == "host")


def quadratic_opt(q: Quadratic, backend: str, setting: dict, base: str = "sgd", **kwargs) -> FusedSAM:
    cls, base_kwargs = BASES[base]
    groups = [{"params": [q.params[0]], "rho": RHOS[0]}, {"params": [q.params[1]], "rho": RHOS[1]}]
    return FusedSAM(groups, cls, telemetry=True, backend=backend, **setting, **base_kwargs, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.usefixtures("record_math")
def test_every_field_is_its_closed_form_on_a_quadratic(backend, setting):
    q = Quadratic()
    opt = quadratic_opt(q, backend, SETTINGS[setting])
    assert opt.telemetry() is None
    for step in range(3):
        expected = expected_fields(q, SETTINGS[setting])
        opt.step(lambda: (opt.zero_grad(), q.loss().backward(), q.loss().detach())[-1])
        got = opt.telemetry()
        assert got["step"] == step
        assert_fields(got, expected, 1e-10)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.usefixtures("record_math")
def test_every_base_and_the_two_call_api(base):
    """first_step(loss=...) / second_step(loss=...) give the loss gap; without them it is None."""
    q = Quadratic(1)
    opt = quadratic_opt(q, "auto", {}, base)
    for with_losses in (True, False):
        expected = expected_fields(q, {})
        loss = q.loss()
        loss.backward()
        opt.first_step(zero_grad=True, loss=loss if with_losses else None)
        perturbed_loss = q.loss()
        perturbed_loss.backward()
        opt.second_step(zero_grad=True, loss=perturbed_loss if with_losses else None)
        got = opt.telemetry()
        if with_losses:
            assert_fields(got, expected, 1e-10)
        else:
            assert got["loss_gap"] is None
            expected["loss_gap"] = None
            assert_fields({**got, "loss_gap": 0.0}, {**expected, "loss_gap": 0.0}, 1e-10)


def closure_of(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    return closure


def _train(backend: str, telemetry: bool, dtype=torch.float32, base="adamw", steps=4, **kwargs):
    model = mlp(dtype)
    cls, base_kwargs = BASES[base]
    opt = FusedSAM(model.parameters(), cls, rho=0.05, backend=backend, telemetry=telemetry, **base_kwargs, **kwargs)
    records = []
    for x, y in batches(model, steps, dtype):
        opt.step(closure_of(opt, model, x, y))
        records.append(opt.telemetry() if telemetry else None)
    state = [t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in model.parameters()], state, records


@pytest.mark.parametrize("backend", available_backends("cpu", torch.float32))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_telemetry_changes_no_bit_of_training_and_backends_agree(backend, base):
    off_weights, off_state, _ = _train(backend, False, base=base)
    on_weights, on_state, records = _train(backend, True, base=base)
    for a, b in zip(off_weights + off_state, on_weights + on_state):
        assert torch.equal(a, b)
    _, _, reference = _train("reference", True, base=base)
    for got, want in zip(records, reference):
        assert got["step"] == want["step"]
        assert_fields(got, want, 1e-4)  # float32 sums in each backend's own order


def hvp_rayleigh_quotient(model, x, y, e: list) -> float:
    """e'He / |e|^2 at the model's weights, H from autograd's double backward."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_of(model, x, y), params, create_graph=True)
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, e)), params)
    return float(sum((v * h).sum() for v, h in zip(e, hv)) / sum((v * v).sum() for v in e))


def test_curvature_converges_to_the_hessian_rayleigh_quotient_linearly_in_rho():
    x, y = next(batches(mlp(), 1, torch.float64, seed=3))
    errors = []
    for rho in (4e-2, 2e-2, 1e-2):
        model = mlp(torch.float64)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, rho=rho, telemetry=True, backend="reference")
        loss_of(model, x, y).backward()
        g1 = [p.grad.detach().clone() for p in model.parameters()]
        norm = math.sqrt(sum(float((g * g).sum()) for g in g1))
        e = [rho * g / (norm + opt.perturb_eps) for g in g1]
        exact = hvp_rayleigh_quotient(model, x, y, e)
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        errors.append(abs(opt.telemetry()["curvature"] - exact))
    # O(rho): halving rho halves the error (a third-order term), to within the next order
    for bigger, smaller in zip(errors, errors[1:]):
        assert 1.6 < bigger / smaller < 2.4, errors
    assert errors[-1] < 0.05 * abs(exact), (errors, exact)


@pytest.mark.usefixtures("record_math")
def test_grad_scaler_measures_the_unscaled_gradients_and_a_skipped_step_records_nothing():
    def run(scaled: bool, first_knows_scale: bool = True):
        q = Quadratic(2)
        opt = quadratic_opt(q, "auto", {})
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12) if scaled else None
        records = []
        for step in range(3):
            loss = q.loss()
            (scaler.scale(loss) if scaled else loss).backward()
            if scaled:
                opt.first_step(zero_grad=True, grad_scaler=scaler if first_knows_scale else None, loss=loss)
            else:
                opt.first_step(zero_grad=True, loss=loss)
            perturbed = q.loss()
            if scaled:
                scaler.scale(perturbed).backward()
                if step == 2:  # an overflow at w + e: GradScaler skips the update
                    q.params[0].grad[0] = float("inf")
                scaler.step(opt, loss=perturbed)
                scaler.update()
            else:
                perturbed.backward()
                opt.second_step(loss=perturbed)
            opt.zero_grad()
            records.append(opt.telemetry())
        return records

    plain = run(False)
    scaled = run(True)
    for got, want in zip(scaled[:2], plain[:2]):
        assert_fields(got, want, 1e-12)
    assert scaled[2] == scaled[1]  # skipped: the record of step 1 stays
    assert scaled[1]["step"] == 1
    # first_step without the scaler: the norm and e.g1 are unscaled at the second step, e differs from the
    # unscaled run's by perturb_eps / ||g|| (relatively)
    for got, want in zip(run(True, first_knows_scale=False)[:2], plain[:2]):
        assert_fields(got, want, 1e-9)


@pytest.mark.usefixtures("record_math")
def test_a_nonfinite_first_gradient_records_nothing():
    q = Quadratic(3)
    opt = quadratic_opt(q, "auto", {})
    opt.step(lambda: (opt.zero_grad(), q.loss().backward(), q.loss().detach())[-1])
    first = opt.telemetry()
    q.loss().backward()
    q.params[1].grad[0, 0] = float("nan")
    opt.first_step(zero_grad=True)
    q.loss().backward()
    opt.second_step(zero_grad=True)
    assert opt.nonfinite_steps == 1 and opt.telemetry() == first


def test_variants_record_their_sam_steps_only():
    records = {}
    for name, variant in (("every", Every(2)), ("looksam", LookSAM(3)), ("momentum", MomentumSAM())):
        model = mlp(torch.float64)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05, variant=variant,
                       telemetry=True)
        steps = []
        for x, y in batches(model, 5, torch.float64):
            opt.step(closure_of(opt, model, x, y))
            record = opt.telemetry()
            steps.append(None if record is None else record["step"])
        records[name] = steps
    assert records["every"] == [0, 0, 2, 2, 4]
    assert records["looksam"] == [0, 0, 0, 3, 3]
    assert records["momentum"] == [None] * 5  # it perturbs along the momentum, never along g: nothing measured


def test_master_weights_measure_e_as_the_model_saw_it():
    torch.manual_seed(0)
    model = mlp(torch.bfloat16)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, rho=0.05, master_weights=True, telemetry=True)
    x, y = next(batches(model, 1, torch.bfloat16))
    masters = None
    loss_of(model, x, y).backward()
    masters = [p.detach().float().clone() for p in model.parameters()]  # at construction masters are the weights
    opt.first_step(zero_grad=True)
    seen = [p.detach().float().clone() for p in model.parameters()]
    loss_of(model, x, y).backward()
    g2 = [p.grad.float().clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    e = torch.cat([(s - m).reshape(-1) for s, m in zip(seen, masters)])
    g2 = torch.cat([g.reshape(-1) for g in g2])
    got = opt.telemetry()
    assert got["perturbation_norm"] == pytest.approx(float(e.double().norm()), rel=1e-5)
    assert got["sam_grad_norm"] == pytest.approx(float(g2.double().norm()), rel=1e-5)
    assert got["cosine"] == pytest.approx(float(e.double() @ g2.double() / (e.double().norm() * g2.double().norm())),
                                          rel=1e-5)


def test_device_tensors_without_a_sync_and_frozen_parameters_left_out():
    q = Quadratic(4)
    frozen = nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = FusedSAM([{"params": [q.params[0]], "rho": RHOS[0]}, {"params": [q.params[1], frozen], "rho": RHOS[1]}],
                   torch.optim.SGD, lr=0.05, momentum=0.9, telemetry=True)
    assert opt.telemetry(sync=False) is None
    expected = expected_fields(q, {})
    opt.step(lambda: (opt.zero_grad(), q.loss().backward(), q.loss().detach())[-1])
    lazy = opt.telemetry(sync=False)
    assert set(lazy) == {"step", *FIELDS}
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.dim() == 0 for v in lazy.values())
    assert_fields({k: float(v) for k, v in lazy.items()}, expected, 1e-10)
    assert torch.equal(frozen.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.usefixtures("record_math")
def test_capturable_records_the_same():
    def run(capturable):
        q = Quadratic(5)
        opt = quadratic_opt(q, "auto", {}, capturable=capturable)
        for _ in range(2):
            opt.step(lambda: (opt.zero_grad(), q.loss().backward(), q.loss().detach())[-1])
        return opt.telemetry()

    assert run(True) == run(False)


def test_refusals():
    opt = FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match=r"telemetry\(\) needs FusedSAM\(\.\.\., telemetry=True\)"):
        opt.telemetry()
    with pytest.raises(TypeError, match="telemetry must be True or False"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, telemetry="yes")
    q = Quadratic()
    opt = quadratic_opt(q, "auto", {})
    q.loss().backward()
    with pytest.raises(ValueError, match="loss must be a scalar"):
        opt.first_step(loss=torch.ones(2))


def _fsdp_records(rank: int, world_size: int, mesh_shape: tuple = ()) -> list:
    from test_distributed_fsdp import _sharded

    from distributed_harness import rank_part

    model = _sharded(torch.float64, mesh_shape)
    return _awkward_records(model, FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05,
                                            telemetry=True), rank, world_size, rank_part)


def _awkward_records(model, opt, rank, world_size, part) -> list:
    records = []
    for x, y in batches(model.layers, 3, torch.float64):
        x, y = part(x, y, rank, world_size)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        records.append(opt.telemetry())
    return records


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
@pytest.mark.parametrize("world_size,mesh_shape", [(2, ()), (4, (2, 2))], ids=["fsdp2", "hsdp-2x2"])
def test_fsdp2_measures_the_whole_model(tmp_path, world_size, mesh_shape):
    """Sharded over gloo ranks (HSDP: replicated over the first mesh dimension, its sums taken over the
    second only), every rank records what SAM on the unsharded model measures."""
    from test_distributed_fsdp import Awkward

    from distributed_harness import run_on_ranks

    results = run_on_ranks(_fsdp_records, (world_size, mesh_shape), tmp_path, world_size)
    model = Awkward(torch.float64)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05, telemetry=True)
    expected = _awkward_records(model, opt, 0, 1, lambda x, y, rank, world_size: (x, y))
    for records in results:
        for got, want in zip(records, expected):
            assert got["step"] == want["step"] and got["loss_gap"] is None
            assert_fields({**got, "loss_gap": 0.0}, {**want, "loss_gap": 0.0}, 1e-10)


def test_alternate_mode_records_what_the_paired_mode_does():
    def run(mode):
        q = Quadratic(6)
        opt = quadratic_opt(q, "auto", {}, mode=mode)
        records = []
        for _ in range(2):
            def closure():
                opt.zero_grad()
                loss = q.loss()
                loss.backward()
                return loss.detach()
            if mode == "alternate":
                opt.step(closure)
                opt.step(closure)
            else:
                opt.step(closure)
            records.append(opt.telemetry())
        return records

    paired, alternate = run("paired"), run("alternate")
    for got, want in zip(alternate, paired):
        assert got["loss_gap"] is not None
        assert_fields(got, want, 1e-12)


@pytest.mark.parametrize("base", ["sgd", "rmsprop"])
def test_a_parameter_without_a_second_gradient_counts_in_e_only(base):
    """Perturbed at w, no gradient at w + e: restored, not updated; its e is in |e|, not in e.g2 or |g2|."""
    q = Quadratic(7)
    opt = quadratic_opt(q, "auto", {}, base)
    w0 = q.flat()
    q.loss().backward()
    opt.first_step(zero_grad=True)
    e = q.flat() - w0
    (0.5 * q.params[0] @ q.params[0]).backward()  # a second gradient for the first parameter only
    g2 = torch.cat([q.params[0].grad.detach(), torch.zeros(3, dtype=torch.float64)])
    opt.second_step(zero_grad=True)
    got = opt.telemetry()
    assert got["perturbation_norm"] == pytest.approx(float(e.norm()), rel=1e-10)
    assert got["sam_grad_norm"] == pytest.approx(float(g2.norm()), rel=1e-10)
    assert got["cosine"] == pytest.approx(float(e @ g2 / (e.norm() * g2.norm())), rel=1e-10)
    assert torch.equal(q.flat()[5:], w0[5:])  # restored exactly, not updated


def test_float32_curvature_sees_one_e_through_both_gradients():
    """With large gradients e.g2 - e.g1 is a small part of either: both taken with e as the float32 weights
    hold it, the curvature is the float64 value of the same float32 quantities (an e.g1 from the unrounded
    e would be off by its rounding, here 0.7%)."""
    q = Quadratic(8)
    q.b = q.b * 500
    params = [nn.Parameter(p.detach().float()) for p in q.params]
    loss_of_w = lambda: 0.5 * (w := torch.cat([p.reshape(-1) for p in params])) @ q.a.float() @ w - q.b.float() @ w
    for backend in available_backends("cpu", torch.float32):
        for p, init in zip(params, q.params):
            p.data.copy_(init.detach())
        opt = FusedSAM([{"params": params}], torch.optim.SGD, lr=0.0, rho=0.05, telemetry=True, backend=backend)
        w0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
        loss_of_w().backward()
        g1 = torch.cat([p.grad.reshape(-1) for p in params]).double()
        opt.first_step(zero_grad=True)
        e = torch.cat([p.detach().reshape(-1) for p in params]).double() - w0
        loss_of_w().backward()
        g2 = torch.cat([p.grad.reshape(-1) for p in params]).double()
        opt.second_step(zero_grad=True)
        expected = float(e @ (g2 - g1) / (e @ e))
        assert float(e @ g1) > 1e3 * abs(float(e @ (g2 - g1)))  # the cancellation this test is about
        # float32 partial sums: ~5e-4 here; an e.g1 of the unrounded e: 7e-3
        assert opt.telemetry()["curvature"] == pytest.approx(expected, rel=2e-3), backend
