"""``SAMMixedPrecision`` for the ``pytorch_lightning`` package: the class of ``fused_sam.lightning``, built on
``pytorch_lightning``'s MixedPrecision (a Trainer accepts only its own package's plugins)."""
try:
    from pytorch_lightning.core.optimizer import do_nothing_closure
    from pytorch_lightning.plugins.precision import MixedPrecision
except ImportError as error:
    raise ImportError(
        "fused_sam.pytorch_lightning needs the pytorch_lightning package (>= 2.1): pip install pytorch-lightning "
        "(for the lightning package use fused_sam.lightning)"
    ) from error

from ._lightning_amp import build_sam_mixed_precision

SAMMixedPrecision = build_sam_mixed_precision(MixedPrecision, do_nothing_closure)
SAMMixedPrecision.__module__ = __name__

__all__ = ["SAMMixedPrecision"]
