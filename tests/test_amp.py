"""FusedSAM under torch.amp.GradScaler, paired mode: ``scaler.step(opt)`` is SAM's second step.

Every run is held to an independent loop written here: the same model and batches, the losses scaled by a
scale tracked by hand (GradScaler's growth/backoff rules), the gradients unscaled by hand, the SAM math in
float64 over per-parameter tensors, a torch.optim base optimizer, and the skip decided by looking at the
unscaled gradients. Overflows are injected into the first pass, the second pass and both; a run is also
checked to be far from what a FusedSAM that forgot to unscale or to skip would compute.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from fused_sam import FusedSAM, available_backends

from models import loss_of, mlp

RHO = 0.1
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
SCALER = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=4)
BACKENDS = ["reference"] + [b for b in ("native", "torch", "triton") if b in available_backends("cpu", torch.float32)]
# step -> where an inf goes: into the gradient of the first pass, the second, or both
OVERFLOWS = {
    "none": {},
    "first": {3: "first", 11: "first"},
    "second": {2: "second", 9: "second", 10: "second"},
    "mixed": {1: "both", 5: "first", 6: "second", 13: "both"},
}


def snapshot(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def inject(model, where):
    if where:
        model[0].weight.grad[1, 2] = math.inf


def autocast_loss(dtype, device="cpu"):
    def loss(model, x, y):
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            return loss_of(model, x, y)
    return loss


class HandScaler:
    """GradScaler's rules, by hand: halve on an overflow, double after growth_interval clean steps."""

    def __init__(self):
        self.scale, self.clean = SCALER["init_scale"], 0

    def update(self, overflow):
        if overflow:
            self.scale, self.clean = self.scale * SCALER["backoff_factor"], 0
        else:
            self.clean += 1
            if self.clean == SCALER["growth_interval"]:
                self.scale, self.clean = self.scale * SCALER["growth_factor"], 0


def reference_run(net, batches, base, overflows, rho=RHO, normalize=True, clip=None, skip=True, unscale=True,
                  autocast=None):
    """The independent loop. skip=False / unscale=False: what a FusedSAM without those would do.
    Returns the model, the base optimizer, the scale after each step, the count of first-pass overflows
    and of base steps taken."""
    model = copy.deepcopy(net)
    cls, kwargs = BASES[base]
    opt = cls(model.parameters(), **kwargs)
    scaler, scales, first_overflows, taken = HandScaler(), [], 0, 0
    params = list(model.parameters())
    loss_fn = autocast_loss(autocast)

    def grads(x, y, where):
        model.zero_grad()
        (loss_fn(model, x, y) * scaler.scale).backward()
        inject(model, where)
        inv = 1.0 / scaler.scale if unscale else 1.0
        return [p.grad.double() * inv for p in params]

    for i, (x, y) in enumerate(batches):
        where = overflows.get(i, "")
        w = [p.detach().clone() for p in params]
        g = grads(x, y, where in ("first", "both"))
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        if normalize and not torch.isfinite(norm):
            first_overflows += 1
        else:
            factor = rho / (norm + 1e-12) if normalize else rho
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_((factor * t).to(p.dtype))
        g = grads(x, y, where in ("second", "both"))
        with torch.no_grad():
            for p, t in zip(params, w):
                p.copy_(t)
        overflow = not all(torch.isfinite(t).all() for t in g)
        for p, t in zip(params, g):
            p.grad = t.to(p.dtype)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if not (overflow and skip):
            opt.step()
            taken += 1
        scaler.update(overflow)
        scales.append(scaler.scale)
    return model, opt, scales, first_overflows, taken


