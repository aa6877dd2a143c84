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

import torch
from torch.fx import Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_DEPENDENT, META_LAYOUT
from bkfx._ir.node import arguments, bind, op_name, shape_of, sym
from bkfx.errors import SampleMixingError, node_error
from bkfx.rules.embedding import refuse_scale_grad_by_freq
from bkfx.rules.factors import Dense, Factored, OneHot
from bkfx.rules.registry import numel, one_hot_spec, rule
from bkfx.rules.sample import expect_layouts, layout_rule

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


# ---- sample rules: how these ops map the sample dimension (bkfx/rules/sample.py) ------------------

# A layout rule: the bags are the samples when each sample's ids lie together.


@layout_rule("embedding_bag", "_embedding_bag")
def _embedding_bag(node, shapes, batch):
    """`embedding_bag(W, ids, offsets, ...)`: bag k holds the flat ids from `offsets[k]` to the next
    offset. Bags are samples when each sample's T ids lie contiguously in `ids` (`[B*T]`, as
    nn.EmbeddingBag flattens a `[B, T]` input; per_sample_weights alike) and offsets is
    `arange(0, ·, T)` (bag i starts at i*T). Outputs of the bags' size are per sample; outputs of
    the ids' size (offset2bag) keep the ids' layout."""
    args = arguments(node)
    weight, ids, offsets = args["weight"], args["indices"], args["offsets"]
    weights = args.get("per_sample_weights")
    if weight.meta.get(META_DEPENDENT):
        raise node_error(
            SampleMixingError, node, "the embedding table is computed from samples, so one sample's rows are read by all",
            "index a table that does not depend on the batch",
        )
    lo = ids.meta.get(META_LAYOUT)
    wlo = weights.meta.get(META_LAYOUT) if isinstance(weights, Node) else None
    step = _arange_step(offsets, batch)
    T = lo.after if isinstance(lo, SampleLayout) else None
    if (
        not isinstance(lo, SampleLayout) or lo.dim != 0 or lo.before != 1 or step is None or step != T
        or args.get("include_last_offset") or offsets.meta.get(META_DEPENDENT)
        or (isinstance(weights, Node) and weights.meta.get(META_DEPENDENT) and wlo != lo)
    ):
        raise node_error(
            SampleMixingError, node,
            "the bags of this embedding bag are not the samples: bkfx splits them per sample only when the ids are a "
            "[B, T] batch (flattened by nn.EmbeddingBag, with offsets arange(0, B*T, T)), not flat ids with offsets "
            "from the data",
            "pass the ids as a [B, T] tensor (pad bags of different lengths with padding_idx), per_sample_weights "
            "of the same shape, and no offsets",
        )
    expected = []
    for shape in shapes:
        dims = [i for i, s in enumerate(shape or []) if s.has(batch)]
        d = dims[0] if dims else None
        expected.append(None if d is None else SampleLayout(d) if shape[d] == batch else SampleLayout(d, 1, T))
    return expect_layouts(node, shapes, expected, batch)


def _arange_step(node, batch) -> int | None:
    """T when `node` is `arange(0, end, T)` with B entries (an offset every T ids), else None."""
    if not isinstance(node, Node) or op_name(node) != "arange" or shape_of(node) != [batch]:
        return None
    if node.target is torch.ops.aten.arange.default:
        return 1
    args = arguments(node)
    if args.get("start", 0) != 0:
        return None
    step = args.get("step", 1)
    step = step.meta.get("val") if isinstance(step, Node) else step
    return int(step) if isinstance(step, int) or (isinstance(step, torch.SymInt) and sym(step).is_Integer) else None
