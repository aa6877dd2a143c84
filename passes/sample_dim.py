"""sample_dim: where the sample dimension is in every node, and proof that no op mixes samples.

A node is *sample-dependent* when its value depends on the data of a batched input
(shape-only uses such as `sym_size`, and value-free ops such as `zeros_like`, do not
count). For every tensor node with a dimension whose size involves the batch symbol B,
the pass records its `SampleLayout` under `node.meta[META_LAYOUT]`.

Fail closed: a sample-dependent node is accepted only when a *sample rule* proves how its
op maps the sample dimension, the way `torch.func.vmap` needs a batching rule per op.
A rule is a *dimension map*: for each tensor input, where each of its dimensions goes in
the output, or `None` when the op works along that dimension (reduces, contracts, sorts,
pools, normalises or attends over it). The shared check then requires every
sample-dependent input's sample dimension to map to one output dimension, all inputs to
agree on it and on how samples are laid out in it (`SampleLayout.before/after`), and that
dimension to keep its size. Rules:

- elementwise and broadcast (every op tagged `torch.Tag.pointwise`, casts, dropout, ...);
- views: permute, transpose, (un)squeeze, expand, slice/select/narrow, split, unbind,
  repeat, pad; reshapes move the sample dimension by its stride (see `_reshape_layout`);
- reductions and ops along a dimension (softmax, cumsum, sort, topk, flip, FFT, ...):
  that dimension maps to `None`;
- contractions (mm, addmm, bmm, matmul, linear, einsum), convolution and pooling over
  non-sample dimensions, layer/group/RMS norm, batch norm in eval mode, attention
  (scaled_dot_product_attention), embedding, gather, index_select, cat, stack;
- indexing (`aten.index`), where the index along the sample dimension must be the
  identity `arange(B)` (how Hugging Face builds masks from a padding attention_mask):
  `META_IDENTITY` marks values proven to equal their own sample index.

Ops with several outputs whose samples lie in different places (an RNN's output and its final
hidden states, an embedding bag's bags and its flat ids) have a *layout rule* instead, which
proves separability and gives each output's layout (`layout_rule`).

A sample-dependent op with no rule is marked `META_PROBE`: `passes.probe` checks it
numerically at capture, for every ordered pair of samples (perturbing sample i must leave
sample j's output unchanged), and refuses it if it mixes or cannot be run. A region of the
forward under `torch.no_grad()` or `torch.autocast` (a higher-order op with a subgraph) is
not one opaque op: the rules run inside its subgraph. Whatever mixes is refused with
`SampleMixingError`, naming the node, the op and the user's source line.
"""
from __future__ import annotations

import operator
from typing import Callable

import sympy
import torch
from torch.fx import GraphModule, Node

from bkfx.errors import SampleMixingError, UnsupportedOperationError, node_error
from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_BATCH, META_BATCH_DIMS, META_DEPENDENT, META_IDENTITY, META_LAYOUT, META_PROBE
from bkfx._ir.node import arguments, op_name, shape_of, sym

__all__ = ["aten", "DimMap", "sample_dim", "probed_nodes", "sample_rule", "layout_rule"]

aten = torch.ops.aten

DimMap = Callable[[int], "int | None"]  # input dimension -> output dimension, None when the op works along it


def sample_dim(gm: GraphModule) -> GraphModule:
    """Write META_DEPENDENT, META_LAYOUT, META_IDENTITY and META_PROBE on every node; raise on
    ops that provably mix samples."""
    _propagate(gm, gm.graph, gm.meta[META_BATCH], gm.meta.get(META_BATCH_DIMS, {}), None)
    return gm


def _propagate(gm: GraphModule, graph, batch, batch_dims: dict, given: list | None) -> None:
    """The facts of every node of `graph`; `given`: for a region's subgraph, the outer nodes its
    placeholders stand for."""
    placeholders = iter(given or [])
    for node in graph.nodes:
        node.meta[META_PROBE] = False
        node.meta[META_IDENTITY] = False
        if node.op == "placeholder" and given is not None:
            outer = next(placeholders, None)
            facts = outer.meta if isinstance(outer, Node) else {}
            node.meta[META_DEPENDENT] = bool(facts.get(META_DEPENDENT))
            node.meta[META_LAYOUT] = facts.get(META_LAYOUT)
            node.meta[META_IDENTITY] = bool(facts.get(META_IDENTITY))
        elif node.op == "placeholder":
            shape = shape_of(node)
            dims = [i for i, s in enumerate(shape or []) if s.has(batch)]
            dependent = bool(dims)
            node.meta[META_DEPENDENT] = dependent
            node.meta[META_LAYOUT] = SampleLayout(batch_dims.get(node.name, dims[0])) if dependent else None
        elif node.op == "call_function" and node.target in _REGIONS:
            _region(gm, node, batch)
        elif node.op in ("call_function", "call_method", "call_module"):
            dependent = node.target not in _VALUE_FREE_TARGETS and op_name(node) not in _VALUE_FREE and any(
                n.meta.get(META_DEPENDENT) for n in node.all_input_nodes
            )
            node.meta[META_DEPENDENT] = dependent
            node.meta[META_LAYOUT] = _layout(node, batch, dependent)
            node.meta[META_IDENTITY] = not dependent and _is_identity(node, batch)
        else:
            node.meta[META_DEPENDENT] = False
            node.meta[META_LAYOUT] = None


