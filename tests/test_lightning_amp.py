"""fused_sam.lightning.SAMMixedPrecision: paired SAM under Lightning's mixed precision (CPU, the real
lightning package).

Every run is compared with the GradScaler SAM loop written by hand here over the same model, batches and
seed (autocast, scaled backward, ``first_step(grad_scaler=)``, scaled backward, ``scaler.unscale_``,
``scaler.step``, ``scaler.update``; bf16: ``second_step``), step by step. The plugin runs the same tensor
operations in the same order (Lightning's loss / accumulate_grad_batches divides by 1, exactly), so the
runs are compared bitwise. Each run is also checked to be far from plain (rho = 0) training, so a plugin
that skipped the perturbation fails. test_amp.py holds FusedSAM's own GradScaler path to an independent
loop that unscales by hand.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning")

from fused_sam import FusedSAM, running_stats_frozen  # noqa: E402
from fused_sam.lightning import SAMMixedPrecision  # noqa: E402
from fused_sam.variants import Every  # noqa: E402

from models import conv_net, loss_of, mlp  # noqa: E402

RHO = 0.1
BASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
}
# The scale grows every 2 clean steps, so a run (and a resume) depends on the scaler's state.
SCALER = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
TRAINER = dict(
    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
    enable_model_summary=False, num_sanity_val_steps=0,
)
HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
FAR = 1e-4


def make_batches(net, n, seed=1, inf_at=()):
    """n batches of 8; batches in inf_at get an inf input, so both passes' gradients are non-finite."""
    gen = torch.Generator().manual_seed(seed)
    conv = isinstance(net[0], torch.nn.Conv2d)
    out = []
    for i in range(n):
        x = torch.randn((8, 3, 6, 6) if conv else (8, 10), generator=gen)
        if i in inf_at:
            x[0, 0] = math.inf
        out.append((x, torch.randint(0, 3, (8,), generator=gen)))
    return out


def snapshot(net):
    """Weights and buffers (BatchNorm running statistics) as one float64 vector."""
    return torch.cat([t.detach().reshape(-1).double() for t in net.state_dict().values()])


def make_sam(params, base, **kwargs):
    cls, base_kwargs = BASES[base]
    return FusedSAM(params, cls, rho=kwargs.pop("rho", RHO), **base_kwargs, **kwargs)


def plugin(precision="16-mixed", **scaler):
    if precision == "bf16-mixed":
        return SAMMixedPrecision("bf16-mixed", "cpu")
    return SAMMixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", **{**SCALER, **scaler}))


def hand_loop(net, base, batches, precision="16-mixed", clip=None, skip_at=(), freeze_stats=False, rho=RHO,
              scaler_kwargs=None, **sam_kwargs):
    """The reference. clip(params) runs on the unscaled gradient at w + e; the steps in skip_at are not
    taken. Returns the weights and the scale after each step, and the optimizer."""
    model = copy.deepcopy(net)
    opt = make_sam(model.parameters(), base, rho=rho, **sam_kwargs)
    scaler = torch.amp.GradScaler("cpu", **{**SCALER, **(scaler_kwargs or {})}) if precision == "16-mixed" else None
    trajectory, scales = [], []

    def backward(x, y):
        with torch.autocast("cpu", dtype=HALF[precision], cache_enabled=False):
            loss = loss_of(model, x, y)
        (loss if scaler is None else scaler.scale(loss)).backward()

    for i, (x, y) in enumerate(batches):
        if i not in skip_at:
            opt.zero_grad()
            backward(x, y)
            if opt.sam_step_due:  # else a variant's plain step: the one gradient, at w
                opt.first_step(zero_grad=True, grad_scaler=scaler)
                with running_stats_frozen(model) if freeze_stats else contextlib.nullcontext():
                    backward(x, y)
            if scaler is None:
                if clip:
                    clip(model.parameters())
                opt.step()
            else:
                scaler.unscale_(opt)
                if clip:
                    clip(model.parameters())
                scaler.step(opt)
                scaler.update()
        trajectory.append(snapshot(model))
        scales.append(None if scaler is None else scaler.get_scale())
    return trajectory, scales, opt


