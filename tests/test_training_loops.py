"""FusedSAM in the loops users run: gradients that exist in one pass only, both closure conventions of
step(), the one-gradient-per-step() alternate mode, optimizer wrappers that copy __dict__, and
torch.optim-shaped state. Every test compares with the classic per-tensor SAM (the oracle) run on a
deep copy over the same batches."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fused_sam
from fused_sam import FusedSAM
from fused_sam.classic import ClassicSAM

from models import batches, conv_net, loss_of, mlp
from test_optimizer_parity import assert_twins_close

BASES = {
    "sgd-momentum-wd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "rmsprop-fallback": (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9, weight_decay=1e-2)),
}
CPU_BACKENDS = [
    pytest.param(name, marks=pytest.mark.skipif(
        name not in fused_sam.available_backends(torch.device("cpu"), torch.float32),
        reason=f"backend {name} unavailable here"))
    for name in ("reference", "native", "torch", "triton")
]


def max_diff(model_a, model_b) -> float:
    return max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))


# --- 1. a gradient in one pass only ----------------------------------------------------------------

class Branchy(nn.Module):
    """An MLP with two side branches: one used only in the pass at w, one only in the pass at w + e."""

    def __init__(self, dtype, with_only_at_w=True):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(10, 16)
        self.head = nn.Linear(16, 3)
        self.only_at_perturbed = nn.Linear(16, 3)
        self.only_at_w = nn.Linear(16, 3) if with_only_at_w else None
        self.to(dtype)
        self.at_perturbed = False

    def forward(self, x):
        h = torch.tanh(self.body(x))
        side = self.only_at_perturbed if self.at_perturbed else self.only_at_w
        return self.head(h) + (side(h) if side is not None else 0)


def branchy_sam_loop(model, opt, steps, dtype, zero_between_passes: bool):
    """Lightning-style: model.zero_grad() (set_to_none) before the first backward of every step."""
    for x, y in batches(mlp(), steps, dtype):
        model.zero_grad()
        model.at_perturbed = False
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=not zero_between_passes)
        if zero_between_passes:
            model.zero_grad()
        model.at_perturbed = True
        loss_of(model, x, y).backward()
        opt.second_step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("zero_between_passes", [True, False], ids=["model-zero-grad", "first-step-zero-grad"])
def test_gradient_in_one_pass_only_matches_classic(base, backend, zero_between_passes):
    """A parameter with no gradient at w is not perturbed but is updated with its gradient at w + e; one
    with a gradient at w and none at w + e is restored and not updated. (Its .grad stays None at w + e only
    when the model's zero_grad runs between the passes: FusedSAM's own zero_grad keeps zeroed views, see
    test_own_zero_grad_between_passes_gives_a_zero_gradient.)"""
    dtype = torch.float64 if backend != "triton" else torch.float32
    cls, kwargs = BASES[base]
    model = Branchy(dtype, with_only_at_w=zero_between_passes)
    twin = copy.deepcopy(model)
    untouched = copy.deepcopy(model.only_at_perturbed)
    fused = FusedSAM(model.parameters(), cls, rho=0.1, backend=backend, **kwargs)
    classic = ClassicSAM(twin.parameters(), cls, rho=0.1, **kwargs)
    branchy_sam_loop(model, fused, 6, dtype, zero_between_passes)
    branchy_sam_loop(twin, classic, 6, dtype, zero_between_passes)
    assert_twins_close(twin, model, dtype if backend != "triton" else torch.float32)
    assert max_diff(model.only_at_perturbed, untouched) > 1e-3  # it was updated


def test_gradient_only_at_perturbed_point_on_first_step_is_used():
    """The regression itself: step 0 with every .grad None (Lightning), one branch reached only at w + e."""
    model = Branchy(torch.float64)
    before = copy.deepcopy(model.only_at_perturbed)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = next(batches(mlp(), 1, torch.float64))
    model.zero_grad()
    loss_of(model, x, y).backward()
    opt.first_step(zero_grad=True)
    model.at_perturbed = True
    loss_of(model, x, y).backward()
    grad = model.only_at_perturbed.weight.grad.clone()
    opt.second_step()
    torch.testing.assert_close(model.only_at_perturbed.weight, before.weight - 0.1 * grad, rtol=0, atol=1e-15)


def test_own_zero_grad_between_passes_skips_a_parameter_not_reached_at_w_plus_e():
    """first_step(zero_grad=True) sets the gradients to None, as the classic class's torch zero_grad does,
    so a parameter reached at w but not at w + e is restored and not updated (no weight decay either)."""
    model = Branchy(torch.float64)
    before = copy.deepcopy(model.only_at_w)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, weight_decay=0.5)
    branchy_sam_loop(model, opt, 1, torch.float64, zero_between_passes=False)
    assert model.only_at_w.weight.grad is None
    assert torch.equal(model.only_at_w.weight, before.weight)


# --- 2. wrappers that copy the optimizer's __dict__ -------------------------------------------------

class DictCopyingWrapper:
    """What lightning.pytorch's LightningOptimizer does: copy __dict__, subclass the optimizer's class."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self.__class__ = type("Wrapped" + type(optimizer).__name__, (type(self), type(optimizer)), {})
        self._optimizer = optimizer

    def step(self, closure=None):
        return self._optimizer.step(closure)


