"""GradScaler on a CUDA device (run by bench/gpu_check.sh where a GPU is lent): each backend against the
hand-unscaled loop of test_amp.py, and the SAM step's own calls never synchronise with the host."""
import pytest
import torch

from conftest import requires_cuda
from fused_sam import FusedSAM, available_backends

import test_amp

pytestmark = [requires_cuda, pytest.mark.cuda]
BACKENDS = available_backends("cuda", torch.float32) if torch.cuda.is_available() else []


@pytest.mark.parametrize("overflows", ["none", "mixed"])
@pytest.mark.parametrize("base", list(test_amp.BASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_grad_scaler_matches_hand_unscaled_sam(backend, base, overflows):
    net, batches = test_amp.mlp().cuda(), [(x.cuda(), y.cuda()) for x, y in test_amp.data(20)]
    fused = test_amp.fused_run(net, batches, base, test_amp.OVERFLOWS[overflows], backend, device="cuda")
    reference = test_amp.reference_run(net, batches, base, test_amp.OVERFLOWS[overflows])
    test_amp.assert_runs_match(fused, reference, test_amp.first_pass_overflows(test_amp.OVERFLOWS[overflows], 20),
                               tol=dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_sam_step_under_grad_scaler_never_syncs(backend):
    """first_step(grad_scaler=...) and the second step inside scaler.step(opt) run with CUDA's sync debug
    mode set to error: any .item(), host read or blocking copy in them raises."""
    model = test_amp.mlp().cuda()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, backend=backend, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x, y = torch.randn(8, 10, device="cuda"), torch.randint(0, 3, (8,), device="cuda")
    watched = {}
    for name in ("first_step", "step"):  # scaler.step(opt) calls opt.step(): the SAM step's second half
        def no_sync(*args, _method=getattr(opt, name), **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        watched[name] = no_sync
    opt.first_step, opt.step = watched["first_step"], watched["step"]
    for _ in range(3):
        scaler.scale(test_amp.loss_of(model, x, y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(test_amp.loss_of(model, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in model.parameters()])).all()
    assert float(opt.state[next(iter(model.parameters()))]["step"]) == 3
