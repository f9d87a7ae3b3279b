"""The native backend's CUDA kernels (skipped without a CUDA GPU, or when fused_sam._C has no CUDA kernels).

Parity with the reference backend around the kernels' vector width and block sizes, misaligned spans
(the scalar fallback), determinism of the two-stage norm, the non-finite counter across many blocks,
non-default streams, CUDA-graph capture (nothing syncs with the host, and a replay reads the step values,
and lr / rho given as tensors, that the tensors hold then), lr / rho tensors bit for bit the floats, step,
lr and rho tensors and masters on the wrong device, LookSAM's reused direction (misaligned alone, and it or
its scale on the wrong device), opcheck on CUDA tensors, and optimizer-level parity in float32 and bfloat16.
Master weights (float32 masters of bfloat16/float16 weights) go through each of these too, and their roundings
are checked bit for bit.
"""
from __future__ import annotations

import dataclasses

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

from fused_sam.selfcheck import (
    PERTURBATIONS, RHO, TOLERANCE, UPDATES, check_all_ops, check_device_hyperparameters, check_master_roundings,
    clone_span, device_hyperparameter, make_span, norm_partials_for, perturb_scalars, restore_point, step_scalars,
)
from models import batches, loss_of, mlp
from test_native_backend import (
    HYPERPARAMETER_CASES, HYPERPARAMETER_IDS, HYPERPARAMETER_OPS, MASTER_DTYPES, MASTER_IDS, RESTORE_POINT_OPS,
    REUSE_OPS, _call_with_hyperparameter, _call_with_reuse, masters_of, needed, op_name, restore_point_call,
    restore_update_args,
)
import test_telemetry_native as telemetry

from fused_sam import FusedSAM
from fused_sam.backends import native as native_module
from fused_sam.backends.base import Span, StepScalars
from fused_sam.backends.native import NativeBackend
from fused_sam.backends.reference import ReferenceBackend
from fused_sam.updates import AdamUpdate, SGDUpdate

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
_REASON = NativeBackend.unavailable_reason(torch.device("cuda"), torch.float32)
if _REASON:
    pytest.skip(f"native CUDA kernels unavailable: {_REASON}", allow_module_level=True)

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
_C = native_module._C
BLOCK = _C.CUDA_NORM_BLOCK_ELEMS
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NATIVE, REFERENCE = NativeBackend(), ReferenceBackend()


SIZES = [1, 7, 4095, BLOCK + 1, 1_000_003]
TELEMETRY_BASES = telemetry.BASES


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("numel", SIZES)
def test_ops_match_reference(numel, dtype):
    check_all_ops(NATIVE, numel, dtype, CUDA, seed=numel % 89)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
@pytest.mark.parametrize("numel", SIZES)
def test_master_ops_match_reference(numel, dtype):
    check_all_ops(NATIVE, numel, dtype, CUDA, seed=numel % 89, master=True)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
def test_master_roundings_bitwise(dtype):
    """The CUDA kernels round with c10's device conversions: the same bits as torch's .to()."""
    check_master_roundings(NATIVE, CUDA, dtype)


@pytest.mark.parametrize("dtype,master", HYPERPARAMETER_CASES, ids=HYPERPARAMETER_IDS)
@pytest.mark.parametrize("numel", [1, 7, 4095, BLOCK + 1])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise(numel, dtype, master):
    """lr_tensor / rho_tensor read inside the kernels (rho in every thread, lr by each block's parameter
    builder) give the float path's results bit for bit, in the vector and the tail loops."""
    check_device_hyperparameters(NATIVE, numel, dtype, CUDA, seed=numel % 89, master=master)