# higher-order ops that run a subgraph under a mode (torch.no_grad(), torch.autocast): the
# position of the subgraph among their arguments; the subgraph's inputs follow it
_REGIONS = {
    getattr(torch.ops.higher_order, name): position
    for name, position in (("wrap_with_set_grad_enabled", 1), ("wrap_with_autocast", 4))
    if hasattr(torch.ops.higher_order, name)
}


def _region(gm: GraphModule, node: Node, batch) -> None:
    """A `with torch.no_grad():` or `torch.autocast` region: the rules see inside its subgraph,
    so its ops are proven (or probed, or refused, with their own source lines) like any other;
    the region's outputs take the layouts of the subgraph's outputs. A region holding an op that
    only the probe checks is probed as a whole (its inside runs as one call)."""
    position = _REGIONS[node.target]
    body = gm.get_submodule(node.args[position].target)
    inputs = list(node.args[position + 1 :])
    _propagate(body, body.graph, batch, {}, inputs)
    output = next(n for n in body.graph.nodes if n.op == "output")
    results = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    node.meta[META_DEPENDENT] = any(isinstance(r, Node) and r.meta.get(META_DEPENDENT) for r in results)
    node.meta[META_LAYOUT] = tuple(r.meta.get(META_LAYOUT) if isinstance(r, Node) else None for r in results)
    node.meta[META_PROBE] = any(n.meta.get(META_PROBE) for n in body.graph.nodes)


def probed_nodes(gm: GraphModule) -> list[Node]:
    """The sample-dependent nodes no rule covers, which `passes.probe` checks numerically."""
    return [n for n in gm.graph.nodes if n.meta.get(META_PROBE)]


# ---- layouts -------------------------------------------------------------------------------------


def _layout(node: Node, batch: sympy.Symbol, dependent: bool):
    val = node.meta.get("val")
    if node.target is operator.getitem:
        parent, index = node.args
        layouts = parent.meta.get(META_LAYOUT)
        return layouts[index] if isinstance(layouts, tuple) else None
    outputs = list(val) if isinstance(val, (list, tuple)) else [val]
    if not any(isinstance(v, torch.Tensor) for v in outputs):
        return None
    if not dependent:
        layouts = [_free_layout(node, v, batch) if isinstance(v, torch.Tensor) else None for v in outputs]
    else:
        layouts = _dependent_layouts(node, outputs, batch)
    return tuple(layouts) if isinstance(val, (list, tuple)) else layouts[0]


def _free_layout(node: Node, val: torch.Tensor, batch) -> SampleLayout | None:
    """A value that does not depend on samples (a mask expanded to B) cannot mix them; its
    batch-sized dimension still gets a layout, so later ops can align with it."""
    shape = [sym(s) for s in val.shape]
    dims = [i for i, s in enumerate(shape) if s.has(batch)]
    if len(dims) != 1:
        return None
    if shape[dims[0]] == batch:
        return SampleLayout(dims[0])
    sources = [(n, n.meta[META_LAYOUT]) for n in node.all_input_nodes if isinstance(n.meta.get(META_LAYOUT), SampleLayout)]
    if op_name(node) in _RESHAPES and sources:
        try:
            return _reshape_layout(node, sources[0], shape, dims[0], batch)
        except SampleMixingError:
            return None
    return None


