"""Holds a backend to the reference backend, operation by operation, on the same random spans.

Used three ways: by the tests (every kernel backend's test module calls ``check_all_ops`` over its own grid:
sizes around its block size, dtypes, devices), by ``fused-sam check`` (fused_sam/check.py) on the user's own
machine, and by the backend registry before ``auto`` first trusts a compiled backend on a CUDA device
(``known_answer_failure``) or a SIMD build of the native CPU kernels (``cpu_isa_disagreement``). Outputs are
poisoned with NaN before each run, so an element the candidate never writes fails the comparison. A check
that fails raises AssertionError; ``worst_error()`` tracks how close the passing comparisons came to their
tolerance.
"""
from __future__ import annotations

import dataclasses

import math
from typing import Optional

import torch

from fused_sam.backends.base import KernelLaunches, Perturbation, Span, StepScalars, grad_unscale, math_dtype
from fused_sam.backends.reference import ReferenceBackend
from fused_sam.flat import LOW_PRECISION
from fused_sam.updates import AdagradUpdate, AdamUpdate, SGDUpdate

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
    Perturbation(adaptive=False, eta=0.0, normalize=True, eps=1e-12),
    Perturbation(adaptive=True, eta=0.01, normalize=True, eps=1e-12),
    Perturbation(adaptive=True, eta=0.0, normalize=True, eps=1e-12),
    Perturbation(adaptive=False, eta=0.0, normalize=False, eps=1e-12),
]
# rho for each of PERTURBATIONS in check_all_ops; RHO where a check is given none.
PERTURBATION_RHOS = (0.05, 0.5, 0.05, 0.1)
RHO = 0.05

