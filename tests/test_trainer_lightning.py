"""FusedSAM under lightning.pytorch's Trainer (CPU, float64): automatic and manual optimization, checkpoint
resume, and a re-layout (channels_last) after the optimizer was built.

Every run is compared with an independent SAM loop written here (ClassicSAM, the per-tensor oracle) over
the same batches, to 1e-10; and checked to be far from what plain SGD (rho=0) or a perturbation with the
previous batch's gradient would give, so a FusedSAM that silently skipped or mis-timed its perturbation
fails.

What Lightning does with a SAM optimizer (lightning 2.6):
- fit() starts with ``model.zero_grad()`` (set_to_none): every ``.grad`` is None at step 0.
- automatic optimization calls ``optimizer.step(closure)`` before any backward; the closure runs
  training_step, ``optimizer.zero_grad()``, backward, then on_before_optimizer_step and gradient clipping.
  FusedSAM calls it twice per step (at w and at w + e), so training_step, the BatchNorm running-stat
  updates, on_before_optimizer_step and clipping all happen twice per step.
- the loss Lightning passes on (``outputs`` of on_train_batch_end, ``self.log(..., on_step=True)``) is the
  last closure's: the loss at w + e. A logged ``on_epoch`` mean averages both passes.
- ``trainer.global_step`` counts ``LightningOptimizer.step`` calls: one per ``step(closure)``.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402

from fused_sam import FusedSAM  # noqa: E402
from fused_sam.classic import ClassicSAM  # noqa: E402

from models import conv_net, loss_of, mlp  # noqa: E402

F64 = torch.float64
RHO = 0.1
TOL = dict(rtol=0, atol=1e-10)
FAR = 1e-4  # SAM vs plain SGD / stale perturbation: 1e6 times the tolerance
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
TRAINER = dict(
    accelerator="cpu", devices=1, precision="64-true", logger=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
)


def make_data(net, n_batches, seed=1):
    gen = torch.Generator().manual_seed(seed)
    shape = (8 * n_batches, 3, 6, 6) if isinstance(net[0], torch.nn.Conv2d) else (8 * n_batches, 10)
    return torch.randn(shape, generator=gen, dtype=F64), torch.randint(0, 3, (8 * n_batches,), generator=gen)


def batches_of(data):
    return list(zip(data[0].split(8), data[1].split(8)))


def snapshot(net):
    """Weights and buffers (BatchNorm running stats) as one float64 vector, in logical element order."""
    return torch.cat([t.detach().reshape(-1).to(F64) for t in net.state_dict().values()])


def to_channels_last_at(step):
    return lambda net, i: net.to(memory_format=torch.channels_last) if i == step else None


class SAMModule(L.LightningModule):
    """``net`` trained by ``FusedSAM(params, base, rho=RHO, **kwargs)``.

    manual: None (automatic optimization), "closure" (``opt.step(closure=...)``), "two-calls"
    (``opt.optimizer.first_step()`` / ``second_step()``) or "first-step-then-step"
    (``opt.optimizer.first_step()``, then Lightning's ``opt.step()``). before_batch(net, batch_idx) runs first in each step.
    """

    def __init__(self, net, base, manual=None, before_batch=None):
        super().__init__()
        self.net, self.base, self.manual, self.before_batch = net, base, manual, before_batch
        self.automatic_optimization = manual is None
        self.forwards = 0
        self.global_steps, self.trajectory = [], []

    def loss(self, x, y):
        self.forwards += 1
        return loss_of(self.net, x, y)

    def training_step(self, batch, batch_idx):
        if self.manual is None:
            return self.loss(*batch)
        opt = self.optimizers()
        self.global_steps.append(self.trainer.global_step)
        if self.manual == "closure":
            def closure():
                opt.zero_grad()
                loss = self.loss(*batch)
                self.manual_backward(loss)
                return loss
            return opt.step(closure=closure)
        sam = opt.optimizer
        sam.zero_grad()
        self.manual_backward(self.loss(*batch))
        sam.first_step(zero_grad=True)
        self.manual_backward(self.loss(*batch))
        if self.manual == "first-step-then-step":
            opt.step()  # Lightning passes its own do-nothing closure; FusedSAM completes the SAM step
        else:
            sam.second_step()

    def on_train_batch_start(self, batch, batch_idx):
        if self.before_batch is not None:
            self.before_batch(self.net, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trajectory.append(snapshot(self.net))

    def configure_optimizers(self):
        cls, kwargs = BASES[self.base]
        return FusedSAM(self.net.parameters(), cls, rho=RHO, **kwargs)


def fit(module, data, ckpt_path=None, **trainer_kwargs):
    trainer = L.Trainer(**TRAINER, **trainer_kwargs)
    trainer.fit(module, DataLoader(TensorDataset(*data), batch_size=8, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def oracle(net, base, batches, rho=RHO, stale=False, before_batch=None, clip=lambda params: None):
    """SAM by hand with ClassicSAM; rho=0 is plain base-optimizer training. stale=True perturbs with the
    gradient left over from the previous step (taken at the previous w + e, on the previous batch).
    clip(params) runs after each backward."""
    cls, kwargs = BASES[base]
    opt = ClassicSAM(net.parameters(), cls, rho=rho, **kwargs)
    if stale:
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
    trajectory = []
    for i, (x, y) in enumerate(batches):
        if before_batch is not None:
            before_batch(net, i)
        if stale:
            with torch.no_grad():
                net(x)  # the pass at w all the same: BatchNorm running stats as in SAM
        else:
            net.zero_grad()
            loss_of(net, x, y).backward()
            clip(net.parameters())
        opt.first_step(zero_grad=True)
        loss_of(net, x, y).backward()
        clip(net.parameters())
        opt.second_step()
        trajectory.append(snapshot(net))
    return trajectory, opt


def dist(a, b):
    return (a - b).abs().max().item()


def assert_true_sam(trajectory, net, base, batches, before_batch=None):
    """Step by step equal to the oracle; step 0 and the end far from plain and stale-gradient training."""
    sam, _ = oracle(copy.deepcopy(net), base, batches, before_batch=before_batch)
    plain, _ = oracle(copy.deepcopy(net), base, batches, rho=0.0, before_batch=before_batch)
    stale, _ = oracle(copy.deepcopy(net), base, batches, stale=True, before_batch=before_batch)
    assert len(trajectory) == len(sam)
    for step, (got, want) in enumerate(zip(trajectory, sam)):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"step {step}: {m}")
    assert dist(trajectory[0], plain[0]) > FAR  # step 0 is a SAM step (stale[0] is plain[0]: no gradient yet)
    assert dist(trajectory[-1], plain[-1]) > FAR
    assert dist(trajectory[-1], stale[-1]) > FAR


# --- 1. automatic optimization ----------------------------------------------------------------------

@pytest.mark.parametrize("base", list(BASES))
def test_automatic_optimization_is_true_sam_from_step_0(base):
    """configure_optimizers returns FusedSAM; Lightning calls step(closure) with no backward before it."""
    net = mlp(F64)
    data = make_data(net, 6)
    module = SAMModule(copy.deepcopy(net), base)
    trainer = fit(module, data, max_epochs=1)
    assert trainer.global_step == 6
    assert module.forwards == 12  # training_step runs at w and at w + e
    assert_true_sam(module.trajectory, net, base, batches_of(data))


@pytest.mark.parametrize("algorithm, value", [("norm", 0.05), ("value", 0.005)])
def test_gradient_clipping_clips_both_gradients(algorithm, value):
    """Lightning clips after every closure call: the gradient at w (which sets the perturbation) and the one
    at w + e (which the base optimizer uses). By norm, the first clip leaves the normalized perturbation as
    it was; by value it changes its direction."""
    net = mlp(F64)
    data = make_data(net, 6)
    module = SAMModule(copy.deepcopy(net), "sgd-momentum")
    fit(module, data, max_epochs=1, gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    clip = {"norm": torch.nn.utils.clip_grad_norm_, "value": torch.nn.utils.clip_grad_value_}[algorithm]
    want, _ = oracle(copy.deepcopy(net), "sgd-momentum", batches_of(data), clip=lambda params: clip(params, value))
    unclipped, _ = oracle(copy.deepcopy(net), "sgd-momentum", batches_of(data))
    torch.testing.assert_close(module.trajectory[-1], want[-1], **TOL)
    assert dist(module.trajectory[-1], unclipped[-1]) > FAR


# --- 2. manual optimization -------------------------------------------------------------------------

def test_manual_optimization_step_closure_is_true_sam_and_counts_steps():
    """opt.step(closure=...) with a torch.optim closure (zero_grad, forward, manual_backward): one
    global_step per SAM step."""
    net = mlp(F64)
    data = make_data(net, 6)
    module = SAMModule(copy.deepcopy(net), "sgd-momentum", manual="closure")
    trainer = fit(module, data, max_epochs=1)
    assert module.global_steps == [0, 1, 2, 3, 4, 5] and trainer.global_step == 6
    assert module.forwards == 12
    assert_true_sam(module.trajectory, net, "sgd-momentum", batches_of(data))


def test_manual_optimization_first_and_second_step_do_not_count_steps():
    """opt.optimizer.first_step() / second_step() bypass LightningOptimizer.step, which is what Lightning
    counts: trainer.global_step stays 0 (so max_steps never stops such a run; limit it by epochs or
    batches, and step-based schedulers and logging intervals do not advance)."""
    net = mlp(F64)
    data = make_data(net, 6)
    module = SAMModule(copy.deepcopy(net), "sgd-momentum", manual="two-calls")
    trainer = fit(module, data, max_epochs=1)
    assert module.global_steps == [0] * 6 and trainer.global_step == 0
    assert_true_sam(module.trajectory, net, "sgd-momentum", batches_of(data))


def test_manual_optimization_first_step_then_lightning_step_counts_steps():
    """first_step by hand, the second gradient by manual_backward, then opt.step(): Lightning counts it."""
    net = mlp(F64)
    data = make_data(net, 6)
    module = SAMModule(copy.deepcopy(net), "sgd-momentum", manual="first-step-then-step")
    trainer = fit(module, data, max_epochs=1)
    assert module.global_steps == [0, 1, 2, 3, 4, 5] and trainer.global_step == 6
    assert_true_sam(module.trajectory, net, "sgd-momentum", batches_of(data))


# --- 3. checkpoint and resume -----------------------------------------------------------------------

@pytest.mark.parametrize("base", list(BASES))
def test_checkpoint_resume_continues_bitwise(base, tmp_path):
    """3 steps, trainer.save_checkpoint, a fresh model and Trainer resumed to 6 steps: bitwise the straight
    run. An epoch is 3 batches: a mid-epoch checkpoint with a plain DataLoader restarts the epoch."""
    net = mlp(F64)
    data = make_data(net, 3)
    straight = SAMModule(copy.deepcopy(net), base)
    straight_trainer = fit(straight, data, max_epochs=2)
    assert straight_trainer.global_step == 6
    assert_true_sam(straight.trajectory, net, base, batches_of(data) * 2)

    first = SAMModule(copy.deepcopy(net), base)
    fit(first, data, max_epochs=1).save_checkpoint(tmp_path / "half.ckpt")
    resumed = SAMModule(mlp(F64, seed=7), base)  # other initial weights: they must come from the checkpoint
    resumed_trainer = fit(resumed, data, max_epochs=2, ckpt_path=tmp_path / "half.ckpt")
    assert resumed_trainer.global_step == 6
    assert len(resumed.trajectory) == 3
    for got, want in zip(resumed.trajectory, straight.trajectory[3:]):
        assert torch.equal(got, want)
    want, got = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert want["param_groups"] == got["param_groups"]
    assert want["state"].keys() == got["state"].keys()
    for i, entry in want["state"].items():
        assert entry.keys() == got["state"][i].keys()
        for name, value in entry.items():
            assert torch.equal(got["state"][i][name], value), (i, name)


# --- 4. a re-layout after the optimizer was built ---------------------------------------------------

@pytest.mark.parametrize("convert_at", [0, 3], ids=["before-step-0", "after-step-3"])
def test_channels_last_after_construction_checkpoint_and_oracle(convert_at, tmp_path):
    """The model moves to channels_last after FusedSAM flattened it (FusedSAM re-lays out its buffers at
    the next first_step). trainer.save_checkpoint must save the live state, and training must go on as
    the oracle's. after-step-3 moves the model while .grad holds the last step's gradient at w + e."""
    net = conv_net(F64)
    data = make_data(net, 6)
    before_batch = to_channels_last_at(convert_at)
    module = SAMModule(copy.deepcopy(net), "sgd-momentum", before_batch=before_batch)
    trainer = fit(module, data, max_epochs=1)
    assert module.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["optimizer_states"][0]
    live = trainer.optimizers[0].state_dict()
    assert saved["state"].keys() == live["state"].keys() == set(range(len(list(net.parameters()))))
    for i, entry in live["state"].items():
        assert entry["step"].item() == 6
        assert torch.equal(saved["state"][i]["step"], entry["step"])
        assert torch.equal(saved["state"][i]["momentum_buffer"], entry["momentum_buffer"]), i

    _, classic = oracle(copy.deepcopy(net), "sgd-momentum", batches_of(data), before_batch=before_batch)
    classic_params = [p for g in classic.param_groups for p in g["params"]]
    for i, p in enumerate(classic_params):
        want = classic.base_optimizer.state[p]["momentum_buffer"]
        torch.testing.assert_close(saved["state"][i]["momentum_buffer"], want, **TOL, msg=lambda m: f"{i}: {m}")
    assert_true_sam(module.trajectory, net, "sgd-momentum", batches_of(data), before_batch)


def dict_copying_1x(optimizer):
    """pytorch_lightning 1.x's LightningOptimizer (and older Lite/Fabric wrappers): a copy of __dict__."""
    class Wrapper:
        def __init__(self, opt):
            self.__dict__ = {k: v for k, v in opt.__dict__.items() if k not in ("step", "__del__")}
            self.__class__ = type("Lightning" + type(opt).__name__, (type(self), type(opt)), {})
            self._optimizer = opt
    return Wrapper(optimizer)


@pytest.mark.parametrize("wrap", [LightningOptimizer, dict_copying_1x], ids=["lightning-2.x", "dict-copy-1.x"])
def test_lightning_optimizer_wrapper_shares_relayout_and_state(wrap):
    """lightning 2.x's LightningOptimizer subclasses the optimizer's class and forwards attribute reads
    (__getattr__), so FusedSAM's methods run with self = the wrapper and its writes land in the wrapper;
    1.x copied __dict__. Either way a re-layout made through one must be what the other steps and saves."""
    model = conv_net(F64)
    twin = copy.deepcopy(model)
    cls, kwargs = BASES["sgd-momentum"]
    opt = FusedSAM(model.parameters(), cls, rho=RHO, **kwargs)
    wrapper = wrap(opt)
    assert isinstance(wrapper, FusedSAM)
    classic = ClassicSAM(twin.parameters(), cls, rho=RHO, **kwargs)
    for step, (x, y) in enumerate(batches_of(make_data(model, 6))):
        if step == 3:
            model.to(memory_format=torch.channels_last)
            twin.to(memory_format=torch.channels_last)
        first, second = (wrapper, opt) if step % 2 else (opt, wrapper)  # the re-layout runs in wrapper
        for m, a, b in ((model, first, second), (twin, classic, classic)):
            a.zero_grad()  # FusedSAM's own, through the wrapper or not: it re-lays out after the move
            loss_of(m, x, y).backward()
            a.first_step(zero_grad=True)
            assert a is classic or (opt.perturbed and wrapper.perturbed)
            loss_of(m, x, y).backward()
            b.second_step()
    assert wrapper._sam is opt._sam and wrapper.state is opt.state and wrapper.param_groups is opt.param_groups
    for source in (opt, wrapper):
        state = source.state_dict()["state"]
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            assert torch.equal(state[i]["momentum_buffer"], opt.state[p]["momentum_buffer"])
            want = classic.base_optimizer.state[q]["momentum_buffer"]
            torch.testing.assert_close(state[i]["momentum_buffer"], want, **TOL)
            assert state[i]["step"].item() == 6
    torch.testing.assert_close(snapshot(model), snapshot(twin), **TOL)


# --- 6. logging telemetry, as the README shows it -----------------------------------------------------

class TelemetryAutomatic(L.LightningModule):
    """The README's automatic-optimization logging example, word for word (the net aside)."""

    def __init__(self):
        super().__init__()
        self.net = mlp(F64)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)          # runs at w, then at w + e

    def on_train_batch_end(self, outputs, batch, batch_idx):
        telemetry = self.optimizers().optimizer.telemetry(sync=False)
        if telemetry is not None:
            self.log_dict({f"sam/{key}": value for key, value in telemetry.items()})

    def configure_optimizers(self):
        return FusedSAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, telemetry=True)


