"""The triton backend against the reference backend: kernel by kernel (the shared harness) and through the
optimizer (twin models). Without a GPU the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), so sizes stay small; tests/test_triton_gpu.py repeats the
parity on CUDA tensors."""
from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("triton")

from fused_sam.selfcheck import (  # noqa: E402
    PERTURBATIONS, REFERENCE, UPDATES, check_all_ops, check_device_hyperparameters, check_master_roundings,
    check_perturb, check_restore_and_update, check_sq_norm, make_span, perturb_scalars, step_scalars,
)
from models import batches, loss_of, mlp  # noqa: E402

from fused_sam import BackendUnavailable, FusedSAM, available_backends  # noqa: E402
from fused_sam.backends import triton as triton_backend  # noqa: E402
from fused_sam.backends.base import Span  # noqa: E402
from fused_sam.backends.triton import BLOCK, MAX_PARTIALS, TritonBackend, float64_bits  # noqa: E402
from fused_sam.updates import AdamUpdate, SGDUpdate  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = "cpu"
    if TritonBackend.unavailable_reason(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("no GPU and Triton's interpreter is off (TRITON_INTERPRET != 1)", allow_module_level=True)

BACKEND = TritonBackend()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MASTER_DTYPES = [torch.bfloat16, torch.float16]
TWIN_TOL = dict(rtol=1e-5, atol=1e-6)


# --- availability ---------------------------------------------------------------------------------------

def test_available_for_supported_dtypes():
    for dtype in DTYPES:
        assert TritonBackend.unavailable_reason(torch.device(DEVICE), dtype) is None


def test_available_with_master_weights():
    for dtype in MASTER_DTYPES:
        assert "triton" in available_backends(DEVICE, dtype, master=True)


def test_refuses_float64_and_other_devices_with_a_sentence(monkeypatch):
    reason = TritonBackend.unavailable_reason(torch.device(DEVICE), torch.float64)
    assert reason and "float64" in reason
    assert "CUDA" in TritonBackend.unavailable_reason(torch.device("meta"), torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in TritonBackend.unavailable_reason(torch.device("cpu"), torch.float32)


def test_optimizer_refuses_float64_by_name():
    with pytest.raises(BackendUnavailable, match="float64"):
        FusedSAM(mlp(torch.float64).to(DEVICE).parameters(), torch.optim.SGD, lr=0.1, backend="triton")


def meta_span(numel):
    t = torch.empty(numel, device="meta")
    return Span(weights=t, grads=t, backup=t)


def test_partials_len_is_capped():
    assert [BACKEND.partials_len(meta_span(n)) for n in (1, BLOCK, BLOCK + 1)] == [1, 1, 2]
    assert BACKEND.partials_len(meta_span(BLOCK * MAX_PARTIALS * 3)) == MAX_PARTIALS


# --- every operation against the reference (shared harness) ---------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 7, BLOCK - 1, BLOCK + 1])
def test_all_ops_match_reference(numel, dtype):
    check_all_ops(BACKEND, numel, dtype, DEVICE)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, BLOCK + 1])
def test_all_ops_with_master_weights_match_reference(numel, dtype):
    """Spans with a float32 master: one element, and two blocks with a one-element tail (the programs
    that loop over several blocks: below)."""
    check_all_ops(BACKEND, numel, dtype, DEVICE, master=True)


@pytest.mark.slow
def test_all_ops_match_reference_large_span():
    """~25 blocks: many programs and a partial last block (loops over several blocks per program: below)."""
    check_all_ops(BACKEND, 100_003, torch.float32, DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
@pytest.mark.parametrize("numel", [7, BLOCK - 1, 100_003])
def test_all_ops_with_master_weights_match_reference_more_sizes(numel, dtype):
    check_all_ops(BACKEND, numel, dtype, DEVICE, master=True)


@pytest.mark.parametrize("master", [False, True], ids=["backup", "master"])
def test_programs_loop_over_several_blocks(monkeypatch, master):
    """With the partials cap at 3 and the streaming cap at 2, each norm, perturb and update program
    strides over several blocks."""
    monkeypatch.setattr(triton_backend, "MAX_PARTIALS", 3)
    monkeypatch.setattr(triton_backend, "MAX_STREAM_PROGRAMS", 2)
    numel = 7 * BLOCK + 5
    assert BACKEND.partials_len(meta_span(numel)) == 3
    for k, perturbation in enumerate(PERTURBATIONS):
        span = make_span(numel, torch.bfloat16, DEVICE, seed=k, master=master)
        check_sq_norm(BACKEND, span, perturbation)
        partials = torch.empty(3, device=DEVICE)
        BACKEND.sq_norm_partials(span, perturbation, partials)
        check_perturb(BACKEND, span, perturbation, partials, grad_scale=1024.0)
    for k, update in enumerate(UPDATES[1:2] + UPDATES[7:8] + UPDATES[9:10]):
        span = make_span(numel, torch.bfloat16, DEVICE, update, seed=k, master=master)
        for step, found_inf in ((0, None), (3, 0.0), (3, 1.0)):
            check_restore_and_update(BACKEND, span, update, step_scalars(DEVICE, step, 256.0, found_inf))


# --- the per-step scalars on the device ------------------------------------------------------------------

@pytest.mark.parametrize("update", [u for u in UPDATES if isinstance(u, AdamUpdate)], ids=str)
def test_adam_bias_corrections_match_reference_at_large_step_counts(update):
    """The bias corrections come from the step tensor in float64 (binary exponentiation in the kernel,
    torch.pow in the reference), rounded once to float32: the weights agree to the harness tolerance up to
    a million steps and at 2^24, where float32 step counts stop being exact."""
    span = make_span(37, torch.float32, DEVICE, update, seed=5)
    for step in (9, 99, 999, 9_999, 123_456, 999_999, 2**24):
        check_restore_and_update(BACKEND, span, update, step_scalars(DEVICE, step))


@pytest.mark.parametrize("lr, hyperparameters", [(0.5, dict(beta1=0.0, beta2=0.5)),
                                                 (2.0**-10, dict(beta1=0.5, beta2=0.0))], ids=["beta1-zero", "beta2-zero"])
def test_adam_hyperparameters_passed_as_float64_bits(lr, hyperparameters):
    """lr and betas reach the kernel as float64 bit patterns: 0.0 is the int 0 (an int32 argument), 0.5 a
    pattern divisible by 16; both decode to the float64 value."""
    assert float64_bits(0.0) == 0 and float64_bits(0.5) % 16 == 0
    update = AdamUpdate(**hyperparameters)
    span = make_span(BLOCK + 1, torch.float32, DEVICE, update, seed=2)
    for step, grad_scale in ((0, None), (4, 8.0)):
        check_restore_and_update(BACKEND, span, update, step_scalars(DEVICE, step, grad_scale, lr=lr))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter computes the discarded update
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("update", [UPDATES[2], UPDATES[6]], ids=str)
def test_skipped_update_restores_bitwise_and_keeps_the_state(update, dtype):
    """found_inf non-zero (1, a sum over devices, NaN): w is the backup bit for bit, NaN payloads and
    negative zero included, and every state buffer keeps its bits, whatever the gradient holds."""
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    span = make_span(BLOCK + 3, dtype, DEVICE, update, seed=4)
    span.backup.copy_(span.weights)
    span.backup[:3] = torch.tensor([-0.0, math.inf, math.nan])
    span.backup.view(bits)[3] = 0x7FC1 if dtype == torch.bfloat16 else 0x7FC00001  # a NaN with a payload
    span.grads[:2] = math.inf
    state_before = {name: buf.clone() for name, buf in span.state.items()}
    for found_inf in (1.0, 3.0, math.nan):
        span.weights.fill_(0.5)
        BACKEND.restore_and_update(span, update, step_scalars(DEVICE, 5, 1024.0, found_inf))
        assert torch.equal(span.weights.view(bits), span.backup.view(bits)), f"found_inf {found_inf}"
        for name, before in state_before.items():
            assert torch.equal(span.state[name].view(torch.int32), before.view(torch.int32)), name


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 cast to inf
@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
def test_master_weights_are_rounded_as_torch_rounds(dtype):
    """Every write of 16-bit weights from a float32 master (perturb with e = 0, restore, an update with a
    zero gradient, a skipped update) is torch's rounding bit for bit, on values where rounding is easy
    to get wrong; the master keeps its bits where the update leaves it as it is."""
    check_master_roundings(BACKEND, DEVICE, dtype)


@pytest.mark.parametrize("dtype, master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                           (torch.bfloat16, True), (torch.float16, True)],
                         ids=["float32", "bfloat16", "float16", "bfloat16-master", "float16-master"])
@pytest.mark.parametrize("numel", [1, 37, BLOCK + 3])
def test_lr_and_rho_on_the_device_match_the_floats_bitwise(numel, dtype, master):
    """capturable=True: lr and rho read from float64 device tensors (the floats NaN) give the float path's
    weights, backup, master and state bit for bit, in every perturbation and update variant."""
    check_device_hyperparameters(BACKEND, numel, dtype, DEVICE, master=master)


# --- the shared partials buffer ------------------------------------------------------------------------

@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64], ids=str)
def test_spans_of_several_dtypes_and_backends_share_one_partials_buffer(buffer_dtype):
    """Three spans write disjoint slices of one poisoned buffer; each perturb re-reduces all of it."""
    perturbation = PERTURBATIONS[1]
    spans = [make_span(2 * BLOCK + 3, torch.float32, DEVICE, seed=1), make_span(BLOCK + 9, torch.bfloat16, DEVICE, seed=2)]
    other = make_span(100, torch.float16, DEVICE, seed=3)  # its partial comes from the reference backend
    lens = [BACKEND.partials_len(s) for s in spans]
    buf = torch.full((sum(lens) + 1 + 2,), math.nan, dtype=buffer_dtype, device=DEVICE)
    BACKEND.sq_norm_partials(spans[0], perturbation, buf[0:lens[0]])
    BACKEND.sq_norm_partials(spans[1], perturbation, buf[lens[0]:lens[0] + lens[1]])
    REFERENCE.sq_norm_partials(other, perturbation, buf[sum(lens):sum(lens) + 1])
    assert torch.isnan(buf[-2:]).all(), "a span wrote outside its slice"
    partials = buf[:-2]
    assert torch.isfinite(partials).all()
    expected = 0.0
    for s in spans + [other]:
        ref = torch.empty(1, dtype=buffer_dtype, device=DEVICE)
        REFERENCE.sq_norm_partials(s, perturbation, ref)
        expected += ref.item()
    assert partials.sum().item() == pytest.approx(expected, rel=1e-5)
    for s in spans:
        check_perturb(BACKEND, s, perturbation, partials)