def test_zero_grad_after_a_move_zeroes_the_moved_gradients():
    """model.to(channels_last) moves each .grad out of the flat buffer (grad.data = ...); zero_grad must
    zero what the parameters now hold, or the next backward adds onto stale gradients."""
    model = conv_net(torch.float64)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *next(batches(model, 1, torch.float64))).backward()
    model.to(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert not p.grad.any()
        assert p.grad.stride() == p.stride()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_dict_copying_wrapper_sees_relayout_phase_and_state():
    """A re-layout (channels_last) through the wrapper must be what the original saves, and vice versa."""
    model = conv_net()
    twin = copy.deepcopy(model)
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, **kwargs)
    wrapper = DictCopyingWrapper(opt)
    plain = FusedSAM(twin.parameters(), torch.optim.SGD, **kwargs)
    for step, (x, y) in enumerate(batches(model, 6)):
        if step == 2:
            model.to(memory_format=torch.channels_last)
            twin.to(memory_format=torch.channels_last)
        first, second = (wrapper, opt) if step % 2 else (opt, wrapper)
        for m, a, b in ((model, first, second), (twin, plain, plain)):
            loss_of(m, x, y).backward()
            a.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            b.second_step(zero_grad=True)
    loss_of(model, x, y).backward()
    opt.first_step()
    assert wrapper.perturbed  # the phase is shared too
    wrapper.second_step()
    loss_of(twin, x, y).backward()
    plain.first_step()
    plain.second_step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)  # wraps opt.step and reads opt._opt_called
    loss_of(model, x, y).backward()
    wrapper.first_step(zero_grad=True)
    loss_of(model, x, y).backward()
    wrapper.second_step()  # sets _opt_called through the wrapper
    assert opt._opt_called
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    loss_of(twin, x, y).backward()
    plain.first_step(zero_grad=True)
    loss_of(twin, x, y).backward()
    plain.second_step()
    for saved in (opt.state_dict(), wrapper.state_dict()):
        reference = plain.state_dict()
        for i, entry in reference["state"].items():
            for name, value in entry.items():
                assert torch.equal(saved["state"][i][name], value), (i, name)
    assert_twins_close(twin, model, torch.float32)
    assert wrapper.state is opt.state and wrapper.param_groups is opt.param_groups


# --- 3. step(closure) in both conventions ----------------------------------------------------------

def torch_closure(opt, model, x, y, calls=None):
    """torch.optim's closure: zero the gradients, forward, backward, return the loss."""
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss
    return closure


def classic_run(model, steps, dtype, cls=torch.optim.SGD, **kwargs):
    opt = ClassicSAM(model.parameters(), cls, rho=0.05, **kwargs)
    for x, y in batches(model, steps, dtype):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        opt.second_step(zero_grad=True)


def plain_run(model, steps, dtype, cls=torch.optim.SGD, **kwargs):
    opt = cls(model.parameters(), **kwargs)
    for x, y in batches(model, steps, dtype):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize("base", ["sgd-momentum-wd", "adamw"])
def test_step_closure_torch_convention_is_true_sam(base):
    """torch.optim's (and Lightning's) convention: step(closure) with no backward before it; the closure
    zeroes, runs forward and backward. FusedSAM must call it at w and again at w + e."""
    cls, kwargs = BASES[base]
    model = mlp(torch.float64)
    oracle, sgd = copy.deepcopy(model), copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), cls, rho=0.05, **kwargs)
    calls = []
    for x, y in batches(model, 8, torch.float64):
        loss_at_w = loss_of(model, x, y).detach()
        assert torch.equal(opt.step(torch_closure(opt, model, x, y, calls)), loss_at_w)
    assert len(calls) == 16
    classic_run(oracle, 8, torch.float64, cls, **kwargs)
    plain_run(sgd, 8, torch.float64, cls, **kwargs)
    assert_twins_close(oracle, model, torch.float64)
    assert max_diff(model, sgd) > 1e-4  # the test can tell SAM from the base optimizer alone