def _offset_span(numel, dtype, offset, update=None, seed=0, master=False):
    """A span whose tensors start ``offset`` elements into larger buffers (not 16-byte aligned)."""
    base = make_span(numel + offset, dtype, CUDA, update, seed=seed, master=master)
    if base.backup is not None:
        base.backup.copy_(base.weights)  # restore_and_update reads the backup (make_span poisons it)

    def cut(t):
        return None if t is None else t[offset:]

    return Span(weights=cut(base.weights), grads=cut(base.grads), backup=cut(base.backup),
                state={k: cut(v) for k, v in base.state.items()}, master=cut(base.master))


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False),
                                          (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "bfloat16", "float64", "bfloat16-master", "float16-master"])
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_spans(dtype, master, offset):
    n = 3 * BLOCK + 11
    tol = TOLERANCE[dtype]
    span = _offset_span(n, dtype, offset, master=master)
    out = torch.empty(NATIVE.partials_len(span), dtype=span.state_dtype, device=CUDA)
    NATIVE.sq_norm_partials(span, PERTURBATIONS[1], out)
    ref = torch.empty(1, dtype=span.state_dtype, device=CUDA)
    REFERENCE.sq_norm_partials(clone_span(span), PERTURBATIONS[1], ref)
    torch.testing.assert_close(out.sum(), ref.sum(), rtol=1e-5, atol=0)
    cand = _offset_span(n, dtype, offset, master=master)
    expect = clone_span(cand)
    NATIVE.perturb(cand, PERTURBATIONS[1], out, None, perturb_scalars(CUDA))
    REFERENCE.perturb(expect, PERTURBATIONS[1], out, None, perturb_scalars(CUDA))
    torch.testing.assert_close(cand.weights, expect.weights, rtol=tol[0], atol=tol[1])
    assert torch.equal(restore_point(cand), restore_point(expect))
    NATIVE.restore(cand)
    assert torch.equal(cand.weights, restore_point(expect).to(dtype))
    # plain, unscaled by a GradScaler, and skipped (the skip restores the weights in the scalar fallback too)
    for grad_scale, found_inf in ((None, None), (1024.0, 0.0), (1024.0, 1.0)):
        scalars = step_scalars(CUDA, 3, grad_scale, found_inf)
        for update in (UPDATES[3], UPDATES[7]):
            cand = _offset_span(n, dtype, offset, update, master=master)
            expect = clone_span(cand)
            NATIVE.restore_and_update(cand, update, scalars)
            REFERENCE.restore_and_update(expect, update, scalars)
            if found_inf:
                assert torch.equal(cand.weights, expect.weights)
                assert all(torch.equal(cand.state[k], expect.state[k]) for k in expect.state)
            torch.testing.assert_close(cand.weights, expect.weights, rtol=tol[0], atol=tol[1])
            if master:
                torch.testing.assert_close(cand.master, expect.master, rtol=2e-6, atol=1e-7)
                assert torch.equal(cand.weights, cand.master.to(dtype))
            for k in expect.state:
                torch.testing.assert_close(cand.state[k], expect.state[k], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-master"])
def test_misaligned_reused_direction(dtype, master):
    """A reused direction g_v that alone is not 16-byte aligned sends the update to the scalar fallback (a
    vector load of it would fault)."""
    n = 3 * BLOCK + 11
    g_v = torch.randn(n + 1, generator=torch.Generator().manual_seed(7)).to(CUDA)[1:]
    scalars = dataclasses.replace(step_scalars(CUDA, 3), reuse_scale=torch.tensor([0.7], dtype=torch.float64, device=CUDA))
    for update in (UPDATES[3], UPDATES[7]):
        cand = make_span(n, dtype, CUDA, update, master=master)
        if cand.backup is not None:
            cand.backup.copy_(cand.weights)
        cand = dataclasses.replace(cand, reused=g_v)
        expect = clone_span(cand)
        NATIVE.restore_and_update(cand, update, scalars)
        REFERENCE.restore_and_update(expect, update, scalars)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(cand.weights, expect.weights, rtol=tol[0], atol=tol[1])
        for k in expect.state:
            torch.testing.assert_close(cand.state[k], expect.state[k], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_deterministic_and_many_partials(dtype):
    span = make_span(5_000_017, dtype, CUDA, seed=5)
    n = NATIVE.partials_len(span)
    assert 1 < n <= _C.CUDA_NORM_MAX_BLOCKS
    outs = []
    for _ in range(3):
        out = torch.empty(n, dtype=torch.float32, device=CUDA)
        NATIVE.sq_norm_partials(span, PERTURBATIONS[2], out)
        outs.append(out)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    # perturb re-reduces a long partials buffer (several spans' worth) in every block
    partials = torch.cat([outs[0], outs[0] * 0.5, torch.zeros(777, device=CUDA)])
    cand, expect = clone_span(span), clone_span(span)
    NATIVE.perturb(cand, PERTURBATIONS[2], partials, None, perturb_scalars(CUDA))
    REFERENCE.perturb(expect, PERTURBATIONS[2], partials, None, perturb_scalars(CUDA))
    torch.testing.assert_close(cand.weights, expect.weights, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_nonfinite_counter_incremented_once_across_blocks():
    span = make_span(4_000_000, torch.float32, CUDA)
    count = torch.zeros(1, dtype=torch.int32, device=CUDA)
    w = span.weights.clone()
    for bad in (math.inf, math.nan):
        partials = torch.tensor([1.0, bad, 2.0], device=CUDA)
        NATIVE.perturb(span, PERTURBATIONS[0], partials, count, perturb_scalars(CUDA))
        assert torch.equal(span.weights, w)
    assert count.item() == 2


def test_empty_span_counts_a_nonfinite_norm_like_the_cpu():
    """perturb on an empty span still reads the partials and counts a non-finite norm, on both devices."""
    for device in ("cpu", CUDA):
        span = make_span(0, torch.float32, device)
        count = torch.zeros(1, dtype=torch.int32, device=device)
        scalars = perturb_scalars(device)
        NATIVE.perturb(span, PERTURBATIONS[0], torch.tensor([1.0, math.inf], device=device), count, scalars)
        NATIVE.perturb(span, PERTURBATIONS[0], torch.tensor([4.0], device=device), count, scalars)
        NATIVE.perturb(span, PERTURBATIONS[0], None, count, scalars)
        assert count.item() == 1, device


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}


def _same_bits(gpu: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    gpu_bits, cpu_bits = gpu.cpu().view(_INT_VIEW[gpu.dtype]), cpu.view(_INT_VIEW[cpu.dtype])
    differ = (gpu_bits != cpu_bits).nonzero().flatten()
    assert differ.numel() == 0, (f"{what}: {differ.numel()} of {cpu.numel()} elements differ from the CPU kernels', "
                                 f"first at {differ[0].item()}: {gpu.cpu()[differ[0]].item()!r} vs "
                                 f"{cpu[differ[0]].item()!r}")


def _on_cuda(span: Span) -> Span:
    return dataclasses.replace(span, weights=span.weights.cuda(), grads=span.grads.cuda(),
                               backup=None if span.backup is None else span.backup.cuda(),
                               master=None if span.master is None else span.master.cuda(),
                               state={k: v.cuda() for k, v in span.state.items()})


def _same_span_bits(gpu: Span, cpu: Span, what: str) -> None:
    for name in ("weights", "backup", "master"):
        if getattr(cpu, name) is not None:
            _same_bits(getattr(gpu, name), getattr(cpu, name), f"{what}: {name}")
    for k in cpu.state:
        _same_bits(gpu.state[k], cpu.state[k], f"{what}: {k}")



@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.float16, False), (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "float64", "bfloat16", "float16", "bfloat16-master", "float16-master"])
def test_perturb_telemetry_sums(dtype, master):
    """perturb's sums of e * g on CUDA (e as written): one element per block of a grid of at most partials_len
    blocks (the rest zeros), every one written, their total the exact sum of the terms within the CPU's bound
    (float32 sums too); the perturbation bit for bit the one without sums; zeros for a non-finite norm; the
    vector loop and the tail, one block and the 1024 rows of a span of 2^24 + 3 elements."""
    for numel in (1, 7, BLOCK + 1, 1_000_003, (1 << 24) + 3):
        span = make_span(numel, dtype, CUDA, seed=numel, master=master)
        perturbations = PERTURBATIONS if numel < 1 << 24 else PERTURBATIONS[:1]
        for perturbation in perturbations:
            for sums_dtype in {span.state_dtype, torch.float64}:
                partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
                what = f"{perturbation} on {numel} {dtype}, master {master}, {sums_dtype} sums"
                sums, with_sums, without, counts = telemetry.perturb_with_and_without_sums(
                    span, perturbation, partials, 1024.0, sums_dtype)
                for a, b in ((with_sums.weights, without.weights), (with_sums.backup, without.backup)):
                    if b is not None:
                        _same_bits(a, b, what)
                assert sums.shape == (NATIVE.partials_len(span),) and bool(torch.isfinite(sums).all()), what
                exact, magnitude = (t.sum() for t in telemetry.perturb_terms_exactly(span, with_sums))
                rtol = telemetry.SUMS_RTOL[span.state_dtype] + (2.0**-24 if sums_dtype == torch.float32 else 0.0)
                assert float((sums.double().sum() - exact).abs()) <= rtol * float(magnitude), (
                    f"{what}: {sums.sum()} {exact}")
        span.grads[numel // 2] = math.inf  # 0 * inf would be NaN
        sums, *_ = telemetry.perturb_with_and_without_sums(
            span, PERTURBATIONS[0], norm_partials_for(span, PERTURBATIONS[0], math.nan), None)
        assert torch.equal(sums, torch.zeros_like(sums)), f"non-finite norm on {numel} {dtype}, master {master}"


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.float16, False), (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "float64", "bfloat16", "float16", "bfloat16-master", "float16-master"])
def test_telemetry_sums(dtype, master):
    """restore_and_update's telemetry sums on CUDA: one row per block of a grid of at most partials_len blocks
    (the rows past it zeros), every row written, their total the exact sum of the terms within the CPU's
    bound; the update bit for bit the one without sums, applied or skipped; the vector loop and the tail, one
    block and the 1024 rows of a span of 2^24 + 3 elements."""
    for numel in (1, 7, BLOCK + 1, 1_000_003, (1 << 24) + 3):
        bases = TELEMETRY_BASES if numel < 1 << 24 else TELEMETRY_BASES[:1]  # the large span: one base will do
        for k, update in enumerate(bases):
            span = telemetry.perturbed(make_span(numel, dtype, CUDA, update, seed=k, master=master), seed=k)
            for found_inf in (0.0, 1.0):
                scalars = step_scalars(CUDA, 3, 1024.0, found_inf)
                what = f"{update} on {numel} {dtype}, master {master}, found_inf {found_inf}"
                sums, entry, with_sums, without = telemetry.run_with_and_without_sums(span, update, scalars)
                telemetry.assert_same_update(with_sums, without, what)
                assert sums.shape == (NATIVE.partials_len(span), 3) and bool(torch.isfinite(sums).all()), what
                exact, magnitude = (t.sum(0) for t in telemetry.sum_terms_exactly(entry, scalars.grad_scale))
                rtol = telemetry.SUMS_RTOL[span.state_dtype]
                assert bool(((sums.sum(0) - exact).abs() <= rtol * magnitude).all()), f"{what}: {sums.sum(0)} {exact}"


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, False),
                                          (torch.float16, False), (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "float64", "bfloat16", "float16", "bfloat16-master", "float16-master"])
