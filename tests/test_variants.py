"""SAM variants (fused_sam.variants) against independent loops written here from the papers' formulas, on
twin float64 models: the reference loops use torch.optim's own base step and plain tensor math."""
from __future__ import annotations

import copy

import pytest
import torch

from fused_sam import FusedSAM, available_backends
from fused_sam.variants import Every, LookSAM, MomentumSAM, Randomly, WhenSharp

from models import batches, loss_of, mlp

STEPS = 30
RHO, EPS = 0.05, 1e-12
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop-unfused": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),  # runs its own step()
}
TOLERANCE = 1e-10


def grads_at(model, x, y):
    params = list(model.parameters())
    return list(torch.autograd.grad(loss_of(model, x, y), params))


def flat_dot(a, b):
    return sum((u * v).sum() for u, v in zip(a, b))


def reference_run(base: str, decide, looksam_alpha=None, steps=STEPS, observe=None) -> list:
    """decide(t) -> SAM or plain at step t. SAM: e = rho g / (||g|| + eps), g_s at w + e, update with g_s.
    Plain: update with g, or with LookSAM g + alpha ||g|| / ||g_v|| g_v (g_v from the last SAM step).
    observe(g): told each step's gradient at w, after the decision (AE-SAM)."""
    model = mlp(torch.float64)
    params = list(model.parameters())
    cls, kwargs = BASES[base]
    opt = cls(params, **kwargs)
    g_v = None
    for t, (x, y) in enumerate(batches(model, steps, torch.float64)):
        g = grads_at(model, x, y)
        sam_step = decide(t)
        if observe is not None:
            observe(g)
        if sam_step:
            norm = torch.sqrt(flat_dot(g, g))
            e = [RHO * gi / (norm + EPS) for gi in g]
            with torch.no_grad():
                torch._foreach_add_(params, e)
            g_s = grads_at(model, x, y)
            with torch.no_grad():
                torch._foreach_sub_(params, e)
            if looksam_alpha is not None:
                c = flat_dot(g, g_s) / flat_dot(g, g)
                g_v = [gs - c * gi for gs, gi in zip(g_s, g)]
            update = g_s
        elif looksam_alpha is not None and g_v is not None:
            coefficient = looksam_alpha * torch.sqrt(flat_dot(g, g)) / torch.sqrt(flat_dot(g_v, g_v))
            update = [gi + coefficient * v for gi, v in zip(g, g_v)]
        else:
            update = g
        for p, u in zip(params, update):
            p.grad = u
        opt.step()
    return [p.detach() for p in params]


def fused_run(base: str, variant, steps=STEPS, model=None, opt=None, start=0, backend="auto") -> tuple:
    model = model or mlp(torch.float64)
    cls, kwargs = BASES[base]
    opt = opt or FusedSAM(model.parameters(), cls, rho=RHO, perturb_eps=EPS, variant=variant, backend=backend,
                          **kwargs)
    for x, y in list(batches(model, start + steps, torch.float64))[start:]:
        loss_of(model, x, y).backward()
        if opt.sam_step_due:
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            opt.plain_step(zero_grad=True)
    return model, opt


def distance(a, b) -> float:
    return max((u.detach() - v.detach()).abs().max().item() for u, v in zip(a, b))


