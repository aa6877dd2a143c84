"""Indexing: `select`, `unbind`, `gather`, `index_select`, `scatter`, `aten.index`, `unique` (sample rules).

An op that reads entries of its input by index works along the indexed dimension, which must not
be the sample dimension, except where the index is the identity `arange(B)` itself (`META_IDENTITY`:
sample i reads its own row, as Hugging Face's masks built from a padding attention_mask do).
`unique` finds the distinct values of the whole batch and is refused.
"""
from __future__ import annotations

from torch.fx import Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_DEPENDENT, META_IDENTITY, META_LAYOUT
from bkfx._ir.node import arguments, op_name
from bkfx.errors import SampleMixingError, node_error
from bkfx.rules.sample import identity, ndim, out_ndim, sample_rule, tensor_inputs, works_along

__all__ = []  # sample rules only, registered by their decorators


@sample_rule("select", "unbind")
def _select(node):
    x = node.args[0]
    rank = ndim(x)
    d = int(arguments(node).get("dim", 0)) % rank
    return [(x, lambda k: None if k == d else (k if k < d else k - 1))]


@sample_rule("gather")
def _gather(node):
    x, dim, index = node.args[0], int(node.args[1]), node.args[2]
    out = [(x, works_along(dim, rank=ndim(x)))]
    if isinstance(index, Node):
        out.append((index, identity))
    return out


@sample_rule("index_select")
def _index_select(node):
    x, dim, index = node.args[0], int(node.args[1]) % max(ndim(node.args[0]), 1), node.args[2]
    return [(x, works_along(dim, rank=ndim(x))), (index, lambda k: dim)]


@sample_rule("scatter", "scatter_add", "scatter_reduce")
def _scatter(node):
    x, dim = node.args[0], int(node.args[1])
    rank = ndim(x)
    return [(n, works_along(dim, rank=rank)) for n in tensor_inputs(node)]


@sample_rule("index", "_unsafe_index")
def _index(node):
    """`x[i0, i1, ...]` with index tensors broadcast together: the indexed dimensions are replaced
    by the broadcast dimensions (in place when the indexed dimensions are adjacent, else first).
    x's sample dimension may be indexed only by the identity `arange(B)`, sample i reading its own
    row; per-sample index tensors must lay their samples along the same broadcast dimension."""
    x, indices = node.args[0], list(node.args[1])
    rank, r = ndim(x), out_ndim(node)
    indices += [None] * (rank - len(indices))
    indexed = [k for k, i in enumerate(indices) if i is not None]
    R = max(ndim(i) for i in indices if i is not None)
    adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
    start = indexed[0] if adjacent else 0
    rest = [k for k in range(rank) if k not in indexed]

    def position(k):  # where a non-indexed dimension of x goes
        if adjacent:
            return k if k < indexed[0] else k - len(indexed) + R
        return R + rest.index(k)

    lo = x.meta.get(META_LAYOUT)
    sample = lo.dim if isinstance(lo, SampleLayout) and x.meta.get(META_DEPENDENT) else None
    if sample is not None and indices[sample] is not None:
        ident = indices[sample]
        ilo = ident.meta.get(META_LAYOUT) if isinstance(ident, Node) else None
        if not (isinstance(ident, Node) and ident.meta.get(META_IDENTITY) and isinstance(ilo, SampleLayout)):
            raise node_error(
                SampleMixingError, node, "this indexing selects along the sample dimension, so samples can be swapped or mixed",
                "index other dimensions only (e.g. x[:, idx]), or index the batch with torch.arange(batch size) itself",
            )
        through = start + ilo.dim + R - ndim(ident)
        x_map = lambda k: through if k == sample else (None if k in indexed else position(k))  # noqa: E731
    else:
        x_map = lambda k: None if k in indexed else position(k)  # noqa: E731
    out = [(x, x_map)]
    for i in indices:
        if isinstance(i, Node):
            out.append((i, lambda j, rank_i=ndim(i): start + j + R - rank_i))
    return out


_UNIQUE = {"unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}


@sample_rule(*_UNIQUE, refuses=True)
def _unique(node):
    raise node_error(
        SampleMixingError, node,
        f"{op_name(node)} finds the distinct values of the whole batch: which values, how many and their inverse "
        "indices depend on every sample, and its output's size depends on the data",
        "compute the distinct values per sample (e.g. a sort along a non-sample dimension), or compute them "
        "outside the model from data that is not private",
    )
