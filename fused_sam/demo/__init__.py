"""`fused-sam demo`: the statistical claims behind SAM, measured with FusedSAM on synthetic data.

Behdin & Mazumder, "On Statistical Properties of Sharpness-Aware Minimization: Provable Guarantees"
(arXiv 2302.11836): SAM has a lower bias and a higher variance than gradient descent, so it can reach a
smaller prediction error, above all when stopped early; under conditions it beats GD for kernel regression
and for a one-hidden-layer network; and its solutions are flatter.

  kernel  (fused_sam.demo.kernel)  bias^2, variance and test risk over iterations, GD against SAM
  mlp     (fused_sam.demo.mlp)     a one-hidden-layer ReLU network on noisy labels: accuracy and sharpness

Run ``fused-sam demo [kernel|mlp|all] [--quick] [--out DIR] [--seed N]``; see ``fused_sam.demo.cli``.
"""
from .kernel import KernelConfig, run_kernel
from .mlp import MLPConfig, run_mlp

__all__ = ["KernelConfig", "MLPConfig", "run_kernel", "run_mlp"]
