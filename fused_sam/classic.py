"""The classic per-tensor SAM, as most PyTorch SAM code runs it: the baseline we measure against and the
independent oracle the optimizer tests compare with. Deliberately plain: a Python loop over parameters,
a norm per tensor, a clone per tensor, the base optimizer's own step.
"""
from __future__ import annotations

import torch


class ClassicSAM(torch.optim.Optimizer):
    """Per-tensor SAM/ASAM/USAM with the same constructor and methods as the widely used SAM class."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho=0.05, adaptive=False, eta=0.0,
                 normalize=True, perturb_eps=1e-12, **kwargs):
        super().__init__(params, dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, **kwargs))
        self.perturb_eps = perturb_eps
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _scaled(group, p):
        """T = |w| + eta for ASAM, else 1."""
        return p.abs() + group["eta"] if group["adaptive"] else 1.0

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        home = self.param_groups[0]["params"][0].device
        norm = torch.stack([
            (self._scaled(g, p) * p.grad).norm(p=2).to(home)
            for g in self.param_groups for p in g["params"] if p.grad is not None
        ]).norm(p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + self.perturb_eps) if group["normalize"] else torch.tensor(group["rho"], dtype=torch.float64)
            for p in group["params"]:
                if p.grad is None:
                    continue
                t = self._scaled(group, p)
                self.state[p]["old_p"] = p.data.clone()
                p.add_(t * t * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data = self.state[p].pop("old_p")
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss
