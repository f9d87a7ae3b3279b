"""Holds a candidate backend to the reference backend, operation by operation, on the same random spans.

Every kernel backend's test module calls ``check_all_ops`` over its own grid (sizes around its block size,
dtypes, devices). Outputs are poisoned with NaN before each run, so an element the candidate never writes
fails the comparison.
"""
from __future__ import annotations

import math

import torch

from fused_sam.backends.base import Perturbation, Span, math_dtype
from fused_sam.backends.reference import ReferenceBackend
from fused_sam.updates import AdamUpdate, SGDUpdate

REFERENCE = ReferenceBackend()

# (rtol, atol) per parameter dtype, for weights after one operation. Low-precision weights may differ by
# one rounding of the final cast when the float32 math differs in its last bits. GPU compilers contract
# w + s * g into one fused multiply-add, which differs from torch's two roundings by an ulp of the e term
# (up to ~2.4e-7 for the O(1) random data here); where w + e cancels to near zero that ulp is a large
# relative error, hence the float32 atol. A wrong formula is off by orders of magnitude more.
TOLERANCE = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-5),
    torch.float16: (1e-3, 1e-6),
}
STATE_TOLERANCE = {torch.float64: (1e-12, 1e-14), torch.float32: (2e-6, 1e-7)}

PERTURBATIONS = [
    Perturbation(rho=0.05, adaptive=False, eta=0.0, normalize=True, eps=1e-12),
    Perturbation(rho=0.5, adaptive=True, eta=0.01, normalize=True, eps=1e-12),
    Perturbation(rho=0.05, adaptive=True, eta=0.0, normalize=True, eps=1e-12),
    Perturbation(rho=0.1, adaptive=False, eta=0.0, normalize=False, eps=1e-12),
]

UPDATES = [
    SGDUpdate(lr=0.1),
    SGDUpdate(lr=0.1, momentum=0.9, weight_decay=5e-4),
    SGDUpdate(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    SGDUpdate(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    AdamUpdate(lr=1e-3),
    AdamUpdate(lr=1e-3, weight_decay=1e-2, decoupled=True),
    AdamUpdate(lr=2e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2, amsgrad=True, maximize=True),
    AdamUpdate(lr=1e-3, weight_decay=1e-1, decoupled=True, amsgrad=True),
]


def make_span(numel: int, dtype: torch.dtype, device, update=None, step: int = 0, grad_fill=None,
              seed: int = 0) -> Span:
    """A span of random data (state buffers too, when ``update`` needs them); backup poisoned."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = math_dtype(dtype)

    def rand(dt, scale=1.0):
        return (torch.randn(numel, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    grads = rand(dtype)
    if grad_fill is not None:
        grads.fill_(grad_fill)
    state = {}
    if update is not None:
        for name in update.needed_state():
            buf = rand(state_dtype, 0.1)
            state[name] = buf.abs() if name in ("exp_avg_sq", "max_exp_avg_sq") else buf
    return Span(weights=rand(dtype), grads=grads, backup=torch.full((numel,), float("nan"), dtype=dtype, device=device),
                state=state, step=step)


def clone_span(span: Span) -> Span:
    return Span(weights=span.weights.clone(), grads=span.grads.clone(), backup=span.backup.clone(),
                state={k: v.clone() for k, v in span.state.items()}, step=span.step)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=tol[0], atol=tol[1], equal_nan=False, msg=lambda m: f"{what}: {m}")


def exact_sq_norm(span: Span, perturbation: Perturbation) -> torch.Tensor:
    """||g||^2 (ASAM: ||T g||^2) summed in float64, the truth both backends are held to."""
    g = span.grads.double()
    if perturbation.adaptive:
        g = (span.weights.double().abs() + perturbation.eta) * g
    return torch.dot(g, g)


def check_sq_norm(backend, span: Span, perturbation: Perturbation) -> None:
    """Sum of the candidate's partials equals the squared norm (float32 accumulation: rtol 1e-5)."""
    n = backend.partials_len(span)
    out = torch.full((n,), float("nan"), dtype=span.state_dtype, device=span.device)
    backend.sq_norm_partials(span, perturbation, out)
    assert not torch.isnan(out).any(), "sq_norm_partials left partials unwritten (NaN poison survived)"
    rtol = 1e-10 if out.dtype == torch.float64 else 1e-5
    _close(out.double().sum(), exact_sq_norm(span, perturbation), (rtol, 1e-30), "squared norm")


def check_perturb(backend, span: Span, perturbation: Perturbation, partials) -> None:
    """Backup is an exact copy of w; w + e matches the reference; the non-finite counter matches."""
    cand, ref = clone_span(span), clone_span(span)
    cand_count = torch.zeros(1, dtype=torch.int32, device=span.device)
    ref_count = torch.zeros(1, dtype=torch.int32, device=span.device)
    backend.perturb(cand, perturbation, partials, cand_count)
    REFERENCE.perturb(ref, perturbation, partials, ref_count)
    assert torch.equal(cand.backup, span.weights), "perturb: backup is not an exact copy of the weights"
    _close(cand.weights, ref.weights, TOLERANCE[span.weights.dtype], "perturbed weights")
    assert torch.equal(cand_count, ref_count), f"non-finite counter {cand_count.item()} != {ref_count.item()}"


def check_restore(backend, span: Span) -> None:
    span = clone_span(span)
    span.backup.copy_(span.weights)
    span.weights.fill_(float("nan"))
    backend.restore(span)
    assert torch.equal(span.weights, span.backup), "restore: weights are not an exact copy of the backup"


def check_restore_and_update(backend, span: Span, update) -> None:
    """Weights (poisoned before) and every state buffer match the reference after one update."""
    base = clone_span(span)
    base.backup.copy_(base.weights)
    base.weights.fill_(float("nan"))
    cand, ref = clone_span(base), clone_span(base)
    backend.restore_and_update(cand, update)
    REFERENCE.restore_and_update(ref, update)
    _close(cand.weights, ref.weights, TOLERANCE[span.weights.dtype], f"weights after {update}")
    for name in ref.state:
        _close(cand.state[name], ref.state[name], STATE_TOLERANCE[ref.state[name].dtype], f"{name} after {update}")


def norm_partials_for(span: Span, perturbation: Perturbation, extra: float = 0.0) -> torch.Tensor:
    """Reference partials for ``span`` plus ``extra`` (to test inf/nan totals), as a perturb input."""
    ref = torch.empty(1, dtype=span.state_dtype,
                      device=span.device)
    REFERENCE.sq_norm_partials(span, perturbation, ref)
    return torch.cat([ref, torch.tensor([extra], dtype=ref.dtype, device=span.device)])


def check_all_ops(backend, numel: int, dtype: torch.dtype, device, seed: int = 0) -> None:
    """Every operation of the interface, every perturbation and update variant, one size and dtype."""
    for k, perturbation in enumerate(PERTURBATIONS):
        span = make_span(numel, dtype, device, seed=seed + k)
        check_sq_norm(backend, span, perturbation)
        check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation))
        check_perturb(backend, span, perturbation, None)
        check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation, math.inf))
        check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation, math.nan))
    zero = make_span(numel, dtype, device, grad_fill=0.0, seed=seed)
    check_sq_norm(backend, zero, PERTURBATIONS[0])
    check_perturb(backend, zero, PERTURBATIONS[0], norm_partials_for(zero, PERTURBATIONS[0]))
    check_restore(backend, make_span(numel, dtype, device, seed=seed))
    for k, update in enumerate(UPDATES):
        for step in (0, 3):
            check_restore_and_update(backend, make_span(numel, dtype, device, update, step, seed=seed + k), update)