def test_harness_catches_an_unwritten_partial():
    """A backend claiming more partials than it writes leaves NaN poison, which the harness rejects."""

    class Sloppy(TritonBackend):
        def partials_len(self, span):
            return super().partials_len(span) + 1

        def sq_norm_partials(self, span, perturbation, out):
            BACKEND.sq_norm_partials(span, perturbation, out[:-1])

    with pytest.raises(AssertionError, match="unwritten"):
        check_sq_norm(Sloppy(), make_span(BLOCK + 1, torch.float32, DEVICE), PERTURBATIONS[0])


def test_nonfinite_counter_is_incremented_once_per_step():
    span = make_span(3 * BLOCK, torch.float32, DEVICE)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    partials = torch.tensor([1.0, math.inf], device=DEVICE)
    before = span.weights.clone()
    for _ in range(2):
        BACKEND.perturb(span, PERTURBATIONS[0], partials, count, perturb_scalars(DEVICE))
    assert count.item() == 2
    assert torch.equal(span.weights, before) and torch.equal(span.backup, before)


# --- through the optimizer ------------------------------------------------------------------------------

BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "adam-amsgrad": (torch.optim.Adam, dict(lr=1e-2, amsgrad=True, weight_decay=1e-3)),
    "rmsprop-fallback": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
}


def train_twins(base, sam_kwargs, steps=4, dtype=torch.float32, make_model=mlp):
    """(reference model, triton model, reference optimizer, triton optimizer) after ``steps`` SAM steps."""
    cls, kwargs = BASES[base]
    ref_model = make_model(dtype).to(DEVICE)
    tri_model = copy.deepcopy(ref_model)
    ref = FusedSAM(ref_model.parameters(), cls, backend="reference", **sam_kwargs, **kwargs)
    tri = FusedSAM(tri_model.parameters(), cls, backend="triton", **sam_kwargs, **kwargs)
    assert set(tri.backends.values()) == {"triton"}
    for model, opt in ((ref_model, ref), (tri_model, tri)):
        train(model, opt, steps, dtype)
    return ref_model, tri_model, ref, tri