def draws(p: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda t: torch.rand((), generator=gen, dtype=torch.float64).item() < p


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", ["every-3", "randomly-0.4", "looksam-3", "looksam-4-alpha-1.5"])
def test_variant_matches_the_papers_formulas(name, base):
    variant, decide, alpha = {
        "every-3": (Every(3), lambda t: t % 3 == 0, None),
        "randomly-0.4": (Randomly(0.4, seed=7), draws(0.4, 7), None),
        "looksam-3": (LookSAM(3, alpha=0.7), lambda t: t % 3 == 0, 0.7),
        "looksam-4-alpha-1.5": (LookSAM(4, alpha=1.5), lambda t: t % 4 == 0, 1.5),
    }[name]
    model, _ = fused_run(base, variant)
    expected = reference_run(base, decide, alpha)
    assert distance(model.parameters(), expected) <= TOLERANCE
    # and it is neither SAM nor plain descent
    assert distance(expected, reference_run(base, lambda t: True)) > 1e-6
    assert distance(expected, reference_run(base, lambda t: False)) > 1e-6


FLOAT64_CPU_BACKENDS = [name for name in available_backends("cpu", torch.float64)]


@pytest.mark.parametrize("backend", FLOAT64_CPU_BACKENDS)
@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_fused_variants_on_every_backend(base, backend):
    """LookSAM's reuse update (g + c g_v added inside the update kernel) and MSAM's perturbation along the
    momentum (the backends' norm and perturb over the state buffers), on each backend, against the papers'
    loops."""
    model, _ = fused_run(base, LookSAM(3, alpha=0.7), backend=backend)
    assert distance(model.parameters(), reference_run(base, lambda t: t % 3 == 0, 0.7)) <= TOLERANCE
    expected_w, expected_perturbed = msam_reference(base)
    model, opt = fused_run(base, MomentumSAM(), backend=backend)
    assert distance(model.parameters(), expected_perturbed) <= TOLERANCE
    with opt.at_restore_point():
        assert distance(model.parameters(), expected_w) <= TOLERANCE


@pytest.mark.parametrize("base", list(BASES))
def test_degenerate_settings_are_sam_or_the_base_optimizer(base):
    sam, _ = fused_run(base, None)
    for variant in (Every(1), LookSAM(1), Randomly(1.0)):
        model, _ = fused_run(base, variant)
        assert all(map(torch.equal, model.parameters(), sam.parameters())), variant
    plain, _ = fused_run(base, Randomly(0.0))
    assert distance(plain.parameters(), reference_run(base, lambda t: False)) <= TOLERANCE


@pytest.mark.parametrize("variant", [Every(3), LookSAM(3), Randomly(0.5, seed=3)], ids=repr)
def test_resume_mid_interval_is_bitwise(variant, tmp_path):
    straight, _ = fused_run("adamw", copy.deepcopy(variant), steps=10)
    model, opt = fused_run("adamw", copy.deepcopy(variant), steps=4)  # 4: between two SAM steps for k=3
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = mlp(torch.float64, seed=5)
    resumed.load_state_dict(saved["model"])
    cls, kwargs = BASES["adamw"]
    fresh = FusedSAM(resumed.parameters(), cls, rho=RHO, perturb_eps=EPS, variant=copy.deepcopy(variant), **kwargs)
    fresh.load_state_dict(saved["opt"])
    fused_run("adamw", None, steps=6, model=resumed, opt=fresh, start=4)
    assert all(map(torch.equal, resumed.parameters(), straight.parameters()))


def test_step_with_closure_calls_it_as_often_as_the_variant_needs():
    """Classic convention (first backward already ran): a plain step calls no closure, a SAM step one.
    torch.optim's (nothing ran): one and two."""
    for backward_first, expected in ((True, [1, 0, 0, 1, 0, 0]), (False, [2, 1, 1, 2, 1, 1])):
        model = mlp(torch.float64)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, variant=Every(3))
        calls = []
        for x, y in batches(model, 6, torch.float64):
            count = [0]

            def closure():
                count[0] += 1
                opt.zero_grad()
                loss = loss_of(model, x, y)
                loss.backward()
                return loss

            if backward_first:
                loss_of(model, x, y).backward()
            opt.step(closure)
            opt.zero_grad()
            calls.append(count[0])
        assert calls == expected, (backward_first, calls)


