"""The reference backend against independent float64 formulas (its base updates are held to torch.optim by
the twin-model tests)."""
import pytest
import torch

from fused_sam.backends.base import math_dtype

from backend_harness import PERTURBATIONS, REFERENCE, TOLERANCE, check_sq_norm, exact_sq_norm, make_span


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 4097, 100_003])
@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_norm_and_perturbation_follow_the_formula(perturbation, numel, dtype):
    span = make_span(numel, dtype, "cpu", seed=numel)
    check_sq_norm(REFERENCE, span, perturbation)
    w, g = span.weights.double().clone(), span.grads.double()
    t2 = (w.abs() + perturbation.eta) ** 2 if perturbation.adaptive else 1.0
    norm = exact_sq_norm(span, perturbation).sqrt()
    scale = perturbation.rho / (norm + perturbation.eps) if perturbation.normalize else perturbation.rho
    expected = (w + scale * t2 * g).to(dtype)
    partials = torch.empty(1, dtype=math_dtype(dtype))
    REFERENCE.sq_norm_partials(span, perturbation, partials)
    REFERENCE.perturb(span, perturbation, partials, None)
    assert torch.equal(span.backup, w.to(dtype))
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(span.weights, expected, rtol=max(rtol, 1e-5), atol=atol)