UPDATES = [
    SGDUpdate(),
    SGDUpdate(momentum=0.9, weight_decay=5e-4),
    SGDUpdate(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False, maximize=True),
    SGDUpdate(momentum=0.8, weight_decay=1e-3, nesterov=True),
    AdamUpdate(),
    AdamUpdate(weight_decay=1e-2, decoupled=True),
    AdamUpdate(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2, amsgrad=True, maximize=True),
    AdamUpdate(weight_decay=1e-1, decoupled=True, amsgrad=True),
    AdagradUpdate(),
    AdagradUpdate(lr_decay=1e-2, weight_decay=1e-2, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
]
# lr for each of UPDATES in check_all_ops; LR where a check is given none.
UPDATE_LRS = (0.1, 0.1, 0.05, 0.05, 1e-3, 1e-3, 2e-3, 1e-3, 1e-2, 5e-2)
LR = 1e-2


def make_span(numel: int, dtype: torch.dtype, device, update=None, grad_fill=None, seed: int = 0,
              master: bool = False) -> Span:
    """A span of random data (state buffers too, when ``update`` needs them); backup poisoned. master: a
    float32 master copy (bf16/fp16), the weights its rounding, no backup."""
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
            state[name] = buf.abs() if name in update.nonnegative_state else buf
    if master:
        masters = rand(torch.float32)
        return Span(weights=masters.to(dtype), grads=grads, backup=None, state=state, master=masters)
    return Span(weights=rand(dtype), grads=grads, backup=torch.full((numel,), float("nan"), dtype=dtype, device=device),
                state=state)


def _copy_at(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` starting ``offset`` elements into a fresh allocation."""
    return torch.empty(offset + t.numel(), dtype=t.dtype, device=t.device)[offset:].copy_(t)


def _map_buffers(span: Span, copy) -> Span:
    """``span`` with ``copy`` applied to each of its buffers."""
    def maybe(t):
        return None if t is None else copy(t)

    return Span(weights=copy(span.weights), grads=copy(span.grads), backup=maybe(span.backup),
                state={k: copy(v) for k, v in span.state.items()}, master=maybe(span.master),
                reused=maybe(span.reused))


def clone_span(span: Span) -> Span:
    """A copy of ``span``; each buffer starts as far into its allocation as the original does, so a
    misaligned span stays misaligned."""
    return _map_buffers(span, lambda t: _copy_at(t, t.storage_offset()))


def misaligned_span(span: Span, offset: int) -> Span:
    """A copy of ``span`` with every buffer starting ``offset`` elements into its allocation."""
    return _map_buffers(span, lambda t: _copy_at(t, offset))


def restore_point(span: Span) -> torch.Tensor:
    """w as the span keeps it: the float32 master, or the backup."""
    return span.master if span.master is not None else span.backup


def step_scalars(device, step: int = 0, grad_scale=None, found_inf=None, lr: float = LR) -> StepScalars:
    """An update's StepScalars as the optimizer passes them: float32 tensors on ``device`` (the step a 0-d
    view), lr a Python float."""
    def scalar(value):
        return None if value is None else torch.tensor(float(value), dtype=torch.float32, device=device)

    steps = torch.tensor([7.0, float(step)], dtype=torch.float32, device=device)  # a view, as the optimizer's
    return StepScalars(step=steps[1], lr=lr, grad_scale=scalar(grad_scale), found_inf=scalar(found_inf))


def perturb_scalars(device, grad_scale=None, rho: float = RHO) -> StepScalars:
    """perturb's StepScalars: rho a Python float, the optional GradScaler scale a float32 tensor on ``device``."""
    scale = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32, device=device)
    return StepScalars(rho=rho, grad_scale=scale)


# (step, grad_scale, found_inf): plain steps; GradScaler steps unscaled in the kernel; skipped steps, with
# found_inf values GradScaler produces (1, a sum over devices 2) and NaN (also non-zero).
SCALARS = [(0, None, None), (3, None, None), (3, 1024.0, 0.0), (0, 2.0**-3, 0.0), (0, 512.0, 1.0), (3, None, 2.0),
           (5, 65536.0, math.nan)]
GRAD_SCALES = [None, 1024.0, 2.0**-3]
class _Tally:
    """The largest error seen, as a fraction of its tolerance (|a - b| / (atol + rtol |b|)), since ``reset``."""

    worst = 0.0

    def reset(self) -> None:
        self.worst = 0.0


_TALLY = _Tally()


def reset_worst_error() -> None:
    _TALLY.reset()


def note_error(fraction: float) -> None:
    """Counts an error measured outside ``_close``, as a fraction of its tolerance."""
    _TALLY.worst = max(_TALLY.worst, fraction)


def worst_error() -> float:
    """The largest error of the comparisons with a tolerance since ``reset_worst_error()``, as a fraction of
    that tolerance (a passing comparison is at most 1; an exact one 0)."""
    return _TALLY.worst


def _close(actual: torch.Tensor, expected: torch.Tensor, tol, what: str) -> None:
    actual, expected = actual.cpu(), expected.cpu()
    if actual.shape == expected.shape and actual.numel():
        a, b = actual.double(), expected.double()
        both_finite = torch.isfinite(a) & torch.isfinite(b)  # a non-finite mismatch fails assert_close below
        error = torch.where(both_finite, (a - b).abs() / (tol[1] + tol[0] * b.abs()), 0.0)
        _TALLY.worst = max(_TALLY.worst, float(error.max()))
    torch.testing.assert_close(actual, expected, rtol=tol[0], atol=tol[1], equal_nan=False, msg=lambda m: f"{what}: {m}")


def exact_sq_norm(span: Span, perturbation: Perturbation) -> torch.Tensor:
    """||g||^2 (ASAM: ||T g||^2, T from the master weights if any) summed in float64, the truth both
    backends are held to."""
    g = span.grads.double()
    if perturbation.adaptive:
        w = span.master if span.master is not None else span.weights
        g = (w.double().abs() + perturbation.eta) * g
    return torch.dot(g, g)


def check_sq_norm(backend, span: Span, perturbation: Perturbation) -> None:
    """Sum of the candidate's partials equals the squared norm (float32 accumulation: rtol 1e-5)."""
    n = backend.partials_len(span)
    out = torch.full((n,), float("nan"), dtype=span.state_dtype, device=span.device)
    backend.sq_norm_partials(span, perturbation, out)
    assert not torch.isnan(out).any(), "sq_norm_partials left partials unwritten (NaN poison survived)"
    rtol = 1e-10 if out.dtype == torch.float64 else 1e-5
    _close(out.double().sum(), exact_sq_norm(span, perturbation), (rtol, 1e-30), "squared norm")


def check_perturb(backend, span: Span, perturbation: Perturbation, partials, grad_scale=None,
                  rho: float = RHO) -> None:
    """Backup is an exact copy of w; w + e matches the reference; the non-finite counter matches."""
    cand, ref = clone_span(span), clone_span(span)
    cand_count = torch.zeros(1, dtype=torch.int32, device=span.device)
    ref_count = torch.zeros(1, dtype=torch.int32, device=span.device)
    scalars = perturb_scalars(span.device, grad_scale, rho)
    backend.perturb(cand, perturbation, partials, cand_count, scalars)
    REFERENCE.perturb(ref, perturbation, partials, ref_count, scalars)
    if span.master is not None:
        assert torch.equal(cand.master, span.master), "perturb changed the master weights"
    else:
        assert torch.equal(cand.backup, span.weights), "perturb: backup is not an exact copy of the weights"
    _close(cand.weights, ref.weights, TOLERANCE[span.weights.dtype], f"perturbed weights (grad_scale {grad_scale})")
    assert torch.equal(cand_count, ref_count), f"non-finite counter {cand_count.item()} != {ref_count.item()}"


def check_perturb_sums(backend, span: Span, perturbation: Perturbation, partials, grad_scale=None,
                       rho: float = RHO) -> None:
    """perturb with telemetry sums: every element written, their total the float64 sum of e * g (e as written
    to the weights, g as given), and the perturbation the same bits as without sums."""
    plain = clone_span(span)
    scalars = perturb_scalars(span.device, grad_scale, rho)
    backend.perturb(plain, perturbation, partials, None, scalars)
    rows = backend.partials_len(span)
    what = f"telemetry sums of perturb({perturbation}, grad_scale {grad_scale}), {rows} rows"
    for dtype in {span.state_dtype, torch.float64}:  # a float32 span may share a float64 buffer
        cand = clone_span(span)
        sums = torch.full((rows,), math.nan, dtype=dtype, device=span.device)
        backend.perturb(cand, perturbation, partials, None, scalars, sums)
        for a, b in ((plain.weights, cand.weights), (restore_point(plain), restore_point(cand))):
            assert torch.equal(as_bits(a), as_bits(b)), f"{what}: the perturbation changed with sums"
        assert not sums.isnan().any(), f"{what}: an element left unwritten"
        terms = (cand.weights.double() - restore_point(cand).double()) * cand.grads.to(span.state_dtype).double()
        tol = 1e-12 if dtype == torch.float64 and span.state_dtype == torch.float64 else 1e-4
        _close(sums.double().sum(), terms.sum(), (0.0, tol * float(terms.abs().sum()) + 1e-300), what)


def check_restore(backend, span: Span) -> None:
    """w <- the backup exactly, or the rounding of the master (as torch rounds)."""
    span = clone_span(span)
    if span.backup is not None:
        span.backup.copy_(span.weights)
    expected = restore_point(span).to(span.weights.dtype)
    span.weights.fill_(float("nan"))
    backend.restore(span)
    assert torch.equal(span.weights, expected), "restore: weights are not the restore point"


def check_restore_and_update(backend, span: Span, update, scalars: StepScalars) -> None:
    """Weights (poisoned before) and every state buffer match the reference after one update; a skipped
    update (found_inf non-zero) leaves w the backup and the state as it was, bit for bit."""
    base = clone_span(span)
    if base.backup is not None:
        base.backup.copy_(base.weights)
    base.weights.fill_(float("nan"))
    cand, ref = clone_span(base), clone_span(base)
    backend.restore_and_update(cand, update, scalars)
    REFERENCE.restore_and_update(ref, update, scalars)
    what = f"{update}, step {scalars.step.item():g}, grad_scale {scalars.grad_scale}, found_inf {scalars.found_inf}"
    if span.reused is not None:
        what += f", reusing g_v x {scalars.reuse_scale.item():g}"
        assert torch.equal(cand.grads, base.grads), f"the update wrote the gradients: {what}"
    if scalars.found_inf is not None and scalars.found_inf.item() != 0:
        expected = restore_point(base).to(span.weights.dtype)
        assert torch.equal(cand.weights, expected), f"skipped update changed w: {what}"
        if base.master is not None:
            assert torch.equal(cand.master, base.master), f"skipped update changed the master: {what}"
        for name in base.state:
            assert torch.equal(cand.state[name], base.state[name]), f"skipped update changed {name}: {what}"
    if base.master is not None:
        # the master is the float32 weight: held to float32 weights' tolerance (w - lr * d may cancel)
        _close(cand.master, ref.master, TOLERANCE[torch.float32], f"master weights after {what}")
        assert torch.equal(cand.weights, cand.master.to(span.weights.dtype)), f"weights not the master's rounding: {what}"
    _close(cand.weights, ref.weights, TOLERANCE[span.weights.dtype], f"weights after {what}")
    for name in ref.state:
        _close(cand.state[name], ref.state[name], STATE_TOLERANCE[ref.state[name].dtype], f"{name} after {what}")


def check_telemetry_sums(backend, span: Span, update, scalars: StepScalars) -> None:
    """restore_and_update with telemetry sums: every row written, their totals the reference's (e = the
    weights on entry minus the restore point, g2 the unscaled gradient), and the update the same bits as
    without sums."""
    base = clone_span(span)
    if base.backup is not None:
        base.backup.copy_(base.weights)
    gen = torch.Generator().manual_seed(base.numel)
    e = torch.randn(base.numel, generator=gen, dtype=torch.float64).mul_(1e-2).to(base.device)
    base.weights.copy_((restore_point(base).double() + e).to(base.weights.dtype))
    plain, cand = clone_span(base), clone_span(base)
    backend.restore_and_update(plain, update, scalars)
    rows = backend.partials_len(cand)
    what = f"telemetry sums of {update}, grad_scale {scalars.grad_scale}, {rows} rows"
    for dtype in {span.state_dtype, torch.float64}:  # a float32 span may share a float64 buffer
        sums = torch.full((rows, 3), math.nan, dtype=dtype, device=span.device)
        cand = clone_span(base)
        backend.restore_and_update(cand, update, scalars, sums)
        for a, b in zip([plain.weights, *plain.state.values()], [cand.weights, *cand.state.values()]):
            assert torch.equal(as_bits(a), as_bits(b)), f"{what}: the update changed with sums"
        assert not sums.isnan().any(), f"{what}: a row left unwritten"
        # float64 sums of the math-dtype products, within a fraction of the sum of their magnitudes
        e = base.weights.double() - restore_point(base).double()
        g = base.grads.to(span.state_dtype)
        if scalars.grad_scale is not None:
            g = g * grad_unscale(scalars.grad_scale).to(g.dtype)
        g = g.double()
        tol = 1e-12 if dtype == torch.float64 and span.state_dtype == torch.float64 else 1e-4
        got = sums.double().sum(0)
        for k, (x, y) in enumerate(((e, e), (e, g), (g, g))):
            _close(got[k], (x * y).sum(), (0.0, tol * float((x * y).abs().sum()) + 1e-300), f"{what}, sum {k}")


def norm_partials_for(span: Span, perturbation: Perturbation, extra: float = 0.0) -> torch.Tensor:
    """Reference partials for ``span`` plus ``extra`` (to test inf/nan totals), as a perturb input."""
    ref = torch.empty(1, dtype=span.state_dtype,
                      device=span.device)
    REFERENCE.sq_norm_partials(span, perturbation, ref)
    return torch.cat([ref, torch.tensor([extra], dtype=ref.dtype, device=span.device)])


def check_all_ops(backend, numel: int, dtype: torch.dtype, device, seed: int = 0, master: bool = False) -> None:
    """Every operation of the interface, every perturbation and update variant, one size and dtype
    (master: spans with float32 master weights, for bf16/fp16)."""
    for k, (perturbation, rho) in enumerate(zip(PERTURBATIONS, PERTURBATION_RHOS)):
        span = make_span(numel, dtype, device, seed=seed + k, master=master)
        check_sq_norm(backend, span, perturbation)
        for grad_scale in GRAD_SCALES:
            check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation), grad_scale, rho)
            check_perturb(backend, span, perturbation, None, grad_scale, rho)
            check_perturb_sums(backend, span, perturbation,
                               norm_partials_for(span, perturbation) if perturbation.normalize else None, grad_scale, rho)
        check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation, math.inf), None, rho)
        check_perturb(backend, span, perturbation, norm_partials_for(span, perturbation, math.nan), 1024.0, rho)
    zero = make_span(numel, dtype, device, grad_fill=0.0, seed=seed, master=master)
    check_sq_norm(backend, zero, PERTURBATIONS[0])
    check_perturb(backend, zero, PERTURBATIONS[0], norm_partials_for(zero, PERTURBATIONS[0]))
    check_perturb(backend, zero, PERTURBATIONS[0], norm_partials_for(zero, PERTURBATIONS[0]), 1024.0)
    check_restore(backend, make_span(numel, dtype, device, seed=seed, master=master))
    for k, (update, lr) in enumerate(zip(UPDATES, UPDATE_LRS)):
        span = make_span(numel, dtype, device, update, seed=seed + k, master=master)
        for step, grad_scale, found_inf in SCALARS:
            check_restore_and_update(backend, span, update, step_scalars(device, step, grad_scale, found_inf, lr))
        check_reuse(backend, span, update, lr)
        for grad_scale in (None, 1024.0):
            check_telemetry_sums(backend, span, update, step_scalars(device, 3, grad_scale, None, lr))
        if not master:
            check_update_in_place(backend, span, update, lr)


def check_update_in_place(backend, span: Span, update, lr: float = LR) -> None:
    """A plain step (nothing perturbed) restores from w itself: ``backup`` may be the weights tensor. Each
    element is read before it is written, so the result is bit for bit that of a separate backup; also
    skipped, and reusing a direction."""
    cases = [(step_scalars(span.device, 3, lr=lr), None), (step_scalars(span.device, 3, 8.0, 1.0, lr), None),
             (step_scalars(span.device, 0, lr=lr), 0.7310585786300049)]
    for scalars, reuse in cases:
        if reuse is not None:
            span = with_reused(span, seed=1)
            scalars = StepScalars(step=scalars.step, lr=lr, reuse_scale=torch.tensor([reuse], dtype=torch.float64,
                                                                                     device=span.device))
        separate, in_place = clone_span(span), clone_span(span)
        separate.backup.copy_(separate.weights)
        in_place = dataclasses.replace(in_place, backup=in_place.weights)
        backend.restore_and_update(separate, update, scalars)
        backend.restore_and_update(in_place, update, scalars)
        what = f"{update} in place (backup is the weights), found_inf {scalars.found_inf}, reuse {reuse}"
        assert torch.equal(in_place.weights, separate.weights), what
        for name in separate.state:
            assert torch.equal(in_place.state[name], separate.state[name]), f"{name}: {what}"


def with_reused(span: Span, seed: int) -> Span:
    """``span`` plus a random LookSAM direction g_v in its math dtype."""
    gen = torch.Generator().manual_seed(seed)
    g_v = torch.randn(span.numel, generator=gen, dtype=torch.float64).to(span.state_dtype).to(span.device)
    return Span(span.weights, span.grads, span.backup, span.state, span.master, reused=g_v)


# (c, (step, grad_scale, found_inf)): a coefficient that is not a round number, one that dwarfs g (under a
# GradScaler), nothing reused, and a skipped step.
REUSE_CASES = [(0.7310585786300049, SCALARS[1]), (3.0e4, SCALARS[2]), (0.0, SCALARS[0]),
               (0.7310585786300049, SCALARS[4])]


def check_reuse(backend, span: Span, update, lr: float = LR) -> None:
    """LookSAM's reuse update (d = g + c * g_v, g_v in ``span.reused``) matches the reference and writes no
    gradient; plain, under a GradScaler, and skipped."""
    span = with_reused(span, seed=span.numel)
    plain = step_scalars(span.device, lr=lr)
    for lone, scalars in ((span, plain),
                          (make_span(1, span.weights.dtype, span.device, update), dataclasses.replace(
                              plain, reuse_scale=torch.ones(1, dtype=torch.float64, device=span.device)))):
        try:  # one without the other: refused
            backend.restore_and_update(clone_span(lone), update, scalars)
        except (ValueError, RuntimeError) as exc:
            assert "reuse" in str(exc), exc
        else:
            raise AssertionError("restore_and_update took a reused direction without its scale, or the reverse")
    for scale, (step, grad_scale, found_inf) in REUSE_CASES:
        plain = step_scalars(span.device, step, grad_scale, found_inf, lr)
        scalars = dataclasses.replace(plain, reuse_scale=torch.tensor([scale], dtype=torch.float64,
                                                                      device=span.device))
        check_restore_and_update(backend, span, update, scalars)


def master_rounding_cases(dtype) -> torch.Tensor:
    """float32 masters whose rounding to ``dtype`` is easy to get wrong: ties (to even: down, and up), the
    float32 values either side of them, the tie above the largest finite value (to infinity), subnormal ties,
    signed zeros and infinities."""
    info = torch.finfo(dtype)
    smallest_subnormal = info.tiny * info.eps
    above_max = info.max / (1 - info.eps / 2)  # the power of two past the largest finite value
    ties = torch.tensor([1 + info.eps / 2, 1 + 3 * info.eps / 2, (info.max + above_max) / 2, 0.5 * smallest_subnormal,
                         1.5 * smallest_subnormal, 2.5 * smallest_subnormal], dtype=torch.float64).float()
    beside_ties = torch.cat([torch.nextafter(ties, torch.full_like(ties, math.inf)),
                             torch.nextafter(ties, torch.zeros_like(ties))])
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf])
    return torch.cat([ties, -ties, beside_ties, -beside_ties, specials])


def check_master_roundings(backend, device, dtype) -> None:
    """Every write of 16-bit weights from a float32 master (perturb with e = 0, restore, an update that
    leaves w as it is, a skipped update) is the reference's (torch's rounding) bit for bit, and the master
    keeps its bits."""
    masters = master_rounding_cases(dtype).to(device)
    span = Span(weights=torch.full_like(masters, math.nan, dtype=dtype), grads=torch.zeros_like(masters, dtype=dtype),
                backup=None, master=masters)
    plain_sgd = SGDUpdate()
    ops = {
        "perturb": lambda backend, s: backend.perturb(s, PERTURBATIONS[3], None, None, perturb_scalars(device)),
        "restore": lambda backend, s: backend.restore(s),
        "update": lambda backend, s: backend.restore_and_update(s, plain_sgd, step_scalars(device, 0, lr=0.1)),
        "skipped update": lambda backend, s: backend.restore_and_update(s, plain_sgd,
                                                                        step_scalars(device, 3, 8.0, 1.0, 0.1)),
    }
    for what, op in ops.items():
        cand, ref = clone_span(span), clone_span(span)
        op(backend, cand)
        op(REFERENCE, ref)
        assert torch.equal(cand.weights.view(torch.int16), ref.weights.view(torch.int16)), what
        assert torch.equal(cand.master.view(torch.int32), masters.view(torch.int32)), what


def device_hyperparameter(value: float, device) -> torch.Tensor:
    """lr or rho as capturable=True passes them: float64, one element, on the span's device."""
    return torch.tensor([value], dtype=torch.float64, device=device)


def _same_span(a: Span, b: Span, what: str) -> None:
    for name in ("weights", "backup", "master"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"{what}: {name}"
    for name, value in a.state.items():
        assert torch.equal(value, b.state[name]), f"{what}: state {name}"


def check_device_hyperparameters(backend, numel: int, dtype: torch.dtype, device, seed: int = 0,
                                 master: bool = False, perturbations=PERTURBATIONS, updates=UPDATES,
                                 rhos=PERTURBATION_RHOS, lrs=UPDATE_LRS) -> None:
    """lr and rho read from device tensors (capturable=True) give the float path's results bit for bit."""
    for k, (perturbation, rho) in enumerate(zip(perturbations, rhos)):
        span = make_span(numel, dtype, device, seed=seed + k, master=master)
        for partials, grad_scale in ((norm_partials_for(span, perturbation), None),
                                     (norm_partials_for(span, perturbation), 1024.0), (None, 2.0**-3)):
            as_float = perturb_scalars(device, grad_scale, rho)
            as_tensor = dataclasses.replace(as_float, rho=device_hyperparameter(rho, device))
            expect, cand = clone_span(span), clone_span(span)
            backend.perturb(expect, perturbation, partials, None, as_float)
            backend.perturb(cand, perturbation, partials, None, as_tensor)
            _same_span(cand, expect, f"perturb {perturbation} rho={rho} grad_scale={grad_scale}")
    for k, (update, lr) in enumerate(zip(updates, lrs)):
        span = make_span(numel, dtype, device, update, seed=seed + k, master=master)
        if span.backup is not None:
            span.backup.copy_(span.weights)  # w restored from it, not NaN
        for step, grad_scale, found_inf in SCALARS[:4]:
            as_float = step_scalars(device, step, grad_scale, found_inf, lr)
            as_tensor = dataclasses.replace(as_float, lr=device_hyperparameter(lr, device))
            expect, cand = clone_span(span), clone_span(span)
            backend.restore_and_update(expect, update, as_float)
            backend.restore_and_update(cand, update, as_tensor)
            _same_span(cand, expect, f"{update} lr={lr} step={step} grad_scale={grad_scale}")


# --- the checks fused_sam runs on the user's machine ---------------------------------------------------------

# Sizes that cross the kernels' boundaries: one element, around a SIMD step (8-32 elements), a CPU norm block
# (256) with ragged tails (every remainder class the AVX-512 bug dropped lanes in), past Triton's block (4096).
SELF_CHECK_SIZES = (1, 63, 64, 100, 255, 320, 4099)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def dtype_configs(dtypes=DTYPES):
    """(dtype, master) pairs: every dtype, and bfloat16/float16 also with float32 master weights."""
    return [(dtype, master) for dtype in dtypes for master in ((False, True) if dtype in LOW_PRECISION else (False,))]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as integers of its width: equal bits compare equal (NaN payloads, the sign of zero)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _op_cases(numel: int, dtype: torch.dtype, master: bool, updates, perturbations, seed: int = 0,
              elementwise_only: bool = False):
    """(what, run(backend, device) -> output tensors) for every operation a step launches on spans of
    ``numel`` elements: each ``run`` makes its span afresh from ``seed`` on ``device`` (the same values on
    every device) and returns what the operation wrote. ``elementwise_only``: no norm partials nor telemetry
    sums (their rows differ between devices)."""
    made, norms = {}, {}

    def span_for(device, update=None):
        if (device, update) not in made:
            made[device, update] = make_span(numel, dtype, device, update, seed=seed, master=master)
        return clone_span(made[device, update])

    def norm(perturbation):
        def run(backend, device):
            span = span_for(device)
            out = torch.full((backend.partials_len(span),), math.nan, dtype=span.state_dtype, device=device)
            backend.sq_norm_partials(span, perturbation, out)
            return [out]
        return run

    def perturb(perturbation, extra, grad_scale, telemetry=False):
        def run(backend, device):
            span, count = span_for(device), torch.zeros(1, dtype=torch.int32, device=device)
            partials = None
            if extra is not None:  # the reference's squared norm on the CPU, made once: the same input everywhere
                if perturbation not in norms:
                    norms[perturbation] = norm_partials_for(span_for("cpu"), perturbation)[:1]
                partials = torch.cat([norms[perturbation], norms[perturbation].new_tensor([extra])]).to(device)
            if telemetry:
                sums = torch.full((backend.partials_len(span),), math.nan, dtype=torch.float64, device=device)
                backend.perturb(span, perturbation, partials, count, perturb_scalars(device, grad_scale), sums)
                return [span.weights, restore_point(span), count, sums]
            backend.perturb(span, perturbation, partials, count, perturb_scalars(device, grad_scale))
            return [span.weights, restore_point(span), count]
        return run

    def restore(backend, device):
        span = span_for(device)
        if span.backup is not None:
            span.backup.copy_(span.weights)
        span.weights.fill_(math.nan)
        backend.restore(span)
        return [span.weights]

    def update(upd, step, grad_scale, found_inf, reuse, telemetry=False):
        def run(backend, device):
            span, run_scalars = span_for(device, upd), step_scalars(device, step, grad_scale, found_inf)
            if reuse is not None:
                span = with_reused(span, seed=seed + 1)
                scale = torch.tensor([reuse], dtype=torch.float64, device=device)
                run_scalars = dataclasses.replace(run_scalars, reuse_scale=scale)
            if span.backup is not None:
                span.backup.copy_(span.weights)
            if telemetry:  # the weights as the model saw them: the backup + g / 8
                span.weights.add_(span.grads / 8)
                sums = torch.full((backend.partials_len(span), 3), math.nan, dtype=torch.float64, device=device)
                backend.restore_and_update(span, upd, run_scalars, sums)
                return [span.weights, restore_point(span), *span.state.values(), sums]
            span.weights.fill_(math.nan)
            backend.restore_and_update(span, upd, run_scalars)
            return [span.weights, restore_point(span), *span.state.values()]
        return run

    for perturbation in perturbations:
        if not elementwise_only:
            yield f"sq_norm_partials({perturbation})", norm(perturbation)
        if perturbation.normalize:
            for extra, grad_scale in ((0.0, None), (0.0, 1024.0), (math.inf, None)):
                yield f"perturb({perturbation}, grad_scale {grad_scale}, norm + {extra})", perturb(
                    perturbation, extra, grad_scale)
        else:
            yield f"perturb({perturbation})", perturb(perturbation, None, None)
        if not elementwise_only:  # the sums' rows differ between devices
            yield f"perturb({perturbation}, with telemetry sums)", perturb(
                perturbation, 0.0 if perturbation.normalize else None, 1024.0, telemetry=True)
    yield "restore", restore
    for upd in updates:
        for step, grad_scale, found_inf in (SCALARS[0], SCALARS[2], SCALARS[5]):
            yield (f"restore_and_update({upd}, step {step}, grad_scale {grad_scale}, found_inf {found_inf})",
                   update(upd, step, grad_scale, found_inf, None))
        yield f"restore_and_update({upd}, reusing g_v)", update(upd, 3, None, None, 0.7310585786300049)
        if not elementwise_only:  # the sums' rows differ between devices
            yield (f"restore_and_update({upd}, with telemetry sums)",
                   update(upd, *SCALARS[2], 0.7310585786300049, telemetry=True))


# The update variants with distinct kernel instances (momentum or none; Adam, AdamW with AMSGrad; Adagrad): the
# other settings are values in registers, the same code.
KERNEL_UPDATES = (UPDATES[0], UPDATES[3], UPDATES[4], UPDATES[6], UPDATES[9])


def _native_disagreement(outputs_of, sizes, updates, elementwise_only: bool = False) -> Optional[str]:
    """Runs every case of ``_op_cases`` (every dtype, master weights too, ``sizes``) through
    ``outputs_of(run, backend) -> (expected, actual)`` with the native backend; None if every pair is equal bit
    for bit, else the first case that is not. The CPU kernels in use are the same afterwards."""
    from .backends import native

    backend, before = native.NativeBackend(), native.cpu_capability()
    try:
        for dtype, master in dtype_configs():
            for numel in sizes:
                for what, run in _op_cases(numel, dtype, master, updates, PERTURBATIONS, seed=numel,
                                           elementwise_only=elementwise_only):
                    expected, actual = outputs_of(run, backend)
                    if not all(torch.equal(as_bits(a.cpu()), as_bits(b.cpu())) for a, b in zip(expected, actual)):
                        return f"{what} on {numel} {dtype} elements{' with master weights' if master else ''}"
    finally:
        native.set_cpu_capability(before)
    return None


def cpu_isa_disagreement(isa: str, sizes=SELF_CHECK_SIZES) -> Optional[str]:
    """None if the native CPU kernels built for ``isa`` give the 'default' build's results bit for bit (they
    do by design: the same math, no contracted multiply-adds, the same summation order) for every operation,
    dtype, master-weights variant and size in ``sizes``; else the first case that differs."""
    from .backends import native

    def under(name, run, backend):
        native.set_cpu_capability(name)
        return run(backend, "cpu")

    return _native_disagreement(lambda run, backend: (under("default", run, backend), under(isa, run, backend)),
                                sizes, KERNEL_UPDATES)


def cuda_cpu_disagreement(device, sizes=SELF_CHECK_SIZES) -> Optional[str]:
    """None if the native CUDA kernels on ``device`` write what the native CPU kernels (default build) write,
    bit for bit, for every elementwise operation (the perturbation given the same squared norm, the restore,
    every update kernel; both compiled without contracted multiply-adds), every dtype and ``sizes``; else the
    first case that differs. The norm partials are left out: the GPU sums in another order."""
    from .backends import native

    native.set_cpu_capability("default")  # _native_disagreement puts back the build in use
    return _native_disagreement(lambda run, backend: (run(backend, "cpu"), run(backend, device)),
                                sizes, UPDATES, elementwise_only=True)


def known_answer_failure(backend, device, dtype: torch.dtype, master: bool, launches: KernelLaunches,
                         sizes=(1, 100, 4099)) -> Optional[str]:
    """None if ``backend`` matches the reference on ``device`` for the operations ``launches`` describes
    (within the tests' tolerances), else the first thing it got wrong. Small spans: a few dozen launches per
    size."""
    updates, perturbations = launches.updates, launches.perturbations
    device_hyperparameters = launches.device_hyperparameters
    try:
        for numel in sizes:
            span = make_span(numel, dtype, device, seed=numel, master=master)
            for perturbation in perturbations:
                check_sq_norm(backend, span, perturbation)
                partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
                check_perturb(backend, span, perturbation, partials)
                check_perturb(backend, span, perturbation, partials, 1024.0)
                if launches.telemetry:
                    check_perturb_sums(backend, span, perturbation, partials, 1024.0)
            check_restore(backend, span)
            for update in updates:
                span = make_span(numel, dtype, device, update, seed=numel, master=master)
                for step, grad_scale, found_inf in (SCALARS[0], SCALARS[2], SCALARS[5]):
                    check_restore_and_update(backend, span, update, step_scalars(device, step, grad_scale, found_inf))
                if launches.telemetry:
                    check_telemetry_sums(backend, span, update, step_scalars(device, 3, 1024.0))
            if device_hyperparameters:
                check_device_hyperparameters(backend, numel, dtype, device, seed=numel, master=master,
                                             perturbations=perturbations, updates=updates,
                                             rhos=[RHO] * len(perturbations), lrs=[LR] * len(updates))
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return None
