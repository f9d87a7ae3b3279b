"""End-to-end training steps on two small real models, with random data of the right shapes.

- ``cnn``: a ResNet-style CNN (3 stages of residual blocks, BatchNorm) on CIFAR-shaped batches
  (3x32x32, 10 classes), trained with SGD-momentum.
- ``gpt``: a small GPT-style causal transformer (pre-LayerNorm blocks, tied embeddings) on random
  tokens, trained with AdamW.

For each model: ``plain`` (the base optimizer alone, fused=True where torch supports it; one forward and
backward per step), ``classic`` (ClassicSAM) and ``fused`` (FusedSAM, backend="auto"), both with two
forwards and backwards per step; with ``full`` (``fused-sam bench --full``) also the cheaper variants
``fused-every-5`` and ``fused-looksam-5`` (``fused_sam.variants``: SAM on one step in five) and
``fused-msam`` (momentum-SAM, one backward per step), timed over whole cycles of 5 steps and reported per
step, and on CUDA ``plain-graphed`` and ``fused-graphed``: the same whole
training step captured into one CUDA graph and replayed (FusedSAM with ``capturable=True``, lr and rho as
device tensors; the plain base optimizer with torch's own ``capturable=True`` where it has one), each
reported against the graphed plain step. Every method of a model is built and warmed up first (each on its
own copy of the model), then timed round-robin, a block of ``repeats`` samples per method per round in an
order that changes every round (measure.round_order), so load from other processes falls on all methods
alike. Reported: steps per second (the median over rounds of each round's median step time), the spread
(IQR / median over rounds) and each method's step time as a multiple of the plain step; SAM's ideal is just
over 2x (two forward/backward passes, plus the optimizer work), and below 1x is impossible for every
method that runs a second forward/backward on some steps (flagged).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..classic import ClassicSAM
from ..optimizer import FusedSAM
from .measure import NOISE_THRESHOLD, round_order, row_flags, summarize, sync, time_steps
from .methods import OPTIMIZERS, RHO, base_impl
from ..variants import Every, LookSAM, MomentumSAM

VARIANTS = {"fused-every-5": lambda: Every(5), "fused-looksam-5": lambda: LookSAM(5), "fused-msam": MomentumSAM}
CYCLE = 5  # steps per timed sample of a variant: one SAM step and four plain ones
GRAPHED = ("plain-graphed", "fused-graphed")  # CUDA only
# Methods with one forward and backward per step, like the plain step: not flagged when faster than it.
ONE_PASS = ("plain", "plain-graphed", "fused-msam")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNetCNN(nn.Module):
    """A ResNet-style CNN for 32x32 images: stem, stages of ``blocks`` residual blocks, pool, linear."""

    def __init__(self, width: int = 32, blocks: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(_Block(cin, cout, 2 if (i > 0 and b == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-LN blocks, final LN, tied output layer."""

    def __init__(self, vocab: int = 2048, ctx: int = 128, d: int = 256, layers: int = 4, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[_GPTBlock(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.ln(self.blocks(x)) @ self.tok.weight.t()


def _configs(device: torch.device, quick: bool) -> Dict[str, dict]:
    if quick:
        return {
            "cnn": dict(model=dict(width=8, blocks=1), batch=4, optimizer="sgd"),
            "gpt": dict(model=dict(vocab=128, ctx=16, d=32, layers=1, heads=2), batch=2, optimizer="adamw"),
        }
    if device.type == "cuda":
        return {
            "cnn": dict(model=dict(width=64, blocks=2), batch=256, optimizer="sgd"),
            "gpt": dict(model=dict(vocab=8192, ctx=256, d=512, layers=6, heads=8), batch=16, optimizer="adamw"),
        }
    return {
        "cnn": dict(model=dict(width=16, blocks=1), batch=32, optimizer="sgd"),
        "gpt": dict(model=dict(vocab=1024, ctx=64, d=128, layers=2, heads=4), batch=8, optimizer="adamw"),
    }


def _model_and_batch(kind: str, cfg: dict, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "cnn":
        model = ResNetCNN(**cfg["model"]).to(device)
        x = torch.randn(cfg["batch"], 3, 32, 32, generator=gen, device=device)
        y = torch.randint(0, 10, (cfg["batch"],), generator=gen, device=device)
        return model, lambda: F.cross_entropy(model(x), y)
    m = cfg["model"]
    model = TinyGPT(**m).to(device)
    idx = torch.randint(0, m["vocab"], (cfg["batch"], m["ctx"] + 1), generator=gen, device=device)
    return model, lambda: F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())


def _train_step(method: str, model: nn.Module, loss_fn, opt):
    if method == "plain":
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    if not getattr(opt, "sam_step_due", True):  # a FusedSAM variant's plain step (ClassicSAM: always SAM)
        opt.plain_step()
        return loss
    opt.first_step(zero_grad=True)
    closure()
    opt.second_step()
    return loss


def _graphed(step, device: torch.device, warmup: int):
    """``step`` captured into a CUDA graph after ``warmup`` eager calls on a side stream; its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 3)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _build(method: str, params, base_cls, kwargs, device):
    """(optimizer, info) for an end-to-end method."""
    if method.startswith("plain"):
        impl = base_impl(base_cls, device, params[0].dtype)
        extra = {impl: True}
        if method.endswith("graphed") and base_cls is not torch.optim.SGD:  # SGD has no capturable flag
            extra["capturable"] = True
        return base_cls(params, **kwargs, **extra), f"{base_cls.__name__}({', '.join(f'{k}=True' for k in extra)})"
    if method == "classic":
        return ClassicSAM(params, base_cls, rho=RHO, **kwargs), "ClassicSAM"
    if method.endswith("graphed"):
        on_device = dict(device=device, dtype=torch.float64)
        kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"], **on_device))
        opt = FusedSAM(params, base_cls, rho=torch.tensor(RHO, **on_device), capturable=True, **kwargs)
    elif method in VARIANTS:
        opt = FusedSAM(params, base_cls, rho=RHO, variant=VARIANTS[method](), **kwargs)
        return opt, f"FusedSAM variant={opt.variant!r} " + ", ".join(sorted(set(opt.backends.values())))
    else:
        opt = FusedSAM(params, base_cls, rho=RHO, **kwargs)
    return opt, "FusedSAM " + ", ".join(sorted(set(opt.backends.values())))


def methods_for(device: torch.device, full: bool = True) -> tuple:
    """The end-to-end methods: plain, classic and fused; ``full`` adds the variants and, on CUDA, the graphed
    steps."""
    if not full:
        return ("plain", "classic", "fused")
    return ("plain", "classic", "fused", *VARIANTS) + (GRAPHED if device.type == "cuda" else ())


@dataclass
class Trainer:
    """One end-to-end method on its own model, warmed up. ``step()`` takes one training step (graphed: one
    replay); a timed sample is ``cycle`` steps, so a variant's sample holds its SAM step and its plain ones."""
    step: Callable[[], object]
    cycle: int
    params: int
    info: str
    loss: Callable[[], float]  # takes one more (eager) training step and returns its loss
    round_times: List[float] = field(default_factory=list)  # seconds per training step, median of each round

    def sample(self) -> None:
        for _ in range(self.cycle):
            self.step()


def prepare(kind: str, method: str, device: torch.device, quick: bool, warmup: int) -> Trainer:
    """``method`` on a fresh ``kind`` model, after ``warmup`` samples."""
    cfg = _configs(device, quick)[kind]
    base_cls, kwargs = OPTIMIZERS[cfg["optimizer"]]
    model, loss_fn = _model_and_batch(kind, cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, info = _build(method, params, base_cls, kwargs, device)
    kind_of_step = method.split("-")[0]
    step = lambda: _train_step(kind_of_step, model, loss_fn, opt)  # noqa: E731
    if method.endswith("graphed"):
        step = _graphed(step, device, warmup)
    trainer = Trainer(step, CYCLE if method in VARIANTS else 1, sum(p.numel() for p in params), info,
                      lambda: float(_train_step(kind_of_step, model, loss_fn, opt).detach()))
    for _ in range(warmup):
        trainer.sample()
    sync(device)
    return trainer


def run_e2e(device: torch.device, warmup: int, repeats: int, rounds: int = 5, quick: bool = False, progress=None,
            models: Optional[List[str]] = None, noise_threshold: float = NOISE_THRESHOLD,
            full: bool = True) -> List[dict]:
    """The methods (``methods_for(device, full)``) of every model, interleaved round by round (see the module
    docstring). ``progress``: tqdm, for a bar per model."""
    configs = _configs(device, quick)
    models = models or list(configs)
    methods = methods_for(device, full)
    rows = []
    for i, kind in enumerate(models):
        cfg = configs[kind]
        kind_rows, trainers = {}, {}
        bar = progress(total=len(methods) * (rounds + 1), desc=f"end-to-end {i + 1}/{len(models)} {kind}",
                       unit="step") if progress else None
        for method in methods:
            row = kind_rows[method] = dict(model=kind, method=method, optimizer=cfg["optimizer"], batch=cfg["batch"],
                                           error=None)
            try:
                trainers[method] = prepare(kind, method, device, quick, warmup)
                row.update(params=trainers[method].params, info=trainers[method].info)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
            if bar:
                bar.update(1)
        for r in range(rounds):
            for method in round_order(list(trainers), r):
                t = trainers[method]
                try:
                    t.round_times.append(statistics.median(time_steps(t.sample, device, repeats)) / t.cycle)
                except Exception as exc:
                    kind_rows[method]["error"] = f"{type(exc).__name__}: {exc}"
                    del trainers[method]
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
        for method, t in trainers.items():
            row = kind_rows[method]
            try:
                loss = t.loss()
                row.update(summarize(t.round_times), rounds_ms=[x * 1e3 for x in t.round_times], loss=loss,
                           finite=math.isfinite(loss))
                row["steps_per_s"] = 1e3 / row["median_ms"]
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
        del trainers
        for r in kind_rows.values():  # graphed steps against the graphed plain step, the others against the plain one
            versus = "plain-graphed" if r["method"].endswith("graphed") else "plain"
            plain = kind_rows.get(versus)
            ok = plain is not None and not plain["error"] and not r["error"]
            r["x_plain"] = r["median_ms"] / plain["median_ms"] if ok else None
            r["flags"] = [] if r["error"] else row_flags(
                r, noise_threshold, x_plain=None if r["method"] in ONE_PASS else r["x_plain"])
        rows += kind_rows.values()
    return rows
