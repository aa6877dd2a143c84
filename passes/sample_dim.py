"""sample_dim: where the sample dimension is in every node, and proof that no op mixes samples.

A node is *sample-dependent* when its value depends on the data of a batched input
(shape-only uses such as `sym_size` do not count). For every tensor node with a
dimension whose size involves the batch symbol B, the pass records its
`SampleLayout` under `node.meta["bkfx.layout"]`:

- reshape-like ops (view, reshape, flatten, ...) move the sample dimension by the
  flat-index argument: sample i's stride `s = after * prod(sizes after the dim)` must
  be a multiple of the output dimension's inner size `q`, giving `after' = s / q`;
- every other op keeps an input's layout on the output dimension of the same size.

A sample-dependent node is refused (`SampleMixingError`, with node and source line)
when its output lost the sample dimension (a reduction over samples), has it twice,
has it with a size no input has (cat along samples), or when the op works along the
sample dimension (softmax, cumsum, sort, gather, indexing, contraction, ...).
"""
from __future__ import annotations

import operator

import sympy
import torch
from torch.fx import GraphModule, Node

from bkfx.errors import SampleMixingError, UnsupportedOperationError, node_error
from bkfx.layout import SampleLayout
from passes.capture import META_BATCH

META_DEPENDENT = "bkfx.sample_dependent"
META_LAYOUT = "bkfx.layout"

aten = torch.ops.aten

_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as"}
# op name -> names of its arguments that name dimensions it works along
_ALONG = {
    "softmax": ("dim",), "_softmax": ("dim",), "log_softmax": ("dim",), "_log_softmax": ("dim",),
    "cumsum": ("dim",), "cumprod": ("dim",), "logcumsumexp": ("dim",), "cummax": ("dim",), "cummin": ("dim",),
    "sort": ("dim",), "argsort": ("dim",), "topk": ("dim",), "kthvalue": ("dim",), "msort": (),
    "flip": ("dims",), "roll": ("dims",), "gather": ("dim",), "scatter": ("dim",), "scatter_add": ("dim",),
    "scatter_reduce": ("dim",), "index_select": ("dim",), "index_add": ("dim",), "index_copy": ("dim",),
    "index_fill": ("dim",), "diff": ("dim",), "narrow": ("dim",), "unfold": ("dimension",), "renorm": ("dim",),
    "median": ("dim",), "nanmedian": ("dim",), "mode": ("dim",), "cross": ("dim",), "linalg_cross": ("dim",),
    "glu": ("dim",), "repeat_interleave": ("dim",),
}
# contractions: op name -> for each operand position, the dimension it contracts
_CONTRACTS = {
    "mm": {0: 1, 1: 0}, "addmm": {1: 1, 2: 0}, "bmm": {0: 2, 1: 1}, "baddbmm": {1: 2, 2: 1},
    "matmul": {0: -1, 1: -2}, "linear": {0: -1, 1: -1}, "dot": {0: 0, 1: 0}, "mv": {0: 1, 1: 0},
    "addmv": {1: 1, 2: 0}, "outer": {}, "vdot": {0: 0, 1: 0},
}


def sym(x) -> sympy.Expr:
    return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))


def shape_of(node: Node) -> list[sympy.Expr] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return [sym(s) for s in val.shape] if isinstance(val, torch.Tensor) else None


def op_name(node: Node) -> str:
    return target_name(node.target)


def target_name(target) -> str:
    """An ATen op's name without overload or in-place suffix: `aten.add_.Tensor` -> "add"."""
    packet = getattr(target, "overloadpacket", None)
    return (packet.__name__ if packet is not None else getattr(target, "__name__", str(target))).rstrip("_")


