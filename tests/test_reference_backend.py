"""The reference backend against independent float64 formulas (its base updates are held to torch.optim by
the twin-model tests)."""
import dataclasses

import pytest
import torch

from fused_sam.backends.base import Span, math_dtype

from fused_sam.selfcheck import (
    PERTURBATIONS, REFERENCE, RHO, TOLERANCE, UPDATES, check_device_hyperparameters, check_sq_norm, clone_span,
    exact_sq_norm, make_span, perturb_scalars, step_scalars,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 4097, 100_003])
@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_norm_and_perturbation_follow_the_formula(perturbation, numel, dtype):
    span = make_span(numel, dtype, "cpu", seed=numel)
    check_sq_norm(REFERENCE, span, perturbation)
    w, g = span.weights.double().clone(), span.grads.double()
    t2 = (w.abs() + perturbation.eta) ** 2 if perturbation.adaptive else 1.0
    norm = exact_sq_norm(span, perturbation).sqrt()
    scale = RHO / (norm + perturbation.eps) if perturbation.normalize else RHO
    expected = (w + scale * t2 * g).to(dtype)
    partials = torch.empty(1, dtype=math_dtype(dtype))
    REFERENCE.sq_norm_partials(span, perturbation, partials)
    REFERENCE.perturb(span, perturbation, partials, None, perturb_scalars("cpu"))
    assert torch.equal(span.backup, w.to(dtype))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(span.weights, expected, rtol=max(rtol, 1e-5), atol=atol)


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_perturbation_of_scaled_gradients_is_that_of_the_gradients(perturbation):
    """A GradScaler's scale s on the gradients (and so on the partials) changes nothing: e is computed
    from g * s with eps scaled by s (normalized) or rho divided by s (USAM). Against float64 math."""
    s = 2.0**14
    span = make_span(1003, torch.float64, "cpu", seed=3)
    w, g = span.weights.clone(), span.grads.clone()
    t2 = (w.abs() + perturbation.eta) ** 2 if perturbation.adaptive else 1.0
    norm = exact_sq_norm(span, perturbation).sqrt()
    scale = RHO / (norm + perturbation.eps) if perturbation.normalize else RHO
    span.grads.mul_(s)
    partials = torch.empty(1, dtype=torch.float64)
    REFERENCE.sq_norm_partials(span, perturbation, partials)
    REFERENCE.perturb(span, perturbation, partials, None, perturb_scalars("cpu", s))
    torch.testing.assert_close(span.weights, w + scale * t2 * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("update", UPDATES, ids=str)
@pytest.mark.parametrize("step", [0, 4])
def test_update_of_scaled_gradients_is_that_of_the_gradients(update, step):
    """grad_scale s: the update of g * s equals the update of g (s a power of two: exactly); found_inf
    non-zero: w is the backup and the state is untouched, bit for bit."""
    s = torch.tensor(2.0**16)
    plain = make_span(513, torch.float32, "cpu", update, seed=step)
    plain.backup.copy_(plain.weights)
    scaled, skipped = clone_span(plain), clone_span(plain)
    scaled.grads.mul_(s)
    REFERENCE.restore_and_update(plain, update, step_scalars("cpu", step))
    REFERENCE.restore_and_update(scaled, update, step_scalars("cpu", step, grad_scale=s.item(), found_inf=0.0))
    assert torch.equal(scaled.weights, plain.weights)
    for name in plain.state:
        assert torch.equal(scaled.state[name], plain.state[name])
    before = clone_span(skipped)
    skipped.weights.fill_(float("nan"))
    REFERENCE.restore_and_update(skipped, update, step_scalars("cpu", step, grad_scale=s.item(), found_inf=1.0))
    assert torch.equal(skipped.weights, before.backup)
    for name in before.state:
        assert torch.equal(skipped.state[name], before.state[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weight_spans_follow_the_float32_math(dtype):
    """With a float32 master, each operation is the float32 span's operation on the master, and the
    weights are its rounding: held to the same operation on a float32 span holding the master values."""
    for update in UPDATES:
        span = make_span(1003, dtype, "cpu", update, seed=5, master=True)
        wide = Span(weights=span.master.clone(), grads=span.grads.float(), backup=span.master.clone(),
                    state={k: v.clone() for k, v in span.state.items()})
        scalars = step_scalars("cpu", 2, 256.0, 0.0)
        REFERENCE.restore_and_update(span, update, scalars)
        REFERENCE.restore_and_update(wide, update, scalars)
        assert torch.equal(span.master, wide.weights) and torch.equal(span.weights, wide.weights.to(dtype))
        for name in span.state:
            assert torch.equal(span.state[name], wide.state[name])
    for perturbation in PERTURBATIONS:
        span = make_span(1003, dtype, "cpu", seed=6, master=True)
        wide = Span(weights=span.master.clone(), grads=span.grads.float(), backup=torch.empty_like(span.master))
        partials = torch.empty(1)
        REFERENCE.sq_norm_partials(span, perturbation, partials)
        REFERENCE.perturb(span, perturbation, partials, None, perturb_scalars("cpu"))
        REFERENCE.perturb(wide, perturbation, partials, None, perturb_scalars("cpu"))
        assert torch.equal(span.weights, wide.weights.to(dtype)) and torch.equal(span.master, wide.backup)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_reference_master_spans_pass_the_harness(dtype):
    from fused_sam.selfcheck import check_all_ops
    check_all_ops(REFERENCE, 257, dtype, "cpu", master=True)


@pytest.mark.parametrize("dtype, master", [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                                           (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float64", "float32", "bfloat16", "bfloat16-master", "float16-master"])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise(dtype, master):
    check_device_hyperparameters(REFERENCE, 257, dtype, "cpu", master=master)


@pytest.mark.parametrize("update", UPDATES, ids=str)
def test_reused_direction_enters_as_part_of_the_gradient(update):
    """LookSAM's reuse update (``span.reused`` = g_v, ``reuse_scale`` = c) is the update with the gradient
    g + c * g_v, formed here in float64 by hand; under a GradScaler that sum is unscaled; the gradient buffer
    is not written."""
    c = 0.37
    span = make_span(1003, torch.float64, "cpu", update, seed=5)
    span.backup.copy_(span.weights)
    g_v = torch.randn(1003, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    by_hand = clone_span(span)
    by_hand.grads.add_(c * g_v)
    REFERENCE.restore_and_update(by_hand, update, step_scalars("cpu", 2))
    for grad_scale in (None, 2.0**10):
        reused = dataclasses.replace(clone_span(span), reused=g_v)
        if grad_scale is not None:
            reused.grads.mul_(grad_scale)
            g_v = g_v * grad_scale  # c * g_v carries the scale of g, as LookSAM's coefficient makes it
            reused = dataclasses.replace(reused, reused=g_v)
        grads = reused.grads.clone()
        plain = step_scalars("cpu", 2, grad_scale, None if grad_scale is None else 0.0)
        REFERENCE.restore_and_update(reused, update, dataclasses.replace(
            plain, reuse_scale=torch.tensor([c], dtype=torch.float64)))
        assert torch.equal(reused.grads, grads)
        torch.testing.assert_close(reused.weights, by_hand.weights, rtol=1e-13, atol=1e-15)
        for name in by_hand.state:
            torch.testing.assert_close(reused.state[name], by_hand.state[name], rtol=1e-13, atol=1e-15)
