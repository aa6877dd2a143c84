"""Embedding bag: `embedding_bag(W, ids, offsets, scale_grad_by_freq, mode, sparse, per_sample_weights,
include_last_offset, padding_idx)`, the bags being the samples (`passes.sample_dim` proves it: each
sample's T ids lie contiguously, and offsets start a bag every T ids).

With `s_{i,t}` the weight of position t in sample i's bag (0 at `padding_idx`; else
`per_sample_weights`, or 1 for mode sum, `1/n_i` for mode mean with `n_i` the bag's non-padding
count), output row i is `Σ_t s_{i,t} W[ids_{i,t}]`, so

    G_i = Σ_t s_{i,t} e_{ids_{i,t}} g_iᵀ:  L = onehot(ids_i), R_t = s_{i,t} g_i  (T rows of d).

Mode max takes, per column j, the row `m_{i,j}` where the maximum was (the op's `max_indices`):
`G_i[v, j] = g_{i,j} [v = m_{i,j}]`, factored over the d columns: `L = onehot(m_i)`, `R = diag(g_i)`.
The factors are those of an embedding, so ghost norms, tied tables and the clipped sum are shared.
`scale_grad_by_freq` scales rows by their frequency in the whole batch, which mixes samples.
"""
from __future__ import annotations

import math

from bkfx.rules.factors import Dense, Factored, OneHot
from bkfx._ir.node import arguments, bind, shape_of
from bkfx.rules import numel, one_hot_spec, rule
from bkfx.rules.embedding import refuse_scale_grad_by_freq

__all__ = ["SUM", "MEAN", "MAX", "EmbeddingBag"]

SUM, MEAN, MAX = 0, 1, 2


@rule("embedding_bag", "_embedding_bag")
class EmbeddingBag:
    one_hot_left = True  # L is a gather: the weight gradient is a scatter-add

    def spec(node, path, batch):
        if path != (0,):
            return None  # per_sample_weights computed from parameters: the fallback
        args = arguments(node)
        refuse_scale_grad_by_freq(node, args, "embedding bag")
        V, *rest = shape_of(node.args[0])
        d = numel(rest)
        T = d if args["mode"] == MAX else numel(shape_of(node.args[1])) / batch
        return one_hot_spec(T, V, d, batch)

    def forward(op, args, kwargs):
        out = op(*args, **kwargs)
        return out, out[3]  # max_indices: where each column's maximum was (mode max)

    def piece(call, path):
        args = bind(call.op, call.args, call.kwargs)
        weight, ids, mode = args["weight"], args["indices"], args["mode"]
        B, d = call.batch, math.prod(weight.shape[1:])
        padding = args.get("padding_idx")
        padding = padding if padding is not None and padding >= 0 else None
        g = call.g[0].reshape(B, d)
        if mode == MAX:
            rows = call.saved.reshape(B, d)
            mask = rows != padding if padding is not None else None
            return Factored(OneHot(rows, weight.shape[0], mask), Dense(g.diag_embed()))
        ids = ids.reshape(B, -1)
        mask = ids != padding if padding is not None else None
        s = args.get("per_sample_weights")
        s = s.reshape(B, -1).to(g.dtype) if s is not None else g.new_ones(ids.shape)
        if mask is not None:
            s = s * mask
        if mode == MEAN:
            n = (mask.sum(1) if mask is not None else g.new_full((B,), ids.shape[1])).to(g.dtype)
            s = s / n.clamp_min(1)[:, None]  # an empty bag's output is zero: so is its gradient
        return Factored(OneHot(ids, weight.shape[0], mask), Dense(s[:, :, None] * g[:, None, :]))