def _dependent_layouts(node: Node, outputs: list, batch) -> list:
    shapes = [[sym(s) for s in v.shape] if isinstance(v, torch.Tensor) else None for v in outputs]
    name = op_name(node)
    rule = _rule_for(node)
    if name in _REFUSING:
        rule(node)  # refuses with its own reason (batch statistics, in-place renormalisation)
    for shape in shapes:
        if shape is None:
            continue
        dims = [i for i, s in enumerate(shape) if s.has(batch)]
        if not dims and len(outputs) == 1:
            raise node_error(
                SampleMixingError, node,
                "this operation reduces, contracts or selects along the sample dimension (its result depends on "
                "samples but has no sample dimension), so it mixes or drops samples",
                "reduce over other dimensions only; compute the loss outside the model (bkfx applies the "
                "declared loss_reduction), and use per-sample normalisation (GroupNorm/LayerNorm) instead of batch statistics",
            )
        if len(dims) > 1:
            raise node_error(
                SampleMixingError, node,
                f"the result has the sample dimension twice (dims {dims}), so it pairs different samples",
                "keep each sample's computation separate: no products or comparisons between samples",
            )
    if name in _LAYOUT_RULES:
        return _LAYOUT_RULES[name](node, shapes, batch)
    if name in _RESHAPES:
        dep = [n for n in node.all_input_nodes if n.meta.get(META_DEPENDENT)]
        src = node.args[0] if node.args[0] in dep else dep[0]
        (d,) = [i for i, s in enumerate(shapes[0]) if s.has(batch)]
        return [_reshape_layout(node, (src, src.meta[META_LAYOUT]), shapes[0], d, batch)]
    if rule is None:
        node.meta[META_PROBE] = True
        return [_matched_layout(node, shape, batch) if shape is not None else None for shape in shapes]
    maps = rule(node)
    dim, before, after = _mapped(node, maps, name)
    layouts = []
    for shape in shapes:
        if shape is None or not any(s.has(batch) for s in shape):
            layouts.append(None)
            continue
        (d,) = [i for i, s in enumerate(shape) if s.has(batch)]
        if d != dim or shape[d] != before * batch * after:
            raise node_error(
                SampleMixingError, node,
                f"{name} moves or resizes the sample dimension (to dim {d} of size {shape[d]}, expected dim {dim}): "
                "it concatenates, slices, repeats or reorders samples",
                "operate on each sample separately; concatenate, slice or repeat along other dimensions",
            )
        layouts.append(SampleLayout(d, before, after))
    return layouts


def _matched_layout(node: Node, shape, batch) -> SampleLayout | None:
    """For an op without a rule (checked by the probe): the layout of an input whose sample
    dimension has the output's size."""
    dims = [i for i, s in enumerate(shape) if s.has(batch)]
    if not dims:
        return None
    (d,) = dims
    for n in sorted(node.all_input_nodes, key=lambda n: not n.meta.get(META_DEPENDENT)):
        lo = n.meta.get(META_LAYOUT)
        if isinstance(lo, SampleLayout) and shape_of(n)[lo.dim] == shape[d]:
            return SampleLayout(d, lo.before, lo.after)
    raise node_error(
        SampleMixingError, node,
        f"the sample dimension changed size to {shape[d]} (concatenation, slicing or repetition across samples)",
        "operate on each sample separately; concatenate or slice along other dimensions",
    )


def _mapped(node: Node, maps: list[tuple[Node, DimMap]], name: str) -> tuple[int, int, int]:
    """The output dimension (and layout) every sample-dependent input's sample dimension maps to."""
    covered = {n for n, _ in maps}
    missing = [n for n in node.all_input_nodes if n.meta.get(META_DEPENDENT) and n not in covered]
    if missing:  # an input the rule does not describe: nothing is proven
        raise node_error(
            SampleMixingError, node, f"{name} takes the sample-dependent input {missing[0].name} in a role bkfx has no rule for",
            "pass per-sample values only as the operation's data operands, or write the operation another way",
        )
    target = None
    for inp, dim_map in maps:
        lo = inp.meta.get(META_LAYOUT)
        if dim_map is _shape_only or not inp.meta.get(META_DEPENDENT) or not isinstance(lo, SampleLayout):
            continue
        out = dim_map(lo.dim)
        if out is None:
            raise node_error(
                SampleMixingError, node,
                f"{name} works along the sample dimension of {inp.name} ({lo.describe()}): it reduces, contracts, "
                "sorts, pools, normalises or attends over it, so samples influence each other",
                f"apply {name} along a non-sample dimension; if this input is not batch-first, tell bkfx.compile "
                "where its batch is with batch_dim=",
            )
        candidate = (out, lo.before, lo.after)
        if target is not None and candidate != target:
            raise node_error(
                SampleMixingError, node,
                f"{name} pairs the sample dimensions of its inputs differently ({_describe(target)} vs "
                f"{_describe(candidate)}), so it combines entries of different samples",
                "lay out every operand's batch the same way (same dimension, same order)",
            )
        target = candidate
    if target is None:  # only shape-only inputs depend on samples: the values come from sample-free inputs
        target = next(((dim_map(lo.dim), lo.before, lo.after) for inp, dim_map in maps
                       if dim_map is not _shape_only and isinstance(lo := inp.meta.get(META_LAYOUT), SampleLayout)
                       and dim_map(lo.dim) is not None), None)
    if target is None:
        raise node_error(SampleMixingError, node, f"{name}: no input carries the sample dimension", "report this model to bkfx")
    return target


def _describe(target) -> str:
    dim, before, after = target
    return SampleLayout(dim, before, after).describe()


def _reshape_layout(node: Node, source, shape, d: int, batch) -> SampleLayout:
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


# ---- identity indices ----------------------------------------------------------------------------


