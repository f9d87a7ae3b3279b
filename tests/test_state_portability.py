"""Portability of optimizer state (issue 15, item 3).

- A checkpoint saved with one backend loads into every other and continues to rounding (backends agree to
  float32 rounding, not bitwise): native <-> reference, triton (Triton's interpreter on CPU) <-> native,
  and the torch-ops backend, with SGD-momentum, AdamW+amsgrad and bf16 with float32 master weights. Loading
  goes through bytes with ``torch.load(map_location="cpu")``, as a checkpoint from another device would
  (a real CUDA -> CPU load is not run here: no GPU).
- State dicts of the classic SAM class (the widely used one keeps ``old_p`` per parameter and no base
  state), of its ``base_optimizer`` and of plain torch.optim optimizers load into FusedSAM and continue as
  the classic class would.
- A corrupt or mismatched state dict (wrong shapes, missing keys, wrong parameter count, another
  optimizer's state, wrong dtype, non-finite values, a newer format, ...) is refused with a clear error
  and leaves the optimizer, its param groups and the model's weights exactly as they were.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from fused_sam import FusedSAM, available_backends
from fused_sam.classic import ClassicSAM
from fused_sam.checkpoint import PROGRESS_KEY, upgrade_state_dict
from fused_sam.variants import LookSAM, Randomly

from models import batches, loss_of, mlp, sam_train
from reliability_helpers import assert_bitwise_equal, one_thread  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

SGD_M = (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3))
ADAMW = (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True))
CPU_BACKENDS = available_backends("cpu", torch.float32)
# float32 rounding, compounded over a few steps (Adam divides by sqrt(v) + eps: larger relative noise)
ROUNDING = dict(rtol=1e-4, atol=1e-5)


def through_bytes(obj):
    """What a checkpoint file does to a state dict: serialize, then load onto the CPU."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=True)


def flat_weights(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def flat_state(opt):
    """Every tensor of the optimizer's state dict, in a fixed order, as float64."""
    sd = opt.state_dict()["state"]
    return torch.cat([sd[i][k].reshape(-1).double() for i in sorted(sd) for k in sorted(sd[i])])


def make(backend, base, dtype=torch.float32, **sam):
    model = mlp().to(dtype)
    cls, kwargs = base
    return model, FusedSAM(model.parameters(), cls, rho=0.05, backend=backend, **sam, **kwargs)


def train(model, opt, steps, seed):
    dtype = next(model.parameters()).dtype
    for x, y in batches(model, steps, seed=seed):
        loss_of(model, x.to(dtype), y).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, x.to(dtype), y).backward()
        opt.second_step(zero_grad=True)


# --- across backends --------------------------------------------------------------------------------------

PAIRS = [("native", "reference"), ("reference", "native"), ("triton", "native"),
         pytest.param("native", "triton", marks=pytest.mark.slow),  # Triton's interpreter: seconds per run
         ("torch", "reference"), ("reference", "torch")]
PAIR_IDS = ["native-to-reference", "reference-to-native", "triton-to-native", "native-to-triton", "torch-to-reference",
            "reference-to-torch"]
SETUPS = {
    "sgd-momentum": (SGD_M, torch.float32, {}),
    "adamw-amsgrad": (ADAMW, torch.float32, {}),
    "bf16-master": ((torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)), torch.bfloat16, dict(master_weights=True)),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("source, target", PAIRS, ids=PAIR_IDS)
def test_checkpoint_moves_between_backends(source, target, setup):
    """Train 5 steps on ``source``, checkpoint, load into a fresh model and optimizer on ``target`` and train 5
    more: weights and optimizer state end within float32 rounding of ``source`` running all 10 steps. A
    target that had lost the optimizer state would end far outside that."""
    base, dtype, sam = SETUPS[setup]
    for name in (source, target):
        if name not in available_backends("cpu", dtype, master=bool(sam)):
            pytest.skip(f"backend {name!r} does not run here")
    model, opt = make(source, base, dtype, **sam)
    train(model, opt, 5, seed=1)
    ckpt = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})
    train(model, opt, 5, seed=2)

    moved, moved_opt = make(target, base, dtype, **sam)
    moved.load_state_dict(ckpt["model"])
    moved_opt.load_state_dict(ckpt["opt"])
    assert set(moved_opt.backends.values()) == {target}
    train(moved, moved_opt, 5, seed=2)
    tol = ROUNDING if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 weights: one ulp apart
    torch.testing.assert_close(flat_weights(moved), flat_weights(model), **tol)
    torch.testing.assert_close(flat_state(moved_opt), flat_state(opt), **ROUNDING)

    lost, lost_opt = make(target, base, dtype, **sam)  # the same without the optimizer state: far off
    lost.load_state_dict(ckpt["model"])
    train(lost, lost_opt, 5, seed=2)
    assert (flat_state(lost_opt)[: flat_state(opt).numel()] - flat_state(opt)).abs().max() > 100 * ROUNDING["atol"]


