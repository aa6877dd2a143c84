"""bkfx: differentially private training as a torch.fx graph rewrite (Book-Keeping)."""
from bkfx.batchnorm import replace_batchnorm
from bkfx.compile import DPModel, compile
from bkfx.optimizer import DPOptimizer
from bkfx.errors import (
    BkfxError,
    CaptureError,
    InPlaceModificationError,
    NotCapturedError,
    SampleMixingError,
    UnsupportedOperationError,
)

__all__ = [
    "compile", "DPModel", "DPOptimizer", "replace_batchnorm", "BkfxError", "CaptureError", "InPlaceModificationError",
    "NotCapturedError", "SampleMixingError", "UnsupportedOperationError",
]
__version__ = "0.1.0"
