"""A training run that checkpoints atomically, for tests/test_kill_resume.py.

Runs several small FusedSAM trainings side by side (one per config, round robin, one step each in turn),
each checkpointing its model, optimizer (and GradScaler) every ``every`` steps into ``<dir>/<config>.pt``
with ``save_checkpoint_atomically``. With ``--resume`` each config starts from its checkpoint (if any) in
this fresh process. At the end each writes ``<dir>/<config>.final.pt``: the model's and the optimizer's
state dicts. The test kills the process with SIGKILL (no clean exit) and compares the resumed run's final
state with an uninterrupted run's, bit for bit.

Every batch is a function of (config, step) only, so a resumed run sees the data the uninterrupted one saw
without saving a data loader's position.

    python kill_resume_worker.py DIR --steps N [--configs a,b] [--resume] [--pause-in-write CONFIG@STEP]
        [--announce]

``--pause-in-write CONFIG@STEP``: when CONFIG writes its checkpoint of STEP, write half of the bytes into
the temporary file, print ``PAUSED <tmp path>`` and wait on stdin (the test kills the process there).
``--announce``: print ``CKPT <config> <step>`` after each checkpoint lands (for a test that kills at
random moments).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from fused_sam import FusedSAM  # noqa: E402
from fused_sam.variants import LookSAM, Randomly, WhenSharp  # noqa: E402
from reliability_helpers import save_checkpoint_atomically, serialized  # noqa: E402

SGD_M = (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3))
ADAMW = (torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2, amsgrad=True))
SCALER = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
OVERFLOW_STEPS = {5: "first", 8: "second", 13: "both"}  # the gradscaler config's injected overflows


@dataclass
class Config:
    base: tuple
    every: int  # checkpoint after steps every-1, 2*every-1, ...
    dtype: torch.dtype = torch.float32
    sam: dict = field(default_factory=dict)
    variant: Optional[callable] = None
    scaler: bool = False
    closure: bool = False  # step(closure) instead of first_step / second_step


CONFIGS = {
    "sgd-momentum": Config(SGD_M, every=4),
    "adamw": Config(ADAMW, every=5, closure=True),
    "looksam": Config(SGD_M, every=4, variant=lambda: LookSAM(3, alpha=0.5), closure=True),
    "randomly": Config(ADAMW, every=3, variant=lambda: Randomly(0.5, seed=7), closure=True),
    "whensharp": Config(SGD_M, every=5, variant=lambda: WhenSharp(-0.5, 0.5, total_steps=20)),
    "gradscaler": Config(SGD_M, every=4, scaler=True),
    "bf16-master": Config((torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)), every=6, dtype=torch.bfloat16,
                          sam=dict(master_weights=True)),
    "alternate": Config(SGD_M, every=3, sam=dict(mode="alternate")),  # odd checkpoints: between the halves
}


def batch(index: int, step: int, dtype):
    gen = torch.Generator().manual_seed(10_000 * index + step)
    return torch.randn(8, 10, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)


class Run:
    def __init__(self, name: str, backend: str):
        self.name, self.index, self.cfg = name, list(CONFIGS).index(name), CONFIGS[name]
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                                   nn.Linear(16, 3)).to(self.cfg.dtype)
        cls, kwargs = self.cfg.base
        variant = self.cfg.variant() if self.cfg.variant else None
        self.opt = FusedSAM(self.model.parameters(), cls, rho=0.05, backend=backend, variant=variant,
                            **self.cfg.sam, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", **SCALER) if self.cfg.scaler else None
        self.next_step = 0

    def loss(self, x, y):
        return nn.functional.cross_entropy(self.model(x).float(), y)

    def step(self) -> None:
        s = self.next_step
        x, y = batch(self.index, s, self.cfg.dtype)
        opt, cfg = self.opt, self.cfg
        if self.scaler is not None:
            where = OVERFLOW_STEPS.get(s, "")
            self.scaler.scale(self.loss(x, y)).backward()
            if where in ("first", "both"):
                self.model[0].weight.grad[1, 2] = float("inf")
            opt.first_step(zero_grad=True, grad_scaler=self.scaler)
            self.scaler.scale(self.loss(x, y)).backward()
            if where in ("second", "both"):
                self.model[2].weight.grad[0, 1] = float("inf")
            self.scaler.step(opt)
            self.scaler.update()
            opt.zero_grad()
        elif opt.mode == "alternate":
            self.loss(x, y).backward()
            opt.step()
            opt.zero_grad()
        elif cfg.closure:
            def closure():
                opt.zero_grad()
                loss = self.loss(x, y)
                loss.backward()
                return loss
            opt.step(closure)
        elif opt.sam_step_due:
            self.loss(x, y).backward()
            opt.first_step(zero_grad=True)
            self.loss(x, y).backward()
            opt.second_step(zero_grad=True)
        else:
            self.loss(x, y).backward()
            opt.plain_step(zero_grad=True)
        self.next_step += 1

    def state(self) -> dict:
        return {"step": self.next_step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict()}

    def load(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["opt"])
        if self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.next_step = ckpt["step"]


def paused_write(path: Path, obj) -> None:
    """A checkpoint write that stops half way through its temporary file: the test kills us here."""
    data = serialized(obj)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print(f"PAUSED {tmp}", flush=True)
        sys.stdin.readline()  # never answered: SIGKILL arrives first
        f.write(data[len(data) // 2:])
    raise SystemExit("the pause was answered: the test should have killed this process")


def train(out: Path, names, steps: int, resume: bool = False, backend: str = "auto", pause: Optional[str] = None,
          announce: bool = False) -> dict:
    """Train every config to ``steps``; returns each config's final state (also written to disk)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [Run(name, backend) for name in names]
    for run in runs:
        ckpt = out / f"{run.name}.pt"
        if resume and ckpt.exists():
            run.load(torch.load(ckpt, weights_only=False))
    finals = {}
    for s in range(steps):
        for run in runs:
            if run.next_step != s:  # resumed from a later checkpoint: it starts when the loop gets there
                continue
            run.step()
            if run.next_step % run.cfg.every == 0:
                path = out / f"{run.name}.pt"
                if pause == f"{run.name}@{s}":
                    paused_write(path, run.state())
                save_checkpoint_atomically(path, run.state())
                if announce:
                    print(f"CKPT {run.name} {s}", flush=True)
    for run in runs:
        finals[run.name] = {"model": run.model.state_dict(), "opt": run.opt.state_dict(),
                            "scaler": None if run.scaler is None else run.scaler.state_dict(),
                            "backends": run.opt.backends}
        save_checkpoint_atomically(out / f"{run.name}.final.pt", finals[run.name])
    return finals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-in-write")
    parser.add_argument("--announce", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train(args.dir, args.configs.split(","), args.steps, args.resume, args.backend, args.pause_in_write,
          args.announce)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
