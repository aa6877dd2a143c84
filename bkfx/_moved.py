"""Old module paths of bkfx's public modules, still importable with a DeprecationWarning.

The public modules moved into layer subpackages (`bkfx.training`, `bkfx.tools`). `import
bkfx.optimizer`, `from bkfx import data` and the attribute `bkfx.accounting` still give the module
(the same object as under its new name), and warn where it lives now. Internal modules have no
old path: they were never API.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED"]

MOVED = {
    "bkfx.optimizer": "bkfx.training.optimizer",
    "bkfx.data": "bkfx.training.data",
    "bkfx.accounting": "bkfx.training.accounting",
    "bkfx.report": "bkfx.training.report",
    "bkfx.checkpoint": "bkfx.training.checkpoint",
    "bkfx.distributed": "bkfx.training.distributed",
    "bkfx.batchnorm": "bkfx.training.batchnorm",
    "bkfx.explain": "bkfx.tools.explain",
    "bkfx.graph": "bkfx.tools.graph",
    "bkfx.cli": "bkfx.tools.cli",
}


def _warn(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}; import it from there", DeprecationWarning, stacklevel=3)


class _OldPaths(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old path and hands back the module under its new name (no second copy)."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        _warn(spec.name)
        module = importlib.import_module(MOVED[spec.name])
        self._spec = module.__spec__  # the import system sets __spec__ to ours: put it back in exec
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # already run under its new name; nothing to execute


def old_module_attribute(name: str):
    """`bkfx.<old>` as an attribute (the package's `__getattr__`)."""
    old = f"bkfx.{name}"
    if old not in MOVED:
        raise AttributeError(f"module 'bkfx' has no attribute {name!r}")
    _warn(old)
    module = importlib.import_module(MOVED[old])
    setattr(sys.modules["bkfx"], name, module)  # warned once: `from bkfx import data` reads it twice
    return module


# installed once, when bkfx is imported
if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
    sys.meta_path.append(_OldPaths())