def test_elementwise_ops_match_cpu_bitwise(dtype, master):
    """Built without contracted multiply-adds (nvcc --fmad=false, C++ -ffp-contract=off), native CUDA's
    perturb, restore and updates give the native CPU kernels' bits from the same inputs and the same
    one-element partials (so both take the same scale): every perturbation, with and without a GradScaler,
    and every SGD and Adam configuration at several steps, in the vector loop and the tail."""
    n = 4 * 4096 + 13
    for i, perturbation in enumerate(PERTURBATIONS):
        for grad_scale in (None, 1024.0):
            cpu = make_span(n, dtype, "cpu", seed=i, master=master)
            gpu = _on_cuda(cpu)
            norm = torch.empty(NATIVE.partials_len(cpu), dtype=cpu.state_dtype)
            NATIVE.sq_norm_partials(cpu, perturbation, norm)
            partials = norm.sum().reshape(1)
            NATIVE.perturb(cpu, perturbation, partials, None, perturb_scalars("cpu", grad_scale))
            NATIVE.perturb(gpu, perturbation, partials.cuda(), None, perturb_scalars(CUDA, grad_scale))
            _same_span_bits(gpu, cpu, f"perturb {perturbation}, grad_scale {grad_scale}")
            NATIVE.restore(cpu)
            NATIVE.restore(gpu)
            _same_span_bits(gpu, cpu, f"restore after perturb {perturbation}")
    for i, update in enumerate(UPDATES):
        for step, grad_scale in ((0, None), (3, None), (41, 1024.0)):
            cpu = make_span(n, dtype, "cpu", update, seed=10 + i, master=master)
            if cpu.backup is not None:
                cpu.backup.copy_(cpu.weights)  # the update reads the backup (make_span poisons it)
            gpu = _on_cuda(cpu)
            NATIVE.restore_and_update(cpu, update, step_scalars("cpu", step, grad_scale, 0.0 if grad_scale else None))
            NATIVE.restore_and_update(gpu, update, step_scalars(CUDA, step, grad_scale, 0.0 if grad_scale else None))
            _same_span_bits(gpu, cpu, f"{update}, step {step}, grad_scale {grad_scale}")