def _is_identity(node: Node, batch) -> bool:
    """`arange(B)`, and views or casts of it that keep B in a dimension of its own."""
    name = op_name(node)
    lo = node.meta.get(META_LAYOUT)
    if not isinstance(lo, SampleLayout) or lo.merged:
        return False
    args = arguments(node)
    if name == "arange":
        start, end, step = args.get("start", 0), args.get("end"), args.get("step", 1)
        if node.target is aten.arange.default:
            start, end, step = 0, node.args[0], 1
        value = end.meta.get("val") if isinstance(end, Node) else end
        return start == 0 and step == 1 and value is not None and sym(value) == batch
    source = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if source is None or not source.meta.get(META_IDENTITY):
        return False
    if name == "slice":
        return args.get("start") in (0, None) and args.get("step", 1) == 1 and shape_of(node) == shape_of(source)
    if name in ("add", "sub"):
        return len(node.args) == 2 and node.args[1] == 0
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in _EXACT_INDEX_DTYPES:
        return False  # a cast through a float or a narrow integer is not arange(B) for every B
    return name in _IDENTITY_KEEPING


# integer dtypes that hold every sample index exactly (a batch of 2**31 samples cannot be indexed at all)
_EXACT_INDEX_DTYPES = {torch.int64, torch.int32}
_IDENTITY_KEEPING = {
    "unsqueeze", "view", "reshape", "_unsafe_view", "expand", "to", "_to_copy", "clone", "contiguous", "alias",
    "detach", "lift_fresh_copy", "permute", "transpose", "squeeze",
}


# ---- sample rules --------------------------------------------------------------------------------

_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as"}
# ops whose value does not depend on their inputs' data (shapes, dtypes and devices only)
_VALUE_FREE = {
    "new_ones", "new_zeros", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like", "full_like",
    "rand_like", "randn_like", "randint_like", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
    "_assert_tensor_metadata", "_assert_scalar", "scalar_tensor",
}
_VALUE_FREE_TARGETS = {aten.sym_size.int}
# elementwise ops without the pointwise tag
_ELEMENTWISE = {
    "clone", "_to_copy", "to", "detach", "alias", "contiguous", "lift_fresh_copy", "dropout",
    "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "__and__", "__or__", "__xor__",
    "__lshift__", "__rshift__", "masked_fill", "copy", "fill", "hardswish", "hardsigmoid", "tril", "triu",
    "_native_batch_norm_legit_no_training", "positive", "real", "imag",
    "_conj", "resolve_conj", "resolve_neg", "where",
}

_RULES: dict[str, Callable[[Node], list[tuple[Node, DimMap]]]] = {}
# ops with several outputs that lay out samples differently from each other: `rule(node, shapes,
# batch) -> [SampleLayout | None per output]`, proving separability itself
_LAYOUT_RULES: dict[str, Callable[[Node, list, sympy.Symbol], list]] = {}


def _registrar(table: dict):
    """A decorator factory that files a function in `table` under each of the op names given."""

    def names(*ops: str):
        def register(fn):
            for op in ops:
                table[op] = fn
            return fn

        return register

    return names


sample_rule = _registrar(_RULES)
sample_rule.__doc__ = "Register a sample rule: `rule(node) -> [(input node, dimension map)]`."
layout_rule = _registrar(_LAYOUT_RULES)
layout_rule.__doc__ = "Register a layout rule (an RNN's output and hidden states, an embedding bag's bags and flat ids)."


def _rule_for(node: Node):
    name = op_name(node)
    if name in _RULES:
        return _RULES[name]
    if name in _ELEMENTWISE or torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return _broadcast_rule
    return None


def _rank(node) -> int:
    return len(shape_of(node))


def _out_rank(node: Node) -> int:
    val = node.meta["val"]
    first = val[0] if isinstance(val, (list, tuple)) else val
    return first.dim()


def _tensor_inputs(node: Node) -> list[Node]:
    return [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)]


def _aligned(rank_in: int, rank_out: int) -> DimMap:
    """Right-aligned broadcasting: input dim k is output dim k + rank_out - rank_in."""
    return lambda k: k + rank_out - rank_in


def _identity(k: int) -> int:
    return k


def _except(*dims: int, rank: int) -> DimMap:
    """Dimension k maps to itself, except the given ones (the op works along them)."""
    along = {d % rank for d in dims} if rank else set()
    return lambda k: None if k in along else k


def _shape_only(k: int) -> None:
    """The map of an input the op reads only the shape, dtype or device of (`expand_as`'s and
    `type_as`'s `other`): its values reach no output, so it cannot mix samples."""
    return None


def _broadcast_rule(node: Node):
    out = _out_rank(node)
    return [(n, _aligned(_rank(n), out)) for n in _tensor_inputs(node)]


@sample_rule("permute")
def _permute(node):
    x, dims = node.args[0], node.args[1]
    rank = _rank(x)
    where = {int(d) % rank: j for j, d in enumerate(dims)}
    return [(x, where.get)]


@sample_rule("transpose")
def _transpose(node):
    x = node.args[0]
    rank = _rank(x)
    a, b = (int(d) % rank for d in node.args[1:3])
    return [(x, lambda k: b if k == a else a if k == b else k)]


@sample_rule("t", "numpy_T")
def _t(node):
    x = node.args[0]
    return [(x, (lambda k: 1 - k) if _rank(x) == 2 else _identity)]