def test_float64_state_dict_loads_into_float32_and_back():
    """State dicts carry the dtype they were saved in; loading casts to the optimizer's state dtype, as
    torch.optim does (float32 parameters keep float32 state)."""
    model, opt = make("reference", ADAMW, torch.float64)
    train(model, opt, 3, seed=1)
    model32, opt32 = make("reference", ADAMW, torch.float32)
    model32.load_state_dict(model.state_dict())
    opt32.load_state_dict(opt.state_dict())
    for value in opt32.state_dict()["state"][0].values():
        assert value.dtype == torch.float32
    torch.testing.assert_close(flat_state(opt32), flat_state(opt), rtol=1e-6, atol=1e-7)


# --- from the classic class and from torch.optim ------------------------------------------------------------

class UpstreamSAM(torch.optim.Optimizer):
    """The widely copied SAM class (davda54/sam), as published: its own state keeps ``old_p`` for every
    parameter after a step, so ``state_dict()`` holds ``old_p`` entries and the param groups (with rho),
    and none of the base optimizer's state (that lives in ``base_optimizer.state``)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


@pytest.mark.parametrize("base", [SGD_M, ADAMW], ids=["sgd-momentum", "adamw-amsgrad"])
@pytest.mark.parametrize("saved", ["base_optimizer", "sam_and_base"])
def test_classic_sam_checkpoint_continues_in_fused_sam(base, saved):
    """A run of the upstream classic class, checkpointed, continues in FusedSAM as it would have in the
    classic class (float64, 1e-10). ``base_optimizer``: the checkpoint holds
    ``sam.base_optimizer.state_dict()`` (torch.optim's format: the momentum / Adam moments; FusedSAM keeps
    its own rho). ``sam_and_base``: ``sam.state_dict()`` (old_p entries and the param groups with rho, lr)
    loaded first, then the base state, into a FusedSAM built with other hyperparameters: the loaded lr and
    rho win, ``old_p`` is not kept as optimizer state."""
    cls, kwargs = base
    classic_model = mlp(torch.float64)
    classic = UpstreamSAM(classic_model.parameters(), cls, rho=0.1, **kwargs)
    sam_train(classic_model, classic, 4, torch.float64, seed=1)
    ckpt = through_bytes({"model": classic_model.state_dict(), "sam": classic.state_dict(),
                          "base": classic.base_optimizer.state_dict()})
    assert all("old_p" in s for s in ckpt["sam"]["state"].values())

    model = mlp(torch.float64, seed=5)
    model.load_state_dict(ckpt["model"])
    if saved == "base_optimizer":
        opt = FusedSAM(model.parameters(), cls, rho=0.1, backend="reference", **kwargs)
        opt.load_state_dict(ckpt["base"])
    else:
        other = dict(kwargs, lr=kwargs["lr"] * 3)
        opt = FusedSAM(model.parameters(), cls, rho=0.7, backend="reference", **other)
        opt.load_state_dict(ckpt["sam"])
        assert opt.param_groups[0]["rho"] == 0.1 and opt.param_groups[0]["lr"] == kwargs["lr"]
        assert all("old_p" not in s for s in opt.state_dict()["state"].values())
        opt.load_state_dict(ckpt["base"])
        assert opt.param_groups[0]["rho"] == 0.1
    for p, q in zip(model.parameters(), classic_model.parameters()):
        for name, value in classic.base_optimizer.state[q].items():
            assert torch.equal(opt.state[p][name].to(value.dtype), value), name
    sam_train(classic_model, classic, 4, torch.float64, seed=2)
    sam_train(model, opt, 4, torch.float64, seed=2)
    torch.testing.assert_close(flat_weights(model), flat_weights(classic_model), rtol=1e-10, atol=1e-12)


RMSPROP = (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True))


@pytest.mark.parametrize("base", [SGD_M, ADAMW, RMSPROP], ids=["sgd-momentum", "adamw-amsgrad", "rmsprop-unfused"])
def test_torch_optim_checkpoint_continues_as_sam(base):
    """A run of a plain torch.optim optimizer (no SAM), checkpointed, continues as SAM in FusedSAM exactly as
    the classic SAM class continues it from the same torch.optim state (float64, 1e-10). RMSprop is not
    fused: torch.optim loads its state, and its param groups (which know no rho) must keep SAM's settings."""
    cls, kwargs = base
    model = mlp(torch.float64)
    plain = cls(model.parameters(), **kwargs)
    for x, y in batches(model, 4, torch.float64):
        plain.zero_grad()
        loss_of(model, x, y).backward()
        plain.step()
    ckpt = through_bytes({"model": model.state_dict(), "opt": plain.state_dict()})
    fused_model, classic_model = mlp(torch.float64, seed=3), mlp(torch.float64, seed=4)
    for m in (fused_model, classic_model):
        m.load_state_dict(ckpt["model"])
    fused = FusedSAM(fused_model.parameters(), cls, rho=0.05, backend="reference", **kwargs)
    classic = ClassicSAM(classic_model.parameters(), cls, rho=0.05, **kwargs)
    fused.load_state_dict(copy.deepcopy(ckpt["opt"]))  # torch.optim keeps the loaded tensors themselves
    classic.base_optimizer.load_state_dict(copy.deepcopy(ckpt["opt"]))
    assert cls is torch.optim.SGD or fused.state_dict()["state"][0]["step"] == 4
    assert fused.param_groups[0]["rho"] == 0.05
    sam_train(fused_model, fused, 4, torch.float64, seed=2)
    sam_train(classic_model, classic, 4, torch.float64, seed=2)
    torch.testing.assert_close(flat_weights(fused_model), flat_weights(classic_model), rtol=1e-10, atol=1e-12)


