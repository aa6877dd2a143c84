"""bkfx: differentially private training as a torch.fx graph rewrite (Book-Keeping)."""
import sys

from bkfx.batchnorm import replace_batchnorm
from bkfx import dpmodel
from bkfx.dpmodel import DPModel, compile
from bkfx.optimizer import DPOptimizer
from bkfx.adaptive import AdaptiveClipping
from bkfx.accounting import Accountant, epsilon, noise_multiplier_for
from bkfx.data import PhysicalBatches, PoissonSampler, UserSampler, poisson_loader, split_physical_batches
from bkfx.privacy import PrivateTraining, make_private
from bkfx.checkpoint import load_checkpoint, save_checkpoint
from bkfx.report import PrivacyReport, privacy_report
from bkfx import audit
from bkfx.errors import (
    BkfxError,
    CaptureError,
    InPlaceModificationError,
    NotCapturedError,
    SampleMixingError,
    UnclippedGradientError,
    UnsupportedOperationError,
)

__all__ = [
    "compile", "DPModel", "DPOptimizer", "AdaptiveClipping", "make_private", "PrivateTraining", "Accountant", "epsilon",
    "noise_multiplier_for", "privacy_report", "PrivacyReport", "PoissonSampler", "UserSampler", "poisson_loader", "split_physical_batches", "PhysicalBatches",
    "save_checkpoint", "load_checkpoint",
    "replace_batchnorm", "BkfxError", "CaptureError", "InPlaceModificationError",
    "NotCapturedError", "SampleMixingError", "UnclippedGradientError", "UnsupportedOperationError",
]
__version__ = "0.1.0"

# the module's former name, for `from bkfx.compile import ...`; an alias, not a file, so that
# importing it never rebinds `bkfx.compile`, the function
sys.modules.setdefault(f"{__name__}.compile", dpmodel)
