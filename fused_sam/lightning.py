"""``SAMMixedPrecision``: paired SAM under ``lightning.pytorch`` mixed precision ("16-mixed", "bf16-mixed").

    trainer = lightning.Trainer(plugins=[SAMMixedPrecision("16-mixed", device="cuda")])

Imports lightning; ``import fused_sam`` does not. For the ``pytorch_lightning`` package use
``fused_sam.pytorch_lightning``.
"""
try:
    from lightning.pytorch.core.optimizer import do_nothing_closure
    from lightning.pytorch.plugins.precision import MixedPrecision
except ImportError as error:
    raise ImportError(
        "fused_sam.lightning needs the lightning package (>= 2.1): pip install lightning "
        "(for the pytorch_lightning package use fused_sam.pytorch_lightning)"
    ) from error

from ._lightning_amp import build_sam_mixed_precision

SAMMixedPrecision = build_sam_mixed_precision(MixedPrecision, do_nothing_closure)
SAMMixedPrecision.__module__ = __name__

__all__ = ["SAMMixedPrecision"]