def test_step_closure_classic_convention_runs_the_closure_once():
    """The classic class's convention: the first backward is done, step(closure) evaluates at w + e only."""
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    calls = []
    for x, y in batches(model, 6, torch.float64):
        loss_of(model, x, y).backward()
        opt.step(lambda: calls.append(1) or loss_of(model, x, y).backward())
        opt.zero_grad()
    assert len(calls) == 6
    classic_run(oracle, 6, torch.float64, lr=0.1, momentum=0.9)
    assert_twins_close(oracle, model, torch.float64)


def test_step_closure_never_perturbs_with_a_stale_gradient():
    """After a step the buffer still holds the gradient taken at the previous w + e. A closure-only loop
    without zero_grad between steps must still take a fresh first gradient, never reuse that one."""
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    for x, y in batches(model, 6, torch.float64):
        opt.step(torch_closure(opt, model, x, y))
    classic_run(oracle, 6, torch.float64, lr=0.1)
    assert_twins_close(oracle, model, torch.float64)


def test_zero_grad_alone_is_not_a_first_gradient():
    """opt.zero_grad(); opt.step(closure): zeroing is not a backward, so the closure still runs twice."""
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    calls = []
    for x, y in batches(model, 4, torch.float64):
        opt.zero_grad()
        opt.step(lambda: calls.append(1) or loss_of(model, x, y).backward())
    assert len(calls) == 8
    classic_run(oracle, 4, torch.float64, lr=0.1)
    assert_twins_close(oracle, model, torch.float64)


def test_step_without_closure_after_first_step_is_the_second_step():
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-2)
    for x, y in batches(model, 5, torch.float64):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x, y).backward()
        assert opt.step() is None and not opt.perturbed
        opt.zero_grad()
    classic_run(oracle, 5, torch.float64, torch.optim.AdamW, lr=1e-2)
    assert_twins_close(oracle, model, torch.float64)
    with pytest.raises(RuntimeError, match="mode='alternate'"):
        opt.step()


def test_step_closure_after_first_step_runs_it_once_at_the_perturbed_point():
    """What Lightning's manual optimization does: first_step by hand, then opt.step() with Lightning's own
    (here: a do-nothing or a backward) closure. The closure runs once, then the second step."""
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    calls = []
    for k, (x, y) in enumerate(batches(model, 4, torch.float64)):
        loss_of(model, x, y).backward()
        opt.first_step(zero_grad=True)
        if k % 2:
            loss_of(model, x, y).backward()
            closure = lambda: calls.append(1)  # noqa: E731
        else:
            closure = torch_closure(opt, model, x, y, calls)
        opt.step(closure)
        assert not opt.perturbed
        opt.zero_grad()
    assert len(calls) == 4
    classic_run(oracle, 4, torch.float64, lr=0.1, momentum=0.9)
    assert_twins_close(oracle, model, torch.float64)


# --- 4. mode="alternate" ---------------------------------------------------------------------------

def alternate_reference(model, calls, dtype, cls, kwargs, scheduler=False):
    """Hand-written alternate SAM on the classic oracle: call k perturbs with batch k's gradient (k even)
    or restores and updates with batch k's gradient, taken at w + e (k odd)."""
    opt = ClassicSAM(model.parameters(), cls, rho=0.05, **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9) if scheduler else None
    for k, (x, y) in enumerate(batches(model, calls, dtype)):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.first_step() if k % 2 == 0 else opt.second_step()
        if sched:
            sched.step()


def alternate_run(model, opt, calls, dtype, seed=1, first=0, scheduler=None):
    for k, (x, y) in enumerate(batches(model, calls, dtype, seed)):
        if k < first:
            continue
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        if scheduler:
            scheduler.step()


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before:UserWarning")  # ClassicSAM's
@pytest.mark.parametrize("base", list(BASES))
def test_alternate_mode_matches_a_hand_written_loop(base):
    cls, kwargs = BASES[base]
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), cls, rho=0.05, mode="alternate", **kwargs)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)  # sees two calls per SAM step
    alternate_run(model, opt, 10, torch.float64, scheduler=sched)
    alternate_reference(oracle, 10, torch.float64, cls, kwargs, scheduler=True)
    assert_twins_close(oracle, model, torch.float64)
    assert opt.param_groups[0]["lr"] == pytest.approx(kwargs["lr"] * 0.9**10)


def test_alternate_mode_runs_a_closure_once_per_call():
    model = mlp(torch.float64)
    oracle = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, mode="alternate", lr=0.1)
    for x, y in batches(model, 6, torch.float64):
        expected = loss_of(model, x, y).detach()
        assert torch.equal(opt.step(torch_closure(opt, model, x, y)), expected)
    alternate_reference(oracle, 6, torch.float64, torch.optim.SGD, dict(lr=0.1))
    assert_twins_close(oracle, model, torch.float64)


