"""Shape ops: how views, reshapes, padding and concatenation move the sample dimension (sample rules).

A view moves each dimension somewhere else (`permute`, `transpose`, `movedim`, (un)squeeze) or
keeps it (`slice`, `split`, `expand`, `repeat`): its dimension map says where, and the shared
check refuses it when the sample dimension changes size (a slice, repetition or concatenation
across samples). A reshape moves the sample dimension by its stride (`_reshape`); padding works
along every padded dimension; `cat` and `stack` along their `dim`. Value-free ops (`zeros_like`,
`sym_size`) read only shapes, dtypes and devices, so no sample reaches their value.
"""
from __future__ import annotations

import sympy
from torch.fx import Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.node import arguments, shape_of
from bkfx.errors import SampleMixingError, node_error
from bkfx.rules.sample import (
    aligned,
    identity,
    ndim,
    out_ndim,
    reshape_rule,
    sample_rule,
    shape_only,
    tensor_inputs,
    value_free_ops,
    works_along,
)

__all__ = []  # sample rules only, registered by their decorators


@reshape_rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as")
def _reshape(node: Node, source, shape, d: int, batch) -> SampleLayout:
    """Sample i's stride `s = after * prod(sizes after the dim)` in the flat order must be a
    multiple of the output dimension's inner size `q`, giving `after' = s / q`."""
    src_node, src = source
    src_shape = shape_of(src_node)
    # sympy.Mul: sympy.prod([]) is the Python int 1, and 1 / 1 would be a Float
    stride = sympy.Integer(src.after) * sympy.Mul(*src_shape[src.dim + 1 :])
    inner = sympy.Mul(*shape[d + 1 :])
    after = sympy.cancel(stride / inner)
    before = sympy.cancel(shape[d] / (batch * after)) if after.is_Integer and after > 0 else None
    if before is None or not before.is_Integer or before < 1:
        raise node_error(
            SampleMixingError, node,
            f"this reshape splits the sample dimension across dimensions (from {src_shape} to {shape})",
            "reshape so that each sample's entries stay together in one dimension",
        )
    return SampleLayout(d, int(before), int(after))


# ops whose value does not depend on their inputs' data (shapes, dtypes and devices only)
value_free_ops(
    "new_ones", "new_zeros", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "randint_like", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
    "_assert_tensor_metadata", "_assert_scalar", "scalar_tensor",
    module=__name__,
)


@sample_rule("permute")
def _permute(node):
    x, dims = node.args[0], node.args[1]
    rank = ndim(x)
    where = {int(d) % rank: j for j, d in enumerate(dims)}
    return [(x, where.get)]


@sample_rule("transpose")
def _transpose(node):
    x = node.args[0]
    rank = ndim(x)
    a, b = (int(d) % rank for d in node.args[1:3])
    return [(x, lambda k: b if k == a else a if k == b else k)]


@sample_rule("t", "numpy_T")
def _t(node):
    x = node.args[0]
    return [(x, (lambda k: 1 - k) if ndim(x) == 2 else identity)]


@sample_rule("movedim")
def _movedim(node):
    x = node.args[0]
    rank = ndim(x)
    src = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    dst = node.args[2] if isinstance(node.args[2], (list, tuple)) else [node.args[2]]
    src, dst = [int(s) % rank for s in src], [int(d) % rank for d in dst]
    rest = iter([k for k in range(rank) if k not in src])
    order = [None] * rank
    for s, d in zip(src, dst):
        order[d] = s
    order = [o if o is not None else next(rest) for o in order]
    where = {s: j for j, s in enumerate(order)}
    return [(x, where.get)]


@sample_rule("unsqueeze")
def _unsqueeze(node):
    x = node.args[0]
    d = int(node.args[1]) % (ndim(x) + 1)
    return [(x, lambda k: k if k < d else k + 1)]


@sample_rule("squeeze")
def _squeeze(node):
    x = node.args[0]
    shape = shape_of(x)
    dims = arguments(node).get("dim")
    if dims is None:
        gone = {k for k, s in enumerate(shape) if s == 1}
    else:
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        gone = {int(d) % len(shape) for d in dims if shape[int(d) % len(shape)] == 1}
    kept = [k for k in range(len(shape)) if k not in gone]
    where = {k: j for j, k in enumerate(kept)}
    return [(x, where.get)]


@sample_rule("expand", "expand_as", "broadcast_to")
def _expand(node):
    x = node.args[0]
    return [(x, aligned(ndim(x), out_ndim(node)))] + [(n, shape_only) for n in tensor_inputs(node) if n is not x]


@sample_rule("type_as")
def _type_as(node):
    x = node.args[0]
    return [(x, identity)] + [(n, shape_only) for n in tensor_inputs(node) if n is not x]


@sample_rule("repeat", "tile")
def _repeat(node):
    # each sample's rows are repeated along other dimensions; repeating along the sample
    # dimension changes its size, which the shared check refuses
    x = node.args[0]
    return [(x, aligned(ndim(x), out_ndim(node)))]


@sample_rule("slice", "narrow", "split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split",
             "unsafe_split_with_sizes")
def _same_rank(node):
    # slices along a dimension keep every sample's entries in place; along the sample
    # dimension they change its size (or, at full size, are the identity), which the shared check sees
    x = node.args[0]
    return [(x, identity)]


@sample_rule("constant_pad_nd", "pad")
def _pad(node):
    """`pad = (l_last, r_last, l_prev, r_prev, ...)`: a dimension with any non-zero pad works along
    it (a negative pad crops one end while the other grows: `(-1, 1)` keeps the size and shifts the
    entries by one), so the sample dimension must not be padded, whatever the result's size."""
    x, pad = node.args[0], arguments(node).get("pad", node.args[1])
    rank = ndim(x)
    padded = {rank - 1 - k // 2 for k, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
    return [(x, lambda k: None if k in padded else k)]


@sample_rule("view_as_real", "view_as_complex")
def _complex_views(node):
    # a trailing dimension of 2 (real, imaginary) is added or removed; the others stay in place
    x = node.args[0]
    return [(x, identity)]


@sample_rule("cat", "concat", "concatenate")
def _cat(node):
    tensors = node.args[0]
    dim = int(arguments(node).get("dim", 0))
    return [(t, works_along(dim, rank=ndim(t))) for t in tensors if isinstance(t, Node) and ndim(t) > 0]


@sample_rule("stack")
def _stack(node):
    tensors = node.args[0]
    rank = ndim(tensors[0]) + 1
    d = int(arguments(node).get("dim", 0)) % rank
    return [(t, lambda k: k if k < d else k + 1) for t in tensors]
