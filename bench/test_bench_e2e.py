"""End-to-end training steps (forward + backward + optimizer) of the two small models of ``fused-sam bench``,
with its methods: plain base optimizer, classic SAM, fused SAM, the variants (timed over whole cycles of
their SAM and plain steps, reported per step), and on CUDA the graphed steps."""
import math

import pytest

from fused_sam.bench.e2e import prepare
from fused_sam.bench.measure import sync


@pytest.mark.parametrize("model_kind", ["cnn", "gpt"])
def test_train_step(benchmark, device, quick, model_kind, e2e_method):
    trainer = prepare(model_kind, e2e_method, device, quick, warmup=0)

    def step():
        trainer.step()
        sync(device)

    rounds, warmup = (2, 1) if quick else ((20, 3) if device.type == "cuda" else (5, 1))
    benchmark.group = f"e2e {model_kind}"
    # iterations=cycle: each round is a variant's whole cycle (its SAM step and its plain ones), timed per step
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=trainer.cycle)
    benchmark.extra_info.update(params=trainer.params, info=trainer.info, steps_per_round=trainer.cycle)
    assert math.isfinite(trainer.loss())
