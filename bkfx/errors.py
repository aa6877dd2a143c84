"""bkfx's exceptions: one class per kind of failure, each naming what failed and where."""
from __future__ import annotations


class BkfxError(Exception):
    """Base class of every error bkfx raises on purpose."""


class CaptureError(BkfxError):
    """torch.export could not capture the model as a graph."""


class SampleMixingError(BkfxError):
    """An operation combines different samples, so per-sample gradients do not exist."""


class UnsupportedOperationError(BkfxError):
    """bkfx cannot compute per-sample gradients through this operation exactly."""


class InPlaceModificationError(BkfxError):
    """A tensor saved for the per-sample norms was modified in place before backward."""


class NotCapturedError(BkfxError):
    """The model has not been called yet, so there is no graph to show."""


def node_error(cls: type[BkfxError], node, problem: str, advice: str) -> BkfxError:
    """An error of class `cls` that names the graph node, its ATen operation and the user's line."""
    from bkfx.source import user_source_line

    op = getattr(node.target, "__name__", str(node.target))
    where = user_source_line(node) or "no source line recorded"
    return cls(f"{problem}\n  node: {node.name}\n  operation: {op}\n  source: {where}\n  what to do: {advice}")