@pytest.mark.parametrize("base", ["sgd-momentum-wd", "rmsprop-fallback"])
def test_alternate_mode_resumes_between_the_halves_bitwise(base, tmp_path):
    """A trainer may save after an odd number of step() calls: the model holds w + e, the optimizer's
    state dict the restore point, and the resumed run continues exactly."""
    cls, kwargs = BASES[base]
    model = mlp()
    straight = copy.deepcopy(model)
    make = lambda m: FusedSAM(m.parameters(), cls, rho=0.05, mode="alternate", **kwargs)  # noqa: E731
    alternate_run(straight, make(straight), 8, torch.float32)
    opt = make(model)
    alternate_run(model, opt, 3, torch.float32)
    assert opt.perturbed
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed = mlp(seed=7)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.perturbed
    alternate_run(resumed, opt2, 8, torch.float32, first=3)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    paired = FusedSAM(mlp().parameters(), cls, rho=0.05, **kwargs)
    with pytest.raises(ValueError, match="mode='alternate'"):
        paired.load_state_dict(ckpt["opt"])


def test_paired_mode_refuses_a_state_dict_mid_step():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(model, *next(batches(model, 1))).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.state_dict()


# --- 6. torch.optim-shaped state ---------------------------------------------------------------------

def test_state_is_shared_with_the_base_and_holds_views():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-2, amsgrad=True)
    assert opt.state is opt.base_optimizer.state
    classic_like = copy.deepcopy(model)
    torch_opt = ClassicSAM(classic_like.parameters(), torch.optim.AdamW, lr=1e-2, amsgrad=True)
    for m, o in ((model, opt), (classic_like, torch_opt)):
        for x, y in batches(m, 3):
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
    (segment,) = opt._sam.segments
    for p, q in zip(model.parameters(), classic_like.parameters()):
        mine, theirs = opt.state[p], torch_opt.base_optimizer.state[q]
        assert set(mine) == set(theirs) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert mine["step"].item() == theirs["step"].item() == 3
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert mine[name].shape == p.shape
            buf = segment.state[name]
            assert buf.data_ptr() <= mine[name].data_ptr() < buf.data_ptr() + buf.numel() * buf.element_size()
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-7)


def test_in_place_edits_of_state_reach_the_next_step():
    """Zeroing Adam's moments and rewinding 'step' through opt.state equals doing it to torch.optim's state."""
    model = mlp(torch.float64)
    twin = copy.deepcopy(model)
    opt = FusedSAM(model.parameters(), torch.optim.Adam, lr=1e-2)
    classic = ClassicSAM(twin.parameters(), torch.optim.Adam, lr=1e-2)
    for k, ((x, y), _) in enumerate(zip(batches(model, 6, torch.float64), range(6))):
        if k == 3:
            for o, m in ((opt, model), (classic.base_optimizer, twin)):
                first = next(m.parameters())
                o.state[first]["exp_avg"].zero_()
                o.state[first]["step"].fill_(1)
        for m, o in ((model, opt), (twin, classic)):
            loss_of(m, x, y).backward()
            o.first_step(zero_grad=True)
            loss_of(m, x, y).backward()
            o.second_step(zero_grad=True)
    assert_twins_close(twin, model, torch.float64)
    assert [opt.state[p]["step"].item() for p in model.parameters()] == [4, 6, 6, 6, 6, 6]


def test_state_entries_follow_a_relayout_and_a_load():
    model = conv_net()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    for x, y in batches(model, 2):
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
    first = next(model.parameters())
    entry = opt.state[first]
    saved = entry["momentum_buffer"].clone()
    model.to(memory_format=torch.channels_last)
    loss_of(model, *next(batches(model, 1))).backward()
    opt.first_step()
    (segment,) = opt._sam.segments
    assert opt.state[first] is entry  # the same dict, now pointing at the new buffer
    assert torch.equal(entry["momentum_buffer"], saved)
    assert entry["momentum_buffer"].data_ptr() >= segment.state["momentum_buffer"].data_ptr()
    opt.second_step()


def test_unfused_base_state_and_groups_stay_shared_after_load():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.RMSprop, lr=1e-3, momentum=0.9)
    for x, y in batches(model, 2):
        loss_of(model, x, y).backward()
        opt.step(lambda: loss_of(model, x, y).backward())
    state, groups = opt.state, opt.param_groups
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert opt.state is state is opt.base_optimizer.state
    assert opt.param_groups is groups is opt.base_optimizer.param_groups
    assert set(opt.state[next(model.parameters())]) >= {"square_avg", "momentum_buffer"}
