"""The triton backend's telemetry sums (``restore_and_update(..., sums)``, see ``Backend.restore_and_update``)
against an exact float64 sum of the same float32 terms and against the reference backend's ``telemetry_sums``;
the update itself is bit for bit that of the call without sums. Without a GPU the kernels run in Triton's
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

from fused_sam.selfcheck import UPDATES, clone_span, make_span, step_scalars, with_reused  # noqa: E402

from fused_sam.backends import triton as triton_backend  # noqa: E402
from fused_sam.backends.base import Span, grad_unscale  # noqa: E402
from fused_sam.backends.reference import telemetry_sums  # noqa: E402
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
