"""The generic fallback: explicit per-sample gradients of any sample-separable op.

`G_i = vjp(P ↦ op(..., x_i, ..., P), P)(g_i)`, vectorised over samples with
`torch.func.vmap`: each sample's arguments keep a batch dimension of size 1, so the op
sees the shapes it expects. Arguments whose sizes name the batch (e.g. a view to
`[B, ...]`) cannot be split per sample and are refused when the site is planned.
"""
from __future__ import annotations

import torch
from torch.func import vjp, vmap

from bkfx.errors import UnsupportedOperationError, node_error
from bkfx.factors import Explicit
from bkfx.node import shape_of
from bkfx.plan import get_path, set_path
from bkfx.rules import explicit_spec


class Fallback:
    name = "Fallback"

    @staticmethod
    def spec(node, path, batch, layouts, out_layout):
        for layout in [*layouts.values(), out_layout]:
            if layout.merged:
                raise node_error(
                    UnsupportedOperationError, node,
                    "no rule knows this operation, and the generic fallback needs a plain sample dimension, "
                    f"not a merged one ({layout.describe()})",
                    "apply the operation before merging the batch with other dimensions",
                )
        if _names_batch(node.args, batch) or _names_batch(node.kwargs, batch):
            raise node_error(
                UnsupportedOperationError, node,
                "no rule knows this operation, and its arguments name the batch size, so it cannot run per sample",
                "pass sizes as -1 or compute them from the tensor inside the operation",
            )
        return explicit_spec(shape_of(get_path(node.args, path)), batch)

    @staticmethod
    def piece(call, path):
        paths = list(call.layouts)
        samples = [get_path(call.args, p) for p in paths]
        dims = [call.layouts[p].dim for p in paths]
        param = get_path(call.args, path)
        if call.batch == 0:
            return Explicit(param.new_zeros(0, *param.shape))

        def per_sample(g_i, *xs):
            def f(p):
                args = set_path(call.args, path, p)
                for q, x, d in zip(paths, xs, dims):
                    args = set_path(args, q, x.unsqueeze(d))
                return call.op(*args, **call.kwargs)

            _, pullback = vjp(f, param)
            return pullback(g_i.unsqueeze(call.out_layout.dim))[0]

        G = vmap(per_sample, in_dims=(call.out_layout.dim, *dims))(call.g, *samples)
        return Explicit(G)


def _names_batch(args, batch) -> bool:
    found = []

    def visit(a):
        a = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(a, torch.SymInt) and a.node.expr.has(batch):
            found.append(a)
        return a

    torch.fx.node.map_aggregate(args, visit)
    return bool(found)
