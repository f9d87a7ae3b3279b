"""A whole SAM training step (two forwards, two backwards, first_step and second_step) captured into one
CUDA graph and replayed, against the same run taken eagerly: a small CNN and a small GPT, AdamW under
OneCycleLR with lr a CUDA tensor the scheduler fills between replays, with and without GradScaler.
Runs on a CUDA GPU (bench/gpu_check.sh)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fused_sam import FusedSAM
from fused_sam.bench.e2e import TinyGPT

from models import conv_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WARMUP, REPLAYS = 3, 100
VOCAB, CONTEXT = 64, 16


def tiny_gpt(seed: int = 0) -> nn.Module:
    """The benchmark's GPT (causal attention, tied embeddings), small."""
    torch.manual_seed(seed)
    return TinyGPT(vocab=VOCAB, ctx=CONTEXT, d=64, layers=2, heads=4)


def cnn_batch(gen):
    return torch.randn(32, 3, 6, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)


def gpt_batch(gen):
    tokens = torch.randint(0, VOCAB, (8, CONTEXT + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def build(model, scaler: bool):
    lr = torch.tensor(1e-3, dtype=torch.float64, device="cuda")
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=torch.tensor(0.05, dtype=torch.float64, device="cuda"),
                   lr=lr, weight_decay=1e-2, capturable=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=WARMUP + REPLAYS + 1,
                                                   cycle_momentum=False)
    grad_scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 12) if scaler else None
    return opt, schedule, grad_scaler


def sam_step(model, opt, grad_scaler, x, y) -> None:
    if grad_scaler is None:
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)
        return
    grad_scaler.scale(loss_of(model, x, y)).backward()
    opt.first_step(zero_grad=True, grad_scaler=grad_scaler)
    grad_scaler.scale(loss_of(model, x, y)).backward()
    grad_scaler.step(opt)
    grad_scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "GradScaler"])
@pytest.mark.parametrize("net", ["cnn", "gpt"])
def test_captured_sam_step_replays_as_eager(net, scaler):
    make, batch = (lambda: conv_net().cuda(), cnn_batch) if net == "cnn" else (lambda: tiny_gpt().cuda(), gpt_batch)
    eager_model = make()
    graphed_model = copy.deepcopy(eager_model)
    eager, graphed = build(eager_model, scaler), build(graphed_model, scaler)
    gen = torch.Generator().manual_seed(1)
    data = [tuple(t.cuda() for t in batch(gen)) for _ in range(WARMUP + REPLAYS)]

    for x, y in data:  # the eager run
        sam_step(eager_model, eager[0], eager[2], x, y)
        eager[1].step()

    static_x, static_y = (t.clone() for t in data[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps, eager, on a side stream as CUDA graphs require
        for x, y in data[:WARMUP]:
            static_x.copy_(x), static_y.copy_(y)
            sam_step(graphed_model, graphed[0], graphed[2], static_x, static_y)
            graphed[1].step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sam_step(graphed_model, graphed[0], graphed[2], static_x, static_y)
    for x, y in data[WARMUP:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
        graphed[1].step()  # fills the lr tensor the graph reads
    torch.cuda.synchronize()

    for p, q in zip(graphed_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    if scaler:
        assert graphed[2].get_scale() == eager[2].get_scale()


def test_capture_without_capturable_is_refused():
    model = conv_net().cuda()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    x, y = (t.cuda() for t in cnn_batch(torch.Generator().manual_seed(0)))
    sam_step(model, opt, None, x, y)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=False"):
        with torch.cuda.graph(graph):
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)


def test_float_lr_under_capture_and_relayout_after_capture_are_refused():
    model = conv_net().cuda()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, rho=0.05, capturable=True)
    x, y = (t.cuda() for t in cnn_batch(torch.Generator().manual_seed(0)))
    sam_step(model, opt, None, x, y)  # eager: a float lr and rho are copied to the device
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Python float"):
        with torch.cuda.graph(graph):
            loss_of(model, x, y).backward()
            opt.first_step(zero_grad=True)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=torch.tensor(1e-3, device="cuda"),
                   rho=torch.tensor(0.05, device="cuda"), capturable=True)
    sam_step(model, opt, None, x, y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sam_step(model, opt, None, x, y)
    graph.replay()
    with pytest.raises(RuntimeError, match="captured into a CUDA graph"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, device="cuda"))]})