class TelemetryManual(TelemetryAutomatic):
    """The README's manual-optimization logging example, word for word."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, (x, y) = self.optimizers(), batch
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            return loss
        loss = opt.step(closure=closure)            # the loss at w; loss_gap recorded
        telemetry = opt.optimizer.telemetry(sync=False)
        if telemetry is not None:
            self.log_dict({f"sam/{key}": value for key, value in telemetry.items()})
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        pass


class LoggedAgainstTelemetry(L.Callback):
    """Before each step and at the end of training: what was logged last against ``opt.telemetry()``."""

    def __init__(self):
        self.seen = []

    def compare(self, trainer):
        logged = {key: value for key, value in trainer.callback_metrics.items() if key.startswith("sam/")}
        self.seen.append((logged, trainer.optimizers[0].telemetry()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx > 0:
            self.compare(trainer)

    def on_train_end(self, trainer, pl_module):
        self.compare(trainer)


@pytest.mark.parametrize("module", [TelemetryAutomatic, TelemetryManual])
def test_readme_telemetry_logging_logs_what_telemetry_reads(module):
    checker = LoggedAgainstTelemetry()
    model = module()
    data = make_data(model.net, 4)
    fit(model, data, max_epochs=1, callbacks=[checker])
    assert len(checker.seen) == 4
    for step, (logged, record) in enumerate(checker.seen):
        assert record["step"] == step and record["loss_gap"] is not None  # step(closure) gave both losses
        assert set(logged) == {f"sam/{key}" for key in record}
        for key, value in record.items():
            assert logged[f"sam/{key}"].item() == pytest.approx(value, rel=1e-12), key
