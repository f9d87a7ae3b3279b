"""The triton backend on CUDA tensors: harness parity (incl. bfloat16 and float32 master weights), twin
models, determinism, a CUDA graph of the SAM step, no recompilation across steps, and a span of more than
2^31 elements. Skipped without a GPU (tests/test_triton_backend.py covers the same kernels through
Triton's interpreter)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import requires_cuda

pytestmark = [requires_cuda, pytest.mark.cuda]

triton = pytest.importorskip("triton")

from fused_sam.selfcheck import (  # noqa: E402
    PERTURBATIONS, REFERENCE, RHO, UPDATES, check_all_ops, check_device_hyperparameters, check_perturb,
    check_restore_and_update, clone_span, make_span, norm_partials_for, perturb_scalars, step_scalars,
)
from models import batches, conv_net, loss_of, mlp  # noqa: E402
import test_telemetry_triton as telemetry  # noqa: E402  (its span and sum helpers; its tests stay in it)

from fused_sam import FusedSAM  # noqa: E402
from fused_sam.backends import triton_kernels  # noqa: E402
from fused_sam.backends.base import Span, StepScalars  # noqa: E402
from fused_sam.backends.triton import BLOCK, TritonBackend  # noqa: E402
from fused_sam.updates import AdamUpdate, SGDUpdate  # noqa: E402

BACKEND = TritonBackend()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASTER_DTYPES = [torch.bfloat16, torch.float16]
SIZES = [1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK * 512 + 5, (1 << 22) + 3]
CUDA = "cuda"


def train(model, opt, steps, dtype=torch.float32, seed=1):
    for x, y in batches(model, steps, dtype, seed):
        x, y = x.to(CUDA), y.to(CUDA)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def twins(make_model, base_cls, base_kwargs, sam_kwargs, steps, dtype=torch.float32):
    """(reference model, triton model, reference optimizer, triton optimizer) after ``steps`` SAM steps."""
    ref_model = make_model(dtype).to(CUDA)
    tri_model = copy.deepcopy(ref_model)
    ref = FusedSAM(ref_model.parameters(), base_cls, backend="reference", **sam_kwargs, **base_kwargs)
    tri = FusedSAM(tri_model.parameters(), base_cls, backend="triton", **sam_kwargs, **base_kwargs)
    train(ref_model, ref, steps, dtype)
    train(tri_model, tri, steps, dtype)
    return ref_model, tri_model, ref, tri


def assert_models_close(a, b, **tol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype, master_weights",
                         [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "bf16-master", "fp16-master"])
def test_auto_picks_triton_on_cuda(dtype, master_weights):
    opt = FusedSAM(mlp(dtype).to(CUDA).parameters(), torch.optim.SGD, lr=0.1, master_weights=master_weights)
    assert set(opt.backends.values()) == {"triton"}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
def test_all_ops_match_reference_on_cuda(numel, dtype):
    check_all_ops(BACKEND, numel, dtype, CUDA)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("numel", SIZES)
def test_all_ops_with_master_weights_match_reference_on_cuda(numel, dtype):
    check_all_ops(BACKEND, numel, dtype, CUDA, master=True)


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                           (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "bfloat16", "float16", "bf16-master", "fp16-master"])
@pytest.mark.parametrize("numel", [1, 37, BLOCK + 3, 3 * BLOCK * 512 + 5])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise_on_cuda(numel, dtype, master):
    """capturable=True: lr and rho loaded from float64 device tensors give the float path's results bit for
    bit in compiled kernels too (launched without multiply-add contraction, as the interpreter computes:
    AdamW's 1 - lr * wd must keep the two roundings of the launcher's Python double)."""
    check_device_hyperparameters(BACKEND, numel, dtype, CUDA, master=master)


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=["float32", "bf16-master", "float16"])
@pytest.mark.parametrize("numel", [BLOCK + 3, 3 * BLOCK * 512 + 5])
def test_telemetry_sums_on_cuda(numel, dtype, master):
    """The telemetry sums of compiled kernels (tests/test_telemetry_triton.py holds them to an exact sum on
    small spans): on a span past the row cap, 512 programs striding over several blocks each, every row
    written, the sums within the same bound, the update bit for bit the one without sums."""
    for k, update in enumerate((UPDATES[1], UPDATES[6], UPDATES[9])):
        span = telemetry.perturbed_span(numel, dtype, master, update, seed=k)
        for step, grad_scale, found_inf, sums_dtype in telemetry.SCALARS:
            scalars = step_scalars(CUDA, step, grad_scale, found_inf)
            sums = telemetry.run_with_and_without_sums(span, update, scalars, sums_dtype)
            assert sums.shape == (BACKEND.partials_len(span), 3)
            telemetry.assert_sums_close(sums.double().sum(dim=0), telemetry.exact_terms(span, scalars.grad_scale),
                                        f"{update}, {numel} elements, grad_scale {grad_scale}")


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=["float32", "bf16-master", "float16"])
@pytest.mark.parametrize("numel", [BLOCK + 3, 3 * BLOCK * 512 + 5])
def test_perturb_sums_on_cuda(numel, dtype, master):
    """perturb's e.g1 sums of compiled kernels, as test_telemetry_sums_on_cuda: past the row cap every
    element written, the total within the exact sum's bound, the perturbation bit for bit the one without."""
    for k, perturbation in enumerate((telemetry.SAM, telemetry.ASAM, telemetry.USAM)):
        for grad_scale, sums_dtype in telemetry.PERTURB_SCALARS:
            span = telemetry.gradient_span(numel, dtype, master, grad_scale, seed=k)
            partials = norm_partials_for(span, perturbation) if perturbation.normalize else None
            sums, perturbed = telemetry.perturb_with_and_without_sums(span, perturbation, partials,
                                                                      perturb_scalars(CUDA, grad_scale), sums_dtype)
            assert sums.shape == (BACKEND.partials_len(span),)
            telemetry.assert_sums_close(sums.double().sum().reshape(1), telemetry.exact_perturb_terms(span, perturbed),
                                        f"perturb({perturbation}), {numel} elements, grad_scale {grad_scale}")


BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov-maximize": (torch.optim.SGD, dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)),
}


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", list(BASES))
def test_twin_models_match_reference_on_cuda(base, adaptive):
    cls, kwargs = BASES[base]
    ref_model, tri_model, _, tri = twins(mlp, cls, kwargs, dict(rho=0.05, adaptive=adaptive), steps=5)
    assert_models_close(ref_model, tri_model, rtol=1e-5, atol=1e-6)
    assert tri.nonfinite_steps == 0


@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_twin_bfloat16_models_match_reference_on_cuda(base):
    cls, kwargs = BASES[base]
    ref_model, tri_model, _, _ = twins(mlp, cls, kwargs, dict(rho=0.05), steps=5, dtype=torch.bfloat16)
    assert_models_close(ref_model, tri_model, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("base", ["sgd-momentum", "adamw"])
def test_twin_models_with_master_weights_match_reference_on_cuda(base, dtype):
    """16-bit parameters with float32 masters: triton's masters follow the reference backend's, and its
    weights are exactly their rounding."""
    cls, kwargs = BASES[base]
    ref_model, tri_model, ref, tri = twins(mlp, cls, kwargs, dict(rho=0.05, master_weights=True), 5, dtype)
    assert set(tri.backends.values()) == {"triton"}

    def masters(opt):
        saved = {i: s["sam_master_weight"] for i, s in opt.state_dict()["state"].items()}
        return torch.cat([saved[i].reshape(-1) for i in sorted(saved)])

    weights = torch.cat([p.detach().reshape(-1) for p in tri_model.parameters()])
    assert torch.equal(weights, masters(tri).to(dtype))
    torch.testing.assert_close(masters(tri), masters(ref), rtol=1e-5, atol=1e-6)
    assert_models_close(ref_model, tri_model, rtol=2e-2, atol=1e-3)


def test_two_runs_are_bitwise_identical_on_cuda():
    """An MLP (cuBLAS matmuls are run-to-run deterministic; conv/pool backward need not be)."""
    runs = []
    for _ in range(2):
        _, model, _, _ = twins(mlp, torch.optim.SGD, dict(lr=0.05, momentum=0.9), dict(rho=0.05, adaptive=True), 5)
        runs.append(model.state_dict())
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def _compiled_variants():
    total = 0
    for name in ("sq_norm_partials_kernel", "perturb_kernel", "sgd_kernel", "adam_kernel", "copy_kernel"):
        caches = getattr(getattr(triton_kernels, name), "device_caches", None)
        if caches is None:
            pytest.skip("this Triton version keeps its kernel cache elsewhere")
        total += sum(len(entry[0]) for entry in caches.values())
    return total


def test_changing_lr_and_steps_do_not_recompile():
    model = mlp().to(CUDA)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, backend="triton")
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.7)
    train(model, opt, 2)
    before = _compiled_variants()
    for _ in range(3):
        train(model, opt, 1)
        sched.step()
    assert _compiled_variants() == before


