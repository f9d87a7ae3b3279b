"""The native backend's CUDA kernels (skipped without a CUDA GPU, or when fused_sam._C has no CUDA kernels).

Parity with the reference backend around the kernels' vector width and block sizes, misaligned spans
(the scalar fallback), determinism of the two-stage norm, the non-finite counter across many blocks,
non-default streams, CUDA-graph capture (nothing syncs with the host), opcheck on CUDA tensors, and
optimizer-level parity in float32 and bfloat16.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from backend_harness import PERTURBATIONS, TOLERANCE, UPDATES, check_all_ops, clone_span, make_span
from fused_sam import FusedSAM
from fused_sam.backends import native as native_module
from fused_sam.backends.base import Span
from fused_sam.backends.native import NativeBackend
from fused_sam.backends.reference import ReferenceBackend

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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("numel", [1, 7, 4095, BLOCK + 1, 1_000_003])
def test_ops_match_reference(numel, dtype):
    check_all_ops(NATIVE, numel, dtype, CUDA, seed=numel % 89)


def _offset_span(numel, dtype, offset, update=None, step=3, seed=0):
    """A span whose tensors start ``offset`` elements into larger buffers (not 16-byte aligned)."""
    base = make_span(numel + offset, dtype, CUDA, update, step, seed=seed)
    base.backup.copy_(base.weights)  # restore_and_update reads the backup (make_span poisons it)
    return Span(weights=base.weights[offset:], grads=base.grads[offset:], backup=base.backup[offset:],
                state={k: v[offset:] for k, v in base.state.items()}, step=step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("offset", [1, 3])
def test_misaligned_spans(dtype, offset):
    n = 3 * BLOCK + 11
    tol = TOLERANCE[dtype]
    span = _offset_span(n, dtype, offset)
    out = torch.empty(NATIVE.partials_len(span), dtype=span.state_dtype, device=CUDA)
    NATIVE.sq_norm_partials(span, PERTURBATIONS[1], out)
    ref = torch.empty(1, dtype=span.state_dtype, device=CUDA)
    REFERENCE.sq_norm_partials(clone_span(span), PERTURBATIONS[1], ref)
    torch.testing.assert_close(out.sum(), ref.sum(), rtol=1e-5, atol=0)
    cand, expect = _offset_span(n, dtype, offset), clone_span(_offset_span(n, dtype, offset))
    NATIVE.perturb(cand, PERTURBATIONS[1], out, None)
    REFERENCE.perturb(expect, PERTURBATIONS[1], out, None)
    torch.testing.assert_close(cand.weights, expect.weights, rtol=tol[0], atol=tol[1])
    assert torch.equal(cand.backup, expect.backup)
    for update in (UPDATES[3], UPDATES[7]):
        cand = _offset_span(n, dtype, offset, update)
        expect = clone_span(cand)
        NATIVE.restore_and_update(cand, update)
        REFERENCE.restore_and_update(expect, update)
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
    NATIVE.perturb(cand, PERTURBATIONS[2], partials, None)
    REFERENCE.perturb(expect, PERTURBATIONS[2], partials, None)
    torch.testing.assert_close(cand.weights, expect.weights, rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_nonfinite_counter_incremented_once_across_blocks():
    span = make_span(4_000_000, torch.float32, CUDA)
    count = torch.zeros(1, dtype=torch.int32, device=CUDA)
    w = span.weights.clone()
    for bad in (math.inf, math.nan):
        partials = torch.tensor([1.0, bad, 2.0], device=CUDA)
        NATIVE.perturb(span, PERTURBATIONS[0], partials, count)
        assert torch.equal(span.weights, w)
    assert count.item() == 2


def test_cpu_and_cuda_kernels_agree():
    for dtype in (torch.float32, torch.bfloat16):
        cpu = make_span(100_003, dtype, "cpu", UPDATES[6], step=2)
        gpu = Span(weights=cpu.weights.cuda(), grads=cpu.grads.cuda(), backup=cpu.backup.cuda(),
                   state={k: v.cuda() for k, v in cpu.state.items()}, step=2)
        for span in (cpu, gpu):
            out = torch.empty(NATIVE.partials_len(span), device=span.device)
            NATIVE.sq_norm_partials(span, PERTURBATIONS[1], out)
            NATIVE.perturb(span, PERTURBATIONS[1], out, None)
            NATIVE.restore_and_update(span, UPDATES[6])
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=tol[0], atol=tol[1])
        for k in cpu.state:
            torch.testing.assert_close(gpu.state[k].cpu(), cpu.state[k], rtol=1e-5, atol=1e-7)


def _step(span, partials, count, update):
    NATIVE.sq_norm_partials(span, PERTURBATIONS[0], partials)
    NATIVE.perturb(span, PERTURBATIONS[0], partials, count)
    NATIVE.restore_and_update(span, update)


def test_side_stream_and_cuda_graph_capture():
    update = UPDATES[1]
    span = make_span(1_000_000, torch.float32, CUDA, update, step=1)
    expect = clone_span(span)
    p_expect = torch.empty(NATIVE.partials_len(span), device=CUDA)
    _step(expect, p_expect, None, update)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    cand = clone_span(span)
    partials = torch.empty_like(p_expect)
    count = torch.zeros(1, dtype=torch.int32, device=CUDA)
    with torch.cuda.stream(stream):
        _step(cand, partials, count, update)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(cand.weights, expect.weights)
    # capture: would fail on any host sync
    graphed = clone_span(span)
    with torch.cuda.stream(stream):
        _step(graphed, partials, count, update)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _step(graphed, partials, count, update)
    base = clone_span(span)
    for name in ("weights", "grads", "backup"):
        getattr(graphed, name).copy_(getattr(base, name))
    for k in graphed.state:
        graphed.state[k].copy_(base.state[k])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(graphed.weights, expect.weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["sq_norm_partials", "perturb", "restore", "restore_sgd", "restore_adam"])
def test_opcheck_cuda(name):
    n = 4099
    gen = torch.Generator().manual_seed(0)

    def t(scale=1.0):
        return (torch.randn(n, generator=gen) * scale).to(CUDA)

    w, g, bk = t(), t(), t()
    args = {
        "sq_norm_partials": (g, w, True, 0.01, torch.empty(1, device=CUDA)),
        "perturb": (w.clone(), g, bk.clone(), torch.tensor([3.0], device=CUDA),
                    torch.zeros(1, dtype=torch.int32, device=CUDA), 0.05, True, 0.0, True, 1e-12),
        "restore": (w.clone(), bk),
        "restore_sgd": (w.clone(), bk, g, t(), 0.1, 0.9, 0.0, 1e-4, True, False, False),
        "restore_adam": (w.clone(), bk, g, t(0.1), t(0.1).abs(), t(0.1).abs(), 1e-3, 0.9, 0.999, 1e-8, 0.01, True,
                         False, 1e-2, 0.1),
    }[name]
    torch.library.opcheck(getattr(torch.ops.fused_sam, name).default, args)


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