def fused_run(net, batches, base, overflows, backend="reference", clip=None, autocast=None, pass_scaler=False,
              device="cpu", **sam_kwargs):
    """The loop users write (issue 10): scaled backward, first_step, scaled backward, scaler.step, update."""
    model = copy.deepcopy(net)
    cls, kwargs = BASES[base]
    opt = FusedSAM(model.parameters(), cls, rho=RHO, backend=backend, **kwargs, **sam_kwargs)
    scaler = torch.amp.GradScaler(device, **SCALER)
    scales = []

    loss_fn = autocast_loss(autocast, device)

    def backward(x, y, where):
        scaler.scale(loss_fn(model, x, y)).backward()
        inject(model, where)

    for i, (x, y) in enumerate(batches):
        where = overflows.get(i, "")
        w = snapshot(model)
        backward(x, y, where in ("first", "both"))
        opt.first_step(zero_grad=True, grad_scaler=scaler if pass_scaler else None)
        backward(x, y, where in ("second", "both"))
        if clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        assert not opt.perturbed
        if where in ("second", "both"):  # skipped: w restored exactly, not updated
            assert torch.equal(snapshot(model), w), f"the skipped step {i} moved the weights"
        scales.append(scaler.get_scale())
        opt.zero_grad()
    assert torch.isfinite(snapshot(model)).all()
    return model, opt, scales


def first_pass_overflows(overflows, steps):
    return sum(1 for i, where in overflows.items() if where in ("first", "both") and i < steps)


def assert_runs_match(fused, reference, first_overflows, tol=dict(rtol=1e-5, atol=1e-6)):
    """Same weights, optimizer state (step counts included: skipped steps not counted), scales and
    first-pass overflow count."""
    model, opt, scales = fused
    ref_model, ref_opt, ref_scales, ref_first, taken = reference
    assert scales == ref_scales
    assert opt.nonfinite_steps == ref_first == first_overflows
    torch.testing.assert_close(snapshot(model), snapshot(ref_model), **tol)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert float(mine["step"]) == taken
        for name, value in theirs.items():
            if name == "step":
                assert float(value) == taken
            else:
                torch.testing.assert_close(mine[name], value, **tol)


@pytest.mark.parametrize("overflows", list(OVERFLOWS))
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_second_step_matches_hand_unscaled_sam(backend, base, overflows):
    """50 steps with the scale growing (every 4 clean steps) and backing off (each overflow): weights,
    optimizer state and step counts, the scale trajectory and the count of first-pass overflows all equal
    the hand-unscaled loop's. A skipped step leaves w exactly as it was."""
    net, batches = mlp(), data(50 if backend == "reference" else 16)
    fused = fused_run(net, batches, base, OVERFLOWS[overflows], backend)
    reference = reference_run(net, batches, base, OVERFLOWS[overflows])
    assert_runs_match(fused, reference, first_pass_overflows(OVERFLOWS[overflows], len(batches)))
    if any(w != "first" for w in OVERFLOWS[overflows].values()):  # an update with the inf would poison w
        not_skipping = reference_run(net, batches, base, OVERFLOWS[overflows], skip=False)[0]
        assert not torch.isfinite(snapshot(not_skipping)).all()
    if base == "sgd-momentum":  # (Adam's step hardly depends on the gradient's scale)
        not_unscaling = reference_run(net, batches, base, OVERFLOWS[overflows], unscale=False)[0]
        assert (snapshot(fused[0]) - snapshot(not_unscaling)).abs().max() > 1e-3