def test_cpu_and_cuda_kernels_agree():
    for dtype, master in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        cpu = make_span(100_003, dtype, "cpu", UPDATES[6], master=master)
        on_gpu = {name: None if getattr(cpu, name) is None else getattr(cpu, name).cuda()
                  for name in ("weights", "grads", "backup", "master")}
        gpu = dataclasses.replace(cpu, **on_gpu, state={k: v.cuda() for k, v in cpu.state.items()})
        for span in (cpu, gpu):
            out = torch.empty(NATIVE.partials_len(span), device=span.device)
            NATIVE.sq_norm_partials(span, PERTURBATIONS[1], out)
            NATIVE.perturb(span, PERTURBATIONS[1], out, None, perturb_scalars(span.device))
            NATIVE.restore_and_update(span, UPDATES[6], step_scalars(span.device, 2))
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=tol[0], atol=tol[1])
        for k in cpu.state:
            torch.testing.assert_close(gpu.state[k].cpu(), cpu.state[k], rtol=1e-5, atol=1e-7)
        if master:
            torch.testing.assert_close(gpu.master.cpu(), cpu.master, rtol=1e-5, atol=1e-7)


def _step(span, partials, count, update, scalars):
    NATIVE.sq_norm_partials(span, PERTURBATIONS[0], partials)
    NATIVE.perturb(span, PERTURBATIONS[0], partials, count, StepScalars(rho=RHO, grad_scale=scalars.grad_scale))
    NATIVE.restore_and_update(span, update, scalars)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bfloat16-master"])
