"""Running statistics frozen for SAM's second pass: checked against the buffers after the first pass alone,
against normalization by hand with batch statistics, and against the classic momentum=0 helpers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fused_sam import FusedSAM
from fused_sam.running_stats import disable_running_stats, enable_running_stats, running_stats_frozen


class Net(nn.Module):
    """Every kind of tracking norm layer: EMA and cumulative BatchNorm2d, SyncBatchNorm (plain BatchNorm in
    one process), InstanceNorm2d with running stats, BatchNorm1d."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.sbn = nn.SyncBatchNorm(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.fc1 = nn.Linear(32, 16)
        self.bn3 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.inorm(self.sbn(self.bn2(self.conv2(x)))))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(F.relu(self.bn3(self.fc1(x))))


def norm_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def data(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@torch.no_grad()
def perturb(model, scale=0.1, seed=5):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))


def normalized_by_hand(m, x):
    """The layer's output with the statistics of this batch (of each instance for InstanceNorm)."""
    dims = [0] + list(range(2, x.dim())) if isinstance(m, nn.modules.batchnorm._BatchNorm) else list(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + m.eps) * m.weight.view(shape) + m.bias.view(shape)


def classic_disable(model):
    """The classic helper, as commonly copied: momentum 0 for the second pass."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.backup_momentum = m.momentum
            m.momentum = 0


def classic_enable(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and hasattr(m, "backup_momentum"):
            m.momentum = m.backup_momentum


def test_frozen_pass_uses_batch_statistics_and_leaves_running_stats():
    net = Net().train()
    (x1, _), (x2, _) = data(1), data(2)
    net(x1)
    after_first = buffers(net)
    perturb(net)
    ordinary = copy.deepcopy(net)  # an ordinary training forward normalizes with batch statistics
    with_running_stats = copy.deepcopy(net).eval()

    seen = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in norm_layers(net).items()]
    with torch.no_grad(), running_stats_frozen(net):
        out = net(x2)
    for h in hooks:
        h.remove()

    assert_same(buffers(net), after_first)
    assert torch.equal(out, ordinary(x2))
    assert not torch.allclose(out, with_running_stats(x2), atol=1e-3)
    assert seen.keys() == norm_layers(net).keys()
    for name, (inp, got) in seen.items():
        torch.testing.assert_close(got, normalized_by_hand(norm_layers(net)[name], inp), msg=name)

    net(x2)  # tracking is back: the next forward updates the stats (InstanceNorm never counts batches)
    for name, m in norm_layers(net).items():
        assert not torch.equal(m.running_mean, after_first[f"{name}.running_mean"]), name
        assert m.num_batches_tracked.item() == (0 if isinstance(m, nn.InstanceNorm2d) else 2), name


def test_nonfinite_second_pass_leaves_running_stats_finite():
    net = Net().train()
    net(data(1)[0])
    x_nan = data(2)[0]
    x_nan[0, 0, 0, 0] = float("nan")
    classic = copy.deepcopy(net)
    after_first = buffers(net)

    with torch.no_grad(), running_stats_frozen(net):
        assert torch.isnan(net(x_nan)).any()
    assert_same(buffers(net), after_first)
    assert all(torch.isfinite(b).all() for b in buffers(net).values())

    # The momentum=0 trick: the NaN lands in the running stats, and the pass is counted.
    with torch.no_grad():
        classic_disable(classic)
        classic(x_nan)
        classic_enable(classic)
    assert torch.isnan(classic.bn1.running_mean).any()
    assert classic.bn1.num_batches_tracked.item() == 2


def test_classic_trick_moves_cumulative_average():
    """momentum=None (cumulative average) is not frozen by momentum=0; it is by running_stats_frozen."""
    net = Net().train()
    net(data(1)[0])
    classic = copy.deepcopy(net)
    with torch.no_grad():
        classic_disable(classic)
        classic(data(2)[0])
        classic_enable(classic)
        with running_stats_frozen(net):
            net(data(2)[0])
        net(data(3)[0])
        classic(data(3)[0])
    assert net.bn2.num_batches_tracked.item() == 2 and classic.bn2.num_batches_tracked.item() == 3
    assert not torch.allclose(net.bn2.running_mean, classic.bn2.running_mean)


def test_untracked_layers_stay_untracked():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.BatchNorm2d(4), nn.InstanceNorm2d(4), nn.BatchNorm2d(4))
    model[4].track_running_stats = False  # switched off after construction: keeps (and in eval uses) buffers
    kept = model[4].running_mean
    x = data(1)[0]
    disable_running_stats(model)
    assert [getattr(m, "track_running_stats", None) for m in model] == [None, False, False, False, False]
    model(x)
    enable_running_stats(model)
    assert [getattr(m, "track_running_stats", None) for m in model] == [None, False, True, False, False]
    assert model[1].running_mean is None and model[3].running_mean is None and model[4].running_mean is kept
    with running_stats_frozen(model):
        model(x)
    assert [getattr(m, "track_running_stats", None) for m in model] == [None, False, True, False, False]


def test_exception_in_block_restores():
    net = Net()
    net(data(1)[0])
    before = dict(net.named_buffers())
    with pytest.raises(RuntimeError, match="boom"):
        with running_stats_frozen(net):
            assert not any(m.track_running_stats for m in norm_layers(net).values())
            raise RuntimeError("boom")
    after = dict(net.named_buffers())
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    assert all(m.track_running_stats for m in norm_layers(net).values())


def test_repeated_and_nested_calls_are_harmless():
    net = Net().train()
    net(data(1)[0])
    first = buffers(net)
    tensors = dict(net.named_buffers())

    enable_running_stats(net)  # nothing to restore
    assert_same(buffers(net), first)

    disable_running_stats(net)
    disable_running_stats(net)  # already frozen: changes nothing
    net(data(2)[0])
    enable_running_stats(net)
    enable_running_stats(net)
    assert all(b is tensors[k] for k, b in net.named_buffers())
    assert_same(buffers(net), first)

    with running_stats_frozen(net):
        with running_stats_frozen(net):
            net(data(2)[0])
        net(data(3)[0])  # still frozen after the inner block
        assert not any(m.track_running_stats for m in norm_layers(net).values())
    assert_same(buffers(net), first)

    with running_stats_frozen(net):
        enable_running_stats(net)  # restored early; the block's exit then has nothing left to do
    assert all(b is tensors[k] for k, b in net.named_buffers())
    assert all(m.track_running_stats for m in norm_layers(net).values())


def test_eval_mode_unchanged_after_freeze():
    net = Net().train()
    for seed in (1, 2):
        net(data(seed)[0])
    x = data(3)[0]
    net.eval()
    before = net(x)
    net.train()
    with torch.no_grad():
        disable_running_stats(net)
        net(data(4)[0])
        enable_running_stats(net)
        with running_stats_frozen(net):
            net(data(5)[0])
    net.eval()
    assert torch.equal(net(x), before)


def test_lazy_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="not initialized"):
        disable_running_stats(model)
    assert model[1].track_running_stats and model[2].track_running_stats  # nothing changed
    model(data(1)[0])
    first = buffers(model)
    with running_stats_frozen(model):
        model(data(2)[0])
    assert_same(buffers(model), first)


def test_fused_sam_steps_update_running_stats_from_first_pass_only():
    """A few FusedSAM steps with the second pass frozen; the twin takes the same steps with an ordinary second
    pass and its buffers copied back by hand, and the statistics are also recomputed from the first passes'
    inputs with the update rules of BatchNorm and InstanceNorm."""
    steps = 3
    net, twin = Net(), Net()
    opt = FusedSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    twin_opt = FusedSAM(twin.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    layers = norm_layers(net)
    expected = {name: (m.running_mean.clone(), m.running_var.clone(), 0) for name, m in layers.items()}
    first_pass_inputs = {}

    def record(m, inp, name):
        first_pass_inputs.setdefault(name, inp[0].detach())  # returns None: the input is left as it is

    hooks = [m.register_forward_pre_hook(lambda m, inp, name=name: record(m, inp, name)) for name, m in layers.items()]

    for step in range(steps):
        x, y = data(10 + step)
        first_pass_inputs.clear()
        F.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            F.cross_entropy(net(x), y).backward()
        opt.second_step(zero_grad=True)

        F.cross_entropy(twin(x), y).backward()
        twin_opt.first_step(zero_grad=True)
        kept = buffers(twin)
        F.cross_entropy(twin(x), y).backward()
        with torch.no_grad():
            for name, b in twin.named_buffers():
                b.copy_(kept[name])
        twin_opt.second_step(zero_grad=True)

        for name, m in layers.items():
            inp = first_pass_inputs[name]
            mean, var, count = expected[name]
            if isinstance(m, nn.InstanceNorm2d):  # per instance, then averaged over the batch; no count
                batch_mean, batch_var = inp.mean((2, 3)).mean(0), inp.var((2, 3), unbiased=True).mean(0)
            else:
                dims = [0] + list(range(2, inp.dim()))
                batch_mean, batch_var = inp.mean(dims), inp.var(dims, unbiased=True)
                count += 1
            factor = 1.0 / count if m.momentum is None else m.momentum
            expected[name] = ((1 - factor) * mean + factor * batch_mean, (1 - factor) * var + factor * batch_var,
                              count)
    for h in hooks:
        h.remove()

    assert_same(dict(net.named_parameters()), dict(twin.named_parameters()))
    assert_same(buffers(net), buffers(twin))
    for name, m in layers.items():
        mean, var, count = expected[name]
        assert m.num_batches_tracked.item() == count == (0 if isinstance(m, nn.InstanceNorm2d) else steps)
        torch.testing.assert_close(m.running_mean, mean, msg=name)
        torch.testing.assert_close(m.running_var, var, msg=name)


def test_batchnorm_buffers_stay_registered_instancenorm_buffers_are_set_aside():
    """DistributedDataParallel (broadcast_buffers=True) collects the module's buffers before every forward:
    BatchNorm's must stay registered while frozen. InstanceNorm would update buffers it holds, so its are
    set aside. In eval mode a frozen BatchNorm reads its running statistics as an unfrozen one does."""
    net = Net().train()
    net(data(1)[0])
    reference_eval = copy.deepcopy(net).eval()
    registered = set(dict(net.named_buffers()))
    with running_stats_frozen(net):
        during = set(dict(net.named_buffers()))
        net.eval()
        frozen_eval_bn = net.bn3(net.fc1(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
        net.train()
    inorm = {n for n in registered if n.startswith("inorm.")}
    assert inorm and during == registered - inorm
    expected = reference_eval.bn3(reference_eval.fc1(torch.randn(4, 32, generator=torch.Generator().manual_seed(3))))
    assert torch.equal(frozen_eval_bn, expected)
    assert set(dict(net.named_buffers())) == registered
