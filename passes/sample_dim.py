"""sample_dim: where the sample dimension is in every node, and proof that no op mixes samples.

A node is *sample-dependent* when its value depends on the data of a batched input
(shape-only uses such as `sym_size`, and value-free ops such as `zeros_like`, do not
count). For every tensor node with a dimension whose size involves the batch symbol B,
the pass records its `SampleLayout` under `node.meta[META_LAYOUT]`.

Fail closed: a sample-dependent node is accepted only when a *sample rule* proves how its
op maps the sample dimension, the way `torch.func.vmap` needs a batching rule per op. The
rules live beside the gradient rules, in the module of their op's family under `bkfx/rules/`
(views and reshapes in `shape.py`, reductions in `reduction.py`, contractions in `linear.py`,
...), registered in `bkfx.rules.sample`, which states the kinds of rule; this pass looks them
up by op name. A *dimension map* says, for each tensor input, where each of its dimensions
goes in the output, or `None` when the op works along that dimension (reduces, contracts,
sorts, pools, normalises or attends over it). The shared check (`check_maps`) then requires
every sample-dependent input's sample dimension to map to one output dimension, all inputs to
agree on it and on how samples are laid out in it (`SampleLayout.before/after`), and the pass
requires that dimension to keep its size. Reshapes move the sample dimension by its stride;
elementwise ops (every op tagged `torch.Tag.pointwise`, casts, dropout, ...) broadcast.
Indexing (`aten.index`) along the sample dimension is accepted only by the identity
`arange(B)` (how Hugging Face builds masks from a padding attention_mask): this pass marks
the values proven to equal their own sample index with `META_IDENTITY`.

Ops with several outputs whose samples lie in different places (an RNN's output and its final
hidden states, an embedding bag's bags and its flat ids) have a *layout rule* instead, which
proves separability and gives each output's layout.

A sample-dependent op with no rule is marked `META_PROBE`: `passes.probe` checks it
numerically at capture, for every ordered pair of samples (perturbing sample i must leave
sample j's output unchanged), and refuses it if it mixes or cannot be run. A region of the
forward under `torch.no_grad()` or `torch.autocast` (a higher-order op with a subgraph) is
not one opaque op: the rules run inside its subgraph. Whatever mixes is refused with
`SampleMixingError`, naming the node, the op and the user's source line.
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import GraphModule, Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_BATCH, META_BATCH_DIMS, META_DEPENDENT, META_IDENTITY, META_LAYOUT, META_PROBE
from bkfx._ir.node import arguments, op_name, shape_of, sym
from bkfx.errors import SampleMixingError, node_error
from bkfx.rules.sample import LAYOUT, RESHAPE, VALUE_FREE, check_maps, dimension_map, find_sample_rule

__all__ = ["aten", "sample_dim", "probed_nodes"]

aten = torch.ops.aten


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
            dependent = not _value_free(node) and any(n.meta.get(META_DEPENDENT) for n in node.all_input_nodes)
            node.meta[META_DEPENDENT] = dependent
            node.meta[META_LAYOUT] = _layout(node, batch, dependent)
            node.meta[META_IDENTITY] = not dependent and _is_identity(node, batch)
        else:
            node.meta[META_DEPENDENT] = False
            node.meta[META_LAYOUT] = None


def _value_free(node: Node) -> bool:
    """An op whose value depends on its inputs' shapes, dtypes and devices only (`zeros_like`, `sym_size`)."""
    rule = find_sample_rule(op_name(node))
    return rule is not None and rule.kind == VALUE_FREE


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
    rule = find_sample_rule(op_name(node))
    if rule is not None and rule.kind == RESHAPE and sources:
        try:
            return rule.fn(node, sources[0], shape, dims[0], batch)
        except SampleMixingError:
            return None
    return None


def _dependent_layouts(node: Node, outputs: list, batch) -> list:
    shapes = [[sym(s) for s in v.shape] if isinstance(v, torch.Tensor) else None for v in outputs]
    name = op_name(node)
    registered = find_sample_rule(name)
    kind = registered.kind if registered is not None else None
    rule = dimension_map(node)
    if registered is not None and registered.refuses:
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
    if kind == LAYOUT:
        return registered.fn(node, shapes, batch)
    if kind == RESHAPE:
        dep = [n for n in node.all_input_nodes if n.meta.get(META_DEPENDENT)]
        src = node.args[0] if node.args[0] in dep else dep[0]
        (d,) = [i for i, s in enumerate(shapes[0]) if s.has(batch)]
        return [registered.fn(node, (src, src.meta[META_LAYOUT]), shapes[0], d, batch)]
    if rule is None:
        node.meta[META_PROBE] = True
        return [_matched_layout(node, shape, batch) if shape is not None else None for shape in shapes]
    maps = rule(node)
    dim, before, after = check_maps(node, maps, name)
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
