"""The generic fallback: explicit per-sample gradients of any sample-separable op.

`G_i = vjp(P ↦ op(..., x_i, ..., P), P)(g_i)`, vectorised over samples with
`torch.func.vmap`: each sample's arguments keep a batch dimension of size 1 (or, where the
batch is merged with other dimensions, as Swin's windows are, `before * after` entries), so
the op sees the shapes it expects. Every parameter operand the fallback serves at a site is pulled
back in the same vjp (an LSTM's weights and biases: one per-sample backward, not one each).
An op with several outputs (an RNN's output and final states) is pulled back from the
gradients of those outputs that received one. Arguments whose sizes name the batch (e.g. a
view to `[B, ...]`) cannot be split per sample and are refused when the site is planned, and
so is an op that draws random numbers (RNN dropout between layers): re-run per sample, it
would draw others than the forward pass did.

A parameter operand whose size names the batch (DeBERTa's relative-position keys, repeated to
`[B * heads, ...]` to meet the queries in one bmm) cannot go with one sample's arguments: called
on them (on meta tensors, at no cost), the op does not give one sample's output shape. Then
`G_i = vjp(P ↦ op(x, P), P)(g ⊙ 1_i)`: the whole call's pullback of the output gradient with
every sample but i zeroed, exact for any op, at the cost of B pullbacks of the whole call.
"""
from __future__ import annotations

import torch
from torch.func import vjp, vmap

from bkfx._ir.node import arguments, shape_of
from bkfx._ir.plan import get_path, set_path
from bkfx._torch import pytree
from bkfx.errors import UnsupportedOperationError, node_error
from bkfx.rules.factors import Explicit
from bkfx.rules.registry import explicit_spec

__all__ = ["Fallback"]


class Fallback:
    name = "Fallback"

    @staticmethod
    def spec(node, path, batch, layouts, out_layout):
        outs = _float_outputs(node, out_layout)
        if any(layout is None for layout in outs):
            raise node_error(
                UnsupportedOperationError, node,
                "no rule knows this operation, and one of its outputs has no sample dimension, so the generic "
                "fallback cannot split its gradient per sample",
                "compute that output outside the operation, from per-sample values",
            )
        if _names_batch(node.args, batch) or _names_batch(node.kwargs, batch):
            raise node_error(
                UnsupportedOperationError, node,
                "no rule knows this operation, and its arguments name the batch size, so it cannot run per sample",
                "pass sizes as -1 or compute them from the tensor inside the operation",
            )
        if _draws_random_numbers(node):
            raise node_error(
                UnsupportedOperationError, node,
                "this operation draws random numbers (dropout between an RNN's layers), and the generic fallback "
                "re-runs it per sample in backward, where it would draw other numbers than the forward pass",
                "set dropout=0 and apply nn.Dropout between single-layer RNNs instead (or use eval mode)",
            )
        return explicit_spec(shape_of(get_path(node.args, path)), batch)

    @staticmethod
    def piece(call, path):
        if path not in call.cache:
            paths = call.fallback_paths if path in call.fallback_paths else (path,)
            call.cache.update(_pull_back(call, paths))
        return call.cache.pop(path)


def _pull_back(call, paths) -> dict:
    """`{path: Explicit([B, *param.shape])}` for these parameter operands, in one vmap of one vjp."""
    several = isinstance(call.g, tuple)
    gs = call.g if several else (call.g,)
    out_layouts = call.out_layout if several else (call.out_layout,)
    used = [k for k, g in enumerate(gs) if g is not None]
    params = [get_path(call.args, p) for p in paths]
    if call.batch == 0 or not used:
        return {p: Explicit(w.new_zeros(call.batch, *w.shape)) for p, w in zip(paths, params)}
    sample_paths = list(call.layouts)
    in_layouts = [call.layouts[p] for p in sample_paths]
    used_layouts = [out_layouts[k] for k in used]
    if not _runs_per_sample(call, [(p, call.layouts[p]) for p in sample_paths], [(gs[k], lo) for k, lo in zip(used, used_layouts)]):
        return _pull_back_whole_call(call, paths, params, [gs[k] for k in used], used_layouts, used if several else None)
    samples, dims = zip(*[_split(get_path(call.args, p), lo) for p, lo in zip(sample_paths, in_layouts)]) \
        if sample_paths else ((), ())
    cotangents_in, out_dims = zip(*[_split(gs[k], lo) for k, lo in zip(used, used_layouts)])

    def per_sample(g_i, xs):
        def f(*ps):
            args = call.args
            for p, w in zip(paths, ps):
                args = set_path(args, p, w)
            for q, x, lo in zip(sample_paths, xs, in_layouts):
                args = set_path(args, q, _join(x, lo))
            out = call.op(*args, **call.kwargs)
            return tuple(out[k] for k in used) if several else out

        _, pullback = vjp(f, *params)
        cotangents = tuple(_join(g, lo) for g, lo in zip(g_i, used_layouts))
        return pullback(cotangents if several else cotangents[0])

    grads = vmap(per_sample, in_dims=(tuple(out_dims), tuple(dims)))(tuple(cotangents_in), tuple(samples))
    return {p: Explicit(G) for p, G in zip(paths, grads)}


