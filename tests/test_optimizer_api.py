"""FusedSAM's contract beyond the math: schedulers, checkpoints, gradients, storage changes, bad input."""
from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_sam
from fused_sam import BackendUnavailable, FusedSAM
from fused_sam import backends as backend_registry
from fused_sam import flat
from fused_sam.classic import ClassicSAM

from models import batches, conv_net, loss_of, mlp, sam_train
from test_optimizer_parity import assert_twins_close

TESTS = os.path.dirname(__file__)


@pytest.fixture(params=["compiled", "python"])
def view_check(request, monkeypatch):
    """Run a test with the compiled per-step view check (when built) and with the pure-Python one."""
    if request.param == "python":
        monkeypatch.setattr(flat, "_views_intact", None)
    elif flat._views_intact is None:
        pytest.skip("fused_sam._C is not built: only the Python view check exists")
    return request.param


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


# --- drop-in API ---------------------------------------------------------------------------------

def test_exports_and_shared_param_groups():
    model = mlp()
    opt = fused_sam.SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert fused_sam.SAM is FusedSAM
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["rho"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9
    assert list(opt.backends) == ["cpu torch.float32"]


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # ClassicSAM's
@pytest.mark.parametrize("attach_to_base", [False, True])
def test_lr_scheduler_changes_the_applied_lr(attach_to_base):
    model = mlp()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend="reference")
    classic = ClassicSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(fused.base_optimizer if attach_to_base else fused, 1, gamma=0.5)
    classic_sched = torch.optim.lr_scheduler.StepLR(classic, 1, gamma=0.5)
    for step in range(4):
        sam_train(model, fused, 1, seed=step)
        sam_train(twin, classic, 1, seed=step)
        sched.step()
        classic_sched.step()
    assert fused.param_groups[0]["lr"] == pytest.approx(0.1 / 16)
    assert_twins_close(twin, model, torch.float32)


def test_tensor_lr_is_accepted():
    model = mlp()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model.parameters(), torch.optim.Adam, lr=torch.tensor(0.01))
    classic = ClassicSAM(twin.parameters(), torch.optim.Adam, lr=0.01)
    sam_train(model, fused, 3)
    sam_train(twin, classic, 3)
    assert_twins_close(twin, model, torch.float32)


def test_eps_goes_to_the_base_optimizer_and_perturb_eps_to_sam():
    """As in the classic class, every keyword SAM does not know (eps included) is the base optimizer's."""
    opt = FusedSAM(mlp().parameters(), torch.optim.Adam, eps=1e-3, perturb_eps=1e-10)
    assert opt.param_groups[0]["eps"] == 1e-3 and opt.perturb_eps == 1e-10
    assert FusedSAM(mlp().parameters(), torch.optim.Adam).perturb_eps == 1e-12
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_setting'"):  # the base's refusal
        FusedSAM(mlp().parameters(), torch.optim.Adam, no_such_setting=1e-6)
    with pytest.raises(ValueError, match="perturb_eps must be a positive number"):
        FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, perturb_eps=0.0)


def test_adam_eps_reaches_the_update():
    """eps=1e-1 through FusedSAM must give the same run as the classic class passing eps=1e-1 to Adam."""
    model = mlp()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model.parameters(), torch.optim.Adam, lr=1e-2, eps=1e-1)
    classic = ClassicSAM(twin.parameters(), torch.optim.Adam, lr=1e-2, eps=1e-1)
    sam_train(model, fused, 4)
    sam_train(twin, classic, 4)
    assert_twins_close(twin, model, torch.float32)
    assert fused.base_optimizer.defaults["eps"] == 1e-1