def test_side_stream_and_cuda_graph_capture(dtype, master):
    update = UPDATES[1]
    span = make_span(1_000_000, dtype, CUDA, update, master=master)
    scalars = step_scalars(CUDA, 1, grad_scale=1024.0, found_inf=0.0)
    expect = clone_span(span)
    p_expect = torch.empty(NATIVE.partials_len(span), device=CUDA)
    _step(expect, p_expect, None, update, scalars)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    cand = clone_span(span)
    partials = torch.empty_like(p_expect)
    count = torch.zeros(1, dtype=torch.int32, device=CUDA)
    with torch.cuda.stream(stream):
        _step(cand, partials, count, update, scalars)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(cand.weights, expect.weights)
    # capture: would fail on any host sync
    graphed = clone_span(span)
    with torch.cuda.stream(stream):
        _step(graphed, partials, count, update, scalars)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(graphed, partials, count, update, scalars)
    base = clone_span(span)
    for name in ("weights", "grads", "backup", "master"):
        if getattr(base, name) is not None:
            getattr(graphed, name).copy_(getattr(base, name))
    for k in graphed.state:
        graphed.state[k].copy_(base.state[k])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed.weights, expect.weights, rtol=1e-6, atol=1e-7)
    if master:
        assert torch.equal(graphed.master, expect.master) and torch.equal(graphed.weights, expect.weights)


