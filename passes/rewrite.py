"""rewrite: every parametric site becomes a call of the BK operation the caller hands in
(`site_op`; `bkfx.compile` hands in the runtime's `bkfx._runtime.ops.site`).

`aten.linear(x, W, b)` at site 3 becomes `bkfx._runtime.ops.site(aten.linear, 3, x, W, b)`, so
`print(dp_model.code)` reads like the original program with BK calls in place. An
operand computed from parameters by a general sub-graph passes that sub-graph's
leaves as `_chain={"path": (leaves...)}` for the backward pull-back.
"""
from __future__ import annotations

from torch.fx import GraphModule

from bkfx._ir.meta import META_SITE

__all__ = ["rewrite"]


def rewrite(gm: GraphModule, site_op) -> GraphModule:
    """Re-target every site node to `site_op(original_op, site_id, *args, **kwargs)`; the caller
    hands in the runtime's operation (`bkfx._runtime.ops.site`), so the compiler imports no runtime."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    for node in list(graph.nodes):
        site = node.meta.get(META_SITE)
        if site is None:
            continue
        chains = {
            ",".join(map(str, o.path)): tuple(by_name[leaf] for leaf in o.chain_leaves)
            for o in site.operands
            if o.chain == "general"
        }
        kwargs = dict(node.kwargs)
        if chains:
            kwargs["_chain"] = chains
        node.args = (node.target, site.id, *node.args)
        node.kwargs = kwargs
        node.target = site_op
    graph.lint()
    gm.recompile()
    return gm