def test_add_param_group_after_construction():
    model = mlp()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    classic = ClassicSAM(twin[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    for opt, m in ((fused, model), (classic, twin)):
        opt.add_param_group({"params": list(m[2].parameters()) + list(m[4].parameters()), "lr": 0.05, "rho": 0.1})
    sam_train(model, fused, 5)
    sam_train(twin, classic, 5)
    assert_twins_close(twin, model, torch.float32)


# --- gradients and storage -----------------------------------------------------------------------

def test_parameters_and_grads_are_views_into_flat_buffers():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    (segment,) = opt._sam.segments
    assert all(p.grad is None for p in model.parameters())  # as torch.optim: None until a backward
    x, y = next(iter(batches(model, 1)))
    loss_of(model, x, y).backward()  # accumulates into the flat buffer
    for p, off in zip(model.parameters(), segment.offsets):
        assert p.data_ptr() == segment.weights.data_ptr() + off * 4
        assert p.grad.data_ptr() == segment.grads.data_ptr() + off * 4
        assert off % 16 == 0


@pytest.mark.skipif("native" not in fused_sam.available_backends("cpu", torch.float32),
                    reason="fused_sam._C is not built")
@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_cpu_step_dispatches_only_its_operators(base, skip_nonfinite):
    """From the second step on, a native CPU step dispatches its fused operators and the step counts' add,
    nothing else: the norm's partials buffer and its slices, the step count's view and the finiteness read
    are made once, not per step (each a tensor operation: ~20-80 us with a cold cache, where the whole step
    of 1000 tensors of 1k takes ~2.5 ms). Gradients that come and go still get a buffer that fits."""
    from fused_sam.bench.measure import count_ops

    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 40000, 7)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = FusedSAM(params, base, backend="native", lr=0.01, skip_nonfinite=skip_nonfinite)
    twin = FusedSAM([p.detach().clone().requires_grad_() for p in params], base, backend="reference", lr=0.01,
                    skip_nonfinite=skip_nonfinite)
    for q, p in zip(twin.param_groups[0]["params"], params):
        q.grad = p.grad.clone()

    def step(o):
        o.first_step()
        o.second_step()

    step(opt)
    counts = count_ops(lambda: step(opt)).names
    norms = 2 if skip_nonfinite else 1
    assert counts == {"fused_sam.sq_norm_partials": norms, "fused_sam.perturb": 1, "fused_sam.restore_update": 1,
                      "aten.add_": 1}
    step(twin)
    step(twin)
    params[1].grad = None  # two spans now, two slices of a new partials buffer; then one span again
    twin.param_groups[0]["params"][1].grad = None
    for o in (opt, twin):
        step(o)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    for o in (opt, twin):
        step(o)
    for p, q in zip(params, twin.param_groups[0]["params"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _vm_flags(address: int) -> list:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"), reason="no transparent huge pages")
def test_large_cpu_flat_buffers_are_advised_to_huge_pages():
    """Every flat buffer of a large CPU segment (weights, grads, backup, optimizer state, float32 master) is
    madvise(MADV_HUGEPAGE)d before its first write: its memory's mapping carries the 'hg' flag. Small
    buffers and tensors off the CPU are not advised."""
    big = torch.nn.Parameter(torch.randn(3 * flat.HUGE_PAGE_MIN_BYTES // 4))  # 3x the threshold, float32
    half = torch.nn.Parameter(torch.randn(flat.HUGE_PAGE_MIN_BYTES, dtype=torch.bfloat16))  # 2x, bf16
    opt = FusedSAM([big], torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    big.grad = torch.randn_like(big)
    opt.first_step()
    opt.second_step()
    low = FusedSAM([half], torch.optim.AdamW, rho=0.05, lr=0.1, master_weights=True)
    half.grad = torch.randn_like(half)
    low.first_step()
    low.second_step()
    (segment,), (low_segment,) = opt._sam.segments, low._sam.segments
    buffers = [segment.weights, segment.grads, segment.backup, segment.state["momentum_buffer"], low_segment.weights,
               low_segment.master, low_segment.state["exp_avg"], low_segment.state["exp_avg_sq"]]
    for buf in buffers:
        assert "hg" in _vm_flags(buf.data_ptr() + buf.numel() * buf.element_size() // 2), (buf.dtype, buf.numel())
    assert not flat.advise_huge_pages(torch.empty(1000))  # no whole 2 MiB page inside
    assert not flat.advise_huge_pages(torch.empty(2**22, device="meta"))
    assert torch.equal(big.detach(), segment.weights[:big.numel()])  # advised memory holds what was written


def test_zero_grad_sets_none_or_keeps_zeroed_views_as_torch_optim():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *next(batches(model, 1))).backward()
    grads = [p.grad for p in model.parameters()]
    opt.zero_grad(set_to_none=False)
    for p, g in zip(model.parameters(), grads):
        assert p.grad is g and not p.grad.any()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_of(model, *next(batches(model, 1))).backward()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # the next backward fills the views


@pytest.mark.parametrize("base", [torch.optim.SGD, torch.optim.AdamW])
def test_replaced_grads_are_gathered(base, view_check):
    """model.zero_grad() sets .grad to None, so autograd allocates fresh tensors every backward."""
    model = mlp()
    twin = copy.deepcopy(model)
    fused = FusedSAM(model.parameters(), base, lr=0.01, weight_decay=1e-2)
    classic = ClassicSAM(twin.parameters(), base, lr=0.01, weight_decay=1e-2)
    for m, opt in ((model, fused), (twin, classic)):
        for x, y in batches(m, 6):
            m.zero_grad()
            loss_of(m, x, y).backward()
            opt.first_step()
            m.zero_grad()
            loss_of(m, x, y).backward()
            opt.second_step()
    assert_twins_close(twin, model, torch.float32)
    (segment,) = fused._sam.segments
    assert all(p.grad is view for p, view in zip(model.parameters(), segment.grad_views))


@pytest.mark.parametrize("make_model, move, dtype", [
    (mlp, lambda m: m.double(), torch.float64),
    (conv_net, lambda m: m.to(memory_format=torch.channels_last), torch.float32),
])
def test_moved_parameters_are_reflattened_keeping_state(make_model, move, dtype, view_check):
    """A model moved after construction continues exactly like one moved through a checkpoint."""
    model = make_model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sam_train(model, opt, 3)
    twin = move(copy.deepcopy(model))
    twin_opt = FusedSAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(opt.state_dict())
    move(model)
    strides = [p.stride() for p in model.parameters()]
    before = snapshot(model)
    sam_train(model, opt, 1, dtype=dtype)
    sam_train(twin, twin_opt, 1, dtype=dtype)
    assert list(opt.backends) == [f"cpu {dtype}"]
    (segment,) = opt._sam.segments
    assert model[0].weight.data_ptr() == segment.weights.data_ptr()
    assert [p.stride() for p in model.parameters()] == strides
    assert not torch.equal(model[0].weight, before["0.weight"]), "the model's new storage was not updated"
    assert all(s["step"] == 4 for s in opt.state_dict()["state"].values())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_storage_change_between_first_and_second_step_is_an_error(view_check):
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = next(batches(model, 1))
    loss_of(model, x, y).backward()
    opt.first_step()
    model[2].weight.data = model[2].weight.data.clone()
    with pytest.raises(RuntimeError, match="parameter 2 of param group 0.*changed storage"):
        opt.second_step()



@pytest.mark.parametrize("change", ["data", "grad", "no grad"])
@pytest.mark.parametrize("where", [0, 37, 63])
def test_view_check_sees_a_change_at_any_parameter(change, where, view_check):
    """64 parameters (the compiled check reads each parameter's links some parameters ahead of the one it
    checks): one parameter whose data or .grad is no longer its view, anywhere, makes the segment not intact."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(64)]
    for p in params:
        p.grad = torch.randn(3)
    opt = FusedSAM(params, torch.optim.SGD, lr=0.1)
    (segment,) = opt._sam.segments
    assert segment.intact()
    p = params[where]
    if change == "data":
        p.data = p.data.clone()
    elif change == "grad":
        p.grad = p.grad.clone()
    else:
        p.grad = None
    assert not segment.intact()


@pytest.mark.parametrize("caller_grad_mode", [True, False])
def test_steps_run_without_grad_and_restore_the_callers_mode(caller_grad_mode, monkeypatch):
    """first_step and second_step run the backend with grad mode off, and leave the caller's mode as it was,
    also when they raise."""
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    backend = opt._sam.segments[0].backend
    seen = []
    for name in ("perturb", "restore_and_update"):
        def recorded(*args, _method=getattr(backend, name), **kwargs):
            seen.append(torch.is_grad_enabled())
            return _method(*args, **kwargs)
        monkeypatch.setattr(backend, name, recorded)
    loss_of(model, *next(batches(model, 1))).backward()
    with torch.set_grad_enabled(caller_grad_mode):
        opt.first_step()
        assert torch.is_grad_enabled() is caller_grad_mode
        with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
            opt.first_step()
        assert torch.is_grad_enabled() is caller_grad_mode
        opt.second_step()
        assert torch.is_grad_enabled() is caller_grad_mode
    assert seen == [False, False]

# --- the non-finite guard --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_norm_skips_the_perturbation(bad):
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = next(batches(model, 1))
    loss_of(model, x, y).backward()
    model[2].weight.grad[0, 0] = bad
    before = snapshot(model)
    opt.first_step(zero_grad=True)
    assert_unchanged(model, before)
    assert opt.nonfinite_steps == 1
    loss_of(model, x, y).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.state_dict()["sam"]["nonfinite_steps"] == 1


# --- checkpoints -----------------------------------------------------------------------------------

RESUME = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from fused_sam import FusedSAM
    from models import mlp, sam_train
    model = mlp()
    model.load_state_dict(torch.load({path!r} + ".model"))
    opt = FusedSAM(model.parameters(), {base}, **{kwargs!r})
    opt.load_state_dict(torch.load({path!r} + ".opt"))
    sam_train(model, opt, 5, seed=2)
    torch.save(model.state_dict(), {path!r} + ".resumed")
""")


@pytest.mark.parametrize("base, kwargs", [
    ("torch.optim.SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ("torch.optim.AdamW", dict(lr=1e-2, amsgrad=True, weight_decay=1e-2)),
    ("torch.optim.RMSprop", dict(lr=1e-3, momentum=0.5)),
])
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path, base, kwargs):
    base_cls = eval(base)
    model = mlp()
    opt = FusedSAM(model.parameters(), base_cls, **kwargs)
    sam_train(model, opt, 5, seed=1)
    path = str(tmp_path / "ckpt")
    torch.save(model.state_dict(), path + ".model")
    torch.save(opt.state_dict(), path + ".opt")
    sam_train(model, opt, 5, seed=2)
    script = RESUME.format(tests=TESTS, path=path, base=base, kwargs=kwargs)
    subprocess.run([sys.executable, "-c", script], check=True)
    resumed = torch.load(path + ".resumed")
    for name, value in model.state_dict().items():
        assert torch.equal(value, resumed[name]), f"{name} differs after resume"


def test_state_dict_is_torch_format_and_loads_into_a_fresh_optimizer():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.Adam, lr=1e-2)
    sam_train(model, opt, 2)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "sam"}
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_sq", "step"}
    assert sd["state"][0]["exp_avg"].shape == model[0].weight.shape
    assert sd["param_groups"][0]["params"] == list(range(6))
    other = FusedSAM(mlp(seed=3).parameters(), torch.optim.Adam, lr=5.0)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-2
    assert torch.equal(other.state_dict()["state"][4]["exp_avg_sq"], sd["state"][4]["exp_avg_sq"])


def test_load_state_dict_rejects_a_different_layout():
    opt = FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="param group 0 has 6 parameters, the state dict 5"):
        opt.load_state_dict(sd)


# --- bad input: a clear error and nothing changed --------------------------------------------------

def _construct(params_of, **kwargs):
    model = mlp()
    before = snapshot(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    return model, before, ptrs, lambda: FusedSAM(params_of(model), **kwargs)


@pytest.mark.parametrize("params_of, kwargs, error, match", [
    (lambda m: [], {}, ValueError, "empty parameter list"),
    (lambda m: [m[0].weight, m[0].weight], {}, ValueError, "same tensor as parameter 0"),
    (lambda m: m.parameters(), dict(rho=-0.1), ValueError, "rho must be a non-negative"),
    (lambda m: [{"params": m.parameters(), "rho": -1}], {}, ValueError, "param group 0"),
    (lambda m: m.parameters(), dict(perturb_eps=0.0), ValueError, "perturb_eps must be a positive"),
    (lambda m: m.parameters(), dict(mode="twice"), ValueError, "mode must be one of"),
    (lambda m: m.parameters(), dict(eta=-1.0), ValueError, "eta must be a non-negative"),
    (lambda m: m.parameters(), dict(backend="cuda-magic"), ValueError, "unknown backend 'cuda-magic'"),
    (lambda m: m.parameters(), dict(base_optimizer=object), TypeError, "torch.optim.Optimizer subclass"),
    (lambda m: m.parameters(), dict(base_optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)),
     TypeError, "not an instance"),
    (lambda m: list(m.parameters()) + [torch.zeros(2, dtype=torch.complex64, requires_grad=True)], {}, TypeError,
     "complex"),
    (lambda m: list(m.parameters()) + [torch.zeros(2, dtype=torch.int64)], {}, TypeError, "floating-point"),
    (lambda m: list(m.parameters()) + [torch.zeros(4, 4, requires_grad=True)[:, :2]], {}, ValueError, "dense"),
    (lambda m: m.parameters(), dict(lr=-1.0), ValueError, "Invalid learning rate"),
])
def test_bad_construction_raises_and_changes_nothing(params_of, kwargs, error, match):
    model, before, ptrs, construct = _construct(params_of, **kwargs)
    with pytest.raises(error, match=match):
        construct()
    assert_unchanged(model, before)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_unavailable_backend_says_which_and_why(monkeypatch):
    monkeypatch.setitem(backend_registry._REGISTRY, "triton", ("fused_sam.no_such_module", "Missing"))
    monkeypatch.setattr(backend_registry, "_instances", {})
    model, before, ptrs, construct = _construct(lambda m: m.parameters(), backend="triton")
    with pytest.raises(BackendUnavailable, match="backend 'triton' is unavailable .* could not be imported"):
        construct()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert "triton" not in fused_sam.available_backends("cpu")


def test_auto_falls_back_without_error_and_says_why(monkeypatch):
    """Without the extension auto takes the torch-ops backend, without it too the reference; the report says
    why each missing backend is missing."""
    monkeypatch.setitem(backend_registry._REGISTRY, "native", ("fused_sam.no_such_module", "Missing"))
    monkeypatch.setattr(backend_registry, "_instances", {})
    opt = FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backends == {"cpu torch.float32": "torch"}
    report = fused_sam.backend_report("cpu")
    assert report["torch"] is None and report["reference"] is None
    assert "fused_sam.no_such_module could not be imported" in report["native"]
    monkeypatch.setitem(backend_registry._REGISTRY, "torch", ("fused_sam.no_such_module", "Missing"))
    monkeypatch.setattr(backend_registry, "_instances", {})
    opt = FusedSAM(mlp().parameters(), torch.optim.SGD, lr=0.1, backend="auto")
    assert opt.backends == {"cpu torch.float32": "reference"}


def test_sparse_gradient_raises_and_changes_nothing(view_check):
    """With the flat gradient view linked, autograd accumulates densely; a fresh sparse .grad is refused."""
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FusedSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    (emb.weight.grad,) = torch.autograd.grad(emb(torch.tensor([1, 2])).sum(), [emb.weight])
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()
    assert torch.equal(emb.weight, before)


def test_call_order_errors():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="second_step\\(\\) called before first_step\\(\\)"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    x, y = next(batches(model, 1))
    loss_of(model, x, y).backward()
    opt.first_step()
    perturbed = snapshot(model)
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.state_dict()
    assert_unchanged(model, perturbed)


def test_refused_base_setting_is_caught_before_the_weights_move():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *next(batches(model, 1))).backward()
    opt.param_groups[0]["differentiable"] = True
    before = snapshot(model)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        opt.first_step()
    assert_unchanged(model, before)


def test_rho_changed_to_negative_at_runtime_is_caught_before_any_change():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *next(batches(model, 1))).backward()
    opt.param_groups[0]["rho"] = -1.0
    before = snapshot(model)
    with pytest.raises(ValueError, match="rho must be a non-negative"):
        opt.first_step()
    assert_unchanged(model, before)


def test_base_settings_changed_between_steps_take_effect():
    """The base update is read once per distinct setting: a setting changed between steps (a number, a
    pair, a flag) must reach the next update as torch.optim's does."""
    def run(change):
        torch.manual_seed(0)
        model = mlp(torch.float64)
        opt = FusedSAM(model.parameters(), torch.optim.Adam, rho=0.0, lr=0.01, betas=(0.9, 0.99))
        ref_model = mlp(torch.float64)
        ref = torch.optim.Adam(ref_model.parameters(), lr=0.01, betas=(0.9, 0.99))
        for step, (x, y) in enumerate(batches(model, 4, torch.float64)):
            if step == 2:
                change(opt.param_groups[0]), change(ref.param_groups[0])
            for m, o in ((model, opt), (ref_model, ref)):
                loss_of(m, x, y).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y).backward()
            opt.second_step(zero_grad=True)
            ref.step()
            ref.zero_grad()
        for a, b in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        return [p.detach().clone() for p in model.parameters()]

    unchanged = run(lambda g: None)
    for change in (lambda g: g.update(weight_decay=0.1), lambda g: g.update(betas=(0.5, 0.99)),
                   lambda g: g.update(maximize=True)):
        assert not all(map(torch.equal, run(change), unchanged))
