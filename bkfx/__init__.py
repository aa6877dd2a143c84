"""bkfx: differentially private training as a torch.fx graph rewrite (Book-Keeping)."""

from bkfx.training.batchnorm import replace_batchnorm
from bkfx import dpmodel
from bkfx.dpmodel import DPModel, compile
from bkfx.training.optimizer import DPOptimizer
from bkfx.training.adaptive import AdaptiveClipping
from bkfx.training.accounting import Accountant, epsilon, noise_multiplier_for
from bkfx.training.data import PhysicalBatches, PoissonSampler, UserSampler, poisson_loader, split_physical_batches
from bkfx.privacy import PrivateTraining, make_private
from bkfx.training.checkpoint import load_checkpoint, save_checkpoint
from bkfx.training.report import PrivacyReport, privacy_report
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

# the old paths of the public modules that moved into bkfx.training and bkfx.tools (listed in
# bkfx/_moved.py) still work, with a DeprecationWarning
from bkfx._moved import old_module_attribute as __getattr__  # noqa: E402
