"""The native CPU backend's telemetry sums: ``restore_and_update(span, update, scalars, sums)`` writes per partial
row the sums of e^2, e * g2 and g2^2 (fused_sam/backends/base.py; the oracle: reference.telemetry_sums).

Each case runs the update twice from the same inputs, with and without ``sums``: the weights, the master and the
state must come out bit for bit the same (the sums only read), and every row of the sums must match a float64
computation of the same terms over the same chunk. Sizes around the vector width, the norm's 256-element blocks
and CPU_NORM_CHUNK; every base; bfloat16/float16 with and without float32 master weights; GradScaler's scale and
a skipped step; a reused LookSAM direction; the backup being the weights themselves.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fused_sam.backends import native as native_module
from fused_sam.backends.base import grad_unscale, math_dtype
from fused_sam.backends.native import NativeBackend
from fused_sam.backends.reference import perturbation_sums, telemetry_sums
from fused_sam.selfcheck import (
    PERTURBATIONS, UPDATES, as_bits, clone_span, dtype_configs, make_span, misaligned_span, norm_partials_for,
    perturb_scalars, restore_point, step_scalars, with_reused,
)

# isa: runs a test under each instruction set; one_thread (autouse): one thread unless a test asks for two
from test_native_backend import CPU, CHUNK, isa, needs_native, one_thread, restore_update_args  # noqa: F401

pytestmark = needs_native

# SGD with and without momentum, Adam, AdamW with AMSGrad, Adagrad: every update kernel instance's kind
BASES = (UPDATES[0], UPDATES[3], UPDATES[4], UPDATES[7], UPDATES[9])
# 1 element; around the AVX2 loop step (16 floats, 8 doubles) and the 256-element block; a chunk and a few
SIZES = (1, 15, 17, 257, CHUNK - 3, 3 * CHUNK + 21)
CONFIG_IDS = [str(dtype).replace("torch.", "") + ("-master" if master else "") for dtype, master in dtype_configs()]


def sum_terms_exactly(span, grad_scale):
    """Per chunk of CPU_NORM_CHUNK elements (the CPU's rows): (e.e, e.g2, g2.g2) in float64 from e and g2 as the
    reference forms them in the math dtype, and the sums of the terms' magnitudes (what rounding errors scale
    with)."""
    t = math_dtype(span.weights.dtype)
    e = span.weights.to(t) - (span.master if span.master is not None else span.backup.to(t))
    g = span.grads.to(t)
    if grad_scale is not None:
        g = g * grad_unscale(grad_scale).to(t)
    e, g = e.double(), g.double()
    terms = torch.stack([e * e, e * g, g * g], dim=1)
    rows = max(1, -(-span.numel // CHUNK))
    padded = terms.new_zeros(rows * CHUNK, 3)
    padded[:span.numel] = terms
    chunks = padded.view(rows, CHUNK, 3)
    return chunks.sum(1), chunks.abs().sum(1)


# Each term is one product in the math dtype (relative error <= u); a lane adds its 16 terms of a 256-element
# block in the math dtype (<= 15 u of their magnitudes), the 16 lanes fold in 4 levels (<= 4 u), and the block
# sums go to double: at most ~20 u of the sum of the terms' magnitudes, u = 2^-24 (float32 math) or 2^-53.
SUMS_RTOL = {torch.float32: 20 * 2.0**-24, torch.float64: 1e-12}


def perturbed(span, seed):
    """``span`` as the update receives it: w = the restore point + e (e ~ 0.01 g, rounded to the weights' dtype
    like a perturbation), the backup (or master) the restore point."""
    span = clone_span(span)
    e = 0.01 * torch.randn(span.numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    e = e.to(span.device)
    if span.master is not None:
        span.weights.copy_((span.master.double() + e).to(span.weights.dtype))
    else:
        span.backup.copy_(span.weights)
        span.weights.copy_((span.weights.double() + e).to(span.weights.dtype))
    return span


def run_with_and_without_sums(span, update, scalars, sums_dtype=torch.float64):
    """(the sums, the span as it entered, the span after the update with the sums, after the update without)."""
    backend = NativeBackend()
    with_sums, without = clone_span(span), clone_span(span)
    if span.backup is not None and span.backup.data_ptr() == span.weights.data_ptr():  # in place: keep it so
        with_sums = dataclasses.replace(with_sums, backup=with_sums.weights)
        without = dataclasses.replace(without, backup=without.weights)
    sums = torch.full((backend.partials_len(span), 3), math.nan, dtype=sums_dtype, device=span.device)
    entry = clone_span(with_sums)
    backend.restore_and_update(with_sums, update, scalars, sums)
    backend.restore_and_update(without, update, scalars)
    if span.backup is not None and span.backup.data_ptr() == span.weights.data_ptr():
        entry = dataclasses.replace(entry, backup=entry.weights)
    return sums, entry, with_sums, without


def assert_same_update(with_sums, without, what):
    for name, a, b in [("weights", with_sums.weights, without.weights), ("master", with_sums.master, without.master),
                       *((name, with_sums.state[name], without.state[name]) for name in without.state)]:
        if b is not None:
            assert torch.equal(as_bits(a), as_bits(b)), f"{name} differ with the sums: {what}"


def check_case(span, update, scalars, what, sums_dtype=torch.float64):
    sums, entry, with_sums, without = run_with_and_without_sums(span, update, scalars, sums_dtype)
    assert_same_update(with_sums, without, what)
    assert_rows_within_bound(sums, *sum_terms_exactly(entry, scalars.grad_scale), span.weights.dtype, what)
    return sums, entry


def assert_rows_within_bound(sums, exact, magnitude, dtype, what):
    """Each row of ``sums`` within SUMS_RTOL of the math dtype of ``dtype`` weights of the terms' ``magnitude``
    from the ``exact`` row (and a float32 row's own rounding)."""
    rtol = SUMS_RTOL[math_dtype(dtype)] + (2.0**-24 if sums.dtype == torch.float32 else 0.0)
    error = (sums.double() - exact).abs()
    assert bool((error <= rtol * magnitude).all()), (
        f"sums off by up to {float((error / magnitude.clamp_min(1e-300)).max()):.3g} of the terms' magnitudes "
        f"(rtol {rtol:.3g}): {what}\n{sums}\n{exact}")


@pytest.mark.parametrize("dtype,master", dtype_configs(), ids=CONFIG_IDS)
def test_sums_match_the_terms_and_leave_the_update_bitwise(dtype, master, isa):
    for numel in SIZES:
        for k, update in enumerate(BASES):
            span = perturbed(make_span(numel, dtype, CPU, update, seed=numel + k, master=master), seed=k)
            for step, grad_scale in ((0, None), (3, 1024.0), (5, 2.0**-3)):
                scalars = step_scalars(CPU, step, grad_scale, 0.0 if grad_scale else None)
                check_case(span, update, scalars, f"{update} on {numel} {dtype}, master {master}, scale {grad_scale}")


@pytest.mark.parametrize("dtype,master", dtype_configs(), ids=CONFIG_IDS)
def test_sums_agree_with_the_reference_oracle(dtype, master):
    """The rows summed against reference.telemetry_sums (one row, summed by torch in the math dtype): float64 to
    1e-12, the float32 math to what torch's own float32 dot may lose over 100k terms."""
    update = UPDATES[3]
    span = perturbed(make_span(3 * CHUNK + 21, dtype, CPU, update, seed=1, master=master), seed=2)
    scalars = step_scalars(CPU, 3, 1024.0, 0.0)
    sums, entry = check_case(span, update, scalars, "against the reference")
    oracle = torch.empty(1, 3, dtype=torch.float64)
    telemetry_sums(entry, scalars.grad_scale, oracle)
    rtol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(sums.sum(0), oracle[0], rtol=rtol, atol=0.0)


def test_sums_with_a_reused_direction_skip_and_in_place(isa):
    """g2 is the gradient without LookSAM's reused direction; a skipped step still writes the sums (and restores
    w bit for bit); a plain step restoring from the weights themselves has e = 0."""
    for dtype, master in dtype_configs():
        for numel in (17, CHUNK + 300):
            update = UPDATES[7]
            span = perturbed(make_span(numel, dtype, CPU, update, seed=numel, master=master), seed=3)
            reused = with_reused(span, seed=4)
            scalars = dataclasses.replace(step_scalars(CPU, 2, 512.0, 0.0),
                                          reuse_scale=torch.tensor([0.73], dtype=torch.float64))
            check_case(reused, update, scalars, f"reusing g_v, {numel} {dtype}, master {master}")
            for found_inf in (1.0, math.nan):
                skipped = step_scalars(CPU, 2, 512.0, found_inf)
                _, entry, after, _ = run_with_and_without_sums(span, update, skipped)
                assert torch.equal(as_bits(after.weights), as_bits(restore_point(entry).to(dtype)))
                for name in after.state:
                    assert torch.equal(after.state[name], entry.state[name]), name
                check_case(span, update, skipped, f"skipped (found_inf {found_inf}), {numel} {dtype}, master {master}")
            if not master:
                plain = dataclasses.replace(clone_span(span), backup=None)
                plain = dataclasses.replace(plain, backup=plain.weights)
                sums, *_ = check_case(plain, update, step_scalars(CPU, 2), f"in place, {numel} {dtype}")
                assert torch.equal(sums[:, :2], torch.zeros_like(sums[:, :2]))
                assert bool((sums[:, 2] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_float32_sums_misaligned_and_two_threads(dtype):
    """A float32 sums buffer (a float32 span sharing a device with none in float64), buffers starting off a
    vector boundary, and two threads taking chunks."""
    torch.set_num_threads(2)  # undone by the one_thread fixture
    update = UPDATES[4]
    span = misaligned_span(perturbed(make_span(5 * CHUNK + 77, dtype, CPU, update, seed=8), seed=9), 3)
    assert span.weights.data_ptr() % 32 != 0
    check_case(span, update, step_scalars(CPU, 1, 1024.0, 0.0), f"misaligned {dtype}", sums_dtype=torch.float32)


def assert_same_bits_on_every_isa_and_thread_count(runs):
    """``runs``: {key: run() -> sums}; each gives the same bits under every instruction set and 1 or 2 threads."""
    before = native_module.cpu_capability()
    results = {}
    try:
        for isa_name in native_module.cpu_capabilities():
            for n_threads in (1, 2):
                native_module.set_cpu_capability(isa_name)
                torch.set_num_threads(n_threads)
                for key, run in runs.items():
                    results.setdefault(key, []).append(((isa_name, n_threads), run()))
    finally:
        native_module.set_cpu_capability(before)
    for key, sums_of in results.items():
        (first, expected), *others = sums_of
        for which, sums in others:
            assert torch.equal(as_bits(sums), as_bits(expected)), f"{key}: {which} differs from {first}"


def test_sums_are_the_same_bits_on_every_isa_and_thread_count():
    """Each chunk is summed by one thread in the norm's fixed lanes, whatever the instruction set."""
    def run_of(span):
        return lambda: run_with_and_without_sums(span, UPDATES[7], step_scalars(CPU, 1, 1024.0, 0.0))[0]

    assert_same_bits_on_every_isa_and_thread_count({
        (dtype, master): run_of(perturbed(make_span(4 * CHUNK + 333, dtype, CPU, UPDATES[7], seed=5, master=master), 6))
        for dtype, master in dtype_configs()})


def test_empty_span_writes_a_row_of_zeros():
    update = UPDATES[1]
    span = make_span(0, torch.float32, CPU, update)
    span.backup.copy_(span.weights)
    sums = torch.full((1, 3), math.nan, dtype=torch.float64)
    NativeBackend().restore_and_update(span, update, step_scalars(CPU, 0), sums)
    assert torch.equal(sums, torch.zeros(1, 3, dtype=torch.float64))


def _op_args(span, update, sums, scalars=None):
    scalars = scalars or step_scalars(CPU, 1)
    state = [span.state[name] for name in update.needed_state()]
    return (*restore_update_args(update, span.weights, span.backup, span.master, span.grads, state, scalars.step),
            sums)


def test_bad_sums_are_refused():
    update = UPDATES[1]
    span = perturbed(make_span(2 * CHUNK + 1, torch.float32, CPU, update), seed=0)
    op = torch.ops.fused_sam.restore_update
    cases = [
        (torch.zeros(2, 3), "sums has 2 rows; a span of 65537 elements on cpu writes 3"),
        (torch.zeros(3, 3, dtype=torch.float16), "sums must be float32 or float64, got Half"),
        (torch.zeros(3, 2), r"sums must be a contiguous tensor of shape \(rows, 3\), got shape \[3, 2\]"),
        (torch.zeros(9), r"sums must be a contiguous tensor of shape \(rows, 3\), got shape \[9\]"),
        (torch.zeros(3, 6)[:, ::2], "sums must be a contiguous tensor of shape"),
    ]
    for sums, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*_op_args(span, update, sums))
    doubles = perturbed(make_span(10, torch.float64, CPU, update), seed=0)
    with pytest.raises(RuntimeError, match="sums of float64 weights must be float64, got Float"):
        op(*_op_args(doubles, update, torch.zeros(1, 3)))
    with pytest.raises(RuntimeError, match="sums is on meta, the weights on cpu"):
        op(*_op_args(span, update, torch.zeros(3, 3, device="meta")))


@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_opcheck_with_sums(master):
    """The schema's alias annotation on sums (it is written), its fake-tensor kernel, and its autograd
    registration, for a plain and a skipped update."""
    dtype = torch.bfloat16 if master else torch.float32
    update = UPDATES[4]
    span = perturbed(make_span(1000, dtype, CPU, update, seed=1, master=master), seed=2)
    for found_inf in (0.0, 1.0):
        scalars = step_scalars(CPU, 1, 1024.0, found_inf)
        state = [span.state[name] for name in update.needed_state()]
        args = (*restore_update_args(update, span.weights.clone(), span.backup, None if span.master is None else
                                     span.master.clone(), span.grads, [s.clone() for s in state], scalars.step,
                                     scalars.grad_scale, scalars.found_inf), torch.zeros(1, 3, dtype=torch.float64))
        torch.library.opcheck(torch.ops.fused_sam.restore_update.default, args)


# --- perturb's sums: e.g1 with e as written -----------------------------------------------------------------
# ``perturb(span, perturbation, partials, count, scalars, sums)`` writes per partial the sum of e * g, e = the
# weights as written (rounded to their dtype) minus the restore point, g the gradient as given (scaled); zeros
# when the norm is not finite (fused_sam/backends/base.py; the oracle: reference.perturbation_sums).

PERTURB_SCALES = (None, 1024.0)


def perturb_terms_exactly(entry, after):
    """Per chunk of CPU_NORM_CHUNK elements: the float64 sum of e * g, e formed in the math dtype as the
    reference forms it (the weights ``after`` perturb minus ``entry``'s restore point: its master, or its
    weights), g as given; and the sum of the terms' magnitudes."""
    t = math_dtype(entry.weights.dtype)
    point = entry.master if entry.master is not None else entry.weights.to(t)
    terms = (after.weights.to(t) - point).double() * entry.grads.to(t).double()
    rows = max(1, -(-entry.numel // CHUNK))
    padded = terms.new_zeros(rows * CHUNK)
    padded[:entry.numel] = terms
    chunks = padded.view(rows, CHUNK)
    return chunks.sum(1), chunks.abs().sum(1)


def perturb_with_and_without_sums(span, perturbation, partials, grad_scale, sums_dtype=torch.float64):
    """(the sums, the span after perturb with them, after perturb without, the two non-finite counters)."""
    backend = NativeBackend()
    with_sums, without = clone_span(span), clone_span(span)
    counts = [torch.zeros(1, dtype=torch.int32, device=span.device) for _ in range(2)]
    sums = torch.full((backend.partials_len(span),), math.nan, dtype=sums_dtype, device=span.device)
    scalars = perturb_scalars(span.device, grad_scale)
    backend.perturb(with_sums, perturbation, partials, counts[0], scalars, sums)
    backend.perturb(without, perturbation, partials, counts[1], scalars)
    return sums, with_sums, without, counts


def check_perturb_case(span, perturbation, grad_scale, what, sums_dtype=torch.float64, extra=0.0):
    partials = norm_partials_for(span, perturbation, extra) if perturbation.normalize else None
    sums, with_sums, without, counts = perturb_with_and_without_sums(span, perturbation, partials, grad_scale,
                                                                     sums_dtype)
    for name, a, b in (("weights", with_sums.weights, without.weights), ("backup", with_sums.backup, without.backup),
                       ("master", with_sums.master, without.master), ("count", *counts)):
        if b is not None:
            assert torch.equal(as_bits(a), as_bits(b)), f"{name} differ with the sums: {what}"
    assert_rows_within_bound(sums, *perturb_terms_exactly(span, with_sums), span.weights.dtype, what)
    return sums, with_sums


@pytest.mark.parametrize("dtype,master", dtype_configs(), ids=CONFIG_IDS)
def test_perturb_sums_match_the_terms_and_leave_the_perturbation_bitwise(dtype, master, isa):
    """Every perturbation (SAM, ASAM with and without eta, USAM), with and without GradScaler's scale. e is as
    written: for bfloat16/float16 the rounding of w + e minus w (with a master, its rounding error included,
    which is far larger than the tolerance), so an unrounded e fails."""
    for numel in SIZES:
        span = make_span(numel, dtype, CPU, seed=numel, master=master)
        for perturbation in PERTURBATIONS:
            for grad_scale in PERTURB_SCALES:
                check_perturb_case(span, perturbation, grad_scale,
                                   f"{perturbation} on {numel} {dtype}, master {master}, scale {grad_scale}")


@pytest.mark.parametrize("dtype,master", dtype_configs(), ids=CONFIG_IDS)
def test_perturb_sums_agree_with_the_reference_oracle(dtype, master):
    """The rows summed against reference.perturbation_sums (torch's dot in the math dtype), on the weights the
    native perturb wrote."""
    span = make_span(3 * CHUNK + 21, dtype, CPU, seed=1, master=master)
    sums, after = check_perturb_case(span, PERTURBATIONS[1], 1024.0, "against the reference")
    oracle = torch.empty(1, dtype=torch.float64)
    perturbation_sums(after, oracle)
    torch.testing.assert_close(sums.sum(), oracle[0], rtol=1e-12 if dtype == torch.float64 else 1e-4, atol=0.0)


def test_perturb_sums_of_a_nonfinite_norm_are_zeros(isa):
    """No perturbation (the total is inf or NaN): the sums are zeros, also where g is not finite (not 0 * inf)
    and with a master (not its rounding error); the counter still counts."""
    for dtype, master in dtype_configs():
        for numel in (17, CHUNK + 300):
            span = make_span(numel, dtype, CPU, seed=numel, master=master)
            span.grads[numel // 2] = math.inf
            for extra in (math.inf, math.nan):
                partials = norm_partials_for(span, PERTURBATIONS[0], extra)
                sums, with_sums, without, counts = perturb_with_and_without_sums(span, PERTURBATIONS[0], partials,
                                                                                 1024.0)
                assert torch.equal(sums, torch.zeros_like(sums)), f"{dtype}, master {master}, norm + {extra}"
                assert torch.equal(as_bits(with_sums.weights), as_bits(without.weights))
                assert counts[0].item() == counts[1].item() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_perturb_float32_sums_misaligned_and_two_threads(dtype):
    """A float32 sums buffer, buffers starting off a vector boundary, and two threads taking chunks."""
    torch.set_num_threads(2)  # undone by the one_thread fixture
    span = misaligned_span(make_span(5 * CHUNK + 77, dtype, CPU, seed=8), 3)
    assert span.weights.data_ptr() % 32 != 0
    for perturbation in PERTURBATIONS:
        check_perturb_case(span, perturbation, 1024.0, f"misaligned {dtype}, {perturbation}",
                           sums_dtype=torch.float32)


def test_perturb_sums_past_the_streaming_size():
    """A span large enough for streaming stores (CPU_STREAM_MIN_ELEMS): chunks starting on a 32-byte boundary
    stream the buffer perturb only writes (the backup; with a master, the weights), the others store it plainly
    (a span one element off); both bitwise as without the sums."""
    numel = (1 << 22) + 1000
    for dtype, master, offset in ((torch.float32, False, 0), (torch.bfloat16, True, 0), (torch.float32, False, 1)):
        span = make_span(numel, dtype, CPU, seed=3, master=master)
        if offset:
            span = misaligned_span(span, offset)
        check_perturb_case(span, PERTURBATIONS[0], None, f"{numel} {dtype}, master {master}, offset {offset}")


def test_perturb_sums_are_the_same_bits_on_every_isa_and_thread_count():
    def run_of(span, perturbation):
        # the same partials for every run (torch's reference norm may round differently on two threads)
        partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
        return lambda: perturb_with_and_without_sums(span, perturbation, partials, 1024.0)[0]

    runs = {}
    for dtype, master in dtype_configs():
        span = make_span(4 * CHUNK + 333, dtype, CPU, seed=5, master=master)
        for k, perturbation in enumerate(PERTURBATIONS):
            runs[dtype, master, k] = run_of(span, perturbation)
    assert_same_bits_on_every_isa_and_thread_count(runs)


def test_perturb_of_an_empty_span_writes_a_zero():
    span = make_span(0, torch.float32, CPU)
    sums = torch.full((1,), math.nan, dtype=torch.float64)
    NativeBackend().perturb(span, PERTURBATIONS[3], None, None, perturb_scalars(CPU), sums)
    assert torch.equal(sums, torch.zeros(1, dtype=torch.float64))


def _perturb_op_args(span, sums, adaptive=False):
    partials = None if span.numel == 0 else norm_partials_for(span, PERTURBATIONS[0])
    return (span.weights, span.grads, span.backup, span.master, partials, torch.zeros(1, dtype=torch.int32),
            torch.tensor([1024.0]), adaptive, 0.01, True, 1e-12, 0.05, None, sums)


def test_bad_perturb_sums_are_refused():
    span = make_span(2 * CHUNK + 1, torch.float32, CPU, seed=0)
    op = torch.ops.fused_sam.perturb
    cases = [
        (torch.zeros(2), "sums has 2 elements; a span of 65537 elements on cpu writes 3"),
        (torch.zeros(3, dtype=torch.float16), "sums must be float32 or float64, got Half"),
        (torch.zeros(3, 1), r"sums must be a contiguous 1-D tensor, got shape \[3, 1\]"),
        (torch.zeros(6)[::2], r"sums must be a contiguous 1-D tensor, got shape \[3\] strides \[2\]"),
        (torch.zeros(3, device="meta"), "sums is on meta, the weights on cpu"),
    ]
    for sums, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*_perturb_op_args(span, sums))
    doubles = make_span(10, torch.float64, CPU, seed=0)
    with pytest.raises(RuntimeError, match="sums of float64 weights must be float64, got Float"):
        op(*_perturb_op_args(doubles, torch.zeros(1)))


@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_opcheck_perturb_with_sums(master):
    """The schema's alias annotation on perturb's sums, its fake-tensor kernel and autograd registration."""
    span = make_span(1000, torch.bfloat16 if master else torch.float32, CPU, seed=1, master=master)
    for adaptive in (False, True):
        args = _perturb_op_args(clone_span(span), torch.zeros(1, dtype=torch.float64), adaptive)
        torch.library.opcheck(torch.ops.fused_sam.perturb.default, args)