@pytest.mark.parametrize("dtype, master_weights", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bf16-master"])
def test_cuda_graph_of_the_sam_step_matches_eager(dtype, master_weights):
    """Capture first_step + second_step (SGD momentum) after warm-up; replays match an eager twin."""
    model = conv_net(dtype).to(CUDA)
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, rho=0.05, backend="triton", master_weights=master_weights)
    graphed = FusedSAM(model.parameters(), torch.optim.SGD, **kwargs)
    eager = FusedSAM(twin.parameters(), torch.optim.SGD, **kwargs)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator(device=CUDA).manual_seed(1)
    grads = [[torch.randn(p.shape, device=CUDA, generator=gen) for p in params] for _ in range(8)]

    def set_grads(ps, gs):
        for p, g in zip(ps, gs):
            p.grad.copy_(g)  # in place: .grad stays the view into the flat buffer

    def sam_step(opt):
        opt.first_step()
        opt.second_step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for gs in grads[:3]:
            set_grads(params, gs)
            sam_step(graphed)
    torch.cuda.current_stream().wait_stream(side)
    for gs in grads[:3]:
        set_grads(twin_params, gs)
        sam_step(eager)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sam_step(graphed)
    # capturing does not run the step: the graphed model is still where the warm-up left it
    for gs in grads[3:]:
        set_grads(params, gs)
        graph.replay()
        set_grads(twin_params, gs)
        sam_step(eager)
    torch.cuda.synchronize()
    for p, q in zip(params, twin_params):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    if master_weights:
        graphed_masters, eager_masters = ({i: s["sam_master_weight"] for i, s in opt.state_dict()["state"].items()} for opt in (graphed, eager))
        for i, master in graphed_masters.items():
            assert torch.equal(master, eager_masters[i]), i
    assert graphed.nonfinite_steps == 0