def test_cuda_graph_replay_reads_step_values():
    """A captured update reads step, grad_scale and found_inf when it runs: changing the tensors between
    replays changes the bias corrections, the unscaling and the skip."""
    update = UPDATES[6]  # Adam with AMSGrad: the step enters the bias corrections
    base = make_span(100_003, torch.float32, CUDA, update)
    base.backup.copy_(base.weights)
    scalars = step_scalars(CUDA, 0, grad_scale=1024.0, found_inf=0.0)
    graphed = clone_span(base)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        NATIVE.restore_and_update(graphed, update, scalars)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        NATIVE.restore_and_update(graphed, update, scalars)
    for step, grad_scale, found_inf in ((0, 1024.0, 0.0), (5, 2.0**-3, 0.0), (5, 512.0, 1.0)):
        for k in graphed.state:
            graphed.state[k].copy_(base.state[k])
        graphed.weights.fill_(math.nan)
        scalars.step.fill_(step)
        scalars.grad_scale.fill_(grad_scale)
        scalars.found_inf.fill_(found_inf)
        graph.replay()
        expect = clone_span(base)
        REFERENCE.restore_and_update(expect, update, step_scalars(CUDA, step, grad_scale, found_inf))
        torch.testing.assert_close(graphed.weights, expect.weights, rtol=2e-6, atol=1e-6)
        for k in expect.state:
            torch.testing.assert_close(graphed.state[k], expect.state[k], rtol=2e-6, atol=1e-7)
        if found_inf:
            assert torch.equal(graphed.weights, base.backup)
            assert all(torch.equal(graphed.state[k], base.state[k]) for k in base.state)


_FIRST_LAUNCH_IN_CAPTURE = """
import torch
from fused_sam.selfcheck import UPDATES, clone_span, make_span, step_scalars
from fused_sam.backends.native import NativeBackend
native, update = NativeBackend(), UPDATES[7]
span = make_span(100_003, torch.float32, "cuda", update)
span.backup.copy_(span.weights)
graphed, eager, scalars = clone_span(span), clone_span(span), step_scalars("cuda", 2)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):  # the update kernel's first launch here: its grid's occupancy query runs in the capture
    native.restore_and_update(graphed, update, scalars)
graph.replay()
native.restore_and_update(eager, update, scalars)
torch.cuda.synchronize()
assert torch.equal(graphed.weights, eager.weights) and torch.equal(graphed.state["exp_avg"], eager.state["exp_avg"])
"""


