"""bkfx's exceptions: one class per kind of failure, each naming what failed and where."""
from __future__ import annotations

__all__ = ["BkfxError", "CaptureError", "SampleMixingError", "UnsupportedOperationError", "StateWriteError",
    "InPlaceModificationError", "UnclippedGradientError", "PoissonSamplingWarning", "NotCapturedError",
    "RenderError", "CommandLineError", "node_error", "located_error"]


class BkfxError(Exception):
    """Base class of every error bkfx raises on purpose."""


class CaptureError(BkfxError):
    """torch.export could not capture the model as a graph."""


class SampleMixingError(BkfxError):
    """An operation combines different samples, so per-sample gradients do not exist."""


class UnsupportedOperationError(BkfxError):
    """bkfx cannot compute per-sample gradients through this operation exactly."""


class StateWriteError(BkfxError):
    """The forward writes a value computed from the samples into a buffer or parameter, which would
    carry private data out of the step without noise."""


class InPlaceModificationError(BkfxError):
    """A tensor saved for the per-sample norms was modified in place before backward."""


class UnclippedGradientError(BkfxError):
    """The optimizer was asked to step on gradients that are not clipped sums bkfx wrote (`bkfx._runtime.receipts`)."""


class PoissonSamplingWarning(UserWarning):
    """A loader's own batching (shuffled or in order) is replaced by Poisson sampling."""


class NotCapturedError(BkfxError):
    """The model has not been called yet, so there is no graph to show."""


class RenderError(BkfxError):
    """The graph cannot be drawn: an unknown format, or no drawing engine installed."""


class CommandLineError(BkfxError):
    """The command's input is unusable: the file, the factory, the model, the shape or an option."""


def node_error(cls: type[BkfxError], node, problem: str, advice: str) -> BkfxError:
    """An error of class `cls` that names the graph node, its ATen operation and the user's line."""
    from bkfx._ir.source import user_source_line

    op = getattr(node.target, "__name__", str(node.target))
    return located_error(cls, problem, node.name, op, user_source_line(node), advice)


def located_error(cls: type[BkfxError], problem: str, node: str, op: str, source: str | None, advice: str) -> BkfxError:
    """The one format of every error that names where it happened: problem, node, operation,
    the user's source line, and what to do instead (also for sites at run time, by name)."""
    where = source or "no source line recorded"
    return cls(f"{problem}\n  node: {node}\n  operation: {op}\n  source: {where}\n  what to do: {advice}")