def module_class(lightning_module):
    """The test module, on ``lightning_module`` (lightning's or pytorch_lightning's LightningModule)."""

    class Module(lightning_module):
        """``net`` trained by FusedSAM; records the weights and the scale after each batch and counts calls.
        skip_at: {batch: "w" or "w+e"}, the pass whose training_step returns None. freeze_stats: the pass at
        w + e runs inside running_stats_frozen (the README's recipe)."""

        def __init__(self, net, base, skip_at=None, freeze_stats=False, manual=None, **sam_kwargs):
            super().__init__()
            self.net, self.base, self.sam_kwargs = net, base, sam_kwargs
            self.skip_at, self.freeze_stats, self.manual = skip_at or {}, freeze_stats, manual
            self.automatic_optimization = manual is None
            self.training_steps = self.before_optimizer_steps = 0
            self.trajectory, self.scales = [], []

        def training_step(self, batch, batch_idx):
            if self.manual is not None:
                return self.manual_step(*batch)
            self.training_steps += 1
            at_perturbed = self.optimizers().optimizer.perturbed
            if self.skip_at.get(batch_idx) == ("w+e" if at_perturbed else "w"):
                return None
            with running_stats_frozen(self.net) if self.freeze_stats and at_perturbed else contextlib.nullcontext():
                return loss_of(self.net, *batch)

        def manual_step(self, x, y):
            opt = self.optimizers()
            if self.manual == "closure":
                def closure():
                    self.training_steps += 1
                    opt.zero_grad()
                    loss = loss_of(self.net, x, y)
                    self.manual_backward(loss)
                    return loss
                opt.step(closure=closure)
            elif self.manual == "first-step-by-hand":
                opt.zero_grad()
                self.manual_backward(loss_of(self.net, x, y))
                opt.optimizer.first_step(zero_grad=True, grad_scaler=self.trainer.precision_plugin.scaler)
                self.manual_backward(loss_of(self.net, x, y))
                opt.step()
            else:  # "no-closure": a backward, then opt.step() without first_step
                opt.zero_grad()
                self.manual_backward(loss_of(self.net, x, y))
                opt.step()

        def on_before_optimizer_step(self, optimizer):
            self.before_optimizer_steps += 1

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.trajectory.append(snapshot(self.net))
            scaler = self.trainer.precision_plugin.scaler
            self.scales.append(None if scaler is None else scaler.get_scale())

        def configure_optimizers(self):
            return make_sam(self.net.parameters(), self.base, **self.sam_kwargs)

    return Module


Module = module_class(L.LightningModule)

def fit(module, batches, precision_plugin, ckpt_path=None, trainer_class=L.Trainer, **trainer_kwargs):
    trainer = trainer_class(**TRAINER, plugins=[precision_plugin], **{"max_epochs": 1, **trainer_kwargs})
    loader = DataLoader(batches, batch_size=None, shuffle=False)  # the batches as they are
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def assert_same_run(module, reference):
    trajectory, scales, _ = reference
    assert module.scales == scales
    assert len(module.trajectory) == len(trajectory)
    for step, (got, want) in enumerate(zip(module.trajectory, trajectory)):
        assert torch.equal(got, want), f"step {step}: max diff {(got - want).abs().max().item():.3g}"


def dist(a, b):
    return (a - b).abs().max().item()


# --- paired SAM, step by step -----------------------------------------------------------------------

@pytest.mark.parametrize("precision, base", [("16-mixed", "sgd-momentum"), ("16-mixed", "adamw"),
                                             ("bf16-mixed", "adamw")])
def test_plugin_is_the_hand_written_grad_scaler_sam_loop(precision, base):
    """Automatic optimization: two training_steps per step, on_before_optimizer_step once; the weights and
    the scale after every step equal the hand loop's (the scale grows twice in 6 steps); far from rho=0."""
    net = mlp()
    batches = make_batches(net, 6)
    module = Module(copy.deepcopy(net), base)
    trainer = fit(module, batches, plugin(precision))
    assert trainer.global_step == 6
    assert module.training_steps == 12 and module.before_optimizer_steps == 6
    reference = hand_loop(net, base, batches, precision)
    assert_same_run(module, reference)
    if precision == "16-mixed":
        assert module.scales[-1] == SCALER["init_scale"] * 8
    plain, _, _ = hand_loop(net, base, batches, precision, rho=0.0)
    assert dist(module.trajectory[0], plain[0]) > FAR and dist(module.trajectory[-1], plain[-1]) > FAR
    steps = trainer.optimizers[0].state_dict()["state"][0]["step"]
    assert float(steps) == 6