@pytest.mark.parametrize("base", list(BASES))
def test_unscale_and_clip_before_scaler_step(base):
    """scaler.unscale_(opt) + clip_grad_norm_ after the second backward, then scaler.step(opt): the
    gradients are not unscaled twice, the clip applies to the unscaled gradient at w + e."""
    net, batches = mlp(), data(20)
    overflows = OVERFLOWS["mixed"]
    fused = fused_run(net, batches, base, overflows, clip=0.5)
    reference = reference_run(net, batches, base, overflows, clip=0.5)
    assert_runs_match(fused, reference, first_pass_overflows(overflows, len(batches)))
    unclipped = reference_run(net, batches, base, overflows)[0]
    assert (snapshot(fused[0]) - snapshot(unclipped)).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_loop(dtype):
    """The issue's loop as written, with torch.autocast: the forward in half precision on both sides.
    Held to the hand loop with a tolerance for half-precision forwards that see weights differing in
    their last bits; far from an un-unscaled update."""
    net, batches = mlp(), data(8)
    model, _, scales = fused_run(net, batches, "adamw", OVERFLOWS["mixed"], autocast=dtype)
    reference, _, ref_scales, *_ = reference_run(net, batches, "adamw", OVERFLOWS["mixed"], autocast=dtype)
    assert scales == ref_scales
    torch.testing.assert_close(snapshot(model), snapshot(reference), rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("pass_scaler", [False, True])
def test_unnormalized_sam_needs_the_scaler_at_first_step(pass_scaler):
    """USAM: e = rho * g depends on the scale. Without first_step(grad_scaler=...) scaler.step refuses,
    after restoring w; with it, the run is the hand loop's."""
    net, batches = mlp(), data(6)
    if not pass_scaler:
        model = copy.deepcopy(net)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, normalize=False, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", **SCALER)
        x, y = batches[0]
        w = snapshot(model)
        scaler.scale(loss_of(model, x, y)).backward()
        opt.first_step(zero_grad=True)
        scaler.scale(loss_of(model, x, y)).backward()
        with pytest.raises(RuntimeError, match="grad_scaler=scaler"):
            scaler.step(opt)
        assert torch.equal(snapshot(model), w) and not opt.perturbed
        return
    fused = fused_run(net, batches, "sgd-momentum", OVERFLOWS["mixed"], pass_scaler=True, normalize=False)
    reference = reference_run(net, batches, "sgd-momentum", OVERFLOWS["mixed"], normalize=False)
    assert_runs_match(fused, reference, 0)  # USAM has no norm, so no overflow check


def test_normalized_sam_with_the_scaler_at_first_step_is_the_same_run():
    net, batches = mlp(), data(10)
    with_scaler = fused_run(net, batches, "adamw", OVERFLOWS["mixed"], pass_scaler=True)
    without = fused_run(net, batches, "adamw", OVERFLOWS["mixed"])
    torch.testing.assert_close(snapshot(with_scaler[0]), snapshot(without[0]), rtol=1e-6, atol=1e-7)


def test_misuse_is_refused_with_the_weights_restored():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = data(1)[0]
    w = snapshot(model)
    scaler.scale(loss_of(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="first_step"):
        scaler.step(opt)  # paired mode: scaler.step is the second step
    assert torch.equal(snapshot(model), w)
    with pytest.raises(TypeError, match="GradScaler"):
        opt.first_step(grad_scaler=object())
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(model, x, y)).backward()
    with pytest.raises(RuntimeError, match="scaler.step"):
        opt.second_step()  # the gradients are scaled: second_step() would not unscale them
    assert torch.equal(snapshot(model), w) and not opt.perturbed
    with pytest.raises(RuntimeError, match="not scaled a loss yet"):
        opt.first_step(grad_scaler=torch.amp.GradScaler("cpu"))


def test_disabled_scaler_is_plain_sam():
    """GradScaler(enabled=False) (a flag users flip between fp32 and fp16 runs): scaler.step(opt) calls
    step() without grad_scale/found_inf, the usual second step."""
    net, batches = mlp(), data(5)
    runs = []
    for enabled in (False, None):
        model = copy.deepcopy(net)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for x, y in batches:
            scaler.scale(loss_of(model, x, y)).backward()
            opt.first_step(zero_grad=True, grad_scaler=scaler)
            scaler.scale(loss_of(model, x, y)).backward()
            if enabled is None:
                opt.second_step(zero_grad=True)
            else:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
        runs.append(snapshot(model))
    assert torch.equal(runs[0], runs[1])