@sample_rule("movedim")
def _movedim(node):
    x = node.args[0]
    rank = _rank(x)
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
    d = int(node.args[1]) % (_rank(x) + 1)
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
    return [(x, _aligned(_rank(x), _out_rank(node)))] + [(n, _shape_only) for n in _tensor_inputs(node) if n is not x]


@sample_rule("type_as")
def _type_as(node):
    x = node.args[0]
    return [(x, _identity)] + [(n, _shape_only) for n in _tensor_inputs(node) if n is not x]


@sample_rule("repeat", "tile")
def _repeat(node):
    # each sample's rows are repeated along other dimensions; repeating along the sample
    # dimension changes its size, which the shared check refuses
    x = node.args[0]
    return [(x, _aligned(_rank(x), _out_rank(node)))]


@sample_rule("slice", "narrow", "split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split",
             "unsafe_split_with_sizes")
def _same_rank(node):
    # slices along a dimension keep every sample's entries in place; along the sample
    # dimension they change its size (or, at full size, are the identity), which the shared check sees
    x = node.args[0]
    return [(x, _identity)]


@sample_rule("constant_pad_nd", "pad")
def _pad(node):
    """`pad = (l_last, r_last, l_prev, r_prev, ...)`: a dimension with any non-zero pad works along
    it (a negative pad crops one end while the other grows: `(-1, 1)` keeps the size and shifts the
    entries by one), so the sample dimension must not be padded, whatever the result's size."""
    x, pad = node.args[0], arguments(node).get("pad", node.args[1])
    rank = _rank(x)
    padded = {rank - 1 - k // 2 for k, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
    return [(x, lambda k: None if k in padded else k)]


@sample_rule("renorm")
def _renorm(node):
    """`renorm(x, p, dim, maxnorm)` rescales each slice `x.select(dim, j)` to norm <= maxnorm: the
    norm is taken over every dimension but `dim`, so only `dim` keeps its entries apart."""
    x = node.args[0]
    rank = _rank(x)
    d = int(arguments(node)["dim"]) % rank
    return [(x, lambda k: k if k == d else None)]


@sample_rule("cross", "linalg_cross")
def _cross(node):
    """`cross(a, b, dim)`: a and b broadcast together; the 3-vectors lie along `dim` (for `cross`
    without dim, the first dimension of size 3)."""
    r = _out_rank(node)
    dim = arguments(node).get("dim")
    if dim is None:
        dim = next(k for k, s in enumerate(node.meta["val"].shape) if s == 3)
    d = int(dim) % r
    return [(n, (lambda k, rank=_rank(n): None if k + r - rank == d else k + r - rank)) for n in _tensor_inputs(node)]


_UNIQUE = {"unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}


@sample_rule(*_UNIQUE)
def _unique(node):
    raise node_error(
        SampleMixingError, node,
        f"{op_name(node)} finds the distinct values of the whole batch: which values, how many and their inverse "
        "indices depend on every sample, and its output's size depends on the data",
        "compute the distinct values per sample (e.g. a sort along a non-sample dimension), or compute them "
        "outside the model from data that is not private",
    )


@sample_rule("view_as_real", "view_as_complex")
def _complex_views(node):
    # a trailing dimension of 2 (real, imaginary) is added or removed; the others stay in place
    x = node.args[0]
    return [(x, _identity)]


@sample_rule("select", "unbind")
def _select(node):
    x = node.args[0]
    rank = _rank(x)
    d = int(arguments(node).get("dim", 0)) % rank
    return [(x, lambda k: None if k == d else (k if k < d else k - 1))]


@sample_rule("cat", "concat", "concatenate")
def _cat(node):
    tensors = node.args[0]
    dim = int(arguments(node).get("dim", 0))
    return [(t, _except(dim, rank=_rank(t))) for t in tensors if isinstance(t, Node) and _rank(t) > 0]


@sample_rule("stack")
def _stack(node):
    tensors = node.args[0]
    rank = _rank(tensors[0]) + 1
    d = int(arguments(node).get("dim", 0)) % rank
    return [(t, lambda k: k if k < d else k + 1) for t in tensors]


_REDUCTIONS = {
    "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "var_mean", "std_mean",
    "logsumexp", "prod", "any", "all", "norm", "linalg_vector_norm", "count_nonzero", "nansum", "nanmean", "aminmax",
}


@sample_rule(*_REDUCTIONS)
def _reduction(node):
    if len(node.args) > 1 and isinstance(node.args[1], Node) and isinstance(node.args[1].meta.get("val"), torch.Tensor):
        return _broadcast_rule(node)  # torch.max(a, b), torch.min(a, b): elementwise
    x = node.args[0]
    rank = _rank(x)
    args = arguments(node)
    dims = args.get("dim", None)
    if dims is None or dims == []:
        dims = list(range(rank))  # a full reduction: the output keeps no sample dimension
    dims = {int(d) % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])} if rank else set()
    keep = bool(args.get("keepdim", False))
    kept = [k for k in range(rank) if k not in dims]
    where = {k: (k if keep else kept.index(k)) for k in kept}
    return [(x, where.get)]


