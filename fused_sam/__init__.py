"""fused_sam: Sharpness-Aware Minimization for PyTorch, fused over flat parameter buffers."""
from .backends import BackendUnavailable, available_backends
from .optimizer import FusedSAM

SAM = FusedSAM

__all__ = ["FusedSAM", "SAM", "BackendUnavailable", "available_backends"]
__version__ = "0.1.0"