def arguments(node: Node) -> dict:
    """The node's arguments by schema name, defaults filled in."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def sample_dim(gm: GraphModule) -> GraphModule:
    """Write META_DEPENDENT and META_LAYOUT on every node; raise on ops that mix samples."""
    batch = gm.meta[META_BATCH]
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = shape_of(node)
            dependent = bool(shape) and shape[0].has(batch)
            node.meta[META_DEPENDENT] = dependent
            node.meta[META_LAYOUT] = SampleLayout(0) if dependent else None
        elif node.op in ("call_function", "call_method", "call_module"):
            inputs = [n for n in node.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor) or isinstance(n.meta.get("val"), (list, tuple))]
            dependent = any(n.meta.get(META_DEPENDENT) for n in inputs) and node.target is not aten.sym_size.int
            node.meta[META_DEPENDENT] = dependent
            node.meta[META_LAYOUT] = _layout(node, batch, dependent)
        else:
            node.meta[META_DEPENDENT] = False
            node.meta[META_LAYOUT] = None
    return gm


def _layout(node: Node, batch: sympy.Symbol, dependent: bool):
    val = node.meta.get("val")
    if node.target is operator.getitem:
        parent, index = node.args
        layouts = parent.meta.get(META_LAYOUT)
        return layouts[index] if isinstance(layouts, tuple) else None
    if isinstance(val, (list, tuple)):
        return tuple(_tensor_layout(node, v, batch, dependent) if isinstance(v, torch.Tensor) else None for v in val)
    if not isinstance(val, torch.Tensor):
        return None
    return _tensor_layout(node, val, batch, dependent)


def _tensor_layout(node: Node, val: torch.Tensor, batch, dependent: bool) -> SampleLayout | None:
    shape = [sym(s) for s in val.shape]
    dims = [i for i, s in enumerate(shape) if s.has(batch)]
    sources = [(n, n.meta[META_LAYOUT]) for n in node.all_input_nodes if isinstance(n.meta.get(META_LAYOUT), SampleLayout)]
    sources.sort(key=lambda s: not s[0].meta.get(META_DEPENDENT))  # sample-dependent inputs first
    dep_sources = [(n, l) for n, l in sources if n.meta.get(META_DEPENDENT)]
    if not dependent:
        # values that do not depend on samples (masks expanded to B) cannot mix them
        if len(dims) == 1 and shape[dims[0]] == batch:
            return SampleLayout(dims[0])
        if len(dims) == 1 and op_name(node) in _RESHAPES and sources:
            try:
                return _reshape_layout(node, sources[0], shape, dims[0], batch)
            except SampleMixingError:
                return None
        return None
    if not dims:
        raise node_error(
            SampleMixingError, node,
            "this operation reduces over the sample dimension, so its result mixes samples",
            "reduce over other dimensions only; compute the loss outside the model (bkfx applies the "
            "declared loss_reduction), and use per-sample normalisation (GroupNorm/LayerNorm) instead of batch statistics",
        )
    if len(dims) > 1:
        raise node_error(
            SampleMixingError, node,
            f"the result has the sample dimension twice (dims {dims}), so it pairs different samples",
            "keep each sample's computation separate: no products or comparisons between samples",
        )
    (d,) = dims
    name = op_name(node)
    if name in _RESHAPES:
        src = next(((n, l) for n, l in dep_sources if n is node.args[0]), dep_sources[0])
        layout = _reshape_layout(node, src, shape, d, batch)
    else:
        matches = [l for n, l in sources if shape_of(n)[l.dim] == shape[d]]
        if not matches:
            raise node_error(
                SampleMixingError, node,
                f"the sample dimension changed size to {shape[d]} (concatenation, slicing or repetition across samples)",
                "operate on each sample separately; concatenate or slice along other dimensions",
            )
        layout = SampleLayout(d, matches[0].before, matches[0].after)
    _check_along(node, name, batch)
    return layout


def _reshape_layout(node: Node, source, shape, d: int, batch) -> SampleLayout:
    src_node, src = source
    src_shape = shape_of(src_node)
    stride = src.after * sympy.prod(src_shape[src.dim + 1 :])
    inner = sympy.prod(shape[d + 1 :])
    after = sympy.cancel(stride / inner)
    before = sympy.cancel(shape[d] / (batch * after)) if after.is_Integer and after > 0 else None
    if before is None or not before.is_Integer or before < 1:
        raise node_error(
            SampleMixingError, node,
            f"this reshape splits the sample dimension across dimensions (from {src_shape} to {shape})",
            "reshape so that each sample's entries stay together in one dimension",
        )
    return SampleLayout(d, int(before), int(after))


_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
                "cudnn_batch_norm", "miopen_batch_norm"}
_PER_SAMPLE_NORMS = {"group_norm", "native_group_norm", "instance_norm"}
_TRAILING_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"}


def _check_along(node: Node, name: str, batch) -> None:
    """Refuse ops that work along, index into or contract the sample dimension of an input."""
    args = arguments(node)
    first = node.args[0] if node.args else None
    layout = first.meta.get(META_LAYOUT) if isinstance(first, Node) and first.meta.get(META_DEPENDENT) else None
    if name in _BATCH_NORMS and args.get("training", True) and isinstance(layout, SampleLayout):
        raise node_error(
            SampleMixingError, node,
            "batch normalisation in training mode normalises with statistics of the whole batch, which mixes samples",
            "use GroupNorm (bkfx.replace_batchnorm(model) swaps every BatchNorm for a GroupNorm in place), "
            "or put the BatchNorm layers in eval mode",
        )
    if name in _PER_SAMPLE_NORMS and isinstance(layout, SampleLayout) and (layout.dim != 0 or layout.merged):
        raise node_error(
            SampleMixingError, node, f"{name} normalises over dimension 1 onwards, but the samples lie along {layout.describe()}",
            "put the batch first before normalising",
        )
    if name in _TRAILING_NORMS and isinstance(layout, SampleLayout):
        rank = len(shape_of(first))
        if layout.dim >= rank - len(args.get("normalized_shape", ())):
            raise node_error(
                SampleMixingError, node, f"{name} normalises over dimensions that include the samples ({layout.describe()})",
                "normalise over feature dimensions only",
            )
    if name in _ALONG and isinstance(layout, SampleLayout):
        rank = len(shape_of(first))
        for key in _ALONG[name]:
            dims = args.get(key)
            if dims is None:
                continue
            dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
            if (not dims and name in ("roll", "flip")) or any(int(x) % rank == layout.dim for x in dims):
                raise node_error(
                    SampleMixingError, node,
                    f"{name} works along the sample dimension ({layout.describe()}), so samples influence each other",
                    f"apply {name} along a non-sample dimension",
                )
        if name == "msort" and layout.dim == 0:
            raise node_error(SampleMixingError, node, "msort sorts along the sample dimension", "sort along another dimension")
    if name in ("slice", "select") and isinstance(layout, SampleLayout):
        dim = int(args.get("dim", 0)) % len(shape_of(first))
        if dim == layout.dim and shape_of(node)[dim] != shape_of(first)[dim]:
            raise node_error(SampleMixingError, node, f"{name} picks some samples of the batch", "slice other dimensions only")
    if name in ("index", "index_put", "_index_put_impl", "_unsafe_index") and isinstance(layout, SampleLayout):
        indices = args.get("indices") or []
        if layout.dim < len(indices) and indices[layout.dim] is not None:
            raise node_error(
                SampleMixingError, node, "this indexing selects along the sample dimension, so samples can be swapped or mixed",
                "index other dimensions only (e.g. x[:, idx])",
            )
    if name in _CONTRACTS:
        for pos, cdim in _CONTRACTS[name].items():
            operand = node.args[pos] if pos < len(node.args) else None
            if isinstance(operand, Node) and operand.meta.get(META_DEPENDENT):
                lo = operand.meta.get(META_LAYOUT)
                rank = len(shape_of(operand))
                if isinstance(lo, SampleLayout) and cdim % rank == lo.dim:
                    raise node_error(
                        SampleMixingError, node, f"{name} contracts the sample dimension of an operand, summing over samples",
                        "contract feature dimensions only; keep the batch as a batch dimension",
                    )
    if name == "einsum":
        equation, operands = node.args[0], node.args[1]
        lhs, _, rhs = equation.replace(" ", "").partition("->")
        for letters, operand in zip(lhs.split(","), operands):
            lo = operand.meta.get(META_LAYOUT) if isinstance(operand, Node) and operand.meta.get(META_DEPENDENT) else None
            if isinstance(lo, SampleLayout) and "..." not in letters and letters[lo.dim] not in rhs:
                raise node_error(
                    SampleMixingError, node, "einsum sums over the sample dimension of an operand",
                    "keep the batch index in the einsum output",
                )