# op -> name of the argument(s) naming the dimension(s) it works along
_ALONG = {
    "softmax": "dim", "_softmax": "dim", "log_softmax": "dim", "_log_softmax": "dim", "cumsum": "dim",
    "cumprod": "dim", "logcumsumexp": "dim", "cummax": "dim", "cummin": "dim", "sort": "dim", "argsort": "dim",
    "topk": "dim", "kthvalue": "dim", "median": "dim", "nanmedian": "dim", "mode": "dim", "glu": "dim",
    "flip": "dims", "roll": "dims", "unfold": "dimension",
    "diff": "dim", "_fft_r2c": "dim", "_fft_c2r": "dim", "_fft_c2c": "dim", "fft_fft": "dim", "fft_ifft": "dim",
    "fft_rfft": "dim", "fft_irfft": "dim", "fft_fftn": "dim", "fft_rfftn": "dim", "fft_fft2": "dim",
    "fft_rfft2": "dim", "fft_hfft": "dim", "fft_ihfft": "dim", "special_softmax": "dim", "special_log_softmax": "dim",
    "_weight_norm_interface": "dim", "_safe_softmax": "dim",
}


@sample_rule(*_ALONG)
def _along(node):
    x = node.args[0]
    rank = _rank(x)
    dims = arguments(node).get(_ALONG[op_name(node)])
    if dims is None:
        dims = list(range(rank))  # every dimension (flip/roll without dims, a sort of a flattened view)
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    if not dims:
        dims = list(range(rank))
    return [(x, _except(*[int(d) for d in dims], rank=rank))]


@sample_rule("gather")
def _gather(node):
    x, dim, index = node.args[0], int(node.args[1]), node.args[2]
    out = [(x, _except(dim, rank=_rank(x)))]
    if isinstance(index, Node):
        out.append((index, _identity))
    return out


@sample_rule("index_select")
def _index_select(node):
    x, dim, index = node.args[0], int(node.args[1]) % max(_rank(node.args[0]), 1), node.args[2]
    return [(x, _except(dim, rank=_rank(x))), (index, lambda k: dim)]


@sample_rule("scatter", "scatter_add", "scatter_reduce")
def _scatter(node):
    x, dim = node.args[0], int(node.args[1])
    rank = _rank(x)
    return [(n, _except(dim, rank=rank)) for n in _tensor_inputs(node)]


@sample_rule("mm")
def _mm(node):
    a, b = node.args[:2]
    return [(a, {0: 0}.get), (b, {1: 1}.get)]


@sample_rule("addmm")
def _addmm(node):
    bias, a, b = node.args[:3]
    out = [(a, {0: 0}.get), (b, {1: 1}.get)]
    if isinstance(bias, Node):
        out.append((bias, _aligned(_rank(bias), 2)))
    return out


@sample_rule("bmm")
def _bmm(node):
    a, b = node.args[:2]
    return [(a, {0: 0, 1: 1}.get), (b, {0: 0, 2: 2}.get)]


@sample_rule("baddbmm")
def _baddbmm(node):
    c, a, b = node.args[:3]
    out = [(a, {0: 0, 1: 1}.get), (b, {0: 0, 2: 2}.get)]
    if isinstance(c, Node):
        out.append((c, _aligned(_rank(c), 3)))
    return out


@sample_rule("mv", "addmv", "dot", "vdot", "outer", "ger")
def _vector_products(node):
    name = op_name(node)
    tensors = [a for a in node.args if isinstance(a, Node)]
    if name in ("dot", "vdot"):
        return [(t, lambda k: None) for t in tensors]
    if name in ("outer", "ger"):
        return [(tensors[0], {0: 0}.get), (tensors[1], {0: 1}.get)]
    if name == "mv":
        return [(tensors[0], {0: 0}.get), (tensors[1], lambda k: None)]
    c, m, v = tensors  # addmv
    return [(c, _aligned(_rank(c), 1)), (m, {0: 0}.get), (v, lambda k: None)]


@sample_rule("matmul")
def _matmul(node):
    a, b = node.args[:2]
    ra, rb, r = _rank(a), _rank(b), _out_rank(node)

    def left(k):
        if k == ra - 1:
            return None  # contracted
        if ra >= 2 and k == ra - 2:
            return r - 2 if rb >= 2 else r - 1
        return k + (r - (2 if rb >= 2 else 1)) - (ra - 2)  # batch dimensions, right-aligned

    def right(k):
        if rb == 1 or k == rb - 2:
            return None
        if k == rb - 1:
            return r - 1
        return k + (r - 2) - (rb - 2)

    return [(a, left), (b, right)]