def _runs_per_sample(call, inputs, outputs) -> bool:
    """Whether the op, called on one sample's arguments (meta tensors), gives one sample's outputs'
    shapes; not when a parameter operand's size names the batch."""
    def one_sample(t, layout):
        part, d = _split(t.to("meta"), layout)
        return _join(part.select(d, 0), layout)

    args = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call.args)
    kwargs = pytree.tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, call.kwargs)
    for path, layout in inputs:
        args = set_path(args, path, one_sample(get_path(call.args, path), layout))
    try:
        out = call.op(*args, **kwargs)
    except (RuntimeError, NotImplementedError):  # mismatched sizes, or no meta kernel: the whole call is exact
        return False
    outs = out if isinstance(call.g, tuple) else (out,)
    expected = [one_sample(g, lo).shape for g, lo in outputs]
    got = [o.shape for o, g in zip(outs, call.g if isinstance(call.g, tuple) else (call.g,)) if g is not None]
    return got == expected


def _pull_back_whole_call(call, paths, params, gs, layouts, used) -> dict:
    """`G_i = vjp(P ↦ op(x, P), P)(g ⊙ 1_i)` for each sample i, vectorised over i."""
    def f(*ps):
        args = call.args
        for p, w in zip(paths, ps):
            args = set_path(args, p, w)
        out = call.op(*args, **call.kwargs)
        return tuple(out[k] for k in used) if used is not None else out

    _, pullback = vjp(f, *params)
    masked = [_each_sample_alone(g, lo, call.batch) for g, lo in zip(gs, layouts)]
    grads = vmap(lambda *c: pullback(c if used is not None else c[0]))(*masked)
    return {p: Explicit(G) for p, G in zip(paths, grads)}


def _each_sample_alone(g: torch.Tensor, layout, batch: int) -> torch.Tensor:
    """`[B, *g.shape]`: entry i is `g` with every sample but i zeroed."""
    part, d = _split(g, layout)
    eye = torch.eye(batch, dtype=g.dtype, device=g.device)
    return (part.unsqueeze(0) * eye.view(batch, *[batch if k == d else 1 for k in range(part.dim())])).reshape(batch, *g.shape)


def _split(t: torch.Tensor, layout):
    """`t` with its samples along a dimension of their own, and that dimension: a merged sample
    dimension `before * B * after` (Swin's `B * windows`) is viewed as `(before, B, after)`."""
    if not layout.merged:
        return t, layout.dim
    d = layout.dim
    batch = t.shape[d] // (layout.before * layout.after)
    return t.reshape(*t.shape[:d], layout.before, batch, layout.after, *t.shape[d + 1 :]), d + 1


def _join(x: torch.Tensor, layout) -> torch.Tensor:
    """One sample's slice (vmap removed its sample dimension) in the shape the op takes: a batch
    of one, or for a merged layout its `before * after` entries side by side again."""
    if not layout.merged:
        return x.unsqueeze(layout.dim)
    d = layout.dim
    return x.reshape(*x.shape[:d], layout.before * layout.after, *x.shape[d + 2 :])


def _float_outputs(node, out_layout) -> list:
    """The layouts of the outputs that can carry gradients (floating point ones)."""
    if not isinstance(out_layout, tuple):
        return [out_layout]
    vals = node.meta.get("val")
    return [lo for lo, v in zip(out_layout, vals) if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _draws_random_numbers(node) -> bool:
    """A random op (tagged nondeterministic_seeded) unless its arguments turn the randomness off
    (an RNN's dropout 0 or train False, attention's dropout_p 0)."""
    if torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    args = arguments(node)
    off = any(args.get(name, None) == 0 for name in ("dropout", "dropout_p", "p"))
    return not (off or args.get("train", None) is False)


def _names_batch(args, batch) -> bool:
    found = []

    def visit(a):
        a = a.meta.get("val") if isinstance(a, torch.fx.Node) else a
        if isinstance(a, torch.SymInt) and a.node.expr.has(batch):
            found.append(a)
        return a

    torch.fx.node.map_aggregate(args, visit)
    return bool(found)
