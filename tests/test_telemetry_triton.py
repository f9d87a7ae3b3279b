"""The triton backend's telemetry sums (``restore_and_update(..., sums)``, see ``Backend.restore_and_update``,
and ``perturb(..., sums)``, see ``Backend.perturb``) against an exact float64 sum of the same float32 terms and
against the reference backend's ``telemetry_sums`` / ``perturbation_sums``; the update or perturbation itself
is bit for bit that of the call without sums. Without a GPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py), so sizes stay small; tests/test_triton_gpu.py repeats
the comparison on CUDA tensors.

Tolerance (float32 math): the elementwise terms e = w - restore point and g2 = g * unscale are computed with
the same float32 roundings as the reference, so only the summation differs. The kernel sums each product
(one float32 rounding) into a per-lane accumulator (one rounding per block a program visits, at most 3 here)
and reduces the 4096 lanes with tl.sum (at most 16 sequential adds within a thread, 5 warp-shuffle levels,
3 cross-warp levels): under 64 roundings along any path, so |sum - exact| <= 64 u sum|terms|, u = 2^-24
(Higham's bound for a summation tree of that depth). A wrong term (the sign of g2, a missing unscale, e
against the wrong restore point) is off by O(sum|terms|).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from fused_sam.selfcheck import (  # noqa: E402
    PERTURBATIONS, UPDATES, clone_span, make_span, norm_partials_for, perturb_scalars, step_scalars, with_reused,
)

from fused_sam.backends import triton as triton_backend  # noqa: E402
from fused_sam.backends.base import Span, grad_unscale  # noqa: E402
from fused_sam.backends.reference import perturbation_sums, telemetry_sums  # noqa: E402
from fused_sam.backends.triton import BLOCK  # noqa: E402
from test_triton_backend import BACKEND, DEVICE  # noqa: E402  (skips this module where that one is skipped)

WEIGHTS = [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
           (torch.float16, True)]
SIZES = [1, 37, BLOCK + 3]  # one element; not a multiple of 16; two blocks (two programs, two rows), a tail
# (step, grad_scale, found_inf, sums dtype): plain; GradScaler scales above and below 1; a skipped step (its
# sums are still written). A float64 buffer is what a float32 span gets when a float64 span shares the device.
SCALARS = [(0, None, None, torch.float32), (3, 1024.0, 0.0, torch.float64), (3, 2.0**-3, None, torch.float32),
           (5, 512.0, 1.0, torch.float64)]
ROUNDING_DEPTH = 64
U = 2.0**-24


def perturbed_span(numel, dtype, master, update, seed):
    """A span as second_step sees it: weights w + e (e ~ 0.05), the restore point w (the backup, or the
    float32 master, the weights then the rounding of master + e)."""
    span = make_span(numel, dtype, DEVICE, update, seed=seed, master=master)
    gen = torch.Generator().manual_seed(seed + 1000)
    e = (0.05 * torch.randn(numel, generator=gen, dtype=torch.float64)).float().to(DEVICE)
    if master:
        span.weights.copy_(span.master + e)
        return span
    span.backup.copy_(span.weights.float() - e)
    return span


def exact_terms(span, grad_scale):
    """(e.e, e.g2, g2.g2) per element in float64, e and g2 rounded to float32 as the math is (the products
    and their sums then exact to ~1e-16)."""
    restore = span.master if span.master is not None else span.backup
    e = (span.weights.float() - restore.float()).double()
    g = span.grads.float()
    if grad_scale is not None:
        g = g * grad_unscale(grad_scale)
    g = g.double()
    return torch.stack([e * e, e * g, g * g])


def assert_sums_close(actual, terms, what, expected=None, roundings=ROUNDING_DEPTH):
    """``actual`` (3 sums) within ``roundings`` float32 roundings of ``expected`` (default: the exact sums of
    ``terms``, 3 x n), each sum's error bound ``roundings`` u sum|terms|."""
    expected = terms.sum(dim=1) if expected is None else expected.double()
    bound = roundings * U * terms.abs().sum(dim=1).cpu()
    error = (actual.double().cpu() - expected.cpu()).abs()
    assert (error <= bound).all(), (f"{what}: sums {actual.tolist()}, expected {expected.tolist()}, "
                                    f"bound {bound.tolist()}")