def test_fused_sam_state_loads_into_torch_optim():
    """The other way: FusedSAM's state dict (minus SAM's own entry) is torch.optim's format."""
    model, opt = make("reference", ADAMW, torch.float64)
    train(model, opt, 3, seed=1)
    sd = opt.state_dict()
    plain = torch.optim.AdamW(model.parameters(), **ADAMW[1])
    plain.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    for p in model.parameters():
        for name, value in opt.state[p].items():
            assert torch.equal(plain.state[p][name], value.to(plain.state[p][name].dtype)), name


# --- corrupt and mismatched state dicts: refused, nothing changed -----------------------------------------------

def trained(base=SGD_M, steps=3, seed=1, backend="reference", **sam):
    model, opt = make(backend, base, **sam)
    train(model, opt, steps, seed)
    return model, opt


_DONORS = {}


def donor(base=SGD_M):
    """A state dict from another run (other values, other step counts): a partial load would show."""
    key = base[0]
    if key not in _DONORS:
        _DONORS[key] = trained(base, steps=2, seed=9)[1].state_dict()
    return copy.deepcopy(_DONORS[key])


def corrupt_shape(sd):
    sd["state"][5]["momentum_buffer"] = torch.zeros(4)


def corrupt_not_a_tensor(sd):
    sd["state"][5]["momentum_buffer"] = [0.0, 1.0, 2.0]


def missing_momentum(sd):
    del sd["state"][5]["momentum_buffer"]


def missing_state_entry_key(sd):
    del sd["state"]


def missing_groups(sd):
    del sd["param_groups"]


def group_without_params(sd):
    del sd["param_groups"][0]["params"]


def one_parameter_too_many(sd):
    sd["param_groups"][0]["params"].append(6)
    sd["state"][6] = copy.deepcopy(sd["state"][5])


def one_parameter_too_few(sd):
    sd["param_groups"][0]["params"].pop()


def unlisted_parameter_index(sd):
    sd["param_groups"][0]["params"][5] = 17


def duplicate_parameter_index(sd):
    sd["param_groups"][0]["params"][5] = 4


def integer_dtype(sd):
    sd["state"][5]["momentum_buffer"] = sd["state"][5]["momentum_buffer"].to(torch.int32)


def complex_dtype(sd):
    sd["state"][5]["momentum_buffer"] = sd["state"][5]["momentum_buffer"].to(torch.complex64)


def nan_in_state(sd):
    sd["state"][5]["momentum_buffer"][1] = float("nan")


def inf_in_state(sd):
    sd["state"][3]["momentum_buffer"][0] = float("inf")


