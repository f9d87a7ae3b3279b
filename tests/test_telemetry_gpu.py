"""SAM telemetry on a CUDA GPU: every backend's sums against the reference's on the same device, telemetry
leaving the training bit for bit as it was, and the record written by a captured CUDA graph on replay.
Runs on a CUDA GPU (bench/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from fused_sam import FusedSAM, available_backends
from fused_sam.backends import resolve_backend
from fused_sam.selfcheck import UPDATES, check_telemetry_sums, make_span, step_scalars
from fused_sam.telemetry import FIELDS

from models import batches, loss_of, mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _backends(dtype, master=False):
    return available_backends(CUDA, dtype, master) if torch.cuda.is_available() else []


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True),
                                          (torch.float16, False)])
@pytest.mark.parametrize("numel", [1, 4099, 3 * 2 ** 20 + 5])
def test_sums_match_the_reference_on_the_gpu(dtype, master, numel):
    for name in _backends(dtype, master):
        backend = resolve_backend(name, CUDA, dtype, master)
        for update in UPDATES:
            span = make_span(numel, dtype, CUDA, update, seed=numel, master=master)
            for grad_scale in (None, 1024.0):
                check_telemetry_sums(backend, span, update, step_scalars(CUDA, 3, grad_scale))


def sam_step(model, opt, x, y) -> None:
    loss = loss_of(model, x, y)
    loss.backward()
    opt.first_step(zero_grad=True, loss=loss)
    perturbed = loss_of(model, x, y)
    perturbed.backward()
    opt.second_step(zero_grad=True, loss=perturbed)


def _train(backend, telemetry, capturable=False, steps=5):
    model = mlp().cuda()
    lr = torch.tensor(1e-2, dtype=torch.float64, device=CUDA) if capturable else 1e-2
    rho = torch.tensor(0.05, dtype=torch.float64, device=CUDA) if capturable else 0.05
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=lr, rho=rho, backend=backend, telemetry=telemetry,
                   capturable=capturable)
    records = []
    for x, y in batches(model, steps):
        sam_step(model, opt, x.cuda(), y.cuda())
        records.append(opt.telemetry() if telemetry else None)
    return model, records


@pytest.mark.parametrize("backend", _backends(torch.float32))
def test_training_unchanged_and_records_agree_with_the_reference(backend):
    off, _ = _train(backend, False)
    on, records = _train(backend, True)
    for p, q in zip(off.parameters(), on.parameters()):
        assert torch.equal(p, q)
    _, expected = _train("reference", True)
    for got, want in zip(records, expected):
        assert got["step"] == want["step"]
        for name in FIELDS:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


def test_a_captured_step_records_on_replay():
    eager_model, eager_records = _train("auto", True, capturable=True)
    model = mlp().cuda()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=torch.tensor(1e-2, dtype=torch.float64, device=CUDA),
                   rho=torch.tensor(0.05, dtype=torch.float64, device=CUDA), telemetry=True, capturable=True)
    data = [(x.cuda(), y.cuda()) for x, y in batches(model, 5)]
    static_x, static_y = (t.clone() for t in data[0])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first two steps eager, on a side stream as CUDA graphs require
        for x, y in data[:2]:
            static_x.copy_(x), static_y.copy_(y)
            sam_step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_x.copy_(data[2][0]), static_y.copy_(data[2][1])
    with torch.cuda.graph(graph):
        sam_step(model, opt, static_x, static_y)
    graph.replay()  # step 2 (the capture itself ran nothing)
    records = [opt.telemetry()]
    for x, y in data[3:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        records.append(opt.telemetry())
    for got, want in zip(records, eager_records[2:]):
        assert got["step"] == want["step"]
        for name in FIELDS:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