def test_first_launch_inside_a_capture():
    """A kernel first launched inside a CUDA-graph capture (its occupancy not yet cached: the query runs in the
    capture) captures, and the replay gives the eager launch's bits. A fresh process, so nothing is cached."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(tests), tests]))
    run = subprocess.run([sys.executable, "-c", _FIRST_LAUNCH_IN_CAPTURE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.parametrize("op,name", [("perturb", "grad_scale"), ("sgd", "step"), ("sgd", "grad_scale"),
                                     ("sgd", "found_inf"), ("adam", "step"), ("adam", "grad_scale"),
                                     ("adam", "found_inf")])
def test_step_scalars_on_another_device(op, name):
    """A step tensor on the CPU with weights on the GPU (or the other way round) is refused by name."""
    for weights_device, scalar_device in ((CUDA, "cpu"), ("cpu", CUDA)):
        update = UPDATES[4] if op == "adam" else UPDATES[1]
        span = make_span(100, torch.float32, weights_device, update)
        scalars = {"step": torch.zeros((), device=weights_device), "grad_scale": None, "found_inf": None}
        scalars[name] = torch.ones((), device=scalar_device)
        step, grad_scale, found_inf = scalars.values()
        ops = torch.ops.fused_sam
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} is on"):
            if op == "perturb":
                ops.perturb(span.weights, span.grads, span.backup, None, None, None, grad_scale, False, 0.0, False,
                            1e-12, 0.05, None)
            else:
                ops.restore_update(*restore_update_args(update, span.weights, span.backup, None, span.grads,
                                                        needed(span, update), step, grad_scale, found_inf))


def test_cuda_graph_replay_reads_lr_and_rho():
    """capturable=True: a captured perturb and update read rho and lr from their tensors at each replay, and
    give what the float path gives for the values the tensors hold then, bit for bit."""
    update = UPDATES[7]  # AdamW with AMSGrad: lr enters the decoupled decay and the step size
    perturbation = PERTURBATIONS[1]
    base = make_span(100_003, torch.float32, CUDA, update)
    base.backup.copy_(base.weights)
    partials = torch.empty(NATIVE.partials_len(base), device=CUDA)
    NATIVE.sq_norm_partials(base, perturbation, partials)
    scalars = step_scalars(CUDA, 3, grad_scale=1024.0, found_inf=0.0)
    lr, rho = device_hyperparameter(1e-3, CUDA), device_hyperparameter(RHO, CUDA)
    on_device = dataclasses.replace(scalars, lr=lr)

    def step(span):
        NATIVE.perturb(span, perturbation, partials, None, StepScalars(rho=rho, grad_scale=scalars.grad_scale))
        NATIVE.restore_and_update(span, update, on_device)

    graphed = clone_span(base)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(graphed)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed)
    for lr_value, rho_value in ((1e-3, 0.05), (0.1, 0.5), (3e-5, 2.0)):
        for name in ("weights", "backup"):
            getattr(graphed, name).copy_(getattr(base, name))
        for k in graphed.state:
            graphed.state[k].copy_(base.state[k])
        lr.fill_(lr_value)
        rho.fill_(rho_value)
        graph.replay()
        expect = clone_span(base)
        NATIVE.perturb(expect, perturbation, partials, None, StepScalars(rho=rho_value, grad_scale=scalars.grad_scale))
        NATIVE.restore_and_update(expect, update, dataclasses.replace(scalars, lr=lr_value))
        torch.cuda.synchronize()
        assert torch.equal(graphed.weights, expect.weights) and torch.equal(graphed.backup, expect.backup)
        assert all(torch.equal(graphed.state[k], expect.state[k]) for k in expect.state)


@pytest.mark.parametrize("op,name", HYPERPARAMETER_OPS)
def test_lr_and_rho_tensors_on_another_device(op, name):
    """An lr_tensor / rho_tensor on the CPU with weights on the GPU (or the other way round) is refused by name."""
    for weights_device, value_device in ((CUDA, "cpu"), ("cpu", CUDA)):
        value = torch.ones(1, dtype=torch.float64, device=value_device)
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} is on"):
            _call_with_hyperparameter(op, value, weights_device)()


@pytest.mark.parametrize("op", REUSE_OPS)
@pytest.mark.parametrize("name", ["reused", "reuse_scale"])
def test_reuse_arguments_on_another_device(op, name):
    """reused / reuse_scale on the CPU with weights on the GPU (or the other way round) are refused by name."""
    for weights_device, other_device in ((CUDA, "cpu"), ("cpu", CUDA)):
        args = {"reused": torch.zeros(100), "reuse_scale": torch.ones(1, dtype=torch.float64)}
        args = {key: value.to(other_device if key == name else weights_device) for key, value in args.items()}
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: {name} is on"):
            _call_with_reuse(op, torch.float32, args["reused"], args["reuse_scale"], weights_device)()


@pytest.mark.parametrize("op", RESTORE_POINT_OPS)
def test_master_on_another_device(op):
    """A master on the CPU with weights on the GPU (or the other way round) is refused by name."""
    for weights_device, master_device in ((CUDA, "cpu"), ("cpu", CUDA)):
        weights = torch.zeros(100, dtype=torch.bfloat16, device=weights_device)
        master = torch.zeros(100, device=master_device)
        with pytest.raises(RuntimeError, match=f"fused_sam::{op_name(op)}: master is on"):
            restore_point_call(op, weights, None, master)()


@pytest.mark.parametrize("capturable", [False, True], ids=["floats", "tensors"])
@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
@pytest.mark.parametrize("name", RESTORE_POINT_OPS)
def test_opcheck_cuda(name, master, capturable):
    if capturable and name in ("sq_norm_partials", "restore"):
        pytest.skip("takes neither lr nor rho")
    n = 4099
    gen = torch.Generator().manual_seed(0)

    def t(scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(CUDA)

    w, g, bk, m = t(), t(), t(), None
    if master:  # bfloat16 weights, the rounding of a float32 master, and no backup
        w, g, bk, m = t().bfloat16(), g.bfloat16(), None, t()
        w.copy_(m)
    scalars = step_scalars(CUDA, 3, grad_scale=1024.0, found_inf=0.0)
    step_values = (scalars.step, scalars.grad_scale, scalars.found_inf)

    def clone(x):
        return None if x is None else x.clone()

    sgd, adam = SGDUpdate(momentum=0.9, weight_decay=1e-4, nesterov=True), AdamUpdate(weight_decay=0.01, amsgrad=True)
    args = {
        "sq_norm_partials": (g, w, m, True, 0.01, torch.empty(1, device=CUDA)),
        "perturb": (w.clone(), g, clone(bk), m, torch.tensor([3.0], device=CUDA),
                    torch.zeros(1, dtype=torch.int32, device=CUDA), scalars.grad_scale, True, 0.0, True, 1e-12, 0.05,
                    None),
        "restore": (w.clone(), bk, m),
        "sgd": restore_update_args(sgd, w.clone(), bk, clone(m), g, [t()], *step_values, lr=0.1),
        "adam": restore_update_args(adam, w.clone(), bk, clone(m), g, [t(0.1), t(0.1).abs(), t(0.1).abs()],
                                    *step_values, lr=1e-3),
    }[name]
    if capturable:  # lr / rho as float64 tensors on the device (the last argument), the float unused
        args = (*args[:-2], 0.0, device_hyperparameter(args[-2], CUDA))
    torch.library.opcheck(getattr(torch.ops.fused_sam, op_name(name)).default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base,kwargs", [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
    (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, weight_decay=1e-2)),
], ids=["sgd", "adamw"])
def test_twin_models_on_cuda(dtype, base, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)).to(CUDA, dtype)
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), base, backend="native", rho=0.05, **kwargs)
    ref = FusedSAM(twin.parameters(), base, backend="reference", rho=0.05, **kwargs)
    x = torch.randn(128, 32, device=CUDA, dtype=dtype)
    y = torch.randint(0, 10, (128,), device=CUDA)
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(10):
            torch.nn.functional.cross_entropy(m(x).float(), y).backward()
            o.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(m(x).float(), y).backward()
            o.second_step(zero_grad=True)
    tol = (1e-5, 1e-6) if dtype == torch.float32 else (2e-2, 1e-3)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=MASTER_IDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_twin_models_with_master_weights_on_cuda(dtype, adaptive):
    """AdamW on 16-bit parameters with float32 masters: native's masters follow the reference backend's, and
    its weights are exactly their rounding."""
    model = mlp(dtype).to(CUDA)
    twin = copy.deepcopy(model)
    sam = dict(rho=0.5 if adaptive else 0.05, adaptive=adaptive, eta=0.01 if adaptive else 0.0, master_weights=True)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, backend="native", lr=1e-3, weight_decay=1e-2, **sam)
    ref = FusedSAM(twin.parameters(), torch.optim.AdamW, backend="reference", lr=1e-3, weight_decay=1e-2, **sam)
    assert set(opt.backends.values()) == {"native"}
    for m, o in ((model, opt), (twin, ref)):
        for x, y in batches(m, 4, dtype):
            x, y = x.to(CUDA), y.to(CUDA)
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
    masters = masters_of(opt)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), masters.to(dtype))
    torch.testing.assert_close(masters, masters_of(ref), rtol=1e-5, atol=1e-6)