def bad_step(sd):
    sd["state"][5]["step"] = torch.tensor(-1.0)


def nan_step(sd):
    sd["state"][5]["step"] = torch.tensor(float("nan"))


def step_not_a_number(sd):
    sd["state"][5]["step"] = "three"


def newer_format(sd):
    sd["sam"]["format"] = 99


def negative_rho(sd):
    sd["param_groups"][0]["rho"] = -0.5


def master_weights_into_plain(sd):
    for i, s in sd["state"].items():
        s["sam_master_weight"] = s["momentum_buffer"].clone()


def adam_state_into_sgd(sd):
    sd.clear()
    sd.update(donor(ADAMW))


def rmsprop_state_into_sgd(sd):
    model = mlp()
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5)
    loss_of(model, *next(batches(model, 1))).backward()
    rms.step()
    sd.clear()
    sd.update(copy.deepcopy(rms.state_dict()))


CORRUPTIONS = {
    corrupt_shape: (ValueError, r"momentum_buffer.*parameter 5.*shape \(4,\), the parameter \(3,\)"),
    corrupt_not_a_tensor: (ValueError, r"momentum_buffer.*parameter 5.*not a tensor|momentum_buffer.*parameter 5"),
    missing_momentum: (ValueError, r"parameter 5.*lacks 'momentum_buffer'"),
    missing_state_entry_key: (ValueError, "needs 'state' and 'param_groups'"),
    missing_groups: (ValueError, "needs 'state' and 'param_groups'"),
    group_without_params: (ValueError, r"param group 0.*'params'"),
    one_parameter_too_many: (ValueError, "param group 0 has 6 parameters, the state dict 7"),
    one_parameter_too_few: (ValueError, "param group 0 has 6 parameters, the state dict 5"),
    unlisted_parameter_index: (ValueError, r"state for parameter 5.*no param group lists|parameter index"),
    duplicate_parameter_index: (ValueError, "more than once"),
    integer_dtype: (ValueError, r"momentum_buffer.*parameter 5.*torch.int32"),
    complex_dtype: (ValueError, r"momentum_buffer.*parameter 5.*torch.complex64"),
    nan_in_state: (ValueError, r"non-finite.*momentum_buffer.*parameter 5"),
    inf_in_state: (ValueError, r"non-finite.*momentum_buffer.*parameter 3"),
    bad_step: (ValueError, r"step.*parameter 5.*-1"),
    nan_step: (ValueError, r"step.*parameter 5.*nan"),
    step_not_a_number: (ValueError, r"step.*parameter 5.*'three'"),
    newer_format: (ValueError, "format 99.*newer"),
    negative_rho: (ValueError, r"rho must be a non-negative.*param group 0"),
    master_weights_into_plain: (ValueError, r"master weights.*master_weights=True"),
    adam_state_into_sgd: (ValueError, r"'exp_avg'.*SGD.*another optimizer"),
    rmsprop_state_into_sgd: (ValueError, r"'square_avg'.*SGD.*another optimizer"),
}


def snapshot(model, opt):
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": copy.deepcopy(opt.state_dict()),
            "groups": copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
            "views": [opt.state[p]["momentum_buffer"].data_ptr() for p in model.parameters()]
            if "momentum_buffer" in opt.state[next(model.parameters())] else None}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS), ids=lambda f: f.__name__)
def test_corrupt_state_dict_is_refused_and_changes_nothing(corruption):
    model, opt = trained()
    before = snapshot(model, opt)
    sd = donor()
    corruption(sd)
    error, match = CORRUPTIONS[corruption]
    with pytest.raises(error, match=match):
        opt.load_state_dict(sd)
    assert_bitwise_equal(before, snapshot(model, opt))
    # and the optimizer still works, continuing as an untouched twin does
    twin_model, twin = trained()
    train(model, opt, 1, seed=4)
    train(twin_model, twin, 1, seed=4)
    assert_bitwise_equal(twin.state_dict(), opt.state_dict())


def test_the_uncorrupted_donor_loads_and_changes_the_state():
    """The control for the test above: the same donor, uncorrupted, loads and does change the state (so
    "nothing changed" there means the refusal came before anything was applied)."""
    model, opt = trained()
    before = snapshot(model, opt)
    opt.load_state_dict(donor())
    with pytest.raises(AssertionError):
        assert_bitwise_equal(before, snapshot(model, opt))
    assert_bitwise_equal(opt.state_dict(), donor())


