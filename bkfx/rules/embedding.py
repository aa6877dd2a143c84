"""Embedding: `embedding(W, idx, padding_idx)`.

Sample i's gradient is `G_i = onehot(idx_i)ᵀ g_i`: factored with `L = onehot(idx)` (a
gather, never materialised) and `R = g`. Rows at `padding_idx` get no gradient, so
those positions are masked out of L. The ghost norm's `L Lᵀ` is the index-equality
matrix `[idx_t == idx_s]`, costing `B T²` comparisons, not `B T² V`.
"""
from __future__ import annotations

import math

from bkfx._ir.layout import batch_first
from bkfx._ir.node import arguments, shape_of
from bkfx.errors import SampleMixingError, UnsupportedOperationError, node_error
from bkfx.rules.factors import Dense, Factored, OneHot
from bkfx.rules.registry import numel, one_hot_spec, rows, rule
from bkfx.rules.sample import identity, sample_rule

__all__ = ["refuse_scale_grad_by_freq", "Embedding", "IndexSelect"]


def refuse_scale_grad_by_freq(node, args: dict, what: str) -> None:
    """`scale_grad_by_freq` scales each row's gradient by its frequency in the whole batch: refused."""
    if args.get("scale_grad_by_freq"):
        raise node_error(
            UnsupportedOperationError, node,
            "scale_grad_by_freq scales each row's gradient by its frequency in the whole batch, which mixes samples",
            f"construct the {what} with scale_grad_by_freq=False",
        )


@rule("embedding")
class Embedding:
    one_hot_left = True  # L is a gather: the weight gradient is a scatter-add of T rows

    def spec(node, path, batch):
        if path != (0,):
            return None
        refuse_scale_grad_by_freq(node, arguments(node), "embedding")
        V, d = shape_of(node.args[0])
        T = numel(shape_of(node.args[1])) / batch
        return one_hot_spec(T, V, d, batch)

    def piece(call, path):
        weight, idx = call.args[0], call.args[1]
        padding_idx = call.args[2] if len(call.args) > 2 else call.kwargs.get("padding_idx", -1)
        moved = batch_first(idx, call.layouts[(1,)])
        flat = moved.reshape(call.batch, math.prod(moved.shape[1:]))
        mask = (flat != padding_idx) if padding_idx is not None and padding_idx >= 0 else None
        return Factored(OneHot(flat, weight.shape[0], mask), Dense(rows(call.g, call.out_layout, -1)))


@rule("index_select")
class IndexSelect:
    """`index_select(W, 0, ids)` with per-sample ids is `W[ids]`, an embedding: `G_i = onehot(ids_i)ᵀ g_i`
    with the trailing dimensions of W flattened (other dimensions: the fallback)."""

    one_hot_left = True

    def spec(node, path, batch):
        weight = node.args[0]
        if path != (0,) or int(node.args[1]) % len(shape_of(weight)) != 0:
            return None
        V, *rest = shape_of(weight)
        d = numel(rest)
        T = numel(shape_of(node.args[2])) / batch
        return one_hot_spec(T, V, d, batch)

    def piece(call, path):
        weight, ids = call.args[0], call.args[2]
        d = math.prod(weight.shape[1:])
        flat = batch_first(ids, call.layouts[(2,)]).reshape(call.batch, -1)
        g = batch_first(call.g, call.out_layout).reshape(call.batch, -1, d)
        return Factored(OneHot(flat, weight.shape[0]), Dense(g))


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# Each sample looks up its own ids in a table that is not per-sample.


@sample_rule("embedding")
def _embedding(node):
    weight, indices = node.args[:2]
    return [(weight, lambda j: None), (indices, identity)]


@sample_rule("embedding_renorm", refuses=True)
def _embedding_renorm(node):
    raise node_error(
        SampleMixingError, node,
        "nn.Embedding(max_norm=...) renormalises, in place and during the forward pass, the weight rows of the ids in "
        "the batch: an update of the parameters that depends on the private batch and gets no noise (it reveals "
        "which ids occurred)",
        "drop max_norm, or renormalise the embedding weight yourself after each optimizer step (e.g. with "
        "torch.renorm_ under torch.no_grad()), which uses only the noised parameters",
    )