def assert_same_bits(a: Span, b: Span, what):
    """Every buffer of ``a`` holds ``b``'s bits (the update with sums is the update without them)."""
    for name in ("weights", "grads", "backup", "master", "reused"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None:
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{name} differs: {what}"
    for name in a.state:
        assert torch.equal(a.state[name].view(torch.uint8), b.state[name].view(torch.uint8)), f"{name} differs: {what}"


def run_with_and_without_sums(span, update, scalars, sums_dtype):
    """The sums of the update of a copy of ``span``, checking that the update without sums gives the same
    bits and that the NaN poison of the buffer is gone."""
    with_sums, without = clone_span(span), clone_span(span)
    if span.backup is span.weights:  # the aliasing survives the clone
        with_sums = dataclasses.replace(with_sums, backup=with_sums.weights)
        without = dataclasses.replace(without, backup=without.weights)
    sums = torch.full((BACKEND.partials_len(span), 3), float("nan"), dtype=sums_dtype, device=DEVICE)
    BACKEND.restore_and_update(with_sums, update, scalars, sums)
    BACKEND.restore_and_update(without, update, scalars)
    assert not sums.isnan().any(), "restore_and_update left telemetry rows unwritten (NaN poison survived)"
    assert_same_bits(with_sums, without, f"{update}, sums {sums_dtype}")
    return sums


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 cast to inf
@pytest.mark.parametrize("update", UPDATES, ids=str)
def test_sums_match_exact_and_reference_and_leave_the_update_bitwise(update):
    """Every fused base (maximize included: g2 is not negated), every weight dtype with and without a master,
    three sizes, with and without a GradScaler scale, a skipped step."""
    for k, ((dtype, master), numel) in enumerate([(w, n) for w in WEIGHTS for n in SIZES]):
        span = perturbed_span(numel, dtype, master, update, seed=k)
        for step, grad_scale, found_inf, sums_dtype in SCALARS:
            scalars = step_scalars(DEVICE, step, grad_scale, found_inf)
            what = (f"{update}, {dtype}{' master' if master else ''}, {numel} elements, scale {grad_scale}, "
                    f"found_inf {found_inf}")
            sums = run_with_and_without_sums(span, update, scalars, sums_dtype)
            total, terms = sums.double().sum(dim=0), exact_terms(span, scalars.grad_scale)
            assert_sums_close(total, terms, what)
            # the reference's own float32 sums (a dot product, within ~6 u sum|terms| of exact here): the two
            # within both their bounds of each other
            reference = torch.empty(1, 3, dtype=torch.float32, device=DEVICE)
            telemetry_sums(span, scalars.grad_scale, reference)
            assert_sums_close(total, terms, f"against the reference, {what}", reference[0], 2 * ROUNDING_DEPTH)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backup_aliasing_the_weights_gives_zero_perturbation(dtype):
    """A plain step restores from w itself (backup is the weights tensor): e = 0, so e.e and e.g2 are 0
    exactly, g2.g2 is the unscaled gradient's; the update is the one without sums."""
    update = UPDATES[5]
    span = make_span(BLOCK + 3, dtype, DEVICE, update, seed=3)
    span = dataclasses.replace(span, backup=span.weights)
    for step, grad_scale, found_inf, sums_dtype in SCALARS:
        scalars = step_scalars(DEVICE, step, grad_scale, found_inf)
        sums = run_with_and_without_sums(span, update, scalars, sums_dtype)
        assert torch.equal(sums[:, :2], torch.zeros_like(sums[:, :2])), f"e != 0 with grad_scale {grad_scale}"
        assert_sums_close(sums.double().sum(dim=0), exact_terms(span, scalars.grad_scale), "aliased backup")


def test_reused_direction_is_left_out_of_g2():
    """LookSAM's reuse step: the update uses g + c g_v, the sums g alone (the second gradient)."""
    update = UPDATES[1]
    span = with_reused(perturbed_span(BLOCK + 3, torch.float32, False, update, seed=4), seed=5)
    scalars = dataclasses.replace(step_scalars(DEVICE, 3, 1024.0, 0.0),
                                  reuse_scale=torch.tensor([0.7310585786300049], dtype=torch.float64, device=DEVICE))
    sums = run_with_and_without_sums(span, update, scalars, torch.float32)
    assert_sums_close(sums.double().sum(dim=0), exact_terms(span, scalars.grad_scale), "reused direction")


@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_each_program_writes_its_row_over_several_blocks(monkeypatch, master):
    """With the row cap at 3, each program strides over blocks k, k + 3, ... as the norm kernel does, and
    row k holds exactly those blocks' sums: partials_len rows, all written."""
    monkeypatch.setattr(triton_backend, "MAX_PARTIALS", 3)
    numel = 7 * BLOCK + 5
    update = UPDATES[7]
    span = perturbed_span(numel, torch.bfloat16, master, update, seed=6)
    scalars = step_scalars(DEVICE, 3, 1024.0, 0.0)
    sums = run_with_and_without_sums(span, update, scalars, torch.float64)
    assert sums.shape == (3, 3)
    block_of = torch.arange(numel, device=DEVICE) // BLOCK
    terms = exact_terms(span, scalars.grad_scale)
    for row in range(3):
        assert_sums_close(sums[row], terms[:, block_of % 3 == row], f"row {row}")


@pytest.mark.parametrize("bad, match", [
    (lambda rows: torch.zeros(rows, 3, dtype=torch.bfloat16), "float32 or float64"),
    (lambda rows: torch.zeros(rows + 1, 3), r"\(2, 3\)"),
    (lambda rows: torch.zeros(rows * 3), r"\(2, 3\)"),
    (lambda rows: torch.zeros(3, rows).t(), "contiguous"),
])
def test_refuses_sums_it_would_write_wrongly(bad, match):
    update = UPDATES[0]
    span = perturbed_span(BLOCK + 3, torch.float32, False, update, seed=7)
    with pytest.raises(ValueError, match=match):
        BACKEND.restore_and_update(span, update, step_scalars(DEVICE), bad(BACKEND.partials_len(span)).to(DEVICE))


# --- perturb: e.g1, e as written to the weights -----------------------------------------------------------

SAM, ASAM, USAM = PERTURBATIONS[0], PERTURBATIONS[1], PERTURBATIONS[3]
# (GradScaler scale, sums dtype): the gradient as given is scaled; a float32 span may get a float64 buffer
PERTURB_SCALARS = [(None, torch.float32), (1024.0, torch.float64)]


def gradient_span(numel, dtype, master, grad_scale, seed):
    """A span as first_step sees it, its gradient scaled by ``grad_scale`` as GradScaler leaves it."""
    span = make_span(numel, dtype, DEVICE, seed=seed, master=master)
    if grad_scale is not None:
        span.grads.mul_(grad_scale)
    return span


def perturb_with_and_without_sums(span, perturbation, partials, scalars, sums_dtype):
    """(sums, the perturbed copy of ``span``) of perturb with sums, checking that perturb without them gives
    the same bits and non-finite count and that the NaN poison of the buffer is gone."""
    with_sums, without = clone_span(span), clone_span(span)
    counts = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    sums = torch.full((BACKEND.partials_len(span),), float("nan"), dtype=sums_dtype, device=DEVICE)
    BACKEND.perturb(with_sums, perturbation, partials, None if partials is None else counts[0:1], scalars, sums)
    BACKEND.perturb(without, perturbation, partials, None if partials is None else counts[1:2], scalars)
    assert not sums.isnan().any(), "perturb left telemetry elements unwritten (NaN poison survived)"
    assert_same_bits(with_sums, without, f"perturb({perturbation}), sums {sums_dtype}")
    assert counts[0] == counts[1], "the non-finite count changed with sums"
    return sums, with_sums


def exact_perturb_terms(before, after):
    """e.g1 per element in float64 (1 x n): e = the weights ``after`` perturb wrote them, in float32, minus the
    restore point ``before`` it (the master, or the weights on entry), float32 as the math; g1 the gradient as
    given (scaled)."""
    restore = before.master if before.master is not None else before.weights
    e = after.weights.float() - restore.float()
    return (e.double() * before.grads.float().double()).unsqueeze(0)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 cast to inf
@pytest.mark.parametrize("perturbation", [SAM, ASAM, USAM], ids=["sam", "asam", "usam"])
def test_perturb_sums_match_exact_and_reference_and_leave_the_perturbation_bitwise(perturbation):
    """Every weight dtype with and without a master, three sizes, with and without a GradScaler scale."""
    for k, ((dtype, master), numel) in enumerate([(w, n) for w in WEIGHTS for n in SIZES]):
        for grad_scale, sums_dtype in PERTURB_SCALARS:
            span = gradient_span(numel, dtype, master, grad_scale, seed=k)
            partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
            what = (f"perturb({perturbation}), {dtype}{' master' if master else ''}, {numel} elements, "
                    f"scale {grad_scale}")
            sums, perturbed = perturb_with_and_without_sums(span, perturbation, partials,
                                                            perturb_scalars(DEVICE, grad_scale), sums_dtype)
            terms = exact_perturb_terms(span, perturbed)
            assert terms.abs().sum() > 0, f"{what}: nothing was perturbed, the test would prove nothing"
            total = sums.double().sum().reshape(1)
            assert_sums_close(total, terms, what)
            reference = torch.empty(1, dtype=torch.float32, device=DEVICE)
            perturbation_sums(perturbed, reference)
            assert_sums_close(total, terms, f"against the reference, {what}", reference, 2 * ROUNDING_DEPTH)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturb_sums_take_e_after_rounding(dtype):
    """Weights of 256, where an ulp is 2 (bfloat16) or 0.25 (float16), and |e| <= rho = 0.05: every w + e
    rounds back to w, so e as written is 0 and so are the sums, exactly (e before rounding gives rho |g1|)."""
    span = make_span(BLOCK + 3, dtype, DEVICE, seed=8)
    span.weights.fill_(256.0)
    sums, perturbed = perturb_with_and_without_sums(span, SAM, norm_partials_for(span, SAM),
                                                    perturb_scalars(DEVICE), torch.float32)
    assert torch.equal(perturbed.weights, span.weights)
    assert torch.equal(sums, torch.zeros_like(sums))


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)], ids=["float32", "master"])
@pytest.mark.parametrize("extra", [float("inf"), float("nan")])
def test_perturb_sums_with_a_non_finite_norm(dtype, master, extra):
    """A non-finite norm: e = 0, so the weights keep their value and the sums are 0 exactly; with a master
    the weights become the master's rounding, and e as written (that rounding minus the master) is summed."""
    span = gradient_span(BLOCK + 3, dtype, master, 1024.0, seed=9)
    sums, perturbed = perturb_with_and_without_sums(span, SAM, norm_partials_for(span, SAM, extra),
                                                    perturb_scalars(DEVICE, 1024.0), torch.float64)
    terms = exact_perturb_terms(span, perturbed)
    if master:
        assert terms.abs().sum() > 0
        assert_sums_close(sums.double().sum().reshape(1), terms, f"non-finite norm ({extra}), master")
    else:
        assert torch.equal(perturbed.weights, span.weights)
        assert torch.equal(sums, torch.zeros_like(sums))