ADAM_CORRUPTIONS = {
    "missing exp_avg_sq": (lambda sd: sd["state"][4].pop("exp_avg_sq"), r"parameter 4.*lacks 'exp_avg_sq'"),
    "missing step": (lambda sd: sd["state"][4].pop("step"), r"parameter 4.*lacks 'step'"),
    "amsgrad without its maximum": (lambda sd: sd["state"][2].pop("max_exp_avg_sq"),
                                    r"parameter 2.*lacks 'max_exp_avg_sq'"),
    "sgd state into adam": (lambda sd: (sd.clear(), sd.update(donor(SGD_M))), r"'momentum_buffer'.*AdamW.*another"),
    "wrong shape, last parameter": (lambda sd: sd["state"][5].update(exp_avg=torch.zeros(3, 1)), r"shape \(3, 1\)"),
}


@pytest.mark.parametrize("case", list(ADAM_CORRUPTIONS))
def test_corrupt_adam_state_dict_is_refused_and_changes_nothing(case):
    model, opt = trained(ADAMW)
    before = snapshot(model, opt)
    sd = donor(ADAMW)
    corruption, match = ADAM_CORRUPTIONS[case]
    corruption(sd)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_bitwise_equal(before, snapshot(model, opt))


def test_master_weights_of_the_wrong_shape_are_refused_before_anything_changes():
    model = mlp().to(torch.bfloat16)
    opt = FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, master_weights=True, backend="reference")
    train(model, opt, 2, seed=1)
    before = snapshot(model, opt)
    other = mlp(seed=2).to(torch.bfloat16)
    other_opt = FusedSAM(other.parameters(), torch.optim.AdamW, lr=1e-3, master_weights=True, backend="reference")
    train(other, other_opt, 3, seed=2)
    sd = copy.deepcopy(other_opt.state_dict())
    sd["state"][5]["sam_master_weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"'sam_master_weight' of parameter 5.*shape \(2,\)"):
        opt.load_state_dict(sd)
    assert_bitwise_equal(before, snapshot(model, opt))


def test_master_weights_into_an_unfused_base_are_refused_before_anything_changes():
    """A base optimizer FusedSAM does not fuse (RMSprop) loads its state itself: the SAM-specific checks
    must still come first."""
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.RMSprop, lr=1e-3, momentum=0.5, backend="reference")
    train(model, opt, 2, seed=1)
    before = snapshot(model, opt)
    before["base"] = copy.deepcopy(opt.base_optimizer.state_dict())
    other = mlp(seed=2).to(torch.bfloat16)
    other_opt = FusedSAM(other.parameters(), torch.optim.RMSprop, lr=1e-3, momentum=0.5, master_weights=True,
                         backend="reference")
    train(other, other_opt, 3, seed=2)
    with pytest.raises(ValueError, match="master_weights=True"):
        opt.load_state_dict(copy.deepcopy(other_opt.state_dict()))
    after = snapshot(model, opt)
    after["base"] = opt.base_optimizer.state_dict()
    assert_bitwise_equal(before, after)