def test_span_longer_than_2_to_the_31_elements():
    """Every kernel on a float32 span of 2^31 + 2 blocks + 5 elements; the tail (past 2^31) is checked
    against the reference backend run on that slice."""
    numel = 2**31 + 2 * BLOCK + 5
    props = torch.cuda.get_device_properties(0)
    need = numel * 4 * 4 + (2 << 30)  # w, g, backup, momentum, + slack
    if props.total_memory < need or torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    tail = 3 * BLOCK + 11  # straddles the 2^31 boundary's last blocks
    try:
        w = torch.empty(numel, device=CUDA)
        g = torch.empty(numel, device=CUDA)
        backup = torch.empty(numel, device=CUDA)
        buf = torch.zeros(numel, device=CUDA)
        w.fill_(0.5)
        g.fill_(1.0)
        gen = torch.Generator(device=CUDA).manual_seed(0)
        w[-tail:] = torch.randn(tail, device=CUDA, generator=gen)
        g[-tail:] = torch.randn(tail, device=CUDA, generator=gen)
        span = Span(weights=w, grads=g, backup=backup, state={"momentum_buffer": buf})
        perturbation = PERTURBATIONS[0]

        n = BACKEND.partials_len(span)
        partials = torch.empty(n, device=CUDA)
        BACKEND.sq_norm_partials(span, perturbation, partials)
        expected = float(numel - tail) + g[-tail:].double().square().sum().item()
        assert partials.double().sum().item() == pytest.approx(expected, rel=1e-6)

        tail_span = lambda: Span(weights=w[-tail:].clone(), grads=g[-tail:].clone(),  # noqa: E731
                                 backup=backup[-tail:].clone(), state={"momentum_buffer": buf[-tail:].clone()})
        ref = tail_span()
        REFERENCE.perturb(ref, perturbation, partials, None, perturb_scalars(CUDA))
        head_before = w[:BLOCK].clone()
        BACKEND.perturb(span, perturbation, partials, None, perturb_scalars(CUDA))
        assert torch.equal(backup[-tail:], ref.backup)
        torch.testing.assert_close(w[-tail:], ref.weights, rtol=2e-6, atol=1e-7)
        assert not torch.equal(w[:BLOCK], head_before)

        update = SGDUpdate(momentum=0.9, weight_decay=1e-4)
        ref = tail_span()
        first = step_scalars(CUDA, 0, lr=0.1)
        REFERENCE.restore_and_update(ref, update, first)
        BACKEND.restore_and_update(span, update, first)
        torch.testing.assert_close(w[-tail:], ref.weights, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(buf[-tail:], ref.state["momentum_buffer"], rtol=2e-6, atol=1e-7)

        w[-tail:].fill_(float("nan"))
        BACKEND.restore(span)
        assert torch.equal(w[-tail:], backup[-tail:])
    finally:
        w = g = backup = buf = span = None
        torch.cuda.empty_cache()


def test_adam_on_a_large_bfloat16_span_matches_reference():
    """A few blocks of bfloat16 Adam with float32 state on the GPU (fast path of the mixed-dtype kernels)."""
    update = AdamUpdate(weight_decay=1e-2, decoupled=True, amsgrad=True)
    span = make_span(5 * BLOCK + 3, torch.bfloat16, CUDA, update)
    check_restore_and_update(BACKEND, span, update, step_scalars(CUDA, 7))
    check_restore_and_update(BACKEND, span, update, step_scalars(CUDA, 7, 2.0**15, 0.0))
    span = make_span(5 * BLOCK + 3, torch.bfloat16, CUDA)
    partials = torch.rand(1000, device=CUDA, dtype=torch.float64)
    check_perturb(BACKEND, span, PERTURBATIONS[1], partials)


@pytest.mark.parametrize("update", [u for u in UPDATES if isinstance(u, AdamUpdate)], ids=str)
def test_adam_bias_corrections_on_cuda_at_large_step_counts(update):
    """The float64 bias corrections computed in the kernel (binary exponentiation, float64 division and
    square root on the GPU) against the reference up to a million steps and at 2^24."""
    span = make_span(3 * BLOCK + 5, torch.float32, CUDA, update, seed=5)
    for step in (0, 1, 9, 99, 999, 9_999, 123_456, 999_999, 2**24):
        check_restore_and_update(BACKEND, span, update, step_scalars(CUDA, step))


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32", "bf16-master"])
def test_step_scalars_are_read_on_the_device_without_a_sync(dtype, master):
    """perturb and restore_and_update with a grad scale and found_inf never synchronise with the host
    (once the first call of each variant has compiled its kernel)."""
    perturbation = PERTURBATIONS[0]
    sgd, adam = UPDATES[1], UPDATES[4]
    span = make_span(2 * BLOCK + 1, dtype, CUDA, adam, master=master)
    span.state["momentum_buffer"] = torch.zeros_like(span.weights, dtype=span.state_dtype)
    partials = torch.rand(BACKEND.partials_len(span), device=CUDA)
    count = torch.zeros(1, dtype=torch.int32, device=CUDA)
    scalars = step_scalars(CUDA, 3, 1024.0, 0.0)

    def sam_step():
        BACKEND.perturb(span, perturbation, partials, count, StepScalars(rho=RHO, grad_scale=scalars.grad_scale))
        BACKEND.restore_and_update(span, sgd, scalars)
        BACKEND.restore_and_update(span, adam, scalars)

    sam_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sam_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("reuse", [False, True], ids=["plain", "reuse"])
def test_cuda_graph_replays_read_the_current_step_scalars(reuse):
    """One captured Adam restore_and_update, replayed while the step, scale and found_inf tensors (reuse: and
    LookSAM's reuse scale, with a g_v direction) change in place: each replay matches the reference run
    eagerly on the same values, so the kernel reads them on the device (a value read on the host would be
    frozen into the graph)."""
    update = AdamUpdate(weight_decay=1e-2, decoupled=True)
    start = make_span(BLOCK + 7, torch.float32, CUDA, update, seed=9)
    start.backup.copy_(start.weights)
    if reuse:
        g_v = torch.randn(start.numel, device=CUDA, generator=torch.Generator(device=CUDA).manual_seed(3))
        start = dataclasses.replace(start, reused=g_v)
    steps = torch.zeros(4, device=CUDA)
    scalars = StepScalars(step=steps[2], lr=1e-3, grad_scale=torch.ones((), device=CUDA),
                          found_inf=torch.zeros((), device=CUDA),
                          reuse_scale=torch.zeros(1, dtype=torch.float64, device=CUDA) if reuse else None)
    graphed = clone_span(start)
    BACKEND.restore_and_update(graphed, update, scalars)  # compiles; capturing only records the launch
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        BACKEND.restore_and_update(graphed, update, scalars)
    for step, grad_scale, found_inf, reuse_scale in ((0, 1.0, 0.0, 0.5), (5, 2.0**12, 0.0, 3.0e4),
                                                     (5, 2.0**12, 1.0, 2.0), (999, 0.5, 0.0, 0.0)):
        steps[2] = step
        scalars.grad_scale.fill_(grad_scale)
        scalars.found_inf.fill_(found_inf)
        if reuse:
            scalars.reuse_scale.fill_(reuse_scale)
        graphed.weights.fill_(float("nan"))
        for name, buf in graphed.state.items():
            buf.copy_(start.state[name])
        graph.replay()
        expected = clone_span(start)
        REFERENCE.restore_and_update(expected, update, scalars)
        what = f"step {step}, grad_scale {grad_scale}, found_inf {found_inf}, reuse_scale {reuse_scale if reuse else None}"
        torch.testing.assert_close(graphed.weights, expected.weights, rtol=2e-6, atol=1e-6,
                                   msg=lambda m: f"{what}: {m}")
        for name, buf in expected.state.items():
            torch.testing.assert_close(graphed.state[name], buf, rtol=2e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")