@sample_rule("linear")
def _linear(node):
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    r = _out_rank(node)
    out = [(x, _except(-1, rank=_rank(x))), (w, {0: r - 1}.get if _rank(w) == 2 else (lambda k: None))]
    if isinstance(bias, Node):
        out.append((bias, _aligned(_rank(bias), r)))
    return out


@sample_rule("einsum")
def _einsum(node):
    equation, operands = node.args[0], node.args[1]
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if not arrow:
        letters = "".join(terms).replace("...", "")
        rhs = ("..." if any("..." in t for t in terms) else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    out_rank = _out_rank(node)
    out_ell = out_rank - len(rhs.replace("...", ""))
    out = []
    for term, operand in zip(terms, operands):
        if not isinstance(operand, Node):
            continue
        rank = _rank(operand)
        labels = _einsum_labels(term, rank)
        out_labels = _einsum_labels(rhs, out_rank)
        where = {}
        for k, label in enumerate(labels):
            if isinstance(label, int):  # an ellipsis dimension, counted from the right
                j = out_rank - len(rhs.split("...")[1]) - (rank - len(term.split("...")[1]) - k) if "..." in rhs else None
                where[k] = j if j is not None and out_ell > 0 else None
            else:
                where[k] = out_labels.index(label) if label in out_labels else None
        out.append((operand, where.get))
    return out


def _einsum_labels(term: str, rank: int) -> list:
    if "..." not in term:
        return list(term)
    head, tail = term.split("...")
    n = rank - len(head) - len(tail)
    return list(head) + list(range(n)) + list(tail)


_CONVS = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
          "conv_transpose3d", "cudnn_convolution", "mkldnn_convolution"}


@sample_rule(*_CONVS)
def _conv(node):
    x, w = node.args[:2]
    bias = node.args[2] if len(node.args) > 2 else None
    batched = _rank(x) == _rank(w)  # an unbatched input has no batch dimension: its dim 0 is channels
    out = [(x, {0: 0}.get if batched else (lambda k: None)), (w, lambda k: None)]
    if isinstance(bias, Node):
        out.append((bias, lambda k: None))
    return out


_POOLS = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "max_pool1d_with_indices": 1, "max_pool2d_with_indices": 2,
    "max_pool3d_with_indices": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3, "adaptive_avg_pool1d": 1,
    "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "_adaptive_avg_pool2d": 2, "_adaptive_avg_pool3d": 3,
    "adaptive_max_pool1d": 1, "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "upsample_nearest1d": 1,
    "upsample_nearest2d": 2, "upsample_nearest3d": 3, "upsample_linear1d": 1, "upsample_bilinear2d": 2,
    "upsample_bicubic2d": 2, "upsample_trilinear3d": 3, "_upsample_nearest_exact1d": 1,
    "_upsample_nearest_exact2d": 2, "_upsample_nearest_exact3d": 3, "_upsample_bilinear2d_aa": 2,
    "reflection_pad1d": 1, "reflection_pad2d": 2, "reflection_pad3d": 3, "replication_pad1d": 1,
    "replication_pad2d": 2, "replication_pad3d": 3, "lp_pool1d": 1, "lp_pool2d": 2, "lp_pool3d": 3,
    "fractional_max_pool2d": 2, "pixel_shuffle": 3, "pixel_unshuffle": 3, "channel_shuffle": 3, "im2col": 3,
    "col2im": 2, "grid_sampler_2d": 3,
}


@sample_rule(*_POOLS)
def _pool(node):
    # the op works along the last k dimensions (spatial, and channels where it reshuffles them)
    x = node.args[0]
    rank = _rank(x)
    k = _POOLS[op_name(node)]
    return [(n, (lambda j, rank=_rank(n): None if j >= rank - k else j)) for n in _tensor_inputs(node) if n is x]


@sample_rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _trailing_norm(node):
    x = node.args[0]
    rank = _rank(x)
    k = len(arguments(node).get("normalized_shape", ()))
    others = [n for n in _tensor_inputs(node) if n is not x]  # weight, bias: parameters, aligned to the end
    return [(x, lambda j: None if j >= rank - k else j)] + [(n, lambda j: None) for n in others]


@sample_rule("group_norm", "native_group_norm", "instance_norm")
def _per_sample_norm(node):
    x = node.args[0]
    rank = _rank(x)
    keep = {0} if op_name(node) != "instance_norm" else {0, 1}
    others = [n for n in _tensor_inputs(node) if n is not x]
    return [(x, lambda j: j if j in keep and rank > 1 else None)] + [(n, lambda j: None) for n in others]


_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_with_update", "_batch_norm_impl_index"}


@sample_rule(*_BATCH_NORMS)
def _batch_norm(node):
    if arguments(node).get("training", True) or op_name(node) == "_batch_norm_with_update":
        raise node_error(
            SampleMixingError, node,
            "batch normalisation in training mode normalises with statistics of the whole batch, which mixes samples",
            "use GroupNorm (bkfx.replace_batchnorm(model) swaps every BatchNorm for a GroupNorm in place), "
            "or put the BatchNorm layers in eval mode",
        )
    x = node.args[0]
    return [(x, _identity)] + [(n, lambda j: None) for n in _tensor_inputs(node) if n is not x]


