"""fused_sam: Sharpness-Aware Minimization for PyTorch, fused over flat parameter buffers."""
from . import variants
from .backends import BackendUnavailable, available_backends, backend_report
from .optimizer import FusedSAM
from .running_stats import disable_running_stats, enable_running_stats, running_stats_frozen

SAM = FusedSAM

__all__ = [
    "FusedSAM", "SAM", "BackendUnavailable", "available_backends", "backend_report",
    "disable_running_stats", "enable_running_stats", "running_stats_frozen", "variants",
]
__version__ = "0.1.0"