@pytest.mark.parametrize("freeze_stats", [False, True], ids=["both-passes", "frozen-at-w+e"])
def test_batchnorm_running_statistics(freeze_stats):
    """BatchNorm's running statistics are updated by both passes, as in full precision under Lightning;
    the README's recipe (running_stats_frozen in training_step while opt.perturbed) keeps the pass at w + e
    out of them. Equal to the hand loop that does the same, buffers included."""
    net = conv_net()
    batches = make_batches(net, 4)
    module = Module(copy.deepcopy(net), "sgd-momentum", freeze_stats=freeze_stats)
    fit(module, batches, plugin())
    assert_same_run(module, hand_loop(net, "sgd-momentum", batches, freeze_stats=freeze_stats))
    other = hand_loop(net, "sgd-momentum", batches, freeze_stats=not freeze_stats)[0]
    assert dist(module.trajectory[-1], other[-1]) > FAR


# --- overflows and skipped steps --------------------------------------------------------------------

def test_overflow_skips_the_step_and_backs_off_the_scale():
    """A scale of 2**24 overflows fp16 gradients: GradScaler skips those steps (w restored exactly, the
    optimizer's step count unchanged) and halves the scale until the gradients fit; batch 7's inf input
    makes both passes non-finite (no perturbation, counted in nonfinite_steps; step skipped, backoff)."""
    net = mlp()
    batches = make_batches(net, 9, inf_at=(7,))
    module = Module(copy.deepcopy(net), "adamw")
    trainer = fit(module, batches, plugin(init_scale=2.0**24))
    reference = hand_loop(net, "adamw", batches, scaler_kwargs=dict(init_scale=2.0**24))
    assert_same_run(module, reference)
    skipped = [i for i, (a, b) in enumerate(zip(module.scales, [2.0**24] + module.scales)) if a < b]
    assert skipped[0] == 0 and skipped[-1] == 7 and len(skipped) >= 3
    start = snapshot(net)
    for i in skipped:
        assert torch.equal(module.trajectory[i], module.trajectory[i - 1] if i else start), i
    opt = trainer.optimizers[0]
    assert float(opt.state_dict()["state"][0]["step"]) == 9 - len(skipped)
    assert opt.nonfinite_steps == reference[2].nonfinite_steps >= 2  # the first step's and batch 7's


def test_training_step_returning_none_skips_the_step():
    """None at w: no second pass, nothing updated, the scale untouched; None at w + e: w restored exactly,
    not updated. The other steps are the hand loop's that leaves those two out."""
    net = mlp()
    batches = make_batches(net, 5)
    skip_at = {1: "w", 3: "w+e"}
    module = Module(copy.deepcopy(net), "sgd-momentum", skip_at=skip_at)
    trainer = fit(module, batches, plugin())
    assert module.training_steps == 2 * 5 - 1 and module.before_optimizer_steps == 3
    assert_same_run(module, hand_loop(net, "sgd-momentum", batches, skip_at=skip_at))
    assert torch.equal(module.trajectory[1], module.trajectory[0])
    assert torch.equal(module.trajectory[3], module.trajectory[2])
    assert not trainer.optimizers[0].perturbed
    assert float(trainer.optimizers[0].state_dict()["state"][0]["step"]) == 3


# --- gradient clipping ------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, value", [("norm", 0.05), ("value", 0.005)])
def test_gradient_clipping_clips_the_unscaled_gradient_at_w_plus_e(algorithm, value):
    """Lightning's clipping runs once, on the unscaled gradient at w + e (the one the update uses), not on
    the gradient at w (by value that would bend the perturbation: the run differs from both-clipped)."""
    net = mlp()
    batches = make_batches(net, 6)
    module = Module(copy.deepcopy(net), "sgd-momentum")
    fit(module, batches, plugin(), gradient_clip_val=value, gradient_clip_algorithm=algorithm)
    clip_fn = {"norm": torch.nn.utils.clip_grad_norm_, "value": torch.nn.utils.clip_grad_value_}[algorithm]
    clip = lambda params: clip_fn(params, value)  # noqa: E731
    assert_same_run(module, hand_loop(net, "sgd-momentum", batches, clip=clip))
    unclipped, _, _ = hand_loop(net, "sgd-momentum", batches)
    assert dist(module.trajectory[-1], unclipped[-1]) > FAR


# --- checkpoint and resume --------------------------------------------------------------------------