@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_perturb_each_program_writes_its_element_over_several_blocks(monkeypatch, master):
    """With the row cap at 3, program k strides over blocks k, k + 3, ... and element k holds exactly those
    blocks' e.g1."""
    monkeypatch.setattr(triton_backend, "MAX_PARTIALS", 3)
    numel = 7 * BLOCK + 5
    span = gradient_span(numel, torch.bfloat16, master, 1024.0, seed=10)
    partials = norm_partials_for(span, ASAM)
    sums, perturbed = perturb_with_and_without_sums(span, ASAM, partials, perturb_scalars(DEVICE, 1024.0),
                                                    torch.float32)
    assert sums.shape == (3,)
    block_of = torch.arange(numel, device=DEVICE) // BLOCK
    terms = exact_perturb_terms(span, perturbed)
    for row in range(3):
        assert_sums_close(sums[row:row + 1], terms[:, block_of % 3 == row], f"element {row}")


@pytest.mark.parametrize("bad, match", [
    (lambda rows: torch.zeros(rows, dtype=torch.bfloat16), "float32 or float64"),
    (lambda rows: torch.zeros(rows + 1), r"\(2,\)"),
    (lambda rows: torch.zeros(rows, 3), r"\(2,\)"),
    (lambda rows: torch.zeros(2 * rows)[::2], "contiguous"),
])
def test_perturb_refuses_sums_it_would_write_wrongly(bad, match):
    span = make_span(BLOCK + 3, torch.float32, DEVICE, seed=11)
    with pytest.raises(ValueError, match=match):
        BACKEND.perturb(span, USAM, None, None, perturb_scalars(DEVICE), bad(BACKEND.partials_len(span)).to(DEVICE))
