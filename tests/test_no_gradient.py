"""A parameter that gets no gradient is not updated, as in torch.optim: zero_grad() sets every .grad to None
(set_to_none=True, the default), and a parameter no backward reaches afterwards (frozen mid-run, an expert
no token was routed to, a branch not taken) keeps its weight, state and step count bit for bit. Checked in
float64 to 1e-12 against torch.optim itself (rho = 0) and the classic per-tensor SAM class."""

import pytest
import torch

from fused_sam import FusedSAM, available_backends
from fused_sam.classic import ClassicSAM
from fused_sam.variants import Every, LookSAM, MomentumSAM

BACKENDS = [b for b in ("reference", "torch", "native") if b in available_backends(torch.device("cpu"), torch.float64)]
BASES = {
    "sgd_nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5, weight_decay=0.01)),  # not fused: its own step()
}
STEPS = 6


class Net(torch.nn.Module):
    """A trunk, two experts and a branch; ``used`` says which of the optional parts a forward runs."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(5, 8)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.branch = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, used):
        h = torch.tanh(self.trunk(x))
        h = h + sum(torch.tanh(self.experts[k](h)) for k in (0, 1) if f"expert{k}" in used)
        if "branch" in used:
            h = h + torch.tanh(self.branch(h))
        return self.head(h)


# Per scenario, for step t and pass k (0: at w, 1: at w + e): the optional parts used, and whether the trunk is
# frozen (requires_grad=False) during step t.
SCENARIOS = {
    "freeze_then_unfreeze": (lambda t, k: {"expert0", "expert1", "branch"}, lambda t: 2 <= t < 4),
    "moe_expert_without_tokens": (lambda t, k: {"expert0"} | ({"expert1"} if t % 3 != 1 else set()), lambda t: False),
    "branch_every_other_step": (lambda t, k: {"expert0"} | ({"branch"} if t % 2 == 0 else set()), lambda t: False),
    "reached_only_at_w_plus_e": (lambda t, k: {"expert0"} | ({"branch"} if k == 1 else set()), lambda t: False),
}


def batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def loss_of(model, x, y, used):
    return torch.nn.functional.mse_loss(model(x, used), y)


def new_model():
    torch.manual_seed(0)
    return Net().double()


def set_frozen(model, frozen: bool) -> None:
    model.trunk.requires_grad_(not frozen)


def fused_run(scenario, base, backend, rho, loop, **kwargs):
    uses, frozen = SCENARIOS[scenario]
    model = new_model()
    cls, settings = BASES[base]
    opt = FusedSAM(model.parameters(), cls, rho=rho, backend=backend, **settings, **kwargs)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, frozen(t))
        if loop == "two_calls":
            loss_of(model, x, y, uses(t, 0)).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y, uses(t, 1)).backward()
            opt.second_step(zero_grad=True)
        elif loop == "closure_torch":  # nothing ran before step(): the closure runs at w, then at w + e
            passes = iter((0, 1))

            def closure():
                opt.zero_grad()
                loss = loss_of(model, x, y, uses(t, next(passes)))
                loss.backward()
                return loss

            opt.step(closure)
        else:  # closure_classic: the first backward ran, the closure runs once, at w + e
            loss_of(model, x, y, uses(t, 0)).backward()
            opt.step(lambda: loss_of(model, x, y, uses(t, 1)).backward())
            opt.zero_grad()
    return model, opt


def classic_run(scenario, base, rho):
    uses, frozen = SCENARIOS[scenario]
    model = new_model()
    cls, settings = BASES[base]
    opt = ClassicSAM(model.parameters(), cls, rho=rho, **settings)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, frozen(t))
        loss_of(model, x, y, uses(t, 0)).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y, uses(t, 1)).backward()
        opt.second_step(zero_grad=True)
    return model, opt.base_optimizer


def torch_run(scenario, base, set_to_none=True):
    """torch.optim with the gradient of the pass FusedSAM updates with (at w + e, which is w at rho = 0)."""
    uses, frozen = SCENARIOS[scenario]
    model = new_model()
    cls, settings = BASES[base]
    opt = cls(model.parameters(), **settings)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, frozen(t))
        opt.zero_grad(set_to_none=set_to_none)
        loss_of(model, x, y, uses(t, 1)).backward()
        opt.step()
    return model, opt


def assert_same_run(model, opt, ref_model, ref_opt):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
        ref_state, state = ref_opt.state.get(q, {}), opt.state.get(p, {})
        for key, value in ref_state.items():
            if key == "step":
                assert float(state.get("step", 0)) == float(value), f"{name}: step {state.get('step')} != {value}"
            elif value is not None:
                torch.testing.assert_close(state[key], value, rtol=0, atol=1e-12, msg=lambda m: f"{name} {key}: {m}")
        if not ref_state:  # never updated: no state that moved
            assert float(state.get("step", 0)) == 0, f"{name} was never updated by the reference"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_classic_sam_class(scenario, base, backend):
    model, opt = fused_run(scenario, base, backend, rho=0.05, loop="two_calls")
    assert_same_run(model, opt, *classic_run(scenario, base, rho=0.05))


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("base", BASES)
def test_matches_torch_optim_at_rho_zero(scenario, base):
    model, opt = fused_run(scenario, base, "reference", rho=0.0, loop="two_calls")
    assert_same_run(model, opt, *torch_run(scenario, base))


@pytest.mark.parametrize("loop", ["closure_torch", "closure_classic"])
@pytest.mark.parametrize("scenario", ["freeze_then_unfreeze", "moe_expert_without_tokens"])
@pytest.mark.parametrize("base", ["sgd_nesterov", "adamw_amsgrad", "rmsprop"])
def test_step_closure_conventions_match_the_classic_class(loop, scenario, base):
    model, opt = fused_run(scenario, base, "torch", rho=0.05, loop=loop)
    assert_same_run(model, opt, *classic_run(scenario, base, rho=0.05))


@pytest.mark.parametrize("base", ["sgd_nesterov", "adamw_amsgrad"])
def test_capturable_path_skips_alike(base):
    model, opt = fused_run("freeze_then_unfreeze", base, "reference", rho=0.05, loop="two_calls", capturable=True)
    assert_same_run(model, opt, *classic_run("freeze_then_unfreeze", base, rho=0.05))


def frozen_snapshot(model, opt):
    return [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
            for p in model.trunk.parameters()]


def assert_unchanged(model, opt, snapshot):
    for p, (weight, state) in zip(model.trunk.parameters(), snapshot):
        assert torch.equal(p, weight)
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("base, kwargs", [
    ("adamw_amsgrad", dict(mode="alternate")),
    ("adamw_amsgrad", dict(variant=Every(2))),
    ("adamw_amsgrad", dict(skip_nonfinite=False)),
    ("sgd_nesterov", dict(variant=MomentumSAM())),
    ("adamw_amsgrad", dict(variant=LookSAM(2))),
    ("rmsprop", dict(variant=LookSAM(2))),
], ids=["alternate", "every2", "no_skip_nonfinite", "momentum_sam", "looksam", "looksam_unfused"])
def test_a_frozen_parameter_stays_bit_for_bit(base, kwargs):
    """Alternate mode (each step() call one half), a variant's plain and reuse steps, MomentumSAM's
    perturbation along the momentum: a frozen parameter is neither perturbed nor updated, its state and
    step count unchanged, while the others train."""
    model = new_model()
    cls, settings = BASES[base]
    opt = FusedSAM(model.parameters(), cls, rho=0.05, backend="torch", **settings, **kwargs)
    used = {"expert0"}
    snapshot = head = None
    for t, (x, y) in enumerate(batches()):
        if t == 2:
            set_frozen(model, True)
            with opt.at_restore_point():  # MomentumSAM holds the model at w - rho v / ||v|| between steps
                snapshot = frozen_snapshot(model, opt)
                head = model.head.weight.detach().clone()
        if kwargs.get("mode") == "alternate":
            opt.zero_grad()
            loss_of(model, x, y, used).backward()
            opt.step()
            if snapshot is not None:  # between the halves too: not perturbed
                assert_unchanged(model, opt, snapshot)
        elif opt.sam_step_due:
            loss_of(model, x, y, used).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, x, y, used).backward()
            opt.second_step(zero_grad=True)
        else:
            loss_of(model, x, y, used).backward()
            opt.plain_step(zero_grad=True)
        if snapshot is not None and "variant" in kwargs:  # MomentumSAM: not perturbed between steps either
            assert_unchanged(model, opt, snapshot)
    with opt.at_restore_point():
        assert_unchanged(model, opt, snapshot)
        assert not torch.equal(model.head.weight, head)


def test_grad_scaler_and_master_weights_leave_a_frozen_parameter_alone():
    model = new_model().to(torch.bfloat16)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, backend="torch",
                   master_weights=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    used = {"expert0"}
    snapshot = master = None
    for t, (x, y) in enumerate(batches()):
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
        if t == 2:
            set_frozen(model, True)
            snapshot = frozen_snapshot(model, opt)
            master = opt.state_dict()["state"][0]["sam_master_weight"].clone()
        scaler.scale(loss_of(model, x, y, used)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(model, x, y, used)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert_unchanged(model, opt, snapshot)
    assert torch.equal(opt.state_dict()["state"][0]["sam_master_weight"], master)


def test_set_to_none_false_updates_with_zero_gradients_as_torch_optim():
    """zero_grad(set_to_none=False) keeps zeroed gradients, and torch.optim then updates a frozen parameter
    with a zero gradient (weight decay, momentum): so does FusedSAM."""
    scenario, base = "freeze_then_unfreeze", "sgd_nesterov"
    uses, frozen = SCENARIOS[scenario]
    model = new_model()
    cls, settings = BASES[base]
    opt = FusedSAM(model.parameters(), cls, rho=0.0, backend="reference", **settings)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, frozen(t))
        opt.zero_grad(set_to_none=False)
        loss_of(model, x, y, uses(t, 0)).backward()
        opt.first_step()
        opt.zero_grad(set_to_none=False)
        loss_of(model, x, y, uses(t, 1)).backward()
        opt.second_step()
    ref_model, ref_opt = torch_run(scenario, base, set_to_none=False)
    assert_same_run(model, opt, ref_model, ref_opt)
    assert model.trunk.weight.grad is not None  # zeroed, not None: it moved while frozen, as in torch.optim


def test_gradients_are_none_after_zero_grad_and_views_after_a_backward():
    """As torch.optim: None after zero_grad(); a backward accumulates into the flat buffer (no copy)."""
    model = new_model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    segment = opt._sam.segments[0]
    x, y = batches()[0]
    for _ in range(2):
        opt.zero_grad()
        assert all(p.grad is None for p in model.parameters())
        loss_of(model, x, y, {"expert0"}).backward()
        used = [p.grad is not None for p in model.parameters()]
        assert used == [not n.startswith(("experts.1", "branch")) for n, _ in model.named_parameters()]
        assert all(p.grad is h for p, h, u in zip(model.parameters(), segment.grad_handles, used) if u)


def test_a_change_of_the_parameters_with_gradients_after_capture_is_refused(monkeypatch):
    """A captured graph updates the parameters that had a gradient when it was captured, on every replay:
    an eager step after capture with another set (a parameter frozen since) is refused, w left as it was.
    The capture itself needs a GPU; here the optimizer is told it is capturing."""
    import fused_sam.capture as capture_module

    model = new_model()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=torch.tensor(0.05, dtype=torch.float64),
                   rho=torch.tensor(0.05, dtype=torch.float64), momentum=0.9, capturable=True, backend="reference")
    (x, y), used = batches()[0], {"expert0"}
    monkeypatch.setattr(capture_module, "capturing", lambda: True)
    loss_of(model, x, y, used).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, x, y, used).backward()
    opt.second_step(zero_grad=True)
    monkeypatch.setattr(capture_module, "capturing", lambda: False)
    loss_of(model, x, y, used).backward()  # the same set, eagerly: fine
    opt.first_step(zero_grad=True)
    set_frozen(model, True)
    loss_of(model, x, y, used).backward()
    w = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="not those a CUDA graph captured .parameter 0 of param group 0"):
        opt.second_step()
    assert not opt.perturbed
    restored = [p.detach().clone() for p in model.parameters()]
    assert not all(map(torch.equal, w, restored))  # w + e was taken back to w
    loss_of(model, x, y, used).backward()
    with pytest.raises(RuntimeError, match="first_step\\(\\): the parameters with a gradient are not those"):
        opt.first_step()
    assert all(map(torch.equal, restored, [p.detach() for p in model.parameters()]))


def _ddp_run(rank: int) -> dict:
    """Two ranks under DDP (find_unused_parameters=True): expert 1 used on rank 0 only at some steps, on
    no rank at others; the trunk frozen for two steps."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = new_model()
    ddp = DDP(model, find_unused_parameters=True)
    cls, settings = BASES["adamw_amsgrad"]
    opt = FusedSAM(ddp.parameters(), cls, rho=0.05, backend="reference", **settings)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, 2 <= t < 4)
        used = {"expert0"} | ({"expert1"} if _ddp_expert1_used(t, rank) else set())
        half = slice(8 * rank, 8 * rank + 8)
        loss_of(ddp, x[half], y[half], used).backward()
        opt.first_step(zero_grad=True)
        loss_of(ddp, x[half], y[half], used).backward()
        opt.second_step(zero_grad=True)
    return {"weights": [p.detach().clone() for p in model.parameters()],
            "steps": [float(opt.state[p].get("step", 0)) for p in model.parameters()]}