def test_malformed_variant_state_is_refused_before_anything_changes():
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, variant=Randomly(0.5, seed=1),
                   backend="reference")
    sam_train(model, opt, 3, closure_api=True)
    before = snapshot(model, opt)
    other = mlp(seed=2)
    other_opt = FusedSAM(other.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, variant=Randomly(0.5, seed=2),
                         backend="reference")
    sam_train(other, other_opt, 4, closure_api=True)
    sd = copy.deepcopy(other_opt.state_dict())
    sd["sam"]["variant"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises((ValueError, RuntimeError), match="variant|generator|RNG"):
        opt.load_state_dict(sd)
    assert_bitwise_equal(before, snapshot(model, opt))
    assert_bitwise_equal(before["opt"]["sam"]["variant"], opt.variant.state_dict() | {"name": "randomly"})


def test_looksam_state_loads_into_plain_sam_without_its_buffer():
    """Switching a run from LookSAM to plain SAM: LookSAM's g_v is SAM's own per-parameter state, not the
    base optimizer's; a plain FusedSAM drops it instead of keeping a dead buffer."""
    model = mlp()
    opt = FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, variant=LookSAM(2),
                   backend="reference")
    sam_train(model, opt, 3, closure_api=True)
    assert "sam_looksam_gv" in opt.state_dict()["state"][0]
    plain_model = copy.deepcopy(model)
    plain = FusedSAM(plain_model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend="reference")
    plain.load_state_dict(opt.state_dict())
    assert all(set(s) == {"momentum_buffer", "step"} for s in plain.state_dict()["state"].values())


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_variant_schedule_survives_torch_distributed_checkpoint_state_dicts(flatten):
    """Single process: the same helpers FSDP2 checkpoints go through. A Randomly run resumed through them
    must draw the same SAM/plain sequence as the uninterrupted run."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def make_run():
        model = mlp()
        return model, FusedSAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9,
                               variant=Randomly(0.5, seed=1), backend="reference")

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    model, opt = make_run()
    sam_train(model, opt, 5, closure_api=True)
    opt._sam.skipped.fill_(2)  # counters come through too
    sd = get_optimizer_state_dict(model, opt, options=options)
    assert "sam" not in sd  # what these helpers drop: format 4 keeps SAM's progress in the param groups
    resumed, resumed_opt = make_run()
    resumed.load_state_dict(model.state_dict())
    set_optimizer_state_dict(resumed, resumed_opt, sd, options=options)
    assert resumed_opt.state_dict()["sam"]["completed_steps"] == 5 and resumed_opt.skipped_steps == 2
    assert all(g[PROGRESS_KEY] is None for g in resumed_opt.param_groups)  # live groups hold only the key
    assert [opt.variant.sam_due(k) for k in range(20)] == [resumed_opt.variant.sam_due(k) for k in range(20)]


def test_flattened_checkpoint_without_master_weights_is_refused():
    """flatten_optimizer_state_dict=True loads only the per-parameter keys opt.state[p] shows: the float32
    master weights do not arrive. Loading on would re-derive them from the bf16 weights, silently; the
    state dict says what it saved, so this is refused, and the nested layout carries them bit for bit."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def make_run():
        model = mlp(torch.bfloat16)
        return model, FusedSAM(model.parameters(), torch.optim.AdamW, lr=1e-3, master_weights=True,
                               backend="reference")

    model, opt = make_run()
    sam_train(model, opt, 3, dtype=torch.bfloat16, closure_api=True)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    resumed, resumed_opt = make_run()
    resumed.load_state_dict(model.state_dict())
    before = copy.deepcopy(resumed_opt.state_dict())
    with pytest.raises(ValueError, match=r"lost them .*flatten_optimizer_state_dict=True"):
        set_optimizer_state_dict(resumed, resumed_opt, get_optimizer_state_dict(model, opt, options=flat),
                                 options=flat)
    assert_bitwise_equal(before["state"], resumed_opt.state_dict()["state"], "state after the refusal")
    set_optimizer_state_dict(resumed, resumed_opt, get_optimizer_state_dict(model, opt))
    assert_bitwise_equal(opt.state_dict()["state"], resumed_opt.state_dict()["state"])


def test_a_format_1_state_dict_is_refused_and_loads_upgraded():
    """Format 1 (an unreleased preview) saved SAM's epsilon as 'eps' and had no per-group progress: refused
    with the converter named, before anything changes; upgraded, it resumes as the run it came from."""
    def build(perturb_eps):
        model = mlp()
        return model, FusedSAM(model.parameters(), torch.optim.SGD, rho=0.05, perturb_eps=perturb_eps, lr=0.1,
                               momentum=0.9)

    model, opt = build(1e-9)
    sam_train(model, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    sam = {k: v for k, v in saved["sam"].items() if k not in ("format", "entries", "perturb_eps")}
    old = {"state": saved["state"], "sam": dict(sam, eps=saved["sam"]["perturb_eps"]),
           "param_groups": [{k: v for k, v in g.items() if k != PROGRESS_KEY} for g in saved["param_groups"]]}
    _, fresh = build(1e-12)
    fresh.param_groups[0]["lr"] = 0.5  # a setting the load must overwrite
    with pytest.raises(ValueError, match=r"format 1, written by an earlier fused_sam.*upgrade_state_dict"):
        fresh.load_state_dict(old)
    assert fresh.param_groups[0]["lr"] == 0.5 and fresh._sam.completed_steps == 0 and fresh.perturb_eps == 1e-12
    fresh.load_state_dict(upgrade_state_dict(old))
    assert fresh.perturb_eps == 1e-9 and fresh._sam.completed_steps == 3
    resumed = fresh.state_dict()
    assert resumed["param_groups"] == saved["param_groups"]
    assert all(torch.equal(v, resumed["state"][i][k]) for i, s in saved["state"].items() for k, v in s.items())