@sample_rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_cudnn_attention")
def _attention(node):
    """out[..., l, :] = softmax(q_l Kᵀ + mask_l) V: the query position l maps to itself, the key
    positions and the head features are attended or contracted over."""
    q, k, v = node.args[:3]
    r = _out_rank(node)
    args = arguments(node)
    mask = args.get("attn_mask", args.get("attn_bias"))

    def batch_dims(rank, keep_last=None):
        def f(j):
            if j < rank - 2:
                return j + r - rank
            return keep_last.get(j - rank) if keep_last else None

        return f

    out = [(q, batch_dims(_rank(q), {-2: r - 2})), (k, batch_dims(_rank(k))), (v, batch_dims(_rank(v), {-1: r - 1}))]
    if isinstance(mask, Node):
        out.append((mask, batch_dims(_rank(mask), {-2: r - 2})))
    return out


@sample_rule("embedding")
def _embedding(node):
    weight, indices = node.args[:2]
    return [(weight, lambda j: None), (indices, _identity)]


_REFUSING = _BATCH_NORMS | _UNIQUE | {"embedding_renorm"}  # ops whose rule may refuse before any shape check


@sample_rule("embedding_renorm")
def _embedding_renorm(node):
    raise node_error(
        SampleMixingError, node,
        "nn.Embedding(max_norm=...) renormalises, in place and during the forward pass, the weight rows of the ids in "
        "the batch: an update of the parameters that depends on the private batch and gets no noise (it reveals "
        "which ids occurred)",
        "drop max_norm, or renormalise the embedding weight yourself after each optimizer step (e.g. with "
        "torch.renorm_ under torch.no_grad()), which uses only the noised parameters",
    )


@sample_rule("index", "_unsafe_index")
def _index(node):
    """`x[i0, i1, ...]` with index tensors broadcast together: the indexed dimensions are replaced
    by the broadcast dimensions (in place when the indexed dimensions are adjacent, else first).
    x's sample dimension may be indexed only by the identity `arange(B)`, sample i reading its own
    row; per-sample index tensors must lay their samples along the same broadcast dimension."""
    x, indices = node.args[0], list(node.args[1])
    rank, r = _rank(x), _out_rank(node)
    indices += [None] * (rank - len(indices))
    indexed = [k for k, i in enumerate(indices) if i is not None]
    R = max(_rank(i) for i in indices if i is not None)
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
        through = start + ilo.dim + R - _rank(ident)
        x_map = lambda k: through if k == sample else (None if k in indexed else position(k))  # noqa: E731
    else:
        x_map = lambda k: None if k in indexed else position(k)  # noqa: E731
    out = [(x, x_map)]
    for i in indices:
        if isinstance(i, Node):
            out.append((i, lambda j, rank_i=_rank(i): start + j + R - rank_i))
    return out


# ---- layout rules: several outputs, samples laid out differently ---------------------------------


def _expect_layouts(node: Node, shapes, expected: list, batch) -> list:
    """`expected` (a layout or None per output) after checking each output's shape against it."""
    for shape, lo in zip(shapes, expected):
        dims = [i for i, s in enumerate(shape or []) if s.has(batch)]
        want = [] if lo is None else [lo.dim]
        if dims != want or (lo is not None and shape[lo.dim] != lo.before * batch * lo.after):
            raise node_error(
                SampleMixingError, node,
                f"{op_name(node)} returns an output of shape {shape} whose sample dimension is not where its inputs' "
                f"samples map ({lo.describe() if lo is not None else 'none'})",
                "operate on each sample separately",
            )
    return expected


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
    bdim = (0 if args["batch_first"] else 1) if _rank(x) == 3 else None  # an unbatched [T, d] input
    maps = [(x, {bdim: bdim}.get if bdim is not None else (lambda k: None))]
    maps += [(h, {1: bdim}.get) for h in (hx if isinstance(hx, (list, tuple)) else [hx]) if isinstance(h, Node)]
    _, before, after = _mapped(node, maps, op_name(node))
    expected = [SampleLayout(bdim, before, after)] + [SampleLayout(1, before, after)] * (len(shapes) - 1)
    return _expect_layouts(node, shapes, expected, batch)


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
    return _expect_layouts(node, shapes, expected, batch)


def _arange_step(node, batch) -> int | None:
    """T when `node` is `arange(0, end, T)` with B entries (an offset every T ids), else None."""
    if not isinstance(node, Node) or op_name(node) != "arange" or shape_of(node) != [batch]:
        return None
    if node.target is aten.arange.default:
        return 1
    args = arguments(node)
    if args.get("start", 0) != 0:
        return None
    step = args.get("step", 1)
    step = step.meta.get("val") if isinstance(step, Node) else step
    return int(step) if isinstance(step, int) or (isinstance(step, torch.SymInt) and sym(step).is_Integer) else None