def _ddp_expert1_used(t: int, rank: int) -> bool:
    return {0: True, 1: False, 2: rank == 0}[t % 3]  # both ranks, none, rank 0 only


def test_ddp_ranks_agree_on_which_parameters_update(tmp_path):
    """DDP writes the averaged gradient on every rank for a parameter any rank used and none for one no
    rank used: the ranks update the same parameters, equal to the classic class on the mean of their losses."""
    from distributed_harness import run_on_ranks

    ranks = run_on_ranks(_ddp_run, (), tmp_path)
    for a, b in zip(ranks[0]["weights"], ranks[1]["weights"]):
        assert torch.equal(a, b)
    assert ranks[0]["steps"] == ranks[1]["steps"]
    model = new_model()
    cls, settings = BASES["adamw_amsgrad"]
    classic = ClassicSAM(model.parameters(), cls, rho=0.05, **settings)
    for t, (x, y) in enumerate(batches()):
        set_frozen(model, 2 <= t < 4)

        def mean_loss():
            return sum(loss_of(model, x[8 * r:8 * r + 8], y[8 * r:8 * r + 8],
                               {"expert0"} | ({"expert1"} if _ddp_expert1_used(t, r) else set())) for r in (0, 1)) / 2

        mean_loss().backward()
        classic.first_step(zero_grad=True)
        mean_loss().backward()
        classic.second_step(zero_grad=True)
    for a, p in zip(ranks[0]["weights"], model.parameters()):
        torch.testing.assert_close(a, p.detach(), rtol=0, atol=1e-12)
    assert ranks[0]["steps"] == [float(classic.base_optimizer.state[p].get("step", 0)) for p in model.parameters()]


FLOAT32_BACKENDS = [b for b in ("reference", "torch", "native", "triton")
                    if b in available_backends(torch.device("cpu"), torch.float32)]  # triton: its interpreter


def _float32_run(backend):
    model = new_model().float()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2, weight_decay=0.1, backend=backend)
    untouched = None
    for t, (x, y) in enumerate(batches()[:4]):
        x, y = x.float(), y.float()
        if t == 1:
            set_frozen(model, True)
            untouched = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                         for p in [*model.trunk.parameters(), *model.experts[1].parameters()]]
        loss_of(model, x, y, {"expert0"}).backward()  # expert 1 gets no tokens
        opt.first_step(zero_grad=True)
        loss_of(model, x, y, {"expert0"}).backward()
        opt.second_step(zero_grad=True)
    for p, (weight, state) in zip([*model.trunk.parameters(), *model.experts[1].parameters()], untouched):
        assert torch.equal(p, weight)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    return model


@pytest.mark.parametrize("backend", FLOAT32_BACKENDS)
def test_every_backend_skips_what_has_no_gradient(backend):
    """Each backend runs its kernels over the runs of parameters with a gradient only (float32: triton
    runs here under its interpreter)."""
    model, reference = _float32_run(backend), _float32_run("reference")
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