def test_checkpoint_resume_is_the_uninterrupted_run(tmp_path):
    """3 steps, save, a fresh model, plugin and Trainer resumed to 6 steps: bitwise the straight run, the
    scale included (it grew at step 2 and must come from the checkpoint), BatchNorm buffers included."""
    net = conv_net()
    batches = make_batches(net, 3)
    straight = Module(copy.deepcopy(net), "adamw")
    fit(straight, batches, plugin(), max_epochs=2)
    assert_same_run(straight, hand_loop(net, "adamw", batches * 2))

    first = Module(copy.deepcopy(net), "adamw")
    fit(first, batches, plugin()).save_checkpoint(tmp_path / "half.ckpt")
    assert first.scales[-1] == SCALER["init_scale"] * 2
    resumed = Module(conv_net(seed=7), "adamw")  # other weights: they must come from the checkpoint
    resumed_plugin = plugin()
    trainer = fit(resumed, batches, resumed_plugin, max_epochs=2, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 6
    assert resumed.scales == straight.scales[3:]
    for got, want in zip(resumed.trajectory, straight.trajectory[3:]):
        assert torch.equal(got, want)


# --- manual optimization, variants ------------------------------------------------------------------

@pytest.mark.parametrize("manual", ["closure", "first-step-by-hand"])
def test_manual_optimization(manual):
    """opt.step(closure=...) runs the closure at w and at w + e; after first_step by hand, opt.step()
    finishes the step. Both are the hand loop, one global_step per SAM step."""
    net = mlp()
    batches = make_batches(net, 4)
    module = Module(copy.deepcopy(net), "sgd-momentum", manual=manual)
    trainer = fit(module, batches, plugin())
    assert trainer.global_step == 4
    assert module.training_steps == (8 if manual == "closure" else 0)
    assert_same_run(module, hand_loop(net, "sgd-momentum", batches))


def test_variant_plain_steps_run_the_closure_once():
    """Every(2): SAM steps at 0, 2, 4 (two training_steps), plain steps at 1, 3, 5 (one); the hand loop
    takes the plain steps with scaler.step after the one backward."""
    net = mlp()
    batches = make_batches(net, 6)
    module = Module(copy.deepcopy(net), "sgd-momentum", variant=Every(2))
    fit(module, batches, plugin())
    assert module.training_steps == 9 and module.before_optimizer_steps == 6
    assert_same_run(module, hand_loop(net, "sgd-momentum", batches, variant=Every(2)))


# --- refusals ---------------------------------------------------------------------------------------

class PlainSGD(Module):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)


@pytest.mark.parametrize("case, error, match", [
    ("torch.optim.SGD", TypeError, "fused_sam.FusedSAM optimizer; got SGD"),
    ("alternate", ValueError, "paired mode"),
    ("accumulate", ValueError, "accumulate_grad_batches=2"),
    ("manual-no-closure", RuntimeError, "without a closure"),
])
def test_refused_with_a_clear_error_before_any_update(case, error, match):
    net = mlp()
    batches = make_batches(net, 2)
    kwargs = {}
    if case == "torch.optim.SGD":
        module = PlainSGD(copy.deepcopy(net), "sgd-momentum")
    elif case == "alternate":
        module = Module(copy.deepcopy(net), "sgd-momentum", mode="alternate")
    elif case == "accumulate":
        module, kwargs = Module(copy.deepcopy(net), "sgd-momentum"), dict(accumulate_grad_batches=2)
    else:
        module = Module(copy.deepcopy(net), "sgd-momentum", manual="no-closure")
    with pytest.raises(error, match=match):
        fit(module, batches, plugin(), **kwargs)
    assert torch.equal(snapshot(module.net), snapshot(net))


# --- packaging --------------------------------------------------------------------------------------

def test_lightning_is_imported_only_by_fused_sam_lightning():
    """import fused_sam leaves lightning alone; without lightning, fused_sam.lightning says what to install."""
    code = (
        "import sys; import fused_sam\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules), 'imported'\n"
        "sys.modules['lightning'] = None\n"
        "import fused_sam.lightning\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "ImportError: fused_sam.lightning needs the lightning package (>= 2.1): pip install lightning" in out.stderr


def test_pytorch_lightning_package():
    """fused_sam.pytorch_lightning: the same plugin on pytorch_lightning's classes (its Trainer refuses
    lightning's plugins), the same run."""
    pl = pytest.importorskip("pytorch_lightning")
    from fused_sam.pytorch_lightning import SAMMixedPrecision as PLSAMMixedPrecision

    assert issubclass(PLSAMMixedPrecision, pl.plugins.precision.MixedPrecision)
    net = mlp()
    batches = make_batches(net, 3)
    module = module_class(pl.LightningModule)(copy.deepcopy(net), "adamw")
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    fit(module, batches, PLSAMMixedPrecision("16-mixed", "cpu", scaler=scaler), trainer_class=pl.Trainer)
    assert module.training_steps == 6
    assert_same_run(module, hand_loop(net, "adamw", batches))
