"""End-to-end training steps (forward + backward + optimizer) of the two small models of ``fused-sam bench``:
plain base optimizer, classic SAM, fused SAM."""
import math

import pytest

from fused_sam.bench.e2e import OPTIMIZERS, _configs, _model_and_batch, _train_step
from fused_sam.bench.measure import sync
from fused_sam.bench.methods import RHO, base_impl
from fused_sam.classic import ClassicSAM
from fused_sam.optimizer import FusedSAM


@pytest.mark.parametrize("method", ["plain", "classic", "fused"])
@pytest.mark.parametrize("model_kind", ["cnn", "gpt"])
def test_train_step(benchmark, device, quick, model_kind, method):
    cfg = _configs(device, quick)[model_kind]
    base_cls, kwargs = OPTIMIZERS[cfg["optimizer"]]
    model, loss_fn = _model_and_batch(model_kind, cfg, device)
    params = list(model.parameters())
    if method == "plain":
        opt = base_cls(params, **kwargs, **{base_impl(base_cls, device, params[0].dtype): True})
    elif method == "classic":
        opt = ClassicSAM(params, base_cls, rho=RHO, **kwargs)
    else:
        opt = FusedSAM(params, base_cls, rho=RHO, **kwargs)

    def step():
        loss = _train_step(method, model, loss_fn, opt)
        sync(device)
        return loss

    rounds, warmup = (2, 1) if quick else ((20, 3) if device.type == "cuda" else (5, 1))
    benchmark.group = f"e2e {model_kind}"
    loss = benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert math.isfinite(float(loss.detach()))
