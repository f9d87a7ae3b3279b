"""The SAM optimizer step (first_step + second_step, no forward/backward) per parameter set, base optimizer,
dtype and method: every method ``fused-sam bench`` times on the device (classic, torch-native, each
fused_sam backend, and its +GradScaler, +capturable and +master forms)."""
import pytest
import torch

from fused_sam.bench import cases
from fused_sam.bench.measure import min_bytes_per_param, sync
from fused_sam.bench.methods import build, method_names
from fused_sam.bench.runner import DTYPES, compare, draw, float32_classic

_CASES = {}
_CLASSIC = {}


def _case(sam_set, device, dtype):
    key = (sam_set, str(device), dtype)
    if key not in _CASES:
        _CASES.clear()  # keep one case's tensors alive at a time
        _CLASSIC.clear()
        _CASES[key] = draw(cases.shapes(sam_set), device, dtype, seed=0)
    return _CASES[key]


def _run(name, w0, g0, optimizer):
    params = [w.clone().requires_grad_(True) for w in w0]
    for p, g in zip(params, g0):
        p.grad = g.clone()
    return build(name, params, optimizer), params


def _final(method, params):
    if hasattr(method, "final_weights"):  # the float32 masters where the method keeps them
        return method.final_weights()
    return torch.cat([p.detach().reshape(-1).float() for p in params])


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sam_step(benchmark, device, quick, sam_set, sam_dtype, optimizer, sam_method):
    dtype = DTYPES[sam_dtype]
    if sam_method not in method_names(device, dtype):
        pytest.skip(f"{sam_method} is not available for {sam_dtype} on {device}")
    w0, g0 = _case(sam_set, device, dtype)
    rounds, warmup = (3, 1) if quick else ((20, 3) if device.type == "cuda" else (5, 1))
    steps = rounds + warmup
    key = (sam_set, optimizer, sam_dtype)
    if key not in _CLASSIC:
        opt, params = _run("classic", w0, g0, optimizer)
        for _ in range(steps):
            opt.first_step()
            opt.second_step()
        _CLASSIC[key] = _final(opt, params)
        del opt, params

    opt, params = _run(sam_method, w0, g0, optimizer)

    def step():
        opt.first_step()
        opt.second_step()
        sync(device)

    benchmark.group = f"{sam_set} {optimizer} {sam_dtype}"
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    master = sam_method.endswith("+master")
    if master:  # float32 masters are held to classic SAM run in float32
        err = compare(_final(opt, params), float32_classic(w0, g0, optimizer, steps), torch.float32)
    else:
        err = compare(_final(opt, params), _CLASSIC[key], dtype, torch.cat([w.reshape(-1).float() for w in w0]))
    assert err <= 1.0, f"{sam_method} differs from classic after {steps} steps (error / tolerance = {err:.3g})"
    numel = sum(w.numel() for w in w0)
    state = 4 if sam_method.startswith("fused:") and dtype in (torch.bfloat16, torch.float16) else w0[0].element_size()
    per_param = min_bytes_per_param(optimizer, w0[0].element_size(), state,
                                    inf_check=getattr(opt, "checks_gradients", False), master=master)
    benchmark.extra_info.update(numel=numel, tensors=len(w0), bytes_per_param=per_param)
    try:
        benchmark.extra_info["gbps_at_median"] = per_param * numel / benchmark.stats.stats.median / 1e9
    except Exception:  # --benchmark-disable: no stats
        pass