def test_grad_scaler_takes_plain_steps_too():
    """GradScaler("cpu") with Every(2): scaler.step(opt) is the second step of SAM steps and the plain step
    of the others; with a power-of-two scale the run equals the unscaled one to rounding."""
    model = mlp(torch.float64)
    unscaled, _ = fused_run("sgd-momentum", Every(2), steps=8)
    cls, kwargs = BASES["sgd-momentum"]
    opt = FusedSAM(model.parameters(), cls, rho=RHO, perturb_eps=EPS, variant=Every(2), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for x, y in batches(model, 8, torch.float64):
        scaler.scale(loss_of(model, x, y)).backward()
        if opt.sam_step_due:
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(loss_of(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert distance(model.parameters(), unscaled.parameters()) <= TOLERANCE


def test_wrong_calls_and_settings_are_refused():
    model = mlp(torch.float64)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, variant=Every(2))
    x, y = next(batches(model, 1, torch.float64))
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="is a SAM step for Every"):
        opt.plain_step()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    loss_of(model, x, y).backward()
    with pytest.raises(RuntimeError, match="is not a SAM step for Every"):
        opt.first_step()
    with pytest.raises(ValueError, match="needs mode='paired'"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, variant=Every(2), mode="alternate")
    with pytest.raises(ValueError, match="LookSAM works with plain SAM"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, adaptive=True, variant=LookSAM(2))
    with pytest.raises(ValueError, match="positive integer"):
        Every(0)
    with pytest.raises(ValueError, match="probability"):
        Randomly(1.5)
    with pytest.raises(TypeError, match="variant must be"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, variant="looksam")


class AESAMReference:
    """AE-SAM as Jiang et al. 2023 write it: mean and variance of ||g||^2 as exponential moving averages;
    SAM when ||g||^2 >= mean + c_t * std, c_t linear over the run; here decided from the previous step."""

    def __init__(self, c_start, c_end, total_steps, delta):
        self.c_start, self.c_end, self.total_steps, self.delta = c_start, c_end, total_steps, delta
        self.mean = self.variance = 0.0
        self.seen, self.decision, self.decisions = 0, None, []

    def decide(self, t):
        due = True if self.decision is None else self.decision
        self.decisions.append(due)
        return due

    def observe(self, g):
        n = float(flat_dot(g, g))
        self.mean = self.mean * self.delta + (1 - self.delta) * n
        self.variance = self.variance * self.delta + (1 - self.delta) * (n - self.mean) ** 2
        c = self.c_start + (self.c_end - self.c_start) * min(self.seen, self.total_steps) / self.total_steps
        self.decision = n >= self.mean + c * self.variance ** 0.5
        self.seen += 1


@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_when_sharp_matches_ae_sam(base):
    settings = dict(c_start=-1.0, c_end=1.0, total_steps=STEPS, delta=0.9)
    reference = AESAMReference(**settings)
    expected = reference_run(base, reference.decide, observe=reference.observe)
    assert 3 <= sum(reference.decisions) <= STEPS - 3, reference.decisions  # both kinds of step happen
    model, _ = fused_run(base, WhenSharp(**settings))
    assert distance(model.parameters(), expected) <= TOLERANCE


def test_when_sharp_resumes_bitwise_and_refuses_asam(tmp_path):
    settings = dict(c_start=-1.0, c_end=1.0, total_steps=10, delta=0.9)
    straight, _ = fused_run("adamw", WhenSharp(**settings), steps=10)
    model, opt = fused_run("adamw", WhenSharp(**settings), steps=5)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    resumed = mlp(torch.float64, seed=5)
    resumed.load_state_dict(saved["model"])
    cls, kwargs = BASES["adamw"]
    fresh = FusedSAM(resumed.parameters(), cls, rho=RHO, perturb_eps=EPS, variant=WhenSharp(**settings), **kwargs)
    fresh.load_state_dict(saved["opt"])
    fused_run("adamw", None, steps=5, model=resumed, opt=fresh, start=5)
    assert all(map(torch.equal, resumed.parameters(), straight.parameters()))
    with pytest.raises(ValueError, match="WhenSharp \\(AE-SAM\\) works with plain SAM"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, adaptive=True, variant=WhenSharp())


def msam_reference(base: str, steps=STEPS) -> tuple:
    """MSAM as Becker et al. 2024 write it: the gradient at w~ = w - rho v / ||v||, then the base step from
    w; v is SGD's momentum buffer (Adam: its first moment) after that step. Returns (w, w~) at the end."""
    model = mlp(torch.float64)
    params = list(model.parameters())
    cls, kwargs = BASES[base]
    opt = cls(params, **kwargs)
    name = "momentum_buffer" if cls is torch.optim.SGD else "exp_avg"
    w = [p.detach().clone() for p in params]
    for x, y in batches(model, steps, torch.float64):
        g = grads_at(model, x, y)  # at w~ (w itself on the first step: v = 0)
        with torch.no_grad():
            for p, wi, gi in zip(params, w, g):
                p.copy_(wi)
                p.grad = gi
        opt.step()
        v = [opt.state[p][name] for p in params]
        scale = RHO / (torch.sqrt(flat_dot(v, v)) + EPS)
        w = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, vi in zip(params, v):
                p.sub_(scale * vi)
    return w, [p.detach() for p in params]


@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_momentum_sam_matches_msam(base):
    expected_w, expected_perturbed = msam_reference(base)
    model, opt = fused_run(base, MomentumSAM())
    assert distance(model.parameters(), expected_perturbed) <= TOLERANCE  # the model holds w~
    with opt.at_restore_point():
        assert distance(model.parameters(), expected_w) <= TOLERANCE
    assert distance(model.parameters(), expected_perturbed) <= TOLERANCE  # and again after the block
    assert distance(expected_w, reference_run(base, lambda t: False)) > 1e-6  # not plain descent


def test_momentum_sam_resumes_bitwise_and_refuses_what_it_cannot_do(tmp_path):
    straight, _ = fused_run("sgd-momentum", MomentumSAM(), steps=10)
    model, opt = fused_run("sgd-momentum", MomentumSAM(), steps=5)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})  # the model holds w~
    resumed = mlp(torch.float64, seed=5)
    resumed.load_state_dict(saved["model"])
    cls, kwargs = BASES["sgd-momentum"]
    fresh = FusedSAM(resumed.parameters(), cls, rho=RHO, perturb_eps=EPS, variant=MomentumSAM(), **kwargs)
    fresh.load_state_dict(saved["opt"])
    fused_run("sgd-momentum", None, steps=5, model=resumed, opt=fresh, start=5)
    assert all(map(torch.equal, resumed.parameters(), straight.parameters()))
    with pytest.raises(ValueError, match="SGD with momentum > 0"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, variant=MomentumSAM())
    with pytest.raises(ValueError, match="needs a fused base optimizer"):
        FusedSAM(mlp().parameters(), torch.optim.RMSprop, lr=0.1, variant=MomentumSAM())
    with pytest.raises(ValueError, match="float32 and float64 parameters, not torch.bfloat16"):
        FusedSAM(mlp().to(torch.bfloat16).parameters(), torch.optim.AdamW, lr=0.1, variant=MomentumSAM())


def test_looksam_with_bf16_master_weights_follows_the_float32_run():
    """The reuse step's 16-bit path (bf16 gradients, float32 g_v): the bf16 run stays nearer the float32
    LookSAM run than the float32 run without the reuse (Every(3)) is, so the reused part is applied."""
    def run(dtype, master, variant):
        model = mlp(dtype)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9, master_weights=master,
                       variant=variant)
        for x, y in batches(model, 12, torch.float32):
            loss_of(model, x.to(dtype), y).backward()
            if opt.sam_step_due:
                opt.first_step(zero_grad=True)
                loss_of(model, x.to(dtype), y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.plain_step(zero_grad=True)
        return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])

    float32 = run(torch.float32, False, LookSAM(3, alpha=1.0))
    bf16 = run(torch.bfloat16, True, LookSAM(3, alpha=1.0))
    without_reuse = run(torch.float32, False, Every(3))
    assert torch.isfinite(bf16).all()
    assert (bf16 - float32).norm() < 0.5 * (without_reuse - float32).norm()
