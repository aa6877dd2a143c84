"""Recurrent layers: `lstm`, `gru`, `rnn_tanh`, `rnn_relu` (a layout rule).

The output and the final hidden states hold samples in different dimensions (the output's batch
dimension is 0 or 1 with `batch_first`, the states' is 1), so the rule gives each output's layout.
Their parameters have no gradient rule: the fallback gives their per-sample gradients.
"""
from __future__ import annotations

from torch.fx import Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.node import arguments, op_name
from bkfx.errors import UnsupportedOperationError, node_error
from bkfx.rules.sample import check_maps, expect_layouts, layout_rule, ndim

__all__ = []  # a layout rule only, registered by its decorator


_RECURRENT = {"lstm", "gru", "rnn_tanh", "rnn_relu"}


@layout_rule(*_RECURRENT)
def _recurrent(node, shapes, batch):
    """`output, h_n[, c_n] = rnn(x, hx, params, ..., batch_first)`: the recurrence runs along time
    within each sequence, so x's batch dimension (0 if batch_first, else 1) maps to the output's and
    the initial states' dimension 1 to the final states'; the parameters are not per-sample."""
    args = arguments(node)
    if "batch_sizes" in args:
        raise node_error(
            UnsupportedOperationError, node,
            "a packed sequence (nn.utils.rnn.pack_padded_sequence) interleaves the samples' time steps in one "
            "flat tensor, so bkfx cannot split it per sample",
            "pass the padded [B, T, d] batch to the RNN and select each sample's last valid step (or mask the "
            "padded steps) after it",
        )
    x, hx = args["input"], args["hx"]
    bdim = (0 if args["batch_first"] else 1) if ndim(x) == 3 else None  # an unbatched [T, d] input
    maps = [(x, {bdim: bdim}.get if bdim is not None else (lambda k: None))]
    maps += [(h, {1: bdim}.get) for h in (hx if isinstance(hx, (list, tuple)) else [hx]) if isinstance(h, Node)]
    _, before, after = check_maps(node, maps, op_name(node))
    expected = [SampleLayout(bdim, before, after)] + [SampleLayout(1, before, after)] * (len(shapes) - 1)
    return expect_layouts(node, shapes, expected, batch)
