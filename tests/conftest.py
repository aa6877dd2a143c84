"""Hypothesis profiles for bkfx's tests.

`BKFX_HYPOTHESIS_PROFILE=ci` (the default) keeps the whole suite to a few minutes on a
2-core CPU; `BKFX_HYPOTHESIS_PROFILE=thorough` draws 1000 architectures per property.
The markers (`slow`, `distributed`, `gpu`, `compiled`) are registered in pyproject.toml; the
quick lane is `python -m pytest -m "not slow and not distributed"` (docs/testing.md).
"""
from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

# The package is importable from the repository root without installation.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=_SLOW_IS_FINE)
settings.register_profile(
    "thorough", max_examples=1000, deadline=None, suppress_health_check=_SLOW_IS_FINE
)
settings.load_profile(os.environ.get("BKFX_HYPOTHESIS_PROFILE", "ci"))


import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES])
def device(request) -> str:
    """Each device a device-independent test runs on: the CPU, and CUDA when one is present
    (so a GPU machine runs them on both, a CPU-only CI only on the CPU; the CUDA runs carry the
    `gpu` marker)."""
    return request.param


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `-n 2` (README's test command): one process per core, so one intra-op thread each
    torch.set_num_threads(1)
