"""annotate: find the parametric sites and what each rule contributes.

A node is *parameter-derived* when it depends on trainable parameters and not on
samples (`W`, `W.t()`, `pos[:, :T]`, `wpe(arange(T))`). A *site* is a node with a
parameter-derived operand whose result has a sample dimension (it depends on samples,
or it expands a parameter to the batch, like a class token): the place where a
parameter's per-sample gradient is born. Each operand gets its chain from the parameters (identity,
transpose, or a general sub-graph pulled back with vjp) and its rule's `PieceSpec`
(T, p, d as sympy expressions in the batch symbol). The Site is stored in
`node.meta[META_SITE]`.
"""
from __future__ import annotations

import torch
from torch.fx import Graph, GraphModule, Node

from bkfx._ir.layout import SampleLayout
from bkfx._ir.meta import META_BATCH, META_DEPENDENT, META_LAYOUT, META_PARAMS, META_SITE, META_SITES
from bkfx._ir.node import attribute, op_name, shape_of
from bkfx._ir.plan import Operand, Site
from bkfx._ir.source import module_path, user_source_line
from bkfx.errors import UnsupportedOperationError, node_error
from bkfx.rules import FALLBACK, lookup

__all__ = ["annotate"]

_TRANSPOSES = {"t", "numpy_T"}


def annotate(gm: GraphModule, names: dict[int, str]) -> GraphModule:
    """`names` maps id(Parameter) to the original model's name for it (tied ones share)."""
    batch = gm.meta[META_BATCH]
    sites: list[Site] = []
    for node in gm.graph.nodes:
        node.meta[META_PARAMS] = _params_of(gm, node, names)
        if node.op == "call_function" and _has_sample_dim(node.meta.get(META_LAYOUT)):
            operands = _param_operands(node)
            if operands:
                site = _site(gm, node, operands, len(sites), batch)
                node.meta[META_SITE] = site
                node.meta[META_PARAMS] = frozenset()  # its parameters' gradients are the site's
                sites.append(site)
        elif node.op == "output":
            for value in node.all_input_nodes:
                if value.meta.get(META_PARAMS) and not value.meta.get(META_DEPENDENT):
                    raise node_error(
                        UnsupportedOperationError, value,
                        "a value computed from parameters alone is a model output, so it has no per-sample gradient",
                        "return only values computed from the inputs",
                    )
    gm.meta[META_SITES] = sites
    return gm


def _has_sample_dim(layout) -> bool:
    if isinstance(layout, tuple):
        return any(isinstance(x, SampleLayout) for x in layout)
    return isinstance(layout, SampleLayout)


def _params_of(gm: GraphModule, node: Node, names) -> frozenset:
    if node.op == "get_attr":
        value = attribute(gm, node.target)
        if isinstance(value, torch.nn.Parameter) and value.requires_grad:
            return frozenset([names[id(value)]])
        return frozenset()
    if node.meta.get(META_DEPENDENT) or _carries_no_gradient(node):
        return frozenset()
    out = frozenset()
    for n in node.all_input_nodes:
        out |= n.meta.get(META_PARAMS, frozenset())
    return out


_NO_GRAD_REGION = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _carries_no_gradient(node: Node) -> bool:
    """A value no gradient flows through to the parameters: a `torch.no_grad()` region's outputs
    (spectral norm's power iteration) and detached values. For a site it is a constant, so a
    parameter's chain takes it as a leaf computed in the forward pass instead of running the
    region again in the backward pass, where a region that updates buffers (u and v) would
    update them a second time and pull back through the updated values."""
    if node.op != "call_function":
        return False
    if _NO_GRAD_REGION is not None and node.target is _NO_GRAD_REGION:
        return node.args[0] is False
    return op_name(node) == "detach"


def _param_operands(node: Node) -> list[tuple[tuple, Node]]:
    found = []
    for i, arg in enumerate(node.args):
        items = [((i,), arg)] if not isinstance(arg, (list, tuple)) else [((i, k), a) for k, a in enumerate(arg)]
        for path, a in items:
            if isinstance(a, Node) and a.meta.get(META_PARAMS) and not a.meta.get(META_DEPENDENT):
                found.append((path, a))
    for key, a in node.kwargs.items():
        if isinstance(a, Node) and a.meta.get(META_PARAMS):
            raise node_error(
                UnsupportedOperationError, node, f"the parameter-derived keyword argument {key!r} is not supported",
                "pass parameters positionally",
            )
    return found


def _layouts(node: Node) -> dict[tuple, SampleLayout]:
    out = {}
    for i, arg in enumerate(node.args):
        items = [((i,), arg)] if not isinstance(arg, (list, tuple)) else [((i, k), a) for k, a in enumerate(arg)]
        for path, a in items:
            if isinstance(a, Node) and isinstance(a.meta.get(META_LAYOUT), SampleLayout):
                out[path] = a.meta[META_LAYOUT]
    return out


def _site(gm, node: Node, operands, index: int, batch) -> Site:
    """With several outputs (an RNN, an embedding bag), `out_layouts` holds each one's layout and
    `out_layout` the first one's with a sample dimension; the rules get a tuple of output gradients."""
    out_layouts = node.meta[META_LAYOUT]
    several = isinstance(out_layouts, tuple)
    out_layout = next(lo for lo in out_layouts if isinstance(lo, SampleLayout)) if several else out_layouts
    layouts = _layouts(node)
    rule = lookup(op_name(node))
    built = []
    for path, operand in operands:
        if operand.meta.get(META_LAYOUT) is not None:
            raise node_error(
                UnsupportedOperationError, node,
                "a parameter-derived operand was expanded to the batch size before this operation",
                "broadcast parameters implicitly instead of expanding them to the batch",
            )
        used = rule
        spec = rule.spec(node, path, batch) if rule is not None else None
        if spec is None:
            used, spec = FALLBACK, FALLBACK.spec(node, path, batch, layouts, out_layouts)
        built.append(_operand(gm, path, operand, spec, used))
    return Site(
        id=index, node=node.name, op=node.target, source=user_source_line(node), module=module_path(node),
        operands=built, layouts=layouts, out_layout=out_layout, out_layouts=out_layouts if several else None,
    )


def _operand(gm, path, node: Node, spec, rule) -> Operand:
    params = tuple(sorted(node.meta[META_PARAMS]))
    if node.op == "get_attr":
        return Operand(path, params, "identity", spec=spec, rule=rule)
    if (
        node.op == "call_function" and node.args and isinstance(node.args[0], Node) and node.args[0].op == "get_attr"
        and len(shape_of(node.args[0])) == 2 and _is_transpose(node)
    ):
        return Operand(path, params, "transpose", spec=spec, rule=rule)
    fn, leaves, param_idx = _chain(gm, node)
    return Operand(
        path, params, "general", chain_fn=fn, chain_leaves=leaves, chain_params=param_idx, spec=spec, rule=rule
    )


def _is_transpose(node: Node) -> bool:
    name = op_name(node)
    if name in _TRANSPOSES:
        return True
    if name == "transpose":
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    if name == "permute":
        return [int(d) % 2 for d in node.args[1]] == [1, 0]
    return False


def _chain(gm, operand: Node):
    """The parameter-only sub-graph computing `operand`, as a function of its leaves."""
    inside, leaves = [], []
    seen = set()

    def visit(n: Node):
        if n in seen:
            return
        seen.add(n)
        if n.op == "get_attr" or not n.meta.get(META_PARAMS):
            leaves.append(n)
            return
        for m in n.all_input_nodes:
            visit(m)
        inside.append(n)

    visit(operand)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside.sort(key=order.__getitem__)
    graph = Graph()
    env = {leaf: graph.placeholder(leaf.name) for leaf in leaves}
    for n in inside:
        env[n] = graph.node_copy(n, lambda m: env[m])
    graph.output(env[operand])
    fn = GraphModule(torch.nn.Module(), graph)
    param_idx = tuple(i for i, leaf in enumerate(leaves) if leaf.meta.get(META_PARAMS))
    return fn, tuple(leaf.name for leaf in leaves), param_idx