def train(model, opt, steps, dtype):
    """models.sam_train, with the batches moved to DEVICE."""
    for x, y in batches(model, steps, dtype):
        x, y = x.to(DEVICE), y.to(DEVICE)
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def assert_models_close(a, b, **tol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, **(tol or TWIN_TOL), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base", list(BASES))
def test_twin_mlp_matches_reference_backend(base, adaptive):
    ref_model, tri_model, _, tri = train_twins(base, dict(rho=0.05, adaptive=adaptive))
    assert_models_close(ref_model, tri_model)
    assert tri.nonfinite_steps == 0


@pytest.mark.parametrize("sam_kwargs", [dict(rho=0.5, adaptive=True, eta=0.01), dict(rho=0.05, normalize=False)],
                         ids=["asam-eta", "usam"])
def test_twin_mlp_asam_eta_and_usam(sam_kwargs):
    ref_model, tri_model, _, _ = train_twins("sgd-momentum", sam_kwargs)
    assert_models_close(ref_model, tri_model)


def test_twin_mlp_bfloat16_parameters():
    ref_model, tri_model, _, _ = train_twins("adamw", dict(rho=0.05), steps=3, dtype=torch.bfloat16)
    assert_models_close(ref_model, tri_model, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("dtype", MASTER_DTYPES, ids=str)
def test_twin_mlp_with_master_weights(dtype):
    """AdamW on 16-bit parameters with float32 masters: triton's masters follow the reference backend's,
    and its weights are exactly their rounding."""
    ref_model, tri_model, ref, tri = train_twins("adamw", dict(rho=0.05, master_weights=True), dtype=dtype)

    def masters(opt):
        saved = {i: s["sam_master_weight"] for i, s in opt.state_dict()["state"].items()}
        return torch.cat([saved[i].reshape(-1) for i in sorted(saved)])

    weights = torch.cat([p.detach().reshape(-1) for p in tri_model.parameters()])
    assert torch.equal(weights, masters(tri).to(dtype))
    torch.testing.assert_close(masters(tri), masters(ref), **TWIN_TOL)
    assert_models_close(ref_model, tri_model, rtol=1e-2, atol=1e-3)


def test_mixed_dtypes_and_param_groups_share_the_norm():
    """A bfloat16 and a float32 param group (two segments, one partials buffer) and per-group rho."""
    def build():
        torch.manual_seed(0)
        head = torch.nn.Linear(8, 4).to(DEVICE)
        body = torch.nn.Linear(16, 8).to(DEVICE, torch.bfloat16)
        return body, head

    def groups(body, head):
        return [{"params": body.parameters(), "rho": 0.1}, {"params": head.parameters(), "adaptive": True}]

    results = []
    for backend in ("reference", "triton"):
        body, head = build()
        opt = FusedSAM(groups(body, head), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(4, 16, generator=gen).to(DEVICE, torch.bfloat16)
            for stage in (opt.first_step, opt.second_step):
                head(body(x).float()).square().mean().backward()
                stage(zero_grad=True)
        results.append([p.detach().float() for p in (*body.parameters(), *head.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3)


def test_thousand_tiny_tensors_in_many_spans():
    """1000 tiny parameters; a third lack a gradient on odd steps, so spans split and step counts differ."""
    torch.manual_seed(0)
    shapes = [(1,), (3,), (17,), (2, 5)] * 250
    init = [torch.randn(s) for s in shapes]
    targets = [torch.randn(s).to(DEVICE) for s in shapes]
    results = []
    for backend in ("reference", "triton"):
        params = [torch.nn.Parameter(t.clone().to(DEVICE)) for t in init]
        opt = FusedSAM(params, torch.optim.Adam, lr=1e-2, backend=backend)
        for step in range(3):
            skip = step % 2 == 1
            live = [(p, t) for i, (p, t) in enumerate(zip(params, targets)) if not (skip and i % 3 == 0)]
            for stage in (opt.first_step, opt.second_step):
                opt.zero_grad()
                if skip:
                    for p in params[::3]:
                        p.grad = None
                sum(((p - t) ** 2 * p).sum() for p, t in live).backward()
                stage()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TWIN_TOL)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nonfinite_gradient_skips_the_perturbation_like_the_reference():
    models, opts = [], []
    for backend in ("reference", "triton"):
        model = mlp().to(DEVICE)
        opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
        x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        model(x).sum().backward()
        next(model.parameters()).grad[0, 0] = math.inf
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), backend
        opt.second_step(zero_grad=True)
        models.append(model)
        opts.append(opt)
    assert [o.nonfinite_steps for o in opts] == [1, 1]


def test_two_identical_runs_are_bitwise_identical():
    runs = []
    for _ in range(2):
        _, model, _, _ = train_twins("sgd-momentum", dict(rho=0.05, adaptive=True), steps=3)
        runs.append(model.state_dict())
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


def test_sgd_first_step_initialises_momentum_to_the_gradient():
    """Even when the buffer holds NaN: on the first step it is neither read into the result nor kept."""
    update = SGDUpdate(momentum=0.9)
    span = make_span(BLOCK + 1, torch.float32, DEVICE, update)
    span.backup.copy_(span.weights)
    span.state["momentum_buffer"].fill_(math.nan)
    BACKEND.restore_and_update(span, update, step_scalars(DEVICE, 0))
    assert torch.equal(span.state["momentum_buffer"], span.grads)
    assert torch.isfinite(span.weights).all()


def test_gpu_bench_script_runs_in_smoke_mode(capsys):
    """bench/gpu_triton.py --smoke: the GPU benchmark's code paths (parity check, tables) on tiny sizes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_triton.py"
    spec = importlib.util.spec_from_file_location("gpu_triton_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke"])
    out = capsys.readouterr().out
    assert "parity: triton matches reference" in out and "restore_and_update" in out
